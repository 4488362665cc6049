//! Kimi's tiktoken tokenizer and chat template, reproduced exactly.
//!
//! # The format
//!
//! A Kimi checkpoint (Kimi-Linear, Kimi-K2) ships its tokenizer as three
//! files, read by the remote-code Python class `TikTokenTokenizer`:
//!
//! * `tiktoken.model`: one `base64(token bytes) rank` line per token, ranks
//!   `0..N` (163,584 of them for the real model). Ranks are *not* byte
//!   values: rank 0 is `!`, the single bytes come in GPT-2
//!   `bytes_to_unicode` order. Everything is built from the file; nothing
//!   about sizes or byte ranks is hard-coded.
//! * `tokenizer_config.json`: `added_tokens_decoder` names some of the
//!   `256 + 2` special ids that follow the ranks (`[BOS]` at `N`, `[EOS]` at
//!   `N + 1`, `<|im_end|>` at `N + 2`, ...); the unnamed ones are called
//!   `<|reserved_token_{id}|>`. So `n_vocab = N + 258`.
//! * `chat_template.jinja`: the Jinja chat template (see [`Tokenizer::apply_chat_template`]).
//!
//! # Encoding
//!
//! [`Tokenizer::encode`] follows `TikTokenTokenizer.encode` step by step:
//!
//! 1. cut the text into chunks of 400,000 characters, then cut each chunk so
//!    that no run of whitespace or of non-whitespace (Python `str.isspace`)
//!    exceeds 25,000 characters ([`pretokenize`]);
//! 2. in each piece, with specials allowed (Kimi's default), every
//!    special-token string (reserved names included) becomes its id and the
//!    text between them is encoded as ordinary text; with
//!    `allow_special = false` the whole piece is ordinary text;
//! 3. ordinary text is split by Kimi's pre-tokenisation regex
//!    ([`pretokenize::KIMI_PAT_STR`], run with `fancy-regex` exactly as
//!    tiktoken runs it, class intersection `&&` and look-ahead included);
//! 4. each regex match is byte-pair encoded with tiktoken's merge rule:
//!    repeatedly merge the adjacent pair of lowest rank, leftmost first.
//!
//! No `[BOS]` is ever added. The BPE keeps nothing cached between calls;
//! long pieces switch to a heap-based merge with the same order, so a
//! 25,000-character run costs `O(n log n)` rather than `O(n²)`.
//!
//! # Decoding
//!
//! [`Tokenizer::decode_bytes`] concatenates token bytes exactly (a token may
//! end inside a UTF-8 character); [`Tokenizer::decode`] then replaces invalid
//! UTF-8 with U+FFFD as Python's `errors="replace"` and Rust's
//! `from_utf8_lossy` do. [`StreamDecoder`] decodes incrementally and never
//! emits half a character.
//!
//! # Decisions
//!
//! * The Python loader silently keeps the last of two equal tokens or ranks;
//!   here duplicates, malformed lines, bad base64, ranks that are not exactly
//!   `0..N`, a missing single-byte token and malformed config fields are all
//!   errors that name the file, line or field. Nothing panics on bad input.
//! * Special-token matching is leftmost, then longest (tiktoken's own order
//!   among overlapping names is unspecified; Kimi's names never overlap).
//! * Should the regex engine ever give up on a pathological input (its
//!   backtracking limit), the rest of that segment is byte-pair encoded as
//!   one piece instead of panicking as tiktoken would.
//! * The chat template runs on `minijinja`, configured to behave like
//!   transformers' Jinja environment (see [`Tokenizer::apply_chat_template`]).

#![deny(missing_docs)]

mod bpe;
mod chat;
mod error;
pub mod hf_cache;
pub mod pretokenize;
mod pyjson;
mod special;
mod stream;
mod vocab;

use std::path::Path;

use serde_json::Value as Json;

pub use chat::json_kind;
pub use error::TokenizerError;
pub use hf_cache::{resolve_model, resolve_model_in, ResolveError};
pub use special::{NUM_RESERVED_SPECIAL_TOKENS, NUM_SPECIAL_IDS};
pub use stream::StreamDecoder;

use special::Specials;
use vocab::Vocab;

/// Name of the vocabulary file in a tokenizer directory.
pub const TIKTOKEN_MODEL_FILE: &str = "tiktoken.model";
/// Name of the tokenizer configuration file in a tokenizer directory.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Name of the chat template file in a tokenizer directory.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Special-token variables that transformers passes to chat templates.
const TEMPLATE_TOKEN_VARS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// A loaded Kimi tokenizer: ranks, special tokens, regex and chat template.
///
/// It is immutable after loading and `Send + Sync`, so one instance can be
/// shared between threads.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: Vocab,
    specials: Specials,
    regex: fancy_regex::Regex,
    chat_template: Option<String>,
    template_name: String,
    template_vars: serde_json::Map<String, Json>,
    eos_ids: Vec<u32>,
}

fn read_file(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TokenizerError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

impl Tokenizer {
    /// Loads `tiktoken.model` and `tokenizer_config.json` from `dir`, and the
    /// chat template from `chat_template.jinja` if present (else from the
    /// config's `chat_template` field, if any).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let model_path = dir.join(TIKTOKEN_MODEL_FILE);
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let model = read_file(&model_path)?;
        let config = read_file(&config_path)?;
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        let template = if template_path.is_file() {
            Some((
                read_file(&template_path)?,
                template_path.display().to_string(),
            ))
        } else {
            None
        };
        Tokenizer::build(
            &model,
            &model_path.display().to_string(),
            &config,
            &config_path.display().to_string(),
            template,
        )
    }

    /// Builds a tokenizer from file contents: the text of `tiktoken.model`,
    /// the text of `tokenizer_config.json`, and optionally a chat template
    /// (when `None`, the config's `chat_template` field is used if present).
    pub fn from_parts(
        tiktoken_model: &str,
        tokenizer_config_json: &str,
        chat_template: Option<String>,
    ) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::build(
            tiktoken_model,
            TIKTOKEN_MODEL_FILE,
            tokenizer_config_json,
            TOKENIZER_CONFIG_FILE,
            chat_template.map(|t| (t, CHAT_TEMPLATE_FILE.to_string())),
        )
    }

    fn build(
        model: &str,
        model_file: &str,
        config: &str,
        config_file: &str,
        template: Option<(String, String)>,
    ) -> Result<Tokenizer, TokenizerError> {
        let vocab = Vocab::parse(model, model_file)?;
        let config: Json =
            serde_json::from_str(config).map_err(|e| TokenizerError::ConfigJson {
                file: config_file.to_string(),
                reason: e.to_string(),
            })?;
        if !config.is_object() {
            return Err(TokenizerError::ConfigJson {
                file: config_file.to_string(),
                reason: "top level is not an object".into(),
            });
        }
        let n = u32::try_from(vocab.len()).map_err(|_| TokenizerError::BadVocab {
            file: model_file.to_string(),
            reason: "more than 2^32 ranks".into(),
        })?;
        let specials = Specials::from_config(n, &config, config_file)?;
        let regex = fancy_regex::Regex::new(pretokenize::KIMI_PAT_STR).map_err(|e| {
            TokenizerError::BadVocab {
                file: model_file.to_string(),
                reason: format!("pre-tokenisation regex failed to compile: {e}"),
            }
        })?;

        let mut template_vars = serde_json::Map::new();
        for key in TEMPLATE_TOKEN_VARS {
            if let Some(name) = config.get(key).and_then(token_content) {
                template_vars.insert(key.to_string(), Json::String(name.to_string()));
            }
        }
        if let Some(Json::Array(list)) = config.get("additional_special_tokens") {
            let names: Vec<Json> = list
                .iter()
                .filter_map(token_content)
                .map(|s| Json::String(s.to_string()))
                .collect();
            template_vars.insert("additional_special_tokens".into(), Json::Array(names));
        }

        let (chat_template, template_name) = match template {
            Some((text, name)) => (Some(text), name),
            None => (
                config_template(&config, config_file)?,
                format!("{config_file}: chat_template"),
            ),
        };

        let mut tok = Tokenizer {
            vocab,
            specials,
            regex,
            chat_template,
            template_name,
            template_vars,
            eos_ids: Vec::new(),
        };
        let config_eos = config.get("eos_token").and_then(token_content);
        for name in ["<|im_end|>", "[EOS]"].into_iter().chain(config_eos) {
            if let Some(id) = tok.token_id(name) {
                if !tok.eos_ids.contains(&id) {
                    tok.eos_ids.push(id);
                }
            }
        }
        Ok(tok)
    }

    /// Encodes `text`. With `allow_special` (Kimi's default) every
    /// special-token string in the text, reserved names included, becomes
    /// its id; without it they are encoded as ordinary text. No BOS is added.
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        pretokenize::for_each_piece(text, |piece| {
            if !allow_special {
                self.encode_ordinary_into(piece, &mut out);
                return;
            }
            let mut rest = piece;
            while let Some((start, end, id)) = self.specials.find(rest) {
                self.encode_ordinary_into(&rest[..start], &mut out);
                out.push(id);
                rest = &rest[end..];
            }
            self.encode_ordinary_into(rest, &mut out);
        });
        out
    }

    /// Regex split plus BPE, with no special-token handling.
    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut pos = 0;
        for m in self.regex.find_iter(text) {
            match m {
                Ok(m) => {
                    bpe::encode_piece(&self.vocab.encoder, m.as_str().as_bytes(), out);
                    pos = m.end();
                }
                Err(_) => {
                    // Backtracking limit hit: encode the rest as one piece.
                    bpe::encode_piece(&self.vocab.encoder, &text.as_bytes()[pos..], out);
                    return;
                }
            }
        }
    }

    /// The bytes of one token (a special token's bytes are its name), or
    /// `None` if `id` is out of range.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let idx = id as usize;
        let n = self.vocab.decoder.len();
        if idx < n {
            Some(&self.vocab.decoder[idx])
        } else {
            self.specials
                .list
                .get(idx - n)
                .map(|(name, _)| name.as_bytes())
        }
    }

    /// The exact concatenated bytes of `ids`. Fails on the first id that is
    /// out of range, naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self.token_bytes(id).ok_or(TokenizerError::IdOutOfRange {
                id,
                n_vocab: self.n_vocab(),
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Decodes `ids` to text, replacing invalid UTF-8 with U+FFFD (one per
    /// maximal invalid subpart, like Python's `errors="replace"`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Number of ids: ranks plus special ids (`N + 258`).
    pub fn n_vocab(&self) -> usize {
        self.vocab.decoder.len() + self.specials.list.len()
    }

    /// Number of BPE ranks `N`; special ids start here.
    pub fn num_base_tokens(&self) -> usize {
        self.vocab.decoder.len()
    }

    /// The id of a special token name, or of an ordinary token whose bytes
    /// are exactly `s`.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.specials
            .by_name
            .get(s)
            .copied()
            .or_else(|| self.vocab.encoder.get(s.as_bytes()).copied())
    }

    /// True if `id` is one of the special ids (`N..N + 258`).
    pub fn is_special(&self, id: u32) -> bool {
        let n = self.num_base_tokens();
        (id as usize) >= n && (id as usize) < self.n_vocab()
    }

    /// All special tokens as `(name, id)`, in id order, reserved ones included.
    pub fn special_tokens(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.specials.list.iter().map(|(n, id)| (n.as_str(), *id))
    }

    /// Ids that end generation: `<|im_end|>` (the model's `eos_token_id`,
    /// which closes every chat turn), `[EOS]`, and the config's `eos_token`,
    /// each if present, without duplicates.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// The chat template source, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template as transformers does for Kimi: `messages` is
    /// a JSON array of message objects, `tools` an optional JSON array of tool
    /// schemas (its keys are sorted recursively first, as Kimi's
    /// `deep_sort_dict` does). The template sees `messages`, `tools`,
    /// `documents` (none), `add_generation_prompt` and the special-token
    /// names of `tokenizer_config.json` (`bos_token`, `eos_token`, ...).
    ///
    /// The environment matches transformers' Jinja one: `trim_blocks`,
    /// `lstrip_blocks`, loop controls, no auto-escaping, trailing newline
    /// dropped, `tojson` = Python `json.dumps(ensure_ascii=False)` with
    /// keyword arguments, `raise_exception`, Python printing of
    /// `None`/`True`/lists/dicts, and the dict/string methods `.get`,
    /// `.items`, `.keys`, `.values`, `.startswith`, `.endswith`, `.strip`,
    /// `.lstrip`, `.rstrip`, `.upper`, `.lower`, `.split`, `.replace`.
    ///
    /// Encode the result with `encode(&rendered, true)` so the markers become
    /// special ids.
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let input = chat::ChatInput {
            messages,
            tools,
            add_generation_prompt,
            extra: &self.template_vars,
        };
        chat::render(source, &self.template_name, &input)
    }
}

/// A special token given in the config as `"name"` or `{"content": "name"}`.
fn token_content(v: &Json) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// The config's `chat_template`: a string, or a list of `{name, template}`
/// from which the one named `default` is taken.
fn config_template(config: &Json, file: &str) -> Result<Option<String>, TokenizerError> {
    let bad = |reason: &str| TokenizerError::ConfigField {
        file: file.to_string(),
        field: "chat_template".into(),
        reason: reason.to_string(),
    };
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            for item in list {
                if item.get("name").and_then(Json::as_str) == Some("default") {
                    return item
                        .get("template")
                        .and_then(Json::as_str)
                        .map(|s| Some(s.to_string()))
                        .ok_or_else(|| bad("`default` entry has no string `template`"));
                }
            }
            Ok(None)
        }
        Some(_) => Err(bad("expected a string or a list of {name, template}")),
    }
}
