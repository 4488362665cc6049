//! Causal attention over MLA's latent cache, as multi-query attention with an online softmax.
//!
//! With weight absorption (spec §6.3) every MLA head attends to the same per-token key row
//! `[c_s ; kpe_s]` (width `Dk = R + P`) and reads the value `c_s`, the first `Dv = R` columns of that
//! same row. So one cache row serves as key and value for all heads.
//!
//! The cache is a list of fixed-size blocks (`block_rows` rows each, the last one partly filled),
//! so it can grow without copying. Keys are visited in tiles of at most [`TILE`] rows with an
//! online (running max / running sum) softmax: no score matrix larger than `H × TILE` ever exists,
//! whatever the context length.
//!
//! Query `i` of `Tq` sees keys `0 ..= n_keys − Tq + i` (the queries are the last `Tq` positions).
//! Keys are grouped in fixed segments of [`SEGMENT`] keys whose partial softmax states are merged
//! in order. A single query (decode) runs its segments in parallel (flash-decoding), so
//! long-context decode scales with threads; the result is bit-identical to the serial order, so
//! a token's output does not depend on whether it was prefilled or decoded, or on the chunking.

use crate::simd::{axpy, dot_f32};
use crate::Elem;
use rayon::prelude::*;

/// Keys per softmax tile.
pub const TILE: usize = 64;

/// Keys per segment: each query's keys are visited in fixed segments of this many keys (aligned
/// to key 0) whose partial softmax states are merged in order. Decode runs the segments in
/// parallel; prefill runs them serially per query; both give identical bits.
pub const SEGMENT: usize = 1024;

/// A source of cache rows (key rows; the value is the first `dv` columns of each).
///
/// Implemented for block lists of any [`Elem`] by [`BlockRows`]; quantised caches (fp8 with
/// per-row scales) implement it in the layers crate.
pub trait KeyRows: Sync {
    /// Number of rows available.
    fn rows(&self) -> usize;
    /// Widen up to `n` rows starting at row `r0` into `dst` (`[n, dk]` f32), stopping early at a
    /// storage boundary; returns the number of rows written (≥ 1 when `r0 < rows()`).
    fn widen(&self, r0: usize, n: usize, dst: &mut [f32]) -> usize;
}

/// Rows stored in fixed-size blocks of `block_rows` rows of width `dk`.
pub struct BlockRows<'a, C: Elem> {
    /// The blocks (the last may be partly filled).
    pub blocks: &'a [&'a [C]],
    /// Rows per block.
    pub block_rows: usize,
    /// Row width.
    pub dk: usize,
    /// Rows in use.
    pub n_rows: usize,
}

impl<C: Elem> KeyRows for BlockRows<'_, C> {
    fn rows(&self) -> usize {
        self.n_rows
    }
    fn widen(&self, r0: usize, n: usize, dst: &mut [f32]) -> usize {
        let (b, r) = (r0 / self.block_rows, r0 % self.block_rows);
        let n = n.min(self.block_rows - r).min(self.n_rows - r0);
        C::widen(
            &self.blocks[b][r * self.dk..(r + n) * self.dk],
            &mut dst[..n * self.dk],
        );
        n
    }
}

/// Shape of a latent attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentAttnShape {
    /// Query heads.
    pub h: usize,
    /// Key width (query width) per head.
    pub dk: usize,
    /// Value width: the first `dv` columns of a key row.
    pub dv: usize,
}

/// Plain twin: full score vector per (query, head), then softmax and weighted sum.
#[allow(clippy::too_many_arguments)]
pub fn latent_attention_reference<C: Elem>(
    s: LatentAttnShape,
    q: &[f32],
    blocks: &[&[C]],
    block_rows: usize,
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
) {
    let LatentAttnShape { h, dk, dv } = s;
    let tq = q.len() / (h * dk);
    let key = |j: usize| -> Vec<f32> {
        let b = blocks[j / block_rows];
        let r = j % block_rows;
        b[r * dk..(r + 1) * dk].iter().map(|x| x.to_f32()).collect()
    };
    for i in 0..tq {
        let lim = n_keys - tq + i + 1;
        for hh in 0..h {
            let qh = &q[(i * h + hh) * dk..(i * h + hh + 1) * dk];
            let sc: Vec<f32> = (0..lim)
                .map(|j| scale * key(j).iter().zip(qh).map(|(a, b)| a * b).sum::<f32>())
                .collect();
            let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
            let l: f32 = p.iter().sum();
            let o = &mut out[(i * h + hh) * dv..(i * h + hh + 1) * dv];
            o.fill(0.0);
            for (j, pj) in p.iter().enumerate() {
                let kv = key(j);
                for c in 0..dv {
                    o[c] += pj / l * kv[c];
                }
            }
        }
    }
}

/// Running softmax state of one query over a range of keys, for all heads.
struct Partial {
    m: Vec<f32>,   // [H] running max
    l: Vec<f32>,   // [H] running sum of exp
    acc: Vec<f32>, // [H, Dv] unnormalised output
}

impl Partial {
    fn new(h: usize, dv: usize) -> Self {
        Partial {
            m: vec![f32::NEG_INFINITY; h],
            l: vec![0.0; h],
            acc: vec![0.0; h * dv],
        }
    }

    fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Fold `other` into `self`.
    fn merge(&mut self, other: &Partial, dv: usize) {
        for hh in 0..self.m.len() {
            let m = self.m[hh].max(other.m[hh]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((self.m[hh] - m).exp(), (other.m[hh] - m).exp());
            self.l[hh] = self.l[hh] * a + other.l[hh] * b;
            let acc = &mut self.acc[hh * dv..(hh + 1) * dv];
            for (x, y) in acc.iter_mut().zip(&other.acc[hh * dv..(hh + 1) * dv]) {
                *x = *x * a + y * b;
            }
            self.m[hh] = m;
        }
    }

    fn finish(&self, dv: usize, out: &mut [f32]) {
        for hh in 0..self.m.len() {
            let inv = if self.l[hh] > 0.0 {
                1.0 / self.l[hh]
            } else {
                0.0
            };
            for (o, a) in out[hh * dv..(hh + 1) * dv]
                .iter_mut()
                .zip(&self.acc[hh * dv..(hh + 1) * dv])
            {
                *o = a * inv;
            }
        }
    }
}

/// Visit keys `k0..k1` for one query `qrow` `[H, Dk]`, updating `p`. `tile` is scratch.
#[allow(clippy::too_many_arguments)]
fn attend_range<R: KeyRows + ?Sized>(
    s: LatentAttnShape,
    qrow: &[f32],
    rows: &R,
    k0: usize,
    k1: usize,
    scale: f32,
    p: &mut Partial,
    tile: &mut Vec<f32>,
    scores: &mut Vec<f32>,
) {
    let LatentAttnShape { h, dk, dv } = s;
    let mut j = k0;
    while j < k1 {
        tile.resize(TILE * dk, 0.0);
        let n = rows.widen(j, TILE.min(k1 - j), tile);
        scores.resize(n, 0.0);
        for hh in 0..h {
            let qh = &qrow[hh * dk..(hh + 1) * dk];
            let mut mx = p.m[hh];
            for (x, sc) in scores.iter_mut().enumerate() {
                *sc = scale * dot_f32(qh, &tile[x * dk..(x + 1) * dk]);
                mx = mx.max(*sc);
            }
            let corr = (p.m[hh] - mx).exp();
            let acc = &mut p.acc[hh * dv..(hh + 1) * dv];
            if corr != 1.0 {
                for a in acc.iter_mut() {
                    *a *= corr;
                }
            }
            let mut l = p.l[hh] * corr;
            for (x, sc) in scores.iter().enumerate() {
                let e = (sc - mx).exp();
                l += e;
                axpy(e, &tile[x * dk..x * dk + dv], acc);
            }
            p.l[hh] = l;
            p.m[hh] = mx;
        }
        j += n;
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each query writes a disjoint output row.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Causal latent attention. `q` `[Tq, H, Dk]`, `blocks` each `[block_rows, Dk]`, `n_keys` keys in
/// total (≥ Tq), `out` `[Tq, H, Dv]`.
#[allow(clippy::too_many_arguments)]
pub fn latent_attention<C: Elem>(
    s: LatentAttnShape,
    q: &[f32],
    blocks: &[&[C]],
    block_rows: usize,
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(
        blocks.len() * block_rows >= n_keys,
        "latent_attention: blocks hold fewer than {n_keys} keys"
    );
    let rows = BlockRows {
        blocks,
        block_rows,
        dk: s.dk,
        n_rows: n_keys,
    };
    latent_attention_rows(s, q, &rows, scale, out)
}

/// Causal latent attention over any [`KeyRows`] source holding `rows.rows()` keys.
pub fn latent_attention_rows<R: KeyRows + ?Sized>(
    s: LatentAttnShape,
    q: &[f32],
    rows: &R,
    scale: f32,
    out: &mut [f32],
) {
    let LatentAttnShape { h, dk, dv } = s;
    assert_eq!(q.len() % (h * dk), 0);
    let tq = q.len() / (h * dk);
    let n_keys = rows.rows();
    assert!(
        n_keys >= tq,
        "latent_attention: {n_keys} keys for {tq} queries"
    );
    assert_eq!(out.len(), tq * h * dv);
    if tq == 1 && n_keys > SEGMENT {
        // Flash-decoding: segments in parallel, merged in order (same bits as the serial path).
        let partials: Vec<Partial> = (0..n_keys.div_ceil(SEGMENT))
            .into_par_iter()
            .map(|si| {
                let mut p = Partial::new(h, dv);
                let (mut tile, mut scores) = (Vec::new(), Vec::new());
                let (k0, k1) = (si * SEGMENT, ((si + 1) * SEGMENT).min(n_keys));
                attend_range(s, q, rows, k0, k1, scale, &mut p, &mut tile, &mut scores);
                p
            })
            .collect();
        let mut total = Partial::new(h, dv);
        for p in &partials {
            total.merge(p, dv);
        }
        total.finish(dv, out);
        return;
    }
    let op = SendPtr(out.as_mut_ptr());
    (0..tq).into_par_iter().for_each_init(
        || {
            (
                Partial::new(h, dv),
                Partial::new(h, dv),
                Vec::new(),
                Vec::new(),
            )
        },
        |(p, seg, tile, scores), i| {
            p.reset();
            let lim = n_keys - tq + i + 1;
            let qrow = &q[i * h * dk..(i + 1) * h * dk];
            // Fixed segments merged in order, exactly as the decode path does, so a query's
            // result does not depend on how many queries share the call.
            let mut k0 = 0;
            while k0 < lim {
                let k1 = (k0 + SEGMENT).min(lim);
                seg.reset();
                attend_range(s, qrow, rows, k0, k1, scale, seg, tile, scores);
                p.merge(seg, dv);
                k0 = k1;
            }
            // SAFETY: row i of out is written only by this task.
            let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(i * h * dv), h * dv) };
            p.finish(dv, o);
        },
    );
}
