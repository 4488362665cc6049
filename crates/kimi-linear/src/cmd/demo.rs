//! `kimi-linear demo`: the README's first command. No download: it writes a small synthetic
//! model (random weights — the text it produces is meaningless, and it says so), feeds it a long
//! synthetic context with a progress bar, generates a few tokens, and prints the measured memory
//! next to the planner's figure and what a million tokens would take for the real 48B model.

use crate::memory::{human, peak_rss_bytes, progress_bar};
use anyhow::{Context, Result};
use kl_config::{presets, ModelConfig};
use kl_model::plan::{self, PlanRequest};
use kl_model::{CacheDtype, KimiLinear, LogitsMode, ModelOptions, Probe};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Context tokens to feed.
    #[arg(long, default_value_t = 32_768)]
    context: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 16)]
    generate: usize,
    /// Where to write the synthetic model (default: a directory under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// The demo model: the golden tiny dimensions with a 4096-token vocabulary.
fn demo_config() -> kl_config::RawConfig {
    let mut c = presets::tiny();
    c.vocab_size = 4096;
    c
}

/// Synthetic text: sentences assembled deterministically from a small word list.
fn synthetic_text(approx_words: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "reads",
        "a",
        "long",
        "context",
        "and",
        "keeps",
        "its",
        "state",
        "in",
        "fixed",
        "memory",
        "while",
        "latent",
        "cache",
        "grows",
        "by",
        "one",
        "row",
        "per",
        "token",
        "delta",
        "attention",
        "decays",
        "each",
        "channel",
        "experts",
        "route",
        "words",
        "through",
        "layers",
        "of",
        "linear",
        "time",
    ];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut s = String::with_capacity(approx_words * 7);
    for i in 0..approx_words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i > 0 {
            s.push(if i % 13 == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        if i % 13 == 12 {
            s.push('.');
        }
    }
    s
}

/// Run `demo`.
pub fn run(a: Args) -> Result<()> {
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kimi-linear-demo-model"));
    let raw = demo_config();
    let fresh = ModelConfig::from_file(&dir.join("config.json"))
        .map(|c| c.vocab_size == raw.vocab_size)
        .unwrap_or(false);
    if !fresh {
        println!(
            "writing a synthetic model (golden tiny dimensions, random weights) to {}",
            dir.display()
        );
        kl_weights::synth_checkpoint(&raw, &dir, 0, 1 << 30)?;
    }
    println!("random weights: the architecture and the memory are real, the generated text is not meaningful");
    let opts = ModelOptions {
        cache_dtype: CacheDtype::Bf16,
        prefill_chunk: 1024,
        ..Default::default()
    };
    let model = KimiLinear::load(&dir, opts)?;
    let tok = kl_tokenizer::Tokenizer::from_dir(&dir).context("the demo model's tokenizer")?;

    // A long context: synthetic text, tokenized, cut to the requested length.
    let mut ids = tok.encode(&synthetic_text(a.context + a.context / 2), false);
    ids.truncate(a.context);
    let n = ids.len();
    let pb = progress_bar(n, a.quiet);
    let mut state = model.new_state();
    let start = Instant::now();
    let logits = model.prefill_with_progress(
        &ids,
        &mut state,
        LogitsMode::Last,
        &mut Probe::off(),
        &mut |done, _| {
            if let Some(pb) = &pb {
                pb.set_position(done as u64);
            }
        },
    )?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let prefill_s = start.elapsed().as_secs_f64();
    println!(
        "prefilled {n} tokens in {prefill_s:.1} s ({:.0} tokens/s)",
        n as f64 / prefill_s
    );

    // Greedy continuation.
    let mut next = logits
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map_or(0, |(i, _)| i as u32);
    let mut out = Vec::new();
    let start = Instant::now();
    for _ in 0..a.generate {
        out.push(next);
        let l = model.decode(next, &mut state, &mut Probe::off())?;
        next = l
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map_or(0, |(i, _)| i as u32);
    }
    let gen_s = start.elapsed().as_secs_f64();
    println!(
        "generated {} tokens in {gen_s:.2} s: {:?}",
        out.len(),
        tok.decode(&out)?
    );

    // Memory: measured versus planned.
    let req = PlanRequest {
        context: state.pos,
        cache_dtype: opts.cache_dtype,
        prefill_chunk: opts.prefill_chunk,
        all_logits: false,
        threads: rayon::current_num_threads(),
    };
    let f = plan::plan(model.config(), model.resident_weight_bytes(), req);
    println!();
    println!(
        "memory at {} tokens        measured (state)   planned",
        state.pos
    );
    println!(
        "  MLA latent cache     {:>16}  {:>10}",
        human(state.mla_cache_bytes() as u64),
        human(f.mla_cache_bytes)
    );
    println!(
        "  KDA recurrent state  {:>16}  {:>10}",
        human(state.kda_state_bytes() as u64),
        human(f.kda_state_bytes)
    );
    println!(
        "  conv state           {:>16}  {:>10}",
        human(state.conv_state_bytes() as u64),
        human(f.conv_state_bytes)
    );
    println!(
        "  process peak RSS     {:>16}  {:>10} (planned total: weights {}, state, workspace; the tokenizer and prompt text are extra)",
        peak_rss_bytes().map_or("unknown".into(), human),
        human(f.total_bytes),
        human(f.weights_bytes)
    );

    let real = ModelConfig::from_raw(presets::kimi_linear_48b_a3b())?;
    let ctx = 1 << 20;
    let bf = plan::mla_cache_bytes(&real, ctx, CacheDtype::Bf16);
    let f8 = plan::mla_cache_bytes(&real, ctx, CacheDtype::Fp8);
    let kda = plan::kda_state_bytes(&real);
    let c = plan::compare(&real, ctx);
    println!();
    println!("Kimi-Linear-48B-A3B at 1M tokens (planner; `kimi-linear plan --preset kimi-linear-48b-a3b --context 1M`):");
    println!(
        "  latent cache bf16 {} / fp8 {}, plus KDA state {}",
        human(bf),
        human(f8),
        human(kda)
    );
    println!(
        "  the same model with MLA everywhere {}, GQA-8 {}, MHA {}",
        human(c.all_mla_bytes),
        human(c.gqa8_bytes),
        human(c.mha_bytes)
    );
    Ok(())
}
