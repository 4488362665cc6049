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
use crate::dense::{
    exp_inplace, forward_subst, gemm, mul_exp_diff, mul_exp_sdiff, prefetch, transpose, MatA, Mode,
};
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

/// Rows of a sub-chunk: off-diagonal `16 × 16` blocks of `A_kk`/`A_qk` are products with the
/// reference `Γ_n` at the first row `n` of the query sub-chunk (every factor `≤ 1`).
const SUB: usize = 16;

/// Largest `|Γ_i − Γ_n|` within a diagonal sub-chunk for which it is also factorised (factors
/// then stay within `e^{±80}`, far from f32 overflow/underflow); stronger decays fall back to
/// pairwise exponents for that block.
const SPAN_MAX: f32 = 80.0;

/// Per-head scratch of the chunked form.
struct ChunkScratch {
    gam: Vec<f32>,  // [C, K] cumulative log-decay Γ
    qc: Vec<f32>,   // [C, K]
    kc: Vec<f32>,   // [C, K]
    bc: Vec<f32>,   // [C]
    gt: Vec<f32>,   // [K, C] Γ transposed
    kt: Vec<f32>,   // [K, C] K transposed
    kf: Vec<f32>,   // [K, C] key side k_j·e^{Γ_n − Γ_j}, transposed
    qk: Vec<f32>,   // [2·SUB, K] query side k_i·e^{Γ_i − Γ_n} then q_i·e^{Γ_i − Γ_n}
    erow: Vec<f32>, // [K]
    prod: Vec<f32>, // [2·SUB, C]
    akk: Vec<f32>,  // [C, C] β_i-scaled, strictly lower
    aqk: Vec<f32>,  // [C, C] inclusive lower
    eg: Vec<f32>,   // [C, K] e^Γ
    w: Vec<f32>,    // [C, K]
    u: Vec<f32>,    // [C, V] (becomes V')
    eq: Vec<f32>,   // [C, K] e^Γ⊙Q, then e^{Γ_C−Γ}⊙K
    o: Vec<f32>,    // [C, V]
}

impl ChunkScratch {
    fn new(kd: usize, vd: usize) -> Self {
        let c = CHUNK;
        ChunkScratch {
            gam: vec![0.0; c * kd],
            qc: vec![0.0; c * kd],
            kc: vec![0.0; c * kd],
            bc: vec![0.0; c],
            gt: vec![0.0; kd * c],
            kt: vec![0.0; kd * c],
            kf: vec![0.0; kd * c],
            qk: vec![0.0; 2 * SUB * kd],
            erow: vec![0.0; kd],
            prod: vec![0.0; 2 * SUB * c],
            akk: vec![0.0; c * c],
            aqk: vec![0.0; c * c],
            eg: vec![0.0; c * kd],
            w: vec![0.0; c * kd],
            u: vec![0.0; c * vd],
            eq: vec![0.0; c * kd],
            o: vec![0.0; c * vd],
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

/// One chunk of one head: the §5.3 equations as small dense products.
///
/// 1. `A_kk`, `A_qk` per 16-row sub-chunk `s` (reference row `n = 16s`): one product
///    `[K̃_s; Q̃_s] · K̂ᵀ` with `K̃_s[i] = k_i e^{Γ_i−Γ_n}`, `Q̃_s[i] = q_i e^{Γ_i−Γ_n}` and
///    `K̂[j] = k_j e^{Γ_n−Γ_j}` for all earlier rows `j < n` (factors ≤ 1), plus the diagonal
///    block's own rows when its decay span is at most [`SPAN_MAX`] (else pairwise exponents).
/// 2. `W`, `U` by forward substitution with `I + A_kk` (row-wise, register-blocked).
/// 3. `V' = U − W·S`, `O = (e^Γ⊙Q)·S + A_qk·V'`, `S ← Diag(e^{Γ_C}) S + (e^{Γ_C−Γ}⊙K)ᵀ·V'`.
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
    write_out: impl FnMut(usize, &[f32]),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked; the body is the same safe code, compiled for AVX2 so its
        // element-wise loops vectorise 8-wide.
        unsafe {
            return chunk_head_avx2(sc, st, hi, t0, c, s, q, k, v, g, beta, write_out);
        }
    }
    chunk_head_body(sc, st, hi, t0, c, s, q, k, v, g, beta, write_out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_head_avx2(
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
    write_out: impl FnMut(usize, &[f32]),
) {
    chunk_head_body(sc, st, hi, t0, c, s, q, k, v, g, beta, write_out)
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
fn chunk_head_body(
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
    const C: usize = CHUNK;
    // Gather the chunk of this head (prefetching the next chunk's rows); Γ = cumsum g.
    let t_total = q.len() / (h * kd);
    for r in 0..c {
        let ti = t0 + r;
        let base = (ti * h + hi) * kd;
        let vb = (ti * h + hi) * vd;
        if ti + C < t_total {
            let (nb, nv) = (base + C * h * kd, vb + C * h * vd);
            prefetch(&q[nb..nb + kd]);
            prefetch(&k[nb..nb + kd]);
            prefetch(&g[nb..nb + kd]);
            prefetch(&v[nv..nv + vd]);
        }
        sc.qc[r * kd..(r + 1) * kd].copy_from_slice(&q[base..base + kd]);
        sc.kc[r * kd..(r + 1) * kd].copy_from_slice(&k[base..base + kd]);
        sc.u[r * vd..(r + 1) * vd].copy_from_slice(&v[vb..vb + vd]);
        sc.bc[r] = beta[ti * h + hi];
        let gr = &g[base..base + kd];
        if r == 0 {
            sc.gam[..kd].copy_from_slice(gr);
        } else {
            let (prev, cur) = sc.gam.split_at_mut(r * kd);
            let prev = &prev[(r - 1) * kd..];
            for ((x, p), gv) in cur[..kd].iter_mut().zip(prev).zip(gr) {
                *x = p + gv;
            }
        }
    }
    // Transposed copies of Γ and K (the key side of the A products runs along rows j).
    transpose(&sc.gam, c, kd, kd, &mut sc.gt, C);
    transpose(&sc.kc, c, kd, kd, &mut sc.kt, C);
    sc.eg[..c * kd].copy_from_slice(&sc.gam[..c * kd]);
    exp_inplace(&mut sc.eg[..c * kd]);

    // 1. A_kk (β_i-scaled, strictly lower) and A_qk (inclusive lower), sub-chunk by sub-chunk.
    let mut r0 = 0;
    while r0 < c {
        let r1 = (r0 + SUB).min(c);
        let m = r1 - r0;
        let gn = &sc.gam[r0 * kd..(r0 + 1) * kd];
        let (mut lo, mut hi_) = (0f32, 0f32);
        for i in r0..r1 {
            for (a, b) in sc.gam[i * kd..(i + 1) * kd].iter().zip(gn) {
                lo = lo.min(a - b);
                hi_ = hi_.max(a - b);
            }
        }
        let diag_ok = lo >= -SPAN_MAX && hi_ <= SPAN_MAX;
        // Query side.
        for i in r0..r1 {
            let gi = &sc.gam[i * kd..(i + 1) * kd];
            for ((e, a), b) in sc.erow.iter_mut().zip(gi).zip(gn) {
                *e = a - b;
            }
            exp_inplace(&mut sc.erow);
            let li = i - r0;
            for d in 0..kd {
                sc.qk[li * kd + d] = sc.kc[i * kd + d] * sc.erow[d];
                sc.qk[(m + li) * kd + d] = sc.qc[i * kd + d] * sc.erow[d];
            }
        }
        // Key side (transposed): earlier rows, and the block itself when safe.
        let jmax = if diag_ok { r1 } else { r0 };
        if jmax > 0 {
            for d in 0..kd {
                let row = d * C..d * C + jmax;
                mul_exp_sdiff(
                    &mut sc.kf[row.clone()],
                    &sc.kt[row.clone()],
                    gn[d],
                    &sc.gt[row],
                );
            }
            let a = MatA {
                data: &sc.qk[..2 * m * kd],
                rs: kd,
                cs: 1,
            };
            gemm(2 * m, jmax, kd, a, &sc.kf, C, &mut sc.prod, C, Mode::Set);
        }
        for i in r0..r1 {
            let li = i - r0;
            let b = sc.bc[i];
            for j in 0..C {
                let inside = j < jmax;
                sc.akk[i * C + j] = if inside && j < i {
                    b * sc.prod[li * C + j]
                } else {
                    0.0
                };
                sc.aqk[i * C + j] = if inside && j <= i {
                    sc.prod[(m + li) * C + j]
                } else {
                    0.0
                };
            }
            if !diag_ok {
                // Pairwise exponents on the diagonal block: e^{Γ_i − Γ_j} ≤ 1 for j ≤ i.
                let gi = &sc.gam[i * kd..(i + 1) * kd];
                for j in r0..=i {
                    let gj = &sc.gam[j * kd..(j + 1) * kd];
                    for ((e, a), b) in sc.erow.iter_mut().zip(gi).zip(gj) {
                        *e = a - b;
                    }
                    exp_inplace(&mut sc.erow);
                    let (ki, qi, kj) = (
                        &sc.kc[i * kd..(i + 1) * kd],
                        &sc.qc[i * kd..(i + 1) * kd],
                        &sc.kc[j * kd..(j + 1) * kd],
                    );
                    let (mut skk, mut sqk) = (0f32, 0f32);
                    for d in 0..kd {
                        let e = sc.erow[d] * kj[d];
                        skk += ki[d] * e;
                        sqk += qi[d] * e;
                    }
                    if j < i {
                        sc.akk[i * C + j] = b * skk;
                    }
                    sc.aqk[i * C + j] = sqk;
                }
            }
        }
        r0 = r1;
    }

    // 2. W = (I + A_kk)⁻¹ Diag(β)(e^Γ⊙K), U = (I + A_kk)⁻¹ Diag(β) V.
    for i in 0..c {
        let b = sc.bc[i];
        for d in 0..kd {
            sc.w[i * kd + d] = b * sc.eg[i * kd + d] * sc.kc[i * kd + d];
        }
        for x in &mut sc.u[i * vd..(i + 1) * vd] {
            *x *= b;
        }
    }
    forward_subst(c, &sc.akk, C, &mut sc.w, kd, kd);
    forward_subst(c, &sc.akk, C, &mut sc.u, vd, vd);

    // 3. V' = U − W·S.
    let wa = MatA {
        data: &sc.w[..c * kd],
        rs: kd,
        cs: 1,
    };
    gemm(c, vd, kd, wa, st, vd, &mut sc.u, vd, Mode::Sub);
    // O = (e^Γ⊙Q)·S + A_qk·V' (A_qk is zero above the diagonal: stop each block at its end).
    for (e, (a, b)) in sc.eq[..c * kd].iter_mut().zip(sc.eg.iter().zip(&sc.qc)) {
        *e = a * b;
    }
    let qa = MatA {
        data: &sc.eq[..c * kd],
        rs: kd,
        cs: 1,
    };
    gemm(c, vd, kd, qa, st, vd, &mut sc.o, vd, Mode::Set);
    let mut r0 = 0;
    while r0 < c {
        let r1 = (r0 + SUB).min(c);
        let a = MatA {
            data: &sc.aqk[r0 * C..],
            rs: C,
            cs: 1,
        };
        gemm(
            r1 - r0,
            vd,
            r1,
            a,
            &sc.u,
            vd,
            &mut sc.o[r0 * vd..],
            vd,
            Mode::Add,
        );
        r0 = r1;
    }
    for i in 0..c {
        write_out(t0 + i, &sc.o[i * vd..(i + 1) * vd]);
    }
    // S ← Diag(e^{Γ_last}) S + (e^{Γ_last − Γ}⊙K)ᵀ V'.
    let last = (c - 1) * kd;
    for i in 0..c {
        let row = i * kd..(i + 1) * kd;
        mul_exp_diff(
            &mut sc.eq[row.clone()],
            &sc.kc[row.clone()],
            &sc.gam[last..last + kd],
            &sc.gam[row],
        );
    }
    for d in 0..kd {
        let e = sc.eg[last + d];
        for x in &mut st[d * vd..(d + 1) * vd] {
            *x *= e;
        }
    }
    let ka = MatA {
        data: &sc.eq[..c * kd],
        rs: 1,
        cs: kd,
    };
    gemm(kd, vd, c, ka, &sc.u, vd, st, vd, Mode::Add);
}
