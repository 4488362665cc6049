//! Tokenizer files for synthetic checkpoints, in the real Kimi formats: `tiktoken.model`
//! (`base64(token bytes) rank` per line), `tokenizer_config.json` (the `added_tokens_decoder`
//! layout of the Kimi family, ids shifted to `N`) and the verbatim Kimi-Linear chat template.
//!
//! Ranks: `0..256` are the single bytes in byte order. Then come the tokens of a byte-level BPE
//! trained on a small embedded English text ([`CORPUS`]): the text is cut into pieces like the Kimi
//! pre-tokenizer does (an optional leading space or mark plus a run of letters, digit runs of at
//! most three, punctuation runs, whitespace runs), merges never cross a piece, the most frequent
//! pair wins and ties go to the smaller merged bytes. If the BPE runs out of pairs before `N`
//! ranks, the rest are the strings `" 0"`, `" 1"`, … (skipping any already present), so every
//! rank is unique and the file is the same for every run.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;

/// The embedded BPE training text.
pub(crate) const CORPUS: &str = include_str!("corpus.txt");

/// Moonshot's public Kimi-Linear-48B-A3B-Instruct `chat_template.jinja`, byte for byte.
pub(crate) const CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// The named special tokens: offset from `N`, content, `special` flag (Kimi `added_tokens_decoder`).
pub(crate) const NAMED_SPECIALS: &[(usize, &str, bool)] = &[
    (0, "[BOS]", true),
    (1, "[EOS]", true),
    (2, "<|im_end|>", true),
    (3, "<|im_user|>", true),
    (4, "<|im_assistant|>", true),
    (6, "<|start_header_id|>", true),
    (7, "<|end_header_id|>", true),
    (9, "[EOT]", true),
    (10, "<|im_system|>", true),
    (11, "<|tool_calls_section_begin|>", false),
    (12, "<|tool_calls_section_end|>", false),
    (13, "<|tool_call_begin|>", false),
    (14, "<|tool_call_argument_begin|>", false),
    (15, "<|tool_call_end|>", false),
    (17, "<|im_middle|>", true),
    (254, "[UNK]", true),
    (255, "[PAD]", true),
];

/// Cut text into pre-tokenizer-like pieces (ASCII-oriented approximation of the Kimi regex).
fn pieces(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let kind = |i: usize| chars.get(i).map(|&(_, c)| c);
    let letter = |i: usize| kind(i).is_some_and(char::is_alphabetic);
    let digit = |i: usize| kind(i).is_some_and(char::is_numeric);
    let space = |i: usize| kind(i).is_some_and(char::is_whitespace);
    let newline = |i: usize| kind(i).is_some_and(|c| c == '\n' || c == '\r');
    let punct = |i: usize| i < chars.len() && !letter(i) && !digit(i) && !space(i);
    let byte = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let mut j = i + 1;
        if letter(i) || (!digit(i) && !newline(i) && letter(i + 1)) {
            j = i + 1;
            while letter(j) {
                j += 1;
            }
        } else if digit(i) {
            while j < i + 3 && digit(j) {
                j += 1;
            }
        } else if punct(i) || (kind(i) == Some(' ') && punct(i + 1)) {
            while punct(j) {
                j += 1;
            }
            while newline(j) {
                j += 1;
            }
        } else {
            while space(j) {
                j += 1;
            }
            // Leave the last space of a run to prefix the following word (`\s+(?!\S)`).
            if j - i > 1 && j < chars.len() && kind(j - 1) == Some(' ') {
                j -= 1;
            }
        }
        out.push(&text[byte(i)..byte(j)]);
        i = j;
    }
    out
}

/// The `n` ordinary ranks (bytes of each token, index = rank). Requires `n >= 256`.
pub(crate) fn ordinary_tokens(n: usize) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut ids: HashMap<Vec<u8>, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut counts: BTreeMap<&[u8], u64> = BTreeMap::new();
    for p in pieces(CORPUS) {
        *counts.entry(p.as_bytes()).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, u64)> = counts
        .into_iter()
        .map(|(p, c)| (p.iter().map(|&b| u32::from(b)).collect(), c))
        .collect();

    while vocab.len() < n {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, c) in &words {
            for pair in w.windows(2) {
                *pairs.entry((pair[0], pair[1])).or_default() += c;
            }
        }
        let merged = |&(a, b): &(u32, u32)| {
            [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat()
        };
        // Most frequent pair; ties to the smaller merged bytes, then to the smaller ids.
        let Some((&pair, _)) = pairs.iter().min_by(|x, y| {
            y.1.cmp(x.1)
                .then_with(|| merged(x.0).cmp(&merged(y.0)))
                .then_with(|| x.0.cmp(y.0))
        }) else {
            break;
        };
        let bytes = merged(&pair);
        let id = match ids.get(&bytes) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                ids.insert(bytes.clone(), id);
                vocab.push(bytes);
                id
            }
        };
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut k = 0;
            while k < w.len() {
                if k + 1 < w.len() && (w[k], w[k + 1]) == pair {
                    out.push(id);
                    k += 2;
                } else {
                    out.push(w[k]);
                    k += 1;
                }
            }
            *w = out;
        }
        words.retain(|(w, _)| w.len() > 1);
    }

    let mut next = 0u64;
    while vocab.len() < n {
        let t = format!(" {next}").into_bytes();
        next += 1;
        if !ids.contains_key(&t) {
            ids.insert(t.clone(), vocab.len() as u32);
            vocab.push(t);
        }
    }
    vocab
}

/// `tiktoken.model` text: one `base64(bytes) rank` line per token.
pub(crate) fn tiktoken_model(tokens: &[Vec<u8>]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut s = String::with_capacity(tokens.len() * 16);
    for (rank, t) in tokens.iter().enumerate() {
        s.push_str(&b64.encode(t));
        s.push(' ');
        s.push_str(&rank.to_string());
        s.push('\n');
    }
    s
}

/// `tokenizer_config.json` with the named special tokens at `n + offset`.
pub(crate) fn tokenizer_config_json(n: usize) -> String {
    let mut decoder = serde_json::Map::new();
    for &(off, content, special) in NAMED_SPECIALS {
        decoder.insert(
            (n + off).to_string(),
            serde_json::json!({
                "content": content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": special,
            }),
        );
    }
    let additional = [
        "<|im_end|>",
        "<|im_user|>",
        "<|im_assistant|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "[EOT]",
        "<|im_system|>",
        "<|im_middle|>",
    ];
    let v = serde_json::json!({
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "auto_map": { "AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", null] },
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": false,
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn pieces_cover_text_and_keep_words_whole() {
        let text = "Hello world,  two  spaces (x) 12345\nend";
        let p = pieces(text);
        assert_eq!(p.concat(), text);
        assert!(
            p.contains(&" world")
                && p.contains(&"123")
                && p.contains(&"45")
                && p.contains(&" spaces"),
            "{p:?}"
        );
        assert_eq!(pieces(CORPUS).concat(), CORPUS);
    }

    #[test]
    fn ranks_are_unique_and_deterministic() {
        for n in [256, 300, 3000, 20_000] {
            let v = ordinary_tokens(n);
            assert_eq!(v.len(), n);
            let set: HashSet<&Vec<u8>> = v.iter().collect();
            assert_eq!(set.len(), n, "unique ranks for n = {n}");
            assert!((0..256).all(|b| v[b] == vec![b as u8]));
        }
        assert_eq!(ordinary_tokens(1000), ordinary_tokens(1000));
        let v = ordinary_tokens(1000);
        assert!(v.iter().any(|t| t == b" the"), "BPE learns common words");
    }

    #[test]
    fn config_layout() {
        let v: serde_json::Value = serde_json::from_str(&tokenizer_config_json(256)).unwrap();
        assert_eq!(v["added_tokens_decoder"]["258"]["content"], "<|im_end|>");
        assert_eq!(v["added_tokens_decoder"]["511"]["content"], "[PAD]");
        assert_eq!(v["added_tokens_decoder"]["267"]["special"], false);
        assert_eq!(v["added_tokens_decoder"].as_object().unwrap().len(), 17);
    }
}
