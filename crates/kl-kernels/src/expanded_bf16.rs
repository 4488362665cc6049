//! bf16 products for the expanded form of MLA prefill: one head's queries against one block of
//! that head's keys and values.
//!
//! In the expanded form (spec §6.2) every cached latent row is turned into per-head keys
//! `[W_UK c ; k_pe]` and values `W_UV c`, a block of rows at a time, and each head attends with
//! its own queries: `T·n·(dn + dr + dv)` multiply–adds per head for `T` queries over `n` keys,
//! which is what a long prompt's prefill spends most of its time on. Over a bf16 (or fp8) cache
//! the attention runs on bf16 products, as decode and the absorbed form already do over such a
//! cache ([`crate::attention_bf16`]): the queries, the block's keys and values, and each block's
//! probabilities are rounded to bf16, every product is exact in f32, and the f32 sums run in
//! one fixed order, so CPUs with AVX512-BF16 take 32 multiply–adds an instruction
//! (`vdpbf16ps`) where an FMA takes 16, and the rest get the same bits from the FMA emulation.
//!
//! **Layout.** Queries come packed in groups of [`GROUP`] ([`pack_queries`]): each group is
//! one `attention_bf16::pack_query` block, the group's queries in the role of the heads
//! there (16 to a register, each key's column pair broadcast), so that one key pair meets 16
//! or 32 queries per instruction. A group's scores (`GROUP × n` f32, in L2) become its
//! probabilities and go straight into `P·V` on the value rows, in key order. The layers build
//! a block's keys and values through `kv_b_proj` with the same kind of products
//! ([`crate::bf16_activations::matmul_bf16_anywhere`]: the latent rows are bf16 values, and
//! their outputs are rounded here at once).
//!
//! **Numerics** (the same as [`crate::attention_bf16`]'s): a score sums its column pairs in
//! order, the odd column's product first; the online softmax is [`softmax_update`] over the
//! keys a query sees; each output element sums its keys' products in key order. The keys and
//! values of a block are rounded to bf16 (round to nearest even) once per block; the `k_pe`
//! part of a key is a cache value and so already bf16 over a bf16 cache. Everything runs
//! under [`crate::cpu::FlushDenormals`], as the instruction does. Against the f32 products of
//! the same form the scores move by about 2⁻⁹ of their terms' size (docs/memory.md).
//!
//! [`attend_block_reference`] is the plain twin: scalar loops, libm's `exp`.

use crate::attention::{pv_f32, softmax_update, softmax_update_reference};
use crate::attention_bf16 as bf;
use crate::simd::Prefetch;
use half::bf16;

/// Queries per packed group: one score block of `GROUP × n` f32 (64 KiB for 256 keys).
pub const GROUP: usize = 64;

/// Dwords of `t` queries of width `qk` packed by [`pack_queries`].
pub fn packed_queries_len(t: usize, qk: usize) -> usize {
    t.div_ceil(GROUP) * bf::packed_query_len(GROUP, qk)
}

/// One head's `t` queries times `scale`, rounded to bf16 and packed group by group: query `i`
/// is `q[i·stride..][..qk]`; group `g` (queries `64g..`) is laid out as
/// `attention_bf16::pack_query` lays out that many heads, at dword `g · packed_query_len(64,
/// qk)`. `qk` must be even.
pub fn pack_queries(q: &[f32], stride: usize, t: usize, qk: usize, scale: f32, out: &mut [u32]) {
    assert!(
        bf::takes(qk),
        "expanded_bf16: query width {qk} is not a whole number of pairs"
    );
    assert!(
        t == 0 || q.len() >= (t - 1) * stride + qk,
        "expanded_bf16: queries too short"
    );
    assert!(out.len() >= packed_queries_len(t, qk));
    let gl = bf::packed_query_len(GROUP, qk);
    for (g, dst) in out[..packed_queries_len(t, qk)]
        .chunks_exact_mut(gl)
        .enumerate()
    {
        let g0 = g * GROUP;
        let n = GROUP.min(t - g0);
        let hp = n.div_ceil(16) * 16;
        for (c, pairs) in dst[..qk / 2 * hp].chunks_exact_mut(hp).enumerate() {
            for (j, d) in pairs.iter_mut().enumerate() {
                *d = if j < n {
                    let x = &q[(g0 + j) * stride + 2 * c..];
                    u32::from(bf::round_bf16(x[0] * scale))
                        | u32::from(bf::round_bf16(x[1] * scale)) << 16
                } else {
                    0
                };
            }
        }
    }
}

/// A worker thread's buffers for [`attend_block`], kept between calls.
#[derive(Default)]
pub struct BlockBufs {
    /// The block's keys and values rounded to bf16 (for the instruction).
    k16: Vec<bf16>,
    v16: Vec<bf16>,
    /// One group's scores, then probabilities `[GROUP, n]`.
    scores: Vec<f32>,
    /// One group's probabilities in key pairs (for the instruction).
    pk: Vec<u32>,
}

impl BlockBufs {
    /// Size the buffers for blocks of up to `nb` keys of widths `qk`, `dv` (reserved, so that
    /// the calls that follow allocate nothing).
    pub fn fit(&mut self, nb: usize, qk: usize, dv: usize) {
        fn at_least<T: Clone>(v: &mut Vec<T>, n: usize, zero: T) {
            if v.len() < n {
                v.resize(n, zero);
            }
        }
        at_least(&mut self.k16, nb * qk, bf16::ZERO);
        at_least(&mut self.v16, nb * dv, bf16::ZERO);
        at_least(&mut self.scores, GROUP * nb, 0.0);
        at_least(&mut self.pk, bf::packed_probs_len(GROUP, nb), 0);
    }

    /// Bytes held after [`fit`](Self::fit)`(nb, qk, dv)` (for memory planning).
    pub fn bytes(nb: usize, qk: usize, dv: usize) -> usize {
        2 * nb * (qk + dv) + 4 * GROUP * nb + 4 * bf::packed_probs_len(GROUP, nb)
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        2 * (self.k16.len() + self.v16.len()) + 4 * (self.scores.len() + self.pk.len())
    }
}

/// Queries `first..t` of one head (packed by [`pack_queries`] in `qp`) against a block of `nb`
/// keys `[nb, qk]` and values `[nb, dv]`: query `i` sees the block's first `seen(i)` keys
/// (at least one, at most `nb` are used), and its online-softmax state `m[i]`, `l[i]` and
/// unnormalised output `acc[i·dv..]` are updated. `keys` and `values` are rounded to bf16
/// values in place. The queries before `first` are left untouched.
#[allow(clippy::too_many_arguments)]
pub fn attend_block(
    qp: &[u32],
    t: usize,
    qk: usize,
    dv: usize,
    keys: &mut [f32],
    values: &mut [f32],
    nb: usize,
    first: usize,
    seen: impl Fn(usize) -> usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    bufs: &mut BlockBufs,
) {
    let native = bf::native_products();
    attend_block_on(
        native, qp, t, qk, dv, keys, values, nb, first, seen, m, l, acc, bufs,
    );
}

/// [`attend_block`] on the instruction (`native`) or its FMA emulation (the same bits).
#[allow(clippy::too_many_arguments)]
fn attend_block_on(
    native: bool,
    qp: &[u32],
    t: usize,
    qk: usize,
    dv: usize,
    keys: &mut [f32],
    values: &mut [f32],
    nb: usize,
    first: usize,
    seen: impl Fn(usize) -> usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    bufs: &mut BlockBufs,
) {
    check(qp, t, qk, dv, keys, values, nb, m, l, acc);
    if nb == 0 || first >= t {
        return;
    }
    // The products' own order needs the denormal flush on every path (attention_bf16).
    let _flush = crate::cpu::FlushDenormals::new();
    let (keys, values) = (&mut keys[..nb * qk], &mut values[..nb * dv]);
    bufs.fit(nb, qk, dv);
    let BlockBufs {
        k16,
        v16,
        scores,
        pk,
    } = bufs;
    if native {
        bf::narrow_rounded(keys, &mut k16[..nb * qk]);
        bf::narrow_rounded(values, &mut v16[..nb * dv]);
    } else {
        bf::round_in_place(keys);
        bf::round_in_place(values);
    }
    let gl = bf::packed_query_len(GROUP, qk);
    let mut pf = Prefetch::default();
    for g in first / GROUP..t.div_ceil(GROUP) {
        let g0 = g * GROUP;
        let n = GROUP.min(t - g0);
        let qg = &qp[g * gl..(g + 1) * gl];
        let s = &mut scores[..n * nb];
        if native {
            bf::tile_scores(qg, n, qk, &k16[..nb * qk], nb, 1.0, s, &mut pf);
        } else {
            bf::tile_scores_widened(qg, n, qk, keys, nb, 1.0, s, &mut pf);
        }
        // Rows before `first` (in the first group only) see none of the block: skipped.
        let r0 = first.max(g0);
        for i in r0..g0 + n {
            let vis = seen(i).clamp(1, nb);
            let row = &mut s[(i - g0) * nb..(i - g0 + 1) * nb];
            let corr = softmax_update(&mut row[..vis], &mut m[i], &mut l[i]);
            row[vis..].fill(0.0);
            if corr != 1.0 {
                for a in &mut acc[i * dv..(i + 1) * dv] {
                    *a *= corr;
                }
            }
        }
        let rows = g0 + n - r0;
        let p = &mut s[(r0 - g0) * nb..n * nb];
        let a = &mut acc[r0 * dv..(g0 + n) * dv];
        if native {
            let pk = &mut pk[..bf::packed_probs_len(rows, nb)];
            bf::pack_probs(p, rows, nb, pk);
            bf::tile_pv(pk, rows, nb, &v16[..nb * dv], dv, dv, a, &mut pf);
        } else {
            bf::round_in_place(p);
            pv_f32(values, p, rows, nb, dv, dv, a);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    qp: &[u32],
    t: usize,
    qk: usize,
    dv: usize,
    keys: &[f32],
    values: &[f32],
    nb: usize,
    m: &[f32],
    l: &[f32],
    acc: &[f32],
) {
    assert!(
        bf::takes(qk),
        "expanded_bf16: query width {qk} is not a whole number of pairs"
    );
    assert!(
        qp.len() >= packed_queries_len(t, qk),
        "expanded_bf16: packed queries too short"
    );
    assert!(
        keys.len() >= nb * qk && values.len() >= nb * dv,
        "expanded_bf16: key or value block too short"
    );
    assert!(
        m.len() >= t && l.len() >= t && acc.len() >= t * dv,
        "expanded_bf16: softmax state too short"
    );
}

/// Plain twin of [`attend_block`]: the same roundings and orders in scalar loops (the packed
/// queries read back pair by pair), libm's `exp` in the softmax, no denormal flush.
#[allow(clippy::too_many_arguments)]
pub fn attend_block_reference(
    qp: &[u32],
    t: usize,
    qk: usize,
    dv: usize,
    keys: &mut [f32],
    values: &mut [f32],
    nb: usize,
    first: usize,
    seen: impl Fn(usize) -> usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    _bufs: &mut BlockBufs,
) {
    check(qp, t, qk, dv, keys, values, nb, m, l, acc);
    let round = |x: &mut f32| *x = bf::round_f32(*x);
    keys[..nb * qk].iter_mut().for_each(round);
    values[..nb * dv].iter_mut().for_each(round);
    let gl = bf::packed_query_len(GROUP, qk);
    let half = |d: u32, lo: bool| f32::from_bits(if lo { d << 16 } else { d & 0xffff_0000 });
    let mut row = vec![0f32; nb];
    for i in first..t {
        let (g, j) = (i / GROUP, i % GROUP);
        let hp = GROUP.min(t - g * GROUP).div_ceil(16) * 16;
        let qg = &qp[g * gl..];
        for (x, r) in row.iter_mut().enumerate() {
            let k = &keys[x * qk..(x + 1) * qk];
            let mut a = 0f32;
            for c in 0..qk / 2 {
                let d = qg[c * hp + j];
                a = half(d, false).mul_add(k[2 * c + 1], a);
                a = half(d, true).mul_add(k[2 * c], a);
            }
            *r = a;
        }
        let vis = seen(i).clamp(1, nb);
        let corr = softmax_update_reference(&mut row[..vis], &mut m[i], &mut l[i]);
        let out = &mut acc[i * dv..(i + 1) * dv];
        for a in out.iter_mut() {
            *a *= corr;
        }
        for (x, &p) in row[..vis].iter().enumerate() {
            let p = bf::round_f32(p);
            for (a, v) in out.iter_mut().zip(&values[x * dv..(x + 1) * dv]) {
                *a = p.mul_add(*v, *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values::uniform as values;

    struct Case {
        t: usize,
        qk: usize,
        dv: usize,
        nb: usize,
        /// Position of the block's first key relative to the first query's position.
        k0: isize,
    }

    /// `attend_block`'s arguments that vary in the tests: packed queries, keys, values, the
    /// first query, `seen`, and the state `m`, `l`, `acc`.
    type BlockFn<'a> = dyn Fn(
            &[u32],
            &mut [f32],
            &mut [f32],
            usize,
            &dyn Fn(usize) -> usize,
            &mut [f32],
            &mut [f32],
            &mut [f32],
        ) + 'a;

    /// Run `f` over a few blocks of one head (causal: query `i` sees keys up to its own
    /// position `i`, the block's keys at positions `k0..k0 + nb`), from a fresh state; returns
    /// `(m, l, acc)`.
    fn run(c: &Case, f: &BlockFn) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Case { t, qk, dv, nb, k0 } = *c;
        // Every other row of a wider buffer, scaled by 0.5 while packing.
        let q = values(t * 2 * qk, 3, 2.0);
        let mut qp = vec![0u32; packed_queries_len(t, qk)];
        pack_queries(&q, 2 * qk, t, qk, 0.5, &mut qp);
        let (mut m, mut l, mut acc) = (
            vec![f32::NEG_INFINITY; t],
            vec![0f32; t],
            vec![0f32; t * dv],
        );
        for b in 0..3 {
            let kb = k0 + (b * nb) as isize;
            let mut keys = values(nb * qk, 11 + b as u64, 4.0);
            let mut vals = values(nb * dv, 29 + b as u64, 2.0);
            // Query i (position i) sees keys at positions ≤ i: the block's first i + 1 − kb.
            let first = kb.max(0) as usize;
            if first >= t {
                continue;
            }
            let seen = move |i: usize| (i as isize + 1 - kb) as usize;
            f(
                &qp, &mut keys, &mut vals, first, &seen, &mut m, &mut l, &mut acc,
            );
        }
        (m, l, acc)
    }

    const CASES: [Case; 5] = [
        Case {
            t: 150,
            qk: 96,
            dv: 64,
            nb: 64,
            k0: -128,
        },
        Case {
            t: 70,
            qk: 192,
            dv: 128,
            nb: 37,
            k0: -30,
        },
        Case {
            t: 1,
            qk: 6,
            dv: 5,
            nb: 3,
            k0: -2,
        },
        Case {
            t: 131,
            qk: 34,
            dv: 40,
            nb: 33,
            k0: -20,
        },
        Case {
            t: 65,
            qk: 96,
            dv: 70,
            nb: 256,
            k0: -300,
        },
    ];

    /// The instruction (where the CPU has it) and the emulation give the same bits, and both
    /// are the plain twin's values to f32 rounding of the softmax's `exp` (measured: 8e-8 at
    /// most), at odd sizes: groups cut short, blocks that some queries do not see.
    #[test]
    fn instruction_emulation_and_twin_agree() {
        for c in &CASES {
            let Case { t, qk, dv, nb, .. } = *c;
            let on = |native: bool| {
                run(c, &|qp, k, v, first, seen, m, l, acc| {
                    let mut bufs = BlockBufs::default();
                    attend_block_on(
                        native, qp, t, qk, dv, k, v, nb, first, seen, m, l, acc, &mut bufs,
                    )
                })
            };
            let emulated = on(false);
            if bf::native_products() {
                let native = on(true);
                assert!(native.0 == emulated.0, "m differs");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&native.1),
                    bits(&emulated.1),
                    "l, t={t} qk={qk} dv={dv} nb={nb}"
                );
                assert_eq!(
                    bits(&native.2),
                    bits(&emulated.2),
                    "acc, t={t} qk={qk} dv={dv} nb={nb}"
                );
            }
            let twin = run(c, &|qp, k, v, first, seen, m, l, acc| {
                attend_block_reference(
                    qp,
                    t,
                    qk,
                    dv,
                    k,
                    v,
                    nb,
                    first,
                    seen,
                    m,
                    l,
                    acc,
                    &mut BlockBufs::default(),
                )
            });
            assert_eq!(emulated.0, twin.0, "m");
            for i in 0..t {
                let (le, lt) = (emulated.1[i], twin.1[i]);
                assert!((le - lt).abs() <= 1e-5 * lt.abs(), "l[{i}] {le} vs {lt}");
                for d in 0..dv {
                    let (x, y) = (emulated.2[i * dv + d] / le, twin.2[i * dv + d] / lt);
                    assert!(
                        (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                        "out[{i},{d}] {x} vs {y}"
                    );
                }
            }
        }
    }

    /// Each packed group is `attention_bf16::pack_query` of its queries, scaled.
    #[test]
    fn packed_groups_are_pack_query_blocks() {
        let (t, qk, stride, scale) = (150, 34, 40, 0.25);
        let q = values(t * stride, 5, 3.0);
        let mut qp = vec![7u32; packed_queries_len(t, qk)];
        pack_queries(&q, stride, t, qk, scale, &mut qp);
        let gl = bf::packed_query_len(GROUP, qk);
        for g in 0..t.div_ceil(GROUP) {
            let n = GROUP.min(t - g * GROUP);
            let rows: Vec<f32> = (0..n)
                .flat_map(|j| {
                    q[(g * GROUP + j) * stride..][..qk]
                        .iter()
                        .map(|x| x * scale)
                })
                .collect();
            let mut want = vec![0u32; bf::packed_query_len(n, qk)];
            bf::pack_query(&rows, n, qk, &mut want);
            assert_eq!(&qp[g * gl..g * gl + want.len()], &want[..], "group {g}");
        }
    }
}
