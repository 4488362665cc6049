//! Deterministic random inputs for kernel tests.
#![allow(dead_code)]

use kl_kernels::kda::KdaShape;
use kl_kernels::norm::l2_normalize_rows;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// `rows` random rows of width `dk`, rounded to bf16 (a latent cache's store).
pub fn bf16_rows(rng: &mut Rng, rows: usize, dk: usize) -> Vec<half::bf16> {
    rng.vec(rows * dk, 1.0)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Random KDA inputs `[q, k, v, g, β, state]`: l2-normalised q (scaled) and k, log-decays from
/// weak to very strong (down to −30 per token, exercising the overflow-safe pairwise exponents).
pub fn kda_inputs(rng: &mut Rng, s: KdaShape) -> [Vec<f32>; 6] {
    let KdaShape { t, h, k, v, .. } = s;
    let mut q = rng.vec(t * h * k, 1.0);
    let mut kk = rng.vec(t * h * k, 1.0);
    l2_normalize_rows(&mut q, k, 1e-6, (k as f32).powf(-0.5));
    l2_normalize_rows(&mut kk, k, 1e-6, 1.0);
    let vv = rng.vec(t * h * v, 1.0);
    let g: Vec<f32> = (0..t * h * k)
        .map(|_| -((rng.uniform() + 1.0) * 0.5).powi(4) * 30.0)
        .collect();
    let beta: Vec<f32> = (0..t * h).map(|_| (rng.uniform() + 1.0) * 0.5).collect();
    let st = rng.vec(h * k * v, 0.5);
    [q, kk, vv, g, beta, st]
}
