//! The decoder stack (spec §4).

use crate::state::{LayerState, SequenceState};
use kl_config::{ConfigError, Mixer, Mlp, ModelConfig};
use kl_kernels::norm::rms_norm;
use kl_layers::cache::CacheDtype;
use kl_layers::kda::Kda;
use kl_layers::linear::Linear;
use kl_layers::mla::{Mla, MlaPrefill};
use kl_layers::mlp::SwiGlu;
use kl_layers::moe::{Moe, RouterWeights};
use kl_layers::{Mode, Probe, Scratch};
use kl_weights::{Checkpoint, WeightsError};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Why a model cannot be loaded or a request cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model directory does not exist.
    #[error("model directory {0} does not exist")]
    NoDir(String),
    /// config.json is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights are unusable.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A token id outside the vocabulary.
    #[error("token id {id} at position {position} is out of range: ids must be in 0..{vocab} (vocab_size)")]
    TokenId {
        /// The id.
        id: i64,
        /// Its index in the input.
        position: usize,
        /// vocab_size.
        vocab: usize,
    },
    /// A prefill with no tokens.
    #[error("empty input: at least one token id is required")]
    Empty,
    /// The sequence would grow past the token limit set from the memory budget or --max-context.
    #[error("stopped at {pos} tokens: {needed} tokens would exceed the limit of {limit} tokens ({reason}); nothing was allocated past it")]
    Limit {
        /// Tokens already in the state.
        pos: usize,
        /// Tokens the state would hold after the request.
        needed: usize,
        /// The limit.
        limit: usize,
        /// Where the limit comes from.
        reason: String,
    },
    /// A logits buffer of the wrong length.
    #[error("logits buffer holds {len} values, expected vocab_size = {vocab}")]
    LogitsLen {
        /// Its length.
        len: usize,
        /// vocab_size.
        vocab: usize,
    },
    /// A state snapshot that cannot be read or does not match the model.
    #[error("state snapshot {path}: {message}")]
    Snapshot {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Load-time and run-time options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    /// MoE combine-weight convention.
    pub router_weights: RouterWeights,
    /// Latent cache element type.
    pub cache_dtype: CacheDtype,
    /// Tokens per prefill chunk (bounds activation memory); 0, the default, picks
    /// [`auto_prefill_chunk`] for the model's config when the model is built
    /// ([`KimiLinear::options`] then shows the chunk in force).
    pub prefill_chunk: usize,
    /// MLA attention form in prefill. Prefill in pieces is bit-identical to one prefill for a
    /// fixed form (`Absorbed` or `Expanded`); `Auto` picks per chunk by FLOPs, so different
    /// splits may round differently (within f32 noise).
    pub mla_prefill: MlaPrefill,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            router_weights: RouterWeights::Unbiased,
            cache_dtype: CacheDtype::F32,
            prefill_chunk: 0,
            mla_prefill: MlaPrefill::Auto,
        }
    }
}

impl ModelOptions {
    /// These options with the prefill chunk decided for `cfg` ([`prefill_chunk_for`]).
    pub fn resolved(self, cfg: &ModelConfig) -> Self {
        ModelOptions {
            prefill_chunk: prefill_chunk_for(cfg, self.prefill_chunk),
            ..self
        }
    }
}

/// The prefill chunk of a model without MLA layers and without many experts, and the smallest
/// that `run` and `chat` halve the automatic chunk to under a memory budget: 512 tokens.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Rows that each routed expert should see in a prefill chunk, on average, for [`auto_prefill_chunk`].
pub const ROWS_PER_EXPERT: usize = 64;

/// The largest chunk [`auto_prefill_chunk`] picks.
pub const MAX_AUTO_PREFILL_CHUNK: usize = 2048;

/// The prefill chunk when none is asked for: [`DEFAULT_PREFILL_CHUNK`], or, for a mixture of
/// many experts, the power of two at which each routed expert sees about [`ROWS_PER_EXPERT`] of
/// a chunk's rows on average (`ROWS_PER_EXPERT · experts / top_k`), at most
/// [`MAX_AUTO_PREFILL_CHUNK`]; and [`MAX_AUTO_PREFILL_CHUNK`] for any model with MLA layers.
/// So every Kimi Linear config gets 2048 (the released model, `mini`, the 16-expert benchmark
/// shape); a model with neither gets 512.
///
/// Why: every prefill chunk streams the weights of nearly every expert of every MoE layer
/// (with 256 experts and 512 tokens an expert sees about 16 rows, and almost none goes
/// untouched), and a product of 64 rows runs much nearer the FMA peak than one of 16 (in-process
/// with weights from memory, 162 against 87 GFLOP/s before the small-product slices, which
/// brought 16 rows to 132–139; docs/performance-history.md). A 5-layer model with the released dimensions prefilled 4096 tokens
/// 11–28% faster with 2048-token chunks than with 512 in five alternating pairs
/// (docs/performance.md); the workspace grows with the chunk (the released model's from 125 to
/// 448 MiB, against 92 GiB of weights).
///
/// And MLA: the expanded attention form (`MlaPrefill`) rebuilds every cached key's per-head keys
/// and values once per chunk, so its cost per prompt token at depth falls with the chunk (for
/// the released dimensions at 512 tokens a chunk, that rebuild is 44% of the attention work).
/// Prompts of 4096 tokens prefilled 3–7% faster with 2048-token chunks on `mini`, 7% on the
/// 16-expert shape; 32K tokens 10.5% on `mini` (docs/performance.md). The buffers follow the
/// chunk actually run, so a prompt shorter than 2048 tokens uses no more memory than before;
/// the plan counts a full chunk, and under a memory budget `run` and `chat` halve it (down to
/// 512) until the run fits.
pub fn auto_prefill_chunk(cfg: &ModelConfig) -> usize {
    let by_mla = if cfg.num_mla_layers() > 0 {
        MAX_AUTO_PREFILL_CHUNK
    } else {
        DEFAULT_PREFILL_CHUNK
    };
    let by_experts = cfg.moe.map_or(DEFAULT_PREFILL_CHUNK, |m| {
        (ROWS_PER_EXPERT * m.num_experts)
            .div_ceil(m.top_k.max(1))
            .next_power_of_two()
            .clamp(DEFAULT_PREFILL_CHUNK, MAX_AUTO_PREFILL_CHUNK)
    });
    by_mla.max(by_experts)
}

/// `asked` tokens per prefill chunk, or [`auto_prefill_chunk`] for 0.
pub fn prefill_chunk_for(cfg: &ModelConfig, asked: usize) -> usize {
    if asked == 0 {
        auto_prefill_chunk(cfg)
    } else {
        asked
    }
}

/// Per-token cost model used to quote benchmark numbers against the roofline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCost {
    /// Weight bytes a decoded token reads (active experts only).
    pub weight_bytes: u64,
    /// KDA state bytes read and written per token.
    pub state_bytes: u64,
    /// Latent cache bytes read per decoded token at the given context.
    pub cache_bytes: u64,
    /// Matrix-product FLOPs per token (2 × active parameters), the output head's included.
    pub matmul_flops: u64,
    /// The output head's share of `matmul_flops` (a prefill that returns only the last
    /// token's logits runs the head once, not per token).
    pub head_flops: u64,
    /// Chunked-KDA FLOPs per token.
    pub kda_flops: u64,
    /// Attention FLOPs per (query token, cached key) pair.
    pub attn_flops_per_key: u64,
}

/// Which logits a prefill returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// `[T, vocab]`, one row per input token.
    All,
    /// `[vocab]` for the last token only (generation).
    Last,
}

#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
enum TokenMixer {
    Kda(Kda),
    Mla(Mla),
}

#[allow(clippy::large_enum_variant)]
enum ChannelMixer {
    Dense(SwiGlu),
    Moe(Moe),
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    mixer: TokenMixer,
    mlp: ChannelMixer,
}

/// A loaded Kimi Linear model (immutable; share it across sequences).
pub struct KimiLinear {
    cfg: ModelConfig,
    opts: ModelOptions,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    ckpt_bytes: u64,
    /// Prefill workspaces (chunk-sized activation buffers) kept between calls, one per prefill
    /// that ran at once: a fresh one costs its page faults and fills again on every call, which
    /// for a one-chunk prompt was 2–4% of `mini`'s prefill. What it holds is within the
    /// planner's workspace figure; [`KimiLinear::release_workspaces`] frees it.
    workspaces: Mutex<Vec<Scratch>>,
}

fn norm_vec(ckpt: &Checkpoint, name: &str, n: usize) -> Result<Vec<f32>, WeightsError> {
    let t = ckpt.get_shaped(name, &[n])?;
    Ok(t.to_f32_vec())
}

impl KimiLinear {
    /// Load `dir/config.json` and the safetensors checkpoint in `dir`, validating every tensor
    /// name and shape against the config before anything is computed.
    pub fn load(dir: &Path, opts: ModelOptions) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NoDir(dir.display().to_string()));
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(cfg, &ckpt, opts)
    }

    /// Bind an opened checkpoint to a validated config.
    pub fn from_checkpoint(
        cfg: ModelConfig,
        ckpt: &Checkpoint,
        opts: ModelOptions,
    ) -> Result<Self, ModelError> {
        ckpt.validate(&cfg)?;
        let opts = opts.resolved(&cfg);
        let d = cfg.hidden;
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (i, kind) in cfg.layers.iter().enumerate() {
            let p = format!("model.layers.{i}.");
            let mixer = match kind.mixer {
                Mixer::Kda => TokenMixer::Kda(Kda::load(
                    ckpt,
                    &format!("{p}self_attn."),
                    cfg.kda,
                    d,
                    cfg.rms_norm_eps,
                )?),
                Mixer::Mla => TokenMixer::Mla(Mla::load(
                    ckpt,
                    &format!("{p}self_attn."),
                    cfg.mla,
                    d,
                    cfg.kv_norm_eps,
                )?),
            };
            let mlp = match kind.mlp {
                Mlp::Dense => ChannelMixer::Dense(SwiGlu::load(
                    ckpt,
                    &format!("{p}mlp."),
                    ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
                    d,
                    cfg.intermediate,
                )?),
                Mlp::Moe => {
                    let dims = cfg.moe.expect("validated: MoE layers imply MoE dims");
                    ChannelMixer::Moe(Moe::load(ckpt, &format!("{p}block_sparse_moe."), dims, d)?)
                }
            };
            layers.push(Layer {
                input_norm: norm_vec(ckpt, &format!("{p}input_layernorm.weight"), d)?,
                post_norm: norm_vec(ckpt, &format!("{p}post_attention_layernorm.weight"), d)?,
                mixer,
                mlp,
            });
        }
        let embed = Linear::load(ckpt, "model.embed_tokens.weight", cfg.vocab_size, d)?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            embed.clone()
        } else {
            Linear::load(ckpt, "lm_head.weight", cfg.vocab_size, d)?
        };
        Ok(KimiLinear {
            norm: norm_vec(ckpt, "model.norm.weight", d)?,
            embed,
            lm_head,
            layers,
            opts,
            ckpt_bytes: ckpt.total_bytes(),
            cfg,
            workspaces: Mutex::new(Vec::new()),
        })
    }

    /// The kept prefill workspaces (a poisoned lock only means a prefill panicked: its
    /// workspace was never given back, and the others are still whole).
    fn workspaces(&self) -> std::sync::MutexGuard<'_, Vec<Scratch>> {
        self.workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of prefill workspace kept for the next prefill (see
    /// [`KimiLinear::release_workspaces`]).
    pub fn workspace_bytes_held(&self) -> usize {
        self.workspaces().iter().map(Scratch::bytes).sum()
    }

    /// Free the prefill workspaces kept between calls (the next prefill allocates its own
    /// again). A long decode after a long prompt can give the memory back this way.
    pub fn release_workspaces(&self) {
        self.workspaces().clear();
    }

    /// The validated config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The options in force.
    pub fn options(&self) -> ModelOptions {
        self.opts
    }

    /// Change run-time options (router convention, cache dtype of new states, prefill chunk: 0
    /// picks [`auto_prefill_chunk`] again). A new prefill chunk frees the kept workspaces, which
    /// were sized for the old one (a smaller chunk is how a memory budget is met).
    pub fn set_options(&mut self, opts: ModelOptions) {
        let opts = opts.resolved(&self.cfg);
        if opts.prefill_chunk != self.opts.prefill_chunk {
            self.workspaces
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        self.opts = opts;
    }

    /// Bytes of the checkpoint's tensor data.
    pub fn checkpoint_bytes(&self) -> u64 {
        self.ckpt_bytes
    }

    /// Resident weight bytes: the checkpoint's tensors plus load-time derived copies.
    pub fn resident_weight_bytes(&self) -> u64 {
        let derived: usize = self
            .layers
            .iter()
            .map(|l| match &l.mixer {
                TokenMixer::Mla(m) => m.derived_bytes(),
                TokenMixer::Kda(_) => 0,
            })
            .sum();
        self.ckpt_bytes + derived as u64
    }

    /// What one token costs at a given context: bytes read by decode and FLOPs of prefill.
    pub fn token_cost(&self, context: usize) -> TokenCost {
        let cfg = &self.cfg;
        let mut weights = self.lm_head.bytes() + self.embed.bytes() / self.cfg.vocab_size;
        let head_params = self.lm_head.rows() * self.lm_head.cols();
        let mut matmul_params = head_params;
        for l in &self.layers {
            let (wb, el) = match &l.mixer {
                TokenMixer::Kda(k) => (k.bytes(), self.lm_head.dtype().size()),
                TokenMixer::Mla(m) => (m.active_bytes(), self.lm_head.dtype().size()),
            };
            let mlp = match &l.mlp {
                ChannelMixer::Dense(m) => m.bytes(),
                ChannelMixer::Moe(m) => m.active_bytes(),
            };
            weights += wb + mlp;
            matmul_params += (wb + mlp) / el;
        }
        let (k, h, w) = (cfg.kda.head_dim, cfg.kda.num_heads, cfg.kda.conv_kernel);
        let n_kda = cfg.num_kda_layers();
        let n_mla = cfg.num_mla_layers();
        let state_rw = 2 * n_kda * (h * k * k * 4 + 3 * (w - 1) * h * k * 4);
        let row = self.opts.cache_dtype.row_bytes(cfg.mla.latent_width());
        let m = cfg.mla;
        // Chunked KDA per token and head (paper Eq. 13 with C = 64): 6·K² + 3·C·K + C².
        let kda_flops = n_kda * h * (6 * k * k + 3 * 64 * k + 64 * 64);
        // Absorbed attention per key and head: scores over R+P, values over R.
        let attn_flops_per_key = n_mla * m.num_heads * 2 * (m.latent_width() + m.kv_lora_rank);
        TokenCost {
            weight_bytes: weights as u64,
            state_bytes: state_rw as u64,
            cache_bytes: (n_mla * row * context) as u64,
            matmul_flops: 2 * matmul_params as u64,
            head_flops: 2 * head_params as u64,
            kda_flops: kda_flops as u64,
            attn_flops_per_key: attn_flops_per_key as u64,
        }
    }

    /// MLA attention FLOPs of one prefill chunk of `t` tokens that ends at context length `n`,
    /// summed over the MLA layers, in the form the options choose for it.
    pub fn prefill_attention_flops(&self, t: usize, n: usize) -> u64 {
        self.layers
            .iter()
            .map(|l| match &l.mixer {
                TokenMixer::Mla(m) => m.chosen_attention_flops(t, n, self.opts.mla_prefill),
                TokenMixer::Kda(_) => 0,
            })
            .sum()
    }

    /// A fresh state for one sequence.
    pub fn new_state(&self) -> SequenceState {
        SequenceState::new(&self.cfg, self.opts.cache_dtype)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Empty);
        }
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::TokenId {
                id: id as i64,
                position,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(())
    }

    /// Consume `ids`, advancing `state`; returns logits per [`LogitsMode`].
    pub fn prefill(
        &self,
        ids: &[u32],
        state: &mut SequenceState,
        logits: LogitsMode,
        probe: &mut Probe,
    ) -> Result<Vec<f32>, ModelError> {
        self.prefill_with_progress(ids, state, logits, probe, &mut |_, _| {})
    }

    /// [`KimiLinear::prefill`] calling `progress(done, total)` after each chunk.
    pub fn prefill_with_progress(
        &self,
        ids: &[u32],
        state: &mut SequenceState,
        logits: LogitsMode,
        probe: &mut Probe,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>, ModelError> {
        self.check_ids(ids)?;
        state.check_room(ids.len())?;
        let v = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(if logits == LogitsMode::All {
            ids.len() * v
        } else {
            v
        });
        let chunk = self.opts.prefill_chunk.max(1);
        let n_chunks = ids.len().div_ceil(chunk);
        // Chunk-sized temporaries, reused across this call's chunks and kept for the next call.
        let mut scratch = self.workspaces().pop().unwrap_or_default();
        for (ci, piece) in ids.chunks(chunk).enumerate() {
            let h = self.run_layers(piece, state, Mode::Prefill, probe, &mut scratch);
            let t = piece.len();
            match logits {
                LogitsMode::All => {
                    let n = out.len();
                    out.resize(n + t * v, 0.0);
                    self.head(&h, t, probe, &mut scratch, &mut out[n..]);
                }
                LogitsMode::Last if ci + 1 == n_chunks => {
                    let d = self.cfg.hidden;
                    out.resize(v, 0.0);
                    let last = &h[(t - 1) * d..];
                    self.head(last, 1, &mut Probe::off(), &mut scratch, &mut out);
                }
                LogitsMode::Last => {}
            }
            scratch.give(h);
            progress(((ci + 1) * chunk).min(ids.len()), ids.len());
        }
        self.workspaces().push(scratch);
        Ok(out)
    }

    /// Consume one token with the recurrent step; returns its logits `[vocab]`.
    pub fn decode(
        &self,
        id: u32,
        state: &mut SequenceState,
        probe: &mut Probe,
    ) -> Result<Vec<f32>, ModelError> {
        let mut logits = vec![0f32; self.cfg.vocab_size];
        self.decode_into(id, state, probe, &mut logits)?;
        Ok(logits)
    }

    /// [`KimiLinear::decode`] writing the logits into `logits` (`[vocab]`).
    ///
    /// Allocates nothing once the sequence has decoded a token (its temporaries live in the
    /// state's scratch), except a new latent-cache block every 256 tokens unless reserved.
    pub fn decode_into(
        &self,
        id: u32,
        state: &mut SequenceState,
        probe: &mut Probe,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.check_ids(&[id])?;
        state.check_room(1)?;
        if logits.len() != self.cfg.vocab_size {
            return Err(ModelError::LogitsLen {
                len: logits.len(),
                vocab: self.cfg.vocab_size,
            });
        }
        let mut scratch = std::mem::take(&mut state.scratch);
        let h = self.run_layers(&[id], state, Mode::Decode, probe, &mut scratch);
        self.head(&h, 1, probe, &mut scratch, logits);
        scratch.give(h);
        state.scratch = scratch;
        Ok(())
    }

    /// Final norm and `lm_head` for `t` rows of hidden state.
    fn head(&self, h: &[f32], t: usize, probe: &mut Probe, scratch: &mut Scratch, out: &mut [f32]) {
        let mut x = scratch.take_for_write(t * self.cfg.hidden);
        rms_norm(h, &self.norm, self.cfg.rms_norm_eps, &mut x);
        if probe.enabled() {
            probe.set_prefix("");
        }
        probe.record("final_norm", &[t, self.cfg.hidden], &x);
        self.lm_head.forward(&x, t, out);
        scratch.give(x);
    }

    /// Embedding and all layers for `ids`; returns the residual stream `[T, D]`.
    fn run_layers(
        &self,
        ids: &[u32],
        state: &mut SequenceState,
        mode: Mode,
        probe: &mut Probe,
        scratch: &mut Scratch,
    ) -> Vec<f32> {
        let (t, d) = (ids.len(), self.cfg.hidden);
        let eps = self.cfg.rms_norm_eps;
        let mut h = scratch.take_for_write(t * d);
        for (row, &id) in h.chunks_exact_mut(d).zip(ids) {
            self.embed.row_f32(id as usize, row);
        }
        if probe.enabled() {
            probe.set_prefix("");
        }
        probe.record("embeddings", &[t, d], &h);
        let mut x = scratch.take_for_write(t * d);
        let mut y = scratch.take(t * d);
        for (i, (layer, st)) in self.layers.iter().zip(state.layers.iter_mut()).enumerate() {
            if probe.enabled() {
                probe.set_prefix(format!("layers.{i}."));
            }
            rms_norm(&h, &layer.input_norm, eps, &mut x);
            probe.record("attn_in", &[t, d], &x);
            match (&layer.mixer, st) {
                (TokenMixer::Kda(k), LayerState::Kda(s)) => {
                    k.forward(&x, t, s, mode, probe, scratch, &mut y)
                }
                (TokenMixer::Mla(m), LayerState::Mla(c)) => {
                    let form = match mode {
                        Mode::Prefill => self.opts.mla_prefill,
                        Mode::Decode => MlaPrefill::Absorbed,
                    };
                    m.forward(&x, t, c, form, probe, scratch, &mut y)
                }
                _ => unreachable!("state built from the same config as the model"),
            }
            probe.record("attn_out", &[t, d], &y);
            for (a, b) in h.iter_mut().zip(&y) {
                *a += b;
            }
            rms_norm(&h, &layer.post_norm, eps, &mut x);
            probe.record("mlp_in", &[t, d], &x);
            match &layer.mlp {
                ChannelMixer::Dense(m) => m.forward(&x, t, scratch, &mut y),
                ChannelMixer::Moe(m) => {
                    m.forward(&x, t, self.opts.router_weights, probe, scratch, &mut y)
                }
            }
            probe.record("mlp_out", &[t, d], &y);
            for (a, b) in h.iter_mut().zip(&y) {
                *a += b;
            }
            probe.record("out", &[t, d], &h);
        }
        scratch.give(y);
        scratch.give(x);
        state.pos += t;
        h
    }
}
