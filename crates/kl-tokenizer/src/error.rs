//! The crate's error type.
//!
//! Every variant names what is at fault: the file (a path when the tokenizer
//! was loaded from a directory, the file's conventional name when it was
//! loaded from strings), the line, the JSON field, or the token id.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, decoding ids or
/// rendering a chat template. Nothing in this crate panics on bad input; it
/// returns one of these instead.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required file does not exist.
    #[error("tokenizer file not found: {}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },

    /// A file exists but could not be read (permissions, not UTF-8, ...).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A line of `tiktoken.model` is not `<base64 token> <rank>`.
    #[error("{file}:{line}: malformed line: {reason}")]
    MalformedLine {
        /// The file (path or name).
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// The token column of a `tiktoken.model` line is not valid base64.
    #[error("{file}:{line}: bad base64 token {token:?}: {reason}")]
    BadBase64 {
        /// The file (path or name).
        file: String,
        /// 1-based line number.
        line: usize,
        /// The offending base64 text.
        token: String,
        /// The decoder's complaint.
        reason: String,
    },

    /// Two lines of `tiktoken.model` give the same rank.
    #[error("{file}:{line}: duplicate rank {rank} (first given on line {first_line})")]
    DuplicateRank {
        /// The file (path or name).
        file: String,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// 1-based line number of the first occurrence.
        first_line: usize,
        /// The repeated rank.
        rank: u32,
    },

    /// Two lines of `tiktoken.model` give the same token bytes.
    #[error("{file}:{line}: duplicate token {token:?} (first given on line {first_line})")]
    DuplicateToken {
        /// The file (path or name).
        file: String,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// 1-based line number of the first occurrence.
        first_line: usize,
        /// The repeated token, as base64 text.
        token: String,
    },

    /// The vocabulary cannot encode some byte on its own, so byte-level BPE
    /// would be unable to encode arbitrary text.
    #[error("{file}: no rank for the single byte 0x{byte:02x}; every byte must be a token")]
    MissingByte {
        /// The file (path or name).
        file: String,
        /// The byte that has no token.
        byte: u8,
    },

    /// The vocabulary is empty or too large for `u32` ids.
    #[error("{file}: {reason}")]
    BadVocab {
        /// The file (path or name).
        file: String,
        /// What is wrong.
        reason: String,
    },

    /// `tokenizer_config.json` is not valid JSON.
    #[error("{file}: invalid JSON: {reason}")]
    ConfigJson {
        /// The file (path or name).
        file: String,
        /// The parser's message.
        reason: String,
    },

    /// A field of `tokenizer_config.json` has the wrong shape or value.
    #[error("{file}: field `{field}`: {reason}")]
    ConfigField {
        /// The file (path or name).
        file: String,
        /// The JSON path of the field, e.g. `added_tokens_decoder.3000.content`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A token id is not part of the vocabulary.
    #[error("token id {id} is out of range (vocabulary has {n_vocab} ids)")]
    IdOutOfRange {
        /// The offending id.
        id: u32,
        /// The number of ids, `n_vocab()`.
        n_vocab: usize,
    },

    /// No chat template was found (no `chat_template.jinja`, no
    /// `chat_template` field in `tokenizer_config.json`).
    #[error("this tokenizer has no chat template")]
    NoChatTemplate,

    /// The arguments given to `apply_chat_template` have the wrong JSON type.
    #[error("chat template argument `{arg}`: {reason}")]
    ChatArgument {
        /// `messages` or `tools`.
        arg: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// The chat template failed to compile or to render.
    #[error("chat template {name}: {reason}")]
    Template {
        /// Where the template came from (file name or config field).
        name: String,
        /// The template engine's message, with its line number.
        reason: String,
    },
}
