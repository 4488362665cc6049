//! Memory planner: what a sequence of a given context costs, before any work is done.
//!
//! The same arithmetic serves `kimi-linear plan` (from a preset or a checkpoint), the memory budget
//! check of every command, and the in-run limit. Parts:
//!
//! | part | formula |
//! |---|---|
//! | weights | checkpoint tensor bytes + load-time `W_UKᵀ` copies (`H·R·dn` per MLA layer, stored dtype) |
//! | MLA latent cache | `ceil(ctx / 256)·256 · row_bytes(R+P) · n_mla` (block-granular, as allocated) |
//! | KDA recurrent state | `n_kda · H · K · K · 4` |
//! | conv state | `n_kda · 3 · (W−1) · H·K · 4` (f32 history) |
//! | workspace | prefill activations for one chunk (largest layer) + logits + per-thread scratch |
//!
//! Comparisons give the cache the same model would need with other attention designs in every
//! layer (bf16): MHA with `num_attention_heads × v_head_dim` for K and V, GQA with 8 KV heads, and
//! MLA (latent) in every layer.

use crate::model::prefill_chunk_for;
use kl_config::{Mixer, ModelConfig};
use kl_layers::cache::CacheDtype;
use serde::Serialize;

/// Inputs of a plan.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest {
    /// Tokens the sequence will hold.
    pub context: usize,
    /// Latent cache dtype.
    pub cache_dtype: CacheDtype,
    /// Prefill chunk (tokens per forward pass); 0 plans for
    /// [`auto_prefill_chunk`](crate::auto_prefill_chunk), as a model built with a chunk
    /// of 0 runs.
    pub prefill_chunk: usize,
    /// Whether logits for every prompt position are kept (`forward`) or only the last.
    pub all_logits: bool,
    /// Worker threads.
    pub threads: usize,
}

/// The footprint of one sequence, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Tokens planned for.
    pub context: usize,
    /// Resident weights.
    pub weights_bytes: u64,
    /// MLA latent cache.
    pub mla_cache_bytes: u64,
    /// KDA recurrent state.
    pub kda_state_bytes: u64,
    /// KDA conv history.
    pub conv_state_bytes: u64,
    /// KDA chunk-carry buffers.
    pub kda_carry_bytes: u64,
    /// Activations and scratch.
    pub workspace_bytes: u64,
    /// Sum of the above.
    pub total_bytes: u64,
}

/// Bytes of the load-time `W_UKᵀ` copies for weights of `el` bytes per element.
pub fn derived_weight_bytes(cfg: &ModelConfig, el: usize) -> u64 {
    (cfg.num_mla_layers() * cfg.mla.num_heads * cfg.mla.kv_lora_rank * cfg.mla.qk_nope * el) as u64
}

/// MLA cache bytes for `context` tokens.
pub fn mla_cache_bytes(cfg: &ModelConfig, context: usize, dtype: CacheDtype) -> u64 {
    (dtype.bytes_for(context, cfg.mla.latent_width()) * cfg.num_mla_layers()) as u64
}

/// KDA recurrent state bytes.
pub fn kda_state_bytes(cfg: &ModelConfig) -> u64 {
    (cfg.num_kda_layers() * cfg.kda.num_heads * cfg.kda.head_dim * cfg.kda.head_dim * 4) as u64
}

/// KDA conv history bytes.
pub fn conv_state_bytes(cfg: &ModelConfig) -> u64 {
    (cfg.num_kda_layers() * 3 * (cfg.kda.conv_kernel - 1) * cfg.kda.proj() * 4) as u64
}

/// Resident memory of the process itself (binary, shared libraries, thread stacks, allocator
/// metadata), measured with `kimi-linear bench --no-roofline` as peak RSS minus everything else
/// planned, on x86-64 Linux with 2 threads: 5.5 MiB on the golden tiny model and up to 8.4 MiB
/// on the `mini` synthetic model (a long prefill pages in more of the binary, and every weight).
pub const RUNTIME_BYTES: u64 = 9 << 20;

/// KDA chunk-carry bytes (63 pending rows of k, v, g and β per KDA layer).
pub fn kda_carry_bytes(cfg: &ModelConfig) -> u64 {
    (cfg.num_kda_layers() * 63 * (3 * cfg.kda.proj() + cfg.kda.num_heads) * 4) as u64
}

/// Activation and scratch bytes of one prefill chunk (the largest layer's live buffers).
pub fn workspace_bytes(cfg: &ModelConfig, chunk: usize, all_logits: bool, threads: usize) -> u64 {
    let c = chunk;
    let d = cfg.hidden;
    let (p, k, h) = (cfg.kda.proj(), cfg.kda.head_dim, cfg.kda.num_heads);
    let m = cfg.mla;
    let has_mla = cfg.num_mla_layers() > 0;
    let kda = if cfg.num_kda_layers() > 0 {
        c * (8 * p + 2 * k + h)
    } else {
        0
    };
    let mla = if has_mla {
        c * (m.num_heads * (m.qk_head() + m.latent_width() + m.kv_lora_rank + m.v_head)
            + 2 * m.latent_width()
            + m.qk_nope
            + 2 * m.kv_lora_rank
            + m.v_head)
            // The expanded form's queries packed for bf16 products fill whole 64-query groups
            // (half the f32 queries' size otherwise).
            + m.num_heads * kl_kernels::expanded_bf16::GROUP * m.qk_head() / 2
    } else {
        0
    };
    let dense = 2 * c * cfg.intermediate;
    // Router logits; routed outputs (one row per token and choice) and the shared expert's;
    // routing indices; per thread, one expert block's gathered rows and hidden activations.
    let moe = cfg.moe.map_or(0, |e| {
        let block = c.min(kl_layers::moe::EXPERT_BLOCK);
        let hidden = 2 * e.expert_width * e.num_shared.max(1);
        c * (e.num_experts + e.top_k * d + d + 7 * e.top_k) + threads * block * (d + hidden)
    });
    let layer = kda.max(mla).max(dense).max(moe);
    let logits = if all_logits {
        c * cfg.vocab_size
    } else {
        cfg.vocab_size
    };
    // Per-thread scratch: the KDA chunk kernel's (its exact size), the latent attention's (a
    // block of queries' softmax states and their shared key tile), and the expanded attention's
    // head buffers.
    let kda_scratch = kl_kernels::kda::chunk_scratch_floats(k, k);
    // The expanded latent attention's per-thread head buffers (prefill with MLA layers).
    let mla_scratch = if has_mla {
        kl_layers::mla::expanded_scratch_floats(c, m.qk_head(), m.v_head)
    } else {
        0
    };
    // The latent attention's shape (absorbed: every head scores the whole cache row).
    let latent = kl_kernels::attention::LatentAttnShape {
        h: m.num_heads,
        dk: m.latent_width(),
        dv: m.kv_lora_rank,
    };
    let attn_scratch = if has_mla {
        kl_kernels::attention::prefill_scratch_floats(latent)
    } else {
        0
    };
    // Decode's latent attention keeps its own buffers between steps (bounded at any context:
    // a wave of segments' softmax states and a key tile per thread).
    let decode_scratch = if has_mla {
        kl_kernels::attention::decode_scratch_floats(latent, threads)
    } else {
        0
    };
    let scratch = threads * (kda_scratch + attn_scratch + mla_scratch) + decode_scratch;
    // With the opt-in AMX kernels or bf16 activations, every thread keeps the packed input of
    // the largest product it ran: at most a chunk's rows of the widest input of any product.
    let e = cfg.moe.map_or(0, |e| e.expert_width);
    let widest = [
        d,
        cfg.intermediate,
        e,
        p,
        m.num_heads * m.v_head,
        m.kv_lora_rank,
    ]
    .into_iter()
    .max()
    .unwrap_or(d);
    let amx = if kl_kernels::amx::enabled() {
        // And the tile kernel of latent attention its scratch (a segment's scores and tiles),
        // once for prefill and once more in decode's kept buffers.
        let attn = if has_mla {
            2 * kl_kernels::amx_attention::scratch_bytes(latent)
        } else {
            0
        };
        threads * (kl_kernels::amx::scratch_bytes(c, widest) + attn)
    } else {
        0
    };
    // bf16 activations keep a chunk's packed rows per thread; the expanded MLA form's
    // expansion over a bf16 cache (always planned for: the plan does not depend on the cache
    // dtype here) a block's, and a widened weight slice where the CPU has no AVX512-BF16.
    let bf16_act = if kl_kernels::bf16_activations::enabled() {
        threads * kl_kernels::bf16_activations::scratch_bytes(c, widest)
    } else {
        0
    } + if has_mla {
        threads
            * kl_kernels::bf16_activations::anywhere_scratch_bytes(
                kl_layers::mla::EXPAND_BLOCK,
                m.kv_lora_rank,
            )
    } else {
        0
    };
    (4 * (3 * c * d + layer + logits + scratch) + amx + bf16_act) as u64 + RUNTIME_BYTES
}

/// Plan one sequence for a model whose resident weights take `weights_bytes`.
pub fn plan(cfg: &ModelConfig, weights_bytes: u64, req: PlanRequest) -> Footprint {
    let mla = mla_cache_bytes(cfg, req.context, req.cache_dtype);
    let kda = kda_state_bytes(cfg);
    let conv = conv_state_bytes(cfg);
    let carry = kda_carry_bytes(cfg);
    let chunk = prefill_chunk_for(cfg, req.prefill_chunk)
        .min(req.context.max(1))
        .max(1);
    let ws = workspace_bytes(cfg, chunk, req.all_logits, req.threads.max(1));
    Footprint {
        context: req.context,
        weights_bytes,
        mla_cache_bytes: mla,
        kda_state_bytes: kda,
        conv_state_bytes: conv,
        kda_carry_bytes: carry,
        workspace_bytes: ws,
        total_bytes: weights_bytes + mla + kda + conv + carry + ws,
    }
}

/// The largest context (a multiple of the 256-token cache block) whose footprint fits `budget`,
/// or `None` if not even an empty context fits.
pub fn max_context(
    cfg: &ModelConfig,
    weights_bytes: u64,
    req: PlanRequest,
    budget: u64,
) -> Option<usize> {
    // Everything but the cache, with the workspace of a full prefill chunk.
    let full = plan(
        cfg,
        weights_bytes,
        PlanRequest {
            context: prefill_chunk_for(cfg, req.prefill_chunk).max(1),
            ..req
        },
    );
    let fixed = full.total_bytes - full.mla_cache_bytes;
    if fixed > budget {
        return None;
    }
    let per_block = mla_cache_bytes(cfg, 1, req.cache_dtype);
    if per_block == 0 {
        return Some(usize::MAX);
    }
    let blocks = (budget - fixed) / per_block;
    Some((blocks as usize).saturating_mul(kl_layers::cache::BLOCK_ROWS))
}

/// Cache bytes of the same model with other attention designs in every layer, bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Comparison {
    /// MHA, `num_attention_heads × v_head_dim` for K and V, every layer.
    pub mha_bytes: u64,
    /// GQA with 8 KV heads of `v_head_dim`, every layer.
    pub gqa8_bytes: u64,
    /// MLA latent (`R + P` values) in every layer.
    pub all_mla_bytes: u64,
}

/// [`Comparison`] for `context` tokens.
pub fn compare(cfg: &ModelConfig, context: usize) -> Comparison {
    let (l, t) = (cfg.num_layers() as u64, context as u64);
    let hd = cfg.mla.v_head as u64;
    Comparison {
        mha_bytes: l * t * 2 * cfg.mla.num_heads as u64 * hd * 2,
        gqa8_bytes: l * t * 2 * 8 * hd * 2,
        all_mla_bytes: l * t * cfg.mla.latent_width() as u64 * 2,
    }
}

/// Number of layers of each kind (for reports).
pub fn layer_counts(cfg: &ModelConfig) -> (usize, usize) {
    let kda = cfg.layers.iter().filter(|l| l.mixer == Mixer::Kda).count();
    (kda, cfg.num_layers() - kda)
}
