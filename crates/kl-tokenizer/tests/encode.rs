//! Encoding: every fixture case in both modes, round trips, vocabulary facts.

mod common;

use common::{cases, expected, ids, tokenizer};

#[test]
fn encode_cases_specials_allowed() {
    let tok = tokenizer();
    let exp = expected();
    let mut failures = Vec::new();
    for (name, case) in cases(&exp, "encode_cases") {
        let text = case["text"].as_str().expect("text");
        let got = tok.encode(text, true);
        if got != ids(&case["ids"]) {
            failures.push(name.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "encode(allow_special=true) mismatches: {failures:?}"
    );
}

#[test]
fn encode_cases_ordinary() {
    let tok = tokenizer();
    let exp = expected();
    let mut failures = Vec::new();
    for (name, case) in cases(&exp, "encode_cases") {
        let text = case["text"].as_str().expect("text");
        let got = tok.encode(text, false);
        if got != ids(&case["ids_ordinary"]) {
            failures.push(name.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "encode(allow_special=false) mismatches: {failures:?}"
    );
}

#[test]
fn pattern_matches_fixture() {
    assert_eq!(
        expected()["pat_str"].as_str().expect("pat_str"),
        kl_tokenizer::pretokenize::KIMI_PAT_STR
    );
    let split = &expected()["encode_split"];
    assert_eq!(
        split["max_run_chars"],
        kl_tokenizer::pretokenize::MAX_RUN_CHARS
    );
    assert_eq!(split["chunk_chars"], kl_tokenizer::pretokenize::CHUNK_CHARS);
}

#[test]
fn round_trip_all_cases() {
    let tok = tokenizer();
    let exp = expected();
    for (name, case) in cases(&exp, "encode_cases") {
        let text = case["text"].as_str().expect("text");
        for allow in [true, false] {
            let ids = tok.encode(text, allow);
            assert_eq!(
                tok.decode(&ids).unwrap(),
                text,
                "case {name} (allow_special={allow})"
            );
            assert_eq!(
                tok.decode_bytes(&ids).unwrap(),
                text.as_bytes(),
                "case {name} (allow_special={allow})"
            );
        }
    }
}

#[test]
fn vocabulary_layout() {
    let tok = tokenizer();
    let exp = expected();
    let vocab = &exp["vocab"];
    assert_eq!(tok.n_vocab() as u64, vocab["n_vocab"].as_u64().unwrap());
    assert_eq!(
        tok.num_base_tokens() as u64,
        vocab["num_base_tokens"].as_u64().unwrap()
    );

    let want = exp["special_tokens"].as_object().expect("special_tokens");
    let got: Vec<(&str, u32)> = tok.special_tokens().collect();
    assert_eq!(got.len(), want.len());
    for (name, id) in &got {
        assert_eq!(
            want.get(*name).and_then(|v| v.as_u64()),
            Some(u64::from(*id)),
            "{name}"
        );
        assert_eq!(tok.token_id(name), Some(*id), "{name}");
        assert!(tok.is_special(*id));
    }
    for (name, id) in exp["named_special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_id(name).map(u64::from), id.as_u64(), "{name}");
    }
    let roles = &exp["role_ids"];
    let role = |k: &str| roles[k].as_u64().unwrap() as u32;
    assert_eq!(tok.eos_ids(), vec![role("im_end"), role("eos")]);
    assert_eq!(tok.token_id("[BOS]"), Some(role("bos")));
    assert_eq!(tok.token_id("[PAD]"), Some(role("pad")));
    // Ranks are not byte values: rank 0 is "!", the space is rank 220.
    assert_eq!(tok.token_id("!"), Some(0));
    assert_eq!(tok.token_id(" "), Some(220));
    assert!(!tok.is_special(2999));
}

#[test]
fn long_text_is_fast_enough() {
    // About 100k tokens of mixed text; a quadratic merge or a per-call
    // rebuild would make this take far longer than the limit below.
    let tok = tokenizer();
    let exp = expected();
    let mut text = String::new();
    for (_, case) in cases(&exp, "encode_cases") {
        let t = case["text"].as_str().unwrap();
        if t.len() < 1000 {
            text.push_str(t);
        }
    }
    let unit = text.clone();
    while text.len() < 400_000 {
        text.push_str(&unit);
    }
    text.push_str(&"x".repeat(30_000));
    let start = std::time::Instant::now();
    let ids = tok.encode(&text, true);
    let elapsed = start.elapsed();
    assert!(ids.len() > 100_000, "only {} tokens", ids.len());
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert!(elapsed.as_secs_f64() < 20.0, "encoding took {elapsed:?}");
}

#[test]
fn tokenizer_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<kl_tokenizer::Tokenizer>();
    assert_send_sync::<kl_tokenizer::StreamDecoder>();
}
