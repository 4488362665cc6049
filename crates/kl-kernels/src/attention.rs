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
//! long-context decode scales with threads, in waves of at most [`WAVE`] segments whose partial
//! states are merged before the next wave (so a step's scratch is bounded at any context); the
//! result is bit-identical to the serial order, so
//! a token's output does not depend on whether it was prefilled or decoded, or on the chunking.
//! Prefill runs its queries in blocks of [`QBLOCK`], one task each, that share every key tile
//! (widened once for all of the block's queries where it is widened); each query still visits
//! exactly its own tiles, in the same order, so sharing changes no bit (15–20% faster than a
//! tile per query, in-process).
//!
//! Key rows reach the f32 tile kernels as f32: an f32 store is read in place, bf16 rows of odd
//! width are widened into an f32 tile first (exactly). A bf16 store whose rows split into column
//! pairs (every Kimi shape), and an fp8 one ([`KeyRows::bf16_products`]: its widened rows are
//! rounded to bf16), take the bf16 products of [`crate::attention_bf16`] instead: the query and
//! the probabilities rounded to bf16, `vdpbf16ps` where the CPU has AVX512-BF16 and its FMA
//! emulation, to the same bits, elsewhere. Decode and prefill run the same tile code either
//! way.

use crate::attention_bf16 as bf16;
use crate::par::SendPtr;
use crate::simd::dot_f32;
pub use crate::simd::Prefetch;
use crate::Elem;
use rayon::prelude::*;
use std::cell::RefCell;

/// Keys per softmax tile. 128 rather than 64: half the per-tile work (each head's softmax step,
/// the `P·V` accumulators' loads and stores). With the next tile prefetched into L1 (see
/// `attend_queries`), 6–8% off a decode call over 32K keys in `cargo bench -- attention` on the
/// AMD Zen 5 VM, for both shapes quoted there; with the prefetch into L2, as before, tiles of
/// 128 were no faster over a cache that comes from memory (docs/performance.md).
pub const TILE: usize = 128;

/// Queries that share each widened key tile in prefill (one task each): the tile, 36–72 KiB of
/// f32 for the real shapes, is widened once for them instead of once per query.
pub const QBLOCK: usize = 4;

/// Keys per segment: each query's keys are visited in fixed segments of this many keys (aligned
/// to key 0) whose partial softmax states are merged in order. Decode runs the segments in
/// parallel; prefill runs them serially per query; both give identical bits.
pub const SEGMENT: usize = 1024;

/// Segments that decode runs in one parallel wave (64K keys): the wave's partial states are
/// merged in order before the next wave starts, so a decode step holds at most this many of
/// them whatever the context (4.2 MB for the released model's 32 heads × 512, where one per
/// segment would be 67 MB at 1M tokens). Below 64K keys a step is one wave, as before; the merge
/// order, and so every bit, is the same for any wave size.
pub const WAVE: usize = 64;

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
    /// Add the memory holding rows `r0 .. r0 + n` (within `rows()`) to `pf`, to be fetched
    /// while the current tile is computed on. The default adds nothing.
    fn spans(&self, r0: usize, n: usize, pf: &mut Prefetch) {
        let _ = (r0, n, pf);
    }
    /// Up to `n` rows starting at row `r0` as stored, when the store holds bf16 (stopping early
    /// at a storage boundary, as [`widen`](Self::widen)): `[m, dk]` with `m ≥ 1` when
    /// `r0 < rows()`. `None` for any other storage (the default); the AMX kernel reads these.
    fn bf16_rows(&self, r0: usize, n: usize) -> Option<&[half::bf16]> {
        let _ = (r0, n);
        None
    }
    /// The same rows as stored when the store holds f32 (`[m, dk]`, stopping early as
    /// [`widen`](Self::widen) does), which the FMA kernels then read in place instead of
    /// copying them into a tile; `None` for any other storage (the default).
    fn f32_rows(&self, r0: usize, n: usize) -> Option<&[f32]> {
        let _ = (r0, n);
        None
    }
    /// Up to `n` rows starting at row `r0` widened and rounded to bf16 into `dst` (`[n, dk]`),
    /// stopping early as [`widen`](Self::widen) does, for a store that takes the bf16 products
    /// without holding bf16 ([`bf16_products`](Self::bf16_products)): the values that widening
    /// and rounding by [`crate::attention_bf16::round_bf16`] give. `None` (the default) where
    /// the store has no such path; the attention then widens into f32 and rounds there.
    fn widen_bf16(&self, r0: usize, n: usize, dst: &mut [half::bf16]) -> Option<usize> {
        let _ = (r0, n, dst);
        None
    }
    /// Whether attention over these rows runs the bf16 products ([`crate::attention_bf16`]):
    /// by default where the rows are bf16 as stored ([`bf16_rows`](Self::bf16_rows)); a store
    /// whose widened rows are to be rounded to bf16 first (fp8 with row scales) says so too.
    fn bf16_products(&self) -> bool {
        self.rows() > 0 && self.bf16_rows(0, 1).is_some()
    }
}

/// `f(block, first row in it, rows)` for the rows `r0..end` of a store of `block_rows`-row
/// blocks, block by block.
pub fn for_blocks(
    block_rows: usize,
    r0: usize,
    end: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let mut r = r0;
    while r < end {
        let (b, o) = (r / block_rows, r % block_rows);
        let m = (block_rows - o).min(end - r);
        f(b, o, m);
        r += m;
    }
}

/// The stored rows `r0 .. r0 + n` of a store of `block_rows`-row blocks of width `dk` holding
/// `n_rows` rows, stopping early at the end of `r0`'s block (and at `n_rows`): what
/// [`KeyRows::widen`] and [`KeyRows::bf16_rows`] read from such a store.
pub fn stored_rows<C, B: AsRef<[C]>>(
    blocks: &[B],
    block_rows: usize,
    dk: usize,
    n_rows: usize,
    r0: usize,
    n: usize,
) -> &[C] {
    let (b, r) = (r0 / block_rows, r0 % block_rows);
    let n = n.min(block_rows - r).min(n_rows.saturating_sub(r0));
    &blocks[b].as_ref()[r * dk..(r + n) * dk]
}

/// Rows stored in fixed-size blocks of `block_rows` rows of width `dk`, each block any
/// `AsRef<[C]>` (a slice, a `Box<[C]>`, a `Vec<C>`).
pub struct BlockRows<'a, C: Elem, B: AsRef<[C]> = &'a [C]> {
    /// The blocks (the last may be partly filled).
    pub blocks: &'a [B],
    /// Rows per block.
    pub block_rows: usize,
    /// Row width.
    pub dk: usize,
    /// Rows in use.
    pub n_rows: usize,
    /// The element type the blocks hold.
    pub elem: std::marker::PhantomData<fn() -> C>,
}

impl<'a, C: Elem, B: AsRef<[C]>> BlockRows<'a, C, B> {
    /// The first `n_rows` rows of `blocks`, `block_rows` rows of width `dk` to a block.
    pub fn new(blocks: &'a [B], block_rows: usize, dk: usize, n_rows: usize) -> Self {
        BlockRows {
            blocks,
            block_rows,
            dk,
            n_rows,
            elem: std::marker::PhantomData,
        }
    }

    /// [`stored_rows`] of this store.
    fn stored(&self, r0: usize, n: usize) -> &[C] {
        stored_rows(self.blocks, self.block_rows, self.dk, self.n_rows, r0, n)
    }
}

impl<C: Elem, B: AsRef<[C]> + Sync> KeyRows for BlockRows<'_, C, B> {
    fn rows(&self) -> usize {
        self.n_rows
    }
    fn widen(&self, r0: usize, n: usize, dst: &mut [f32]) -> usize {
        let src = self.stored(r0, n);
        C::widen(src, &mut dst[..src.len()]);
        src.len() / self.dk
    }
    fn spans(&self, r0: usize, n: usize, pf: &mut Prefetch) {
        for_blocks(self.block_rows, r0, (r0 + n).min(self.n_rows), |b, o, m| {
            pf.push(&self.blocks[b].as_ref()[o * self.dk..(o + m) * self.dk]);
        });
    }
    fn bf16_rows(&self, r0: usize, n: usize) -> Option<&[half::bf16]> {
        C::as_bf16(self.stored(r0, n))
    }
    fn f32_rows(&self, r0: usize, n: usize) -> Option<&[f32]> {
        C::as_f32(self.stored(r0, n))
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

    /// Reset to the empty state for `h` heads of width `dv` (reusing the buffers).
    fn shape(&mut self, h: usize, dv: usize) {
        self.m.clear();
        self.m.resize(h, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(h, 0.0);
        self.acc.clear();
        self.acc.resize(h * dv, 0.0);
    }

    fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.acc.fill(0.0);
    }

    /// One tile's softmax step for every head: `scores` `[H, n]` become the probabilities
    /// ([`softmax_update`] per head's row) and each head's output is rescaled by its correction.
    fn softmax_tile(&mut self, scores: &mut [f32], n: usize, dv: usize) {
        for (hh, row) in scores.chunks_exact_mut(n).enumerate() {
            let corr = softmax_update(row, &mut self.m[hh], &mut self.l[hh]);
            self.rescale(hh, dv, corr);
        }
    }

    /// Head `hh`'s output times a softmax step's correction `corr` (skipped when it is 1).
    fn rescale(&mut self, hh: usize, dv: usize, corr: f32) {
        if corr != 1.0 {
            for a in self.acc[hh * dv..(hh + 1) * dv].iter_mut() {
                *a *= corr;
            }
        }
    }

    /// [`Self::softmax_tile`] with the probabilities packed into `pk` in bf16 key pairs
    /// (`bf16::softmax_pack`, the same bits as the step and `bf16::pack_probs` one after the
    /// other); `scores` is left as it was.
    fn softmax_pack_tile(&mut self, scores: &[f32], n: usize, dv: usize, pk: &mut [u32]) {
        let pw = n.div_ceil(2);
        for (hh, (row, out)) in scores
            .chunks_exact(n)
            .zip(pk.chunks_exact_mut(pw))
            .enumerate()
        {
            let corr = bf16::softmax_pack(row, &mut self.m[hh], &mut self.l[hh], out);
            self.rescale(hh, dv, corr);
        }
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

/// Per-thread buffers of [`attend_range`].
#[derive(Default)]
struct TileBufs {
    /// Widened key rows of one tile `[TILE, Dk]`.
    tile: Vec<f32>,
    /// Scores `[H, TILE]`.
    scores: Vec<f32>,
    /// The queries re-laid out in head pairs for the AVX-512 score kernel, one after the other
    /// (up to [`QBLOCK`] of them).
    qpair: Vec<f32>,
    /// A tile's probabilities in bf16 key pairs (`attention_bf16::pack_probs`).
    pk: Vec<u32>,
    /// Key rows rounded to bf16 for the instruction where the store is not bf16 (fp8) `[TILE,
    /// Dk]`.
    tile16: Vec<half::bf16>,
    /// The AMX kernel's scratch (empty unless it runs).
    amx: crate::amx_attention::Bufs,
}

impl TileBufs {
    const fn new() -> Self {
        TileBufs {
            tile: Vec::new(),
            scores: Vec::new(),
            qpair: Vec::new(),
            pk: Vec::new(),
            tile16: Vec::new(),
            amx: crate::amx_attention::Bufs::new(),
        }
    }

    /// Capacity for one query of shape `s`, so that [`attend_range`] never allocates (with
    /// `amx`, for the AMX kernel too). Decode reserves this; prefill's buffers grow as needed.
    fn reserve(&mut self, s: LatentAttnShape, amx: bool) {
        let LatentAttnShape { h, dk, .. } = s;
        fn grow<T>(v: &mut Vec<T>, n: usize) {
            v.reserve(n.saturating_sub(v.len()));
        }
        grow(&mut self.tile, TILE * dk);
        grow(&mut self.scores, h * TILE);
        grow(&mut self.qpair, qpair_len(h, dk));
        grow(&mut self.pk, bf16::packed_probs_len(h, TILE));
        grow(&mut self.tile16, TILE * dk);
        if amx {
            self.amx.reserve(s);
        }
    }
}

/// The calling thread's flash-decoding partial states.
struct Decode {
    parts: Vec<Partial>,
    total: Partial,
    /// The query packed for the bf16 products (`attention_bf16::pack_query`), when they run.
    qbf: Vec<u32>,
    /// Tile buffers, one per pool thread (indexed by `rayon::current_thread_index`), sized on the
    /// calling thread before the parallel loop so that which worker runs which segment never
    /// decides when memory is allocated.
    bufs: Vec<std::sync::Mutex<TileBufs>>,
}

thread_local! {
    static DECODE: RefCell<Decode> = RefCell::new(Decode {
        parts: Vec::new(),
        total: Partial::new(0, 0),
        qbf: Vec::new(),
        bufs: Vec::new(),
    });
}

/// Whether the AVX-512 tile kernels run (they give the AVX2 kernels' bits exactly).
fn wide() -> bool {
    let f = crate::cpu::features();
    f.avx2_fma && f.avx512f
}

/// [`tile_scores`] over the `n` f32 key rows `keys` of a tile (a store read in place or the
/// widened tile), on the AVX-512 kernels where they run; `qpair` is the query laid out by
/// [`pair_heads`] (which only they read).
#[allow(clippy::too_many_arguments)]
fn scores_f32(
    keys: &[f32],
    qpair: &[f32],
    q: &[f32],
    h: usize,
    dk: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    pf: &mut Prefetch,
) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        // SAFETY: AVX-512F, AVX2 and FMA checked; `qpair` laid out by `pair_heads`; the key
        // view checks its length.
        unsafe {
            x86::tile_scores512(
                qpair,
                q,
                h,
                dk,
                x86::F32Keys::new(keys, n, dk),
                n,
                scale,
                scores,
                pf,
            )
        };
        return;
    }
    let _ = qpair;
    tile_scores(q, h, dk, &keys[..n * dk], n, scale, scores, pf)
}

/// [`tile_pv`] over the `n` f32 key rows `keys` of a tile, on the AVX-512 kernels where they
/// run.
pub(crate) fn pv_f32(
    keys: &[f32],
    p: &[f32],
    h: usize,
    n: usize,
    dk: usize,
    dv: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        // SAFETY: AVX-512F, AVX2 and FMA checked; the key view checks its length.
        unsafe { x86::tile_pv512(p, h, n, x86::F32Keys::new(keys, n, dk), dk, dv, acc) };
        return;
    }
    tile_pv(p, h, n, &keys[..n * dk], dk, dv, acc)
}

/// Whether attention of shape `s` over `rows` runs the bf16 products of
/// [`crate::attention_bf16`] (a bf16 store and whole column pairs; the AMX kernel, where it is
/// switched on, still takes its shapes first).
fn bf16_products<R: KeyRows + ?Sized>(s: LatentAttnShape, rows: &R) -> bool {
    rows.bf16_products() && bf16::takes(s.dk)
}

/// Visit keys `k0..k1` for one query `qrow` `[H, Dk]`, updating `p`, with `bufs` as scratch;
/// `qbf` is the query packed for the bf16 products where they run (else empty).
#[allow(clippy::too_many_arguments)]
fn attend_range<R: KeyRows + ?Sized>(
    s: LatentAttnShape,
    qrow: &[f32],
    qbf: &[u32],
    rows: &R,
    k0: usize,
    k1: usize,
    scale: f32,
    p: &mut Partial,
    bufs: &mut TileBufs,
) {
    let qb: &[&[u32]] = if qbf.is_empty() { &[] } else { &[qbf] };
    attend_queries(
        s,
        &[qrow],
        qb,
        rows,
        k0,
        &[k1],
        scale,
        std::slice::from_mut(p),
        bufs,
    );
}

/// Up to [`QBLOCK`] queries over one segment starting at `k0`: query `i` (`qrows[i]`, `[H, Dk]`)
/// visits keys `k0..k1s[i]` and updates `ps[i]`. Each key tile is widened once and scored by
/// every query that reaches it; a query's tiles are exactly those it would visit alone (a tile
/// ends at the next storage boundary, `TILE` keys on, or its own `k1`), so its bits do not
/// depend on the others. `qbf` holds the queries packed for the bf16 products
/// ([`bf16_products`]), or nothing where the f32 products run.
#[allow(clippy::too_many_arguments)]
fn attend_queries<R: KeyRows + ?Sized>(
    s: LatentAttnShape,
    qrows: &[&[f32]],
    qbf: &[&[u32]],
    rows: &R,
    k0: usize,
    k1s: &[usize],
    scale: f32,
    ps: &mut [Partial],
    bufs: &mut TileBufs,
) {
    let LatentAttnShape { h, dk, dv } = s;
    debug_assert!(qrows.len() == k1s.len() && qrows.len() == ps.len() && ps.len() <= QBLOCK);
    if crate::amx_attention::usable(s, rows, k0) {
        for ((qrow, &k1), p) in qrows.iter().zip(k1s).zip(ps.iter_mut()) {
            // Both call sites hand over a fresh partial state, which the tile kernel overwrites.
            debug_assert!(p.m.iter().all(|&m| m == f32::NEG_INFINITY));
            crate::amx_attention::segment(
                s,
                qrow,
                scale,
                rows,
                k0,
                k1,
                &mut p.m,
                &mut p.l,
                &mut p.acc,
                &mut bufs.amx,
            );
        }
        return;
    }
    let TileBufs {
        tile,
        scores,
        qpair,
        pk,
        tile16,
        ..
    } = bufs;
    let wide = wide();
    if !qbf.is_empty() {
        debug_assert_eq!(qbf.len(), qrows.len());
        // The products' own order needs the denormal flush on every path (attention_bf16).
        let _flush = crate::cpu::FlushDenormals::new();
        let native = bf16::native_products();
        let end = k1s.iter().copied().max().unwrap_or(k0);
        let mut j = k0;
        while j < end {
            let want = TILE.min(end - j);
            let stored = rows.bf16_rows(j, want);
            // The rows as the products read them: for the instruction bf16, as stored or (a
            // store that is not bf16, fp8) rounded into `tile16`; for the emulation widened
            // into f32 in `tile`, rounded to bf16 values where the store is not bf16.
            let (n, keys16): (usize, &[half::bf16]) = if native {
                match stored {
                    Some(st) => (st.len() / dk, st),
                    None => {
                        tile16.resize(TILE * dk, half::bf16::ZERO);
                        let n = rows.widen_bf16(j, want, tile16).unwrap_or_else(|| {
                            tile.resize(TILE * dk, 0.0);
                            let n = rows.widen(j, want, tile);
                            bf16::narrow_rounded(&tile[..n * dk], &mut tile16[..n * dk]);
                            n
                        });
                        (n, &tile16[..n * dk])
                    }
                }
            } else {
                tile.resize(TILE * dk, 0.0);
                let n = rows.widen(j, want, tile);
                if stored.is_none() {
                    bf16::round_in_place(&mut tile[..n * dk]);
                }
                (n, &[])
            };
            // The next tile's rows come into L1 over this tile's work, past this segment's
            // end too: the next segment's first tile, which this thread most often runs next
            // (decode hands each thread a run of consecutive segments; prefill visits a block's
            // segments in order).
            let mut pf = Prefetch::to_l1();
            rows.spans(j + n, TILE.min(rows.rows() - j - n), &mut pf);
            for (qi, &k1) in k1s.iter().enumerate() {
                if k1 <= j {
                    continue;
                }
                let n = n.min(k1 - j);
                let p = &mut ps[qi];
                scores.resize(h * n, 0.0);
                if native {
                    bf16::tile_scores(qbf[qi], h, dk, keys16, n, scale, scores, &mut pf);
                } else {
                    let t = &tile[..n * dk];
                    bf16::tile_scores_widened(qbf[qi], h, dk, t, n, scale, scores, &mut pf);
                }
                if native {
                    pk.resize(bf16::packed_probs_len(h, n), 0);
                    p.softmax_pack_tile(&scores[..h * n], n, dv, pk);
                    bf16::tile_pv(pk, h, n, keys16, dk, dv, &mut p.acc, &mut pf);
                } else {
                    p.softmax_tile(&mut scores[..h * n], n, dv);
                    bf16::round_in_place(&mut scores[..h * n]);
                    pv_f32(&tile[..n * dk], scores, h, n, dk, dv, &mut p.acc);
                }
            }
            j += n;
        }
        return;
    }
    let ql = qpair_len(h, dk);
    if wide {
        qpair.resize(qrows.len() * ql, 0.0);
        for (qrow, dst) in qrows.iter().zip(qpair.chunks_exact_mut(ql)) {
            pair_heads(qrow, h, dk, dst);
        }
    }
    let end = k1s.iter().copied().max().unwrap_or(k0);
    let mut j = k0;
    while j < end {
        // An f32 store is read in place; any other is widened into the tile.
        let want = TILE.min(end - j);
        let keys: &[f32] = if let Some(stored) = rows.f32_rows(j, want) {
            stored
        } else {
            tile.resize(TILE * dk, 0.0);
            let n = rows.widen(j, want, tile);
            &tile[..n * dk]
        };
        let n = keys.len() / dk;
        // The next tile's rows come from memory while this one is scored (past the segment's
        // end too, as above).
        let mut pf = Prefetch::default();
        rows.spans(j + n, TILE.min(rows.rows() - j - n), &mut pf);
        for (qi, (qrow, &k1)) in qrows.iter().zip(k1s).enumerate() {
            if k1 <= j {
                continue;
            }
            let n = n.min(k1 - j);
            let p = &mut ps[qi];
            scores.resize(h * n, 0.0);
            // This query's head pairs (only the AVX-512 kernels read them).
            let qp = if wide {
                &qpair[qi * ql..(qi + 1) * ql]
            } else {
                &[]
            };
            scores_f32(keys, qp, qrow, h, dk, n, scale, scores, &mut pf);
            p.softmax_tile(&mut scores[..h * n], n, dv);
            pv_f32(keys, scores, h, n, dk, dv, &mut p.acc);
        }
        j += n;
    }
}

/// One online-softmax step over a block of scores (one head's tile here; one query's block of
/// keys in the layers' expanded attention): with `m' = max(m, row)`, `row ← exp(row − m')` and
/// `l ← l·e^{m − m'} + Σ row`, `m ← m'`; returns `e^{m − m'}` (the factor for the accumulated
/// output). The sum runs in 8 lanes (`i mod 8`) reduced by a fixed tree, on every path, so a
/// block's result does not depend on where it came from. With AVX2 the `exp` is the
/// polynomial one of [`crate::activation`] (results below `e^{-87.3}` flush to 0); with AVX-512
/// the same polynomial runs 16 lanes at a time, with the same bits; the portable path and the
/// twin use libm's.
pub fn softmax_update(row: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 and FMA checked (and AVX-512F for the wide path).
        return unsafe {
            if wide() {
                x86::softmax_update512(row, m, l)
            } else {
                x86::softmax_update(row, m, l)
            }
        };
    }
    softmax_update_reference(row, m, l)
}

/// Reference twin of [`softmax_update`]: the same 8-lane sum, scalar `exp`.
pub fn softmax_update_reference(row: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
    let mx = row.iter().fold(*m, |a, &x| a.max(x));
    let corr = (*m - mx).exp();
    let mut lanes = [0f32; 8];
    for (i, x) in row.iter_mut().enumerate() {
        *x = (*x - mx).exp();
        lanes[i % 8] += *x;
    }
    *l = *l * corr + crate::matmul::hsum8(&lanes);
    *m = mx;
    corr
}

/// The query `[H, Dk]` in head pairs: `qpair[((hp·(Dk/8) + c)·16 + l]` is `q[2hp][8c + l]` for
/// `l < 8` and `q[2hp+1][8c + l − 8]` for `l ≥ 8` (zero past the last head), so that one 16-lane
/// register holds the same 8 columns of two heads.
fn pair_heads(q: &[f32], h: usize, dk: usize, qpair: &mut [f32]) {
    let nc = dk / 8;
    debug_assert_eq!(qpair.len(), qpair_len(h, dk));
    qpair.fill(0.0);
    for hh in 0..h {
        let (hp, half) = (hh / 2, hh % 2);
        for c in 0..nc {
            let dst = &mut qpair[(hp * nc + c) * 16 + half * 8..][..8];
            dst.copy_from_slice(&q[hh * dk + 8 * c..hh * dk + 8 * c + 8]);
        }
    }
}

/// Floats of one query laid out by [`pair_heads`].
fn qpair_len(h: usize, dk: usize) -> usize {
    h.div_ceil(2) * (dk / 8) * 16
}

/// Floats that each thread holds while it runs prefill attention of shape `s` on the FMA
/// kernels (for memory planning): a block of [`QBLOCK`] queries' running and per-segment
/// softmax states, the widened key tile, one query's scores and the queries in head pairs (or
/// packed for the bf16 products, 4-byte words like the floats).
pub fn prefill_scratch_floats(s: LatentAttnShape) -> usize {
    2 * QBLOCK * partial_floats(s)
        + tile_bufs_floats(s, QBLOCK)
        + QBLOCK * bf16::packed_query_len(s.h, s.dk)
}

/// Floats of one [`Partial`] of shape `s`: the running max and sum per head, and the output.
fn partial_floats(s: LatentAttnShape) -> usize {
    s.h * (s.dv + 2)
}

/// Floats of a [`TileBufs`] (FMA kernels) for `queries` queries of shape `s`: the widened key
/// tile, one query's scores, the queries in head pairs, and for the bf16 products the tile's
/// probabilities packed and its rows in bf16 (half a float each).
fn tile_bufs_floats(s: LatentAttnShape, queries: usize) -> usize {
    TILE * s.dk
        + s.h * TILE
        + queries * qpair_len(s.h, s.dk)
        + bf16::packed_probs_len(s.h, TILE)
        + (TILE * s.dk).div_ceil(2)
}

/// Floats that decode with latent attention of shape `s` keeps between steps (for memory
/// planning), at any context: the calling thread's partial softmax states (at most a [`WAVE`]
/// of segments' and the running total, the query packed for the bf16 products) and, for each of
/// `threads` pool threads, a key tile, a tile's scores and the query in head pairs. The AMX
/// kernel's buffers, where it runs, come on top ([`crate::amx_attention::scratch_bytes`] per
/// thread).
pub fn decode_scratch_floats(s: LatentAttnShape, threads: usize) -> usize {
    (WAVE + 1) * partial_floats(s)
        + bf16::packed_query_len(s.h, s.dk)
        + threads * tile_bufs_floats(s, 1)
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
    let rows = BlockRows::new(blocks, block_rows, s.dk, n_keys);
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
    if tq == 1 {
        // Flash-decoding: segments in parallel, merged in order (same bits as the serial path).
        // The partial states live in the calling thread's scratch and the tiles in each
        // worker's, so a decode step allocates nothing once warmed up (at any depth: one
        // segment runs on the calling thread with the same buffers).
        let nseg = n_keys.div_ceil(SEGMENT);
        DECODE.with(|cell| {
            // A nested call on this thread (a second sequence decoding from inside this one's
            // parallel region) gets fresh buffers instead of the busy ones.
            let mut fresh;
            let mut guard = cell.try_borrow_mut();
            let Decode {
                parts,
                total,
                qbf,
                bufs,
            } = match guard.as_deref_mut() {
                Ok(d) => d,
                Err(_) => {
                    fresh = Decode {
                        parts: Vec::new(),
                        total: Partial::new(h, dv),
                        qbf: Vec::new(),
                        bufs: Vec::new(),
                    };
                    &mut fresh
                }
            };
            // The query packed once for every segment, where the bf16 products run.
            qbf.clear();
            if bf16_products(s, rows) {
                qbf.resize(bf16::packed_query_len(h, dk), 0);
                bf16::pack_query(q, h, dk, qbf);
            }
            let qbf = &qbf[..];
            let wave = nseg.min(WAVE);
            while parts.len() < wave {
                parts.push(Partial::new(h, dv));
            }
            total.shape(h, dv);
            let threads = rayon::current_num_threads().max(1);
            while bufs.len() < threads {
                bufs.push(std::sync::Mutex::new(TileBufs::new()));
            }
            let amx = crate::amx_attention::usable(s, rows, 0);
            for b in bufs.iter_mut() {
                b.get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .reserve(s, amx);
            }
            let bufs = &bufs[..];
            let segment = |si: usize, p: &mut Partial| {
                p.shape(h, dv);
                let (k0, k1) = (si * SEGMENT, ((si + 1) * SEGMENT).min(n_keys));
                let i = rayon::current_thread_index().unwrap_or(0) % bufs.len();
                let mut b = bufs[i].lock().unwrap_or_else(|e| e.into_inner());
                attend_range(s, q, qbf, rows, k0, k1, scale, p, &mut b);
            };
            // Waves of at most WAVE segments, each merged in order into the total before the
            // next one runs: the order of the merges is the segments', whatever the wave size.
            let mut s0 = 0;
            while s0 < nseg {
                let n = (nseg - s0).min(WAVE);
                if n == 1 {
                    segment(s0, &mut parts[0]);
                } else {
                    parts[..n]
                        .par_iter_mut()
                        .enumerate()
                        .for_each(|(i, p)| segment(s0 + i, p));
                }
                for p in &parts[..n] {
                    total.merge(p, dv);
                }
                s0 += n;
            }
            total.finish(dv, out);
        });
        return;
    }
    // Prefill: blocks of QBLOCK consecutive queries, each block one task that widens a key tile
    // once for all of its queries. Fixed segments merged in order, exactly as the decode path
    // does, so a query's result does not depend on how many queries share the call.
    let op = SendPtr(out.as_mut_ptr());
    let fresh = || std::array::from_fn::<Partial, QBLOCK, _>(|_| Partial::new(h, dv));
    let bf = bf16_products(s, rows);
    let qbl = if bf { bf16::packed_query_len(h, dk) } else { 0 };
    (0..tq.div_ceil(QBLOCK)).into_par_iter().for_each_init(
        || (fresh(), fresh(), TileBufs::new(), Vec::new()),
        |(ps, segs, bufs, qbf), b| {
            let (i0, i1) = (b * QBLOCK, ((b + 1) * QBLOCK).min(tq));
            let nq = i1 - i0;
            // Query i sees keys 0..lim(i); the limits grow with i.
            let lim = |i: usize| n_keys - tq + i + 1;
            let qrow = |i: usize| &q[i * h * dk..(i + 1) * h * dk];
            // The block's queries packed once for all segments, where the bf16 products run.
            qbf.resize(nq * qbl, 0);
            if bf {
                for (i, dst) in (i0..i1).zip(qbf.chunks_exact_mut(qbl)) {
                    bf16::pack_query(qrow(i), h, dk, dst);
                }
            }
            for p in &mut ps[..nq] {
                p.reset();
            }
            let mut k0 = 0;
            while k0 < lim(i1 - 1) {
                // The block's queries that reach this segment, and where each one's ends.
                let first = (i0..i1)
                    .find(|&i| lim(i) > k0)
                    .expect("the last query reaches k0");
                let qs: [&[f32]; QBLOCK] = std::array::from_fn(|j| qrow((first + j).min(i1 - 1)));
                let k1s: [usize; QBLOCK] =
                    std::array::from_fn(|j| (k0 + SEGMENT).min(lim((first + j).min(i1 - 1))));
                let m = i1 - first;
                let segs = &mut segs[..m];
                for seg in segs.iter_mut() {
                    seg.reset();
                }
                let qb: [&[u32]; QBLOCK] = std::array::from_fn(|j| {
                    let i = (first + j).min(i1 - 1) - i0;
                    &qbf[i * qbl..(i + 1) * qbl]
                });
                let qb = if bf { &qb[..m] } else { &[][..] };
                attend_queries(s, &qs[..m], qb, rows, k0, &k1s[..m], scale, segs, bufs);
                for (p, seg) in ps[first - i0..nq].iter_mut().zip(segs.iter()) {
                    p.merge(seg, dv);
                }
                k0 += SEGMENT;
            }
            for (j, p) in ps[..nq].iter().enumerate() {
                // SAFETY: row i0 + j of out is written only by this task.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(op.get().add((i0 + j) * h * dv), h * dv)
                };
                p.finish(dv, o);
            }
        },
    );
}

/// `scores[h·n + x] = scale · q_h · key_x` for all heads and the `n` keys of a tile.
///
/// Every score is accumulated in the same order (8 lanes over `k`, then the lane sum, then the
/// tail) whichever register block computes it, so results do not depend on `n` or `h`.
#[allow(clippy::too_many_arguments)]
fn tile_scores(
    q: &[f32],
    h: usize,
    dk: usize,
    tile: &[f32],
    n: usize,
    scale: f32,
    scores: &mut [f32],
    pf: &mut Prefetch,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 and FMA checked at run time; all slices are bounds-checked below.
        unsafe { x86::tile_scores(q, h, dk, tile, n, scale, scores, pf) };
        return;
    }
    let quota = pf.lines().div_ceil(h.max(1));
    for hh in 0..h {
        pf.step(quota);
        let qh = &q[hh * dk..(hh + 1) * dk];
        for x in 0..n {
            scores[hh * n + x] = scale * dot_f32(qh, &tile[x * dk..(x + 1) * dk]);
        }
    }
}

/// `acc[h·dv + c] += Σ_x p[h·n + x] · tile[x·dk + c]` (values are the first `dv` columns).
/// Each element is summed over `x` in order, whichever register block computes it.
fn tile_pv(p: &[f32], h: usize, n: usize, tile: &[f32], dk: usize, dv: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 and FMA checked at run time.
        unsafe { x86::tile_pv(p, h, n, tile, dk, dv, acc, 0) };
        return;
    }
    for hh in 0..h {
        let a = &mut acc[hh * dv..(hh + 1) * dv];
        for x in 0..n {
            let e = p[hh * n + x];
            for (ac, v) in a.iter_mut().zip(&tile[x * dk..x * dk + dv]) {
                *ac += e * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use crate::activation::x86::{exp16, exp8, mask};
    use crate::simd::x86::hsum;
    use std::arch::x86_64::*;

    /// [`super::softmax_update`] on 8 lanes (the `exp` of [`crate::activation`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_update(row: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let tail = n % 8;
        let body = n - tail;
        // Max: exact in any order.
        let mut vm = _mm256_set1_ps(*m);
        let mut i = 0;
        while i < body {
            vm = _mm256_max_ps(vm, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        if tail > 0 {
            let mk = mask(tail);
            let v = _mm256_blendv_ps(
                ninf,
                _mm256_maskload_ps(p.add(body), mk),
                _mm256_castsi256_ps(mk),
            );
            vm = _mm256_max_ps(vm, v);
        }
        let hi = _mm256_extractf128_ps(vm, 1);
        let q = _mm_max_ps(_mm256_castps256_ps128(vm), hi);
        let q = _mm_max_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_max_ss(q, _mm_shuffle_ps(q, q, 1));
        let mx = _mm_cvtss_f32(q);
        exp_sum8(row, 0, mx, _mm256_setzero_ps(), m, l)
    }

    /// The end of a softmax step once the block's max `mx` is known: `row[i] ← exp(row[i] −
    /// mx)` for `i ≥ from`, 8 lanes at a time (the tail masked), each block added in order into
    /// the 8-lane sum `acc` (which holds the blocks before `from`); then `l ← l·e^{m − mx} +
    /// Σ`, `m ← mx`, and `e^{m − mx}` is returned.
    #[inline(always)]
    unsafe fn exp_sum8(
        row: &mut [f32],
        from: usize,
        mx: f32,
        mut acc: __m256,
        m: &mut f32,
        l: &mut f32,
    ) -> f32 {
        let (n, p) = (row.len(), row.as_mut_ptr());
        let corr = (*m - mx).exp();
        let vmx = _mm256_set1_ps(mx);
        let mut i = from;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmx));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        if i < n {
            let mk = mask(n - i);
            let e = exp8(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), mk), vmx));
            _mm256_maskstore_ps(p.add(i), mk, e);
            acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(mk)));
        }
        *l = *l * corr + hsum(acc);
        *m = mx;
        corr
    }

    /// The maximum of `m` and `row`: 16 lanes over whole blocks, then the tail one by one
    /// (exact in any order; the softmax steps on 16 lanes all take it this way).
    #[inline(always)]
    pub(crate) unsafe fn row_max512(row: &[f32], m: f32) -> f32 {
        let (n, p) = (row.len(), row.as_ptr());
        let b16 = n / 16 * 16;
        let mut vm = _mm512_set1_ps(m);
        let mut i = 0;
        while i < b16 {
            vm = _mm512_max_ps(vm, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        let mut mx = _mm512_reduce_max_ps(vm);
        for &x in &row[b16..] {
            mx = mx.max(x);
        }
        mx
    }

    /// [`softmax_update`] on 16 lanes where they fit (same bits: the max is exact in any order,
    /// `exp16` is `exp8` lane by lane, and the 8-lane sum adds each 16-lane chunk's low half
    /// then its high half, which is the 8-lane kernel's order); the rest by 8 lanes.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn softmax_update512(row: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let b16 = n / 16 * 16;
        let mx = row_max512(row, *m);
        let vmx = _mm512_set1_ps(mx);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < b16 {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vmx));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            acc = _mm256_add_ps(acc, high8(e));
            i += 16;
        }
        exp_sum8(row, b16, mx, acc, m, l)
    }

    /// One block of `HB` heads × `XB` keys: one 8-lane accumulator per (head, key), held in
    /// registers over the whole row (const sizes, so nothing spills).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block<const HB: usize, const XB: usize>(
        qp: *const f32,
        tp: *const f32,
        dk: usize,
        h0: usize,
        x0: usize,
        n: usize,
        scale: f32,
        sp: *mut f32,
    ) {
        let k8 = dk / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); XB]; HB];
        let mut kk = 0;
        while kk < k8 {
            let mut kv = [_mm256_setzero_ps(); XB];
            for (xi, v) in kv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(tp.add((x0 + xi) * dk + kk));
            }
            for (hi, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(qp.add((h0 + hi) * dk + kk));
                for xi in 0..XB {
                    a[xi] = _mm256_fmadd_ps(qv, kv[xi], a[xi]);
                }
            }
            kk += 8;
        }
        for (hi, a) in acc.iter().enumerate() {
            for (xi, v) in a.iter().enumerate() {
                let mut sum = hsum(*v);
                for t in k8..dk {
                    sum += *qp.add((h0 + hi) * dk + t) * *tp.add((x0 + xi) * dk + t);
                }
                *sp.add((h0 + hi) * n + x0 + xi) = scale * sum;
            }
        }
    }

    /// Scores in blocks of up to 4 heads × 3 keys. Every score is the same 8-lane sum whatever
    /// block computes it.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_scores(
        q: &[f32],
        h: usize,
        dk: usize,
        tile: &[f32],
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut super::Prefetch,
    ) {
        assert!(q.len() >= h * dk && tile.len() >= n * dk && scores.len() >= h * n);
        let (qp, tp, sp) = (q.as_ptr(), tile.as_ptr(), scores.as_mut_ptr());
        // The prefetch lines, spread evenly over the blocks.
        let quota = pf.lines().div_ceil(h.div_ceil(4) * n.div_ceil(3));
        let mut h0 = 0;
        while h0 < h {
            let hb = (h - h0).min(4);
            let mut x0 = 0;
            while x0 < n {
                let xb = (n - x0).min(3);
                pf.step(quota);
                macro_rules! go {
                    ($( ($a:literal, $b:literal) ),*) => {
                        match (hb, xb) {
                            $( ($a, $b) => score_block::<$a, $b>(qp, tp, dk, h0, x0, n, scale, sp), )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(
                    (4, 3),
                    (4, 2),
                    (4, 1),
                    (3, 3),
                    (3, 2),
                    (3, 1),
                    (2, 3),
                    (2, 2),
                    (2, 1),
                    (1, 3),
                    (1, 2),
                    (1, 1)
                );
                x0 += xb;
            }
            h0 += hb;
        }
    }

    /// `HB` heads × 16 value columns of `acc`, in registers over all `n` keys of the tile.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block<const HB: usize>(
        pp: *const f32,
        tp: *const f32,
        ap: *mut f32,
        n: usize,
        dk: usize,
        dv: usize,
        h0: usize,
        c0: usize,
    ) {
        let mut r = [[_mm256_setzero_ps(); 2]; HB];
        for (hi, rh) in r.iter_mut().enumerate() {
            rh[0] = _mm256_loadu_ps(ap.add((h0 + hi) * dv + c0));
            rh[1] = _mm256_loadu_ps(ap.add((h0 + hi) * dv + c0 + 8));
        }
        for x in 0..n {
            let v0 = _mm256_loadu_ps(tp.add(x * dk + c0));
            let v1 = _mm256_loadu_ps(tp.add(x * dk + c0 + 8));
            for (hi, rh) in r.iter_mut().enumerate() {
                let e = _mm256_broadcast_ss(&*pp.add((h0 + hi) * n + x));
                rh[0] = _mm256_fmadd_ps(e, v0, rh[0]);
                rh[1] = _mm256_fmadd_ps(e, v1, rh[1]);
            }
        }
        for (hi, rh) in r.iter().enumerate() {
            _mm256_storeu_ps(ap.add((h0 + hi) * dv + c0), rh[0]);
            _mm256_storeu_ps(ap.add((h0 + hi) * dv + c0 + 8), rh[1]);
        }
    }

    /// `acc += P · V` over value columns `cstart..dv` (`cstart` a multiple of 16), in blocks of up
    /// to 4 heads × 16 value columns held in registers over the
    /// whole tile.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_pv(
        p: &[f32],
        h: usize,
        n: usize,
        tile: &[f32],
        dk: usize,
        dv: usize,
        acc: &mut [f32],
        cstart: usize,
    ) {
        assert!(p.len() >= h * n && tile.len() >= n * dk && acc.len() >= h * dv && dv <= dk);
        let c16 = dv / 16 * 16;
        let (pp, tp, ap) = (p.as_ptr(), tile.as_ptr(), acc.as_mut_ptr());
        let mut h0 = 0;
        while h0 < h {
            let hb = (h - h0).min(4);
            let mut c0 = cstart;
            while c0 < c16 {
                match hb {
                    4 => pv_block::<4>(pp, tp, ap, n, dk, dv, h0, c0),
                    3 => pv_block::<3>(pp, tp, ap, n, dk, dv, h0, c0),
                    2 => pv_block::<2>(pp, tp, ap, n, dk, dv, h0, c0),
                    _ => pv_block::<1>(pp, tp, ap, n, dk, dv, h0, c0),
                }
                c0 += 16;
            }
            // Value columns past the last multiple of 16: scalar, same order over x.
            for hi in 0..hb {
                for c in c16..dv {
                    let mut a = *ap.add((h0 + hi) * dv + c);
                    for x in 0..n {
                        a = (*pp.add((h0 + hi) * n + x)).mul_add(*tp.add(x * dk + c), a);
                    }
                    *ap.add((h0 + hi) * dv + c) = a;
                }
            }
            h0 += hb;
        }
    }

    /// 256 bits at `p` in both halves of a 512-bit register.
    #[inline(always)]
    unsafe fn bcast8(p: *const f32) -> __m512 {
        _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
    }

    /// Upper 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn high8(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    /// The key rows of a tile as the 512-bit tile kernels read them (`[n, dk]` f32: a store read
    /// in place or the widened tile; row `x`, column `col`).
    ///
    /// Every method is unsafe for the same reasons: `x` must be below the `n` rows the view was
    /// made for, the columns read must lie within `dk`, and the CPU must have AVX-512F.
    #[derive(Clone, Copy)]
    pub struct F32Keys {
        p: *const f32,
        dk: usize,
    }

    impl F32Keys {
        /// The first `n` rows of width `dk` of `tile`.
        pub fn new(tile: &[f32], n: usize, dk: usize) -> Self {
            assert!(
                tile.len() >= n * dk,
                "attention: tile shorter than its rows"
            );
            F32Keys {
                p: tile.as_ptr(),
                dk,
            }
        }

        /// Columns `col..col + 8` of row `x` in both halves of a register.
        #[inline(always)]
        unsafe fn bcast8(self, x: usize, col: usize) -> __m512 {
            bcast8(self.p.add(x * self.dk + col))
        }

        /// Columns `col..col + 16` of row `x`.
        #[inline(always)]
        unsafe fn load16(self, x: usize, col: usize) -> __m512 {
            _mm512_loadu_ps(self.p.add(x * self.dk + col))
        }

        /// Column `col` of row `x`.
        #[inline(always)]
        unsafe fn get(self, x: usize, col: usize) -> f32 {
            *self.p.add(x * self.dk + col)
        }
    }

    /// The 8-lane sums of both halves of four head-pair accumulators `a[x]` (key `x`; each half
    /// one head), every one by [`hsum`]'s tree `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`: lanes
    /// `0..4` hold the first head's sums for keys `0..4`, lanes `4..8` the second head's. Three
    /// levels of transposing adds instead of eight horizontal sums.
    #[inline(always)]
    unsafe fn hsum_pair4(a: [__m512; 4]) -> __m512 {
        // Level 1, `l_j + l_{j+4}`: 128-bit blocks [a0 h0, a0 h1, a1 h0, a1 h1] (and a2, a3).
        let s01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a[0], a[1]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a[0], a[1]),
        );
        let s23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a[2], a[3]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a[2], a[3]),
        );
        // Level 2, `m0 + m2` and `m1 + m3`: block j = [s01_j's two, s23_j's two].
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(s01, s23),
            _mm512_shuffle_ps::<0b11_10_11_10>(s01, s23),
        );
        // Level 3: block j = [s01_j's sum, s23_j's sum, (the same again)].
        let v = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(u, u),
            _mm512_shuffle_ps::<0b11_01_11_01>(u, u),
        );
        // Blocks 0 and 2 are the first head (keys 0, 2 and 1, 3), blocks 1 and 3 the second.
        let idx = _mm512_setr_epi32(0, 8, 1, 9, 4, 12, 5, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, v)
    }

    /// `HP` head pairs × `XB` keys: a 16-lane accumulator holds the 8-lane accumulators of both
    /// heads of a pair for one key, so each lane runs exactly the AVX2 kernel's FMA sequence.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block512<const HP: usize, const XB: usize>(
        qpp: *const f32,
        qp: *const f32,
        keys: F32Keys,
        h: usize,
        dk: usize,
        hp0: usize,
        x0: usize,
        n: usize,
        scale: f32,
        sp: *mut f32,
    ) {
        let nc = dk / 8;
        let mut acc = [[_mm512_setzero_ps(); XB]; HP];
        for c in 0..nc {
            let mut kb = [_mm512_setzero_ps(); XB];
            for (xi, v) in kb.iter_mut().enumerate() {
                *v = keys.bcast8(x0 + xi, 8 * c);
            }
            for (pi, a) in acc.iter_mut().enumerate() {
                let qv = _mm512_loadu_ps(qpp.add(((hp0 + pi) * nc + c) * 16));
                for xi in 0..XB {
                    a[xi] = _mm512_fmadd_ps(qv, kb[xi], a[xi]);
                }
            }
        }
        if nc * 8 == dk {
            // No column tail: all the block's sums at once, by transposes.
            let vs = _mm512_set1_ps(scale);
            let m: __mmask16 = (1 << XB) - 1;
            for (pi, a) in acc.iter().enumerate() {
                let mut four = [_mm512_setzero_ps(); 4];
                four[..XB].copy_from_slice(a);
                let r = _mm512_mul_ps(vs, hsum_pair4(four));
                let hh = 2 * (hp0 + pi);
                _mm512_mask_storeu_ps(sp.add(hh * n + x0), m, r);
                if hh + 1 < h {
                    let r1 = _mm512_shuffle_f32x4::<0b00_00_00_01>(r, r);
                    _mm512_mask_storeu_ps(sp.add((hh + 1) * n + x0), m, r1);
                }
            }
            return;
        }
        for (pi, a) in acc.iter().enumerate() {
            for (xi, v) in a.iter().enumerate() {
                for (half, v8) in [_mm512_castps512_ps256(*v), high8(*v)]
                    .into_iter()
                    .enumerate()
                {
                    let hh = 2 * (hp0 + pi) + half;
                    if hh >= h {
                        continue;
                    }
                    let mut sum = hsum(v8);
                    for t in nc * 8..dk {
                        sum += *qp.add(hh * dk + t) * keys.get(x0 + xi, t);
                    }
                    *sp.add(hh * n + x0 + xi) = scale * sum;
                }
            }
        }
    }

    /// [`tile_scores`] with 512-bit registers (same bits): blocks of up to 4 head pairs × 4
    /// keys. `qpair` is the query laid out by `super::pair_heads`, `q` the plain one (tails).
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_scores512(
        qpair: &[f32],
        q: &[f32],
        h: usize,
        dk: usize,
        keys: F32Keys,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut super::Prefetch,
    ) {
        let pairs = h.div_ceil(2);
        assert!(qpair.len() >= pairs * (dk / 8) * 16 && q.len() >= h * dk);
        assert!(scores.len() >= h * n);
        let (qpp, qp, sp) = (qpair.as_ptr(), q.as_ptr(), scores.as_mut_ptr());
        // The prefetch lines, spread evenly over the blocks.
        let quota = pf.lines().div_ceil(pairs.div_ceil(4) * n.div_ceil(4));
        let mut p0 = 0;
        while p0 < pairs {
            let pb = (pairs - p0).min(4);
            let mut x0 = 0;
            while x0 < n {
                let xb = (n - x0).min(4);
                pf.step(quota);
                macro_rules! go {
                    ($( ($a:literal, $b:literal) ),*) => {
                        match (pb, xb) {
                            $( ($a, $b) => score_block512::<$a, $b>(
                                qpp, qp, keys, h, dk, p0, x0, n, scale, sp
                            ), )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(
                    (4, 4),
                    (4, 3),
                    (4, 2),
                    (4, 1),
                    (3, 4),
                    (3, 3),
                    (3, 2),
                    (3, 1),
                    (2, 4),
                    (2, 3),
                    (2, 2),
                    (2, 1),
                    (1, 4),
                    (1, 3),
                    (1, 2),
                    (1, 1)
                );
                x0 += xb;
            }
            p0 += pb;
        }
    }

    /// `HB` heads × `CV` 16-column vectors of `acc` in registers over all `n` keys (each lane
    /// the AVX2 kernel's sequence: every element summed over the keys in order).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block512<const HB: usize, const CV: usize>(
        pp: *const f32,
        keys: F32Keys,
        ap: *mut f32,
        n: usize,
        dv: usize,
        h0: usize,
        c0: usize,
    ) {
        let mut r = [[_mm512_setzero_ps(); CV]; HB];
        for (hi, rh) in r.iter_mut().enumerate() {
            for (c, v) in rh.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(ap.add((h0 + hi) * dv + c0 + 16 * c));
            }
        }
        for x in 0..n {
            let mut v = [_mm512_setzero_ps(); CV];
            for (c, vc) in v.iter_mut().enumerate() {
                *vc = keys.load16(x, c0 + 16 * c);
            }
            for (hi, rh) in r.iter_mut().enumerate() {
                let e = _mm512_set1_ps(*pp.add((h0 + hi) * n + x));
                for (a, vc) in rh.iter_mut().zip(&v) {
                    *a = _mm512_fmadd_ps(e, *vc, *a);
                }
            }
        }
        for (hi, rh) in r.iter().enumerate() {
            for (c, v) in rh.iter().enumerate() {
                _mm512_storeu_ps(ap.add((h0 + hi) * dv + c0 + 16 * c), *v);
            }
        }
    }

    /// [`pv_block512`] over every block of up to 8 heads, for columns `c0..c0 + 16·CV`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_strip512<const CV: usize>(
        pp: *const f32,
        keys: F32Keys,
        ap: *mut f32,
        h: usize,
        n: usize,
        dv: usize,
        c0: usize,
    ) {
        let mut h0 = 0;
        while h0 < h {
            let hb = (h - h0).min(8);
            match hb {
                8 => pv_block512::<8, CV>(pp, keys, ap, n, dv, h0, c0),
                7 => pv_block512::<7, CV>(pp, keys, ap, n, dv, h0, c0),
                6 => pv_block512::<6, CV>(pp, keys, ap, n, dv, h0, c0),
                5 => pv_block512::<5, CV>(pp, keys, ap, n, dv, h0, c0),
                4 => pv_block512::<4, CV>(pp, keys, ap, n, dv, h0, c0),
                3 => pv_block512::<3, CV>(pp, keys, ap, n, dv, h0, c0),
                2 => pv_block512::<2, CV>(pp, keys, ap, n, dv, h0, c0),
                _ => pv_block512::<1, CV>(pp, keys, ap, n, dv, h0, c0),
            }
            h0 += hb;
        }
    }

    /// [`tile_pv`] with 512-bit registers (same bits): strips of 48 columns in blocks of up to
    /// 8 heads (24 accumulators, fed by 3 value loads and 8 broadcasts per 24 FMAs; 8 × 32
    /// blocks, 10 loads per 16 FMAs, ran 2–4% slower over the whole attention, in-process),
    /// then one strip of 32 or 16 columns; the columns past the last multiple of 16 by the
    /// AVX2 kernel.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tile_pv512(
        p: &[f32],
        h: usize,
        n: usize,
        keys: F32Keys,
        dk: usize,
        dv: usize,
        acc: &mut [f32],
    ) {
        assert!(p.len() >= h * n && acc.len() >= h * dv && dv <= dk);
        let (pp, ap) = (p.as_ptr(), acc.as_mut_ptr());
        // Columns outer, heads inner: a strip of the tile's values (12 KiB for 64 keys) stays
        // in L1 while every head block reads it.
        let mut c0 = 0;
        while c0 + 48 <= dv {
            pv_strip512::<3>(pp, keys, ap, h, n, dv, c0);
            c0 += 48;
        }
        if c0 + 32 <= dv {
            pv_strip512::<2>(pp, keys, ap, h, n, dv, c0);
            c0 += 32;
        }
        if c0 + 16 <= dv {
            pv_strip512::<1>(pp, keys, ap, h, n, dv, c0);
            c0 += 16;
        }
        // Columns past the last multiple of 16: scalar, each summed over the keys in order
        // with fused multiply–adds (the AVX2 kernel's tail).
        for hh in 0..h {
            for c in c0..dv {
                let mut a = *ap.add(hh * dv + c);
                for x in 0..n {
                    a = (*pp.add(hh * n + x)).mul_add(keys.get(x, c), a);
                }
                *ap.add(hh * dv + c) = a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode past several waves keeps at most a wave of partial states on the calling thread
    /// (what [`decode_scratch_floats`] promises), however many segments the context has.
    #[test]
    fn decode_keeps_at_most_a_wave_of_partial_states() {
        let s = LatentAttnShape {
            h: 2,
            dk: 16,
            dv: 8,
        };
        let n_keys = (2 * WAVE + 3) * SEGMENT + 5;
        let store: Vec<f32> = (0..n_keys * s.dk).map(|i| (i % 7) as f32 * 0.1).collect();
        let blocks: Vec<&[f32]> = store.chunks(256 * s.dk).collect();
        let q = vec![0.5f32; s.h * s.dk];
        let mut out = vec![0f32; s.h * s.dv];
        latent_attention(s, &q, &blocks, 256, n_keys, 0.25, &mut out);
        let parts = DECODE.with(|d| d.borrow().parts.len());
        assert!(
            parts <= WAVE,
            "{parts} partial states kept for {n_keys} keys"
        );
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
