//! `kimi-linear plan`: the memory a context costs, before downloading or loading anything.

use crate::memory::{footprint_rows, human, parse_tokens, CacheDtypeArg};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use kl_config::{presets, ModelConfig};
use kl_model::plan::{self, PlanRequest};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// Stored weight dtypes a preset can be planned for.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsDtype {
    /// Two bytes a weight (the released checkpoint).
    Bf16,
    /// Two bytes a weight.
    F16,
    /// Four bytes a weight.
    F32,
    /// One byte a weight.
    Fp8,
}

/// Flags of `plan`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json; weights bytes from the safetensors headers).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    model: Option<PathBuf>,
    /// A named configuration: tiny, mini, kimi-linear-48b-a3b.
    #[arg(long)]
    preset: Option<String>,
    /// Context length: 1M, 128K, 1048576.
    #[arg(long)]
    context: String,
    /// Latent cache dtype.
    #[arg(long, value_enum, default_value_t = CacheDtypeArg::Bf16)]
    cache_dtype: CacheDtypeArg,
    /// Weight dtype for presets (ignored with --model).
    #[arg(long, value_enum, default_value_t = WeightsDtype::Bf16)]
    weights_dtype: WeightsDtype,
    /// Prefill chunk the workspace is planned for [default: what `run` would use: 2048 for a
    /// model with MLA layers; else 512, or for many experts enough that each sees about 64 rows]
    #[arg(long)]
    prefill_chunk: Option<NonZeroUsize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Run `plan`.
pub fn run(a: Args) -> Result<()> {
    let context = parse_tokens(&a.context)?;
    let cache_dtype: kl_model::CacheDtype = a.cache_dtype.into();
    let (cfg, weights, source) = match (&a.model, &a.preset) {
        (Some(dir), _) => {
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            let ckpt = kl_weights::Checkpoint::open(dir)
                .with_context(|| format!("cannot read weights in {}", dir.display()))?;
            let el = ckpt
                .get("model.embed_tokens.weight")
                .map(|t| t.dtype().size())
                .unwrap_or(2);
            let w = ckpt.total_bytes() + plan::derived_weight_bytes(&cfg, el);
            (cfg, w, dir.display().to_string())
        }
        (None, Some(p)) => {
            let raw = presets::by_name(p).with_context(|| {
                format!(
                    "unknown preset `{p}`; known presets: {}",
                    presets::NAMES.join(", ")
                )
            })?;
            let cfg = ModelConfig::from_raw(raw)?;
            let el: u64 = match a.weights_dtype {
                WeightsDtype::Bf16 | WeightsDtype::F16 => 2,
                WeightsDtype::F32 => 4,
                WeightsDtype::Fp8 => 1,
            };
            let params: u64 = kl_weights::expected_tensors(&cfg)
                .iter()
                .map(|t| t.numel() as u64)
                .sum();
            let w = params * el + plan::derived_weight_bytes(&cfg, el as usize);
            let name = a
                .weights_dtype
                .to_possible_value()
                .expect("no skipped values");
            (cfg, w, format!("preset {p} ({} weights)", name.get_name()))
        }
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let req = PlanRequest {
        context,
        cache_dtype,
        prefill_chunk: kl_model::prefill_chunk_for(
            &cfg,
            a.prefill_chunk.map_or(0, NonZeroUsize::get),
        ),
        all_logits: false,
        threads: rayon::current_num_threads(),
    };
    let f = plan::plan(&cfg, weights, req);
    let c = plan::compare(&cfg, context);
    let (n_kda, n_mla) = plan::layer_counts(&cfg);
    if a.json {
        let v = serde_json::json!({
            "source": source,
            "context": context,
            "prefill_chunk": req.prefill_chunk,
            "cache_dtype": cache_dtype.name(),
            "kda_layers": n_kda,
            "mla_layers": n_mla,
            "weights_bytes": f.weights_bytes,
            "mla_cache_bytes": f.mla_cache_bytes,
            "kda_state_bytes": f.kda_state_bytes,
            "conv_state_bytes": f.conv_state_bytes,
            "kda_carry_bytes": f.kda_carry_bytes,
            "workspace_bytes": f.workspace_bytes,
            "total_bytes": f.total_bytes,
            "comparison_cache_bytes": {"mha": c.mha_bytes, "gqa8": c.gqa8_bytes, "all_mla": c.all_mla_bytes},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{source}: {n_kda} KDA + {n_mla} MLA layers, context {context} tokens, {} latent cache, \
         prefill chunk {}",
        cache_dtype.name(),
        req.prefill_chunk
    );
    println!();
    for (name, v) in footprint_rows(&f) {
        println!("  {name:<22} {:>18} B  {:>12}", v, human(v));
    }
    println!();
    println!("  cache if every layer used (bf16):");
    for (name, v) in [
        ("MHA", c.mha_bytes),
        ("GQA, 8 KV heads", c.gqa8_bytes),
        ("MLA latent", c.all_mla_bytes),
    ] {
        println!("  {name:<22} {:>18} B  {:>12}", v, human(v));
    }
    Ok(())
}
