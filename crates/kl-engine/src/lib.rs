//! # kl-engine — text in, text out
//!
//! `kl-model` turns token ids into logits and keeps a sequence's state; `kl-tokenizer` turns text
//! into ids and back and renders the chat template. This crate joins them into what a user of a
//! language model wants: give it text, get text back, token by token, and keep talking.
//!
//! ## The pieces
//!
//! - [`Sampler`] picks the next id from a row of logits with the usual llama.cpp chain (logit
//!   bias, repetition penalty, top-k, temperature, softmax, top-p, min-p, draw). It owns a ChaCha8
//!   generator seeded from [`SamplingParams::seed`], so a seed fixes the output; temperature 0 is
//!   argmax with ties going to the lowest id and draws no random numbers.
//! - [`Session`] is one sequence: a shared [`kl_model::KimiLinear`] (`Arc`), an optional
//!   tokenizer, the [`kl_model::SequenceState`] and the `history` of ids the state has consumed.
//!   [`Session::feed`] prefills, [`Session::generate`] samples and streams. Text is streamed
//!   through [`kl_tokenizer::StreamDecoder`] (never half a UTF-8 character) and a [`StopMatcher`]
//!   (text that might begin a stop string is held back until it is known not to be one; a stop
//!   string is never shown, even when it spans several tokens).
//! - [`Chat`] keeps the message list and renders it with the chat template each turn, feeding
//!   only the ids that are new.
//! - [`resolve`] finds a model directory (a path, or a repo id in the local Hugging Face cache)
//!   and loads the model and the tokenizer beside it.
//!
//! ## The one invariant
//!
//! A session's state is always exactly what feeding its `history` to a fresh state would give,
//! and the logits it keeps are those of the last history id. Everything follows from it:
//!
//! - Generation consumes every token it samples, including the final end-of-sequence id.
//!   llama.cpp leaves that last eos unconsumed; here the state consumes it, so an assistant turn
//!   ends with `<|im_end|>` in the state exactly as the chat template renders it, and the next
//!   turn only has to feed the new user message.
//! - Multi-turn chat compares the rendered conversation's ids with `history`. If `history` is a
//!   prefix, the rest is fed; if not — a template that renders old turns differently, a reply that
//!   re-tokenizes to other ids (BPE has many spellings of a string; invalid UTF-8 comes back as
//!   U+FFFD), a reply cut at a stop string — the state cannot be rewound (the KDA recurrent state
//!   has no history), so the session is reset and the whole conversation prefilled again, and
//!   [`SyncOutcome::reprefilled`] reports it.
//! - A snapshot ([`Session::save`]) is the bit-exact state (`kl_model::snapshot`) plus a sidecar
//!   with the history and the last logits, so generation after [`Session::load`] is the
//!   generation that would have followed without saving.
//!
//! End-of-sequence ids are the config's `eos_token_id`s together with the tokenizer's
//! (`<|im_end|>`, `[EOS]`). Without a tokenizer a session works on ids alone, which is how the
//! golden tiny model (no tokenizer files) is driven.
//!
//! Errors are one [`EngineError`] that wraps the model's, the tokenizer's and the resolver's and
//! adds the engine's own (context full, no tokenizer, bad sampling parameter, bad session file).
//! Nothing here panics on bad input.
#![deny(missing_docs)]

pub mod chat;
mod persist;
pub mod resolve;
pub mod sampler;
pub mod session;
pub mod stop;

pub use chat::{Chat, SyncOutcome, TurnOutcome};
pub use persist::{sidecar_path, SIDECAR_SUFFIX};
pub use sampler::{argmax, Sampler, SamplingParams};
pub use session::{GenerationStats, Session};
pub use stop::{StopMatcher, StopReason, StopRules, StopScan};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model refused (bad id, load failure, snapshot mismatch, ...).
    #[error(transparent)]
    Model(#[from] kl_model::ModelError),
    /// The tokenizer or chat template failed.
    #[error(transparent)]
    Tokenizer(#[from] kl_tokenizer::TokenizerError),
    /// `--model` is neither a directory nor a cached repo id.
    #[error(transparent)]
    Resolve(#[from] kl_tokenizer::ResolveError),
    /// Something needs text but the model has no tokenizer.
    #[error("{0} needs a tokenizer, and the model directory has none (tiktoken.model, tokenizer_config.json)")]
    NoTokenizer(String),
    /// The tokens would not fit in the context.
    #[error("{requested} more tokens do not fit: {used} are in the context and the limit is {limit} tokens ({reason})")]
    ContextFull {
        /// Tokens already in the state.
        used: usize,
        /// Tokens that were to be added.
        requested: usize,
        /// The limit.
        limit: usize,
        /// Where the limit comes from.
        reason: String,
    },
    /// Generation was asked for before anything was fed.
    #[error("nothing to continue from: feed at least one token before generating")]
    NothingToContinue,
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    /// A session file cannot be read or does not match.
    #[error("session file {path}: {message}")]
    SessionFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;
