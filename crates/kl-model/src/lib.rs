//! # kl-model — the Kimi Linear stack
//!
//! [`KimiLinear`] is the loaded model: embedding, the decoder layers (each a token mixer — KDA or
//! MLA — and a channel mixer — dense SwiGLU or MoE — with pre-norm residuals), the final norm and
//! `lm_head` (spec §4). It is immutable after [`KimiLinear::load`] and can be shared across threads
//! and sequences.
//!
//! [`SequenceState`] is everything one sequence owns: per KDA layer the conv history and the f32
//! recurrent state, per MLA layer the latent cache, and the position. Two entry points advance it:
//!
//! - [`KimiLinear::prefill`] takes any number of tokens, processes them in chunks of
//!   [`ModelOptions::prefill_chunk`] (activation memory depends on the chunk, not the prompt), and
//!   uses the chunkwise-parallel KDA form. Calling it on consecutive pieces of a prompt gives what
//!   one call gives.
//! - [`KimiLinear::decode`] takes one token and uses the recurrent KDA step.
//!
//! Activations and the residual stream are f32 throughout (weights stay in their stored dtype and
//! are widened inside the kernels), which is what the f32 golden reference computes.
#![deny(missing_docs)]

mod model;
pub mod plan;
pub mod snapshot;
mod state;

pub use kl_layers::cache::CacheDtype;
pub use kl_layers::mla::MlaPrefill;
pub use kl_layers::moe::RouterWeights;
pub use kl_layers::Probe;
pub use model::{
    auto_prefill_chunk, prefill_chunk_for, KimiLinear, LogitsMode, ModelError, ModelOptions,
    TokenCost, DEFAULT_PREFILL_CHUNK, MAX_AUTO_PREFILL_CHUNK, ROWS_PER_EXPERT,
};
pub use state::{LayerState, SequenceState};
