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
//! tokens; experts no token chose are never touched.

use crate::linear::Linear;
use crate::mlp::SwiGlu;
use crate::{vector, Probe};
use kl_config::MoeDims;
use kl_kernels::activation::sigmoid;
use kl_weights::{Checkpoint, WeightsError};

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
            gate: Linear::load(ckpt, &format!("{prefix}gate.weight"), e, d)?,
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
        let MoeDims {
            num_experts: e,
            top_k: k,
            num_expert_group: ng,
            topk_group,
            renormalize,
            routed_scaling_factor,
            ..
        } = self.dims;
        let mut ids = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut scores = vec![0f32; e];
        let mut choice = vec![0f32; e];
        let mut order: Vec<usize> = (0..e).collect();
        for ti in 0..t {
            for j in 0..e {
                scores[j] = sigmoid(logits[ti * e + j]);
                choice[j] = scores[j] + self.bias[j];
            }
            if ng > 1 {
                // Group-limited routing: group score = sum of its two best choice scores.
                let gs = e / ng;
                let mut gscore: Vec<(f32, usize)> = (0..ng)
                    .map(|g| {
                        let mut v: Vec<f32> = choice[g * gs..(g + 1) * gs].to_vec();
                        v.sort_by(|a, b| b.total_cmp(a));
                        (v[0] + v[1], g)
                    })
                    .collect();
                gscore.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, g) in &gscore[topk_group..] {
                    // As the reference: masked scores become 0.0.
                    choice[g * gs..(g + 1) * gs].fill(0.0);
                }
            }
            order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
            let chosen = &order[..k];
            let w: Vec<f32> = chosen
                .iter()
                .map(|&j| match mode {
                    RouterWeights::Unbiased => scores[j],
                    RouterWeights::Biased => scores[j] + self.bias[j],
                })
                .collect();
            let denom = if renormalize && k > 1 {
                w.iter().sum::<f32>() + 1e-20
            } else {
                1.0
            };
            for (&j, wj) in chosen.iter().zip(w) {
                ids.push(j);
                weights.push(wj / denom * routed_scaling_factor);
            }
        }
        Routing { ids, weights }
    }

    /// `out[T, D] = MoE(x[T, D])`.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        router: RouterWeights,
        probe: &mut Probe,
        out: &mut [f32],
    ) {
        let (e, k) = (self.dims.num_experts, self.dims.top_k);
        let d = self.gate.cols();
        let logits = self.gate.apply(x, t);
        probe.record("moe.router_logits", &[t, e], &logits);
        let routing = self.route(&logits, t, router);
        if probe.enabled() {
            // Golden order: ids ascending per token, weights alongside.
            let (mut ids, mut ws) = (Vec::new(), Vec::new());
            for ti in 0..t {
                let mut pairs: Vec<(usize, f32)> = (0..k)
                    .map(|j| (routing.ids[ti * k + j], routing.weights[ti * k + j]))
                    .collect();
                pairs.sort_by_key(|p| p.0);
                ids.extend(pairs.iter().map(|p| p.0 as f32));
                ws.extend(pairs.iter().map(|p| p.1));
            }
            probe.record("moe.topk_ids", &[t, k], &ids);
            probe.record("moe.topk_weights", &[t, k], &ws);
        }
        // Group tokens by expert.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for ti in 0..t {
            for j in 0..k {
                assigned[routing.ids[ti * k + j]].push((ti, routing.weights[ti * k + j]));
            }
        }
        out.fill(0.0);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for (ex, toks) in assigned.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let n = toks.len();
            xs.clear();
            for &(ti, _) in toks {
                xs.extend_from_slice(&x[ti * d..(ti + 1) * d]);
            }
            ys.resize(n * d, 0.0);
            self.experts[ex].forward(&xs, n, &mut ys);
            for (r, &(ti, w)) in toks.iter().enumerate() {
                kl_kernels::simd::axpy(w, &ys[r * d..(r + 1) * d], &mut out[ti * d..(ti + 1) * d]);
            }
        }
        probe.record("moe.routed_out", &[t, d], out);
        if let Some(shared) = &self.shared {
            let mut s = vec![0f32; t * d];
            shared.forward(x, t, &mut s);
            probe.record("moe.shared_out", &[t, d], &s);
            for (o, v) in out.iter_mut().zip(&s) {
                *o += v;
            }
        }
    }
}
