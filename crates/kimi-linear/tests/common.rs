//! Helpers for black-box CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn tiny_dir() -> PathBuf {
    let d = shared().join("golden/kimi_linear_tiny");
    assert!(
        d.join("model.safetensors").is_file(),
        "golden tiny model missing at {}",
        d.display()
    );
    d
}

/// A fresh empty directory under the system temp dir, removed (with everything in it) when
/// dropped, including when the test panics. Derefs to its path.
pub struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A fresh empty directory `kl-cli-<tag>-*` under the system temp dir; keep the guard alive
/// while the directory is used.
pub fn temp_dir(tag: &str) -> TestDir {
    TestDir(
        tempfile::Builder::new()
            .prefix(&format!("kl-cli-{tag}-"))
            .tempdir()
            .unwrap(),
    )
}

/// Copy the tiny model into a fresh directory.
pub fn tiny_copy(tag: &str) -> TestDir {
    let d = temp_dir(tag);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_dir().join(f), d.join(f)).unwrap();
    }
    d
}

/// [`kl_testkit::build_dir_fixture`] under this test binary's `CARGO_TARGET_TMPDIR`.
pub fn build_dir_fixture(name: &str, fill: impl FnOnce(&Path)) -> PathBuf {
    kl_testkit::build_dir_fixture(Path::new(env!("CARGO_TARGET_TMPDIR")), name, fill)
}

pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kimi-linear"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// Run and expect a clean failure (exit 1, no panic) whose stderr contains every `needle`.
pub fn expect_error(args: &[&str], needles: &[&str]) -> String {
    expect_exit(1, args, needles)
}

/// Run and expect a usage error (clap's exit 2, no panic) whose stderr contains every `needle`:
/// what a flag outside its closed set of values gets.
pub fn expect_usage_error(args: &[&str], needles: &[&str]) -> String {
    expect_exit(2, args, needles)
}

/// Run and expect exit status `code`, no panic, and every `needle` in stderr.
fn expect_exit(code: i32, args: &[&str], needles: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code} for {args:?}; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks `{n}`: {err}");
    }
    err
}

/// Split a safetensors file into (header JSON, data).
pub fn read_st(path: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (h.as_object().unwrap().clone(), b[8 + n..].to_vec())
}

pub fn write_st(path: &Path, header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

pub fn write_ids(dir: &Path, ids: &str) -> String {
    let p = dir.join("ids.json");
    std::fs::write(&p, ids).unwrap();
    p.display().to_string()
}

/// Read an output safetensors file: name → (dtype, shape, f64 values).
pub fn read_output(
    path: &Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("output parses as safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            (n, (format!("{:?}", v.dtype()), v.shape().to_vec(), vals))
        })
        .collect()
}
