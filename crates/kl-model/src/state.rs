//! Per-sequence state: owned by the caller, never by the model.

use kl_config::{Mixer, ModelConfig};
use kl_layers::cache::{CacheDtype, LatentCache};
use kl_layers::kda::KdaState;
use kl_layers::Scratch;

/// State of one layer.
#[derive(Debug, Clone)]
pub enum LayerState {
    /// KDA: conv history and recurrent state (fixed size).
    Kda(KdaState),
    /// MLA: latent cache (grows with the context).
    Mla(LatentCache),
}

/// Everything one sequence owns.
#[derive(Debug, Clone)]
pub struct SequenceState {
    /// One entry per layer.
    pub layers: Vec<LayerState>,
    /// Tokens consumed so far.
    pub pos: usize,
    /// Largest number of tokens this state may hold, and why (budget or --max-context).
    limit: Option<(usize, String)>,
    /// Decode's reusable activation buffers (single-token sized; not part of the state proper).
    pub(crate) scratch: Scratch,
}

impl SequenceState {
    /// Fresh state for `cfg`.
    pub fn new(cfg: &ModelConfig, cache_dtype: CacheDtype) -> Self {
        let layers = cfg
            .layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Kda => LayerState::Kda(KdaState::new(&cfg.kda)),
                Mixer::Mla => LayerState::Mla(LatentCache::new(
                    cfg.mla.latent_width(),
                    cfg.mla.kv_lora_rank,
                    cache_dtype,
                )),
            })
            .collect();
        SequenceState {
            layers,
            pos: 0,
            limit: None,
            scratch: Scratch::new(),
        }
    }

    /// Refuse to grow past `tokens` tokens (`reason` is quoted in the error).
    pub fn set_limit(&mut self, tokens: usize, reason: impl Into<String>) {
        self.limit = Some((tokens, reason.into()));
    }

    /// The token limit, if any.
    pub fn limit(&self) -> Option<usize> {
        self.limit.as_ref().map(|l| l.0)
    }

    /// Allocate MLA cache blocks for `tokens` tokens now (a `--max-context` reservation).
    pub fn reserve(&mut self, tokens: usize) {
        for l in &mut self.layers {
            if let LayerState::Mla(c) = l {
                c.reserve(tokens);
            }
        }
    }

    /// Error unless `t` more tokens fit under the limit.
    pub(crate) fn check_room(&self, t: usize) -> Result<(), crate::ModelError> {
        match &self.limit {
            Some((limit, reason)) if self.pos + t > *limit => Err(crate::ModelError::Limit {
                pos: self.pos,
                needed: self.pos + t,
                limit: *limit,
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Bytes of KDA recurrent state.
    pub fn kda_state_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                if let LayerState::Kda(s) = l {
                    4 * s.recurrent.len()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Bytes of KDA conv history.
    pub fn conv_state_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                if let LayerState::Kda(s) = l {
                    s.bytes() - 4 * s.recurrent.len() - s.pending_bytes()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Bytes of the KDA chunk-carry buffers (see `kl_layers::kda::KdaState`).
    pub fn kda_carry_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                if let LayerState::Kda(s) = l {
                    s.pending_bytes()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Bytes allocated by the MLA latent caches.
    pub fn mla_cache_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                if let LayerState::Mla(c) = l {
                    c.allocated_bytes()
                } else {
                    0
                }
            })
            .sum()
    }
}
