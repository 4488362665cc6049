//! The opt-in bf16 activations of prefill products (`--bf16-activations`,
//! `kl_kernels::bf16_activations`), in a test binary of their own: the switch is process-wide,
//! and every other test binary checks the exact default.

mod common;
use common::*;
use kl_model::plan::{self, PlanRequest};
use kl_model::{CacheDtype, KimiLinear, LogitsMode, ModelOptions, Probe};

fn golden_logits(m: &KimiLinear, prompt: &[u32]) -> Vec<f32> {
    let mut st = m.new_state();
    m.prefill(prompt, &mut st, LogitsMode::All, &mut Probe::off())
        .unwrap()
}

/// Where the CPU has AVX512-BF16 the switch turns on, moves the golden logits by what bf16
/// activations cost (published in docs/memory.md: median row error about 0.09, top-1 98%),
/// runs deterministically, and the memory plan counts its packed inputs. Elsewhere it is
/// refused and stays off.
#[test]
fn bf16_activations_stay_within_published_tolerance() {
    let g = load_golden("golden_model.safetensors");
    let prompt: Vec<u32> = g["input_ids"].1.iter().map(|&x| x as u32).collect();
    let want = &g["logits"].1;
    let load = || {
        KimiLinear::load(
            &tiny_dir(),
            ModelOptions {
                cache_dtype: CacheDtype::F32,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let m = load();
    let exact = golden_logits(&m, &prompt);
    assert_close("default (f32 activations) vs golden", &exact, want, 1e-4);
    let req = PlanRequest {
        context: 4096,
        cache_dtype: CacheDtype::Bf16,
        prefill_chunk: 2048,
        all_logits: false,
        threads: 2,
    };
    let before = plan::plan(m.config(), 0, req).total_bytes;
    if !kl_kernels::bf16_activations::available() {
        assert!(!kl_kernels::bf16_activations::set_enabled(true));
        assert!(!kl_kernels::bf16_activations::enabled());
        assert_eq!(
            golden_logits(&m, &prompt),
            exact,
            "the switch must stay off"
        );
        return;
    }
    assert!(kl_kernels::bf16_activations::set_enabled(true));
    // `matmul` now rounds the activations of a bf16 product of more than 8 rows, while
    // `matmul_f32_activations` (the router's) keeps the exact f32 product's bits (those of the
    // AVX2 kernels, which the switch does not touch and which equal the AVX-512 ones).
    {
        use kl_kernels::matmul::{matmul, matmul_f32_activations, matmul_isa};
        let (t, k, n) = (40, 96, 70);
        let x: Vec<f32> = (0..t * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let w: Vec<half::bf16> = (0..n * k)
            .map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) * 0.021))
            .collect();
        let (mut exact, mut kept, mut fast) =
            (vec![0f32; t * n], vec![0f32; t * n], vec![0f32; t * n]);
        matmul_isa(kl_kernels::cpu::Isa::Avx2, &x, &w, &mut exact, t, k, n);
        matmul_f32_activations(&x, &w, &mut kept, t, k, n);
        matmul(&x, &w, &mut fast, t, k, n);
        assert!(
            kept == exact,
            "the router's product must keep f32 activations"
        );
        assert!(fast != exact, "the switch must reach `matmul`");
    }
    let after = plan::plan(m.config(), 0, req).total_bytes;
    assert!(
        after > before,
        "the plan must count the packed inputs: {after} vs {before}"
    );
    let m = load();
    let fast = golden_logits(&m, &prompt);
    assert_eq!(fast, golden_logits(&m, &prompt), "deterministic");
    assert!(fast.iter().all(|v| v.is_finite()));
    let vocab = want.len() / prompt.len();
    let mut rows: Vec<f32> = fast
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .map(|(a, b)| max_abs_diff(a, b))
        .collect();
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let agree = fast
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    rows.sort_by(f32::total_cmp);
    let median = rows[rows.len() / 2];
    eprintln!(
        "bf16 activations vs golden: median row error {median:e}, top-1 {agree}/{}",
        prompt.len()
    );
    assert!(
        median > 1e-3,
        "the products did not take bf16 activations ({median})"
    );
    assert!(median <= 0.2, "median row error {median}");
    assert!(agree * 100 >= 95 * prompt.len(), "top-1 agreement {agree}");
}
