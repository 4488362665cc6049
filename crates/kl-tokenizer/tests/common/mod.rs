//! Shared helpers: locating and loading the golden fixtures.
//!
//! A missing fixture is a test failure, never a skip.

#![allow(dead_code)]

use std::path::PathBuf;

use kl_tokenizer::Tokenizer;
use serde_json::Value;

/// `/work/shared/golden/tokenizer`, relative to this crate.
pub fn fixture_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/tokenizer");
    assert!(
        dir.is_dir(),
        "tokenizer fixture directory {} is missing",
        dir.display()
    );
    dir
}

/// Reads a fixture file as text, panicking with its path if absent.
pub fn read_fixture(name: &str) -> String {
    let path = fixture_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} cannot be read: {e}", path.display()))
}

/// `expected.json`.
pub fn expected() -> Value {
    serde_json::from_str(&read_fixture("expected.json")).expect("expected.json is not valid JSON")
}

/// The fixture tokenizer, loaded through `from_dir`.
pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixture_dir()).unwrap_or_else(|e| panic!("loading fixture tokenizer: {e}"))
}

/// A JSON array of ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids must be an array")
        .iter()
        .map(|x| x.as_u64().expect("id must be an integer") as u32)
        .collect()
}

/// Decodes lowercase hex.
pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() & 1 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("bad hex"))
        .collect()
}

/// The cases of one kind (`encode_cases`, ...), each with a name.
pub fn cases<'a>(expected: &'a Value, kind: &str) -> Vec<(&'a str, &'a Value)> {
    let list = expected[kind]
        .as_array()
        .unwrap_or_else(|| panic!("expected.json has no `{kind}` array"));
    assert!(!list.is_empty(), "expected.json `{kind}` is empty");
    list.iter()
        .map(|c| (c["name"].as_str().expect("case without name"), c))
        .collect()
}
