//! Scalar activations with the reference's exact formulas.

/// `x·sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch `softplus(x, beta=1, threshold=20)`: `x` above 20, `log1p(e^x)` otherwise.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU), in place on `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `x[i] = exp(x[i])` in place, vectorised where the CPU allows (≤ 2 ulp; results below about
/// 1e-38, and `exp(−∞)`, are 0).
pub fn exp_inplace(x: &mut [f32]) {
    crate::dense::exp_inplace(x)
}
