//! Shared helpers: golden file access and comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// [`kl_testkit::build_dir_fixture`] under this test binary's `CARGO_TARGET_TMPDIR`.
pub fn build_dir_fixture(name: &str, fill: impl FnOnce(&Path)) -> PathBuf {
    kl_testkit::build_dir_fixture(Path::new(env!("CARGO_TARGET_TMPDIR")), name, fill)
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

/// Every tensor of a safetensors file as (shape, f32 values); i64 tensors converted to f32.
pub fn load_golden(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let path = shared().join("golden").join(name);
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("golden file {} is required: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parses");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let data: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("unexpected golden dtype {other:?} for {n}"),
            };
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: {} values, golden has {}",
        got.len(),
        want.len()
    );
    let d = max_abs_diff(got, want);
    assert!(
        d <= tol,
        "{name}: max abs diff {d:e} > {tol:e} (first values got {:?} want {:?})",
        &got[..got.len().min(4)],
        &want[..want.len().min(4)]
    );
}

/// `max|got − want| ≤ tol · max(1, max|want|)`: for logits of synthetic models whose scale is
/// far from the reference's O(1) (f32 reassociation error grows with the magnitude).
pub fn assert_close_rel(name: &str, got: &[f32], want: &[f32], tol: f32) {
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    assert_close(name, got, want, tol * scale);
}

pub struct Rng(pub u64);
impl Rng {
    pub fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as u32
    }
}
