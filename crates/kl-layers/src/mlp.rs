//! Dense SwiGLU: `down( SiLU(gate x) ⊙ up x )` — layer 0's MLP and the MoE shared expert.

use crate::linear::Linear;
use crate::Scratch;
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
    pub fn forward(&self, x: &[f32], t: usize, scratch: &mut Scratch, out: &mut [f32]) {
        let i = self.width();
        let mut g = scratch.take_for_write(t * i);
        let mut u = scratch.take_for_write(t * i);
        self.forward_with(x, t, &mut g, &mut u, out);
        scratch.give(u);
        scratch.give(g);
    }

    /// [`SwiGlu::forward`] with caller-provided hidden buffers `g`, `u` (`[T, I]` each). The gate
    /// and up products of `x` run one after the other ([`Linear::forward_each`]: under
    /// `--bf16-activations`, one rounding of `x` for both).
    pub fn forward_with(&self, x: &[f32], t: usize, g: &mut [f32], u: &mut [f32], out: &mut [f32]) {
        Linear::forward_each(t, &mut [(&self.gate, x, g), (&self.up, x, u)]);
        swiglu(g, u);
        self.down.forward(g, t, out);
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}
