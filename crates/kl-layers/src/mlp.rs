//! Dense SwiGLU: `down( SiLU(gate x) ⊙ up x )` — layer 0's MLP and the MoE shared expert.

use crate::linear::Linear;
use kl_kernels::activation::swiglu;
use kl_weights::{Checkpoint, WeightsError};

/// SwiGLU MLP with weights `gate_proj`/`up_proj` `[I, D]` and `down_proj` `[D, I]`.
#[derive(Clone)]
pub struct SwiGlu {
    /// `gate_proj` (or an expert's `w1`).
    pub gate: Linear,
    /// `up_proj` (or `w3`).
    pub up: Linear,
    /// `down_proj` (or `w2`).
    pub down: Linear,
}

impl SwiGlu {
    /// Load `{prefix}{gate}`, `{prefix}{up}`, `{prefix}{down}` with width `i` over model width `d`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        names: [&str; 3],
        d: usize,
        i: usize,
    ) -> Result<Self, WeightsError> {
        Ok(SwiGlu {
            gate: Linear::load(ckpt, &format!("{prefix}{}", names[0]), i, d)?,
            up: Linear::load(ckpt, &format!("{prefix}{}", names[1]), i, d)?,
            down: Linear::load(ckpt, &format!("{prefix}{}", names[2]), d, i)?,
        })
    }

    /// Hidden width I.
    pub fn width(&self) -> usize {
        self.gate.rows()
    }

    /// `out[T, D] = MLP(x[T, D])`.
    pub fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        let i = self.width();
        let mut g = vec![0f32; t * i];
        let mut u = vec![0f32; t * i];
        self.gate.forward(x, t, &mut g);
        self.up.forward(x, t, &mut u);
        swiglu(&mut g, &u);
        self.down.forward(&g, t, out);
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}
