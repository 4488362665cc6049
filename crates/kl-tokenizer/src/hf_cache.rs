//! Finding a model directory: a path, or a repo id in the local Hugging Face cache.
//!
//! [`resolve_model`] never touches the network. A repo id `owner/name` is
//! looked up in the hub cache that `huggingface_hub` writes:
//!
//! ```text
//! {cache}/models--{owner}--{name}/refs/main          (a commit hash)
//! {cache}/models--{owner}--{name}/snapshots/{hash}/  (the files)
//! ```
//!
//! The cache directory is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

/// Why a model spec could not be resolved to a directory.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The spec is not an existing directory and not of the form `owner/name`.
    #[error(
        "model `{spec}` is neither an existing directory nor a Hugging Face repo id (owner/name)"
    )]
    NotAModel {
        /// The spec as given.
        spec: String,
    },

    /// The repo id is not in any searched cache directory.
    #[error(
        "model `{spec}` is not a local directory and is not in the Hugging Face cache \
         (searched: {}); download it first with `huggingface-cli download {spec}`",
        display_paths(searched)
    )]
    NotCached {
        /// The repo id.
        spec: String,
        /// The repo directories that were looked for.
        searched: Vec<PathBuf>,
    },

    /// The repo is in the cache but has no usable snapshot.
    #[error(
        "model `{spec}` is in the Hugging Face cache at {} but has no snapshot directory; \
         download it again with `huggingface-cli download {spec}`",
        repo_dir.display()
    )]
    NoSnapshot {
        /// The repo id.
        spec: String,
        /// The cache's repo directory (`models--owner--name`).
        repo_dir: PathBuf,
    },

    /// A cache directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The directory or file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no cache directory is configured".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Hugging Face hub cache directory from the environment (see the
/// module docs for the order), or an empty list if not even `$HOME` is set.
pub fn default_cache_roots() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let root = var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")));
    root.into_iter().collect()
}

/// Resolves `spec` to a model directory: an existing directory is returned
/// as is; a repo id `owner/name` is looked up in the local Hugging Face
/// cache ([`default_cache_roots`]) without any network access.
pub fn resolve_model(spec: &str) -> Result<PathBuf, ResolveError> {
    resolve_model_in(spec, &default_cache_roots())
}

/// [`resolve_model`] with explicit hub cache directories, searched in order.
pub fn resolve_model_in(spec: &str, cache_roots: &[PathBuf]) -> Result<PathBuf, ResolveError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some((owner, name)) = parse_repo_id(spec) else {
        return Err(ResolveError::NotAModel {
            spec: spec.to_string(),
        });
    };
    let mut searched = Vec::new();
    for root in cache_roots {
        let repo_dir = root.join(format!("models--{owner}--{name}"));
        if repo_dir.is_dir() {
            return snapshot_of(spec, &repo_dir);
        }
        searched.push(repo_dir);
    }
    Err(ResolveError::NotCached {
        spec: spec.to_string(),
        searched,
    })
}

/// `owner/name` with both parts made of `[A-Za-z0-9._-]`, not `.`/`..`.
fn parse_repo_id(spec: &str) -> Option<(&str, &str)> {
    let (owner, name) = spec.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    (ok(owner) && ok(name)).then_some((owner, name))
}

/// The snapshot named by `refs/main`, else the only or the newest one.
fn snapshot_of(spec: &str, repo_dir: &Path) -> Result<PathBuf, ResolveError> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let hash = hash.trim();
        if !hash.is_empty() && !hash.contains(['/', '\\']) {
            let dir = snapshots.join(hash);
            if dir.is_dir() {
                return Ok(dir);
            }
        }
    }
    let entries = match std::fs::read_dir(&snapshots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ResolveError::NoSnapshot {
                spec: spec.to_string(),
                repo_dir: repo_dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ResolveError::Io {
                path: snapshots,
                source,
            })
        }
    };
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|source| ResolveError::Io {
            path: snapshots.clone(),
            source,
        })?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let mtime = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        // Newest wins; equal times are broken by name for determinism.
        let newer = match &best {
            None => true,
            Some((t, p)) => mtime > *t || (mtime == *t && path > *p),
        };
        if newer {
            best = Some((mtime, path));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| ResolveError::NoSnapshot {
            spec: spec.to_string(),
            repo_dir: repo_dir.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert_eq!(
            parse_repo_id("moonshotai/Kimi-Linear-48B-A3B-Instruct"),
            Some(("moonshotai", "Kimi-Linear-48B-A3B-Instruct"))
        );
        assert_eq!(parse_repo_id("a/b/c"), None);
        assert_eq!(parse_repo_id("/abs"), None);
        assert_eq!(parse_repo_id("../x"), None);
        assert_eq!(parse_repo_id("plain"), None);
    }
}
