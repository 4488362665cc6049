//! Kimi Delta Attention: the gated delta rule with per-channel decay, in its two exact forms.
//!
//! Per head, with state `S ∈ R^{K×V}` (rows = key channel, f32), for each token `t`:
//! ```text
//! S ← Diag(exp(g_t)) S;  u = β_t (v_t − Sᵀk_t);  S ← S + k_t uᵀ;  o_t = Sᵀ q_t
//! ```
//! (paper Eq. 1; spec §5.2). `q` and `k` arrive L2-normalised, `q` already scaled by `K^-1/2`;
//! `g ≤ 0` is the log-decay from the gate.
//!
//! - [`kda_recurrent`] is the token loop, the decode form: per head two passes over the state
//!   a token (decay and `Sᵀk`; update and output), compiled for the CPU's widest instruction
//!   set. [`kda_chunked_reference`] is the same recurrence written plainly, the twin of both.
//! - [`kda_chunked`] is the chunkwise-parallel (WY / UT-transform) form used for prefill
//!   (spec §5.3, fla `naive_chunk_kda`): within a chunk of `C = 64` tokens,
//!   `Γ = cumsum g`, `A_kk[i,j] = β_i Σ_d k_i k_j e^{Γ_i−Γ_j}` (j<i), `W = (I+A_kk)⁻¹ Diag(β)(e^Γ⊙K)`,
//!   `U = (I+A_kk)⁻¹ Diag(β) V`, `V' = U − W S`, `O = (e^Γ⊙Q) S + A_qk V'` with
//!   `A_qk[i,j] = Σ_d q_i k_j e^{Γ_i−Γ_j}` (j≤i), `S ← Diag(e^{Γ_C}) S + (e^{Γ_C−Γ}⊙K)ᵀ V'`.
//!   It is evaluated as small dense products (register-blocked, AVX-512 or AVX2 when
//!   available): per 16-row sub-chunk, `A_kk`/`A_qk` come from one product against keys
//!   rescaled to the sub-chunk's first row `n` (factors `e^{Γ_i−Γ_n}`, `e^{Γ_n−Γ_j}`; never
//!   `e^{−Γ_j}` over a whole chunk, which overflows for strong decays), `W`/`U` from a forward
//!   substitution blocked into products, and `W·S`, `A_qk·V'`, `Kᵀ·V'` are plain products; about
//!   `C·K` exponentials per chunk and head instead of `C²·K`. Rows with very strong decay fall
//!   back to pairwise exponents (see `chunk_head`), and every row of a chunk depends bit for bit
//!   only on the rows before it.
//!
//!   What makes it fast, beyond the algebra (docs/performance.md has the measurements):
//!   - *Denormals flushed* ([`crate::cpu::FlushDenormals`]) while a head runs: with strong
//!     decays, `e^Γ` reaches `1e-35` within a chunk and many products land below `1.2e-38`,
//!     each costing a microcode assist; this alone was worth ×1.5–1.8 on such inputs.
//!   - *Operand rows padded* to `K + 16` floats, the head's state included (copied in and out
//!     once per call): rows of exactly 512 bytes put a product's column strip into a quarter of
//!     the L1 sets.
//!   - *Inputs read in place* (no gather of the head's rows), each row's inputs fetched into L1
//!     while the row before it is computed; head-major rows, in whole pages, for the hardware's
//!     stream prefetchers. The products themselves issue no prefetches: a
//!     prefetch of the next chunk's rows (4 KiB or more apart, each a page of its own) paced
//!     through the register tiles stalled the tiles on a full fill buffer and cost 2–18% more
//!     than it saved (docs/performance.md).
//!   - *Outputs streamed* where [`crate::cpu::Features::nontemporal`] says so (AMD): a chunk's
//!     `O` is computed into the scratch and written to its rows (token-major `H·V` floats
//!     apart, each row in a page of its own) with non-temporal stores
//!     ([`crate::simd::stream_copy`]), so that its lines are neither read from memory first nor
//!     left to evict the next chunk's inputs: 4–5% faster on the Zen 5 VM token-major, the same
//!     as computing `O` in place head-major. The Intel VM measured streaming 2–7% slower than
//!     computing `O` straight into its rows (token-major), which other CPUs keep doing.
//! - [`kda_chunked_state`] is the same form's state update alone (no `O`): what a sequence needs
//!   to fold rows whose outputs it gave out already into its state.
//!
//! Layouts: `q, k, g` `[T, H, K]`, `v` and `out` `[T, H, V]` (PyTorch's order), or all of
//! them head-major (`[H, T, ·]`, [`KdaLayout`]: a head's rows consecutive, which the chunked
//! form reads 5–8% faster, and which the layers' producers write at no cost of their own:
//! [`kda_gate_heads`], [`crate::conv1d::conv1d_causal_silu_heads`],
//! [`crate::norm::rms_norm_gated_heads`]); `beta` `[T, H]` and `state` `[H, K, V]` in both.
//! Both layouts give the same bits. Heads run in parallel. [`kda_chunked_carry`] is the
//! chunked form for a caller that carries a partial chunk to its next call.

use crate::activation::{softplus_scaled, softplus_scaled_reference};
use crate::dense::{exp_inplace, forward_subst_blocked, gemm, gemm_ptr, mul_exp_diff, MatA, Mode};
use crate::par::SendPtr;
use crate::simd::{prefetch_l1, stream_copy, stream_fence};
use crate::transpose::transpose;
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
    /// How the rows of `q`, `k`, `g`, `v` and `out` lie (`beta` is `[T, H]` in both).
    pub layout: KdaLayout,
}

/// The order of a call's `[token, head]` rows in `q`, `k`, `g`, `v` and `out`.
///
/// A chunk of one head reads 64 rows of each input. Token-major (PyTorch's order), those rows
/// are `H·K` floats apart, each in a page of its own (16 KiB apart at 32 heads of 128), and
/// the hardware's stream prefetchers, which stop at page boundaries, fetch none of them ahead;
/// the kernel's own prefetches did not make up for it (docs/performance.md). Head-major, a
/// head's rows are consecutive: its chunk is 32 KiB of each input in order, and its outputs too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdaLayout {
    /// `[T, H, w]`: row `(t, h)` at `(t·H + h)·w`.
    TokenMajor,
    /// `[H, T, w]`: row `(t, h)` at `(h·T + t)·w`.
    HeadMajor,
}

impl KdaShape {
    /// A token-major shape.
    pub fn new(t: usize, h: usize, k: usize, v: usize) -> Self {
        KdaShape {
            t,
            h,
            k,
            v,
            layout: KdaLayout::TokenMajor,
        }
    }

    /// The same shape with its rows head-major.
    pub fn head_major(self) -> Self {
        KdaShape {
            layout: KdaLayout::HeadMajor,
            ..self
        }
    }

    /// Offset of row `(ti, hi)` of a tensor of rows `w` floats wide in this shape's layout.
    #[inline(always)]
    pub fn row(&self, ti: usize, hi: usize, w: usize) -> usize {
        match self.layout {
            KdaLayout::TokenMajor => (ti * self.h + hi) * w,
            KdaLayout::HeadMajor => (hi * self.t + ti) * w,
        }
    }

    /// Floats from one token's row of a head to the next token's, rows `w` floats wide.
    #[inline(always)]
    pub fn token_stride(&self, w: usize) -> usize {
        match self.layout {
            KdaLayout::TokenMajor => self.h * w,
            KdaLayout::HeadMajor => w,
        }
    }
}

/// Copies rows `src_t0..src_t0 + n` of every head of `src` (laid out as `src_shape`) to rows
/// `dst_t0..dst_t0 + n` of `dst` (laid out as `dst_shape`), rows `w` floats wide: a change of
/// layout, or rows moved between calls' tensors (the layers' chunk carry). Both shapes must
/// have the same heads.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(
    src: &[f32],
    src_shape: KdaShape,
    src_t0: usize,
    dst: &mut [f32],
    dst_shape: KdaShape,
    dst_t0: usize,
    n: usize,
    w: usize,
) {
    assert_eq!(src_shape.h, dst_shape.h, "kda copy_rows: heads differ");
    assert!(
        src_t0 + n <= src_shape.t && dst_t0 + n <= dst_shape.t,
        "kda copy_rows: rows out of range"
    );
    assert!(
        src.len() >= src_shape.t * src_shape.h * w && dst.len() >= dst_shape.t * dst_shape.h * w
    );
    for hi in 0..src_shape.h {
        for i in 0..n {
            let (a, b) = (
                src_shape.row(src_t0 + i, hi, w),
                dst_shape.row(dst_t0 + i, hi, w),
            );
            dst[b..b + w].copy_from_slice(&src[a..a + w]);
        }
    }
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

/// [`kda_gate`] from the gate's projection `gate_in` (`[T, H·K]`) into a head-major `out`
/// (`[H, T, K]`, [`KdaLayout::HeadMajor`]): the same bits, in the layout the chunk kernel
/// reads fastest, with no pass of its own for the change.
pub fn kda_gate_heads(
    gate_in: &[f32],
    a_log: &[f32],
    dt_bias: &[f32],
    h: usize,
    k: usize,
    out: &mut [f32],
) {
    assert_eq!(
        gate_in.len() % (h * k),
        0,
        "kda_gate_heads: gate_in is not [T, H·K]"
    );
    assert_eq!(gate_in.len(), out.len(), "kda_gate_heads: out");
    let t = gate_in.len() / (h * k);
    let (src, heads) = (
        KdaShape::new(t, h, k, k),
        KdaShape::new(t, h, k, k).head_major(),
    );
    let dst = SendPtr(out.as_mut_ptr());
    crate::par::row_blocks(t, 32, |rows| {
        for ti in rows {
            for (hi, al) in a_log[..h].iter().enumerate() {
                // SAFETY: row (hi, ti) of `out` (`K` floats inside it: lengths checked), which
                // only the block of token ti writes.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(heads.row(ti, hi, k)), k)
                };
                o.copy_from_slice(&gate_in[src.row(ti, hi, k)..][..k]);
                softplus_scaled(o, &dt_bias[hi * k..(hi + 1) * k], -al.exp());
            }
        }
    });
}

/// [`kda_gate_heads`] as [`kda_gate_reference`] on a copy followed by a plain copy of each row
/// to its head-major place (its twin).
pub fn kda_gate_heads_reference(
    gate_in: &[f32],
    a_log: &[f32],
    dt_bias: &[f32],
    h: usize,
    k: usize,
    out: &mut [f32],
) {
    let mut g = gate_in.to_vec();
    kda_gate_reference(&mut g, a_log, dt_bias, h, k);
    let t = g.len() / (h * k);
    let shape = KdaShape::new(t, h, k, k);
    copy_rows(&g, shape, 0, out, shape.head_major(), 0, t, k);
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

/// The shape checks of a call: the inputs, the state and, when there is one, the output.
#[allow(clippy::too_many_arguments)]
fn check(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &[f32],
    out: Option<&[f32]>,
) {
    let KdaShape {
        t, h, k: kd, v: vd, ..
    } = s;
    assert_eq!(q.len(), t * h * kd, "kda: q");
    assert_eq!(k.len(), t * h * kd, "kda: k");
    assert_eq!(g.len(), t * h * kd, "kda: g");
    assert_eq!(v.len(), t * h * vd, "kda: v");
    assert_eq!(beta.len(), t * h, "kda: beta");
    assert_eq!(state.len(), h * kd * vd, "kda: state");
    if let Some(out) = out {
        assert_eq!(out.len(), t * h * vd, "kda: out");
    }
}

/// Token-by-token recurrence: the decode path (its plain twin is [`kda_chunked_reference`]).
///
/// Each head's step is two passes over its state, each row once: decay it and subtract its
/// share of `Sᵀk` from `u` (which starts as `v`); then add `k uᵀ` to it and its share of `Sᵀq`
/// to the output. On the SIMD paths the body is compiled for the CPU's widest instruction set
/// and accumulates with fused multiply–adds (a multiply and an add for the columns past the
/// last multiple of 8, as [`crate::simd::axpy`] does, whose three calls a row it replaces), so
/// the AVX2 and AVX-512 builds give the same bits; the portable build multiplies and adds.
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
    check(s, q, k, v, g, beta, state, Some(out));
    let KdaShape {
        t, h, k: kd, v: vd, ..
    } = s;
    let x = Inputs {
        s,
        q,
        k,
        v,
        g,
        beta,
        out: Some(SendPtr(out.as_mut_ptr())),
        carry: false,
    };
    // Heads in parallel from 64 × 64 states on: `mini`'s decode step (16 such heads, 256 KiB of
    // state read and written twice) had run on one thread while the other waited; on two
    // threads its decode gained about 5% (median of eight alternations, 201 → 212 tok/s).
    if h == 1 || t * kd * vd < 1 << 12 {
        for (hi, st) in state.chunks_exact_mut(kd * vd).enumerate() {
            recurrent_head_isa(&x, hi, st);
        }
    } else {
        state
            .par_chunks_exact_mut(kd * vd)
            .enumerate()
            .for_each(|(hi, st)| recurrent_head_isa(&x, hi, st));
    }
}

/// [`recurrent_head`] for the widest instruction set the CPU has.
fn recurrent_head_isa(x: &Inputs, hi: usize, st: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::features().isa() {
        // SAFETY: AVX-512F (and AVX2+FMA) checked; the body is safe code compiled for it.
        crate::cpu::Isa::Avx512 => unsafe { return recurrent_head_avx512(x, hi, st) },
        // SAFETY: AVX2+FMA checked.
        crate::cpu::Isa::Avx2 => unsafe { return recurrent_head_avx2(x, hi, st) },
        crate::cpu::Isa::Portable => {}
    }
    recurrent_head::<false>(x, hi, st)
}

/// `recurrent_head::<true>` compiled for one instruction set.
macro_rules! recurrent_head_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(x: &Inputs, hi: usize, st: &mut [f32]) {
            recurrent_head::<true>(x, hi, st)
        }
    };
}
recurrent_head_for!(recurrent_head_avx2, "avx2,fma");
recurrent_head_for!(recurrent_head_avx512, "avx512f,avx2,fma");

/// `y + a·x`: fused where `FMA` (the SIMD builds), else a multiply and an add.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, x: f32, y: f32) -> f32 {
    if FMA {
        a.mul_add(x, y)
    } else {
        y + a * x
    }
}

/// Head `hi`'s tokens, one after the other, on its state `st` (`[K, V]`). `FMA`: columns below
/// the last multiple of 8 accumulate with fused multiply–adds (see [`kda_recurrent`]).
#[inline(always)]
fn recurrent_head<const FMA: bool>(x: &Inputs, hi: usize, st: &mut [f32]) {
    let KdaShape {
        t, h, k: kd, v: vd, ..
    } = x.s;
    // Columns accumulated the fused way (all of them but a tail, as `simd::axpy` splits them).
    let vf = if FMA { vd / 8 * 8 } else { 0 };
    let out = x.out.expect("kda_recurrent always writes its outputs");
    let mut ubuf = [0f32; 512];
    let mut uvec;
    let u: &mut [f32] = if vd <= 512 {
        &mut ubuf[..vd]
    } else {
        uvec = vec![0f32; vd];
        &mut uvec
    };
    for ti in 0..t {
        let base = x.s.row(ti, hi, kd);
        let (qt, kt, gt) = (
            &x.q[base..base + kd],
            &x.k[base..base + kd],
            &x.g[base..base + kd],
        );
        let b = x.beta[ti * h + hi];
        // S ← Diag(e^g) S, and u = v − Sᵀk, row by row.
        u.copy_from_slice(&x.v[x.s.row(ti, hi, vd)..][..vd]);
        for (row, (&gd, &kd_)) in st.chunks_exact_mut(vd).zip(gt.iter().zip(kt)) {
            let e = gd.exp();
            let nk = -kd_;
            let (rf, rt) = row.split_at_mut(vf);
            let (uf, ut) = u.split_at_mut(vf);
            for (r, uu) in rf.iter_mut().zip(uf.iter_mut()) {
                *r *= e;
                *uu = madd::<FMA>(nk, *r, *uu);
            }
            for (r, uu) in rt.iter_mut().zip(ut.iter_mut()) {
                *r *= e;
                *uu += nk * *r;
            }
        }
        for y in u.iter_mut() {
            *y *= b;
        }
        // S += k uᵀ and o = Sᵀq, row by row.
        // SAFETY: the (ti, hi) output row is written only by head hi's task.
        let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(x.s.row(ti, hi, vd)), vd) };
        o.fill(0.0);
        for (row, (&kd_, &qd)) in st.chunks_exact_mut(vd).zip(kt.iter().zip(qt)) {
            let (rf, rt) = row.split_at_mut(vf);
            let (of, ot) = o.split_at_mut(vf);
            for ((r, &uu), oo) in rf.iter_mut().zip(&u[..vf]).zip(of.iter_mut()) {
                *r = madd::<FMA>(kd_, uu, *r);
                *oo = madd::<FMA>(qd, *r, *oo);
            }
            for ((r, &uu), oo) in rt.iter_mut().zip(&u[vf..]).zip(ot.iter_mut()) {
                *r += kd_ * uu;
                *oo += qd * *r;
            }
        }
    }
}

/// Rows ahead that a chunk's row-wise passes prefetch their inputs into L1: `g` in the
/// cumulative sum, `k`, `q` and `v` in the row pass. Their first touch of each row had waited on
/// memory: under `perf`, about 45% of the row-wise work's samples (a third of the kernel) sat
/// on those loads and on the one-row-ahead prefetches. Eight rows ahead (4 KiB of each input at
/// K = 128): `cargo bench`'s head-major case 280–284 → 294–299 GFLOP/s (52% → 55% of the FMA
/// peak, three alternations); one row ahead for `k`, `q`, `v` and none for `g` as before, two
/// rows 282–288, sixteen 289–295, `g` alone 287–292, the row pass alone 280–293.
const ROWS_AHEAD: usize = 8;

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
    check(s, q, k, v, g, beta, state, Some(out));
    let KdaShape {
        t, h, k: kd, v: vd, ..
    } = s;
    for hi in 0..h {
        let st = &mut state[hi * kd * vd..(hi + 1) * kd * vd];
        for ti in 0..t {
            let base = s.row(ti, hi, kd);
            let vb = s.row(ti, hi, vd);
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

/// Padding of the rows of the product operands, in floats. A row of 128 floats is 512 bytes, so
/// the two cache lines that a 32-column register tile reads from each of its rows fall into
/// the same 16 of the 64 L1 sets for every row, and a 128-row strip (256 lines) does not fit
/// their 12 ways. Rows of `K + 16` floats (9 lines) spread over every set; the kernel's
/// products, alone and alternated with unpadded ones, ran 2–3% faster.
const PAD: usize = 16;

/// Per-head scratch of the chunked form. `q`, `k`, `g` and `v` are read in place; the operands
/// of the products have rows of `ldk = K + PAD` or `ldv = V + PAD` floats.
struct ChunkScratch {
    dims: (usize, usize), // (K, V) it was made for
    ldk: usize,           // K + PAD
    ldv: usize,           // V + PAD
    s: Vec<f32>,          // [K, ldv] the head's state while its chunks run
    gam: Vec<f32>,        // [C, K] cumulative log-decay Γ
    bc: Vec<f32>,         // [C] β
    qf: Vec<f32>,         // [C, K] e^{Γ_i − Γ_n(i)} (n(i) = first row of i's sub-chunk)
    kinv: Vec<f32>,       // [C, K] k_i / qf_i (factorisable rows; 0 for the others)
    kinvt: Vec<f32>,      // [K, C] kinv transposed
    rho: Vec<f32>,        // [C/SUB, K] e^{Γ_n(b) − Γ_n(b−1)}
    egn: Vec<f32>,        // [C/SUB, K] e^{Γ_n(b)}
    ok: Vec<bool>,        // [C] row factorisable (causal, within its sub-chunk; see SPAN_MAX)
    rf: Vec<f32>,         // [K] running product of rho
    kf: Vec<f32>,         // [K, C] key side k_j·e^{Γ_n − Γ_j}, transposed
    kq: Vec<f32>,         // [2·SUB, ldk] this sub-chunk's k_i·qf_i rows, then its q_i·qf_i rows
    erow: Vec<f32>,       // [K]
    elast: Vec<f32>,      // [K] e^{Γ_last}
    prod: Vec<f32>,       // [2·SUB, C]
    akk: Vec<f32>,        // [C, C] β_i-scaled, strictly lower
    aqk: Vec<f32>,        // [C, C] inclusive lower
    w: Vec<f32>,          // [C, ldk] β_i e^{Γ_i} k_i, then W
    u: Vec<f32>,          // [C, ldv] β_i v_i, then U, then V'
    eq: Vec<f32>,         // [C, ldk] e^{Γ_i} q_i, then e^{Γ_last − Γ_i} k_i
    o: Vec<f32>,          // [C, ldv] the chunk's outputs, streamed to their rows (AMD)
}

impl ChunkScratch {
    fn new(kd: usize, vd: usize) -> Self {
        let c = CHUNK;
        let nsub = CHUNK / SUB;
        let (ldk, ldv) = (kd + PAD, vd + PAD);
        ChunkScratch {
            dims: (kd, vd),
            ldk,
            ldv,
            s: vec![0.0; kd * ldv],
            gam: vec![0.0; c * kd],
            bc: vec![0.0; c],
            qf: vec![0.0; c * kd],
            kinv: vec![0.0; c * kd],
            kinvt: vec![0.0; kd * c],
            rho: vec![0.0; nsub * kd],
            egn: vec![0.0; nsub * kd],
            ok: vec![false; c],
            rf: vec![0.0; kd],
            kf: vec![0.0; kd * c],
            kq: vec![0.0; 2 * SUB * ldk],
            erow: vec![0.0; kd],
            elast: vec![0.0; kd],
            prod: vec![0.0; 2 * SUB * c],
            akk: vec![0.0; c * c],
            aqk: vec![0.0; c * c],
            w: vec![0.0; c * ldk],
            u: vec![0.0; c * ldv],
            eq: vec![0.0; c * ldk],
            o: vec![0.0; c * ldv],
        }
    }
}

/// Floats of the scratch that [`kda_chunked`] keeps on each worker thread between calls, for
/// key width `k` and value width `v` (for memory planning; about 0.4 MiB at 128 × 128).
pub fn chunk_scratch_floats(k: usize, v: usize) -> usize {
    let (c, nsub, ldk, ldv) = (CHUNK, CHUNK / SUB, k + PAD, v + PAD);
    // gam, qf, kinv, kinvt, kf; w, eq; u, o; s; kq; prod; akk, aqk; rho, egn; rf, erow, elast;
    // bc; the `ok` flags (a byte each).
    5 * c * k
        + 2 * c * ldk
        + 2 * c * ldv
        + k * ldv
        + 2 * SUB * ldk
        + 2 * SUB * c
        + 2 * c * c
        + 2 * nsub * k
        + 3 * k
        + c
        + c / 4
}

impl ChunkScratch {
    /// Floats held (what [`chunk_scratch_floats`] promises).
    #[cfg(test)]
    fn floats(&self) -> usize {
        let v = [
            &self.s,
            &self.gam,
            &self.bc,
            &self.qf,
            &self.kinv,
            &self.kinvt,
            &self.rho,
            &self.egn,
            &self.rf,
            &self.kf,
            &self.kq,
            &self.erow,
            &self.elast,
            &self.prod,
            &self.akk,
            &self.aqk,
            &self.w,
            &self.u,
            &self.eq,
            &self.o,
        ];
        v.iter().map(|x| x.len()).sum::<usize>() + self.ok.len() / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The span test on bits decides exactly as the range test on floats (`±SPAN_MAX` itself in
    /// span; just past it, infinities and NaN out), and `e` is `a − b`, at lengths around and
    /// past the vector widths.
    #[test]
    fn diff_out_of_span_matches_the_float_range_test() {
        let edge = [
            0.0,
            -0.0,
            SPAN_MAX,
            -SPAN_MAX,
            f32::from_bits(SPAN_MAX.to_bits() + 1),
            -f32::from_bits(SPAN_MAX.to_bits() + 1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            59.9,
        ];
        for n in [1, 7, 16, 17, 40, 128, 131] {
            for (pos, &x) in edge.iter().enumerate() {
                // `a − b` lands on the edge value at one position; every other difference is
                // small. (Subtracting 0 keeps x exactly, NaN included.)
                let (a, b): (Vec<f32>, Vec<f32>) = (0..n)
                    .map(|i| {
                        if i == pos * 7 % n {
                            (x, 0.0)
                        } else {
                            ((i as f32).sin(), (i as f32).cos())
                        }
                    })
                    .unzip();
                let mut e = vec![1.0; n];
                let out = diff_out_of_span(&mut e, &a, &b);
                let want = a
                    .iter()
                    .zip(&b)
                    .any(|(a, b)| !(-SPAN_MAX..=SPAN_MAX).contains(&(a - b)));
                assert_eq!(out, want, "n {n}, edge {x}");
                for ((e, a), b) in e.iter().zip(&a).zip(&b) {
                    assert_eq!(e.to_bits(), (a - b).to_bits(), "n {n}, edge {x}");
                }
            }
        }
    }

    /// The planner's figure is the scratch's real size.
    #[test]
    fn chunk_scratch_floats_is_exact() {
        for (k, v) in [(128, 128), (17, 47), (64, 32)] {
            let sc = ChunkScratch::new(k, v);
            assert_eq!(chunk_scratch_floats(k, v), sc.floats(), "{k}x{v}");
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
    chunked_with_outputs(s, [q, k, v, g, beta], state, out, false)
}

/// [`kda_chunked`] for a sequence that carries its partial chunk: the outputs of all `T` rows,
/// but `state` advances over the whole chunks only. Rows after the last multiple of [`CHUNK`]
/// take their outputs from the state at their chunk's start and leave it there, so that the
/// next call can recompute that chunk with more rows (the layers' chunk carry). Their outputs
/// and the state are [`kda_chunked`]'s bits on the whole chunks followed by a call on the rest
/// with a copy of the state; this skips the copy and the partial chunk's state update.
#[allow(clippy::too_many_arguments)]
pub fn kda_chunked_carry(
    s: KdaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    chunked_with_outputs(s, [q, k, v, g, beta], state, out, true)
}

/// [`kda_chunked`] (`carry` false) and [`kda_chunked_carry`] (true): `[q, k, v, g, beta]`.
fn chunked_with_outputs(
    s: KdaShape,
    [q, k, v, g, beta]: [&[f32]; 5],
    state: &mut [f32],
    out: &mut [f32],
    carry: bool,
) {
    check(s, q, k, v, g, beta, state, Some(out));
    let out = Some(SendPtr(out.as_mut_ptr()));
    let inputs = Inputs {
        s,
        q,
        k,
        v,
        g,
        beta,
        out,
        carry,
    };
    chunked(inputs, state);
}

/// [`kda_chunked`]'s state update alone: the same `state`, bit for bit, without the outputs
/// (and so with no query and no output buffer; the query-side work runs on `k`, and is
/// discarded). For folding rows whose outputs were given out already into the state.
pub fn kda_chunked_state(
    s: KdaShape,
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    state: &mut [f32],
) {
    check(s, k, k, v, g, beta, state, None);
    let q = k;
    chunked(
        Inputs {
            s,
            q,
            k,
            v,
            g,
            beta,
            out: None,
            carry: false,
        },
        state,
    );
}

/// Both entry points: the heads in parallel, chunk by chunk; the outputs written when
/// `inputs.out` is given.
fn chunked(inputs: Inputs, state: &mut [f32]) {
    let KdaShape {
        t, k: kd, v: vd, ..
    } = inputs.s;
    state
        .par_chunks_exact_mut(kd * vd)
        .enumerate()
        .for_each(|(hi, st)| {
            // Strongly decaying channels make many products denormal (see FlushDenormals).
            let _flush = crate::cpu::FlushDenormals::new();
            CHUNK_SCRATCH.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|sc| sc.dims != (kd, vd)) {
                    *slot = Some(ChunkScratch::new(kd, vd));
                }
                let sc = slot.as_mut().expect("scratch was just made");
                let ldv = sc.ldv;
                for (dst, src) in sc.s.chunks_exact_mut(ldv).zip(st.chunks_exact(vd)) {
                    dst[..vd].copy_from_slice(src);
                }
                let mut t0 = 0;
                while t0 < t {
                    let c = CHUNK.min(t - t0);
                    // Rows t0..t0+c of head hi of `out` are written only here.
                    chunk_head(sc, &inputs, hi, t0, c);
                    t0 += c;
                }
                for (dst, src) in st.chunks_exact_mut(vd).zip(sc.s.chunks_exact(ldv)) {
                    dst.copy_from_slice(&src[..vd]);
                }
                // Output rows streamed with non-temporal stores (AMD) are ordered before the
                // task's end publishes them (no cost to speak of otherwise: once per head).
                stream_fence();
            })
        });
}

thread_local! {
    /// Each thread's [`ChunkScratch`], kept between calls ([`chunk_scratch_floats`]: about
    /// 0.4 MiB at K = V = 128); every element a call reads is written earlier in the same call.
    static CHUNK_SCRATCH: std::cell::RefCell<Option<ChunkScratch>> =
        const { std::cell::RefCell::new(None) };
}

/// One [`kda_chunked`] or [`kda_recurrent`] call's shape, inputs and output, shared by its head
/// tasks.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    s: KdaShape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    beta: &'a [f32],
    /// `out`, written row by row: each head task writes only its own rows (none: the state
    /// alone is wanted).
    out: Option<SendPtr<f32>>,
    /// A final partial chunk leaves the state at its start ([`kda_chunked_carry`]).
    carry: bool,
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
/// 1. Per query sub-chunk `s`, one pass over its input rows for every row-wise operand, then
///    `A_kk`, `A_qk` from one product `[K̃_s; Q̃_s] · K̂ᵀ` with `K̃_s[i] = k_i qf_i`,
///    `Q̃_s[i] = q_i qf_i`, `K̂[j] = k_j e^{Γ_{n_s}−Γ_j}` (all earlier rows, and the diagonal
///    block's factorisable ones).
/// 2. `W`, `U` by forward substitution with `I + A_kk`, 16-row blocks: the rows above a block
///    leave as one product, the block itself row by row.
/// 3. `V' = U − W·S`, `O = (e^Γ⊙Q)·S + A_qk·V'` (computed in the scratch and streamed to the
///    output rows where [`crate::cpu::Features::nontemporal`] says so, else in those rows),
///    `S ← Diag(e^{Γ_C}) S + (e^{Γ_C−Γ}⊙K)ᵀ·V'`.
///
/// `sc.s` holds the head's state (rows padded to `ldv`) for the duration of the call.
fn chunk_head(sc: &mut ChunkScratch, x: &Inputs, hi: usize, t0: usize, c: usize) {
    // Monomorphised on whether `O` is streamed (a run-time branch in the body measured 1–2%
    // slower on the Zen 5 VM).
    if crate::cpu::features().nontemporal {
        chunk_head_isa::<true>(sc, x, hi, t0, c)
    } else {
        chunk_head_isa::<false>(sc, x, hi, t0, c)
    }
}

/// [`chunk_head`] for the widest instruction set the CPU has.
fn chunk_head_isa<const STREAM: bool>(
    sc: &mut ChunkScratch,
    x: &Inputs,
    hi: usize,
    t0: usize,
    c: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::features().isa() {
        // SAFETY: AVX-512F (and AVX2+FMA) checked; the body is the same safe code compiled for
        // AVX-512, so its element-wise loops vectorise 16-wide. Element-wise operations give
        // the same bits at any width (no reductions are vectorised: Rust does not reassociate
        // or contract floating-point arithmetic), and the products it calls pick their kernels
        // by the same rule as elsewhere.
        crate::cpu::Isa::Avx512 => unsafe {
            return chunk_head_avx512::<STREAM>(sc, x, hi, t0, c);
        },
        // SAFETY: AVX2+FMA checked; the body compiled for AVX2 (8-wide loops).
        crate::cpu::Isa::Avx2 => unsafe {
            return chunk_head_avx2::<STREAM>(sc, x, hi, t0, c);
        },
        crate::cpu::Isa::Portable => {}
    }
    chunk_head_body::<STREAM>(sc, x, hi, t0, c)
}

/// `e = a − b`, and whether any `|e|` exceeds [`SPAN_MAX`] or is NaN, in one pass.
///
/// The test runs on the bits: with the sign cleared, an f32's bits order like its magnitude and
/// every NaN's lie above every finite value's, so `!(|d| ≤ SPAN_MAX)` is exactly `|d|'s bits >
/// SPAN_MAX's bits`, and the pass is an integer maximum, which vectorises as a plain reduction.
/// (The range test on floats, kept lane by lane in 16-lane blocks, was vectorised across the
/// blocks instead, with gathers and scatters: about 1.8 cycles an element, more than the
/// exponential after it.)
#[inline(always)]
fn diff_out_of_span(e: &mut [f32], a: &[f32], b: &[f32]) -> bool {
    let mut worst = 0u32;
    for ((e, a), b) in e.iter_mut().zip(a).zip(b) {
        let d = a - b;
        *e = d;
        worst = worst.max(d.to_bits() & 0x7fff_ffff);
    }
    worst > SPAN_MAX.to_bits()
}

/// `dst = f·src` (equal lengths); a sub-chunk's 16 columns in one fixed-size step.
#[inline(always)]
fn scale_block(dst: &mut [f32], src: &[f32], f: f32) {
    if let (Ok(d), Ok(s)) = (
        <&mut [f32; SUB]>::try_from(&mut *dst),
        <&[f32; SUB]>::try_from(src),
    ) {
        // By value, so that the block is one vector load, multiply and store.
        let v: [f32; SUB] = *s;
        *d = v.map(|y| y * f);
    } else {
        for (x, y) in dst.iter_mut().zip(src) {
            *x = y * f;
        }
    }
}

/// `chunk_head_body` compiled for one instruction set (the same safe code; its element-wise
/// loops vectorise to that width).
macro_rules! chunk_head_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const STREAM: bool>(
            sc: &mut ChunkScratch,
            x: &Inputs,
            hi: usize,
            t0: usize,
            c: usize,
        ) {
            chunk_head_body::<STREAM>(sc, x, hi, t0, c)
        }
    };
}
chunk_head_for!(chunk_head_avx2, "avx2,fma");
chunk_head_for!(chunk_head_avx512, "avx512f,avx2,fma");

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn chunk_head_body<const STREAM: bool>(
    sc: &mut ChunkScratch,
    x: &Inputs,
    hi: usize,
    t0: usize,
    c: usize,
) {
    let Inputs {
        s,
        q,
        k,
        v,
        g,
        beta,
        out,
        ..
    } = *x;
    let KdaShape {
        h, k: kd, v: vd, ..
    } = s;
    const C: usize = CHUNK;
    let (ldk, ldv) = (sc.ldk, sc.ldv);
    // Offset of row r of this chunk and head in a tensor of rows `w` wide; rows of q and k in
    // place.
    let at = |r: usize, w: usize| s.row(t0 + r, hi, w);
    let krow = |r: usize| &k[at(r, kd)..][..kd];
    let qrow = |r: usize| &q[at(r, kd)..][..kd];
    let nsub = c.div_ceil(SUB);

    // 1. Per sub-chunk s (rows r0..r1, first row n): Γ = cumsum g, qf = e^{Γ_i − Γ_n} and
    //    factorisability, e^{Γ_n}, ρ; then the row-wise operands (one pass over each input row):
    //    k̃_i = k_i qf_i and q̃_i = q_i qf_i (the query side of the product below),
    //    w_i = β_i e^{Γ_n} k̃_i = β_i e^{Γ_i} k_i, e^{Γ_i} q_i = e^{Γ_n} q̃_i, β_i v_i and
    //    k_i / qf_i; then A_kk (β_i-scaled, strictly lower) and A_qk (inclusive lower) rows of
    //    the sub-chunk from one product.
    for si in 0..nsub {
        let (r0, r1) = (si * SUB, ((si + 1) * SUB).min(c));
        let m = r1 - r0;
        for i in r0..r1 {
            if i + ROWS_AHEAD < c {
                prefetch_l1(&g[at(i + ROWS_AHEAD, kd)..][..kd]);
            }
            let gr = &g[at(i, kd)..][..kd];
            let (prev, cur) = sc.gam.split_at_mut(i * kd);
            let cur = &mut cur[..kd];
            if i == 0 {
                cur.copy_from_slice(gr);
            } else {
                for ((x, p), y) in cur.iter_mut().zip(&prev[(i - 1) * kd..]).zip(gr) {
                    *x = p + y;
                }
            }
        }
        let gn = &sc.gam[r0 * kd..(r0 + 1) * kd];
        // Row i is factorisable when it and every earlier row of its block stay within
        // SPAN_MAX of the reference (causal: later rows never change an earlier row's path).
        let mut ok = true;
        for i in r0..r1 {
            let qf = &mut sc.qf[i * kd..(i + 1) * kd];
            let out = diff_out_of_span(qf, &sc.gam[i * kd..(i + 1) * kd], gn);
            ok = ok && !out;
            sc.ok[i] = ok;
        }
        exp_inplace(&mut sc.qf[r0 * kd..r1 * kd]);
        let egn = &mut sc.egn[si * kd..(si + 1) * kd];
        egn.copy_from_slice(gn);
        exp_inplace(egn);
        if si > 0 {
            let gp = &sc.gam[(r0 - SUB) * kd..(r0 - SUB + 1) * kd];
            let rho = &mut sc.rho[si * kd..(si + 1) * kd];
            for ((r, a), b) in rho.iter_mut().zip(gn).zip(gp) {
                *r = a - b;
            }
            exp_inplace(rho);
        }
        let egn = &sc.egn[si * kd..(si + 1) * kd];
        let (kt, qt) = sc.kq.split_at_mut(m * ldk);
        for i in r0..r1 {
            // The inputs ROWS_AHEAD rows on into L1 while this row is computed.
            if i + ROWS_AHEAD < c {
                prefetch_l1(krow(i + ROWS_AHEAD));
                prefetch_l1(qrow(i + ROWS_AHEAD));
                prefetch_l1(&v[at(i + ROWS_AHEAD, vd)..][..vd]);
            }
            let li = i - r0;
            let b = beta[(t0 + i) * h + hi];
            sc.bc[i] = b;
            let (kr, qr) = (krow(i), qrow(i));
            let qf = &sc.qf[i * kd..][..kd];
            let (kti, qti) = (&mut kt[li * ldk..][..kd], &mut qt[li * ldk..][..kd]);
            let (wi, eqi) = (&mut sc.w[i * ldk..][..kd], &mut sc.eq[i * ldk..][..kd]);
            for d in 0..kd {
                let (kq, qq) = (kr[d] * qf[d], qr[d] * qf[d]);
                kti[d] = kq;
                qti[d] = qq;
                wi[d] = b * (egn[d] * kq);
                eqi[d] = egn[d] * qq;
            }
            let ki = &mut sc.kinv[i * kd..][..kd];
            if sc.ok[i] {
                for d in 0..kd {
                    ki[d] = kr[d] / qf[d];
                }
            } else {
                ki.fill(0.0);
            }
            let (ui, vi) = (&mut sc.u[i * ldv..][..vd], &v[at(i, vd)..][..vd]);
            for (x, y) in ui.iter_mut().zip(vi) {
                *x = b * y;
            }
        }
        transpose(&sc.kinv[r0 * kd..], m, kd, kd, &mut sc.kinvt[r0..], C);

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
            let rows = sc.kf.chunks_exact_mut(C).zip(sc.kinvt.chunks_exact(C));
            for ((dst, src), &f) in rows.zip(&sc.rf) {
                scale_block(&mut dst[b0..b1], &src[b0..b1], f);
            }
            if bi < si {
                // Rows with strong decay: explicit e^{Γ_{n_s} − Γ_j} ≤ 1, scattered.
                let gn = &sc.gam[r0 * kd..(r0 + 1) * kd];
                for j in (b0..b1).filter(|&j| !sc.ok[j]) {
                    mul_exp_diff(&mut sc.erow, krow(j), gn, &sc.gam[j * kd..(j + 1) * kd]);
                    for d in 0..kd {
                        sc.kf[d * C + j] = sc.erow[d];
                    }
                }
            }
        }
        let a = MatA {
            data: &sc.kq[..2 * m * ldk],
            rs: ldk,
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
                let (ki, qi) = (krow(i), qrow(i));
                for j in r0..=i {
                    let gj = &sc.gam[j * kd..(j + 1) * kd];
                    mul_exp_diff(&mut sc.erow, krow(j), gi, gj);
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
    forward_subst_blocked(c, &sc.akk, C, &mut sc.w, ldk, kd, SUB);
    forward_subst_blocked(c, &sc.akk, C, &mut sc.u, ldv, vd, SUB);

    // 3. V' = U − W·S.
    let wa = MatA {
        data: &sc.w[..c * ldk],
        rs: ldk,
        cs: 1,
    };
    gemm(c, vd, kd, wa, &sc.s, ldv, &mut sc.u, ldv, Mode::Sub);
    // O = (e^Γ⊙Q)·S + A_qk·V' (A_qk is zero above the diagonal: stop each block at its end),
    // straight into this head's output rows (`h·V` apart), when outputs are wanted.
    if let Some(out) = out {
        // SAFETY: rows (t0 + i, hi), i < c, of `out` are `vd` floats each inside `out` (its length
        // was checked), and only the task that owns head hi touches them.
        let dst = unsafe { out.get().add(at(0, vd)) };
        // Where `O` is computed: the scratch, each sub-chunk's rows streamed to the output rows
        // once they are complete, between the products (AMD; a burst of the whole chunk's rows
        // at the end measured 1% slower), or the output rows themselves.
        let (o, ldo) = if STREAM {
            (sc.o.as_mut_ptr(), ldv)
        } else {
            (dst, s.token_stride(vd))
        };
        let qa = MatA {
            data: &sc.eq[..c * ldk],
            rs: ldk,
            cs: 1,
        };
        // SAFETY: `o` is the scratch (`C` rows of `ldv`) or the output rows (as above).
        unsafe { gemm_ptr(c, vd, kd, qa, &sc.s, ldv, o, ldo, Mode::Set) };
        for si in 0..nsub {
            let (r0, r1) = (si * SUB, ((si + 1) * SUB).min(c));
            let a = MatA {
                data: &sc.aqk[r0 * C..],
                rs: C,
                cs: 1,
            };
            // SAFETY: as above (rows r0..r1).
            let o = unsafe { o.add(r0 * ldo) };
            // SAFETY: as above (rows r0..r1).
            unsafe { gemm_ptr(r1 - r0, vd, r1, a, &sc.u, ldv, o, ldo, Mode::Add) };
            if STREAM {
                for i in r0..r1 {
                    // SAFETY: as above (row i).
                    unsafe {
                        stream_copy(
                            dst.add(i * s.token_stride(vd)),
                            &sc.o[i * ldv..i * ldv + vd],
                        )
                    };
                }
            }
        }
    }
    if x.carry && c < C {
        // A partial chunk carried to the next call: the state stays at its start.
        return;
    }
    // S ← Diag(e^{Γ_last}) S + (e^{Γ_last − Γ}⊙K)ᵀ V'; e^{Γ_last − Γ_i} k_i = kinv_i·qf_last·Πρ.
    let last = (c - 1) * kd;
    sc.rf.copy_from_slice(&sc.qf[last..last + kd]);
    let egn_last = &sc.egn[(nsub - 1) * kd..nsub * kd];
    for ((e, a), b) in sc.elast.iter_mut().zip(egn_last).zip(&sc.rf) {
        *e = a * b;
    }
    for bi in (0..nsub).rev() {
        if bi + 1 < nsub {
            let rho = &sc.rho[(bi + 1) * kd..(bi + 2) * kd];
            for (r, p) in sc.rf.iter_mut().zip(rho) {
                *r *= p;
            }
        }
        for i in bi * SUB..((bi + 1) * SUB).min(c) {
            let row = i * kd..(i + 1) * kd;
            let eqi = &mut sc.eq[i * ldk..][..kd];
            if sc.ok[i] {
                for ((x, a), f) in eqi.iter_mut().zip(&sc.kinv[row]).zip(&sc.rf) {
                    *x = a * f;
                }
            } else {
                mul_exp_diff(eqi, krow(i), &sc.gam[last..last + kd], &sc.gam[row]);
            }
        }
    }
    let ka = MatA {
        data: &sc.eq[..c * ldk],
        rs: 1,
        cs: ldk,
    };
    gemm(
        kd,
        vd,
        c,
        ka,
        &sc.u,
        ldv,
        &mut sc.s,
        ldv,
        Mode::ScaleAdd(&sc.elast),
    );
}
