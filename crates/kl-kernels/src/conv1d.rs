//! Causal depthwise 1-D convolution with a carried state (KDA's `ShortConvolution`), fused with SiLU.
//!
//! PyTorch `Conv1d(groups=C, padding=W-1)` keeping the first `T` outputs: tap `j = W-1` multiplies
//! the current token, tap `0` the token `W-1` steps back. The state holds the last `W-1` raw inputs,
//! oldest first, so a call on consecutive pieces equals one call on the whole sequence.

use crate::activation::silu;

/// `x` `[T, C]` (raw, pre-conv), `weight` `[C, W]`, `state` `[W-1, C]` (oldest row first; zeros at
/// the start of a sequence). Writes `out` `[T, C]` = SiLU(conv) and updates `state` to the last
/// `W-1` inputs.
pub fn conv1d_causal_silu(
    x: &[f32],
    c: usize,
    weight: &[f32],
    w: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    assert_eq!(weight.len(), c * w);
    assert_eq!(state.len(), (w - 1) * c);
    assert_eq!(x.len(), out.len());
    let t = x.len() / c;
    let hist = w - 1;
    // Input row `i` in the extended sequence [state rows; x rows].
    let row = |i: usize| -> &[f32] {
        if i < hist {
            &state[i * c..(i + 1) * c]
        } else {
            &x[(i - hist) * c..(i - hist + 1) * c]
        }
    };
    for ti in 0..t {
        let o = &mut out[ti * c..(ti + 1) * c];
        o.fill(0.0);
        for j in 0..w {
            let r = row(ti + j);
            for ch in 0..c {
                o[ch] += weight[ch * w + j] * r[ch];
            }
        }
        for v in o.iter_mut() {
            *v = silu(*v);
        }
    }
    // New state: the last `hist` rows of [state; x], updated in place (no allocation).
    if hist > 0 {
        if t >= hist {
            state.copy_from_slice(&x[(t - hist) * c..t * c]);
        } else {
            state.copy_within(t * c.., 0);
            state[(hist - t) * c..].copy_from_slice(x);
        }
    }
}
