//! The session sidecar written next to a state snapshot.
//!
//! `kl_model::snapshot` stores the sequence state bit for bit; a session also needs the ids that
//! state has consumed and the logits of the last one (to sample the next token without feeding
//! anything). They go to `FILE.session`: the magic `KLSESS01`, a little-endian `u64` header length,
//! a JSON header `{"format", "vocab_size", "history", "logits", "meta"}` and, when `logits` is
//! true, `vocab_size` little-endian f32 values.

use crate::{EngineError, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Appended to the snapshot path to name the sidecar.
pub const SIDECAR_SUFFIX: &str = ".session";

const MAGIC: &[u8; 8] = b"KLSESS01";

/// The sidecar's path for a snapshot path.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(SIDECAR_SUFFIX);
    PathBuf::from(s)
}

fn err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::SessionFile {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// What a sidecar holds.
pub(crate) struct Sidecar {
    pub history: Vec<u32>,
    pub logits: Option<Vec<f32>>,
    pub meta: Value,
}

pub(crate) fn write_sidecar(
    path: &Path,
    vocab: usize,
    history: &[u32],
    logits: Option<&[f32]>,
    meta: Value,
) -> Result<()> {
    let side = sidecar_path(path);
    let header = json!({
        "format": "kl-session/1",
        "vocab_size": vocab,
        "history": history,
        "logits": logits.is_some(),
        "meta": meta,
    });
    let h = serde_json::to_vec(&header).expect("JSON header");
    let mut bytes = Vec::with_capacity(16 + h.len() + 4 * vocab);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(h.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&h);
    for x in logits.unwrap_or(&[]) {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&side, bytes).map_err(|e| err(&side, format!("cannot write: {e}")))
}

pub(crate) fn read_sidecar(path: &Path, vocab: usize) -> Result<Sidecar> {
    let side = sidecar_path(path);
    let bytes = std::fs::read(&side).map_err(|e| {
        err(
            &side,
            format!(
                "cannot read the session history saved beside {}: {e}",
                path.display()
            ),
        )
    })?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(err(&side, "not a kimi-linear session file (bad magic)"));
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(16))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| err(&side, "truncated header"))?;
    let header: Value = serde_json::from_slice(&bytes[16..end])
        .map_err(|e| err(&side, format!("bad header: {e}")))?;
    if header["format"] != "kl-session/1" {
        return Err(err(&side, format!("unknown format {}", header["format"])));
    }
    if header["vocab_size"].as_u64() != Some(vocab as u64) {
        return Err(err(
            &side,
            format!(
                "made for a model with vocab_size {}, this one has {vocab}",
                header["vocab_size"]
            ),
        ));
    }
    let history = header["history"]
        .as_array()
        .ok_or_else(|| err(&side, "header lacks history"))?
        .iter()
        .map(|v| {
            v.as_u64()
                .filter(|&id| id < vocab as u64)
                .map(|id| id as u32)
                .ok_or_else(|| err(&side, format!("bad id {v} in history")))
        })
        .collect::<Result<Vec<u32>>>()?;
    let payload = &bytes[end..];
    let logits = if header["logits"].as_bool() == Some(true) {
        if payload.len() != 4 * vocab {
            return Err(err(
                &side,
                format!("{} bytes of logits, expected {}", payload.len(), 4 * vocab),
            ));
        }
        Some(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        )
    } else if payload.is_empty() {
        None
    } else {
        return Err(err(&side, "trailing bytes after the header"));
    };
    Ok(Sidecar {
        history,
        logits,
        meta: header["meta"].clone(),
    })
}
