//! Streaming safetensors writer: plans the shards from the specs, writes each header, then pulls
//! every tensor's bytes from a callback in pieces, so memory use does not grow with the model.
//!
//! Layout decisions (all deterministic, so identical input gives identical bytes):
//! - shards are filled greedily in the given order, a tensor is never split, and a shard holds at
//!   least one tensor even if that tensor alone exceeds `max_shard_bytes`;
//! - within a shard, tensors are laid out by decreasing element size (stable otherwise), and the
//!   header is padded with spaces so the data section starts at a multiple of 8 bytes; together
//!   these make every tensor aligned to its element size, so a reader can view it in place;
//! - one shard is `model.safetensors`; several are `model-00001-of-0000N.safetensors` plus
//!   `model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`), as HF writes.
//!
//! Each file is written under a `.partial` name and renamed when complete.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::WeightsError;
use crate::inventory::TensorSpec;

/// The callback contract of [`write_checkpoint`]: called once per tensor, in file order, with a
/// sink that accepts the tensor's little-endian bytes in pieces of any size. It must emit exactly
/// [`TensorSpec::nbytes`] bytes.
pub type Sink<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

/// Name of shard `i` (0-based) of `n`, HF style.
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Greedy shard plan: indices into `specs`, grouped by shard, in the given order.
fn plan(specs: &[TensorSpec], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let last = shards.last_mut().expect("never empty");
        if !last.is_empty() && used + s.nbytes() > max_shard_bytes {
            shards.push(vec![i]);
            used = s.nbytes();
        } else {
            last.push(i);
            used += s.nbytes();
        }
    }
    shards
}

/// The header of one shard, padded so that `8 + header.len()` is a multiple of 8.
fn header(specs: &[&TensorSpec], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).expect("string map"),
    );
    let mut offset = 0u64;
    for s in specs {
        let end = offset + s.nbytes();
        map.insert(
            s.name.clone(),
            serde_json::json!({ "dtype": s.dtype.as_str(), "shape": s.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&map).expect("JSON map");
    while !(8 + bytes.len()).is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Write `specs` as a (possibly sharded) safetensors checkpoint into `dir`, pulling bytes from
/// `fill`. Returns the files written (shards, then the index if any).
///
/// `metadata` goes into every header's `__metadata__` (with `"format": "pt"` added when absent).
/// A stale `model.safetensors.index.json` is removed when a single file is written, so that
/// [`crate::Checkpoint::open`] reads the new file. Errors name the file and tensor: duplicate or
/// reserved names, I/O failures, and a `fill` that emits too many or too few bytes.
pub fn write_checkpoint(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    metadata: Option<BTreeMap<String, String>>,
    mut fill: impl FnMut(&TensorSpec, &mut Sink<'_>) -> io::Result<()>,
) -> Result<Vec<PathBuf>, WeightsError> {
    let mut seen = HashSet::new();
    for s in specs {
        if s.name.is_empty() || s.name == "__metadata__" || !seen.insert(s.name.as_str()) {
            return Err(WeightsError::Write {
                path: dir.to_path_buf(),
                message: format!("tensor name `{}` is empty, reserved or given twice", s.name),
            });
        }
    }
    let mut metadata = metadata.unwrap_or_default();
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    fs::create_dir_all(dir).map_err(|e| WeightsError::io(dir, e))?;

    let shards = plan(specs, max_shard_bytes);
    let n = shards.len();
    let mut written = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    for (i, members) in shards.iter().enumerate() {
        let name = shard_file_name(i, n);
        let path = dir.join(&name);
        let mut layout: Vec<&TensorSpec> = members.iter().map(|&j| &specs[j]).collect();
        layout.sort_by_key(|s| std::cmp::Reverse(s.dtype.size()));
        for s in &layout {
            weight_map.insert(s.name.clone(), name.clone());
        }
        write_shard(&path, &layout, &metadata, &mut fill)?;
        written.push(path);
    }

    let index = dir.join(INDEX_FILE);
    if n > 1 {
        let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
        let json =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let mut text = serde_json::to_string_pretty(&json).expect("JSON");
        text.push('\n');
        write_atomically(&index, |w| w.write_all(text.as_bytes()))?;
        written.push(index);
    } else if index.exists() {
        fs::remove_file(&index).map_err(|e| WeightsError::io(&index, e))?;
    }
    Ok(written)
}

/// Error raised inside the sink when a fill callback overruns its tensor.
#[derive(Debug)]
struct Overrun(String);
impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Overrun {}

fn write_shard(
    path: &Path,
    layout: &[&TensorSpec],
    metadata: &BTreeMap<String, String>,
    fill: &mut impl FnMut(&TensorSpec, &mut Sink<'_>) -> io::Result<()>,
) -> Result<(), WeightsError> {
    let head = header(layout, metadata);
    let mut failure: Option<WeightsError> = None;
    let io_result = write_atomically(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for spec in layout {
            let expected = spec.nbytes();
            let mut count = 0u64;
            let mut sink = |piece: &[u8]| -> io::Result<()> {
                count += piece.len() as u64;
                if count > expected {
                    return Err(io::Error::other(Overrun(format!(
                        "fill emitted more than the {expected} bytes of dtype {} shape {:?}",
                        spec.dtype, spec.shape
                    ))));
                }
                w.write_all(piece)
            };
            let res = fill(spec, &mut sink);
            let message = match res {
                Err(e) => Some(e.to_string()),
                Ok(()) if count != expected => Some(format!(
                    "fill emitted {count} bytes, but dtype {} shape {:?} needs {expected}",
                    spec.dtype, spec.shape
                )),
                Ok(()) => None,
            };
            if let Some(message) = message {
                failure = Some(WeightsError::Write {
                    path: path.to_path_buf(),
                    message: format!("tensor `{}`: {message}", spec.name),
                });
                return Err(io::Error::other("fill failed"));
            }
        }
        Ok(())
    });
    match (failure, io_result) {
        (Some(f), _) => Err(f),
        (None, r) => r,
    }
}

/// Write `path` through a buffered `.partial` file, renamed into place on success and removed on
/// failure.
fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<(), WeightsError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = File::create(&partial).map_err(|e| WeightsError::io(&partial, e))?;
    let mut w = BufWriter::with_capacity(4 << 20, file);
    let result = body(&mut w).and_then(|()| w.flush());
    drop(w);
    match result {
        Ok(()) => fs::rename(&partial, path).map_err(|e| WeightsError::io(path, e)),
        Err(e) => {
            let _ = fs::remove_file(&partial);
            Err(WeightsError::io(path, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Dtype;

    fn spec(name: &str, n: usize, dtype: Dtype) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: vec![n],
            dtype,
        }
    }

    #[test]
    fn greedy_plan_never_splits() {
        let specs = [
            spec("a", 10, Dtype::F32),
            spec("b", 10, Dtype::F32),
            spec("c", 100, Dtype::F32),
            spec("d", 1, Dtype::BF16),
        ];
        assert_eq!(plan(&specs, 80), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan(&specs, u64::MAX), vec![vec![0, 1, 2, 3]]);
        assert_eq!(plan(&specs, 0), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn header_is_padded_to_8() {
        let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        for n in 1..20 {
            let s = spec(&"x".repeat(n), 3, Dtype::BF16);
            assert_eq!(header(&[&s], &md).len() % 8, 0);
        }
    }

    #[test]
    fn names() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 20), "model-00002-of-00020.safetensors");
    }
}
