//! Multi-head Latent Attention layer with NoPE (HF `KimiMLAAttention`, spec §6).
//!
//! The cache holds, per token, the normalised latent `c = RMSNorm(kv_a[:R])` and the shared key
//! part `k_pe = kv_a[R:]` — `R + P` values, nothing else. Decode (and prefill where it is the
//! cheaper form) computes attention with the absorbed weights (spec §6.3):
//! ```text
//! q_lat_h = W_UK_hᵀ q_nope_h            # [R]
//! score_h(s) = ([q_lat_h ; q_pe_h] · [c_s ; kpe_s]) · (dn + dr)^-½
//! ctx_h = Σ_s softmax(score_h)(s) c_s   # [R]
//! o_h = W_UV_h ctx_h                    # [dv]
//! ```
//! which is multi-query attention over the cache rows ([`crate::cache::LatentCache::attend`]).
//! Long prefill chunks take fewer FLOPs in the expanded form: per-head keys `[W_UK c ; k_pe]`
//! and values `W_UV c` rebuilt from blocks of cache rows through `kv_b_proj`, and ordinary
//! per-head attention over them ([`MlaPrefill`] chooses per chunk). Over a bf16 or fp8 cache
//! both forms run bf16 products (`kl_kernels::attention_bf16`, `kl_kernels::expanded_bf16`);
//! over an f32 cache, exact f32 products.
//! [`Mla::forward_expanded_reference`] is the naive (expanded K/V) twin used by the tests.
//!
//! `q_lora_rank = null` uses `q_proj` directly; a number uses `q_b_proj(RMSNorm(q_a_proj x))` as
//! DeepSeek-V2 does (`q_a_layernorm` eps 1e-6, like `kv_a_layernorm`).

use crate::cache::LatentCache;
use crate::linear::{Linear, MatView};
use crate::{vector, Probe, Scratch};
use kl_config::MlaDims;
use kl_kernels::attention::softmax_update;
use kl_kernels::bf16_activations;
use kl_kernels::expanded_bf16::{self, BlockBufs};
use kl_kernels::norm::rms_norm;
use kl_kernels::transpose::transpose;
use kl_weights::{Checkpoint, WeightsError};
use rayon::prelude::*;

/// How MLA attends during prefill (decode always uses the absorbed form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaPrefill {
    /// Per call, the expanded form where it saves a third of the absorbed form's FLOPs for its
    /// query and key counts ([`Mla::attention_flops`], [`Mla::uses_expanded`]), else absorbed.
    #[default]
    Auto,
    /// Weight absorption: every head scores the whole `R + dr` cache row.
    Absorbed,
    /// Per-head keys and values expanded from the cache through `kv_b_proj`, 256 keys at a time.
    Expanded,
}

impl MlaPrefill {
    /// Parse `auto`, `absorbed` or `expanded`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(MlaPrefill::Auto),
            "absorbed" => Some(MlaPrefill::Absorbed),
            "expanded" => Some(MlaPrefill::Expanded),
            _ => None,
        }
    }
}

/// Keys per block of the expanded form.
pub const EXPAND_BLOCK: usize = 256;

/// The first of `t` queries at positions `p0..p0 + t` that sees any key of the block starting
/// at position `k0`: the queries before it lie before the block (it is in their future), so
/// the expanded form skips them and [`Mla::attention_flops`] does not count them.
fn first_query_seeing(k0: usize, p0: usize, t: usize) -> usize {
    k0.saturating_sub(p0).min(t)
}

/// A buffer from the scratch pool viewed as the dwords it holds (packed bf16 pairs).
fn dwords(v: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid for
    // both; the view borrows `v` exclusively.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// [`dwords`], shared.
fn words(v: &[f32]) -> &[u32] {
    // SAFETY: as in `dwords`; a shared borrow of `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// Per-thread buffers of one head's expanded attention over one key block.
#[derive(Default)]
struct HeadBufs {
    /// `[nb, dn + dr]`: the head's keys.
    k: Vec<f32>,
    /// `[dv, nb]`: the head's values, transposed (f32 products), or `[nb, dv]` (bf16 products).
    vt: Vec<f32>,
    /// `[T, nb]`: scores, then probabilities (f32 products).
    s: Vec<f32>,
    /// `[T, dv]`: this block's `P · V` (f32 products).
    pv: Vec<f32>,
    /// The bf16 products' buffers.
    bf: BlockBufs,
}

thread_local! {
    static HEAD_BUFS: std::cell::RefCell<HeadBufs> = std::cell::RefCell::new(HeadBufs::default());
}

impl HeadBufs {
    /// Size the buffers for a block of `nb ≤ EXPAND_BLOCK` keys and `t` queries (f32 products).
    fn fit(&mut self, nb: usize, t: usize, qk: usize, dv: usize) {
        self.k.resize(nb * qk, 0.0);
        self.vt.resize(dv * nb, 0.0);
        self.s.resize(t * nb, 0.0);
        self.pv.resize(t * dv, 0.0);
    }

    /// Size the buffers for a block of `nb ≤ EXPAND_BLOCK` keys (bf16 products: no
    /// per-query buffers here).
    fn fit_bf16(&mut self, nb: usize, qk: usize, dv: usize) {
        self.k.resize(nb * qk, 0.0);
        self.vt.resize(nb * dv, 0.0);
        self.bf.fit(nb, qk, dv);
    }

    /// Floats held (bytes / 4, the bf16 buffers' included).
    #[cfg(test)]
    fn floats(&self) -> usize {
        self.k.len() + self.vt.len() + self.s.len() + self.pv.len() + self.bf.held().div_ceil(4)
    }
}

/// Floats of the `HeadBufs` that the expanded form keeps on each worker thread, for prefill
/// chunks of `t` tokens, per-head query/key width `qk` and value width `dv` (for memory
/// planning: they outlive the call, like the kernels' per-thread scratch): both products'
/// buffers, as a process may run both (an f32 cache and a bf16 one).
pub fn expanded_scratch_floats(t: usize, qk: usize, dv: usize) -> usize {
    EXPAND_BLOCK * qk
        + dv * EXPAND_BLOCK
        + t * EXPAND_BLOCK
        + t * dv
        + BlockBufs::bytes(EXPAND_BLOCK, qk, dv).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planner's figure is what a full key block sizes the buffers to, for both products.
    #[test]
    fn expanded_scratch_floats_is_a_full_block() {
        for (t, qk, dv) in [(512, 192, 128), (7, 96, 64), (1, 4, 5)] {
            let mut b = HeadBufs::default();
            b.fit(EXPAND_BLOCK, t, qk, dv);
            b.fit_bf16(EXPAND_BLOCK, qk, dv);
            assert_eq!(b.floats(), expanded_scratch_floats(t, qk, dv));
        }
    }

    /// The first query that sees a key block, against its definition: the queries before it
    /// (at positions `p0 + i`) all lie before the block's first key `k0`, and it does not.
    #[test]
    fn first_query_seeing_matches_its_definition() {
        for t in [1usize, 2, 7, 256, 300] {
            for p0 in [0usize, 1, 255, 256, 1000] {
                for k0 in (0..p0 + t).step_by(EXPAND_BLOCK) {
                    let before = (0..t).take_while(|&i| p0 + i < k0).count();
                    assert_eq!(first_query_seeing(k0, p0, t), before, "{t} {p0} {k0}");
                }
            }
        }
    }
}

#[derive(Clone)]
enum QProj {
    Direct(Linear),
    LowRank {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
}

/// Weights of one MLA layer.
#[derive(Clone)]
pub struct Mla {
    dims: MlaDims,
    kv_eps: f32,
    q: QProj,
    kv_a_proj: Linear,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj` `[H·(dn+dv), R]`; its value rows are `W_UV`.
    kv_b_proj: Linear,
    /// `W_UKᵀ` per head, `[H·R, dn]`, built once at load from `kv_b_proj`'s key rows.
    w_uk_t: Linear,
    o_proj: Linear,
}

impl Mla {
    /// Load `{prefix}…` (prefix like `model.layers.3.self_attn.`).
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dims: MlaDims,
        d: usize,
        kv_eps: f32,
    ) -> Result<Self, WeightsError> {
        let MlaDims {
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope: dn,
            qk_rope: dr,
            v_head: dv,
            q_lora_rank,
        } = dims;
        let lin = |n: &str, rows, cols| Linear::load(ckpt, &format!("{prefix}{n}"), rows, cols);
        let q = match q_lora_rank {
            None => QProj::Direct(lin("q_proj.weight", nh * (dn + dr), d)?),
            Some(qr) => QProj::LowRank {
                a: lin("q_a_proj.weight", qr, d)?,
                norm: vector(ckpt, &format!("{prefix}q_a_layernorm.weight"), qr)?,
                b: lin("q_b_proj.weight", nh * (dn + dr), qr)?,
            },
        };
        let kv_b_proj = lin("kv_b_proj.weight", nh * (dn + dv), r)?;
        // W_UKᵀ_h[r, i] = kv_b[h·(dn+dv) + i, r]  (same dtype as kv_b_proj).
        let w_uk_t = Linear::from_fn(kv_b_proj.dtype(), nh * r, dn, |row, i| {
            let (h, rr) = (row / r, row % r);
            kv_b_proj.get(h * (dn + dv) + i, rr)
        });
        Ok(Mla {
            dims,
            kv_eps,
            q,
            kv_a_proj: lin("kv_a_proj_with_mqa.weight", r + dr, d)?,
            kv_a_norm: vector(ckpt, &format!("{prefix}kv_a_layernorm.weight"), r)?,
            kv_b_proj,
            w_uk_t,
            o_proj: lin("o_proj.weight", d, nh * dv)?,
        })
    }

    /// Dimensions.
    pub fn dims(&self) -> MlaDims {
        self.dims
    }

    /// Bytes of matrix weights (including the load-time `W_UKᵀ`).
    pub fn bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Direct(l) => l.bytes(),
            QProj::LowRank { a, b, .. } => a.bytes() + b.bytes(),
        };
        q + self.kv_a_proj.bytes()
            + self.kv_b_proj.bytes()
            + self.w_uk_t.bytes()
            + self.o_proj.bytes()
    }

    /// Bytes of weights one decoded token reads: `q` projections, `kv_a`, `W_UKᵀ`, the value
    /// half of `kv_b`, `o_proj`.
    pub fn active_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Direct(l) => l.bytes(),
            QProj::LowRank { a, b, .. } => a.bytes() + b.bytes(),
        };
        let d = self.dims;
        let uv = self.kv_b_proj.bytes() * d.v_head / (d.qk_nope + d.v_head);
        q + self.kv_a_proj.bytes() + self.w_uk_t.bytes() + uv + self.o_proj.bytes()
    }

    /// Bytes of the load-time `W_UKᵀ` copy (held in addition to the checkpoint).
    pub fn derived_bytes(&self) -> usize {
        self.w_uk_t.bytes()
    }

    fn project_q(&self, x: &[f32], t: usize, scratch: &mut Scratch) -> Vec<f32> {
        match &self.q {
            QProj::Direct(l) => l.apply_in(x, t, scratch),
            QProj::LowRank { a, norm, b } => {
                let qa = a.apply_in(x, t, scratch);
                let mut n = scratch.take(qa.len());
                rms_norm(&qa, norm, self.kv_eps, &mut n);
                let q = b.apply_in(&n, t, scratch);
                scratch.give(n);
                scratch.give(qa);
                q
            }
        }
    }

    /// Cache rows `[T, R+dr]` = `[RMSNorm(kv_a[:R]) ; kv_a[R:]]` for input `x`.
    fn latent_rows(
        &self,
        x: &[f32],
        t: usize,
        probe: &mut Probe,
        scratch: &mut Scratch,
    ) -> Vec<f32> {
        let kv_a = self.kv_a_proj.apply_in(x, t, scratch);
        self.normalize_latent(kv_a, t, probe, scratch)
    }

    /// Cache rows from `kv_a` `[T, R+dr]` (given back to `scratch`).
    fn normalize_latent(
        &self,
        kv_a: Vec<f32>,
        t: usize,
        probe: &mut Probe,
        scratch: &mut Scratch,
    ) -> Vec<f32> {
        let (r, dr) = (self.dims.kv_lora_rank, self.dims.qk_rope);
        probe.record("mla.kv_a", &[t, r + dr], &kv_a);
        let mut rows = scratch.take(kv_a.len());
        rows.copy_from_slice(&kv_a);
        for (src, dst) in kv_a.chunks_exact(r + dr).zip(rows.chunks_exact_mut(r + dr)) {
            rms_norm(&src[..r], &self.kv_a_norm, self.kv_eps, &mut dst[..r]);
        }
        scratch.give(kv_a);
        rows
    }

    /// `out[T, D] = MLA(x[T, D])`: appends `T` rows to `cache`, then attends causally over it.
    ///
    /// The per-head products with `W_UKᵀ` and `W_UV` run head-parallel for a single token
    /// (decode), one matrix product over all tokens per head otherwise; both give the same bits
    /// (the matrix product is batch invariant).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        cache: &mut LatentCache,
        form: MlaPrefill,
        probe: &mut Probe,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let MlaDims {
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope: dn,
            qk_rope: dr,
            v_head: dv,
            ..
        } = self.dims;
        // The query path's first product and kv_a in one parallel region.
        let mut kv_a = scratch.take(t * (r + dr));
        let q = match &self.q {
            QProj::Direct(l) => {
                let mut q = scratch.take(t * l.rows());
                Linear::forward_many(t, &mut [(l, x, &mut q), (&self.kv_a_proj, x, &mut kv_a)]);
                q
            }
            QProj::LowRank { a, norm, b } => {
                let mut qa = scratch.take(t * a.rows());
                Linear::forward_many(t, &mut [(a, x, &mut qa), (&self.kv_a_proj, x, &mut kv_a)]);
                let mut n = scratch.take(qa.len());
                rms_norm(&qa, norm, self.kv_eps, &mut n);
                let q = b.apply_in(&n, t, scratch);
                scratch.give(n);
                scratch.give(qa);
                q
            }
        };
        probe.record("mla.q", &[t, nh * (dn + dr)], &q);
        let rows = self.normalize_latent(kv_a, t, probe, scratch);
        if probe.enabled() {
            let lat: Vec<f32> = rows
                .chunks_exact(r + dr)
                .flat_map(|row| row[..r].to_vec())
                .collect();
            probe.record("mla.kv_a_normed", &[t, r], &lat);
            probe.record(
                "mla.kv_b",
                &[t, nh * (dn + dv)],
                &self.kv_b_proj.apply(&lat, t),
            );
        }
        cache.append(&rows);
        scratch.give(rows);
        if self.uses_expanded(t, cache.len(), form) {
            let mut core = scratch.take(t * nh * dv);
            self.attend_expanded(&q, t, cache, scratch, &mut core);
            scratch.give(q);
            probe.record("mla.attn_core", &[t, nh * dv], &core);
            self.o_proj.forward(&core, t, out);
            scratch.give(core);
            return;
        }
        // Absorbed queries [T, H, R+dr].
        let w = r + dr;
        let mut q_abs = scratch.take(t * nh * w);
        if t == 1 {
            // A head per task, each product whole on its thread (`par::serial`): split again,
            // each 32 KiB product opened a nested rayon region of its own. With the gate
            // products' same rule, `mini`'s decode +1.6% in fast phases (15 alternating pairs,
            // 12 won), the same in slow ones.
            q_abs.par_chunks_mut(w).enumerate().for_each(|(h, qa)| {
                let src = &q[h * (dn + dr)..(h + 1) * (dn + dr)];
                qa[r..].copy_from_slice(&src[dn..]);
                kl_kernels::par::serial(|| {
                    self.w_uk_t
                        .forward_rows(&src[..dn], 1, h * r, r, &mut qa[..r])
                });
            });
        } else {
            let mut qn = scratch.take(t * dn);
            let mut ql = scratch.take(t * r);
            for h in 0..nh {
                for ti in 0..t {
                    let src = &q[ti * nh * (dn + dr) + h * (dn + dr)..][..dn + dr];
                    qn[ti * dn..(ti + 1) * dn].copy_from_slice(&src[..dn]);
                    q_abs[(ti * nh + h) * w + r..(ti * nh + h + 1) * w].copy_from_slice(&src[dn..]);
                }
                self.w_uk_t.forward_rows(&qn, t, h * r, r, &mut ql);
                for ti in 0..t {
                    q_abs[(ti * nh + h) * w..(ti * nh + h) * w + r]
                        .copy_from_slice(&ql[ti * r..(ti + 1) * r]);
                }
            }
            scratch.give(ql);
            scratch.give(qn);
        }
        scratch.give(q);
        let mut ctx = scratch.take(t * nh * r);
        cache.attend(nh, r, &q_abs, self.dims.softmax_scale(), &mut ctx);
        scratch.give(q_abs);
        // o_h = W_UV_h ctx_h.
        let mut core = scratch.take(t * nh * dv);
        if t == 1 {
            core.par_chunks_mut(dv).enumerate().for_each(|(h, o)| {
                let row0 = h * (dn + dv) + dn;
                kl_kernels::par::serial(|| {
                    self.kv_b_proj
                        .forward_rows(&ctx[h * r..(h + 1) * r], 1, row0, dv, o)
                });
            });
        } else {
            let mut ch = scratch.take(t * r);
            let mut oh = scratch.take(t * dv);
            for h in 0..nh {
                for ti in 0..t {
                    ch[ti * r..(ti + 1) * r]
                        .copy_from_slice(&ctx[(ti * nh + h) * r..(ti * nh + h + 1) * r]);
                }
                self.kv_b_proj
                    .forward_rows(&ch, t, h * (dn + dv) + dn, dv, &mut oh);
                for ti in 0..t {
                    core[ti * nh * dv + h * dv..][..dv]
                        .copy_from_slice(&oh[ti * dv..(ti + 1) * dv]);
                }
            }
            scratch.give(oh);
            scratch.give(ch);
        }
        scratch.give(ctx);
        probe.record("mla.attn_core", &[t, nh * dv], &core);
        self.o_proj.forward(&core, t, out);
        scratch.give(core);
    }

    /// Attention FLOPs of `t` new queries (the last `t` of `n` cached rows): `(absorbed,
    /// expanded)`, over and above the per-token weight products (which include the absorption
    /// products `W_UKᵀ q` and `W_UV ctx`). Absorbed: per visible (query, key) pair every head
    /// scores `R + dr` values and sums `R`. Expanded: every key block is expanded through
    /// `kv_b_proj` once per call (`n · R · H · (dn + dv)` multiply–adds), each head scores
    /// `dn + dr` and sums `dv` per pair (whole blocks, masked entries included, for the queries
    /// that see any of a block), and the absorption products are not done (subtracted).
    pub fn attention_flops(&self, t: usize, n: usize) -> (u64, u64) {
        let MlaDims {
            num_heads: h,
            kv_lora_rank: r,
            qk_nope: dn,
            qk_rope: dr,
            v_head: dv,
            ..
        } = self.dims;
        // (query, key) pairs scored: whole blocks, for the queries that see any of the block.
        let scored: u64 = (0..n.div_ceil(EXPAND_BLOCK))
            .map(|i| (EXPAND_BLOCK * (t - first_query_seeing(i * EXPAND_BLOCK, n - t, t))) as u64)
            .sum();
        let (t, n, h, r, dn, dr, dv) = (
            t as u64, n as u64, h as u64, r as u64, dn as u64, dr as u64, dv as u64,
        );
        let pairs = t * (n - t) + t * (t + 1) / 2;
        let absorbed = pairs * h * 2 * (2 * r + dr);
        let expanded = (n - t) * r * h * (dn + dv) * 2 + scored * h * 2 * (dn + dr + dv);
        (absorbed, expanded)
    }

    /// Whether `form` means the expanded form for `t` queries over `n` cached rows.
    pub fn uses_expanded(&self, t: usize, n: usize, form: MlaPrefill) -> bool {
        match form {
            MlaPrefill::Absorbed => false,
            MlaPrefill::Expanded => true,
            MlaPrefill::Auto => {
                let (absorbed, expanded) = self.attention_flops(t, n);
                // The expanded form must save a third of the FLOPs: the two run at about the
                // same rate, the absorbed kernel a little nearer the peak. Measured, 4096-token
                // prompts, each form forced: `mini` in 160-token chunks (expanded saving 1.49×)
                // 5–8% faster expanded, in 256-token chunks (1.89×) 11–14%; the 48B shape in
                // 512-token chunks (1.89–2.27×) 7%. A factor of 2, as before, had kept the
                // released shapes on the absorbed form from 2K cached rows on.
                t > 1 && 4 * expanded < 3 * absorbed
            }
        }
    }

    /// Attention FLOPs of `t` queries over `n` cached rows in the form `form` chooses.
    pub fn chosen_attention_flops(&self, t: usize, n: usize, form: MlaPrefill) -> u64 {
        let (a, e) = self.attention_flops(t, n);
        if self.uses_expanded(t, n, form) {
            e
        } else {
            a
        }
    }

    /// Expanded causal attention of the `t` newest cache rows' queries over the whole cache:
    /// `core[T, H·dv]`. Keys go in blocks of [`EXPAND_BLOCK`] aligned to position 0, each block's
    /// per-head keys `[W_UK c ; k_pe]` and values `W_UV c` formed with one `kv_b_proj` product
    /// (the matrix product is batch invariant), heads in parallel, an online softmax per query.
    /// A query's result depends only on its own row and the cache, never on `t`, so prefill in
    /// pieces gives the same bits as one prefill in this form too.
    fn attend_expanded(
        &self,
        q: &[f32],
        t: usize,
        cache: &LatentCache,
        scratch: &mut Scratch,
        core: &mut [f32],
    ) {
        let MlaDims {
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope: dn,
            qk_rope: dr,
            v_head: dv,
            ..
        } = self.dims;
        let (w, e, qk) = (r + dr, dn + dv, dn + dr);
        let n = cache.len();
        let p0 = n - t;
        let scale = self.dims.softmax_scale();
        // Over a bf16 or fp8 cache the attention runs bf16 products (`expanded_bf16`), as
        // decode and the absorbed form do over such a cache.
        let bf = cache.bf16_products() && kl_kernels::attention_bf16::takes(qk);
        // Per-head queries with the softmax scale folded in (once per query instead of once
        // per score): [H, T, dn+dr] f32 (a token's q is [H, dn+dr]), or each head's packed in
        // bf16 pairs (half the size), `pl` dwords a head.
        let pl = expanded_bf16::packed_queries_len(t, qk);
        let qh = if bf {
            let mut qh = scratch.take_for_write(nh * pl);
            for (hh, dst) in qh.chunks_exact_mut(pl).enumerate() {
                expanded_bf16::pack_queries(&q[hh * qk..], nh * qk, t, qk, scale, dwords(dst));
            }
            qh
        } else {
            let mut qh = scratch.take(nh * t * qk);
            for hh in 0..nh {
                for i in 0..t {
                    let src = &q[(i * nh + hh) * qk..(i * nh + hh + 1) * qk];
                    let dst = &mut qh[(hh * t + i) * qk..(hh * t + i + 1) * qk];
                    for (d, x) in dst.iter_mut().zip(src) {
                        *d = x * scale;
                    }
                }
            }
            qh
        };
        let mut m = scratch.take(nh * t);
        m.fill(f32::NEG_INFINITY);
        let mut l = scratch.take(nh * t);
        let mut acc = scratch.take(nh * t * dv);
        let mut rows = scratch.take(EXPAND_BLOCK * w);
        let mut lat = scratch.take(EXPAND_BLOCK * r);
        let mut kv = scratch.take(EXPAND_BLOCK * nh * e);
        let mut k0 = 0;
        while k0 < n {
            let nb = EXPAND_BLOCK.min(n - k0);
            cache.widen_rows(k0, nb, &mut rows);
            for x in 0..nb {
                lat[x * r..(x + 1) * r].copy_from_slice(&rows[x * w..x * w + r]);
            }
            let (lat, kvb) = (&lat[..nb * r], &mut kv[..nb * nh * e]);
            match self.kv_b_proj.view() {
                // With the bf16 products the expansion takes them too: the latent rows are bf16
                // values (an fp8 cache's are rounded), and the keys and values are rounded to
                // bf16 right after, so only the order of the f32 sums differs from the f32
                // product, at twice its rate on AVX512-BF16 (the same bits elsewhere).
                MatView::Bf16(wb) if bf && bf16_activations::fits(r) => {
                    bf16_activations::matmul_bf16_anywhere(lat, wb, kvb, nb, r, nh * e)
                }
                _ => self.kv_b_proj.forward(lat, nb, kvb),
            }
            let (rows, kv, qh) = (&rows[..], &kv[..], &qh[..]);
            acc.par_chunks_mut(t * dv)
                .zip(m.par_chunks_mut(t).zip(l.par_chunks_mut(t)))
                .enumerate()
                .for_each(|(hh, (acc, (m, l)))| {
                    HEAD_BUFS.with(|cell| {
                        let mut bufs = cell.borrow_mut();
                        if bf {
                            bufs.fit_bf16(nb, qk, dv);
                        } else {
                            bufs.fit(nb, t, qk, dv);
                        }
                        let HeadBufs {
                            k,
                            vt,
                            s,
                            pv,
                            bf: blk,
                        } = &mut *bufs;
                        for x in 0..nb {
                            let src = &kv[(x * nh + hh) * e..(x * nh + hh + 1) * e];
                            k[x * qk..x * qk + dn].copy_from_slice(&src[..dn]);
                            k[x * qk + dn..(x + 1) * qk]
                                .copy_from_slice(&rows[x * w + r..(x + 1) * w]);
                        }
                        let i0 = first_query_seeing(k0, p0, t);
                        if bf {
                            // This head's values as rows, then the block in bf16 products:
                            // query i (position p0 + i) sees keys k0 ..= p0 + i.
                            for x in 0..nb {
                                let src = &kv[(x * nh + hh) * e + dn..][..dv];
                                vt[x * dv..(x + 1) * dv].copy_from_slice(src);
                            }
                            let qp = &words(qh)[hh * pl..(hh + 1) * pl];
                            expanded_bf16::attend_block(
                                qp,
                                t,
                                qk,
                                dv,
                                &mut k[..nb * qk],
                                &mut vt[..nb * dv],
                                nb,
                                i0,
                                |i| p0 + i + 1 - k0,
                                m,
                                l,
                                acc,
                                blk,
                            );
                            return;
                        }
                        // This head's values, key-major → column-major for the P·V product.
                        transpose(&kv[hh * e + dn..], nb, dv, nh * e, vt, nb);
                        // Queries before `i0` see none of this block (it lies in their future):
                        // they are skipped, not scored and masked. Row `i - i0` of `s` and `pv`
                        // is query `i`'s.
                        let tq = t - i0;
                        let qrows = &qh[(hh * t + i0) * qk..(hh + 1) * t * qk];
                        let (s, pv) = (&mut s[..tq * nb], &mut pv[..tq * dv]);
                        kl_kernels::matmul::matmul(qrows, &k[..], s, tq, qk, nb);
                        for i in i0..t {
                            // Query i sits at position p0 + i and sees keys 0 ..= p0 + i.
                            let visible = (p0 + i + 1 - k0).min(nb);
                            let row = &mut s[(i - i0) * nb..(i - i0 + 1) * nb];
                            let corr = softmax_update(&mut row[..visible], &mut m[i], &mut l[i]);
                            row[visible..].fill(0.0);
                            for a in &mut acc[i * dv..(i + 1) * dv] {
                                *a *= corr;
                            }
                        }
                        kl_kernels::matmul::matmul(s, &vt[..], pv, tq, nb, dv);
                        for (a, p) in acc[i0 * dv..].iter_mut().zip(pv.iter()) {
                            *a += p;
                        }
                    });
                });
            k0 += nb;
        }
        for hh in 0..nh {
            for i in 0..t {
                let inv = 1.0 / l[hh * t + i];
                let src = &acc[(hh * t + i) * dv..(hh * t + i + 1) * dv];
                for (o, a) in core[i * nh * dv + hh * dv..][..dv].iter_mut().zip(src) {
                    *o = a * inv;
                }
            }
        }
        scratch.give(kv);
        scratch.give(lat);
        scratch.give(rows);
        scratch.give(acc);
        scratch.give(l);
        scratch.give(m);
        scratch.give(qh);
    }

    /// Naive twin for a whole sequence (no cache): expand per-head keys `[W_UK c ; k_pe]` and
    /// values `W_UV c` for every token, then causal softmax attention. `out[T, D]`.
    pub fn forward_expanded_reference(&self, x: &[f32], t: usize, out: &mut [f32]) {
        let MlaDims {
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope: dn,
            qk_rope: dr,
            v_head: dv,
            ..
        } = self.dims;
        let mut scratch = Scratch::new();
        let q = self.project_q(x, t, &mut scratch);
        let rows = self.latent_rows(x, t, &mut Probe::off(), &mut scratch);
        let lat: Vec<f32> = rows
            .chunks_exact(r + dr)
            .flat_map(|row| row[..r].to_vec())
            .collect();
        let kvb = self.kv_b_proj.apply(&lat, t); // [T, H·(dn+dv)]
        let scale = self.dims.softmax_scale();
        let mut core = vec![0f32; t * nh * dv];
        for h in 0..nh {
            for i in 0..t {
                let qi = &q[i * nh * (dn + dr) + h * (dn + dr)..][..dn + dr];
                let scores: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = &kvb[j * nh * (dn + dv) + h * (dn + dv)..][..dn];
                        let pe = &rows[j * (r + dr) + r..(j + 1) * (r + dr)];
                        let s: f32 = qi[..dn].iter().zip(kj).map(|(a, b)| a * b).sum::<f32>()
                            + qi[dn..].iter().zip(pe).map(|(a, b)| a * b).sum::<f32>();
                        s * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                let o = &mut core[i * nh * dv + h * dv..][..dv];
                for (j, ej) in e.iter().enumerate() {
                    let vj = &kvb[j * nh * (dn + dv) + h * (dn + dv) + dn..][..dv];
                    for (oc, vc) in o.iter_mut().zip(vj) {
                        *oc += ej / z * vc;
                    }
                }
            }
        }
        self.o_proj.forward(&core, t, out);
    }
}
