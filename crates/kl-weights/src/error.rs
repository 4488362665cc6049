//! [`WeightsError`]: every way a checkpoint can be unreadable, inconsistent or wrong for a config.
//!
//! Each variant carries the file it is about and, where one is involved, the tensor name, so that a
//! message printed by the CLI is enough to find the fault without a debugger.

use std::fmt;
use std::path::PathBuf;

/// One disagreement between a checkpoint and the tensor inventory of a config (see
/// [`crate::Checkpoint::validate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The config needs this tensor but no file holds it.
    Missing {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A file holds a tensor the config does not use.
    Unexpected {
        /// Tensor name.
        name: String,
        /// Shape found in the file.
        found: Vec<usize>,
        /// The file that holds it.
        file: PathBuf,
    },
    /// The tensor exists but its shape differs from the one the config implies.
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
        /// The file that holds it.
        file: PathBuf,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { name, expected } => {
                write!(f, "missing     {name}: expected shape {expected:?}")
            }
            Problem::Unexpected { name, found, file } => {
                write!(
                    f,
                    "unexpected  {name}: shape {found:?} in {}",
                    file.display()
                )
            }
            Problem::Shape {
                name,
                expected,
                found,
                file,
            } => write!(
                f,
                "wrong shape {name}: expected {expected:?}, found {found:?} in {}",
                file.display()
            ),
        }
    }
}

/// Formats the problem list of [`WeightsError::Validation`].
fn list(problems: &[Problem]) -> String {
    let count = |pred: fn(&Problem) -> bool| problems.iter().filter(|p| pred(p)).count();
    let mut s = format!(
        "{} missing, {} unexpected, {} wrong-shaped tensor(s):",
        count(|p| matches!(p, Problem::Missing { .. })),
        count(|p| matches!(p, Problem::Unexpected { .. })),
        count(|p| matches!(p, Problem::Shape { .. })),
    );
    for p in problems {
        s.push_str("\n  ");
        s.push_str(&p.to_string());
    }
    s
}

/// Why a checkpoint could not be read, written or matched against a config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The checkpoint path does not exist.
    #[error("checkpoint path {path} does not exist")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The directory holds no `*.safetensors` file and no index.
    #[error("no model.safetensors.index.json and no *.safetensors file in {dir}")]
    NoSafetensors {
        /// The directory searched.
        dir: PathBuf,
    },
    /// Several `*.safetensors` files but no index saying which belong to the model.
    #[error(
        "{dir} holds {} *.safetensors files ({}) but no model.safetensors.index.json or model.safetensors; \
         cannot tell which is the model",
        files.len(), files.join(", ")
    )]
    AmbiguousFiles {
        /// The directory searched.
        dir: PathBuf,
        /// The candidate file names.
        files: Vec<String>,
    },
    /// `model.safetensors.index.json` is unreadable or malformed.
    #[error("invalid index {path}: {message}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The index names a shard file that does not exist.
    #[error("index {index} maps tensor `{tensor}` to shard {shard}, which does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The absent shard path.
        shard: PathBuf,
        /// One tensor the index places in that shard.
        tensor: String,
    },
    /// A safetensors file is malformed before any single tensor is concerned (size, header).
    #[error("invalid safetensors file {path}: {message}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One tensor's header entry is malformed or inconsistent with the file.
    #[error("invalid tensor `{tensor}` in {path}: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor is stored in a dtype this engine does not read.
    #[error("tensor `{tensor}` in {path} has dtype {dtype}; supported: BF16, F16, F32")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string found in the header.
        dtype: String,
    },
    /// The same tensor name appears in two files.
    #[error("tensor `{tensor}` appears in both {first} and {second}")]
    Duplicate {
        /// The tensor name.
        tensor: String,
        /// The file read first.
        first: PathBuf,
        /// The file read second.
        second: PathBuf,
    },
    /// [`crate::Checkpoint::get`] asked for a name the checkpoint lacks.
    #[error("tensor `{tensor}` not found in checkpoint {dir}")]
    TensorNotFound {
        /// The tensor name.
        tensor: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor asked for with a shape has another shape.
    #[error("tensor `{tensor}` in {path}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor name.
        tensor: String,
        /// The file that holds it.
        path: PathBuf,
        /// The requested shape.
        expected: Vec<usize>,
        /// The stored shape.
        found: Vec<usize>,
    },
    /// The checkpoint does not match the config; every problem is listed.
    #[error("checkpoint {dir} does not match the config: {}", list(problems))]
    Validation {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Every missing, unexpected and wrong-shaped tensor.
        problems: Vec<Problem>,
    },
    /// The writer was given inconsistent input, or a fill callback wrote the wrong number of bytes.
    #[error("writing {path}: {message}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A configuration cannot be used to synthesize a checkpoint.
    #[error("config field `{field}` = {value}: {message}")]
    Synth {
        /// The config field at fault.
        field: String,
        /// Its value.
        value: String,
        /// What is required.
        message: String,
    },
    /// The configuration itself is invalid.
    #[error(transparent)]
    Config(#[from] kl_config::ConfigError),
}

impl WeightsError {
    /// Shorthand for [`WeightsError::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.into(),
            source,
        }
    }
}
