//! Kimi Delta Attention layer (HF `KimiDeltaAttention`, spec §5).
//!
//! ```text
//! q,k,v = SiLU(causal_conv(W_{q,k,v} x))           # depthwise, width W, carried history
//! g     = −exp(A_log) · softplus(W_fb W_fa x + dt_bias)   # per channel, f32
//! β     = sigmoid(W_b x)                             # per head
//! q,k   = l2norm(q)·K^-½, l2norm(k)
//! o     = delta rule (chunked for prefill, recurrent for decode) with state S [H, K, V]
//! y     = W_o( RMSNorm(o)·w ⊙ sigmoid(W_gb W_ga x) )   # per head
//! ```
//! Both gates read the layer input `x` (after `input_layernorm`), not the conv output.
//!
//! From the convolutions to the output norm the per-head tensors (`q`, `k`, `v`, `g`, `o`) are
//! head-major, `[H, T, K]`: the layout in which the chunk kernel reads a head's rows in order
//! ([`kl_kernels::kda::KdaLayout`]). The convolutions and the gate write it, the output norm
//! reads it back into token rows for `W_o`, so the change costs no pass of its own; the chunk
//! carry's rows stay token-major (`[CHUNK−1, H, K]`) and are moved in and out by row.

use crate::linear::Linear;
use crate::{vector, Mode, Probe, Scratch};
use kl_config::KdaDims;
use kl_kernels::activation::sigmoid_inplace;
use kl_kernels::conv1d::conv1d_causal_silu_heads;
use kl_kernels::kda::{
    copy_rows, kda_chunked_carry, kda_chunked_state, kda_gate_heads, kda_recurrent, KdaLayout,
    KdaShape, CHUNK,
};
use kl_kernels::norm::{l2_normalize_rows, rms_norm_gated_heads};
use kl_weights::{Checkpoint, WeightsError};

/// Per-sequence state of one KDA layer.
///
/// **Chunk carry.** Prefill runs the chunkwise-parallel form with chunks aligned to the sequence
/// (positions `0..64`, `64..128`, …, counted from the last decode step). A prefill call that ends
/// inside a chunk keeps that chunk's rows (`k`, `v`, `g`, `β`; at most 63) in `pending`, and
/// `recurrent` stays the state at the chunk's start. The next call recomputes the partial chunk
/// together with its new rows. Because each row's output in the chunked form depends only on the
/// chunk's earlier rows and its starting state, prefill results are **bit-identical whatever the
/// split of the prompt into calls** (1 token at a time, 7, 1000, or all at once). Decode folds
/// the pending rows into `recurrent` once and then runs the recurrent step.
#[derive(Debug, Clone, PartialEq)]
pub struct KdaState {
    /// Last `W−1` raw (pre-conv) projections of q, k, v: three `[W−1, P]` blocks, oldest row first.
    pub conv: [Vec<f32>; 3],
    /// Recurrent state `[H, K, V]` (`S[k, v]`), f32, at the start of the pending rows.
    pub recurrent: Vec<f32>,
    /// Rows of the current partial chunk (see above).
    pub pending: Pending,
}

/// Rows of a partial KDA chunk, capacity `CHUNK − 1`, allocated once.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Rows held.
    pub rows: usize,
    /// Normalised keys `[CHUNK−1, H, K]`.
    pub k: Vec<f32>,
    /// Values `[CHUNK−1, H, V]`.
    pub v: Vec<f32>,
    /// Log-decays `[CHUNK−1, H, K]`.
    pub g: Vec<f32>,
    /// β `[CHUNK−1, H]`.
    pub beta: Vec<f32>,
}

impl Pending {
    /// Zero rows `from..rows`.
    fn clear_from(&mut self, from: usize, h: usize, k: usize) {
        let (a, b) = (from, self.rows);
        self.k[a * h * k..b * h * k].fill(0.0);
        self.v[a * h * k..b * h * k].fill(0.0);
        self.g[a * h * k..b * h * k].fill(0.0);
        self.beta[a * h..b * h].fill(0.0);
    }
}

/// `n` zeros in pages of the process's own, for state that is read before it is written.
///
/// A large `vec![0.0; n]` gets pages from the kernel that are mapped on first touch. If that
/// touch is a read, the shared zero page is mapped, and the first write then replaces it, which
/// takes a TLB shootdown: an interrupt to every other CPU running the process (in a VM, an exit
/// on each). The recurrent state is read first (a prefill copies it into its scratch, a decode
/// step decays it) and written after, so a fresh sequence paid that on every page of it: on the
/// Zen 5 VM, more than half of the KDA kernel's time in a 128-token prompt's prefill, and 3% of
/// the whole. One volatile store a page here makes each a plain page fault, without it.
fn zeros_resident(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    for i in (0..n).step_by(4096 / std::mem::size_of::<f32>()) {
        // SAFETY: `i < n = v.len()`. Volatile, so that a zero stored over a zero is kept.
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0.0) };
    }
    v
}

impl KdaState {
    /// Zero state for `dims`.
    pub fn new(dims: &KdaDims) -> Self {
        let p = dims.proj();
        let hist = (dims.conv_kernel - 1) * p;
        let cap = CHUNK - 1;
        KdaState {
            conv: [
                zeros_resident(hist),
                zeros_resident(hist),
                zeros_resident(hist),
            ],
            recurrent: zeros_resident(dims.num_heads * dims.head_dim * dims.head_dim),
            pending: Pending {
                rows: 0,
                k: vec![0.0; cap * p],
                v: vec![0.0; cap * p],
                g: vec![0.0; cap * p],
                beta: vec![0.0; cap * dims.num_heads],
            },
        }
    }

    /// Bytes of the chunk-carry buffers (fixed).
    pub fn pending_bytes(&self) -> usize {
        let p = &self.pending;
        4 * (p.k.len() + p.v.len() + p.g.len() + p.beta.len())
    }

    /// Bytes held in total (conv history, recurrent state, chunk carry).
    pub fn bytes(&self) -> usize {
        4 * (self.recurrent.len() + self.conv.iter().map(|c| c.len()).sum::<usize>())
            + self.pending_bytes()
    }

    /// Fold the pending rows into `recurrent` (the state at the current position).
    pub fn fold(&mut self, dims: &KdaDims) {
        let n = self.pending.rows;
        if n == 0 {
            return;
        }
        let (h, k) = (dims.num_heads, dims.head_dim);
        // Their outputs were given out already: the state alone, with nothing allocated.
        let pd = &self.pending;
        kda_chunked_state(
            KdaShape::new(n, h, k, k),
            &pd.k[..n * h * k],
            &pd.v[..n * h * k],
            &pd.g[..n * h * k],
            &pd.beta[..n * h],
            &mut self.recurrent,
        );
        self.pending.clear_from(0, h, k);
        self.pending.rows = 0;
    }

    /// The recurrent state at the current position (pending rows folded in), leaving `self`
    /// unchanged.
    pub fn current_recurrent(&self, dims: &KdaDims) -> Vec<f32> {
        let mut c = self.clone();
        c.fold(dims);
        c.recurrent
    }
}

/// Weights of one KDA layer.
#[derive(Clone)]
pub struct Kda {
    dims: KdaDims,
    eps: f32,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    /// Conv taps for q, k, v, tap-major `[W, P]` (f32; the checkpoint's `[P, 1, W]` transposed
    /// at load, the layout `conv1d_causal_silu` reads).
    conv: [Vec<f32>; 3],
    a_log: Vec<f32>,
    dt_bias: Vec<f32>,
    f_a_proj: Linear,
    f_b_proj: Linear,
    b_proj: Linear,
    g_a_proj: Linear,
    g_b_proj: Linear,
    o_norm: Vec<f32>,
    o_proj: Linear,
}

impl Kda {
    /// Load `{prefix}…` (prefix like `model.layers.0.self_attn.`).
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dims: KdaDims,
        d: usize,
        eps: f32,
    ) -> Result<Self, WeightsError> {
        let (p, k, h, w) = (dims.proj(), dims.head_dim, dims.num_heads, dims.conv_kernel);
        let lin = |n: &str, r, c| Linear::load(ckpt, &format!("{prefix}{n}"), r, c);
        let conv = |n: &str| -> Result<Vec<f32>, WeightsError> {
            let pw = lin(n, p, w)?.to_f32_vec();
            let mut taps = vec![0.0; w * p];
            kl_kernels::transpose::transpose(&pw, p, w, w, &mut taps, p);
            Ok(taps)
        };
        Ok(Kda {
            dims,
            eps,
            q_proj: lin("q_proj.weight", p, d)?,
            k_proj: lin("k_proj.weight", p, d)?,
            v_proj: lin("v_proj.weight", p, d)?,
            conv: [
                conv("q_conv1d.weight")?,
                conv("k_conv1d.weight")?,
                conv("v_conv1d.weight")?,
            ],
            a_log: vector(ckpt, &format!("{prefix}A_log"), h)?,
            dt_bias: vector(ckpt, &format!("{prefix}dt_bias"), p)?,
            f_a_proj: lin("f_a_proj.weight", k, d)?,
            f_b_proj: lin("f_b_proj.weight", p, k)?,
            b_proj: lin("b_proj.weight", h, d)?,
            g_a_proj: lin("g_a_proj.weight", k, d)?,
            g_b_proj: lin("g_b_proj.weight", p, k)?,
            o_norm: vector(ckpt, &format!("{prefix}o_norm.weight"), k)?,
            o_proj: lin("o_proj.weight", d, p)?,
        })
    }

    /// Dimensions.
    pub fn dims(&self) -> KdaDims {
        self.dims
    }

    /// Bytes of matrix weights.
    pub fn bytes(&self) -> usize {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.f_a_proj,
            &self.f_b_proj,
            &self.b_proj,
            &self.g_a_proj,
        ]
        .iter()
        .map(|l| l.bytes())
        .sum::<usize>()
            + self.g_b_proj.bytes()
            + self.o_proj.bytes()
    }

    /// Chunked delta rule over `[pending rows ; new rows]` with chunks aligned to the pending
    /// start; outputs of the new rows go to `core`; complete chunks advance `recurrent`, the
    /// trailing partial chunk becomes the new pending rows. `q`, `kk`, `v`, `g` and `core` are
    /// head-major (`[H, T, K]`), `beta` is `[T, H]`; the pending rows are kept token-major.
    #[allow(clippy::too_many_arguments)]
    fn prefill_core(
        &self,
        st: &mut KdaState,
        q: &[f32],
        kk: &[f32],
        v: &[f32],
        g: &[f32],
        beta: &[f32],
        t: usize,
        scratch: &mut Scratch,
        core: &mut [f32],
    ) {
        let (h, k) = (self.dims.num_heads, self.dims.head_dim);
        let p = h * k;
        let np = st.pending.rows;
        let total = np + t;
        let new = KdaShape::new(t, h, k, k).head_major();
        let all = KdaShape::new(total, h, k, k).head_major();
        // The carry's rows, token-major (its capacity as the shape's tokens).
        let carried = KdaShape::new(CHUNK - 1, h, k, k);
        // Rows before this call's tokens still pending in the carry: put them before the new
        // rows, head by head (their q rows are zeros; their outputs were given out already).
        // Without any, use the inputs as they are and write `core` directly.
        let mut bufs: Vec<Vec<f32>> = Vec::new();
        if np > 0 {
            let pd = &st.pending;
            for (old, new_rows) in [
                (None, q),
                (Some(&pd.k), kk),
                (Some(&pd.v), v),
                (Some(&pd.g), g),
            ] {
                let mut c = match old {
                    Some(o) => {
                        let mut c = scratch.take_for_write(total * p);
                        copy_rows(o, carried, 0, &mut c, all, 0, np, k);
                        c
                    }
                    None => scratch.take(total * p),
                };
                copy_rows(new_rows, new, 0, &mut c, all, np, t, k);
                bufs.push(c);
            }
            let mut b = scratch.take_for_write(total * h);
            b[..np * h].copy_from_slice(&pd.beta[..np * h]);
            b[np * h..].copy_from_slice(beta);
            bufs.push(b);
            bufs.push(scratch.take_for_write(total * p));
        }
        let (ins, out): ([&[f32]; 5], &mut [f32]) = match &mut bufs[..] {
            [qa, ka, va, ga, ba, out] => ([qa, ka, va, ga, ba], out),
            _ => ([q, kk, v, g, beta], &mut *core),
        };
        let [qa, ka, va, ga, ba] = ins;
        // Whole chunks advance the state; the trailing partial one leaves it at its start.
        kda_chunked_carry(all, qa, ka, va, ga, ba, &mut st.recurrent, out);
        let full = total / CHUNK * CHUNK;
        let tail = total - full;
        let pd = &mut st.pending;
        for (src, dst) in [(ka, &mut pd.k), (va, &mut pd.v), (ga, &mut pd.g)] {
            copy_rows(src, all, full, dst, carried, 0, tail, k);
        }
        pd.beta[..tail * h].copy_from_slice(&ba[full * h..]);
        // Rows past the new tail are cleared so that equal states compare equal.
        if np > tail {
            st.pending.clear_from(tail, h, k);
        }
        st.pending.rows = tail;
        if let Some(out) = bufs.pop() {
            copy_rows(&out, all, np, core, new, 0, t, k);
            scratch.give(out);
        }
        for b in bufs.into_iter().rev() {
            scratch.give(b);
        }
    }

    /// `out[T, D] = KDA(x[T, D])`, advancing `state` by `T` tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        state: &mut KdaState,
        mode: Mode,
        probe: &mut Probe,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let KdaDims {
            num_heads: h,
            head_dim: k,
            conv_kernel: w,
        } = self.dims;
        let p = h * k;
        // The six products of x (q, k, v, the gates' first halves and β) in one region, then the
        // short convolutions (each with its own carried history).
        // Every buffer below is written in full (products, convolutions, the delta rule, the
        // norm) before it is read.
        let mut raw = [
            scratch.take_for_write(t * p),
            scratch.take_for_write(t * p),
            scratch.take_for_write(t * p),
        ];
        let mut fa = scratch.take_for_write(t * k);
        let mut beta = scratch.take_for_write(t * h);
        let mut ga = scratch.take_for_write(t * k);
        {
            let [rq, rk, rv] = &mut raw;
            Linear::forward_many(
                t,
                &mut [
                    (&self.q_proj, x, rq),
                    (&self.k_proj, x, rk),
                    (&self.v_proj, x, rv),
                    (&self.f_a_proj, x, &mut fa),
                    (&self.b_proj, x, &mut beta),
                    (&self.g_a_proj, x, &mut ga),
                ],
            );
        }
        // From the convolutions to the delta rule's outputs, the per-head tensors are head-major
        // ([H, T, K], `shape`), the layout the chunk kernel reads fastest: the convolutions and
        // the gate write it, the output norm reads it, at no pass of its own. β stays [T, H].
        let shape = KdaShape::new(t, h, k, k).head_major();
        let mut q = scratch.take_for_write(t * p);
        let mut kk = scratch.take_for_write(t * p);
        let mut v = scratch.take_for_write(t * p);
        for (i, dst) in [&mut q, &mut kk, &mut v].into_iter().enumerate() {
            conv1d_causal_silu_heads(&raw[i], p, &self.conv[i], w, k, &mut state.conv[i], dst);
        }
        for r in raw.into_iter().rev() {
            scratch.give(r);
        }
        if probe.enabled() {
            let mut cat = vec![0f32; t * 3 * p];
            // Token-major, q, k, v side by side: rows of three times the heads.
            let cat_shape = KdaShape::new(t, 3 * h, k, k);
            for ti in 0..t {
                for (mi, m) in [&q, &kk, &v].into_iter().enumerate() {
                    for hi in 0..h {
                        let d = cat_shape.row(ti, mi * h + hi, k);
                        cat[d..d + k].copy_from_slice(&m[shape.row(ti, hi, k)..][..k]);
                    }
                }
            }
            probe.record("kda.qkv_conv", &[t, 3 * p], &cat);
        }
        // Second halves of both gates: forget gate (log-decay, f32) and output gate.
        let mut g_in = scratch.take_for_write(t * p);
        let mut gate = scratch.take_for_write(t * p);
        Linear::forward_many(
            t,
            &mut [
                (&self.f_b_proj, &fa, &mut g_in),
                (&self.g_b_proj, &ga, &mut gate),
            ],
        );
        scratch.give(ga);
        scratch.give(fa);
        let mut g = scratch.take_for_write(t * p);
        kda_gate_heads(&g_in, &self.a_log, &self.dt_bias, h, k, &mut g);
        scratch.give(g_in);
        if probe.enabled() {
            probe.record("kda.g", &[t, h, k], &token_major(&g, shape));
        }
        // β.
        probe.record("kda.beta_logits", &[t, h], &beta);
        sigmoid_inplace(&mut beta);
        // L2-normalised q (scaled) and k.
        l2_normalize_rows(&mut q, k, 1e-6, (k as f32).powf(-0.5));
        l2_normalize_rows(&mut kk, k, 1e-6, 1.0);
        // Delta rule.
        let mut core = scratch.take_for_write(t * p);
        match mode {
            Mode::Prefill => {
                self.prefill_core(state, &q, &kk, &v, &g, &beta, t, scratch, &mut core)
            }
            Mode::Decode => {
                state.fold(&self.dims);
                kda_recurrent(
                    shape,
                    &q,
                    &kk,
                    &v,
                    &g,
                    &beta,
                    &mut state.recurrent,
                    &mut core,
                )
            }
        }
        scratch.give(beta);
        scratch.give(g);
        scratch.give(v);
        scratch.give(kk);
        scratch.give(q);
        if probe.enabled() {
            probe.record("kda.core_out", &[t, h, k], &token_major(&core, shape));
        }
        // Output gate and gated RMSNorm per head (token-major out, for the output projection).
        probe.record("kda.out_gate", &[t, h, k], &gate);
        let mut normed = scratch.take_for_write(t * p);
        rms_norm_gated_heads(&core, &gate, &self.o_norm, self.eps, h, &mut normed);
        probe.record("kda.o_normed", &[t, h, k], &normed);
        self.o_proj.forward(&normed, t, out);
        scratch.give(normed);
        scratch.give(gate);
        scratch.give(core);
    }
}

/// A head-major tensor of `shape`'s rows (`K` wide) laid out token-major, for the probe.
fn token_major(x: &[f32], shape: KdaShape) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let tm = KdaShape {
        layout: KdaLayout::TokenMajor,
        ..shape
    };
    copy_rows(x, shape, 0, &mut y, tm, 0, shape.t, shape.k);
    y
}
