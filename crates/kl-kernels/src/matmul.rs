//! `y = x · Wᵀ` with activations in f32 and weights in their stored dtype.
//!
//! `x` is `[T, K]`, `W` is `[N, K]` (PyTorch Linear layout), `y` is `[T, N]`.
//!
//! Two regimes:
//! - **Few rows** (`T ≤ GEMV_MAX_ROWS`, decode): a bandwidth-bound matrix–vector product. Weight
//!   rows are split across threads; each row is streamed once and dotted against every `x` row
//!   with the SIMD dot kernels (bf16 widened in registers).
//! - **Many rows** (prefill): a compute-bound product. Blocks of `W` rows are widened into a
//!   thread-local f32 panel (never the whole matrix) and multiplied with the `gemm` crate.
//!
//! [`matmul_reference`] is the plain triple loop both are tested against.

use crate::Elem;
use rayon::prelude::*;

/// Row count up to which the matrix–vector path is used.
pub const GEMV_MAX_ROWS: usize = 8;

/// Plain `y[t][n] = Σ_k x[t][k]·w[n][k]`.
pub fn matmul_reference<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert_eq!(x.len(), t * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(y.len(), t * n);
    for ti in 0..t {
        for ni in 0..n {
            let mut s = 0f32;
            for ki in 0..k {
                s += x[ti * k + ki] * w[ni * k + ki].to_f32();
            }
            y[ti * n + ni] = s;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint output elements from different threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Optimised `y = x · Wᵀ` (same contract as [`matmul_reference`]).
pub fn matmul<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert_eq!(
        x.len(),
        t * k,
        "matmul: x has {} elements, expected T·K = {t}·{k}",
        x.len()
    );
    assert_eq!(
        w.len(),
        n * k,
        "matmul: W has {} elements, expected N·K = {n}·{k}",
        w.len()
    );
    assert_eq!(
        y.len(),
        t * n,
        "matmul: y has {} elements, expected T·N = {t}·{n}",
        y.len()
    );
    if t == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    if t <= GEMV_MAX_ROWS {
        gemv(x, w, y, t, k, n);
    } else {
        gemm_panels(x, w, y, t, k, n);
    }
}

fn gemv<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    let threads = rayon::current_num_threads().max(1);
    // About 64 KiB of weights per task, at least 4 tasks per thread when there is enough work.
    let rows_per_task = ((64 * 1024) / (k * std::mem::size_of::<W>()).max(1))
        .clamp(1, n.div_ceil(threads * 4).max(1));
    let yp = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|task| {
            let n0 = task * rows_per_task;
            let n1 = (n0 + rows_per_task).min(n);
            for ni in n0..n1 {
                let wr = &w[ni * k..(ni + 1) * k];
                for ti in 0..t {
                    let v = W::dot(wr, &x[ti * k..(ti + 1) * k]);
                    // SAFETY: element (ti, ni) is written by exactly one task (the owner of row ni).
                    unsafe { *yp.get().add(ti * n + ni) = v };
                }
            }
        });
}

fn gemm_panels<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    let threads = rayon::current_num_threads().max(1);
    // Panel of `nb` weight rows widened to f32: at most ~1 MiB, at least 16 rows.
    let nb = ((1 << 20) / (4 * k))
        .clamp(16, 256)
        .min(n.div_ceil(threads).max(16));
    let yp = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(nb))
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |panel, task| {
            let n0 = task * nb;
            let n1 = (n0 + nb).min(n);
            let rows = n1 - n0;
            panel.resize(rows * k, 0.0);
            W::widen(&w[n0 * k..n1 * k], &mut panel[..rows * k]);
            // SAFETY: columns n0..n1 of y belong to this task only; gemm writes dst[i*n + j] for
            // i < t, j < rows, all inside y, with row stride n.
            unsafe {
                gemm::gemm(
                    t,
                    rows,
                    k,
                    yp.get().add(n0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}
