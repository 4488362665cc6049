//! Loading errors: each names the file, line, field or id at fault.

mod common;

use common::{fixture_dir, read_fixture};
use kl_tokenizer::{Tokenizer, TokenizerError};

/// A fresh, empty directory `kl-tok-<tag>-*` under the system temp dir, removed when the
/// guard drops (also when the test panics).
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kl-tok-{tag}-"))
        .tempdir()
        .unwrap()
}

fn config() -> String {
    read_fixture("tokenizer_config.json")
}

fn model() -> String {
    read_fixture("tiktoken.model")
}

fn load_err(model: &str) -> String {
    match Tokenizer::from_parts(model, &config(), None) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_files_name_the_path() {
    let tmp = temp_dir("missing");
    let dir = tmp.path();
    let err = Tokenizer::from_dir(dir).unwrap_err();
    let want = dir.join("tiktoken.model");
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if *path == want),
        "{err}"
    );
    assert!(
        err.to_string().contains(&want.display().to_string()),
        "{err}"
    );

    std::fs::write(dir.join("tiktoken.model"), model()).unwrap();
    let err = Tokenizer::from_dir(dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");

    // With both files and no template, it loads and has no chat template.
    std::fs::write(dir.join("tokenizer_config.json"), config()).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    assert!(tok.chat_template().is_none());

    assert!(Tokenizer::from_dir(&fixture_dir().join("no-such-dir")).is_err());
}

#[test]
fn bad_base64_names_file_and_line() {
    let mut text = model();
    text.push_str("@@notbase64@@ 3000\n");
    let line = text.lines().count();
    let err = load_err(&text);
    assert!(err.contains(&format!("tiktoken.model:{line}")), "{err}");
    assert!(err.contains("base64"), "{err}");
}

#[test]
fn malformed_lines_name_the_line() {
    let err = load_err("IQ== 0\nIg==\n");
    assert!(err.contains("tiktoken.model:2"), "{err}");
    let err = load_err("IQ== 0\nIg== x\n");
    assert!(
        err.contains("tiktoken.model:2") && err.contains("\"x\""),
        "{err}"
    );
    let err = load_err("IQ== 0 7\n");
    assert!(err.contains("tiktoken.model:1"), "{err}");
    let err = load_err("");
    assert!(err.contains("no tokens"), "{err}");
}

#[test]
fn duplicates_and_gaps_are_errors() {
    let mut text = model();
    text.push_str("QUJD 5\n");
    let err = load_err(&text);
    assert!(err.contains("duplicate rank 5"), "{err}");

    let mut text = model();
    text.push_str("IQ== 3000\n");
    let err = load_err(&text);
    assert!(err.contains("duplicate token"), "{err}");

    let mut text = model();
    text.push_str("QUJDREVGR0g= 3500\n");
    let err = load_err(&text);
    assert!(err.contains("rank 3500"), "{err}");

    // Drop the line of rank 0 ("!"): byte 0x21 then has no token.
    let text: String = model()
        .lines()
        .filter(|l| !l.ends_with(" 0"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = load_err(&text);
    assert!(err.contains("0x21"), "{err}");
}

#[test]
fn blank_lines_and_crlf_are_accepted() {
    let text = model().replace('\n', "\r\n") + "\r\n\r\n";
    let tok = Tokenizer::from_parts(&text, &config(), None).unwrap();
    assert_eq!(tok.num_base_tokens(), 3000);
}

#[test]
fn config_errors_name_the_field() {
    let err = Tokenizer::from_parts(&model(), "{not json", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("JSON"),
        "{err}"
    );
    let err = Tokenizer::from_parts(&model(), "[]", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
    let bad = r#"{"added_tokens_decoder": {"3000": {"content": 1}}}"#;
    let err = Tokenizer::from_parts(&model(), bad, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("added_tokens_decoder.3000.content"), "{err}");
    let bad =
        r#"{"added_tokens_decoder": {"3000": {"content": "[X]"}, "3001": {"content": "[X]"}}}"#;
    let err = Tokenizer::from_parts(&model(), bad, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[X]"), "{err}");
    // A config without added_tokens_decoder: all special ids are reserved names.
    let tok = Tokenizer::from_parts(&model(), "{}", None).unwrap();
    assert_eq!(tok.token_id("<|reserved_token_3000|>"), Some(3000));
    assert!(tok.eos_ids().is_empty());
}

#[test]
fn works_for_a_different_vocabulary_size() {
    // Only the 256 byte tokens, in reverse order: specials start at 256.
    use std::fmt::Write as _;
    let mut text = String::new();
    for (rank, byte) in (0..=255u8).rev().enumerate() {
        let b64 = base64_one(byte);
        writeln!(text, "{b64} {rank}").unwrap();
    }
    let cfg = r#"{"added_tokens_decoder": {"258": {"content": "<|im_end|>"}}, "eos_token": "<|im_end|>"}"#;
    let tok = Tokenizer::from_parts(&text, cfg, None).unwrap();
    assert_eq!(tok.n_vocab(), 256 + 258);
    assert_eq!(tok.eos_ids(), vec![258]);
    let ids = tok.encode("Hi<|im_end|>", true);
    assert_eq!(ids, vec![255 - u32::from(b'H'), 255 - u32::from(b'i'), 258]);
    assert_eq!(tok.decode(&ids).unwrap(), "Hi<|im_end|>");
    assert_eq!(tok.encode("<|im_end|>", false).len(), 10);
}

/// Standard base64 of one byte.
fn base64_one(b: u8) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let c0 = A[usize::from(b >> 2)] as char;
    let c1 = A[usize::from((b & 3) << 4)] as char;
    format!("{c0}{c1}==")
}
