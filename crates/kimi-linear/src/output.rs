//! A safetensors result file written as the data is computed.
//!
//! The header (names, dtypes, shapes, offsets) is fixed up front; tensors are then streamed in
//! the declared order, so `forward` never holds all `[T, vocab]` logits in memory.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One declared tensor.
pub struct Decl {
    /// Tensor name.
    pub name: String,
    /// `F32` or `I64`.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Decl {
    fn bytes(&self) -> u64 {
        let el = if self.dtype == "I64" { 8 } else { 4 };
        el * self.shape.iter().product::<usize>() as u64
    }
}

/// Streams tensors into a safetensors file in declaration order.
pub struct OutputFile {
    path: PathBuf,
    w: BufWriter<File>,
    remaining: Vec<u64>,
    current: usize,
}

impl OutputFile {
    /// Create `path` and write the header for `decls`.
    pub fn create(path: &Path, decls: &[Decl]) -> Result<Self> {
        let mut map = serde_json::Map::new();
        map.insert(
            "__metadata__".into(),
            serde_json::json!({"format": "pt", "producer": "kimi-linear"}),
        );
        let mut off = 0u64;
        for d in decls {
            map.insert(d.name.clone(), serde_json::json!({"dtype": d.dtype, "shape": d.shape, "data_offsets": [off, off + d.bytes()]}));
            off += d.bytes();
        }
        let mut header = serde_json::to_vec(&map)?;
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let f = File::create(path)
            .with_context(|| format!("cannot create output file {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            w,
            remaining: decls.iter().map(Decl::bytes).collect(),
            current: 0,
        })
    }

    fn take(&mut self, n: u64) -> Result<()> {
        while self.current < self.remaining.len() && self.remaining[self.current] == 0 {
            self.current += 1;
        }
        if self.current == self.remaining.len() || self.remaining[self.current] < n {
            bail!(
                "internal: more data than declared for {}",
                self.path.display()
            );
        }
        self.remaining[self.current] -= n;
        Ok(())
    }

    /// Append f32 values to the current tensor.
    pub fn f32s(&mut self, v: &[f32]) -> Result<()> {
        self.take(4 * v.len() as u64)?;
        for x in v {
            self.w.write_all(&x.to_le_bytes())?;
        }
        Ok(())
    }

    /// Append i64 values to the current tensor.
    pub fn i64s(&mut self, v: &[i64]) -> Result<()> {
        self.take(8 * v.len() as u64)?;
        for x in v {
            self.w.write_all(&x.to_le_bytes())?;
        }
        Ok(())
    }

    /// Flush and check every declared byte was written.
    pub fn finish(mut self) -> Result<()> {
        if self.remaining.iter().any(|&r| r != 0) {
            bail!("internal: output {} is incomplete", self.path.display());
        }
        self.w
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}
