//! The golden tiny checkpoint (written by PyTorch) opens, validates and keeps its dtypes.
mod common;

use kl_config::{presets, ModelConfig};
use kl_weights::{expected_tensors, Checkpoint, Dtype};

#[test]
fn golden_tiny_opens_and_validates() {
    let dir = common::golden_tiny();
    let ck = Checkpoint::open(&dir).unwrap();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    ck.validate(&cfg).unwrap();
    // The preset describes the same model.
    ck.validate(&ModelConfig::from_raw(presets::tiny()).unwrap())
        .unwrap();
    assert_eq!(ck.len(), expected_tensors(&cfg).len());
    assert_eq!(ck.files().len(), 1);

    let a_log = ck.get("model.layers.0.self_attn.A_log").unwrap();
    assert_eq!(a_log.dtype(), Dtype::F32);
    assert_eq!(a_log.shape(), &[1, 1, 3, 1]);
    let v = a_log.as_f32().unwrap();
    assert!(
        v.iter().all(|x| (0.0..=16f32.ln() + 1e-6).contains(x)),
        "A_log = ln U(1,16): {v:?}"
    );
    assert!(a_log.as_bf16().is_none());

    let q = ck.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype(), Dtype::BF16);
    assert_eq!(q.shape(), &[96, 128]);
    let bf = q.as_bf16().unwrap();
    assert_eq!(bf.len(), 96 * 128);
    assert!(q.is_zero_copy());
    let up = q.to_f32_vec();
    assert_eq!(up[5], bf[5].to_f32());
    assert!(up.iter().all(|x| x.is_finite()));

    for name in [
        "model.layers.0.self_attn.dt_bias",
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias",
    ] {
        assert_eq!(ck.get(name).unwrap().dtype(), Dtype::F32, "{name}");
    }
    let bytes: u64 = ck
        .iter()
        .map(|t| (t.numel() * t.dtype().size()) as u64)
        .sum();
    assert_eq!(ck.total_bytes(), bytes);
    let all_aligned = ck.iter().all(|t| t.is_zero_copy());
    assert!(all_aligned, "the PyTorch writer aligns every tensor");
}

#[test]
fn golden_tiny_against_a_wrong_config_lists_everything() {
    let dir = common::golden_tiny();
    let ck = Checkpoint::open(&dir).unwrap();
    let mut raw = presets::tiny();
    raw.hidden_size = 64;
    let err = ck
        .validate(&ModelConfig::from_raw(raw).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight")
            && err.contains("[512, 64]")
            && err.contains("[512, 128]"),
        "{err}"
    );
    assert!(
        err.contains("model.norm.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}
