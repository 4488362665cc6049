//! Reading token-id files.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Read a JSON array of token ids, checking each is in `0..vocab`.
pub fn read_ids(path: &Path, vocab: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read ids file {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "ids file {} is not JSON (expected an array of token ids)",
            path.display()
        )
    })?;
    let Some(arr) = value.as_array() else {
        bail!(
            "ids file {}: expected a JSON array of token ids, found {}",
            path.display(),
            kl_tokenizer::json_kind(&value)
        );
    };
    if arr.is_empty() {
        bail!(
            "ids file {} is an empty array: at least one token id is required",
            path.display()
        );
    }
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            let id = v
                .as_i64()
                .with_context(|| format!("ids file {}: element {i} is {v}, expected an integer token id", path.display()))?;
            if id < 0 || id as u64 >= vocab as u64 {
                bail!("ids file {}: token id {id} at position {i} is out of range 0..{vocab} (vocab_size)", path.display());
            }
            Ok(id as u32)
        })
        .collect()
}
