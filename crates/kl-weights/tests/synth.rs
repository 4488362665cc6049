//! Synthetic checkpoints: valid, deterministic, seed-dependent, shardable, with tokenizer files.
mod common;

use std::path::Path;

use common::TempDir;
use kl_config::{presets, ModelConfig};
use kl_weights::{synth_checkpoint, Checkpoint, Dtype, WeightsError};

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn tiny_synth_opens_validates_and_has_tokenizer() {
    let d = TempDir::new("synth");
    let rep = synth_checkpoint(&presets::tiny(), d.path(), 42, u64::MAX).unwrap();
    assert_eq!(rep.num_ranks, 256);
    assert_eq!(rep.files.len(), 5);
    let cfg = ModelConfig::from_file(&d.path().join("config.json")).unwrap();
    assert_eq!(cfg.raw.bos_token_id, Some(256));
    assert_eq!(cfg.eos_token_ids, vec![258]);
    assert_eq!(cfg.raw.pad_token_id, Some(511));
    let ck = Checkpoint::open(d.path()).unwrap();
    ck.validate(&cfg).unwrap();
    assert_eq!(ck.len(), rep.num_tensors);
    assert_eq!(ck.total_bytes(), rep.tensor_bytes);

    assert_eq!(
        ck.get("model.layers.0.self_attn.A_log").unwrap().dtype(),
        Dtype::F32
    );
    let a_log = ck
        .get("model.layers.0.self_attn.A_log")
        .unwrap()
        .to_f32_vec();
    assert!(
        a_log.iter().all(|&x| (0.0..=16f32.ln()).contains(&x)),
        "{a_log:?}"
    );
    let dt = ck
        .get("model.layers.0.self_attn.dt_bias")
        .unwrap()
        .to_f32_vec();
    assert!(
        dt.iter().all(|&x| (-7.0..-2.0).contains(&x)),
        "softplus⁻¹ of [1e-3, 1e-1]: {dt:?}"
    );
    let norm = ck.get("model.norm.weight").unwrap().to_f32_vec();
    assert!(norm.iter().all(|&x| (0.89..=1.11).contains(&x)));
    let q = ck.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype(), Dtype::BF16);
    let q = q.to_f32_vec();
    let var = q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32;
    assert!(
        (var * 128.0 - 1.0).abs() < 0.1,
        "std ≈ 1/sqrt(fan_in): var·fan_in = {}",
        var * 128.0
    );

    let tok = std::fs::read_to_string(d.path().join("tiktoken.model")).unwrap();
    assert_eq!(tok.lines().count(), 256);
    assert!(tok.starts_with("AA== 0\nAQ== 1\n"), "{}", &tok[..20]);
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["added_tokens_decoder"]["258"]["content"], "<|im_end|>");
    assert_eq!(tc["eos_token"], "[EOS]");
    let template = std::fs::read_to_string(d.path().join("chat_template.jinja")).unwrap();
    assert!(template.contains("<|im_middle|>"));
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (
        TempDir::new("seed-a"),
        TempDir::new("seed-b"),
        TempDir::new("seed-c"),
    );
    let mut raw = presets::tiny();
    raw.vocab_size = 1500; // exercise the BPE ranks too
    synth_checkpoint(&raw, a.path(), 7, u64::MAX).unwrap();
    synth_checkpoint(&raw, b.path(), 7, u64::MAX).unwrap();
    synth_checkpoint(&raw, c.path(), 8, u64::MAX).unwrap();
    let (fa, fb, fc) = (
        file_bytes(a.path()),
        file_bytes(b.path()),
        file_bytes(c.path()),
    );
    assert_eq!(fa, fb);
    let weights = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n == "model.safetensors")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(weights(&fa), weights(&fc));
    let tok = String::from_utf8(
        fa.iter()
            .find(|(n, _)| n == "tiktoken.model")
            .unwrap()
            .1
            .clone(),
    )
    .unwrap();
    assert_eq!(tok.lines().count(), 1244);
    let unique: std::collections::HashSet<&str> =
        tok.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(unique.len(), 1244);
}

#[test]
fn sharded_synth_validates() {
    let d = TempDir::new("synth-shards");
    let rep = synth_checkpoint(&presets::tiny(), d.path(), 1, 300_000).unwrap();
    assert!(d.path().join("model.safetensors.index.json").is_file());
    assert!(rep.files.len() > 6, "{:?}", rep.files);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert!(ck.files().len() > 1);
    ck.validate(&ModelConfig::from_file(&d.path().join("config.json")).unwrap())
        .unwrap();

    // Same weights as the unsharded output.
    let single = TempDir::new("synth-single");
    synth_checkpoint(&presets::tiny(), single.path(), 1, u64::MAX).unwrap();
    let one = Checkpoint::open(single.path()).unwrap();
    for t in one.iter() {
        assert_eq!(t.bytes(), ck.get(t.name()).unwrap().bytes(), "{}", t.name());
    }
}

#[test]
fn vocab_too_small() {
    let d = TempDir::new("synth-vocab");
    let mut raw = presets::tiny();
    raw.vocab_size = 300;
    let err = synth_checkpoint(&raw, d.path(), 0, u64::MAX).unwrap_err();
    assert!(matches!(err, WeightsError::Synth { .. }));
    let e = err.to_string();
    assert!(
        e.contains("vocab_size") && e.contains("300") && e.contains("512"),
        "{e}"
    );
    assert!(!d.path().join("model.safetensors").exists());
}

#[test]
fn invalid_config_is_refused() {
    let d = TempDir::new("synth-cfg");
    let mut raw = presets::tiny();
    raw.mla_use_nope = false;
    let e = synth_checkpoint(&raw, d.path(), 0, u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mla_use_nope"), "{e}");
}
