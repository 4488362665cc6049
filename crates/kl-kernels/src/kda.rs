//! Kimi Delta Attention: the gated delta rule with per-channel decay, in its two exact forms.
//!
//! Per head, with state `S ∈ R^{K×V}` (rows = key channel, f32), for each token `t`:
//! ```text
//! S ← Diag(exp(g_t)) S;  u = β_t (v_t − Sᵀk_t);  S ← S + k_t uᵀ;  o_t = Sᵀ q_t
//! ```
//! (paper Eq. 1; spec §5.2). `q` and `k` arrive L2-normalised, `q` already scaled by `K^-1/2`;
//! `g ≤ 0` is the log-decay from the gate.
//!
//! - [`kda_recurrent`] is the token loop: the decode form and the reference.
//! - [`kda_chunked`] is the chunkwise-parallel (WY / UT-transform) form used for prefill
//!   (spec §5.3, fla `naive_chunk_kda`): within a chunk of `C = 64` tokens,
//!   `Γ = cumsum g`, `A_kk[i,j] = β_i Σ_d k_i k_j e^{Γ_i−Γ_j}` (j<i), `W = (I+A_kk)⁻¹ Diag(β)(e^Γ⊙K)`,
//!   `U = (I+A_kk)⁻¹ Diag(β) V`, `V' = U − W S`, `O = (e^Γ⊙Q) S + A_qk V'` with
//!   `A_qk[i,j] = Σ_d q_i k_j e^{Γ_i−Γ_j}` (j≤i), `S ← Diag(e^{Γ_C}) S + (e^{Γ_C−Γ}⊙K)ᵀ V'`.
//!   Exponents are only ever formed as differences `Γ_i − Γ_j ≤ 0` (never `e^{−Γ_j}`, which
//!   overflows for strong decays), so every factor is in (0, 1].
//!
//! Layouts (PyTorch order): `q, k, g` `[T, H, K]`, `v` `[T, H, V]`, `beta` `[T, H]`,
//! `state` `[H, K, V]`, `out` `[T, H, V]`. Heads run in parallel.

use crate::activation::softplus;
use crate::simd::axpy;
use rayon::prelude::*;

/// Chunk length of the parallel form.
pub const CHUNK: usize = 64;

/// Shape of a KDA call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdaShape {
    /// Tokens.
    pub t: usize,
    /// Heads.
    pub h: usize,
    /// Key width.
    pub k: usize,
    /// Value width.
    pub v: usize,
}

/// Gate: `g = −exp(A_log[h]) · softplus(gate_in + dt_bias)` over `[T, H, K]`, in place on `gate`.
/// `a_log` is `[H]`, `dt_bias` is `[H·K]`.
#[allow(clippy::needless_range_loop)]
pub fn kda_gate(gate: &mut [f32], a_log: &[f32], dt_bias: &[f32], h: usize, k: usize) {
    assert_eq!(gate.len() % (h * k), 0);
    for row in gate.chunks_exact_mut(h * k) {
        for hi in 0..h {
            let a = -a_log[hi].exp();
            for d in 0..k {
                let i = hi * k + d;
                row[i] = a * softplus(row[i] + dt_bias[i]);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &[f32],
    out: &[f32],
) {
    let KdaShape { t, h, k: kd, v: vd } = s;
    assert_eq!(q.len(), t * h * kd, "kda: q");
    assert_eq!(k.len(), t * h * kd, "kda: k");
    assert_eq!(g.len(), t * h * kd, "kda: g");
    assert_eq!(v.len(), t * h * vd, "kda: v");
    assert_eq!(beta.len(), t * h, "kda: beta");
    assert_eq!(state.len(), h * kd * vd, "kda: state");
    assert_eq!(out.len(), t * h * vd, "kda: out");
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each head writes a disjoint set of output elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Token-by-token recurrence (decode path and reference).
#[allow(clippy::too_many_arguments)]
pub fn kda_recurrent(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    check(s, q, k, v, g, beta, state, out);
    let KdaShape { t, h, k: kd, v: vd } = s;
    let op = SendPtr(out.as_mut_ptr());
    let per_head = |hi: usize, st: &mut [f32]| {
        let mut u = [0f32; 512];
        let mut ubuf;
        let u: &mut [f32] = if vd <= 512 {
            &mut u[..vd]
        } else {
            ubuf = vec![0f32; vd];
            &mut ubuf
        };
        for ti in 0..t {
            let base = (ti * h + hi) * kd;
            let (qt, kt, gt) = (
                &q[base..base + kd],
                &k[base..base + kd],
                &g[base..base + kd],
            );
            let vt = &v[(ti * h + hi) * vd..(ti * h + hi + 1) * vd];
            let b = beta[ti * h + hi];
            // S ← Diag(e^g) S; p = Sᵀk accumulated in u as −p.
            u.copy_from_slice(vt);
            for d in 0..kd {
                let row = &mut st[d * vd..(d + 1) * vd];
                let e = gt[d].exp();
                for x in row.iter_mut() {
                    *x *= e;
                }
                axpy(-kt[d], row, u);
            }
            for x in u.iter_mut() {
                *x *= b;
            }
            // S += k uᵀ; o = Sᵀ q.
            // SAFETY: (ti, hi) output row is written only by head hi.
            let o = unsafe { std::slice::from_raw_parts_mut(op.get().add((ti * h + hi) * vd), vd) };
            o.fill(0.0);
            for d in 0..kd {
                let row = &mut st[d * vd..(d + 1) * vd];
                axpy(kt[d], u, row);
                axpy(qt[d], row, o);
            }
        }
    };
    if h == 1 || t * kd * vd < 1 << 14 {
        for (hi, st) in state.chunks_exact_mut(kd * vd).enumerate() {
            per_head(hi, st);
        }
    } else {
        state
            .par_chunks_exact_mut(kd * vd)
            .enumerate()
            .for_each(|(hi, st)| per_head(hi, st));
    }
}

/// Reference twin of [`kda_chunked`]: the plain recurrence, written as the paper's equations.
#[allow(clippy::too_many_arguments)]
pub fn kda_chunked_reference(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    check(s, q, k, v, g, beta, state, out);
    let KdaShape { t, h, k: kd, v: vd } = s;
    for hi in 0..h {
        let st = &mut state[hi * kd * vd..(hi + 1) * kd * vd];
        for ti in 0..t {
            let base = (ti * h + hi) * kd;
            let vb = (ti * h + hi) * vd;
            for d in 0..kd {
                let e = g[base + d].exp();
                for c in 0..vd {
                    st[d * vd + c] *= e;
                }
            }
            let b = beta[ti * h + hi];
            for c in 0..vd {
                let p: f32 = (0..kd).map(|d| st[d * vd + c] * k[base + d]).sum();
                let u = b * (v[vb + c] - p);
                for d in 0..kd {
                    st[d * vd + c] += k[base + d] * u;
                }
            }
            for c in 0..vd {
                out[vb + c] = (0..kd).map(|d| st[d * vd + c] * q[base + d]).sum();
            }
        }
    }
}

/// Per-head scratch of the chunked form.
struct ChunkScratch {
    gam: Vec<f32>, // [C, K] cumulative log-decay
    qc: Vec<f32>,  // [C, K]
    kc: Vec<f32>,  // [C, K]
    vc: Vec<f32>,  // [C, V]
    bc: Vec<f32>,  // [C]
    akk: Vec<f32>, // [C, C]
    aqk: Vec<f32>, // [C, C]
    w: Vec<f32>,   // [C, K]
    u: Vec<f32>,   // [C, V]  (becomes V')
    o: Vec<f32>,   // [V]  one output row
}

impl ChunkScratch {
    fn new(kd: usize, vd: usize) -> Self {
        let c = CHUNK;
        ChunkScratch {
            gam: vec![0.0; c * kd],
            qc: vec![0.0; c * kd],
            kc: vec![0.0; c * kd],
            vc: vec![0.0; c * vd],
            bc: vec![0.0; c],
            akk: vec![0.0; c * c],
            aqk: vec![0.0; c * c],
            w: vec![0.0; c * kd],
            u: vec![0.0; c * vd],
            o: vec![0.0; vd],
        }
    }
}

/// Chunkwise-parallel form (prefill). Same contract and result as [`kda_recurrent`] up to f32
/// reassociation; any `T` (the last chunk may be partial).
#[allow(clippy::too_many_arguments)]
pub fn kda_chunked(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    check(s, q, k, v, g, beta, state, out);
    let KdaShape { t, h, k: kd, v: vd } = s;
    let op = SendPtr(out.as_mut_ptr());
    state
        .par_chunks_exact_mut(kd * vd)
        .enumerate()
        .for_each(|(hi, st)| {
            let mut sc = ChunkScratch::new(kd, vd);
            let mut t0 = 0;
            while t0 < t {
                let c = CHUNK.min(t - t0);
                // SAFETY: rows t0..t0+c of head hi are written only here.
                chunk_head(
                    &mut sc,
                    st,
                    hi,
                    t0,
                    c,
                    s,
                    q,
                    k,
                    v,
                    g,
                    beta,
                    |ti, o| unsafe {
                        std::ptr::copy_nonoverlapping(
                            o.as_ptr(),
                            op.get().add((ti * h + hi) * vd),
                            vd,
                        );
                    },
                );
                t0 += c;
            }
        });
}

#[allow(clippy::too_many_arguments)]
fn chunk_head(
    sc: &mut ChunkScratch,
    st: &mut [f32],
    hi: usize,
    t0: usize,
    c: usize,
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    mut write_out: impl FnMut(usize, &[f32]),
) {
    let KdaShape {
        h, k: kd, v: vd, ..
    } = s;
    // Gather the chunk of this head; Γ = cumsum g.
    for r in 0..c {
        let ti = t0 + r;
        let base = (ti * h + hi) * kd;
        sc.qc[r * kd..(r + 1) * kd].copy_from_slice(&q[base..base + kd]);
        sc.kc[r * kd..(r + 1) * kd].copy_from_slice(&k[base..base + kd]);
        sc.vc[r * vd..(r + 1) * vd].copy_from_slice(&v[(ti * h + hi) * vd..(ti * h + hi + 1) * vd]);
        sc.bc[r] = beta[ti * h + hi];
        for d in 0..kd {
            let prev = if r == 0 {
                0.0
            } else {
                sc.gam[(r - 1) * kd + d]
            };
            sc.gam[r * kd + d] = prev + g[base + d];
        }
    }
    // Pairwise decayed products: A_kk (strict lower, ×β_i) and A_qk (inclusive lower).
    for i in 0..c {
        let gi = &sc.gam[i * kd..(i + 1) * kd];
        let ki = &sc.kc[i * kd..(i + 1) * kd];
        let qi = &sc.qc[i * kd..(i + 1) * kd];
        for j in 0..=i {
            let gj = &sc.gam[j * kd..(j + 1) * kd];
            let kj = &sc.kc[j * kd..(j + 1) * kd];
            let (mut skk, mut sqk) = (0f32, 0f32);
            for d in 0..kd {
                let e = (gi[d] - gj[d]).exp() * kj[d];
                skk += ki[d] * e;
                sqk += qi[d] * e;
            }
            sc.akk[i * CHUNK + j] = if j < i { sc.bc[i] * skk } else { 0.0 };
            sc.aqk[i * CHUNK + j] = sqk;
        }
    }
    // Forward substitution: W_i = β_i e^{Γ_i}⊙k_i − Σ_{j<i} A_kk[i,j] W_j; U likewise with v.
    for i in 0..c {
        let bi = sc.bc[i];
        for d in 0..kd {
            sc.w[i * kd + d] = bi * sc.gam[i * kd + d].exp() * sc.kc[i * kd + d];
        }
        for x in 0..vd {
            sc.u[i * vd + x] = bi * sc.vc[i * vd + x];
        }
        for j in 0..i {
            let a = sc.akk[i * CHUNK + j];
            if a != 0.0 {
                let (wj, wi) = sc.w.split_at_mut(i * kd);
                axpy(-a, &wj[j * kd..(j + 1) * kd], &mut wi[..kd]);
                let (uj, ui) = sc.u.split_at_mut(i * vd);
                axpy(-a, &uj[j * vd..(j + 1) * vd], &mut ui[..vd]);
            }
        }
    }
    // V' = U − W S   (u becomes V').
    for i in 0..c {
        for d in 0..kd {
            let wd = sc.w[i * kd + d];
            if wd != 0.0 {
                axpy(
                    -wd,
                    &st[d * vd..(d + 1) * vd],
                    &mut sc.u[i * vd..(i + 1) * vd],
                );
            }
        }
    }
    // O_i = (e^{Γ_i}⊙q_i) S + Σ_{j≤i} A_qk[i,j] V'_j.
    let mut o = std::mem::take(&mut sc.o);
    for i in 0..c {
        o.fill(0.0);
        for d in 0..kd {
            let f = sc.gam[i * kd + d].exp() * sc.qc[i * kd + d];
            if f != 0.0 {
                axpy(f, &st[d * vd..(d + 1) * vd], &mut o);
            }
        }
        for j in 0..=i {
            axpy(sc.aqk[i * CHUNK + j], &sc.u[j * vd..(j + 1) * vd], &mut o);
        }
        write_out(t0 + i, &o);
    }
    sc.o = o;
    // S ← Diag(e^{Γ_last}) S + Σ_i (e^{Γ_last − Γ_i}⊙k_i) V'_iᵀ.
    let last = (c - 1) * kd;
    for d in 0..kd {
        let gl = sc.gam[last + d];
        let row = &mut st[d * vd..(d + 1) * vd];
        let e = gl.exp();
        for x in row.iter_mut() {
            *x *= e;
        }
        for i in 0..c {
            let f = (gl - sc.gam[i * kd + d]).exp() * sc.kc[i * kd + d];
            if f != 0.0 {
                axpy(f, &sc.u[i * vd..(i + 1) * vd], row);
            }
        }
    }
}
