//! Prefill products on bf16 activations (opt-in): `y = bf16(x)·Wᵀ` for bf16 weights, on
//! AVX512-BF16.
//!
//! The default prefill product ([`crate::matmul`]) keeps every activation in f32 and widens the
//! bf16 weights, so it runs at the FMA peak: 16 multiply–adds an instruction. Rounding the
//! activations to bf16 as well, as llama.cpp does for bf16 weights and as the reference model
//! computes in bf16, lets `vdpbf16ps` take 32 an instruction. This module does that, behind a
//! switch, because it gives up 16 of each activation's 24 significant bits: the golden model's
//! logits move by about 10⁻² (docs/memory.md), where the default path stays within 10⁻⁴ of the
//! f32 reference.
//!
//! **Numerics.** Each activation is rounded to bf16 (to nearest even; [`crate::attention_bf16::
//! round_bf16`]); products of two bf16 values are exact in f32, and each output sums its column
//! pairs in order, the odd column's product first, in one f32 (`vdpbf16ps`'s order), with
//! denormals flushed ([`crate::cpu::FlushDenormals`]). An output depends only on its own row of
//! `x` and of `W`, so the path is batch invariant among its own calls; but decode (`T ≤ 8`)
//! stays on the f32 matrix–vector kernel, so a prompt prefilled in pieces no longer gives the
//! bits of one prefill (as with the AMX switch, [`crate::amx`]).
//!
//! **Layout.** The product is the latent attention score kernel
//! ([`crate::attention_bf16::tile_scores`]) with tokens in the place of heads: `x` is packed
//! once per call in groups of 64 tokens (column pairs transposed, 16 tokens to a register), and
//! each task scores one group against a slice of up to 256 weight rows read as stored (each
//! row's pair broadcast), so the slice stays in L2 while the groups pass. Tasks are slices ×
//! groups, at least four per thread where the shape allows.
//!
//! Only where the CPU has AVX512-BF16 ([`available`]): elsewhere an emulation would run at the
//! FMA rate, no faster than the exact default, so the switch is refused. `K` must be even.
//! [`matmul_bf16_reference`] is the plain twin.

use crate::attention_bf16 as bf;
use crate::par::SendPtr;
use crate::simd::Prefetch;
use half::bf16;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Tokens per packed group (the lanes of one score block row).
const GROUP: usize = 64;

/// Widest slice of weight rows a task takes.
const SLICE: usize = 256;

/// Whether this CPU runs the bf16 products natively (AVX512-BF16).
pub fn available() -> bool {
    bf::native_products()
}

/// 0: not decided yet (read `KL_BF16_ACTIVATIONS` at the first query); 1: off; 2: on.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Ask for (or stop) bf16 activations in prefill products. Returns whether they will be used:
/// `false` when asked for on a CPU without AVX512-BF16 ([`available`]).
pub fn set_enabled(on: bool) -> bool {
    let on = on && available();
    MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    on
}

/// Whether prefill products on bf16 weights round their activations to bf16: [`set_enabled`],
/// or else `KL_BF16_ACTIVATIONS=1` in the environment, on a CPU where they are [`available`].
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let want = std::env::var("KL_BF16_ACTIVATIONS").is_ok_and(|v| v == "1");
            // A concurrent `set_enabled` wins over the environment.
            let on = want && available();
            let _ = MODE.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            MODE.load(Ordering::Relaxed) == 2
        }
        m => m == 2,
    }
}

/// Whether [`matmul_bf16`] takes a product with this `K` (whole column pairs).
pub fn fits(k: usize) -> bool {
    bf::takes(k)
}

/// Dwords of `t` rows of `K = k` packed in token groups.
fn packed_len(t: usize, k: usize) -> usize {
    t.div_ceil(GROUP) * bf::packed_query_len(GROUP, k)
}

/// Bytes that [`matmul_bf16`] keeps on a thread between calls after a product of `t` rows and
/// `K = k`, for memory planning: the packed `x` (on the calling thread) and one task's scores
/// (on every thread that runs a task). Each thread keeps its largest.
pub fn scratch_bytes(t: usize, k: usize) -> usize {
    4 * packed_len(t, k) + 4 * GROUP * SLICE
}

/// [`scratch_bytes`] for [`matmul_bf16_anywhere`], which without the instruction also keeps a
/// slice of weight rows widened into f32 on every thread that runs a task.
pub fn anywhere_scratch_bytes(t: usize, k: usize) -> usize {
    scratch_bytes(t, k) + 4 * SLICE * k
}

thread_local! {
    /// The calling thread's packed `x` (reused between calls: no allocation once warm).
    static XPACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A task's block of outputs `[GROUP, SLICE]` (reused between calls).
    static OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's weight slice widened into f32, for the emulation (reused between calls).
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y = bf16(x)·Wᵀ` with the contract of [`crate::matmul::matmul_reference`] (`x` `[T, K]`,
/// `W` `[N, K]`, `y` `[T, N]`); see the module docs for the numerics.
///
/// # Panics
/// If [`available`] is false, `K` is odd ([`fits`]), or a length is not the shape's.
pub fn matmul_bf16(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert!(available(), "bf16_activations: this CPU has no AVX512-BF16");
    products(true, x, w, y, t, k, n)
}

/// [`matmul_bf16`] on any CPU: the instruction where it is, else its FMA emulation over each
/// task's weight slice widened into f32 (exact), to the same bits, at the FMA rate. For
/// products whose inputs are bf16 values and whose outputs are rounded to bf16 at once (the
/// expanded MLA form's keys and values, `crate::expanded_bf16`), so that every machine
/// computes the same bits.
///
/// # Panics
/// If `K` is odd ([`fits`]), or a length is not the shape's.
pub fn matmul_bf16_anywhere(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    products(available(), x, w, y, t, k, n)
}

/// [`matmul_bf16`] on the instruction (`native`) or its emulation.
fn products(native: bool, x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert!(
        fits(k),
        "bf16_activations: K = {k} is not a whole number of pairs"
    );
    crate::matmul::check_shape("bf16_activations", x.len(), w.len(), y.len(), t, k, n);
    if t == 0 || n == 0 {
        return;
    }
    let gl = bf::packed_query_len(GROUP, k);
    let groups = t.div_ceil(GROUP);
    // Taken out of the thread's slot for the call (a task this thread runs while it waits
    // below may be another product, which then finds the slot empty and allocates).
    let mut xp = XPACK.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    if xp.len() < groups * gl {
        xp.resize(groups * gl, 0);
    }
    {
        let xpp = SendPtr(xp.as_mut_ptr());
        let pack = |g: usize| {
            let (g0, tg) = (g * GROUP, GROUP.min(t - g * GROUP));
            // SAFETY: group g's `gl` dwords are written by this task only.
            let dst = unsafe { std::slice::from_raw_parts_mut(xpp.get().add(g * gl), gl) };
            bf::pack_query(&x[g0 * k..(g0 + tg) * k], tg, k, dst);
        };
        // A parallel region costs more than packing one or two groups.
        if groups <= 2 {
            (0..groups).for_each(pack);
        } else {
            crate::par::for_each(groups, pack);
        }
    }
    let xp_ref: &[u32] = &xp[..groups * gl];
    // The widest slice that still leaves four tasks a thread (else the narrowest).
    let threads = crate::par::threads();
    let nb = [SLICE, SLICE / 2, SLICE / 4]
        .into_iter()
        .find(|&nb| groups * n.div_ceil(nb) >= 4 * threads)
        .unwrap_or(SLICE / 4);
    let slices = n.div_ceil(nb);
    let yp = SendPtr(y.as_mut_ptr());
    // Slice-major: consecutive tasks (which one thread tends to run in a row) share a slice.
    crate::par::for_each(slices * groups, |task| {
        let (s, g) = (task / groups, task % groups);
        let (g0, tg) = (g * GROUP, GROUP.min(t - g * GROUP));
        let (j0, nw) = (s * nb, nb.min(n - s * nb));
        let _flush = crate::cpu::FlushDenormals::new();
        OUT.with(|cell| {
            let mut out = cell.borrow_mut();
            if out.len() < GROUP * SLICE {
                out.resize(GROUP * SLICE, 0.0);
            }
            let out = &mut out[..tg * nw];
            let qg = &xp_ref[g * gl..(g + 1) * gl];
            let ws = &w[j0 * k..(j0 + nw) * k];
            let pf = &mut Prefetch::default();
            if native {
                bf::tile_scores(qg, tg, k, ws, nw, 1.0, out, pf);
            } else {
                WIDE.with(|cell| {
                    let mut wide = cell.borrow_mut();
                    wide.resize(nw * k, 0.0);
                    crate::Elem::widen(ws, &mut wide[..]);
                    bf::tile_scores_widened(qg, tg, k, &wide, nw, 1.0, out, pf);
                });
            }
            for (r, row) in out.chunks_exact(nw).enumerate() {
                // SAFETY: row g0 + r, columns j0..j0 + nw of y lie inside y (its length was
                // checked) and only this task writes them.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(yp.get().add((g0 + r) * n + j0), nw) };
                dst.copy_from_slice(row);
            }
        });
    });
    XPACK.with(|cell| *cell.borrow_mut() = xp);
}

/// Plain twin of [`matmul_bf16`]: each activation rounded to bf16, each output's column pairs
/// summed in order, the odd column's product first, by scalar FMAs (no denormal flush).
pub fn matmul_bf16_reference(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert!(
        fits(k),
        "bf16_activations: K = {k} is not a whole number of pairs"
    );
    crate::matmul::check_shape("bf16_activations", x.len(), w.len(), y.len(), t, k, n);
    for i in 0..t {
        let xr: Vec<f32> = x[i * k..(i + 1) * k]
            .iter()
            .map(|&v| bf::round_f32(v))
            .collect();
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let mut a = 0f32;
            for c in 0..k / 2 {
                a = xr[2 * c + 1].mul_add(wr[2 * c + 1].to_f32(), a);
                a = xr[2 * c].mul_add(wr[2 * c].to_f32(), a);
            }
            y[i * n + j] = a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// The kernel gives the twin's bits at odd sizes (groups and slices cut short, one row,
    /// one pair), and each row's outputs do not depend on the other rows.
    #[test]
    fn matches_the_twin_bit_for_bit() {
        if !available() {
            // Without the instruction the switch is refused (and stays off).
            assert!(!set_enabled(true));
            assert!(!enabled());
            return;
        }
        for (t, k, n) in [
            (9, 34, 17),
            (70, 256, 300),
            (1, 2, 1),
            (130, 96, 513),
            (64, 1024, 64),
        ] {
            let x = values(t * k, 3 + t as u64);
            let w: Vec<bf16> = values(n * k, 5 + n as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let (mut y, mut r) = (vec![0f32; t * n], vec![0f32; t * n]);
            matmul_bf16(&x, &w, &mut y, t, k, n);
            matmul_bf16_reference(&x, &w, &mut r, t, k, n);
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&r), "T={t} K={k} N={n}");
            // The last row alone gives its own bits again.
            let mut one = vec![0f32; n];
            matmul_bf16(&x[(t - 1) * k..], &w, &mut one, 1, k, n);
            assert_eq!(bits(&one), bits(&y[(t - 1) * n..]), "row {} alone", t - 1);
        }
    }

    /// The emulation gives the instruction's bits (where the CPU has it), denormal and special
    /// inputs included, and `matmul_bf16_anywhere` is whichever runs here.
    #[test]
    fn emulation_matches_the_instruction() {
        for (t, k, n) in [(9, 34, 17), (70, 256, 300), (1, 2, 1), (65, 96, 70)] {
            let mut x = values(t * k, 11 + t as u64);
            // A denormal, an infinity and a NaN among the activations.
            x[0] = 1e-39;
            if x.len() > 5 {
                x[3] = f32::INFINITY;
                x[5] = f32::NAN;
            }
            let w: Vec<bf16> = values(n * k, 13 + n as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            let mut e = vec![0f32; t * n];
            products(false, &x, &w, &mut e, t, k, n);
            if available() {
                let mut y = vec![0f32; t * n];
                products(true, &x, &w, &mut y, t, k, n);
                assert_eq!(bits(&e), bits(&y), "T={t} K={k} N={n}");
            }
            let mut y = vec![0f32; t * n];
            matmul_bf16_anywhere(&x, &w, &mut y, t, k, n);
            assert_eq!(bits(&e), bits(&y), "anywhere, T={t} K={k} N={n}");
        }
    }
}
