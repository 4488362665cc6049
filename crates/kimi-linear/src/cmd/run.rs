//! `kimi-linear run`: a prompt in, the continuation streamed out.

use crate::memory::{human, peak_rss_bytes, progress_bar, MemoryArgs};
use anyhow::{bail, Context, Result};
use kl_engine::{GenerationStats, Sampler, SamplingParams, Session, StopRules};
use kl_model::ModelOptions;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// Sampling and stopping flags shared by `run` and `chat`.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Most tokens to generate per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Minimum probability relative to the most likely token (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Recent tokens the repetition penalty looks at (0 = all).
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: a fresh one, printed in the stats line).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (repeatable; not printed).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Largest context in tokens (default: the config's model_max_length).
    #[arg(short = 'c', long)]
    ctx_size: Option<usize>,
}

impl SamplingArgs {
    /// The sampler, the stop rules and the seed in use.
    pub fn build(&self) -> Result<(Sampler, StopRules, u64)> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
            logit_bias: Vec::new(),
        };
        params.validate()?;
        let stop = StopRules {
            stop_strings: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        };
        Ok((Sampler::new(params), stop, seed))
    }

    /// Apply `--ctx-size` to a session (it can only lower the model's own limit).
    pub fn limit(&self, session: &mut Session) -> Result<()> {
        if let Some(c) = self.ctx_size {
            if c == 0 {
                bail!("--ctx-size must be at least 1");
            }
            if c < session.max_context() {
                session.set_max_context(c, format!("--ctx-size {c}"));
            }
        }
        Ok(())
    }
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Load `spec` (a directory or a cached Hugging Face repo id) and require a tokenizer.
pub fn open_session(spec: &str, what: &str, opts: ModelOptions) -> Result<Session> {
    let loaded = kl_engine::resolve::load(spec, opts)
        .with_context(|| format!("cannot load model {spec}"))?;
    if loaded.tokenizer.is_none() {
        bail!(
            "model directory {} has no tokenizer (tiktoken.model, tokenizer_config.json): `{what}` needs one",
            loaded.dir.display()
        );
    }
    Ok(Session::new(loaded.model, loaded.tokenizer))
}

/// Write a piece of streamed text to stdout now.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe must not abort generation with a panic; the text is simply lost.
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

/// One line: prompt and generation speed, context, memory.
pub fn stats_line(stats: &GenerationStats, session: &Session, seed: u64) -> String {
    let limit = match session.max_context() {
        usize::MAX => "unlimited".to_string(),
        n => n.to_string(),
    };
    let rss = peak_rss_bytes().map_or("unknown".into(), human);
    format!(
        "prompt: {} tokens, {:.2} tok/s | generated: {} tokens, {:.2} tok/s | context: {}/{} tokens | stop: {} | memory: peak RSS {}, state {} | seed {}",
        stats.prompt_tokens,
        stats.prompt_tokens_per_second(),
        stats.generated_tokens,
        stats.gen_tokens_per_second(),
        stats.context_used,
        limit,
        stats.stop_reason,
        rss,
        human(session.state_bytes() as u64),
        seed
    )
}

/// Flags of `run`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory, or a Hugging Face repo id in the local cache.
    #[arg(long)]
    model: String,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    /// A file holding the prompt text.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message with the chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// Run `run`.
pub fn run(a: Args) -> Result<()> {
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| {
            format!("cannot read prompt file {} (it must be UTF-8)", f.display())
        })?,
        (None, None) => bail!("give --prompt TEXT or --prompt-file FILE"),
    };
    let (mut sampler, stop, seed) = a.sampling.build()?;
    let mut session = open_session(&a.model, "run", a.memory.options()?)?;
    a.sampling.limit(&mut session)?;
    let tok = session.require_tokenizer("run")?.clone();
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": text}));
        tok.apply_chat_template(&serde_json::Value::Array(messages), None, true)
            .context("cannot render the chat template")?
    } else {
        text
    };
    let ids = tok.encode(&prompt, true);
    if ids.is_empty() {
        bail!("the prompt is empty: at least one token is needed");
    }
    if ids.len() > session.max_context() {
        bail!(
            "the prompt is {} tokens long, more than the context limit of {} tokens ({})",
            ids.len(),
            session.max_context(),
            session.limit_reason()
        );
    }
    a.memory
        .apply(&mut session, ids.len(), a.sampling.n_predict)?;
    let pb = progress_bar(ids.len(), a.memory.quiet);
    session
        .feed_with_progress(&ids, &mut |done, _| {
            if let Some(pb) = &pb {
                pb.set_position(done as u64);
            }
        })
        .context("cannot process the prompt")?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let stats = session.generate(&mut sampler, a.sampling.n_predict, &stop, emit)?;
    if std::io::stdout().is_terminal() {
        emit("\n");
    }
    eprintln!("{}", stats_line(&stats, &session, seed));
    Ok(())
}
