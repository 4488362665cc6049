//! Shared helpers for the integration tests: unique temp dirs and hand-built safetensors files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A unique directory `kl-weights-<tag>-*` under the system temp dir, removed (with everything
/// in it) on drop, including when the test panics.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("kl-weights-{tag}-"))
                .tempdir()
                .unwrap(),
        )
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A safetensors file from a literal header and data section.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Write `bytes` to `dir/name` and return the path.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The golden tiny model directory. A missing golden file is a test failure, never a skip.
pub fn golden_tiny() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/kimi_linear_tiny");
    assert!(
        p.join("model.safetensors").is_file(),
        "golden tiny checkpoint is required at {}",
        p.display()
    );
    p
}
