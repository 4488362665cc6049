//! Test support shared by the workspace's integration tests.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

/// A fixture directory shared by all tests of a binary (held in a `static`, so never dropped):
/// it lives under `root` — pass Cargo's `CARGO_TARGET_TMPDIR` (inside `target/`) — and is reused across runs
/// instead of piling up in the system temp dir. `fill` writes the files afresh on every call
/// into a scratch directory next to it; each file then replaces its namesake by an atomic rename,
/// so a concurrent run reading the same fixture never sees a half-written file, and files that
/// `fill` no longer writes are removed.
pub fn build_dir_fixture(root: &Path, name: &str, fill: impl FnOnce(&Path)) -> PathBuf {
    let dest = root.join(name);
    std::fs::create_dir_all(&dest).unwrap();
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{name}-tmp-"))
        .tempdir_in(root)
        .unwrap();
    fill(scratch.path());
    let fresh: std::collections::BTreeSet<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for e in std::fs::read_dir(&dest).unwrap() {
        let e = e.unwrap();
        if !fresh.contains(&e.file_name()) {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    for f in &fresh {
        let to = dest.join(f);
        if to.is_dir() {
            std::fs::remove_dir_all(&to).unwrap();
        }
        std::fs::rename(scratch.path().join(f), to).unwrap();
    }
    dest
}
