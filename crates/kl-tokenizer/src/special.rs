//! Special tokens: their names and ids, and finding them in text.
//!
//! Kimi's `TikTokenTokenizer` registers `num_reserved_special_tokens + 2`
//! ids right after the `N` ranks: `N .. N + 258`. An id named in
//! `tokenizer_config.json` → `added_tokens_decoder` gets that name (its
//! `content`); every other id is `<|reserved_token_{id}|>`. Names given for
//! ids outside that range are ignored, as in the Python class.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::TokenizerError;

/// `TikTokenTokenizer.num_reserved_special_tokens`.
pub const NUM_RESERVED_SPECIAL_TOKENS: usize = 256;

/// Special ids registered after the ranks: the reserved ones plus two
/// (Kimi's `range(N, N + num_reserved_special_tokens + 2)`).
pub const NUM_SPECIAL_IDS: usize = NUM_RESERVED_SPECIAL_TOKENS + 2;

/// The special-token table plus a matcher that finds the leftmost special
/// token in a string (the longest one if several start at the same place).
#[derive(Debug, Clone)]
pub(crate) struct Specials {
    /// `(name, id)` in id order.
    pub(crate) list: Vec<(String, u32)>,
    /// name → id.
    pub(crate) by_name: HashMap<String, u32>,
    /// Distinct name lengths in bytes, longest first.
    lengths: Vec<usize>,
    /// `first_byte[b]`: some name starts with byte `b`.
    first_byte: [bool; 256],
}

impl Specials {
    /// Builds the table for ids `first_id .. first_id + NUM_SPECIAL_IDS`
    /// from a parsed `tokenizer_config.json`.
    pub(crate) fn from_config(
        first_id: u32,
        config: &Value,
        file: &str,
    ) -> Result<Specials, TokenizerError> {
        let field_err = |field: String, reason: String| TokenizerError::ConfigField {
            file: file.to_string(),
            field,
            reason,
        };
        let end = u64::from(first_id) + NUM_SPECIAL_IDS as u64;
        if end > u64::from(u32::MAX) {
            return Err(TokenizerError::BadVocab {
                file: file.to_string(),
                reason: format!("{first_id} ranks leave no room for {NUM_SPECIAL_IDS} special ids"),
            });
        }
        let mut named: HashMap<u32, String> = HashMap::new();
        match config.get("added_tokens_decoder") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (key, entry) in map {
                    let id: u32 = key.trim().parse().map_err(|_| {
                        field_err(
                            format!("added_tokens_decoder.{key}"),
                            "key is not a token id".into(),
                        )
                    })?;
                    let content = match entry {
                        Value::String(s) => s.as_str(),
                        Value::Object(o) => {
                            o.get("content").and_then(Value::as_str).ok_or_else(|| {
                                field_err(
                                    format!("added_tokens_decoder.{key}.content"),
                                    "missing or not a string".into(),
                                )
                            })?
                        }
                        _ => {
                            return Err(field_err(
                                format!("added_tokens_decoder.{key}"),
                                "expected an object with `content`".into(),
                            ));
                        }
                    };
                    if content.is_empty() {
                        return Err(field_err(
                            format!("added_tokens_decoder.{key}.content"),
                            "empty token".into(),
                        ));
                    }
                    named.insert(id, content.to_string());
                }
            }
            Some(_) => {
                return Err(field_err(
                    "added_tokens_decoder".into(),
                    "expected an object mapping ids to tokens".into(),
                ));
            }
        }

        let mut list = Vec::with_capacity(NUM_SPECIAL_IDS);
        let mut by_name = HashMap::with_capacity(NUM_SPECIAL_IDS);
        for id in first_id..end as u32 {
            let name = named
                .remove(&id)
                .unwrap_or_else(|| format!("<|reserved_token_{id}|>"));
            if let Some(other) = by_name.insert(name.clone(), id) {
                return Err(field_err(
                    format!("added_tokens_decoder.{id}"),
                    format!("token {name:?} is also the name of id {other}"),
                ));
            }
            list.push((name, id));
        }
        Ok(Specials::new(list, by_name))
    }

    fn new(list: Vec<(String, u32)>, by_name: HashMap<String, u32>) -> Specials {
        let mut lengths: Vec<usize> = list.iter().map(|(n, _)| n.len()).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        let mut first_byte = [false; 256];
        for (name, _) in &list {
            if let Some(&b) = name.as_bytes().first() {
                first_byte[usize::from(b)] = true;
            }
        }
        Specials {
            list,
            by_name,
            lengths,
            first_byte,
        }
    }

    /// The leftmost special token in `text`: `(start, end, id)` in bytes.
    pub(crate) fn find(&self, text: &str) -> Option<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        for (start, &b) in bytes.iter().enumerate() {
            if !self.first_byte[usize::from(b)] {
                continue;
            }
            for &len in &self.lengths {
                let end = start + len;
                if end > bytes.len() || !text.is_char_boundary(end) {
                    continue;
                }
                if let Some(&id) = self.by_name.get(&text[start..end]) {
                    return Some((start, end, id));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_matching() {
        let cfg = serde_json::json!({
            "added_tokens_decoder": {
                "10": {"content": "<|a|>"},
                "11": {"content": "<|ab|>"},
                "999": {"content": "<|ignored|>"}
            }
        });
        let s = Specials::from_config(10, &cfg, "cfg").unwrap();
        assert_eq!(s.list.len(), NUM_SPECIAL_IDS);
        assert_eq!(s.list[2], ("<|reserved_token_12|>".to_string(), 12));
        assert!(!s.by_name.contains_key("<|ignored|>"));
        assert_eq!(s.find("xx<|ab|><|a|>"), Some((2, 8, 11)));
        assert_eq!(s.find("é<|a|"), None);
        assert_eq!(s.find("<|reserved_token_267|>"), Some((0, 22, 267)));
    }

    #[test]
    fn bad_config_is_an_error() {
        let cfg = serde_json::json!({"added_tokens_decoder": {"x": {"content": "a"}}});
        let e = Specials::from_config(0, &cfg, "cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("added_tokens_decoder.x"), "{e}");
        let cfg = serde_json::json!({"added_tokens_decoder": {"0": {"content": 5}}});
        let e = Specials::from_config(0, &cfg, "cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("added_tokens_decoder.0.content"), "{e}");
    }
}
