//! `resolve_model` on a fake Hugging Face cache tree.

use std::path::{Path, PathBuf};

use kl_tokenizer::{resolve_model_in, ResolveError};

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("kl-hf-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

#[test]
fn existing_directory_is_returned() {
    let dir = temp_dir("plain");
    let spec = dir.to_str().unwrap();
    assert_eq!(resolve_model_in(spec, &[]).unwrap(), dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refs_main_snapshot_is_preferred() {
    let root = temp_dir("refs");
    let repo = root.join("models--moonshotai--Kimi-Linear-48B-A3B-Instruct");
    let a = mkdir(&repo.join("snapshots/aaaa"));
    let _b = mkdir(&repo.join("snapshots/bbbb"));
    mkdir(&repo.join("refs"));
    std::fs::write(repo.join("refs/main"), "aaaa\n").unwrap();
    let other = temp_dir("other-root");
    let got = resolve_model_in(
        "moonshotai/Kimi-Linear-48B-A3B-Instruct",
        &[other.clone(), root.clone()],
    )
    .unwrap();
    assert_eq!(got, a);
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}

#[test]
fn single_or_newest_snapshot_without_refs() {
    let root = temp_dir("norefs");
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
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn absent_model_says_where_it_looked_and_how_to_download() {
    let root = temp_dir("absent");
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
    std::fs::remove_dir_all(&root).unwrap();

    let err = resolve_model_in("not a model", &[]).unwrap_err();
    assert!(matches!(err, ResolveError::NotAModel { .. }), "{err}");
}
