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
        forward_many_rounds_a_shared_input_once_with_each_products_bits(false);
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
    forward_many_rounds_a_shared_input_once_with_each_products_bits(true);
}

/// `Linear::forward_many` and `forward_each` round one `x` once for the products that share it
/// under the switch
/// (`on`), and every product keeps the bits of its own `forward`: bf16 weights on that `x`, on
/// another `x`, f32 weights, and a product that keeps f32 activations. (Called from the test
/// above: the switch is process-wide.)
fn forward_many_rounds_a_shared_input_once_with_each_products_bits(on: bool) {
    use kl_layers::linear::Linear;
    use kl_weights::Dtype;
    let (t, k) = (200, 96);
    let x: Vec<f32> = (0..t * k)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
        .collect();
    let x2: Vec<f32> = x.iter().map(|v| v * 0.75 + 0.01).collect();
    let lin = |dtype, n: usize, seed: usize| {
        Linear::from_fn(dtype, n, k, move |r, c| {
            (((r * 31 + c * 17 + seed) * 2654435761usize % 4099) as f32 / 4099.0) - 0.5
        })
    };
    let ls = [
        lin(Dtype::BF16, 70, 1),
        lin(Dtype::BF16, 32, 2),
        lin(Dtype::BF16, 130, 3),
        lin(Dtype::F32, 40, 4),
        lin(Dtype::BF16, 50, 5).with_f32_activations(),
        lin(Dtype::BF16, 60, 6),
    ];
    let xs: [&[f32]; 6] = [&x, &x, &x, &x, &x, &x2];
    let want: Vec<Vec<f32>> = ls.iter().zip(xs).map(|(l, x)| l.apply(x, t)).collect();
    let mut ys: Vec<Vec<f32>> = Vec::new();
    for each in [false, true] {
        ys = ls.iter().map(|l| vec![f32::NAN; t * l.rows()]).collect();
        let mut jobs: Vec<(&Linear, &[f32], &mut [f32])> = ls
            .iter()
            .zip(xs)
            .zip(ys.iter_mut())
            .map(|((l, x), y)| (l, x, &mut y[..]))
            .collect();
        if each {
            Linear::forward_each(t, &mut jobs);
        } else {
            Linear::forward_many(t, &mut jobs);
        }
        drop(jobs);
        for (i, (a, b)) in ys.iter().zip(&want).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(a),
                bits(b),
                "product {i}, each {each} (switch on: {on})"
            );
        }
    }
    if on {
        // The shared rounding is what ran: the bf16 products on `x` differ from f32 ones.
        let exact = lin(Dtype::F32, 70, 1).apply(&x, t);
        assert_ne!(ys[0], exact);
    }
}
