//! One sequence: a model, its state, the ids it has consumed, and generation.

use crate::persist;
use crate::sampler::Sampler;
use crate::stop::{StopMatcher, StopReason, StopRules};
use crate::{EngineError, Result};
use kl_model::{KimiLinear, LogitsMode, Probe, SequenceState};
use kl_tokenizer::{StreamDecoder, Tokenizer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one [`Session::generate`] call did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens fed since the previous generation.
    pub prompt_tokens: usize,
    /// Seconds spent feeding them.
    pub prompt_seconds: f64,
    /// Tokens sampled (the final end-of-sequence id included).
    pub generated_tokens: usize,
    /// Seconds spent sampling and consuming them.
    pub gen_seconds: f64,
    /// Tokens in the state afterwards.
    pub context_used: usize,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// The sampled ids, in order.
    pub ids: Vec<u32>,
}

impl GenerationStats {
    /// Prompt tokens per second (0 when nothing was fed).
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_seconds)
    }

    /// Generated tokens per second.
    pub fn gen_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens, self.gen_seconds)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// A model, one sequence's state and the ids that state has consumed.
///
/// Invariant: `state` is exactly the result of feeding `history` to a fresh state, and the stored
/// logits (if any) are those of the last id of `history`. [`Session::generate`] therefore feeds
/// every token it samples, the final end-of-sequence id included (llama.cpp leaves the final eos
/// unconsumed; here it is consumed so that a chat turn ends with `<|im_end|>` in the state and the
/// next turn continues from what the chat template renders).
pub struct Session {
    model: Arc<KimiLinear>,
    tokenizer: Option<Arc<Tokenizer>>,
    state: SequenceState,
    history: Vec<u32>,
    logits: Option<Vec<f32>>,
    eos: Vec<u32>,
    max_context: usize,
    limit_reason: String,
    prompt_tokens: usize,
    prompt_time: Duration,
    reserved: usize,
}

impl Session {
    /// A fresh session. Without a tokenizer it works on ids only (no text, no stop strings).
    ///
    /// End-of-sequence ids are the config's `eos_token_id`s plus the tokenizer's
    /// [`Tokenizer::eos_ids`] (`<|im_end|>`, `[EOS]`, its `eos_token`). The context limit is the
    /// config's `model_max_length` when it has one.
    pub fn new(model: Arc<KimiLinear>, tokenizer: Option<Arc<Tokenizer>>) -> Self {
        let cfg = model.config();
        let vocab = cfg.vocab_size;
        let mut eos: Vec<u32> = cfg
            .eos_token_ids
            .iter()
            .filter(|&&id| id >= 0 && (id as usize) < vocab)
            .map(|&id| id as u32)
            .collect();
        if let Some(t) = &tokenizer {
            for id in t.eos_ids() {
                if (id as usize) < vocab && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let (max_context, limit_reason) = match cfg.raw.model_max_length {
            Some(n) => (n, "model_max_length in config.json".to_string()),
            None => (usize::MAX, "no limit".to_string()),
        };
        Session {
            state: model.new_state(),
            model,
            tokenizer,
            history: Vec::new(),
            logits: None,
            eos,
            max_context,
            limit_reason,
            prompt_tokens: 0,
            prompt_time: Duration::ZERO,
            reserved: 0,
        }
    }

    /// The shared model.
    pub fn model(&self) -> &Arc<KimiLinear> {
        &self.model
    }

    /// Set the model's prefill chunk (tokens per forward pass of a prefill; 0 picks
    /// `kl_model::auto_prefill_chunk` again) while this session is the model's only owner, as
    /// before it is shared; returns whether it was set.
    pub fn set_prefill_chunk(&mut self, chunk: usize) -> bool {
        match Arc::get_mut(&mut self.model) {
            Some(m) => {
                let opts = m.options();
                m.set_options(kl_model::ModelOptions {
                    prefill_chunk: chunk,
                    ..opts
                });
                true
            }
            None => false,
        }
    }

    /// The tokenizer, if any.
    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }

    /// The tokenizer, or an error saying that `what` needs one.
    pub fn require_tokenizer(&self, what: &str) -> Result<&Arc<Tokenizer>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::NoTokenizer(what.to_string()))
    }

    /// The sequence state.
    pub fn state(&self) -> &SequenceState {
        &self.state
    }

    /// Every id the state has consumed, in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Logits after the last consumed id (`None` before the first feed).
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Tokens in the state.
    pub fn context_used(&self) -> usize {
        self.state.pos
    }

    /// The most tokens the state may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Where the context limit comes from (`model_max_length in config.json`, `--ctx-size 4096`).
    pub fn limit_reason(&self) -> &str {
        &self.limit_reason
    }

    /// Lower (or raise) the context limit; `reason` is quoted in errors (e.g. `--ctx-size 4096`).
    pub fn set_max_context(&mut self, tokens: usize, reason: impl Into<String>) {
        self.max_context = tokens;
        self.limit_reason = reason.into();
    }

    /// Allocate latent-cache blocks for `tokens` tokens up front (kept across [`Session::reset`]).
    pub fn reserve(&mut self, tokens: usize) {
        self.reserved = tokens;
        self.state.reserve(tokens);
    }

    /// Bytes held by the state: KDA recurrent and conv state plus the allocated MLA cache.
    pub fn state_bytes(&self) -> usize {
        self.state.kda_state_bytes() + self.state.conv_state_bytes() + self.state.mla_cache_bytes()
    }

    /// Encode `text` (special-token strings become their ids when `allow_special`).
    pub fn tokenize(&self, text: &str, allow_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .require_tokenizer("tokenizing text")?
            .encode(text, allow_special))
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if self.state.pos + n > self.max_context {
            return Err(EngineError::ContextFull {
                used: self.state.pos,
                requested: n,
                limit: self.max_context,
                reason: self.limit_reason.clone(),
            });
        }
        Ok(())
    }

    /// Prefill `ids` and return the logits of the last one.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.feed_with_progress(ids, &mut |_, _| {})
    }

    /// [`Session::feed`] calling `progress(done, total)` after each prefill chunk.
    pub fn feed_with_progress(
        &mut self,
        ids: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(kl_model::ModelError::Empty.into());
        }
        self.check_room(ids.len())?;
        let t0 = Instant::now();
        let logits = self.model.prefill_with_progress(
            ids,
            &mut self.state,
            LogitsMode::Last,
            &mut Probe::off(),
            progress,
        )?;
        self.prompt_time += t0.elapsed();
        self.prompt_tokens += ids.len();
        self.history.extend_from_slice(ids);
        self.logits = Some(logits.clone());
        Ok(logits)
    }

    /// Consume one sampled id with the decode step, reusing `buf` (any length; the last logits' buffer) for the logits, so a
    /// generated token costs no allocation in the model.
    fn step_into(&mut self, id: u32, mut buf: Vec<f32>) -> Result<()> {
        buf.resize(self.model.config().vocab_size, 0.0);
        self.model
            .decode_into(id, &mut self.state, &mut Probe::off(), &mut buf)?;
        self.history.push(id);
        self.logits = Some(buf);
        Ok(())
    }

    /// Sample up to `max_new` tokens after what has been fed, calling `on_text` with each piece of
    /// text as soon as it is complete (never half a UTF-8 character, never text that might be the
    /// start of a stop string, never a stop string itself; the end-of-sequence id is not shown).
    ///
    /// Every sampled id is consumed by the state (see [`Session`]). Without a tokenizer `on_text`
    /// is never called and stop strings are refused.
    pub fn generate(
        &mut self,
        sampler: &mut Sampler,
        max_new: usize,
        stop: &StopRules,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationStats> {
        if self.tokenizer.is_none() && stop.stop_strings.iter().any(|s| !s.is_empty()) {
            return Err(EngineError::NoTokenizer("stop strings".into()));
        }
        let tok = self.tokenizer.clone();
        let mut decoder = StreamDecoder::new();
        let mut matcher = StopMatcher::new(&stop.stop_strings);
        let mut ids = Vec::new();
        let mut reason = StopReason::MaxTokens;
        let t0 = Instant::now();
        if max_new > 0 && self.logits.is_none() {
            return Err(EngineError::NothingToContinue);
        }
        while ids.len() < max_new {
            if self.state.pos >= self.max_context {
                reason = StopReason::ContextFull;
                break;
            }
            let mut logits = self
                .logits
                .take()
                .expect("logits after every feed and step");
            let id = sampler.sample(&mut logits, &self.history);
            ids.push(id);
            let is_stop_id =
                stop.stop_ids.contains(&id) || (!stop.ignore_eos && self.eos.contains(&id));
            if is_stop_id {
                self.step_into(id, logits)?;
                reason = StopReason::Eos(id);
                break;
            }
            let text = match &tok {
                Some(t) => decoder.push(t, id)?,
                None => String::new(),
            };
            let scan = matcher.push(&text);
            if !scan.emit.is_empty() {
                on_text(&scan.emit);
            }
            self.step_into(id, logits)?;
            if let Some(i) = scan.stopped {
                reason = StopReason::StopString(i);
                break;
            }
        }
        if !matches!(reason, StopReason::StopString(_)) {
            let tail = matcher.push(&decoder.finish());
            let mut rest = tail.emit;
            if let Some(i) = tail.stopped {
                // The held-back bytes of an unfinished character completed a stop string.
                reason = StopReason::StopString(i);
            } else {
                rest.push_str(&matcher.finish());
            }
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        let stats = GenerationStats {
            prompt_tokens: std::mem::take(&mut self.prompt_tokens),
            prompt_seconds: std::mem::take(&mut self.prompt_time).as_secs_f64(),
            generated_tokens: ids.len(),
            gen_seconds: t0.elapsed().as_secs_f64(),
            context_used: self.state.pos,
            stop_reason: reason,
            ids,
        };
        Ok(stats)
    }

    /// Forget everything: a fresh state, empty history.
    pub fn reset(&mut self) {
        self.state = self.model.new_state();
        self.state.reserve(self.reserved);
        self.history.clear();
        self.logits = None;
        self.prompt_tokens = 0;
        self.prompt_time = Duration::ZERO;
    }

    /// Write the state to `path` (a `kl_model::snapshot` file) and the history and last logits to
    /// `path` + [`persist::SIDECAR_SUFFIX`].
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with_meta(path, serde_json::Value::Null)
    }

    /// Restore what [`Session::save`] wrote; generation afterwards is what it would have been.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.load_with_meta(path).map(|_| ())
    }

    pub(crate) fn save_with_meta(&self, path: &Path, meta: serde_json::Value) -> Result<()> {
        let cfg = self.model.config();
        kl_model::snapshot::save_state(&self.state, cfg, path)?;
        persist::write_sidecar(
            path,
            cfg.vocab_size,
            &self.history,
            self.logits.as_deref(),
            meta,
        )
    }

    pub(crate) fn load_with_meta(&mut self, path: &Path) -> Result<serde_json::Value> {
        let cfg = self.model.config();
        let side = persist::read_sidecar(path, cfg.vocab_size)?;
        let state = kl_model::snapshot::load_state(path, cfg)?;
        if state.pos != side.history.len() {
            return Err(EngineError::SessionFile {
                path: path.display().to_string(),
                message: format!(
                    "the state holds {} tokens but the history beside it has {}; the two files do not belong together",
                    state.pos,
                    side.history.len()
                ),
            });
        }
        self.state = state;
        self.history = side.history;
        self.logits = side.logits;
        self.prompt_tokens = 0;
        self.prompt_time = Duration::ZERO;
        Ok(side.meta)
    }
}
