//! Causal depthwise 1-D convolution with a carried state (KDA's `ShortConvolution`), fused with SiLU.
//!
//! PyTorch `Conv1d(groups=C, padding=W-1)` keeping the first `T` outputs: tap `j = W-1` multiplies
//! the current token, tap `0` the token `W-1` steps back. The state holds the last `W-1` raw inputs,
//! oldest first, so a call on consecutive pieces equals one call on the whole sequence.
//!
//! The taps come as `[W, C]` (tap-major: a layer transposes PyTorch's `[C, 1, W]` once, at
//! load), so each output row is `W` vectorised multiply–add passes over contiguous channels.
//! [`conv1d_causal_silu`] runs blocks of output rows in parallel (each row reads only the inputs
//! before it); every output element is the sum over taps in tap order, then SiLU
//! ([`crate::activation::silu_inplace`]), as in [`conv1d_causal_silu_reference`].
//! [`conv1d_causal_silu_heads`] writes the same rows head-major, for the KDA chunk kernel.

use crate::activation::{silu, silu_inplace};
use crate::par::SendPtr;

/// `x` `[T, C]` (raw, pre-conv), `taps` `[W, C]` (row `W-1` multiplies the current token),
/// `state` `[W-1, C]` (oldest row first; zeros at the start of a sequence). Writes `out` `[T, C]`
/// = SiLU(conv) and updates `state` to the last `W-1` inputs.
pub fn conv1d_causal_silu(
    x: &[f32],
    c: usize,
    taps: &[f32],
    w: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    check(x, c, taps, w, state, out);
    let st: &[f32] = state;
    crate::par::rows_mut(out, c, 32, |r0, rows| {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::features().avx2_fma {
            // SAFETY: AVX2 checked; the body is safe code compiled 8 lanes wide.
            unsafe { conv_rows_avx2(x, st, c, w, taps, r0, rows) };
            silu_inplace(rows);
            return;
        }
        conv_rows(x, st, c, w, taps, r0, rows);
        silu_inplace(rows);
    });
    push_state(x, c, w, state);
}

/// [`conv1d_causal_silu`] with `out` head-major: `[C / hw, T, hw]`, the `hw` channels from
/// `h·hw` of token `t` at `(h·T + t)·hw` (the layout [`crate::kda::KdaLayout::HeadMajor`]
/// names, which the KDA chunk kernel reads fastest). Each row holds the bits of the same
/// channels of [`conv1d_causal_silu`]'s row `t`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_causal_silu_heads(
    x: &[f32],
    c: usize,
    taps: &[f32],
    w: usize,
    hw: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    check(x, c, taps, w, state, out);
    assert!(
        hw > 0 && c.is_multiple_of(hw),
        "conv1d: {c} channels are not heads of {hw}"
    );
    let st: &[f32] = state;
    let dst = SendPtr(out.as_mut_ptr());
    let t = x.len() / c;
    crate::par::row_blocks(t, 32, |rows| {
        let heads = Heads { dst, t, hw };
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::features().avx2_fma {
            // SAFETY: AVX2 checked; `heads` describes `out`, whose rows of tokens `rows` only
            // this block writes.
            unsafe { conv_heads_avx2(x, st, c, w, taps, rows, heads) };
            return;
        }
        // SAFETY: as above.
        unsafe { conv_heads(x, st, c, w, taps, rows, heads) };
    });
    push_state(x, c, w, state);
}

/// A head-major output: `t` tokens, rows `hw` wide.
#[derive(Clone, Copy)]
struct Heads {
    dst: SendPtr<f32>,
    t: usize,
    hw: usize,
}

/// Tokens `rows` of [`conv1d_causal_silu_heads`], each head's row computed in place and SiLU'd.
///
/// # Safety
/// `heads.dst` is a `[C / hw, t, hw]` buffer and no other thread touches the rows of tokens
/// `rows` in it.
#[inline(always)]
unsafe fn conv_heads(
    x: &[f32],
    st: &[f32],
    c: usize,
    w: usize,
    taps: &[f32],
    rows: std::ops::Range<usize>,
    heads: Heads,
) {
    let Heads { dst, t, hw } = heads;
    // Tiles of tokens, head by head within a tile: each head's rows of a tile are written in
    // one run (a token at a time across the heads wrote `C / hw` streams of one row each, twice
    // the token-major convolution's time), and the tile's inputs stay in L2 across its heads.
    let mut t0 = rows.start;
    while t0 < rows.end {
        let t1 = (t0 + CONV_TILE).min(rows.end);
        for hi in 0..c / hw {
            for ti in t0..t1 {
                // SAFETY: the caller's contract (row (hi, ti), `hw` floats).
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add((hi * t + ti) * hw), hw)
                };
                conv_channels(x, st, c, w, taps, ti, hi * hw, o);
                silu_inplace(o);
            }
        }
        t0 = t1;
    }
}

/// Tokens a tile of [`conv1d_causal_silu_heads`] takes (its inputs: 256 KiB at 4096 channels).
const CONV_TILE: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv_heads_avx2(
    x: &[f32],
    st: &[f32],
    c: usize,
    w: usize,
    taps: &[f32],
    rows: std::ops::Range<usize>,
    heads: Heads,
) {
    // SAFETY: the caller's contract.
    unsafe { conv_heads(x, st, c, w, taps, rows, heads) }
}

/// [`conv1d_causal_silu_heads`] as [`conv1d_causal_silu_reference`] followed by a plain copy of
/// each row to its head-major place (its twin).
#[allow(clippy::too_many_arguments)]
pub fn conv1d_causal_silu_heads_reference(
    x: &[f32],
    c: usize,
    taps: &[f32],
    w: usize,
    hw: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    let mut rows = vec![0f32; out.len()];
    conv1d_causal_silu_reference(x, c, taps, w, state, &mut rows);
    let t = x.len() / c;
    let shape = crate::kda::KdaShape::new(t, c / hw, hw, hw);
    crate::kda::copy_rows(&rows, shape, 0, out, shape.head_major(), 0, t, hw);
}

/// [`conv1d_causal_silu`] as a plain loop with the scalar [`silu`].
pub fn conv1d_causal_silu_reference(
    x: &[f32],
    c: usize,
    taps: &[f32],
    w: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    check(x, c, taps, w, state, out);
    let t = x.len() / c;
    for ti in 0..t {
        let o = &mut out[ti * c..(ti + 1) * c];
        o.fill(0.0);
        for j in 0..w {
            let r = input_row(x, state, c, w, ti + j);
            for ch in 0..c {
                o[ch] += taps[j * c + ch] * r[ch];
            }
        }
        for v in o.iter_mut() {
            *v = silu(*v);
        }
    }
    push_state(x, c, w, state);
}

fn check(x: &[f32], c: usize, taps: &[f32], w: usize, state: &[f32], out: &[f32]) {
    assert!(c > 0 && w > 0, "conv1d: zero channels or taps");
    assert_eq!(taps.len(), w * c, "conv1d: taps are not [W, C]");
    assert_eq!(state.len(), (w - 1) * c, "conv1d: state is not [W-1, C]");
    assert_eq!(x.len(), out.len(), "conv1d: x and out lengths differ");
    assert_eq!(x.len() % c, 0, "conv1d: x is not [T, C]");
}

/// Output rows `r0..` (as many as `rows` holds) before SiLU, from `[W, C]` taps.
#[inline(always)]
fn conv_rows(x: &[f32], st: &[f32], c: usize, w: usize, taps: &[f32], r0: usize, rows: &mut [f32]) {
    for (ri, o) in rows.chunks_exact_mut(c).enumerate() {
        conv_channels(x, st, c, w, taps, r0 + ri, 0, o);
    }
}

/// Channels `ch0..ch0 + o.len()` of output row `ti` (before SiLU) into `o`: the sum over taps in
/// tap order, as every path computes it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_channels(
    x: &[f32],
    st: &[f32],
    c: usize,
    w: usize,
    taps: &[f32],
    ti: usize,
    ch0: usize,
    o: &mut [f32],
) {
    let n = o.len();
    o.fill(0.0);
    for j in 0..w {
        let r = &input_row(x, st, c, w, ti + j)[ch0..ch0 + n];
        for ((ov, tv), rv) in o.iter_mut().zip(&taps[j * c + ch0..][..n]).zip(r) {
            *ov += tv * rv;
        }
    }
}

/// [`conv_rows`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv_rows_avx2(
    x: &[f32],
    st: &[f32],
    c: usize,
    w: usize,
    taps: &[f32],
    r0: usize,
    rows: &mut [f32],
) {
    conv_rows(x, st, c, w, taps, r0, rows)
}

/// Row `i` of the extended sequence `[state rows; x rows]`.
#[inline]
fn input_row<'a>(x: &'a [f32], state: &'a [f32], c: usize, w: usize, i: usize) -> &'a [f32] {
    let hist = w - 1;
    if i < hist {
        &state[i * c..(i + 1) * c]
    } else {
        &x[(i - hist) * c..(i - hist + 1) * c]
    }
}

/// New state: the last `W-1` rows of `[state; x]`, updated in place (no allocation).
fn push_state(x: &[f32], c: usize, w: usize, state: &mut [f32]) {
    let hist = w - 1;
    let t = x.len() / c;
    if hist > 0 {
        if t >= hist {
            state.copy_from_slice(&x[(t - hist) * c..t * c]);
        } else {
            state.copy_within(t * c.., 0);
            state[(hist - t) * c..].copy_from_slice(x);
        }
    }
}
