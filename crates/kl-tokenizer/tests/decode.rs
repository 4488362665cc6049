//! Decoding: fixture cases (bytes and lossy text) and incremental decoding.

mod common;

use common::{cases, expected, ids, tokenizer, unhex};
use kl_tokenizer::{StreamDecoder, Tokenizer};

#[test]
fn decode_cases_bytes_and_text() {
    let tok = tokenizer();
    let exp = expected();
    for (name, case) in cases(&exp, "decode_cases") {
        let ids = ids(&case["ids"]);
        let want_bytes = unhex(case["bytes_hex"].as_str().unwrap());
        assert_eq!(
            tok.decode_bytes(&ids).unwrap(),
            want_bytes,
            "case {name}: bytes"
        );
        for (id, hex) in ids.iter().zip(case["token_bytes_hex"].as_array().unwrap()) {
            assert_eq!(
                tok.token_bytes(*id).unwrap(),
                unhex(hex.as_str().unwrap()).as_slice(),
                "case {name}: token {id}"
            );
        }
        assert_eq!(
            tok.decode(&ids).unwrap(),
            case["text"].as_str().unwrap(),
            "case {name}: text"
        );
    }
}

#[test]
fn encode_ids_decode_to_text() {
    let tok = tokenizer();
    let exp = expected();
    for (name, case) in cases(&exp, "encode_cases") {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.decode(&ids(&case["ids"])).unwrap(),
            text,
            "case {name}: ids"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids_ordinary"])).unwrap(),
            text,
            "case {name}: ids_ordinary"
        );
    }
}

/// Streams `ids` one at a time; returns the chunks (the last from `finish`).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut dec = StreamDecoder::new();
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(tok, id).unwrap()).collect();
    chunks.push(dec.finish());
    assert!(dec.is_empty());
    chunks
}

#[test]
fn streaming_reassembles_every_case() {
    let tok = tokenizer();
    let exp = expected();
    let mut split_chars = 0;
    for (name, case) in cases(&exp, "encode_cases") {
        let text = case["text"].as_str().unwrap();
        for key in ["ids", "ids_ordinary"] {
            let ids = ids(&case[key]);
            let chunks = stream(&tok, &ids);
            assert_eq!(chunks.concat(), text, "case {name} ({key})");
            // Valid text never contains U+FFFD mid-stream: no half character
            // was ever emitted as a replacement.
            if !text.contains('\u{fffd}') {
                assert!(
                    chunks.iter().all(|c| !c.contains('\u{fffd}')),
                    "case {name}"
                );
            }
            // Count tokens that end inside a character (held back, emitted later).
            split_chars += ids
                .iter()
                .zip(&chunks)
                .filter(|(&id, c)| c.is_empty() && !tok.token_bytes(id).unwrap().is_empty())
                .count();
        }
    }
    assert!(
        split_chars > 0,
        "the fixtures should split some characters across tokens"
    );
}

#[test]
fn streaming_cjk_and_emoji_by_single_bytes() {
    let tok = tokenizer();
    let exp = expected();
    let wanted = ["zh", "ja", "ko", "emoji", "emoji_zwj", "astral"];
    let mut seen = 0;
    for (name, case) in cases(&exp, "encode_cases") {
        if !wanted.contains(&name) {
            continue;
        }
        seen += 1;
        let text = case["text"].as_str().unwrap();
        let ids = ids(&case["ids"]);
        let chunks = stream(&tok, &ids);
        assert_eq!(chunks.concat(), text, "case {name}");
        // Every emitted chunk ends on a character boundary of the text.
        let mut pos = 0;
        for c in &chunks {
            pos += c.len();
            assert!(
                text.is_char_boundary(pos),
                "case {name}: chunk ends mid-character"
            );
        }
    }
    assert_eq!(
        seen,
        wanted.len(),
        "some CJK/emoji cases are missing from the fixtures"
    );
    // Byte tokens of "你" one by one (decode case `single_bytes_of_ni`).
    let dc = cases(&exp, "decode_cases");
    let (_, ni) = dc.iter().find(|(n, _)| *n == "single_bytes_of_ni").unwrap();
    assert_eq!(stream(&tok, &ids(&ni["ids"])), vec!["", "", "你", ""]);
}

#[test]
fn streaming_matches_lossy_decode_on_invalid_input() {
    let tok = tokenizer();
    let exp = expected();
    for (name, case) in cases(&exp, "decode_cases") {
        let ids = ids(&case["ids"]);
        assert_eq!(
            stream(&tok, &ids).concat(),
            case["text"].as_str().unwrap(),
            "case {name}"
        );
    }
}

#[test]
fn out_of_range_ids_are_errors() {
    let tok = tokenizer();
    let n = tok.n_vocab() as u32;
    let err = tok.decode(&[1, n]).unwrap_err().to_string();
    assert!(err.contains(&n.to_string()), "{err}");
    assert!(tok.decode_bytes(&[u32::MAX]).is_err());
    assert!(tok.token_bytes(n).is_none());
    let mut dec = StreamDecoder::new();
    let err = dec.push(&tok, n + 5).unwrap_err().to_string();
    assert!(err.contains(&(n + 5).to_string()), "{err}");
    // The last id is valid.
    assert!(tok.decode(&[n - 1]).is_ok());
}
