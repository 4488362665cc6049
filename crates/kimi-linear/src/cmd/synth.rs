//! `kimi-linear synth`: a random-weight checkpoint in the real layout.

use anyhow::{bail, Context, Result};
use kl_config::{presets, ModelConfig, RawConfig};
use std::path::PathBuf;

/// Flags of `synth`.
#[derive(clap::Args)]
pub struct Args {
    /// A named configuration: tiny, mini, kimi-linear-48b-a3b.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    preset: Option<String>,
    /// A config.json to use instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// RNG seed (same seed, same bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override the number of routed experts (keeps per-token compute when ≥ top-k).
    #[arg(long)]
    experts: Option<usize>,
    /// Keep only the first N layers (with their KDA/MLA and dense/MoE pattern): the released
    /// model's dimensions in a file that fits a smaller machine (`--layers 5` keeps 4 KDA layers
    /// and its first MLA layer, 16.6 GB).
    #[arg(long)]
    layers: Option<usize>,
    /// Largest shard in bytes (HF-style sharding above it).
    #[arg(long, default_value_t = 4 << 30)]
    shard_bytes: u64,
}

/// Run `synth`.
pub fn run(a: Args) -> Result<()> {
    let mut raw: RawConfig = match (&a.preset, &a.config) {
        (Some(p), _) => presets::by_name(p).with_context(|| {
            format!(
                "unknown preset `{p}`; known presets: {}",
                presets::NAMES.join(", ")
            )
        })?,
        (None, Some(path)) => ModelConfig::from_file(path)?.raw,
        (None, None) => bail!("give --preset NAME or --config FILE"),
    };
    if let Some(e) = a.experts {
        if e == 0 {
            bail!("--experts must be at least 1");
        }
        raw.num_experts = Some(e);
        if let Some(k) = raw.num_experts_per_token {
            raw.num_experts_per_token = Some(k.min(e));
        }
        if raw.use_grouped_topk && e % raw.num_expert_group != 0 {
            raw.num_expert_group = 1;
            raw.topk_group = 1;
        }
    }
    if let Some(n) = a.layers {
        if n == 0 || n > raw.num_hidden_layers {
            bail!(
                "--layers {n}: expected 1..={} (the config's num_hidden_layers)",
                raw.num_hidden_layers
            );
        }
        raw.num_hidden_layers = n;
        let la = &mut raw.linear_attn_config;
        la.kda_layers.retain(|&i| i as usize <= n);
        la.full_attn_layers.retain(|&i| i as usize <= n);
    }
    // Refuse what the engine could not run before writing gigabytes.
    ModelConfig::from_raw(raw.clone()).context("the synthetic config is not runnable")?;
    let rep = kl_weights::synth_checkpoint(&raw, &a.out, a.seed, a.shard_bytes)?;
    println!(
        "wrote {} tensors ({} parameters, {:.2} GB of tensor data) and {} files to {}",
        rep.num_tensors,
        rep.num_params,
        rep.tensor_bytes as f64 / 1e9,
        rep.files.len(),
        rep.dir.display()
    );
    println!(
        "random weights: this model computes real Kimi Linear math but produces meaningless text"
    );
    Ok(())
}
