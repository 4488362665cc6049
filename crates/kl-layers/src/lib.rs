//! # kl-layers — where weights meet kernels
//!
//! Each Kimi Linear building block is a struct that owns (shares) its weights, immutable after
//! load, and exposes a forward function over f32 activations and a caller-owned state:
//!
//! | module | block | state it reads/writes |
//! |---|---|---|
//! | [`kda`] | Kimi Delta Attention | [`kda::KdaState`]: conv history + f32 recurrent state |
//! | [`mla`] | Multi-head Latent Attention (NoPE, absorbed) | [`cache::LatentCache`]: 576-value latent per token |
//! | [`moe`] | sigmoid-routed Mixture of Experts + shared experts | none |
//! | [`mlp`] | dense SwiGLU | none |
//! | [`linear`] | a weight matrix in its stored dtype | none |
//!
//! **Invariant:** no layer holds per-sequence state; `forward(&self, …, state: &mut …)` only.
//! One loaded model can therefore serve any number of sequences, and a sequence snapshot is a
//! clone of its state.
//!
//! **Format adaptation** happens once, in each block's `load`: conv weights `[P,1,W]` become
//! tap-major `[W,P]` f32 (the layout the convolution kernel reads), `A_log` `[1,1,H,1]` is read
//! as `[H]`, and MLA's `kv_b_proj` key half is transposed per head into `W_UKᵀ` (same dtype) for
//! weight absorption. Nothing is re-interpreted at run time.
//!
//! **Scratch.** Every forward also takes a [`Scratch`] from which it borrows its temporaries
//! and to which it returns them, so a decode step allocates nothing once warmed up.
//!
//! **Probes.** Every forward takes a [`Probe`]; when enabled it records intermediates under the
//! names of `../shared/golden/golden_model.safetensors` (`kda.qkv_conv`, `mla.kv_a`, …) so that a
//! test or a debugging session can diff any tensor against the reference. Disabled, it costs a
//! branch.
#![deny(missing_docs)]

pub mod cache;
pub mod kda;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod probe;
pub mod scratch;

pub use probe::Probe;
pub use scratch::Scratch;

/// Which form of the computation a forward call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Many tokens at once: chunkwise-parallel KDA, tiled attention.
    Prefill,
    /// One token after another: recurrent KDA step.
    Decode,
}

/// Read a small parameter vector (norm weight, bias) as f32, checking its element count.
pub(crate) fn vector(
    ckpt: &kl_weights::Checkpoint,
    name: &str,
    n: usize,
) -> Result<Vec<f32>, kl_weights::WeightsError> {
    let t = ckpt.get(name)?;
    if t.numel() != n {
        return Err(kl_weights::WeightsError::ShapeMismatch {
            tensor: name.to_string(),
            path: t.file().to_path_buf(),
            expected: vec![n],
            found: t.shape().to_vec(),
        });
    }
    Ok(t.to_f32_vec())
}
