//! Prefill products on bf16 activations (opt-in): `y = bf16(x)·Wᵀ` for bf16 weights, on
//! AVX512-BF16.
//!
//! The default prefill product ([`crate::matmul`]) keeps every activation in f32 and widens the
//! bf16 weights, so it runs at the FMA peak: 16 multiply–adds an instruction. Rounding the
//! activations to bf16 as well, as llama.cpp does for bf16 weights and as the reference model
//! computes in bf16, lets `vdpbf16ps` take 32 an instruction. This module does that, behind a
//! switch, because it gives up 16 of each activation's 24 significant bits: the golden model's
//! logits move by a median of about 0.09 a position (top-1 98%; docs/memory.md), where the
//! default path stays within 10⁻⁴ of the f32 reference.
//!
//! **Numerics.** Each activation is rounded to bf16 (to nearest even; [`crate::attention_bf16::
//! round_bf16`]); products of two bf16 values are exact in f32, and each output sums its column
//! pairs in order, the odd column's product first, in one f32 (`vdpbf16ps`'s order), with
//! denormals flushed ([`crate::cpu::FlushDenormals`]). An output depends only on its own row of
//! `x` and of `W`, so the path is batch invariant among its own calls; but decode (`T ≤ 8`)
//! stays on the f32 matrix–vector kernel, so a prompt prefilled in pieces no longer gives the
//! bits of one prefill (as with the AMX switch, [`crate::amx`]).
//!
//! **Layout.** From 128 rows of `x` (a dense layer's products): `x` rounded to bf16 once per call
//! (a row of bf16 values is then its column pairs as they lie; products of one `x` can share
//! it: [`with_rounded_rows`]), each task packs a panel of 64 weight rows, 512 column pairs at a
//! time, into pairs on the lanes (16 × 16 transposes), and
//! `6 × 64` register tiles broadcast a row's pair against four panel registers; each output's
//! chain continues across the `K` blocks through `y`. Fewer rows (an expert's): the latent
//! attention score kernel ([`crate::attention_bf16::tile_scores`]) with the rows in the place of
//! heads, `x` packed once per call in groups of 64 rows (column pairs transposed, 16 rows to a
//! register), each task scoring one group against a slice of up to 256 weight rows read as
//! stored, so no panel is packed for a few rows. Both give every output the same chain, so the
//! same bits (tested against the twin); the emulation runs the second layout over widened
//! weight slices.
//!
//! Only where the CPU has AVX512-BF16 ([`available`]): elsewhere an emulation would run at the
//! FMA rate, no faster than the exact default, so the switch is refused. `K` must be even.
//! [`matmul_bf16_reference`] is the plain twin.

use crate::attention_bf16 as bf;
use crate::par::SendPtr;
use crate::simd::Prefetch;
use half::bf16;
use std::cell::RefCell;

/// Tokens per packed group (the lanes of one score block row).
const GROUP: usize = 64;

/// Widest slice of weight rows a task takes.
const SLICE: usize = 256;

/// Whether this CPU runs the bf16 products natively (AVX512-BF16).
pub fn available() -> bool {
    bf::native_products()
}

/// The switch (`KL_BF16_ACTIVATIONS=1`, or [`set_enabled`]).
static SWITCH: crate::cpu::OptIn = crate::cpu::OptIn::new("KL_BF16_ACTIVATIONS");

/// Ask for (or stop) bf16 activations in prefill products. Returns whether they will be used:
/// `false` when asked for on a CPU without AVX512-BF16 ([`available`]).
pub fn set_enabled(on: bool) -> bool {
    SWITCH.set(on, available())
}

/// Whether prefill products on bf16 weights round their activations to bf16: [`set_enabled`],
/// or else `KL_BF16_ACTIVATIONS=1` in the environment, on a CPU where they are [`available`].
pub fn enabled() -> bool {
    SWITCH.get(available)
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
/// `K = k`, for memory planning: the packed `x` (on the calling thread; either layout's) and a
/// task's outputs and packed panel block (on every thread that runs a task). Each thread keeps
/// its largest.
pub fn scratch_bytes(t: usize, k: usize) -> usize {
    4 * packed_len(t, k) + 4 * GROUP * SLICE + 4 * KC * NR
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
    /// A task's packed panel block `[KC pairs][NR]` (reused between calls).
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, MR, NR};
    use crate::attention_bf16::x86::transpose16;
    use half::bf16;
    use std::arch::x86_64::*;

    /// Pairs `c0..c0 + kc` of weight rows `n0..n0 + nw` into `bp` as `[kc][NR]` dwords (pair
    /// `p` of the panel's row `j` at `p·NR + j`; rows past `nw` zero): 16 rows × 16 pairs a
    /// step, one 16 × 16 transpose each.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panel(
        w: &[bf16],
        k: usize,
        n0: usize,
        nw: usize,
        c0: usize,
        kc: usize,
        bp: &mut [u32],
    ) {
        debug_assert!(kc <= KC && bp.len() >= KC * NR && w.len() >= (n0 + nw) * k);
        let (wp, op) = (w.as_ptr().cast::<u32>(), bp.as_mut_ptr());
        let kp = k / 2;
        for g in 0..NR / 16 {
            let mut p0 = 0;
            while p0 < kc {
                let left = (kc - p0).min(16);
                let m = ((1u32 << left) - 1) as __mmask16;
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate() {
                    let j = 16 * g + i;
                    if j < nw {
                        let src = wp.add((n0 + j) * kp + c0 + p0);
                        // The row's line four steps on (these rows come from memory once).
                        _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(64).cast());
                        *ri = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, src.cast()));
                    }
                }
                let tr = transpose16(&r);
                for (c, v) in tr.iter().enumerate().take(left) {
                    _mm512_storeu_ps(op.add((p0 + c) * NR + 16 * g).cast(), *v);
                }
                p0 += 16;
            }
        }
    }

    /// `mr ≤ MR` rows of `x` (dwords of bf16 pairs, `ldx` apart) against a packed panel block
    /// of `kc` pairs: `y` columns `0..nw` of those rows continue their sums (`first`: start
    /// from zero).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        mr: usize,
        xp: *const u32,
        ldx: usize,
        bp: *const u32,
        kc: usize,
        y: *mut f32,
        ldy: usize,
        nw: usize,
        first: bool,
    ) {
        match mr {
            6 => tile_n::<6>(xp, ldx, bp, kc, y, ldy, nw, first),
            5 => tile_n::<5>(xp, ldx, bp, kc, y, ldy, nw, first),
            4 => tile_n::<4>(xp, ldx, bp, kc, y, ldy, nw, first),
            3 => tile_n::<3>(xp, ldx, bp, kc, y, ldy, nw, first),
            2 => tile_n::<2>(xp, ldx, bp, kc, y, ldy, nw, first),
            _ => tile_n::<1>(xp, ldx, bp, kc, y, ldy, nw, first),
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_n<const R: usize>(
        xp: *const u32,
        ldx: usize,
        bp: *const u32,
        kc: usize,
        y: *mut f32,
        ldy: usize,
        nw: usize,
        first: bool,
    ) {
        const { assert!(R <= MR) };
        let masks: [__mmask16; 4] = std::array::from_fn(|j| {
            let l = nw.saturating_sub(16 * j).min(16);
            ((1u32 << l) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if !first {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(masks[j], y.add(r * ldy + 16 * j));
                }
            }
        }
        for p in 0..kc {
            let b: [__m512bh; 4] = std::array::from_fn(|j| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(p * NR + 16 * j).cast(),
                ))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *xp.add(r * ldx + p) as i32,
                ));
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_dpbf16_ps(*v, b[j], a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(y.add(r * ldy + 16 * j), masks[j], *a);
            }
        }
    }
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
    // Many rows: weight panels packed once and reused by every row; few (an expert's), the
    // weights read as stored with the rows on the lanes (packing a panel for a few rows cost
    // more than it saved). The same bits either way.
    #[cfg(target_arch = "x86_64")]
    if native && t >= PANEL_ROWS {
        return panel_products(x, w, y, t, k, n);
    }
    lanes(native, x, w, y, t, k, n)
}

/// Rows from which the instruction's product packs weight panels.
#[cfg(target_arch = "x86_64")]
const PANEL_ROWS: usize = 128;

/// Rows of `x` per register tile, weight rows per panel (four registers of 16 lanes), and
/// column pairs per `K` block (a packed panel block of 128 KiB, in L2) of the instruction's
/// kernel. Blocks of 512 pairs instead of 256 halve the passes over the outputs (each block
/// reads and writes its tiles' outputs once): 48B shape +2–4%, `mini` +1–2% (1024: the same as
/// 512, at twice the panel).
#[cfg(target_arch = "x86_64")]
const MR: usize = 6;
const NR: usize = 64;
const KC: usize = 512;

/// The instruction's product: `x` rounded to bf16 once per call (its rows are then column
/// pairs as they lie), each task packs a panel of 64 weight rows block by block into pairs
/// on the lanes (`[pairs][64]`), and `MR × 64` register tiles broadcast a row's pair against
/// them; no transposes on the way out. Each output is one `vdpbf16ps` chain over its pairs in
/// order (continued across `K` blocks through `y`), so the bits are the twin's.
#[cfg(target_arch = "x86_64")]
fn panel_products(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    with_rounded_rows(x, t, k, |xr| panel_tiles(xr.xb, w, y, t, k, n))
}

/// `x` (`[T, K]`, `K` even) rounded to bf16, each row then its `K/2` column pairs as dwords: what
/// the panel products read. Several products of one `x` can share it
/// ([`with_rounded_rows`], [`matmul_bf16_rounded`]).
#[derive(Clone, Copy)]
pub struct RoundedRows<'a> {
    xb: &'a [u32],
    t: usize,
    k: usize,
}

impl RoundedRows<'_> {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.t
    }

    /// Columns (`K`).
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// Whether [`matmul_bf16`] rounds `x` once for a product of `t` rows and `K = k` and shares
/// nothing else with other products of the same `x` (the panel products, from 128 rows on the
/// instruction): then [`with_rounded_rows`] and [`matmul_bf16_rounded`] give its bits with one
/// rounding for all of them.
pub fn shares_rounding(t: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return available() && t >= PANEL_ROWS && fits(k);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, k);
        false
    }
}

/// `f` on `x` rounded to bf16 ([`RoundedRows`]) in the calling thread's buffer, which the
/// panel products of [`matmul_bf16`] otherwise round into (no second buffer; one held between
/// calls). Rows in blocks of 64, in parallel for many rows.
///
/// # Panics
/// If `K` is odd or `x` is not `t·k` long.
pub fn with_rounded_rows<R>(
    x: &[f32],
    t: usize,
    k: usize,
    f: impl FnOnce(RoundedRows<'_>) -> R,
) -> R {
    assert!(
        fits(k) && x.len() == t * k,
        "bf16_activations: x is not [{t}, {k}] with K even"
    );
    let kp = k / 2;
    // Taken out of the thread's slot for the call (a task this thread runs while it waits may be
    // another product, which then finds the slot empty and allocates).
    let mut xb = XPACK.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    if xb.len() < t * kp {
        xb.resize(t * kp, 0);
    }
    {
        let xbp = SendPtr(xb.as_mut_ptr().cast::<bf16>());
        let round = |b: usize| {
            let (r0, r1) = (b * 64, ((b + 1) * 64).min(t));
            // SAFETY: rows r0..r1 of the buffer (`kp` dwords, `k` bf16 a row) are written by
            // this task only.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(xbp.get().add(r0 * k), (r1 - r0) * k) };
            bf::narrow_rounded(&x[r0 * k..r1 * k], dst);
        };
        let blocks = t.div_ceil(64);
        if blocks <= 2 {
            (0..blocks).for_each(round);
        } else {
            crate::par::for_each(blocks, round);
        }
    }
    let r = f(RoundedRows {
        xb: &xb[..t * kp],
        t,
        k,
    });
    XPACK.with(|cell| *cell.borrow_mut() = xb);
    r
}

/// [`matmul_bf16`] on rows rounded once ([`with_rounded_rows`]): the same bits, for a product
/// that [`shares_rounding`] says takes them.
///
/// # Panics
/// If [`shares_rounding`] is false for the rows' shape, or a length is not the shape's.
pub fn matmul_bf16_rounded(x: RoundedRows<'_>, w: &[bf16], y: &mut [f32], n: usize) {
    let (t, k) = (x.t, x.k);
    assert!(
        shares_rounding(t, k),
        "bf16_activations: rows rounded once are for the panel products"
    );
    crate::matmul::check_shape("bf16_activations", t * k, w.len(), y.len(), t, k, n);
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    panel_tiles(x.xb, w, y, t, k, n);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x.xb, w, y);
}

/// The panel products' tiles over rows rounded once (`xb`, `t` rows of `K/2` dwords).
#[cfg(target_arch = "x86_64")]
fn panel_tiles(xb_ref: &[u32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    let kp = k / 2;

    let panels = n.div_ceil(NR);
    let threads = crate::par::threads();
    // Token ranges of whole tiles, so that there are at least two tasks a thread.
    let tiles = t.div_ceil(MR);
    let t_parts = (2 * threads).div_ceil(panels).clamp(1, tiles);
    let t_step = tiles.div_ceil(t_parts) * MR;
    let t_parts = t.div_ceil(t_step);
    let yp = SendPtr(y.as_mut_ptr());
    crate::par::for_each(panels * t_parts, |task| {
        let (pi, ti) = (task / t_parts, task % t_parts);
        let (n0, nw) = (pi * NR, NR.min(n - pi * NR));
        let (r0, r1) = (ti * t_step, ((ti + 1) * t_step).min(t));
        let _flush = crate::cpu::FlushDenormals::new();
        PANEL.with(|cell| {
            let mut bp = cell.borrow_mut();
            if bp.len() < KC * NR {
                bp.resize(KC * NR, 0);
            }
            let mut c0 = 0;
            while c0 < kp {
                let kc = KC.min(kp - c0);
                // SAFETY: AVX512-BF16, -BW and -F checked by the caller (`available`); rows
                // n0..n0 + nw of w have `k` values; the panel holds KC·NR dwords.
                unsafe { x86::pack_panel(w, k, n0, nw, c0, kc, &mut bp) };
                let mut r = r0;
                while r < r1 {
                    let mr = MR.min(r1 - r);
                    // SAFETY: as above; rows r..r + mr of x (pairs c0..c0 + kc) and of y
                    // (columns n0..n0 + nw) are inside their buffers, and only this task
                    // writes those outputs.
                    unsafe {
                        let xr = xb_ref.as_ptr().add(r * kp + c0);
                        let yr = yp.get().add(r * n + n0);
                        x86::tile(mr, xr, kp, bp.as_ptr(), kc, yr, n, nw, c0 == 0)
                    };
                    r += mr;
                }
                c0 += kc;
            }
        });
    });
}

/// The product through the score kernel of latent attention with the rows in the place of the
/// heads, on the instruction (`native`: the weights read as stored) or its FMA emulation (each
/// task's weight slice widened into f32): the same bits as [`panel_products`].
fn lanes(native: bool, x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
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

    /// Uniform in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(len, seed, 2.0)
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
            (13, 1030, 70),
            (200, 1030, 70),
            (150, 2306, 70),
            (128, 64, 1000),
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

    /// Rows rounded once serve several products with each one's own bits.
    #[test]
    fn rows_rounded_once_give_each_products_bits() {
        if !available() {
            assert!(!shares_rounding(200, 64));
            return;
        }
        let (t, k) = (150, 1030);
        assert!(shares_rounding(t, k) && !shares_rounding(127, k) && !shares_rounding(t, 7));
        let x = values(t * k, 11);
        let ws: Vec<Vec<bf16>> = [70, 1, 130]
            .iter()
            .map(|&n| {
                values(n * k, n as u64)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            })
            .collect();
        with_rounded_rows(&x, t, k, |xr| {
            assert_eq!((xr.rows(), xr.cols()), (t, k));
            for w in &ws {
                let n = w.len() / k;
                let (mut a, mut b) = (vec![0f32; t * n], vec![f32::NAN; t * n]);
                matmul_bf16(&x, w, &mut a, t, k, n);
                matmul_bf16_rounded(xr, w, &mut b, n);
                let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "N={n}");
            }
        });
    }

    /// The emulation gives the instruction's bits (where the CPU has it), denormal and special
    /// inputs included, and `matmul_bf16_anywhere` is whichever runs here.
    #[test]
    fn emulation_matches_the_instruction() {
        for (t, k, n) in [
            (9, 34, 17),
            (70, 256, 300),
            (1, 2, 1),
            (65, 96, 70),
            (150, 96, 70),
        ] {
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
