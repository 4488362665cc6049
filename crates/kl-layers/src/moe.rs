//! Sigmoid-routed Mixture of Experts with shared experts (HF `KimiSparseMoeBlock`, spec §7).
//!
//! ```text
//! s = sigmoid(W_gate x)                     # [E], f32
//! choice = s + e_score_correction_bias      # used only to choose
//! (group limit: keep the top `topk_group` groups by the sum of their top-2 choice scores)
//! top-k experts by choice
//! w_i = s_i  (or choice_i with RouterWeights::Biased)  / Σ w  · routed_scaling_factor
//! y = Σ_i w_i · SwiGLU_i(x) + shared(x)
//! ```
//! Default combine weights are the *unbiased* sigmoid scores, as transformers, vLLM and llama.cpp
//! compute them; [`RouterWeights::Biased`] reproduces the remote-code behaviour, where an
//! in-place add on a view also puts the bias into the weights (spec §7.2, §12.1).
//!
//! Prefill groups tokens by expert: each chosen expert runs one matrix product over all of its
//! tokens (in blocks of at most [`EXPERT_BLOCK`]); experts no token chose are never touched. The
//! experts run in parallel, each on one thread with unsplit products, and are then combined per
//! token in ascending expert order, so the bits do not depend on the thread count.

use crate::linear::{Linear, RowJobs};
use crate::mlp::SwiGlu;
use crate::{vector, Probe, Scratch};
use kl_config::MoeDims;
use kl_kernels::activation::{sigmoid, swiglu};
use kl_weights::{Checkpoint, WeightsError};
use rayon::prelude::*;
use std::sync::{Mutex, PoisonError};

/// Most tokens of one expert handled by one prefill task (bounds each thread's buffers).
pub const EXPERT_BLOCK: usize = 256;

/// `n` rows from `p0` in the fewest blocks of at most [`EXPERT_BLOCK`], of equal size but for
/// one row: `(first row, rows)` each. 260 rows are two blocks of 130, not 256 and 4 (a block of
/// a few rows is a matrix–vector product that streams the expert's whole weights for them).
fn blocks(p0: usize, n: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = n.div_ceil(EXPERT_BLOCK);
    (0..nb).map(move |b| (p0 + n * b / nb, n * (b + 1) / nb - n * b / nb))
}

/// How the top-k combine weights are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterWeights {
    /// Sigmoid scores without the correction bias (transformers / vLLM / llama.cpp).
    #[default]
    Unbiased,
    /// Sigmoid scores plus the correction bias (HF remote code).
    Biased,
}

/// Weights of one MoE block.
#[derive(Clone)]
pub struct Moe {
    dims: MoeDims,
    gate: Linear,
    bias: Vec<f32>,
    experts: Vec<SwiGlu>,
    shared: Option<SwiGlu>,
}

/// Routing decision for `T` tokens: `ids[t·k + j]`, `weights[t·k + j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Chosen expert ids, per token in descending choice-score order.
    pub ids: Vec<usize>,
    /// Their combine weights.
    pub weights: Vec<f32>,
}

impl Moe {
    /// Load `{prefix}…` (prefix like `model.layers.1.block_sparse_moe.`).
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dims: MoeDims,
        d: usize,
    ) -> Result<Self, WeightsError> {
        let e = dims.num_experts;
        let experts = (0..e)
            .map(|i| {
                SwiGlu::load(
                    ckpt,
                    &format!("{prefix}experts.{i}."),
                    ["w1.weight", "w3.weight", "w2.weight"],
                    d,
                    dims.expert_width,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = if dims.num_shared > 0 {
            Some(SwiGlu::load(
                ckpt,
                &format!("{prefix}shared_experts."),
                ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
                d,
                dims.expert_width * dims.num_shared,
            )?)
        } else {
            None
        };
        Ok(Moe {
            dims,
            // Router logits in f32 whatever the switches say (spec §7.2: the reference scores
            // in fp32).
            gate: Linear::load(ckpt, &format!("{prefix}gate.weight"), e, d)?.with_f32_activations(),
            bias: vector(ckpt, &format!("{prefix}gate.e_score_correction_bias"), e)?,
            experts,
            shared,
        })
    }

    /// Dimensions.
    pub fn dims(&self) -> MoeDims {
        self.dims
    }

    /// Bytes of all weights (every expert).
    pub fn bytes(&self) -> usize {
        self.gate.bytes()
            + self.experts.iter().map(|e| e.bytes()).sum::<usize>()
            + self.shared.as_ref().map_or(0, |s| s.bytes())
    }

    /// Bytes of weights one token touches (router, top-k experts, shared).
    pub fn active_bytes(&self) -> usize {
        self.gate.bytes()
            + self.dims.top_k * self.experts[0].bytes()
            + self.shared.as_ref().map_or(0, |s| s.bytes())
    }

    /// Route `T` tokens given router logits `[T, E]`.
    pub fn route(&self, logits: &[f32], t: usize, mode: RouterWeights) -> Routing {
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        self.route_into(logits, t, mode, &mut Scratch::new(), &mut ids, &mut weights);
        Routing { ids, weights }
    }

    /// [`Moe::route`] into caller buffers (`ids`, `weights` are cleared first), with its
    /// temporaries from `scratch`.
    pub fn route_into(
        &self,
        logits: &[f32],
        t: usize,
        mode: RouterWeights,
        scratch: &mut Scratch,
        ids: &mut Vec<usize>,
        weights: &mut Vec<f32>,
    ) {
        let MoeDims {
            num_experts: e,
            top_k: k,
            num_expert_group: ng,
            topk_group,
            renormalize,
            routed_scaling_factor,
            ..
        } = self.dims;
        ids.clear();
        weights.clear();
        let mut scores = scratch.take(e);
        let mut choice = scratch.take(e);
        let mut order = scratch.take_idx();
        let mut groups = scratch.take_idx();
        let mut gscore = scratch.take(ng);
        for ti in 0..t {
            for j in 0..e {
                scores[j] = sigmoid(logits[ti * e + j]);
                choice[j] = scores[j] + self.bias[j];
            }
            if ng > 1 {
                // Group-limited routing: group score = sum of its two best choice scores.
                let gs = e / ng;
                for (g, sc) in gscore.iter_mut().enumerate() {
                    let (mut b0, mut b1) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &c in &choice[g * gs..(g + 1) * gs] {
                        if c.total_cmp(&b0).is_gt() {
                            b1 = b0;
                            b0 = c;
                        } else if c.total_cmp(&b1).is_gt() {
                            b1 = c;
                        }
                    }
                    *sc = b0 + b1;
                }
                groups.clear();
                groups.extend(0..ng);
                groups.sort_by(|&a, &b| gscore[b].total_cmp(&gscore[a]).then(a.cmp(&b)));
                for &g in &groups[topk_group..] {
                    // As the reference: masked scores become 0.0.
                    choice[g * gs..(g + 1) * gs].fill(0.0);
                }
            }
            order.clear();
            order.extend(0..e);
            order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
            let w = |j: usize| match mode {
                RouterWeights::Unbiased => scores[j],
                RouterWeights::Biased => scores[j] + self.bias[j],
            };
            let denom = if renormalize && k > 1 {
                order[..k].iter().map(|&j| w(j)).sum::<f32>() + 1e-20
            } else {
                1.0
            };
            for &j in &order[..k] {
                ids.push(j);
                weights.push(w(j) / denom * routed_scaling_factor);
            }
        }
        scratch.give(gscore);
        scratch.give_idx(groups);
        scratch.give_idx(order);
        scratch.give(choice);
        scratch.give(scores);
    }

    /// `out[T, D] = MoE(x[T, D])`, temporaries from `scratch`.
    ///
    /// Tokens are grouped by expert (a counting sort of the routing), each chosen expert runs
    /// once over its tokens, and the outputs are added to `out` expert by expert in ascending
    /// order, then the shared expert's — the same order whatever `T`, so a token's result does
    /// not depend on which other tokens share the call.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        router: RouterWeights,
        probe: &mut Probe,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let (e, k) = (self.dims.num_experts, self.dims.top_k);
        let d = self.gate.cols();
        let logits = self.gate.apply_in(x, t, scratch);
        probe.record("moe.router_logits", &[t, e], &logits);
        let mut ids = scratch.take_idx();
        let mut weights = scratch.take(0);
        self.route_into(&logits, t, router, scratch, &mut ids, &mut weights);
        scratch.give(logits);
        if probe.enabled() {
            // Golden order: ids ascending per token, weights alongside.
            let (mut pid, mut pw) = (Vec::new(), Vec::new());
            for ti in 0..t {
                let mut pairs: Vec<(usize, f32)> = (0..k)
                    .map(|j| (ids[ti * k + j], weights[ti * k + j]))
                    .collect();
                pairs.sort_by_key(|p| p.0);
                pid.extend(pairs.iter().map(|p| p.0 as f32));
                pw.extend(pairs.iter().map(|p| p.1));
            }
            probe.record("moe.topk_ids", &[t, k], &pid);
            probe.record("moe.topk_weights", &[t, k], &pw);
        }
        // Counting sort of the (token, slot) pairs by expert: start[ex]..start[ex+1] in `order`.
        let mut start = scratch.take_idx();
        start.resize(e + 1, 0);
        for &id in ids.iter() {
            start[id + 1] += 1;
        }
        for i in 0..e {
            start[i + 1] += start[i];
        }
        let mut fill = scratch.take_idx();
        fill.extend_from_slice(&start[..e]);
        let mut order = scratch.take_idx();
        order.resize(t * k, 0);
        for (slot, &id) in ids.iter().enumerate() {
            order[fill[id]] = slot;
            fill[id] += 1;
        }
        out.fill(0.0);
        if t == 1 {
            self.forward_one(x, &ids, &weights, &order, probe, scratch, out);
            scratch.give_idx(order);
            scratch.give_idx(fill);
            scratch.give_idx(start);
            scratch.give(weights);
            scratch.give_idx(ids);
            return;
        }
        // One task per (expert, block of at most EXPERT_BLOCK of its tokens, see `blocks`), the
        // shared expert included, each run start to finish on one thread (`par::serial`: its
        // products are not split again, so every weight panel is packed once per block). Sorted
        // largest first and taken from a queue by whichever thread is free
        // (`par::for_each_queued`): rayon's split of the list had left one of two threads idle
        // for a sixth to a third of the region (the 48B shape's prefill +7–11%).
        // Routed outputs land in `ys` at their positions in `order`, the shared expert's in
        // `ysh` by token.
        // Written in full: the tasks below cover every row of both.
        let mut ys = scratch.take_for_write(t * k * d);
        let mut ysh = scratch.take_for_write(if self.shared.is_some() { t * d } else { 0 });
        let threads = rayon::current_num_threads().max(1);
        let bufs: Vec<Mutex<[Vec<f32>; 3]>> = (0..threads)
            .map(|_| Mutex::new([scratch.take(0), scratch.take(0), scratch.take(0)]))
            .collect();
        /// Whose tokens a task runs: a routed expert's (from a position in `order`) or the
        /// shared expert's (from a token).
        enum Rows {
            Routed(usize, usize),
            Shared(usize),
        }
        let mut tasks: Vec<(Rows, &mut [f32])> = Vec::new();
        let mut rest = &mut ys[..];
        for ex in 0..e {
            for (p, n) in blocks(start[ex], start[ex + 1] - start[ex]) {
                let (head, tail) = rest.split_at_mut(n * d);
                tasks.push((Rows::Routed(ex, p), head));
                rest = tail;
            }
        }
        let mut rest = &mut ysh[..];
        for (t0, n) in blocks(0, if self.shared.is_some() { t } else { 0 }) {
            let (head, tail) = rest.split_at_mut(n * d);
            tasks.push((Rows::Shared(t0), head));
            rest = tail;
        }
        tasks.sort_by_key(|task| std::cmp::Reverse(task.1.len()));
        kl_kernels::par::for_each_queued(&mut tasks, |(rows, y)| {
            let n = y.len() / d;
            let i = rayon::current_thread_index().unwrap_or(0) % bufs.len();
            let mut guard = bufs[i].lock().unwrap_or_else(PoisonError::into_inner);
            let [xs, g, u] = &mut *guard;
            let (m, xr): (&SwiGlu, &[f32]) = match *rows {
                Rows::Routed(ex, p0) => {
                    xs.clear();
                    for &slot in &order[p0..p0 + n] {
                        let ti = slot / k;
                        xs.extend_from_slice(&x[ti * d..(ti + 1) * d]);
                    }
                    (&self.experts[ex], xs)
                }
                Rows::Shared(t0) => (
                    self.shared
                        .as_ref()
                        .expect("shared tasks exist only with a shared expert"),
                    &x[t0 * d..(t0 + n) * d],
                ),
            };
            let hw = n * m.width();
            g.resize(hw, 0.0);
            u.resize(hw, 0.0);
            kl_kernels::par::serial(|| m.forward_with(xr, n, &mut g[..hw], &mut u[..hw], y));
        });
        drop(tasks);
        for b in bufs {
            for v in b.into_inner().unwrap_or_else(PoisonError::into_inner) {
                scratch.give(v);
            }
        }
        // Combine per token: its positions in `order` ascending are its experts ascending, so
        // each output row sums its experts in the same order as one expert-by-expert pass.
        let mut pos = scratch.take_idx();
        pos.resize(t * k, 0);
        for (p, &slot) in order.iter().enumerate() {
            pos[slot] = p;
        }
        out.par_chunks_mut(d)
            .zip(pos.par_chunks_mut(k))
            .for_each(|(o, ps)| {
                ps.sort_unstable();
                for &p in ps.iter() {
                    kl_kernels::simd::axpy(weights[order[p]], &ys[p * d..(p + 1) * d], o);
                }
            });
        scratch.give_idx(pos);
        probe.record("moe.routed_out", &[t, d], out);
        if self.shared.is_some() {
            probe.record("moe.shared_out", &[t, d], &ysh);
            for (o, v) in out.iter_mut().zip(&ysh) {
                *o += v;
            }
        }
        scratch.give(ysh);
        scratch.give(ys);
        scratch.give_idx(order);
        scratch.give_idx(fill);
        scratch.give_idx(start);
        scratch.give(weights);
        scratch.give_idx(ids);
    }

    /// One token: the chosen experts and the shared expert in two parallel regions (the gate
    /// and up products of all of them, which share `x`, then all their down products), each
    /// read as long weight streams across the matrices ([`Linear::forward_one_row`]); then
    /// their outputs are added in the order of [`Moe::forward`] (chosen experts by ascending
    /// id, then the shared one), so the bits are those of the general path.
    #[allow(clippy::too_many_arguments)]
    fn forward_one(
        &self,
        x: &[f32],
        ids: &[usize],
        weights: &[f32],
        order: &[usize],
        probe: &mut Probe,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let d = x.len();
        let chosen = Chosen {
            moe: self,
            ids,
            order,
        };
        let jobs = chosen.len();
        let wmax = self
            .shared
            .as_ref()
            .map_or(0, |s| s.width())
            .max(self.dims.expert_width);
        let mut ys = scratch.take(jobs * d);
        let mut hid = scratch.take(jobs * 2 * wmax);
        Linear::forward_one_row(&mut GateUp {
            chosen,
            x,
            hid: &mut hid,
            wmax,
        });
        for (j, h) in hid.chunks_mut(2 * wmax).take(jobs).enumerate() {
            let w = chosen.mlp(j).width();
            let (g, u) = h[..2 * w].split_at_mut(w);
            swiglu(g, u);
        }
        Linear::forward_one_row(&mut Down {
            chosen,
            hid: &hid,
            ys: &mut ys,
            d,
            wmax,
        });
        for (j, &slot) in order.iter().enumerate() {
            kl_kernels::simd::axpy(weights[slot], &ys[j * d..(j + 1) * d], out);
        }
        probe.record("moe.routed_out", &[1, d], out);
        if self.shared.is_some() {
            let s = &ys[ids.len() * d..(ids.len() + 1) * d];
            probe.record("moe.shared_out", &[1, d], s);
            for (o, v) in out.iter_mut().zip(s) {
                *o += v;
            }
        }
        scratch.give(hid);
        scratch.give(ys);
    }
}

/// The experts one token runs, in the order their outputs are added: the chosen ones by
/// ascending id (`ids` taken in `order`), then the shared one.
#[derive(Clone, Copy)]
struct Chosen<'a> {
    moe: &'a Moe,
    ids: &'a [usize],
    order: &'a [usize],
}

impl<'a> Chosen<'a> {
    fn len(&self) -> usize {
        self.ids.len() + usize::from(self.moe.shared.is_some())
    }

    /// Expert `j` of the list.
    fn mlp(&self, j: usize) -> &'a SwiGlu {
        match self.ids.get(j) {
            Some(_) => &self.moe.experts[self.ids[self.order[j]]],
            None => self
                .moe
                .shared
                .as_ref()
                .expect("the last expert of the list is the shared one"),
        }
    }
}

/// The gate and up products of every expert of a token (`x` for all), into `hid`: expert `j`'s
/// gate at `j·2·wmax`, its up right after.
struct GateUp<'a, 'b> {
    chosen: Chosen<'a>,
    x: &'b [f32],
    hid: &'b mut [f32],
    wmax: usize,
}

impl RowJobs for GateUp<'_, '_> {
    fn count(&self) -> usize {
        2 * self.chosen.len()
    }
    fn job(&mut self, i: usize) -> (&Linear, &[f32], &mut [f32]) {
        let m = self.chosen.mlp(i / 2);
        let w = m.width();
        let (g, u) = self.hid[(i / 2) * 2 * self.wmax..][..2 * w].split_at_mut(w);
        match i % 2 {
            0 => (&m.gate, self.x, g),
            _ => (&m.up, self.x, u),
        }
    }
}

/// The down products of every expert of a token, from its activations in `hid` (as
/// [`GateUp`] left them, through SwiGLU) into `ys` (`d` values each).
struct Down<'a, 'b> {
    chosen: Chosen<'a>,
    hid: &'b [f32],
    ys: &'b mut [f32],
    d: usize,
    wmax: usize,
}

impl RowJobs for Down<'_, '_> {
    fn count(&self) -> usize {
        self.chosen.len()
    }
    fn job(&mut self, j: usize) -> (&Linear, &[f32], &mut [f32]) {
        let m = self.chosen.mlp(j);
        let h = &self.hid[j * 2 * self.wmax..][..m.width()];
        (&m.down, h, &mut self.ys[j * self.d..(j + 1) * self.d])
    }
}

#[cfg(test)]
mod tests {
    use super::{blocks, EXPERT_BLOCK};

    /// Blocks cover the rows once, in order, in the fewest pieces of at most `EXPERT_BLOCK`,
    /// and differ in size by at most one row (no few-row tail).
    #[test]
    fn expert_blocks_are_few_and_even() {
        for n in [0usize, 1, 7, 255, 256, 257, 260, 511, 512, 513, 1000] {
            let b: Vec<_> = blocks(10, n).collect();
            assert_eq!(b.len(), n.div_ceil(EXPERT_BLOCK), "n {n}");
            let mut next = 10;
            for &(p, m) in &b {
                assert_eq!(p, next, "n {n}: contiguous");
                assert!((1..=EXPERT_BLOCK).contains(&m), "n {n}: size {m}");
                next += m;
            }
            assert_eq!(next, 10 + n, "n {n}: covered");
            let (lo, hi) = (b.iter().map(|x| x.1).min(), b.iter().map(|x| x.1).max());
            assert!(hi.unwrap_or(0) - lo.unwrap_or(0) <= 1, "n {n}: even");
        }
        assert_eq!(blocks(0, 260).collect::<Vec<_>>(), [(0, 130), (130, 130)]);
    }
}
