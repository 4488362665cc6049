//! Choosing the next token from a row of logits.
//!
//! The chain follows llama.cpp's classic order:
//!
//! 1. logit bias (`logit += bias` for the listed ids),
//! 2. repetition penalty on every distinct id among the last `repeat_last_n` ids of the history
//!    (a positive logit is divided by the penalty, a negative one multiplied, as in CTRL and
//!    llama.cpp),
//! 3. greedy exit: with `temperature == 0` the result is the argmax (ties go to the lowest id) and
//!    nothing below runs, so greedy decoding draws no random numbers;
//! 4. top-k (keep the `k` largest logits; `0` keeps all),
//! 5. temperature (divide the logits),
//! 6. softmax,
//! 7. top-p (keep the smallest prefix of the sorted distribution whose mass reaches `p`),
//! 8. min-p (keep tokens whose probability is at least `min_p` times the largest),
//! 9. a draw from what is left, renormalised, with the sampler's own ChaCha8 generator.
//!
//! Every filter keeps at least one token. Candidates are sorted by logit, ties by ascending id, so a
//! draw depends only on the logits, the history and the seed: the same seed gives the same ids.
//! The candidate, weight and history buffers live in the [`Sampler`] and are reused, so
//! sampling does not allocate once they have grown to the vocabulary size. With min-p on, the
//! candidates it is sure to drop are dropped before the sort (min-p's survivors are a prefix of
//! the sorted order, so the draw is the same), which matters with top-k off: the whole
//! vocabulary is not sorted. With top-k on, the `k` best are collected in one pass that skips
//! every block of logits none of which beats the current `k`-th best (`top_k`), instead of
//! selecting among a list of every id; the candidates are then held in sorted order.

use crate::EngineError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;

/// How to choose tokens. [`Default`] matches llama.cpp's defaults; [`SamplingParams::greedy`] is
/// argmax decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling mass in `(0, 1]`; `1` disables the filter.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in `[0, 1]`; `0` disables it.
    pub min_p: f32,
    /// Repetition penalty (`1` disables it; `> 1` discourages repeats).
    pub repetition_penalty: f32,
    /// How many of the most recent history ids the penalty looks at; `0` means all of them.
    pub repeat_last_n: usize,
    /// Seed of the sampler's random generator.
    pub seed: u64,
    /// Added to the logits of the listed ids before anything else (`f32::NEG_INFINITY` bans one).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Argmax decoding: temperature 0, no penalty.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// True when sampling is argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Refuse values outside their ranges, naming the parameter.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Sampling(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan()) {
            return bad(format!("logit bias for id {id} is {b}"));
        }
        Ok(())
    }
}

/// A sampler: the parameters, a seeded random generator and reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    cand: Vec<(u32, f32)>,
    /// Each candidate's softmax weight, by id (computed once per draw).
    weights: Vec<f32>,
    seen: Vec<u32>,
}

/// Descending logit, then ascending id: a total, deterministic order.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// A logit as the candidates hold it: NaN becomes −∞.
fn finite_or_low(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l
    }
}

/// The `k` first candidates of `logits` in [`by_logit`] order (`0 < k < logits.len()`), into
/// `cand` in that order: what selecting among all of them gives, in one pass over the logits.
///
/// Why: with top-k on (llama.cpp's default of 40), selecting from a list of every id took 59
/// µs a token over `mini`'s 32K logits and 306 µs over the released model's 160K. Here a
/// block of 16 logits whose largest is not above the current `k`-th best is skipped whole
/// (ids rise through the pass, so a later equal logit loses its tie), and the few that
/// qualify are collected and cut back to `k` whenever `2k` have gathered.
fn top_k(logits: &[f32], k: usize, cand: &mut Vec<(u32, f32)>) {
    const L: usize = 16;
    cand.clear();
    // The k-th best so far, once there has been a cut: a logit must beat it to be kept.
    let mut floor = None::<f32>;
    let cut = |cand: &mut Vec<(u32, f32)>| {
        cand.select_nth_unstable_by(k - 1, by_logit);
        cand.truncate(k);
        cand.iter().map(|c| c.1).fold(f32::INFINITY, f32::min)
    };
    for (b, block) in logits.chunks(L).enumerate() {
        if let Some(f) = floor {
            // NaNs never raise the block's largest, and are −∞ to the candidates anyway.
            let top = block
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            if top <= f {
                continue;
            }
        }
        for (j, &l) in block.iter().enumerate() {
            let l = finite_or_low(l);
            if floor.is_none_or(|f| l > f) {
                cand.push(((b * L + j) as u32, l));
            }
        }
        if cand.len() >= 2 * k {
            floor = Some(cut(cand));
        }
    }
    if cand.len() > k {
        cut(cand);
    }
    cand.sort_unstable_by(by_logit);
}

/// Index of the largest value, ties resolved toward the lowest index; NaNs never win, and a row
/// with nothing above −∞ gives 0 ([`kl_kernels::simd::argmax`]).
pub fn argmax(logits: &[f32]) -> u32 {
    kl_kernels::simd::argmax(logits) as u32
}

impl Sampler {
    /// A sampler whose generator is seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            cand: Vec::new(),
            weights: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Apply the logit bias and the repetition penalty to `logits` in place.
    fn adjust(&mut self, logits: &mut [f32], history: &[u32]) {
        for &(id, b) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        let p = self.params.repetition_penalty;
        if p == 1.0 || history.is_empty() {
            return;
        }
        let n = self.params.repeat_last_n;
        let recent = if n == 0 || n >= history.len() {
            history
        } else {
            &history[history.len() - n..]
        };
        self.seen.clear();
        self.seen.extend_from_slice(recent);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &id in &self.seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }

    /// Choose the next token. `logits` is modified (bias, penalty); `history` is the sequence so
    /// far (for the repetition penalty). An empty `logits` gives id 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.draw(logits, history, true)
    }

    /// [`sample`](Self::sample); with `prefilter`, the candidates that min-p is sure to drop are
    /// dropped before the sort. The same ids either way: the survivors of min-p are a prefix of
    /// the sorted order, and top-p and min-p only ever keep a prefix of what they are given.
    fn draw(&mut self, logits: &mut [f32], history: &[u32], prefilter: bool) -> u32 {
        self.adjust(logits, history);
        if self.params.is_greedy() || logits.len() <= 1 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        let k = self.params.top_k;
        if k > 0 && k < logits.len() {
            top_k(logits, k, cand);
        } else {
            cand.clear();
            cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, finite_or_low(l))),
            );
        }
        // The first candidate of the sorted order (largest logit, lowest id).
        let first = *cand
            .iter()
            .min_by(|a, b| by_logit(a, b))
            .expect("at least one candidate");
        let max = first.1;
        if !max.is_finite() {
            // +inf dominates everything; all -inf leaves nothing to weigh.
            return first.0;
        }
        let inv_t = 1.0 / self.params.temperature;
        // Each candidate's weight (kept by id for the probabilities below) and the softmax's
        // normaliser over every candidate, summed in the order they are held.
        let weights = &mut self.weights;
        weights.resize(logits.len(), 0.0);
        let mut sum = 0f64;
        let mut weigh = |c: &(u32, f32)| {
            let w = ((c.1 - max) * inv_t).exp();
            weights[c.0 as usize] = w;
            sum += w as f64;
            w
        };
        if prefilter && self.params.min_p > 0.0 {
            // min-p keeps a token only if its weight (the best token's is 1) reaches about
            // `min_p`; the margin covers the rounding of the probabilities compared below. Only
            // these are then sorted: sorting the whole vocabulary (top-k 0; 160K ids on the
            // released model) took 10 ms a token on the development VM, against 2.4 ms for this
            // on uniformly spread logits (a fifth survive) and less on a peaked distribution.
            let cut = self.params.min_p * 0.999;
            cand.retain(|c| weigh(c) >= cut);
        } else {
            cand.iter().for_each(|c| {
                weigh(c);
            });
        }
        cand.sort_unstable_by(by_logit);
        for c in cand.iter_mut() {
            c.1 = (weights[c.0 as usize] as f64 / sum) as f32;
        }
        let top_p = self.params.top_p as f64;
        if top_p < 1.0 {
            let mut cum = 0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                cum += c.1 as f64;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if self.params.min_p > 0.0 {
            let threshold = self.params.min_p * cand[0].1;
            let keep = cand.iter().take_while(|c| c.1 >= threshold).count().max(1);
            cand.truncate(keep);
        }
        let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for c in cand.iter() {
            r -= c.1 as f64;
            if r < 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
    }

    fn draw(params: SamplingParams, steps: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        let mut hist = Vec::new();
        for i in 0..steps {
            let mut l = logits(200, i as u64);
            let id = s.sample(&mut l, &hist);
            hist.push(id);
        }
        hist
    }

    #[test]
    fn same_seed_same_ids_different_seed_differs() {
        let p = |seed| SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        };
        assert_eq!(draw(p(7), 64), draw(p(7), 64));
        assert_ne!(draw(p(7), 64), draw(p(8), 64));
        let d = SamplingParams {
            seed: 3,
            ..Default::default()
        };
        assert_eq!(draw(d.clone(), 64), draw(d, 64));
    }

    #[test]
    fn greedy_is_argmax_with_lowest_tie() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NAN, 0.5, 0.5], &[]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        let mut l = [4.0, -1.0, 3.0];
        // id 0 repeated twice is penalised once.
        assert_eq!(s.sample(&mut l, &[0, 1, 0]), 2);
        assert_eq!(l, [2.0, -2.0, 3.0]);
        // Only the last `repeat_last_n` ids count.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            repeat_last_n: 1,
            ..SamplingParams::greedy()
        });
        let mut l = [4.0, -1.0, 3.0];
        s.sample(&mut l, &[0, 1]);
        assert_eq!(l, [4.0, -2.0, 3.0]);
    }

    #[test]
    fn filters_restrict_the_support() {
        let base = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let l = [0.0f32, 5.0, 4.9, -2.0, 4.8];
        let support = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..400 {
                seen.insert(s.sample(&mut l.clone(), &[]));
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(
            support(SamplingParams {
                top_k: 2,
                ..base.clone()
            }),
            [1, 2]
        );
        assert_eq!(
            support(SamplingParams {
                top_k: 1,
                ..base.clone()
            }),
            [1]
        );
        // Probabilities ≈ .34 .31 .28 …: top-p 0.5 keeps two, 0.01 keeps one.
        assert_eq!(
            support(SamplingParams {
                top_p: 0.5,
                ..base.clone()
            }),
            [1, 2]
        );
        assert_eq!(
            support(SamplingParams {
                top_p: 0.01,
                ..base.clone()
            }),
            [1]
        );
        assert_eq!(
            support(SamplingParams {
                min_p: 0.5,
                ..base.clone()
            }),
            [1, 2, 4]
        );
        let banned = SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)],
            top_k: 1,
            ..base.clone()
        };
        assert_eq!(support(banned), [4]);
        // Low temperature concentrates on the best token.
        assert_eq!(
            support(SamplingParams {
                temperature: 0.001,
                ..base
            }),
            [1]
        );
    }

    /// The one-pass top-k keeps exactly the candidates that selecting among every id keeps, in
    /// the same order: ties (coarse values), NaNs, infinities, lengths off the block size, and
    /// `k` from 1 to `n − 1`.
    #[test]
    fn top_k_keeps_what_selecting_from_all_keeps() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut got = Vec::new();
        for n in [2usize, 3, 17, 31, 100, 1000, 4099] {
            for case in 0..4 {
                let l: Vec<f32> = (0..n)
                    .map(|i| match (case, rng.gen_range(0..20)) {
                        (1, _) => rng.gen_range(-3i32..3) as f32,
                        (2, 0) => f32::NAN,
                        (2, 1) => f32::NEG_INFINITY,
                        (2, 2) => f32::INFINITY,
                        (3, _) => -(i as f32),
                        _ => rng.gen_range(-5.0f32..5.0),
                    })
                    .collect();
                for k in [1, 2, 5, 40, n / 2, n - 1] {
                    if k == 0 || k >= n {
                        continue;
                    }
                    let mut all: Vec<(u32, f32)> = l
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (i as u32, finite_or_low(v)))
                        .collect();
                    all.sort_by(by_logit);
                    all.truncate(k);
                    top_k(&l, k, &mut got);
                    let bits = |c: &[(u32, f32)]| {
                        c.iter().map(|&(i, v)| (i, v.to_bits())).collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&got), bits(&all), "n {n} case {case} k {k}");
                }
            }
        }
    }

    /// Dropping what min-p will drop before sorting draws the same ids as sorting everything,
    /// over random vocabularies with wide and narrow distributions, with and without top-k and
    /// top-p.
    #[test]
    fn min_p_prefilter_draws_the_same_ids() {
        for (i, (top_k, top_p, min_p, temperature, spread)) in [
            (0, 1.0, 0.05, 0.8, 4.0),
            (0, 0.95, 0.05, 1.0, 4.0),
            (0, 0.5, 0.01, 1.5, 1.0),
            (40, 0.95, 0.05, 0.8, 4.0),
            (0, 1.0, 0.3, 0.7, 0.3),
            (0, 0.9, 0.0001, 1.0, 8.0),
        ]
        .into_iter()
        .enumerate()
        {
            let params = SamplingParams {
                top_k,
                top_p,
                min_p,
                temperature,
                seed: 7 + i as u64,
                ..Default::default()
            };
            let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
            for step in 0..200 {
                let l: Vec<f32> = logits(5000, (i * 1000 + step) as u64)
                    .iter()
                    .map(|x| x * spread)
                    .collect();
                let (x, y) = (
                    a.draw(&mut l.clone(), &[], true),
                    b.draw(&mut l.clone(), &[], false),
                );
                assert_eq!(x, y, "case {i}, step {step}");
            }
        }
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top-p"), "{e}");
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
