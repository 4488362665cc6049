//! Latent attention for one query over one segment of a bf16 cache, on AMX tiles (opt-in with
//! the tile products: `--amx`, `KL_AMX=1`; see [`crate::amx`]).
//!
//! Under weight absorption every head scores the whole cached row and sums the first `Dv`
//! columns of it (spec §6.3): `H·(Dk + Dv)` multiply-adds per cached key, which makes decode at
//! depth compute-bound on the FMA units. Both halves are products whose large operand is the
//! cache itself, already bf16, which the tile unit (several times the FMA peak) takes directly:
//!
//! - **Scores** `Sᵀ = K·Q'ᵀ` (keys × heads): the `A` operand is 16 cached rows × 32 columns
//!   loaded straight from the cache (rows `Dk` apart), the `B` operand the scaled query `Q' =
//!   scale·Q` split into three bf16 terms (`hi + mid + lo`, exact, as in [`crate::amx`]) and laid
//!   out in column pairs, once per segment. Two head tiles at a time run [`crate::amx`]'s
//!   product block itself (32 keys, the query in the place of the activations); a last single
//!   head tile (16 heads, as on `mini`) takes 64 keys in four accumulators, since two chains of
//!   dependent products left the unit idle. The next 64 keys are prefetched meanwhile.
//! - **Softmax** over the whole segment at once (at most [`SEGMENT`] keys, `[key][head]`
//!   layout, one 16-lane vector per key and head block): the segment's maximum per head, then
//!   `P = exp(S − m)` and its sum. No running rescale is needed inside a segment; segments merge
//!   as on the FMA path.
//! - **Values** `O = P·V` (heads × `Dv`): `A` is `P` (16 heads × 32 keys per tile, transposed
//!   from the scores and split into three bf16 terms), `B` the value columns of 32 cached rows
//!   interleaved in key pairs (the layout the unit wants, two word permutes per 32 columns),
//!   built per 64 keys; four accumulator tiles hold 16 heads × 64 columns across those keys.
//!
//! Numerics: the key and value operands are the cache's own bf16 values and the query and
//! probability terms add up exactly to their f32 values, so every product is exact and only the
//! order of the f32 sums differs from the FMA kernel's (about 16 bits of the last place).
//! Decode and prefill call the same code per query and segment, so they still agree with each
//! other under `--amx`; they do not agree bit for bit with the FMA path.
//!
//! Shapes: heads a multiple of 16, `Dk` a multiple of 32, `Dv` a multiple of 64 (Kimi Linear:
//! 32 heads, 576, 512); anything else, or an f32 or fp8 cache, takes the FMA kernels.

use crate::attention::{KeyRows, LatentAttnShape, SEGMENT};
use half::bf16;

/// Keys per value block (the `K` of a value product: 16 key pairs).
const KBLK: usize = 32;
/// Keys per score block: four 16-row tiles of cached rows.
const SBLK: usize = 64;
/// Value blocks per pass: 64 keys' value tiles are built, then summed (passes of 256 keys ran
/// slower: their tiles, 128 KiB on `mini`, no longer stay in L1).
const VBLOCKS: usize = 2;

/// Whether the kernel handles this shape: whole head tiles, key width in whole `K` steps, value
/// width in whole groups of four 16-column tiles.
fn takes(s: LatentAttnShape) -> bool {
    s.h.is_multiple_of(16) && s.dk.is_multiple_of(32) && s.dv.is_multiple_of(64) && s.dv <= s.dk
}

/// Whether the tile kernel runs for this shape and cache: AMX enabled, a shape it [`takes`],
/// bf16 rows.
pub(crate) fn usable<R: KeyRows + ?Sized>(s: LatentAttnShape, rows: &R, k0: usize) -> bool {
    crate::amx::enabled() && takes(s) && k0 < rows.rows() && rows.bf16_rows(k0, 1).is_some()
}

/// Per-thread scratch of [`segment`].
#[derive(Default)]
pub(crate) struct Bufs {
    /// The scaled query `[H, Dk]`.
    qs: Vec<f32>,
    /// Its packed terms: per head block, per `K` step, three 16 × 16 pair tiles.
    qp: Vec<u32>,
    /// Scores, then probabilities, `[keys (whole blocks), H]`.
    s: Vec<f32>,
    /// A zero-padded copy of a block of keys that ends the segment early or is split between
    /// storage blocks, `[64, Dk]`.
    keys: Vec<bf16>,
    /// `P` terms: per head block and value block of a pass, three 16 × 32 tiles.
    pt: Vec<u32>,
    /// Value tiles: per value block of a pass, per 16 columns, one tile of key pairs.
    vv: Vec<u32>,
}

/// Bytes of the scratch that a thread keeps for this kernel with shape `s` (for memory
/// planning; each pool thread keeps one while the kernel is enabled). Zero for shapes it does
/// not take.
pub fn scratch_bytes(s: LatentAttnShape) -> usize {
    if !takes(s) {
        return 0;
    }
    let LatentAttnShape { h, dk, dv } = s;
    let nblk = SEGMENT / KBLK;
    4 * (h * dk
        + (h / 16) * (dk / 32) * 3 * 256
        + nblk * KBLK * h
        + h / 16 * VBLOCKS * 3 * 256
        + VBLOCKS * (dv / 16) * 256)
        + 2 * SBLK * dk
}

impl Bufs {
    /// Empty (allocates nothing).
    pub(crate) const fn new() -> Self {
        Bufs {
            qs: Vec::new(),
            qp: Vec::new(),
            s: Vec::new(),
            keys: Vec::new(),
            pt: Vec::new(),
            vv: Vec::new(),
        }
    }

    /// Capacity for a segment of this shape, so that [`segment`] never allocates.
    pub(crate) fn reserve(&mut self, s: LatentAttnShape) {
        let LatentAttnShape { h, dk, dv } = s;
        let nblk = SEGMENT / KBLK;
        fn grow<T>(v: &mut Vec<T>, n: usize) {
            v.reserve(n.saturating_sub(v.len()));
        }
        grow(&mut self.qs, h * dk);
        grow(&mut self.qp, (h / 16) * (dk / 32) * 3 * 256);
        grow(&mut self.s, nblk * KBLK * h);
        grow(&mut self.keys, SBLK * dk);
        grow(&mut self.pt, h / 16 * VBLOCKS * 3 * 256);
        grow(&mut self.vv, VBLOCKS * (dv / 16) * 256);
    }
}

/// Keys `k0..k1` (at most [`SEGMENT`]) for one query `q` `[H, Dk]`: the segment's softmax state
/// into `m` `[H]` (maximum), `l` `[H]` (sum of `exp(s − m)`) and `acc` `[H, Dv]` (unnormalised
/// output), all overwritten. The caller checked [`usable`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn segment<R: KeyRows + ?Sized>(
    s: LatentAttnShape,
    q: &[f32],
    scale: f32,
    rows: &R,
    k0: usize,
    k1: usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    bufs: &mut Bufs,
) {
    let LatentAttnShape { h, dk, dv } = s;
    assert!(
        crate::amx::available() && takes(s),
        "amx_attention: not usable here"
    );
    assert!(k0 < k1 && k1 - k0 <= SEGMENT && k1 <= rows.rows());
    assert!(q.len() == h * dk && m.len() == h && l.len() == h && acc.len() == h * dv);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `amx::available` (asserted): AMX-TILE/BF16, AVX-512F/BW, AVX2 and FMA, and the
    // tile permission; the shape is one the kernel takes (asserted).
    unsafe {
        x86::segment(s, q, scale, rows, k0, k1, m, l, acc, bufs)
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (scale, bufs);
        unreachable!("amx_attention::segment without AMX");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bufs, KBLK, SBLK, VBLOCKS};
    use crate::amx::x86::{block, pack_tile, split3, Tiles, KSTEP, TERMS, TILE, TILE_U32};
    use crate::attention::{KeyRows, LatentAttnShape};
    use crate::simd::Prefetch;
    use half::bf16;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// `want` cached rows from `r0` (fewer at the segment's end, `n` of them) as one pointer to
    /// rows `dk` apart: the cache's own memory when they lie in one storage block, else a
    /// zero-padded copy in `pad`.
    fn key_block<'a, R: KeyRows + ?Sized>(
        rows: &'a R,
        r0: usize,
        n: usize,
        want: usize,
        dk: usize,
        pad: &'a mut Vec<bf16>,
    ) -> *const bf16 {
        let direct = rows.bf16_rows(r0, want).expect("usable checked bf16 rows");
        if n == want && direct.len() == want * dk {
            return direct.as_ptr();
        }
        pad.clear();
        let mut done = 0;
        while done < n {
            let part = rows.bf16_rows(r0 + done, n - done).expect("bf16 rows");
            pad.extend_from_slice(part);
            done += part.len() / dk;
        }
        pad.resize(want * dk, bf16::ZERO);
        pad.as_ptr()
    }

    /// Scores of 64 cached rows at `kp` (rows `ldk` bytes apart) against one head tile of the
    /// query (`xq`: per `K` step its three term tiles), over `steps` `K` steps, stored as
    /// `Sᵀ` rows `lds` bytes apart at `out` (64 rows of 16 floats). Four accumulators, one per
    /// 16 keys, so that four chains of products overlap (a head tile and two key tiles leave
    /// only two); the first two key tiles add the terms `hi, mid, lo`, the last two `lo, mid,
    /// hi` (a fixed order per key position in a segment). `pf` ticks once per step.
    ///
    /// # Safety
    /// Tiles configured; the pointers valid for what is described.
    #[inline(always)]
    unsafe fn scores4(
        kp: *const u8,
        ldk: usize,
        xq: *const u32,
        steps: usize,
        out: *mut f32,
        lds: usize,
        pf: &mut Prefetch,
    ) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let t = 16 * ldk;
        for s in 0..steps {
            pf.tick();
            let a = kp.add(s * 64);
            let b = xq.add(s * TERMS * TILE_U32);
            asm!(
                "tileloadd tmm4, [{a0} + {lk}*1]",
                "tileloadd tmm5, [{a1} + {lk}*1]",
                "tileloadd tmm6, [{bh} + {s64}*1]",
                "tileloadd tmm7, [{bm} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tdpbf16ps tmm0, tmm4, tmm7",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tileloadd tmm6, [{bl} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tileloadd tmm4, [{a2} + {lk}*1]",
                "tileloadd tmm5, [{a3} + {lk}*1]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm6",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{bh} + {s64}*1]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm6",
                a0 = in(reg) a,
                a1 = in(reg) a.add(t),
                a2 = in(reg) a.add(2 * t),
                a3 = in(reg) a.add(3 * t),
                bh = in(reg) b,
                bm = in(reg) b.add(TILE_U32),
                bl = in(reg) b.add(2 * TILE_U32),
                lk = in(reg) ldk,
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let o = out.cast::<u8>();
        let t = 16 * lds;
        asm!(
            "tilestored [{o0} + {ls}*1], tmm0",
            "tilestored [{o1} + {ls}*1], tmm1",
            "tilestored [{o2} + {ls}*1], tmm2",
            "tilestored [{o3} + {ls}*1], tmm3",
            o0 = in(reg) o,
            o1 = in(reg) o.add(t),
            o2 = in(reg) o.add(2 * t),
            o3 = in(reg) o.add(3 * t),
            ls = in(reg) lds,
            options(nostack)
        );
    }

    /// `O += P·V` for one head block and four 16-column value blocks over `nb` score blocks:
    /// accumulators `acc` (16 rows `lda` bytes apart, 64 columns) loaded first unless `first`
    /// (then zero), `P` terms at `pt` (per block three 16 × 32 tiles), value tiles at `vv` (per
    /// block `vstride` u32 apart, the four used here consecutive).
    ///
    /// # Safety
    /// Tiles configured; pointers valid for the tiles described.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block(
        first: bool,
        acc: *mut f32,
        lda: usize,
        pt: *const u32,
        vv: *const u32,
        vstride: usize,
        nb: usize,
    ) {
        if first {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{a0} + {ld}*1]",
                "tileloadd tmm1, [{a1} + {ld}*1]",
                "tileloadd tmm2, [{a2} + {ld}*1]",
                "tileloadd tmm3, [{a3} + {ld}*1]",
                a0 = in(reg) acc,
                a1 = in(reg) acc.add(16),
                a2 = in(reg) acc.add(32),
                a3 = in(reg) acc.add(48),
                ld = in(reg) lda,
                options(nostack, readonly)
            );
        }
        for b in 0..nb {
            let a = pt.add(b * TERMS * TILE_U32);
            let v = vv.add(b * vstride);
            asm!(
                "tileloadd tmm4, [{v0} + {s64}*1]",
                "tileloadd tmm5, [{v1} + {s64}*1]",
                "tileloadd tmm6, [{ah} + {s64}*1]",
                "tdpbf16ps tmm0, tmm6, tmm4",
                "tdpbf16ps tmm1, tmm6, tmm5",
                "tileloadd tmm7, [{am} + {s64}*1]",
                "tdpbf16ps tmm0, tmm7, tmm4",
                "tdpbf16ps tmm1, tmm7, tmm5",
                "tileloadd tmm6, [{al} + {s64}*1]",
                "tdpbf16ps tmm0, tmm6, tmm4",
                "tdpbf16ps tmm1, tmm6, tmm5",
                "tileloadd tmm4, [{v2} + {s64}*1]",
                "tileloadd tmm5, [{v3} + {s64}*1]",
                "tdpbf16ps tmm2, tmm6, tmm4",
                "tdpbf16ps tmm3, tmm6, tmm5",
                "tileloadd tmm7, [{ah} + {s64}*1]",
                "tdpbf16ps tmm2, tmm7, tmm4",
                "tdpbf16ps tmm3, tmm7, tmm5",
                "tileloadd tmm6, [{am} + {s64}*1]",
                "tdpbf16ps tmm2, tmm6, tmm4",
                "tdpbf16ps tmm3, tmm6, tmm5",
                v0 = in(reg) v,
                v1 = in(reg) v.add(TILE_U32),
                v2 = in(reg) v.add(2 * TILE_U32),
                v3 = in(reg) v.add(3 * TILE_U32),
                ah = in(reg) a,
                am = in(reg) a.add(TILE_U32),
                al = in(reg) a.add(2 * TILE_U32),
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{a0} + {ld}*1], tmm0",
            "tilestored [{a1} + {ld}*1], tmm1",
            "tilestored [{a2} + {ld}*1], tmm2",
            "tilestored [{a3} + {ld}*1], tmm3",
            a0 = in(reg) acc,
            a1 = in(reg) acc.add(16),
            a2 = in(reg) acc.add(32),
            a3 = in(reg) acc.add(48),
            ld = in(reg) lda,
            options(nostack)
        );
    }

    /// The value tiles of one block of `KBLK` cached rows at `kp` (rows `dk` apart; zero rows
    /// past the segment): for each 16 value columns, a tile whose row `r` holds
    /// `(V[2r][c], V[2r+1][c])` for the 16 columns `c` (two 32-column loads, two word
    /// permutes, two tile rows).
    ///
    /// # Safety
    /// AVX-512F/BW; `kp` has `KBLK` rows of `dk ≥ dv` bf16, `dst` `dv/16` tiles.
    #[inline(always)]
    unsafe fn pack_values(kp: *const bf16, dk: usize, dv: usize, dst: *mut u32) {
        // Lane 2j takes word j of `a`, lane 2j+1 word j of `b` (indices ≥ 32 select `b`).
        let lo: [i16; 32] = std::array::from_fn(|i| ((i / 2) + 32 * (i % 2)) as i16);
        let hi: [i16; 32] = std::array::from_fn(|i| (16 + (i / 2) + 32 * (i % 2)) as i16);
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        for r in 0..KBLK / 2 {
            let (ra, rb) = (kp.add(2 * r * dk), kp.add((2 * r + 1) * dk));
            for c in 0..dv / 32 {
                let a = _mm512_loadu_si512(ra.add(32 * c).cast());
                let b = _mm512_loadu_si512(rb.add(32 * c).cast());
                let d = dst.add(2 * c * TILE_U32 + r * 16);
                _mm512_storeu_si512(d.cast(), _mm512_permutex2var_epi16(a, lo, b));
                _mm512_storeu_si512(d.add(TILE_U32).cast(), _mm512_permutex2var_epi16(a, hi, b));
            }
        }
    }

    /// The `P` terms of one head block and one score block: `p` holds `KBLK` keys' rows of
    /// `H` probabilities (`ld` apart, this head block's 16 first); three 16 × 32 tiles
    /// `hi`, `mid`, `lo` (row = head, bf16 pairs of consecutive keys).
    ///
    /// # Safety
    /// AVX2 (the transposition).
    #[inline(always)]
    unsafe fn pack_probs(p: &[f32], ld: usize, dst: &mut [u32]) {
        let mut t = [[0f32; KBLK]; TILE];
        crate::transpose::x86::transpose(
            p.as_ptr(),
            KBLK,
            TILE,
            ld,
            t.as_mut_ptr().cast::<f32>(),
            KBLK,
        );
        let (hi, rest) = dst.split_at_mut(TILE_U32);
        let (mid, lo) = rest.split_at_mut(TILE_U32);
        for (row, tr) in t.iter().enumerate() {
            for j in 0..KBLK / 2 {
                let i = row * 16 + j;
                [hi[i], mid[i], lo[i]] = split3(tr[2 * j], tr[2 * j + 1]);
            }
        }
    }

    /// See [`super::segment`].
    ///
    /// # Safety
    /// AMX available (with AVX-512F/BW, AVX2, FMA) and the shape [`super::usable`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn segment<R: KeyRows + ?Sized>(
        s: LatentAttnShape,
        q: &[f32],
        scale: f32,
        rows: &R,
        k0: usize,
        k1: usize,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        bufs: &mut Bufs,
    ) {
        let LatentAttnShape { h, dk, dv } = s;
        let (n, hbs, steps) = (k1 - k0, h / TILE, dk / KSTEP);
        let Bufs {
            qs,
            qp,
            s: sc,
            keys,
            pt,
            vv,
        } = bufs;

        // The query, scaled, in three terms per head block.
        qs.clear();
        qs.extend(q.iter().map(|x| x * scale));
        let per_hb = steps * TERMS * TILE_U32;
        qp.clear();
        qp.resize(hbs * per_hb, 0);
        for (hb, dst) in qp.chunks_exact_mut(per_hb).enumerate() {
            pack_tile(qs, h, dk, hb * TILE, dst);
        }

        let _tiles = Tiles::new();
        // Scores Sᵀ[key][head], whole blocks of 64 keys (rows past the segment hold scores of
        // zero rows).
        let nsb = n.div_ceil(SBLK);
        sc.clear();
        sc.resize(nsb * SBLK * h, 0.0);
        let mut out = [0f32; 4 * TILE * TILE];
        for b in 0..nsb {
            let r0 = k0 + b * SBLK;
            let kp = key_block(rows, r0, SBLK.min(k1 - r0), SBLK, dk, keys).cast::<u8>();
            // The next block's rows come from memory while this one is scored (prefetching
            // further ahead measured no faster).
            let mut pf = Prefetch::default();
            if r0 + SBLK < k1 {
                rows.spans(r0 + SBLK, SBLK.min(k1 - r0 - SBLK), &mut pf);
            }
            pf.pace(steps * (hbs / 2 * 2 + hbs % 2));
            // Head tiles in pairs (two 32-key halves each), a last odd one 64 keys at once.
            for hp in 0..hbs / 2 {
                let (x0, x1) = (
                    qp[2 * hp * per_hb..].as_ptr(),
                    qp[(2 * hp + 1) * per_hb..].as_ptr(),
                );
                for half in 0..2 {
                    // SAFETY: tiles configured; 32 rows of `dk` bf16 at this half, `steps` K
                    // steps of query terms at x0/x1; `out` holds 1024 floats.
                    block::<true>(
                        kp.add(half * KBLK * dk * 2),
                        dk * 2,
                        x0,
                        x1,
                        steps,
                        out.as_mut_ptr(),
                        &mut pf,
                    );
                    // out[key tile][head tile][16][16] → Sᵀ rows.
                    for (qt, tile) in out.chunks_exact(TILE * TILE).enumerate() {
                        let (kt, ht) = (qt / 2, qt % 2);
                        for r in 0..TILE {
                            let key = b * SBLK + half * KBLK + kt * TILE + r;
                            let d = &mut sc[key * h + (2 * hp + ht) * TILE..][..TILE];
                            d.copy_from_slice(&tile[r * TILE..][..TILE]);
                        }
                    }
                }
            }
            if hbs % 2 == 1 {
                let hb = hbs - 1;
                let o = sc[b * SBLK * h + hb * TILE..].as_mut_ptr();
                // SAFETY: tiles configured; 64 rows at `kp`; the query terms of head tile hb;
                // 64 rows of `Sᵀ` from `o`, `h` floats apart.
                scores4(
                    kp,
                    dk * 2,
                    qp[hb * per_hb..].as_ptr(),
                    steps,
                    o,
                    h * 4,
                    &mut pf,
                );
            }
        }

        // Softmax over the segment: maximum per head, then exp and sum (keys past the segment
        // get probability zero).
        m.fill(f32::NEG_INFINITY);
        for row in sc[..n * h].chunks_exact(h) {
            for (x, y) in m.iter_mut().zip(row) {
                *x = x.max(*y);
            }
        }
        for row in sc[..n * h].chunks_exact_mut(h) {
            for (x, y) in row.iter_mut().zip(m.iter()) {
                *x -= y;
            }
        }
        crate::dense::exp_inplace(&mut sc[..n * h]);
        sc[n * h..].fill(0.0);
        l.fill(0.0);
        for row in sc[..n * h].chunks_exact(h) {
            for (x, y) in l.iter_mut().zip(row) {
                *x += y;
            }
        }

        // O = P·V, VBLOCKS value blocks at a time.
        let (cbs, nblk) = (dv / 16, n.div_ceil(KBLK));
        let mut b0 = 0;
        while b0 < nblk {
            let nb = VBLOCKS.min(nblk - b0);
            vv.clear();
            vv.resize(nb * cbs * TILE_U32, 0);
            pt.clear();
            pt.resize(hbs * nb * TERMS * TILE_U32, 0);
            for bi in 0..nb {
                let r0 = k0 + (b0 + bi) * KBLK;
                let nr = KBLK.min(k1 - r0);
                let kp = key_block(rows, r0, nr, KBLK, dk, keys);
                pack_values(
                    kp,
                    dk,
                    dv,
                    vv[bi * cbs * TILE_U32..][..cbs * TILE_U32].as_mut_ptr(),
                );
                for hb in 0..hbs {
                    let p = &sc[(b0 + bi) * KBLK * h + hb * TILE..];
                    let dst = &mut pt[(hb * nb + bi) * TERMS * TILE_U32..][..TERMS * TILE_U32];
                    pack_probs(p, h, dst);
                }
            }
            for hb in 0..hbs {
                for cg in 0..dv / 64 {
                    // SAFETY: tiles configured; `acc` rows hb·16.. of `dv` floats, columns
                    // cg·64..+64; `pt` and `vv` hold `nb` blocks.
                    pv_block(
                        b0 == 0,
                        acc.as_mut_ptr().add(hb * TILE * dv + cg * 64),
                        dv * 4,
                        pt[hb * nb * TERMS * TILE_U32..].as_ptr(),
                        vv[cg * 4 * TILE_U32..].as_ptr(),
                        cbs * TILE_U32,
                        nb,
                    );
                }
            }
            b0 += nb;
        }
    }
}
