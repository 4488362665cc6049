//! Kernels with an AVX-512 path give exactly the bits of their AVX2 path; the KDA chunk kernel
//! gives the same bits with and without its non-temporal stores, and latent attention over a
//! bf16 cache on the AVX512-BF16 instruction or its FMA emulation.
//!
//! The ISA is chosen once per process, so each test recomputes its case in a child process of
//! this test binary with `KL_NO_AVX512=1` and compares the printed bits with its own. On a CPU
//! without AVX-512 both runs take the AVX2 path and the comparison holds trivially.

mod common;
use common::{bf16_rows, kda_inputs, Rng};
use half::bf16;
use kl_kernels::attention::{latent_attention, LatentAttnShape, SEGMENT};
use kl_kernels::kda::{kda_chunked, kda_recurrent, KdaShape};
use std::process::Command;

/// Bits of `x` as one line of hex words.
fn hex(x: &[f32]) -> String {
    x.iter()
        .map(|v| format!("{:08x}", v.to_bits()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// In the child, print `values` and return true; in the parent, run the child and assert that
/// it printed the same bits.
fn compare_with_avx2(test: &str, values: &[f32]) -> bool {
    compare_with_child(test, values, ("KL_NO_AVX512", "1"))
}

/// [`compare_with_child`] for a switch that this process has `on`: the child runs with `env` set
/// the other way (`0` or `1`).
fn compare_with_flipped(test: &str, values: &[f32], env: &str, on: bool) -> bool {
    compare_with_child(test, values, (env, if on { "0" } else { "1" }))
}

/// [`compare_with_avx2`] for a child run with environment variable `env.0` set to `env.1`.
fn compare_with_child(test: &str, values: &[f32], env: (&str, &str)) -> bool {
    let line = format!("BITS {}", hex(values));
    if std::env::var("KL_ISA_CHILD").is_ok() {
        println!("{line}");
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .env("KL_ISA_CHILD", "1")
        .output()
        .expect("runs the test binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest may print "test … " on the same line first.
    let child = stdout
        .lines()
        .find_map(|l| l.find("BITS ").map(|i| &l[i..]))
        .expect("the child prints its bits");
    assert!(
        child == line,
        "{test}: results differ with {}={}",
        env.0,
        env.1
    );
    false
}

/// The outputs and final states of [`kda_chunked`], then of [`kda_recurrent`], on random inputs
/// of each `(T, H, K, V)`, one after the other (all finite).
fn kda_bits(seed: u64, shapes: &[(usize, usize, usize, usize)]) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    for &(t, h, k, v) in shapes {
        let s = KdaShape::new(t, h, k, v);
        let [q, kk, vv, g, beta, st0] = kda_inputs(&mut rng, s);
        let mut out = vec![0f32; t * h * v];
        let mut st = st0.clone();
        kda_chunked(s, &q, &kk, &vv, &g, &beta, &mut st, &mut out);
        all.extend_from_slice(&out);
        all.extend_from_slice(&st);
        // The recurrent (decode) form too: its fused accumulation and its tail columns.
        let mut st = st0;
        kda_recurrent(s, &q, &kk, &vv, &g, &beta, &mut st, &mut out);
        all.extend_from_slice(&out);
        all.extend_from_slice(&st);
    }
    assert!(all.iter().all(|x| x.is_finite()));
    all
}

/// The outputs of [`latent_attention`] over a random bf16 cache of `n_keys` rows for each
/// `(H, Dk, Dv, block rows)`, one query (decode) and then `tq` queries (prefill), one after
/// the other (all finite).
fn attention_bits(
    seed: u64,
    shapes: &[(usize, usize, usize, usize)],
    n_keys: usize,
    tq: usize,
) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    for &(h, dk, dv, block_rows) in shapes {
        let s = LatentAttnShape { h, dk, dv };
        let store = bf16_rows(&mut rng, n_keys.div_ceil(block_rows) * block_rows, dk);
        let blocks: Vec<&[bf16]> = store.chunks(block_rows * dk).collect();
        for tq in [1, tq] {
            let q = rng.vec(tq * h * dk, 1.5);
            let mut o = vec![0f32; tq * h * dv];
            latent_attention(s, &q, &blocks, block_rows, n_keys, 0.15, &mut o);
            all.extend_from_slice(&o);
        }
    }
    assert!(all.iter().all(|x| x.is_finite()));
    all
}

#[test]
fn kda_bits_do_not_depend_on_avx512() {
    // Column counts below, at and past the 16- and 32-lane tiles; rows past the 8-row tiles.
    let all = kda_bits(31, &[(150, 2, 20, 36), (70, 1, 128, 128), (9, 3, 17, 47)]);
    compare_with_avx2("kda_bits_do_not_depend_on_avx512", &all);
}

/// The KDA chunk kernel's outputs are the same bits whether they are streamed to their rows
/// through the scratch or computed in place (`KL_NONTEMPORAL`): the child takes the other way.
#[test]
fn kda_chunked_bits_do_not_depend_on_nontemporal() {
    let all = kda_bits(32, &[(150, 2, 20, 36), (130, 3, 64, 64)]);
    compare_with_flipped(
        "kda_chunked_bits_do_not_depend_on_nontemporal",
        &all,
        "KL_NONTEMPORAL",
        kl_kernels::cpu::features().nontemporal,
    );
}

#[test]
fn latent_attention_bits_do_not_depend_on_avx512() {
    // Over the bf16 cache every shape here (whole column pairs) takes the bf16 products: on
    // AVX512-BF16 where the CPU has it, and the child's AVX2 emulation. Odd head counts (a
    // partial 8- or 16-head group), value widths with tails past the 16- and 32-column strips,
    // `mini`'s and the released model's rows; several segments and a partial tile; decode and
    // prefill.
    let shapes = [
        (7, 44, 40, 256),
        (3, 20, 17, 256),
        (5, 576, 512, 256),
        (2, 8, 8, 256),
        (11, 104, 100, 256),
        (9, 72, 64, 256),
        (17, 288, 256, 256),
    ];
    let all = attention_bits(21, &shapes, 2 * SEGMENT + 77, 6);
    compare_with_avx2("latent_attention_bits_do_not_depend_on_avx512", &all);
}

/// Latent attention over a bf16 cache gives the same bits on the AVX512-BF16 products as on
/// their FMA emulation (`KL_NO_AVX512BF16`): the child takes the other way. (Without the
/// instruction both runs emulate.)
#[test]
fn latent_attention_bits_do_not_depend_on_avx512bf16() {
    // Head counts around the 16-head groups and the 32-head pairs of groups, widths with pair
    // tails past the 32-column strips and a lone last key in a tile, `mini`'s and the released
    // model's rows; storage blocks that end inside tiles; decode and prefill.
    let shapes = [
        (17, 288, 256, 77),
        (32, 576, 512, 256),
        (33, 46, 40, 100),
        (3, 40, 32, 100),
        (9, 16, 16, 13),
    ];
    let all = attention_bits(24, &shapes, SEGMENT + 141, 5);
    compare_with_flipped(
        "latent_attention_bits_do_not_depend_on_avx512bf16",
        &all,
        "KL_NO_AVX512BF16",
        !kl_kernels::cpu::features().avx512bf16,
    );
}

/// Rows that are not bf16 as stored but take the bf16 products (as an fp8 cache does): f32
/// values in 100-row blocks, widened as they are and rounded to bf16 by the attention.
struct Rounded {
    rows: Vec<f32>,
    dk: usize,
}

impl kl_kernels::attention::KeyRows for Rounded {
    fn rows(&self) -> usize {
        self.rows.len() / self.dk
    }
    fn widen(&self, r0: usize, n: usize, dst: &mut [f32]) -> usize {
        let n = n.min(100 - r0 % 100).min(self.rows() - r0);
        dst[..n * self.dk].copy_from_slice(&self.rows[r0 * self.dk..(r0 + n) * self.dk]);
        n
    }
    fn bf16_products(&self) -> bool {
        true
    }
}

/// Such rows give the same bits on the instruction (rounded, then narrowed) as on the
/// emulation (rounded in the widened tile): the child takes the other way.
#[test]
fn rounded_rows_bits_do_not_depend_on_avx512bf16() {
    use kl_kernels::attention::latent_attention_rows;
    let mut rng = Rng::new(25);
    let mut all = Vec::new();
    for (h, dk, dv) in [(17, 288, 256), (5, 46, 40)] {
        let s = LatentAttnShape { h, dk, dv };
        let rows = Rounded {
            rows: rng.vec((SEGMENT + 141) * dk, 1.0),
            dk,
        };
        for tq in [1, 5] {
            let q = rng.vec(tq * h * dk, 1.5);
            let mut o = vec![0f32; tq * h * dv];
            latent_attention_rows(s, &q, &rows, 0.15, &mut o);
            all.extend_from_slice(&o);
        }
    }
    assert!(all.iter().all(|x| x.is_finite()));
    compare_with_flipped(
        "rounded_rows_bits_do_not_depend_on_avx512bf16",
        &all,
        "KL_NO_AVX512BF16",
        !kl_kernels::cpu::features().avx512bf16,
    );
}

#[test]
fn softmax_update_bits_do_not_depend_on_avx512() {
    use kl_kernels::attention::softmax_update;
    let mut rng = Rng::new(22);
    let mut all = Vec::new();
    // Around the 16- and 8-lane blocks: 16-lane chunks, then one 8-lane chunk, then a tail.
    for n in [1usize, 7, 8, 15, 16, 17, 24, 29, 45, 64, 77] {
        for (m0, l0) in [(f32::NEG_INFINITY, 0.0f32), (1.5, 3.0)] {
            let mut row = rng.vec(n, 4.0);
            let (mut m, mut l) = (m0, l0);
            let corr = softmax_update(&mut row, &mut m, &mut l);
            all.extend_from_slice(&row);
            all.extend_from_slice(&[m, l, corr]);
        }
    }
    compare_with_avx2("softmax_update_bits_do_not_depend_on_avx512", &all);
}
