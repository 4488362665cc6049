//! `kimi-linear forward`: logits for every prompt position, plus an optional greedy continuation.

use crate::ids::read_ids;
use crate::memory::{
    apply_budget, human, parse_size, parse_tokens, peak_rss_bytes, progress_bar, CacheDtypeArg,
    MlaPrefillArgs,
};
use crate::output::{Decl, OutputFile};
use anyhow::{Context, Result};
use clap::ValueEnum;
use kl_engine::argmax;
use kl_model::{KimiLinear, LogitsMode, ModelOptions, Probe, RouterWeights};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// MoE combine-weight convention.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RouterArg {
    /// Unbiased sigmoid scores (transformers / vLLM / llama.cpp).
    Unbiased,
    /// Scores plus e_score_correction_bias (HF remote code).
    Biased,
}

/// Flags of `forward`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON array of token ids.
    #[arg(long)]
    input_ids: PathBuf,
    /// Greedy tokens to generate after the prompt, using the cache.
    #[arg(long, default_value_t = 0)]
    decode: usize,
    /// MoE combine weights.
    #[arg(long, value_enum, default_value = "unbiased")]
    router_weights: RouterArg,
    /// Tokens per prefill chunk [default: 512: `forward` keeps the logits of every position of a
    /// chunk, `[chunk, vocab]` f32, so it does not take the larger chunk `run` picks for many
    /// experts]
    #[arg(long)]
    prefill_chunk: Option<NonZeroUsize>,
    #[command(flatten)]
    mla: MlaPrefillArgs,
    /// Latent cache dtype (f32 by default here: exact parity with the reference).
    #[arg(long, value_enum, default_value_t = CacheDtypeArg::F32)]
    cache_dtype: CacheDtypeArg,
    /// Refuse (before any work) or stop (during the run) beyond this much memory: 16GiB, 800MB.
    #[arg(long)]
    memory_budget: Option<String>,
    /// Reserve the latent cache for this many tokens up front and never exceed it: 1M, 128K.
    #[arg(long)]
    max_context: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
}

/// Run `forward`.
pub fn run(a: Args) -> Result<()> {
    let opts = ModelOptions {
        router_weights: match a.router_weights {
            RouterArg::Unbiased => RouterWeights::Unbiased,
            RouterArg::Biased => RouterWeights::Biased,
        },
        prefill_chunk: a
            .prefill_chunk
            .map_or(kl_model::DEFAULT_PREFILL_CHUNK, NonZeroUsize::get),
        cache_dtype: a.cache_dtype.into(),
        mla_prefill: a.mla.mla_prefill.into(),
    };
    let budget = a.memory_budget.as_deref().map(parse_size).transpose()?;
    let max_context = a.max_context.as_deref().map(parse_tokens).transpose()?;
    let model = KimiLinear::load(&a.model, opts)
        .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    let vocab = model.config().vocab_size;
    let ids = read_ids(&a.input_ids, vocab)?;
    let (t, n) = (ids.len(), a.decode);
    let mut decls = vec![Decl {
        name: "logits".into(),
        dtype: "F32",
        shape: vec![t, vocab],
    }];
    if n > 0 {
        decls.push(Decl {
            name: "greedy.step_logits".into(),
            dtype: "F32",
            shape: vec![n, vocab],
        });
        decls.push(Decl {
            name: "greedy.generated_ids".into(),
            dtype: "I64",
            shape: vec![n],
        });
    }
    let mut state = model.new_state();
    apply_budget(&model, &mut state, t + n, budget, max_context, true)?;
    let mut out = OutputFile::create(&a.output, &decls)?;
    let pb = progress_bar(t, a.quiet);
    let mut last = Vec::new();
    for piece in ids.chunks(model.options().prefill_chunk) {
        let logits = model.prefill(piece, &mut state, LogitsMode::All, &mut Probe::off())?;
        out.f32s(&logits)?;
        last = logits[(piece.len() - 1) * vocab..].to_vec();
        if let Some(pb) = &pb {
            pb.inc(piece.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut generated = Vec::with_capacity(n);
    let mut next = argmax(&last);
    for _ in 0..n {
        generated.push(next as i64);
        let l = model.decode(next, &mut state, &mut Probe::off())?;
        out.f32s(&l)?;
        next = argmax(&l);
    }
    if n > 0 {
        out.i64s(&generated)?;
    }
    out.finish()?;
    eprintln!(
        "wrote {} ({} prompt tokens, {} generated; peak RSS {})",
        a.output.display(),
        t,
        n,
        peak_rss_bytes().map_or("unknown".into(), human)
    );
    Ok(())
}
