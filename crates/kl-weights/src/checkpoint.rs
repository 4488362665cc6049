//! [`Checkpoint`]: every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped.
//!
//! Layouts accepted, in this order of preference, for a directory `dir`:
//! 1. `dir/model.safetensors.index.json` (HF sharded layout: `{"weight_map": {name: file}}`);
//! 2. `dir/model.safetensors`;
//! 3. exactly one `dir/*.safetensors`.
//!
//! A path to a single `.safetensors` file is accepted too.

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use kl_config::ModelConfig;

use crate::error::{Problem, WeightsError};
use crate::header::read_shard;
use crate::inventory::expected_tensors;
use crate::tensor::Tensor;

/// File name of the HF shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// All tensors of a checkpoint. Each shard is memory-mapped once; tensors borrow from the maps,
/// which stay alive as long as any tensor (or the checkpoint) does.
///
/// The files must not be modified or truncated while the checkpoint is open: like every
/// mmap-based loader, this one cannot protect against another process rewriting them.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: Vec<Tensor>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open the checkpoint in `dir` (or the single file `dir`), parse and check every header.
    ///
    /// Malformed files, unsupported dtypes, duplicate names and index problems are errors here;
    /// whether the tensors fit a config is [`Checkpoint::validate`]'s job.
    pub fn open(dir: &Path) -> Result<Checkpoint, WeightsError> {
        let meta = fs::metadata(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => WeightsError::NotFound {
                path: dir.to_path_buf(),
            },
            _ => WeightsError::io(dir, e),
        })?;
        if meta.is_file() {
            let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            return Self::from_files(parent, vec![dir.to_path_buf()], None);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let (files, weight_map) = read_index(dir, &index)?;
            return Self::from_files(dir.to_path_buf(), files, Some((index, weight_map)));
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(dir.to_path_buf(), vec![single], None);
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| WeightsError::io(dir, e))? {
            let entry = entry.map_err(|e| WeightsError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") && entry.path().is_file() {
                found.push(name);
            }
        }
        found.sort();
        match found.len() {
            0 => Err(WeightsError::NoSafetensors {
                dir: dir.to_path_buf(),
            }),
            1 => Self::from_files(dir.to_path_buf(), vec![dir.join(&found[0])], None),
            _ => Err(WeightsError::AmbiguousFiles {
                dir: dir.to_path_buf(),
                files: found,
            }),
        }
    }

    fn from_files(
        dir: PathBuf,
        files: Vec<PathBuf>,
        index: Option<(PathBuf, Vec<(String, String)>)>,
    ) -> Result<Checkpoint, WeightsError> {
        let mut tensors: Vec<Tensor> = Vec::new();
        let mut by_name = HashMap::new();
        for file in &files {
            for t in read_shard(file)? {
                if let Some(&prev) = by_name.get(t.name()) {
                    let prev: &Tensor = &tensors[prev];
                    return Err(WeightsError::Duplicate {
                        tensor: t.name().to_string(),
                        first: prev.file().to_path_buf(),
                        second: file.clone(),
                    });
                }
                by_name.insert(t.name().to_string(), tensors.len());
                tensors.push(t);
            }
        }
        if let Some((index, weight_map)) = index {
            for (name, shard) in weight_map {
                let ok = by_name
                    .get(&name)
                    .is_some_and(|&i| tensors[i].file() == dir.join(&shard));
                if !ok {
                    return Err(WeightsError::Index {
                        path: index,
                        message: format!(
                            "weight_map places tensor `{name}` in {}, but that file does not contain it",
                            dir.join(&shard).display()
                        ),
                    });
                }
            }
        }
        Ok(Checkpoint {
            dir,
            files,
            tensors,
            by_name,
        })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor, WeightsError> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| WeightsError::TensorNotFound {
                tensor: name.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// The tensor called `name`, which must have shape `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor, WeightsError> {
        let t = self.get(name)?;
        if t.shape() != shape {
            return Err(WeightsError::ShapeMismatch {
                tensor: name.to_string(),
                path: t.file().to_path_buf(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Tensor names, file by file, in data-offset order within each file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(Tensor::name)
    }

    /// Tensors in the order of [`Checkpoint::names`].
    pub fn iter(&self) -> impl Iterator<Item = &Tensor> {
        self.tensors.iter()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Sum of the tensors' stored bytes (headers excluded).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes().len() as u64).sum()
    }

    /// Check the checkpoint against the inventory `cfg` implies ([`expected_tensors`]). Returns one
    /// [`WeightsError::Validation`] listing every missing, unexpected and wrong-shaped tensor.
    ///
    /// With `tie_word_embeddings`, an `lm_head.weight` is not required but is accepted when
    /// present with shape `[vocab, hidden]`. Dtypes are not constrained: any supported dtype is
    /// accepted for any tensor, and consumers read each tensor in its stored dtype.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), WeightsError> {
        let specs = expected_tensors(cfg);
        let mut problems = Vec::new();
        let mut expected: HashMap<&str, &[usize]> = specs
            .iter()
            .map(|s| (s.name.as_str(), &s.shape[..]))
            .collect();
        let tied_head = [cfg.vocab_size, cfg.hidden];
        if cfg.tie_word_embeddings {
            expected.insert("lm_head.weight", &tied_head);
        }
        for s in &specs {
            match self.by_name.get(&s.name) {
                None => problems.push(Problem::Missing {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                }),
                Some(&i) => self.check_shape(&self.tensors[i], &s.shape, &mut problems),
            }
        }
        for t in &self.tensors {
            match expected.get(t.name()) {
                None => problems.push(Problem::Unexpected {
                    name: t.name().to_string(),
                    found: t.shape().to_vec(),
                    file: t.file().to_path_buf(),
                }),
                Some(_) if cfg.tie_word_embeddings && t.name() == "lm_head.weight" => {
                    self.check_shape(t, &tied_head, &mut problems)
                }
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Validation {
                dir: self.dir.clone(),
                problems,
            })
        }
    }

    fn check_shape(&self, t: &Tensor, expected: &[usize], problems: &mut Vec<Problem>) {
        if t.shape() != expected {
            problems.push(Problem::Shape {
                name: t.name().to_string(),
                expected: expected.to_vec(),
                found: t.shape().to_vec(),
                file: t.file().to_path_buf(),
            });
        }
    }
}

/// Parse an HF index: the shard paths (first-appearance order) and the `(tensor, shard)` pairs.
#[allow(clippy::type_complexity)]
fn read_index(
    dir: &Path,
    index: &Path,
) -> Result<(Vec<PathBuf>, Vec<(String, String)>), WeightsError> {
    let err = |message: String| WeightsError::Index {
        path: index.to_path_buf(),
        message,
    };
    let text = fs::read_to_string(index).map_err(|e| WeightsError::io(index, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no \"weight_map\" object".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pairs = Vec::with_capacity(map.len());
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            err(format!(
                "weight_map entry for tensor `{name}` is not a file name: {shard}"
            ))
        })?;
        let mut comps = Path::new(shard).components();
        if !matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(err(format!(
                "weight_map places tensor `{name}` in `{shard}`, which is not a plain file name in {}",
                dir.display()
            )));
        }
        let path = dir.join(shard);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(WeightsError::MissingShard {
                    index: index.to_path_buf(),
                    shard: path,
                    tensor: name.clone(),
                });
            }
            files.push(path);
        }
        pairs.push((name.clone(), shard.to_string()));
    }
    files.sort();
    Ok((files, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_and_tensors_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checkpoint>();
        assert_send_sync::<Tensor>();
    }
}
