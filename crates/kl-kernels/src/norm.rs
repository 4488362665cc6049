//! RMSNorm variants: plain, gated (KDA output norm) and per-head L2 normalisation.

use crate::activation::{mul_sigmoid, sigmoid};
use crate::Elem;

/// Row-wise RMSNorm: `out[r] = w ⊙ x[r] / sqrt(mean(x[r]²) + eps)` for rows of width `w.len()`.
/// The sum of squares is [`crate::simd::dot_f32`] (several SIMD accumulators, a fixed order per
/// instruction set), and many rows run in parallel: a prefill chunk's norms had been one thread's
/// serial chain of adds (2–3% of `mini`'s prefill, the other thread waiting). A row's result
/// depends only on the row, so decode and prefill agree bit for bit.
pub fn rms_norm<W: Elem>(x: &[f32], w: &[W], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d, 0);
    crate::par::rows_mut(out, d, 64, |r0, rows| {
        let x = &x[r0 * d..r0 * d + rows.len()];
        for (xr, or) in x.chunks_exact(d).zip(rows.chunks_exact_mut(d)) {
            rms_row(xr, w, eps, or);
        }
    });
}

/// One row of [`rms_norm`].
#[inline(always)]
fn rms_row<W: Elem>(xr: &[f32], w: &[W], eps: f32, or: &mut [f32]) {
    let ms = crate::simd::dot_f32(xr, xr) / w.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
        *o = wv.to_f32() * (xv * r);
    }
}

/// [`rms_norm`] as a plain loop: one row at a time, the squares summed in order.
pub fn rms_norm_reference<W: Elem>(x: &[f32], w: &[W], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d, 0);
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = wv.to_f32() * (xv * r);
        }
    }
}

/// Gated RMSNorm of the KDA output (fla `FusedRMSNormGated`, sigmoid activation): for each row
/// of width `w.len()`, `out = w ⊙ x / sqrt(mean(x²) + eps) ⊙ sigmoid(gate)`. The gate is
/// vectorised ([`mul_sigmoid`]); many rows run in parallel.
pub fn rms_norm_gated<W: Elem>(x: &[f32], gate: &[f32], w: &[W], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), gate.len());
    assert_eq!(x.len(), out.len());
    crate::par::rows_mut(out, d, 32, |r0, rows| {
        let (x, gate) = (
            &x[r0 * d..r0 * d + rows.len()],
            &gate[r0 * d..r0 * d + rows.len()],
        );
        crate::par::serial(|| rms_norm(x, w, eps, rows));
        mul_sigmoid(rows, gate);
    });
}

/// [`rms_norm_gated`] of a head-major `x`: `x` is `[H, T, d]` (the KDA kernel's head-major
/// output, [`crate::kda::KdaLayout::HeadMajor`]), `gate` and `out` are `[T, H·d]`, `d =
/// w.len()`. The same bits as [`rms_norm_gated`] on `x` laid out token-major; the change of
/// layout costs no pass of its own.
pub fn rms_norm_gated_heads<W: Elem>(
    x: &[f32],
    gate: &[f32],
    w: &[W],
    eps: f32,
    h: usize,
    out: &mut [f32],
) {
    let d = w.len();
    assert_eq!(x.len(), gate.len());
    assert_eq!(x.len(), out.len());
    assert_eq!(
        x.len() % (h * d).max(1),
        0,
        "rms_norm_gated_heads: x is not [H, T, d]"
    );
    let t = x.len() / (h * d).max(1);
    crate::par::rows_mut(out, h * d, 32, |r0, rows| {
        for (i, row) in rows.chunks_exact_mut(h * d).enumerate() {
            let ti = r0 + i;
            for (hi, or) in row.chunks_exact_mut(d).enumerate() {
                rms_row(&x[(hi * t + ti) * d..][..d], w, eps, or);
            }
            mul_sigmoid(row, &gate[ti * h * d..][..h * d]);
        }
    });
}

/// [`rms_norm_gated_heads`] as a plain copy of `x`'s rows into token order followed by
/// [`rms_norm_gated_reference`] (its twin).
pub fn rms_norm_gated_heads_reference<W: Elem>(
    x: &[f32],
    gate: &[f32],
    w: &[W],
    eps: f32,
    h: usize,
    out: &mut [f32],
) {
    let d = w.len();
    let t = x.len() / (h * d).max(1);
    let mut rows = vec![0f32; x.len()];
    let shape = crate::kda::KdaShape::new(t, h, d, d);
    crate::kda::copy_rows(x, shape.head_major(), 0, &mut rows, shape, 0, t, d);
    rms_norm_gated_reference(&rows, gate, w, eps, out);
}

/// [`rms_norm_gated`] with the scalar sigmoid, in one loop.
pub fn rms_norm_gated_reference<W: Elem>(
    x: &[f32],
    gate: &[f32],
    w: &[W],
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(x.len(), gate.len());
    rms_norm_reference(x, w, eps, out);
    for (o, g) in out.iter_mut().zip(gate) {
        *o *= sigmoid(*g);
    }
}

/// In-place L2 normalisation of rows of width `d`: `x ← scale · x / sqrt(Σx² + eps)` (eps inside
/// the square root, as fla's `l2norm`). Many rows run in parallel.
pub fn l2_normalize_rows(x: &mut [f32], d: usize, eps: f32, scale: f32) {
    crate::par::rows_mut(x, d, 256, |_, rows| {
        for r in rows.chunks_exact_mut(d) {
            let s = r.iter().map(|v| v * v).sum::<f32>();
            let f = scale / (s + eps).sqrt();
            for v in r {
                *v *= f;
            }
        }
    });
}
