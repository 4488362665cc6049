//! `kimi-linear forward` end to end on the golden tiny model.

mod common;
use common::*;

/// Tensors of an output file by name: (dtype, shape, values).
type Tensors = std::collections::BTreeMap<String, (String, Vec<usize>, Vec<f64>)>;

fn golden() -> Tensors {
    read_output(&shared().join("golden/golden_model.safetensors"))
}

/// The golden file, a fresh directory `name`, and the golden prompt's ids written into it.
fn golden_inputs(name: &str) -> (Tensors, TestDir, String) {
    let g = golden();
    let dir = temp_dir(name);
    let ids: Vec<i64> = g["input_ids"].2.iter().map(|&x| x as i64).collect();
    let ids_path = write_ids(&dir, &serde_json::to_string(&ids).unwrap());
    (g, dir, ids_path)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn forward_reproduces_golden_logits_and_greedy_ids() {
    let (g, dir, ids_path) = golden_inputs("fwd");
    let out = dir.join("out.safetensors");
    let tiny = tiny_dir();
    let o = run(&[
        "forward",
        "--model",
        tiny.to_str().unwrap(),
        "--input-ids",
        &ids_path,
        "--decode",
        "16",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read_output(&out);
    assert_eq!(r["logits"].1, vec![100, 512]);
    assert!(max_diff(&r["logits"].2, &g["logits"].2) < 1e-4);
    assert_eq!(r["greedy.generated_ids"].0, "I64");
    assert_eq!(r["greedy.generated_ids"].2, g["greedy.generated_ids"].2);
    assert!(max_diff(&r["greedy.step_logits"].2, &g["greedy.step_logits"].2) < 1e-4);

    // The remote-code router convention.
    let out2 = dir.join("biased.safetensors");
    let o = run(&[
        "forward",
        "--model",
        tiny.to_str().unwrap(),
        "--input-ids",
        &ids_path,
        "--router-weights",
        "biased",
        "--prefill-chunk",
        "33",
        "--output",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2 = read_output(&out2);
    assert!(
        max_diff(
            &r2["logits"].2,
            &g["variant.router_weights_biased.logits"].2
        ) < 1e-4
    );
    assert!(!r2.contains_key("greedy.generated_ids"));
}

/// `forward` on the golden prompt with an opt-in switch `flag`: the golden file and the output,
/// or `None` after checking that a machine without the switch's hardware (`available`) refuses
/// it with status 2 and a message naming the flag and `needle` (never silently ignoring it).
fn forward_with_switch(flag: &str, available: bool, needle: &str) -> Option<(Tensors, Tensors)> {
    let (g, dir, ids_path) = golden_inputs(&format!("fwd{flag}"));
    let out = dir.join("out.safetensors");
    let tiny = tiny_dir();
    let o = run(&[
        flag,
        "forward",
        "--model",
        tiny.to_str().unwrap(),
        "--input-ids",
        &ids_path,
        "--output",
        out.to_str().unwrap(),
    ]);
    if !available {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(flag) && err.contains(needle), "{err}");
        return None;
    }
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some((g, read_output(&out)))
}

/// `--amx`: where the CPU and OS have AMX tiles, the prefill products run on them and the logits
/// still match the golden ones at the same tolerance; elsewhere the flag is refused.
#[test]
fn forward_with_amx_matches_golden_or_is_refused() {
    let available = kl_kernels::amx::available();
    if let Some((g, r)) = forward_with_switch("--amx", available, "AMX-BF16") {
        assert!(max_diff(&r["logits"].2, &g["logits"].2) < 1e-4);
    }
}

/// `--bf16-activations`: where the CPU has AVX512-BF16 the prefill products round their
/// activations to bf16 (the logits move off the golden ones by what that costs, and `bench
/// --json` says the switch is on); elsewhere the flag is refused.
#[test]
fn forward_with_bf16_activations_runs_or_is_refused() {
    let available = kl_kernels::bf16_activations::available();
    let Some((g, r)) = forward_with_switch("--bf16-activations", available, "AVX512-BF16") else {
        return;
    };
    let d = max_diff(&r["logits"].2, &g["logits"].2);
    // Off the f32 golden (so the switch took effect), but the same logits (a few flipped
    // near-ties aside; the model-level test bounds the median and top-1).
    assert!(d > 1e-3 && d.is_finite(), "{d}");
    let tiny = tiny_dir();
    let o = run(&[
        "--bf16-activations",
        "bench",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt-tokens",
        "40",
        "--gen-tokens",
        "2",
        "--no-roofline",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bf16_activations"], serde_json::json!(true));
}
