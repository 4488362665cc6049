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
//!   It is evaluated as small dense products (register-blocked, AVX2 when available): per
//!   16-row sub-chunk, `A_kk`/`A_qk` come from one product against keys rescaled to the
//!   sub-chunk's first row `n` (factors `e^{Γ_i−Γ_n}`, `e^{Γ_n−Γ_j}`; never `e^{−Γ_j}` over a
//!   whole chunk, which overflows for strong decays), `W`/`U` from a forward substitution, and
//!   `W·S`, `A_qk·V'`, `Kᵀ·V'` are plain products; about `C·K` exponentials per chunk and head
//!   instead of `C²·K`. Rows with very strong decay fall back to pairwise exponents (see
//!   `chunk_head`), and every row of a chunk depends bit for bit only on the rows before it.
//!
//! Layouts (PyTorch order): `q, k, g` `[T, H, K]`, `v` `[T, H, V]`, `beta` `[T, H]`,
//! `state` `[H, K, V]`, `out` `[T, H, V]`. Heads run in parallel.

use crate::activation::{softplus_scaled, softplus_scaled_reference};
use crate::dense::{
    exp_inplace, forward_subst, gemm, min_max, mul_exp_diff, transpose, MatA, Mode,
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
/// `a_log` is `[H]`, `dt_bias` is `[H·K]`. Vectorised ([`softplus_scaled`]) and, for many
/// tokens, parallel over them.
pub fn kda_gate(gate: &mut [f32], a_log: &[f32], dt_bias: &[f32], h: usize, k: usize) {
    assert_eq!(gate.len() % (h * k), 0);
    crate::par::rows_mut(gate, h * k, 32, |_, rows| {
        for row in rows.chunks_exact_mut(h * k) {
            for (hi, al) in a_log[..h].iter().enumerate() {
                let r = hi * k..(hi + 1) * k;
                softplus_scaled(&mut row[r.clone()], &dt_bias[r], -al.exp());
            }
        }
    });
}

/// [`kda_gate`] with the scalar `softplus`.
pub fn kda_gate_reference(gate: &mut [f32], a_log: &[f32], dt_bias: &[f32], h: usize, k: usize) {
    assert_eq!(gate.len() % (h * k), 0);
    for row in gate.chunks_exact_mut(h * k) {
        for (hi, al) in a_log[..h].iter().enumerate() {
            let r = hi * k..(hi + 1) * k;
            softplus_scaled_reference(&mut row[r.clone()], &dt_bias[r], -al.exp());
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

/// Largest `|Γ_i[d] − Γ_n[d]|` (over channels `d`, and over the rows of the sub-chunk up to `i`)
/// for which row `i` is factorised through `qf_i = e^{Γ_i − Γ_n}` and `k_i / qf_i ≤ e^{60}|k_i|`.
/// Products of that with a factor that underflowed (`< e^{−87.3}`, flushed or subnormal) are then
/// off by at most `e^{60−87.3} ≈ 1.4·10⁻¹²` in absolute value, far below f32 resolution of
/// the O(1) results; rows with stronger decay take explicit (pairwise) exponents instead.
const SPAN_MAX: f32 = 60.0;

/// Per-head scratch of the chunked form.
struct ChunkScratch {
    dims: (usize, usize), // (K, V) it was made for
    gam: Vec<f32>,        // [C, K] cumulative log-decay Γ
    qc: Vec<f32>,         // [C, K]
    kc: Vec<f32>,         // [C, K]
    bc: Vec<f32>,         // [C]
    qf: Vec<f32>,         // [C, K] e^{Γ_i − Γ_n(i)} (n(i) = first row of i's sub-chunk)
    kinv: Vec<f32>,       // [C, K] k_i / qf_i (factorisable rows; 0 for the others)
    kinvt: Vec<f32>,      // [K, C] kinv transposed
    rho: Vec<f32>,        // [C/SUB, K] e^{Γ_n(b) − Γ_n(b−1)}
    egn: Vec<f32>,        // [C/SUB, K] e^{Γ_n(b)}
    ok: Vec<bool>,        // [C] row factorisable (causal, within its sub-chunk; see SPAN_MAX)
    rf: Vec<f32>,         // [K] running product of rho
    kf: Vec<f32>,         // [K, C] key side k_j·e^{Γ_n − Γ_j}, transposed
    qk: Vec<f32>,         // [2·SUB, K] query side k_i·qf_i then q_i·qf_i
    erow: Vec<f32>,       // [K]
    prod: Vec<f32>,       // [2·SUB, C]
    akk: Vec<f32>,        // [C, C] β_i-scaled, strictly lower
    aqk: Vec<f32>,        // [C, C] inclusive lower
    eg: Vec<f32>,         // [C, K] e^Γ
    w: Vec<f32>,          // [C, K]
    u: Vec<f32>,          // [C, V] (becomes V')
    eq: Vec<f32>,         // [C, K] e^Γ⊙Q, then e^{Γ_C−Γ}⊙K
    o: Vec<f32>,          // [C, V]
}

impl ChunkScratch {
    fn new(kd: usize, vd: usize) -> Self {
        let c = CHUNK;
        let nsub = CHUNK / SUB;
        ChunkScratch {
            dims: (kd, vd),
            gam: vec![0.0; c * kd],
            qc: vec![0.0; c * kd],
            kc: vec![0.0; c * kd],
            bc: vec![0.0; c],
            qf: vec![0.0; c * kd],
            kinv: vec![0.0; c * kd],
            kinvt: vec![0.0; kd * c],
            rho: vec![0.0; nsub * kd],
            egn: vec![0.0; nsub * kd],
            ok: vec![false; c],
            rf: vec![0.0; kd],
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
    let KdaShape {
        t, k: kd, v: vd, ..
    } = s;
    let op = SendPtr(out.as_mut_ptr());
    state
        .par_chunks_exact_mut(kd * vd)
        .enumerate()
        .for_each(|(hi, st)| {
            CHUNK_SCRATCH.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|sc| sc.dims != (kd, vd)) {
                    *slot = Some(ChunkScratch::new(kd, vd));
                }
                let sc = slot.as_mut().expect("scratch was just made");
                let mut t0 = 0;
                while t0 < t {
                    let c = CHUNK.min(t - t0);
                    // Rows t0..t0+c of head hi of `out` are written only here.
                    chunk_head(sc, st, hi, t0, c, s, q, k, v, g, beta, op);
                    t0 += c;
                }
            })
        });
}

thread_local! {
    /// Each thread's [`ChunkScratch`], kept between calls (about 0.6 MiB at K = V = 128); every
    /// element a chunk reads is written earlier in the same chunk.
    static CHUNK_SCRATCH: std::cell::RefCell<Option<ChunkScratch>> =
        const { std::cell::RefCell::new(None) };
}

/// One chunk of one head: the §5.3 equations as small dense products.
///
/// Exponentials: per 16-row sub-chunk `b` with first row `n_b`, one exp per element for the
/// query-side factors `qf_i = e^{Γ_i − Γ_{n_b}} ≤ 1`, plus the rows `e^{Γ_{n_b}}` and
/// `ρ_b = e^{Γ_{n_b} − Γ_{n_{b−1}}}`. For rows whose decay since `n_b` stays within [`SPAN_MAX`]
/// (`qf ≥ e^{−60}`), everything else is a product of these: `e^{Γ_i} = e^{Γ_{n_b}}·qf_i`,
/// key-side factors `k_j e^{Γ_{n_s} − Γ_j} = (k_j / qf_j)·Π ρ` and `e^{Γ_C − Γ_i}k_i` likewise,
/// so about `C·K` exps per chunk instead of `C²·K`. Rows with stronger decay take explicit
/// exponents of non-positive differences (and pairwise ones on their diagonal block).
///
/// Row `i`'s output depends only on rows `≤ i` of the chunk, bit for bit: every path decision
/// is per row and causal, and each product accumulates every element in a fixed order. So a
/// chunk recomputed from its start with more rows reproduces the earlier rows exactly (the
/// layers crate relies on this for split prefill).
///
/// 1. `A_kk`, `A_qk` per query sub-chunk `s`: one product `[K̃_s; Q̃_s] · K̂ᵀ` with
///    `K̃_s[i] = k_i qf_i`, `Q̃_s[i] = q_i qf_i`, `K̂[j] = k_j e^{Γ_{n_s}−Γ_j}` (all earlier rows,
///    and the diagonal block's factorisable ones).
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
    out: SendPtr,
) {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::features().isa() {
        // SAFETY: AVX-512F (and AVX2+FMA) checked; the body is the same safe code compiled for
        // AVX-512, so its element-wise loops vectorise 16-wide. Element-wise operations give
        // the same bits at any width (no reductions are vectorised: Rust does not reassociate
        // or contract floating-point arithmetic), and the products it calls pick their kernels
        // by the same rule as elsewhere.
        crate::cpu::Isa::Avx512 => unsafe {
            return chunk_head_avx512(sc, st, hi, t0, c, s, q, k, v, g, beta, out);
        },
        // SAFETY: AVX2+FMA checked; the body compiled for AVX2 (8-wide loops).
        crate::cpu::Isa::Avx2 => unsafe {
            return chunk_head_avx2(sc, st, hi, t0, c, s, q, k, v, g, beta, out);
        },
        crate::cpu::Isa::Portable => {}
    }
    chunk_head_body(sc, st, hi, t0, c, s, q, k, v, g, beta, out)
}

/// `chunk_head_body` compiled for one instruction set (the same safe code; its element-wise
/// loops vectorise to that width).
macro_rules! chunk_head_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn $name(
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
            out: SendPtr,
        ) {
            chunk_head_body(sc, st, hi, t0, c, s, q, k, v, g, beta, out)
        }
    };
}
chunk_head_for!(chunk_head_avx2, "avx2,fma");
chunk_head_for!(chunk_head_avx512, "avx512f,avx2,fma");

#[allow(
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::manual_memcpy
)]
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
    out: SendPtr,
) {
    let KdaShape {
        h, k: kd, v: vd, ..
    } = s;
    const C: usize = CHUNK;
    // Gather the chunk of this head; Γ = cumsum g. One fused loop per row (no memcpy calls:
    // hence the `manual_memcpy` allowance) so that the loads of q, k, g and v rows are all in
    // flight together.
    for r in 0..c {
        let ti = t0 + r;
        let base = (ti * h + hi) * kd;
        let vb = (ti * h + hi) * vd;
        let (qr, kr, gr) = (
            &q[base..base + kd],
            &k[base..base + kd],
            &g[base..base + kd],
        );
        let (gprev, gcur) = sc.gam.split_at_mut(r * kd);
        let gcur = &mut gcur[..kd];
        let qd = &mut sc.qc[r * kd..(r + 1) * kd];
        let kdst = &mut sc.kc[r * kd..(r + 1) * kd];
        if r == 0 {
            for d in 0..kd {
                qd[d] = qr[d];
                kdst[d] = kr[d];
                gcur[d] = gr[d];
            }
        } else {
            let gprev = &gprev[(r - 1) * kd..r * kd];
            for d in 0..kd {
                qd[d] = qr[d];
                kdst[d] = kr[d];
                gcur[d] = gprev[d] + gr[d];
            }
        }
        for (x, y) in sc.u[r * vd..(r + 1) * vd].iter_mut().zip(&v[vb..vb + vd]) {
            *x = *y;
        }
        sc.bc[r] = beta[ti * h + hi];
    }
    // Per sub-chunk: qf, factorisability, e^{Γ_n}, ρ, kinv; then e^Γ.
    let nsub = c.div_ceil(SUB);
    for bi in 0..nsub {
        let (r0, r1) = (bi * SUB, ((bi + 1) * SUB).min(c));
        let gn = &sc.gam[r0 * kd..(r0 + 1) * kd];
        for i in r0..r1 {
            let gi = &sc.gam[i * kd..(i + 1) * kd];
            let qf = &mut sc.qf[i * kd..(i + 1) * kd];
            for ((e, a), b) in qf.iter_mut().zip(gi).zip(gn) {
                *e = a - b;
            }
        }
        // Row i is factorisable when it and every earlier row of its block stay within
        // SPAN_MAX of the reference (causal: later rows never change an earlier row's path).
        let mut ok = true;
        for i in r0..r1 {
            let (lo, hi_) = min_max(&sc.qf[i * kd..(i + 1) * kd]);
            ok = ok && lo >= -SPAN_MAX && hi_ <= SPAN_MAX;
            sc.ok[i] = ok;
        }
        exp_inplace(&mut sc.qf[r0 * kd..r1 * kd]);
        let egn = &mut sc.egn[bi * kd..(bi + 1) * kd];
        egn.copy_from_slice(gn);
        exp_inplace(egn);
        if bi > 0 {
            let gp = &sc.gam[(r0 - SUB) * kd..(r0 - SUB + 1) * kd];
            let rho = &mut sc.rho[bi * kd..(bi + 1) * kd];
            for ((r, a), b) in rho.iter_mut().zip(gn).zip(gp) {
                *r = a - b;
            }
            exp_inplace(rho);
        }
        for i in r0..r1 {
            let row = i * kd..(i + 1) * kd;
            let egn = &sc.egn[bi * kd..(bi + 1) * kd];
            for ((e, a), b) in sc.eg[row.clone()]
                .iter_mut()
                .zip(egn)
                .zip(&sc.qf[row.clone()])
            {
                *e = a * b;
            }
            if sc.ok[i] {
                for ((x, a), b) in sc.kinv[row.clone()]
                    .iter_mut()
                    .zip(&sc.kc[row.clone()])
                    .zip(&sc.qf[row])
                {
                    *x = a / b;
                }
            } else {
                sc.kinv[row].fill(0.0);
            }
        }
    }
    transpose(&sc.kinv, c, kd, kd, &mut sc.kinvt, C);

    // 1. A_kk (β_i-scaled, strictly lower) and A_qk (inclusive lower), sub-chunk by sub-chunk.
    for si in 0..nsub {
        let (r0, r1) = (si * SUB, ((si + 1) * SUB).min(c));
        let m = r1 - r0;
        // Query side.
        for i in r0..r1 {
            let li = i - r0;
            let qf = &sc.qf[i * kd..(i + 1) * kd];
            for d in 0..kd {
                sc.qk[li * kd + d] = sc.kc[i * kd + d] * qf[d];
                sc.qk[(m + li) * kd + d] = sc.qc[i * kd + d] * qf[d];
            }
        }
        // Key side (transposed), block by block going back: rf = e^{Γ_{n_s} − Γ_{n_b}}.
        // Columns of non-factorisable rows are explicit exponents (earlier blocks) or zero
        // (this block: those rows take pairwise exponents below).
        sc.rf.fill(1.0);
        for bi in (0..=si).rev() {
            if bi < si {
                let rho = &sc.rho[(bi + 1) * kd..(bi + 2) * kd];
                for (r, p) in sc.rf.iter_mut().zip(rho) {
                    *r *= p;
                }
            }
            let (b0, b1) = (bi * SUB, ((bi + 1) * SUB).min(c));
            for d in 0..kd {
                let f = sc.rf[d];
                let (dst, src) = (&mut sc.kf[d * C + b0..d * C + b1], &sc.kinvt[d * C + b0..]);
                for (x, y) in dst.iter_mut().zip(src) {
                    *x = y * f;
                }
            }
            if bi < si {
                // Rows with strong decay: explicit e^{Γ_{n_s} − Γ_j} ≤ 1, scattered.
                let gn = &sc.gam[r0 * kd..(r0 + 1) * kd];
                for j in (b0..b1).filter(|&j| !sc.ok[j]) {
                    let row = j * kd..(j + 1) * kd;
                    mul_exp_diff(&mut sc.erow, &sc.kc[row.clone()], gn, &sc.gam[row]);
                    for d in 0..kd {
                        sc.kf[d * C + j] = sc.erow[d];
                    }
                }
            }
        }
        let a = MatA {
            data: &sc.qk[..2 * m * kd],
            rs: kd,
            cs: 1,
        };
        gemm(2 * m, r1, kd, a, &sc.kf, C, &mut sc.prod, C, Mode::Set);
        for i in r0..r1 {
            let li = i - r0;
            let b = sc.bc[i];
            let (nk, nq) = (i, i + 1);
            let akk = &mut sc.akk[i * C..(i + 1) * C];
            for (a, p) in akk[..nk].iter_mut().zip(&sc.prod[li * C..li * C + nk]) {
                *a = b * p;
            }
            akk[nk..].fill(0.0);
            let aqk = &mut sc.aqk[i * C..(i + 1) * C];
            aqk[..nq].copy_from_slice(&sc.prod[(m + li) * C..(m + li) * C + nq]);
            aqk[nq..].fill(0.0);
            if !sc.ok[i] {
                // Pairwise exponents on the diagonal block: e^{Γ_i − Γ_j} ≤ 1 for j ≤ i.
                let gi = &sc.gam[i * kd..(i + 1) * kd];
                for j in r0..=i {
                    let gj = &sc.gam[j * kd..(j + 1) * kd];
                    mul_exp_diff(&mut sc.erow, &sc.kc[j * kd..(j + 1) * kd], gi, gj);
                    let (ki, qi) = (&sc.kc[i * kd..(i + 1) * kd], &sc.qc[i * kd..(i + 1) * kd]);
                    let (mut skk, mut sqk) = (0f32, 0f32);
                    for d in 0..kd {
                        skk += ki[d] * sc.erow[d];
                        sqk += qi[d] * sc.erow[d];
                    }
                    if j < i {
                        sc.akk[i * C + j] = b * skk;
                    }
                    sc.aqk[i * C + j] = sqk;
                }
            }
        }
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
        // SAFETY: output row (t0 + i, hi) is `vd` floats inside `out`, written only by the task
        // that owns head hi.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sc.o[i * vd..].as_ptr(),
                out.get().add(((t0 + i) * h + hi) * vd),
                vd,
            );
        }
    }
    // S ← Diag(e^{Γ_last}) S + (e^{Γ_last − Γ}⊙K)ᵀ V'; e^{Γ_last − Γ_i} k_i = kinv_i·qf_last·Πρ.
    let last = (c - 1) * kd;
    sc.rf.copy_from_slice(&sc.qf[last..last + kd]);
    for bi in (0..nsub).rev() {
        if bi + 1 < nsub {
            let rho = &sc.rho[(bi + 1) * kd..(bi + 2) * kd];
            for (r, p) in sc.rf.iter_mut().zip(rho) {
                *r *= p;
            }
        }
        for i in bi * SUB..((bi + 1) * SUB).min(c) {
            let row = i * kd..(i + 1) * kd;
            if sc.ok[i] {
                for ((x, a), f) in sc.eq[row.clone()].iter_mut().zip(&sc.kinv[row]).zip(&sc.rf) {
                    *x = a * f;
                }
            } else {
                mul_exp_diff(
                    &mut sc.eq[row.clone()],
                    &sc.kc[row.clone()],
                    &sc.gam[last..last + kd],
                    &sc.gam[row],
                );
            }
        }
    }
    let ka = MatA {
        data: &sc.eq[..c * kd],
        rs: 1,
        cs: kd,
    };
    let decay = Mode::ScaleAdd(&sc.eg[last..last + kd]);
    gemm(kd, vd, c, ka, &sc.u, vd, st, vd, decay);
}
