//! `resolve_model` on a fake Hugging Face cache tree.

use std::path::{Path, PathBuf};

use kl_tokenizer::{resolve_model_in, ResolveError};

/// A fresh, empty directory `kl-hf-<tag>-*` under the system temp dir, removed when the guard
/// drops (also when the test panics).
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kl-hf-{tag}-"))
        .tempdir()
        .unwrap()
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

#[test]
fn existing_directory_is_returned() {
    let dir_guard = temp_dir("plain");
    let dir = dir_guard.path().to_path_buf();
    let spec = dir.to_str().unwrap();
    assert_eq!(resolve_model_in(spec, &[]).unwrap(), dir);
}

#[test]
fn refs_main_snapshot_is_preferred() {
    let root_guard = temp_dir("refs");
    let root = root_guard.path().to_path_buf();
    let repo = root.join("models--moonshotai--Kimi-Linear-48B-A3B-Instruct");
    let a = mkdir(&repo.join("snapshots/aaaa"));
    let _b = mkdir(&repo.join("snapshots/bbbb"));
    mkdir(&repo.join("refs"));
    std::fs::write(repo.join("refs/main"), "aaaa\n").unwrap();
    let other_guard = temp_dir("other-root");
    let other = other_guard.path().to_path_buf();
    let got = resolve_model_in(
        "moonshotai/Kimi-Linear-48B-A3B-Instruct",
        &[other.clone(), root.clone()],
    )
    .unwrap();
    assert_eq!(got, a);
}

#[test]
fn single_or_newest_snapshot_without_refs() {
    let root_guard = temp_dir("norefs");
    let root = root_guard.path().to_path_buf();
    let repo = root.join("models--o--n");
    let only = mkdir(&repo.join("snapshots/1111"));
    assert_eq!(
        resolve_model_in("o/n", std::slice::from_ref(&root)).unwrap(),
        only
    );

    // A refs/main naming a missing snapshot falls back to the newest one.
    mkdir(&repo.join("refs"));
    std::fs::write(repo.join("refs/main"), "gone").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let newer = mkdir(&repo.join("snapshots/2222"));
    assert_eq!(
        resolve_model_in("o/n", std::slice::from_ref(&root)).unwrap(),
        newer
    );
}

#[test]
fn absent_model_says_where_it_looked_and_how_to_download() {
    let root_guard = temp_dir("absent");
    let root = root_guard.path().to_path_buf();
    let err = resolve_model_in("owner/name", std::slice::from_ref(&root)).unwrap_err();
    assert!(matches!(err, ResolveError::NotCached { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&root.join("models--owner--name").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("huggingface-cli download owner/name"), "{msg}");

    mkdir(&root.join("models--owner--name"));
    let err = resolve_model_in("owner/name", std::slice::from_ref(&root)).unwrap_err();
    assert!(matches!(err, ResolveError::NoSnapshot { .. }), "{err}");

    let err = resolve_model_in("not a model", &[]).unwrap_err();
    assert!(matches!(err, ResolveError::NotAModel { .. }), "{err}");
}
