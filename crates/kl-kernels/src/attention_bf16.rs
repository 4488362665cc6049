//! bf16 products for latent attention over a bf16 (or fp8) cache.
//!
//! Under weight absorption every head scores the whole cached row and sums the first `Dv`
//! columns of it (spec §6.3), so decode at depth is `H·(Dk + Dv)` multiply-adds per cached key
//! and compute-bound on the FMA units (docs/performance.md). When the cache is bf16, its side of
//! both products is already bf16; rounding the other side to bf16 too (the query for the
//! scores, the probabilities for `P·V`, as bf16 inference and flash attention do) lets CPUs with
//! AVX512-BF16 take 32 multiply-adds per instruction (`vdpbf16ps`) instead of 16, with no
//! widening of the keys at all.
//!
//! **Numerics.** Products of two bf16 values are exact in f32, so the only roundings are the
//! inputs' (`q` and `P` to bf16, round-to-nearest-even, as `vcvtne2ps2bf16` does: [`round_bf16`])
//! and the f32 sums, in a fixed order:
//! - **Scores**: each head and key sums its column pairs in order into one f32, the product of
//!   column `2i + 1` and then that of column `2i` (`vdpbf16ps`'s order within a pair), then
//!   times `scale`. The kernel holds 16 heads in a register (the query transposed into column
//!   pairs, each key's pair broadcast), so no lane sums are needed, and transposes each 16 × 16
//!   block of scores into the `[H, n]` layout once.
//! - **`P·V`**: every output element sums its keys in order, one product at a time: the FMA
//!   kernels of [`crate::attention`] fed with the rounded probabilities, which is what
//!   `vdpbf16ps` computes on value rows interleaved in key pairs (`x` in the high half).
//!
//! `vdpbf16ps` treats bf16 denormals as zero and flushes denormal sums to zero, so every path
//! runs under [`crate::cpu::FlushDenormals`]; with it the FMA emulation (two FMAs per pair, on
//! AVX-512F or AVX2, over the rows widened into f32) gives exactly the instruction's bits
//! (checked on random and denormal inputs, the AMD Zen 5 VM). The portable code runs the same
//! products in the same order without the flush.
//!
//! Against the f32 products the scores move by about 2⁻⁹ of their terms' size and the output
//! by less: the logits of the golden model move by about as much as a bf16 cache already moves
//! them (docs/memory.md). An fp8 cache takes the same products over its rows widened and rounded
//! to bf16 (each code times its row scale, one more rounding of about 2⁻⁹ on values that carry
//! 4 significant bits); an f32 cache keeps the exact f32 products.

use crate::simd::Prefetch;
use half::bf16;

/// Whether a key width takes the bf16 products: whole column pairs.
pub fn takes(dk: usize) -> bool {
    dk > 0 && dk.is_multiple_of(2)
}

/// Heads rounded up to whole 16-lane groups.
fn padded_heads(h: usize) -> usize {
    h.div_ceil(16) * 16
}

/// The bf16 bits of `x` as `vcvtne2ps2bf16` rounds it: to nearest even, a denormal input to a
/// zero of its sign, a NaN to a quiet NaN.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7f80_0000 == 0 {
        return ((u >> 16) & 0x8000) as u16;
    }
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16 by [`round_bf16`], as an f32.
#[inline]
pub fn round_f32(x: f32) -> f32 {
    f32::from_bits(u32::from(round_bf16(x)) << 16)
}

/// f32 value of the bf16 in the low (`lo = true`) or high half of a pair.
#[inline]
fn half_of(pair: u32, lo: bool) -> f32 {
    f32::from_bits(if lo { pair << 16 } else { pair & 0xffff_0000 })
}

/// Dwords of one query packed by [`pack_query`]: `Dk/2 × ⌈H/16⌉·16`.
pub fn packed_query_len(h: usize, dk: usize) -> usize {
    dk / 2 * padded_heads(h)
}

/// `q` `[H, Dk]` rounded to bf16 and transposed into column pairs: dword `i·Hp + h`
/// (`Hp` = `H` rounded up to a multiple of 16, the extra heads zero) holds head `h`'s column
/// `2i` in its low half and `2i + 1` in its high half, so that one 16-lane load holds a column
/// pair of 16 heads.
pub fn pack_query(q: &[f32], h: usize, dk: usize, out: &mut [u32]) {
    assert!(takes(dk) && q.len() >= h * dk && out.len() >= packed_query_len(h, dk));
    #[cfg(target_arch = "x86_64")]
    if native_products() {
        // SAFETY: AVX512-BF16, -BW and -F checked; lengths checked above.
        unsafe { x86::pack_query(q, h, dk, out) };
        return;
    }
    pack_query_scalar(q, h, dk, out);
}

/// [`pack_query`] one value at a time (the rounding of [`round_bf16`]).
fn pack_query_scalar(q: &[f32], h: usize, dk: usize, out: &mut [u32]) {
    let hp = padded_heads(h);
    for (i, row) in out[..packed_query_len(h, dk)]
        .chunks_exact_mut(hp)
        .enumerate()
    {
        for (hh, d) in row.iter_mut().enumerate() {
            *d = if hh < h {
                let c = &q[hh * dk + 2 * i..];
                u32::from(round_bf16(c[0])) | u32::from(round_bf16(c[1])) << 16
            } else {
                0
            };
        }
    }
}

/// Round values to bf16 in place (as f32, by [`round_bf16`]): a tile's probabilities for the
/// FMA `P·V` kernels, or the widened rows of a store that is not bf16 as stored (fp8).
pub fn round_in_place(p: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 checked.
        unsafe { x86::round_in_place(p) };
        return;
    }
    for x in p.iter_mut() {
        *x = round_f32(*x);
    }
}

/// Whether the scores and `P·V` of a tile run on the AVX512-BF16 instruction ([`tile_scores`],
/// [`softmax_pack`] (the bits of the softmax step and [`pack_probs`]), [`tile_pv`], reading the
/// bf16 rows as stored); otherwise they run on the FMA emulation over the rows widened into f32
/// ([`tile_scores_widened`], [`round_in_place`] and the FMA `P·V` kernels), to the same bits.
pub fn native_products() -> bool {
    crate::cpu::features().avx512bf16
}

/// `scores[h·n + x] = scale · q_h · key_x` for the `n` bf16 key rows `keys` (`[n, Dk]`) of a
/// tile, in the order of the module's numerics, on AVX512-BF16 ([`native_products`]); `qp` is
/// the query packed by [`pack_query`]. Prefetches half of `pf`'s lines over the scores and
/// leaves the rest to [`tile_pv`] (the tile's two halves of work; 1–3% faster on `mini`'s decode
/// at 32K than all of them during the scores).
#[allow(clippy::too_many_arguments)]
pub fn tile_scores(
    qp: &[u32],
    h: usize,
    dk: usize,
    keys: &[bf16],
    n: usize,
    scale: f32,
    scores: &mut [f32],
    pf: &mut Prefetch,
) {
    assert!(
        native_products(),
        "attention_bf16::tile_scores needs AVX512-BF16"
    );
    assert!(takes(dk) && qp.len() >= packed_query_len(h, dk));
    assert!(keys.len() >= n * dk && scores.len() >= h * n);
    #[cfg(target_arch = "x86_64")]
    if n > 0 {
        // SAFETY: AVX512-BF16, -BW and -F checked; lengths checked above.
        unsafe { x86::tile_scores512(qp, h, dk, keys, n, scale, scores, pf) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (scale, pf);
}

/// [`tile_scores`] emulated with FMAs over the same rows widened into f32 (`tile`, `[n, Dk]`;
/// widening bf16 is exact): two FMAs per column pair, the high column first, which under
/// [`crate::cpu::FlushDenormals`] gives the instruction's bits. AVX-512F, AVX2 or portable.
#[allow(clippy::too_many_arguments)]
pub fn tile_scores_widened(
    qp: &[u32],
    h: usize,
    dk: usize,
    tile: &[f32],
    n: usize,
    scale: f32,
    scores: &mut [f32],
    pf: &mut Prefetch,
) {
    assert!(takes(dk) && qp.len() >= packed_query_len(h, dk));
    assert!(tile.len() >= n * dk && scores.len() >= h * n);
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::cpu::features();
        if f.avx2_fma && f.avx512f {
            // SAFETY: AVX-512F checked; lengths checked above.
            unsafe { x86::tile_scores_wide(qp, h, dk, tile, n, scale, scores, pf) };
            return;
        }
        if f.avx2_fma {
            // SAFETY: AVX2 and FMA checked; lengths checked above.
            unsafe { x86::tile_scores(qp, h, dk, tile, n, scale, scores, pf) };
            return;
        }
    }
    tile_scores_portable(qp, h, dk, tile, n, scale, scores, pf);
}

/// Portable [`tile_scores_widened`]: the same products and order (denormals as the FPU
/// treats them).
#[allow(clippy::too_many_arguments)]
fn tile_scores_portable(
    qp: &[u32],
    h: usize,
    dk: usize,
    tile: &[f32],
    n: usize,
    scale: f32,
    scores: &mut [f32],
    pf: &mut Prefetch,
) {
    let hp = padded_heads(h);
    let quota = pf.lines().div_ceil(h.max(1));
    for hh in 0..h {
        pf.step(quota);
        for x in 0..n {
            let row = &tile[x * dk..(x + 1) * dk];
            let mut a = 0f32;
            for i in 0..dk / 2 {
                let qv = qp[i * hp + hh];
                a = half_of(qv, false).mul_add(row[2 * i + 1], a);
                a = half_of(qv, true).mul_add(row[2 * i], a);
            }
            scores[hh * n + x] = scale * a;
        }
    }
}

/// `src` rounded to bf16 by [`round_bf16`] into `dst`: the same values [`round_in_place`]
/// leaves, as bf16 bits (32 values a `vcvtne2ps2bf16` where the CPU has AVX512-BF16).
pub fn narrow_rounded(src: &[f32], dst: &mut [bf16]) {
    assert!(dst.len() >= src.len());
    #[cfg(target_arch = "x86_64")]
    if native_products() {
        // SAFETY: AVX512-BF16, -BW and -F checked; `dst` holds `src.len()` values.
        unsafe { x86::narrow_rounded(src, dst) };
        return;
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(round_bf16(x));
    }
}

/// Dwords of a tile's probabilities packed by [`pack_probs`]: `H × ⌈n/2⌉`.
pub fn packed_probs_len(h: usize, n: usize) -> usize {
    h * n.div_ceil(2)
}

/// A tile's probabilities `p` `[H, n]` rounded to bf16 in key pairs: dword `h·⌈n/2⌉ + i` holds
/// key `2i` in its high half and key `2i + 1` (zero past `n`) in its low half. AVX512-BF16 only.
pub fn pack_probs(p: &[f32], h: usize, n: usize, out: &mut [u32]) {
    assert!(native_products() && p.len() >= h * n && out.len() >= packed_probs_len(h, n));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 and -F checked; lengths checked above.
    unsafe {
        x86::pack_probs(p, h, n, out)
    };
}

/// One head's online-softmax step over a tile's scores `row` with the probabilities written
/// packed instead of in place: exactly [`crate::attention::softmax_update`] on `row` followed by
/// [`pack_probs`] of that one row into `out` (`⌈n/2⌉` dwords), in one pass that keeps the
/// probabilities in registers between the `exp` and the rounding. Returns the factor
/// `e^{m − m'}` for the head's accumulated output. AVX512-BF16 only.
pub fn softmax_pack(row: &[f32], m: &mut f32, l: &mut f32, out: &mut [u32]) -> f32 {
    assert!(native_products() && out.len() >= row.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16, -BW, -F (and AVX2, FMA with them) checked; length checked above.
    return unsafe { x86::softmax_pack(row, m, l, out) };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("native_products() is false off x86-64")
}

/// `acc[h·dv + c] += Σ_x P̃[h, x] · keys[x·dk + c]` over the `n` bf16 rows of a tile, each element
/// summed over `x` in order: AVX512-BF16 on value rows interleaved in key pairs. `pk` holds the
/// rounded probabilities packed by [`pack_probs`]; `pf`'s remaining lines (those
/// [`tile_scores`] left) are prefetched over the strips. Run under
/// [`crate::cpu::FlushDenormals`].
#[allow(clippy::too_many_arguments)]
pub fn tile_pv(
    pk: &[u32],
    h: usize,
    n: usize,
    keys: &[bf16],
    dk: usize,
    dv: usize,
    acc: &mut [f32],
    pf: &mut Prefetch,
) {
    assert!(native_products() && pk.len() >= packed_probs_len(h, n));
    assert!(keys.len() >= n * dk && acc.len() >= h * dv && dv <= dk);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16, -BW and -F checked; lengths checked above.
    unsafe {
        x86::tile_pv512(pk, h, n, keys, dk, dv, acc, pf)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pf;
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use crate::simd::Prefetch;
    use half::bf16;
    use std::arch::x86_64::*;

    /// [`super::round_in_place`] on 8 lanes: the scalar rounding's integer steps (NaN and
    /// denormals take the same path as there).
    #[target_feature(enable = "avx2")]
    pub unsafe fn round_in_place(p: &mut [f32]) {
        let n8 = p.len() / 8 * 8;
        let pp = p.as_mut_ptr();
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        let one = _mm256_set1_epi32(1);
        let bias = _mm256_set1_epi32(0x7fff);
        let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let sign = _mm256_set1_epi32(0x8000_0000u32 as i32);
        let quiet = _mm256_set1_epi32(0x0040_0000);
        let mut i = 0;
        while i < n8 {
            let u = _mm256_loadu_si256(pp.add(i).cast());
            let r = _mm256_and_si256(
                _mm256_add_epi32(
                    u,
                    _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32::<16>(u), one)),
                ),
                hi,
            );
            let denormal = _mm256_cmpeq_epi32(_mm256_and_si256(u, exp), _mm256_setzero_si256());
            let nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), exp);
            let r = _mm256_blendv_epi8(r, _mm256_and_si256(u, sign), denormal);
            let r = _mm256_blendv_epi8(r, _mm256_and_si256(_mm256_or_si256(u, quiet), hi), nan);
            _mm256_storeu_si256(pp.add(i).cast(), r);
            i += 8;
        }
        for x in &mut p[n8..] {
            *x = super::round_f32(*x);
        }
    }

    /// Column pairs of a score block between two prefetch ticks.
    const PF_PAIRS: usize = 8;

    /// Transpose of a 16 × 16 block of f32 (`r[i]` lane `j` → result `j` lane `i`).
    #[inline(always)]
    pub(crate) unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        let mut a = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // b[4k + c], 128-bit block L: rows 4k..4k+4 of column 4L + c.
        let mut b = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let pd = |v: __m512| _mm512_castps_pd(v);
            let (x0, x1, x2, x3) = (
                pd(a[4 * k]),
                pd(a[4 * k + 1]),
                pd(a[4 * k + 2]),
                pd(a[4 * k + 3]),
            );
            b[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(x0, x2));
            b[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x0, x2));
            b[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(x1, x3));
            b[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(x1, x3));
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let u = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[c], b[4 + c]);
            let v = _mm512_shuffle_f32x4::<0b11_01_11_01>(b[c], b[4 + c]);
            let u2 = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[8 + c], b[12 + c]);
            let v2 = _mm512_shuffle_f32x4::<0b11_01_11_01>(b[8 + c], b[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(u, u2);
            out[8 + c] = _mm512_shuffle_f32x4::<0b11_01_11_01>(u, u2);
            out[4 + c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(v, v2);
            out[12 + c] = _mm512_shuffle_f32x4::<0b11_01_11_01>(v, v2);
        }
        out
    }

    /// Scale and store a block's accumulators (`acc[g·X + x]`: 16 heads of group `g0 + g` for
    /// key `x0 + x`, of which `xb` are real) into `scores` `[H, n]`, through one 16 × 16
    /// transpose.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store_block<const G: usize, const X: usize>(
        acc: &[__m512; 16],
        h: usize,
        g0: usize,
        x0: usize,
        xb: usize,
        n: usize,
        scale: f32,
        sp: *mut f32,
    ) {
        // Row `l` of the transpose: head `l` of each group, keys in lanes `g·X + x`.
        let t = transpose16(acc);
        let vs = _mm512_set1_ps(scale);
        let m = (1u32 << xb) - 1;
        for (l, tl) in t.iter().enumerate() {
            let r = _mm512_mul_ps(vs, *tl);
            for g in 0..G {
                let hh = 16 * (g0 + g) + l;
                if hh < h {
                    // Lanes g·X.. go to the head's row at x0 (the base moved back by g·X lanes,
                    // which the mask never touches).
                    let base = sp.wrapping_add(hh * n + x0).wrapping_sub(g * X);
                    _mm512_mask_storeu_ps(base, ((m << (g * X)) & 0xffff) as __mmask16, r);
                }
            }
        }
    }

    /// How a 512-bit score block reads a column pair and multiplies it into 16 heads: the
    /// instruction on the bf16 rows as stored ([`Native`]), or its emulation on the rows
    /// widened into f32 ([`Emulated`]); the same bits under the denormal flush.
    trait Pairs {
        /// A key row's element: `u16` (bf16 bits) or `f32`.
        type Elem;
        /// One column pair of 16 heads' query.
        type Q: Copy;
        /// One column pair of a key, broadcast.
        type K: Copy;
        /// The pair at `p` (16 packed words, one per head).
        unsafe fn query(p: *const u32) -> Self::Q;
        /// The pair whose even column is at `p`.
        unsafe fn key(p: *const Self::Elem) -> Self::K;
        /// `acc` plus the pair's two products, the odd column's first.
        unsafe fn mac(acc: __m512, q: Self::Q, k: Self::K) -> __m512;
    }

    /// `vdpbf16ps` on the bf16 rows (AVX512-BF16).
    struct Native;

    impl Pairs for Native {
        type Elem = u16;
        type Q = __m512bh;
        type K = __m512bh;
        #[inline(always)]
        unsafe fn query(p: *const u32) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
        }
        #[inline(always)]
        unsafe fn key(p: *const u16) -> __m512bh {
            let pair = p.cast::<u32>().read_unaligned() as i32;
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
        }
        #[inline(always)]
        unsafe fn mac(acc: __m512, q: __m512bh, k: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, q, k)
        }
    }

    /// Two FMAs a pair on the widened rows (AVX-512F): the query's high and low halves split
    /// out of the packed words, the key's two columns broadcast.
    struct Emulated;

    impl Pairs for Emulated {
        type Elem = f32;
        type Q = (__m512, __m512);
        type K = (__m512, __m512);
        #[inline(always)]
        unsafe fn query(p: *const u32) -> (__m512, __m512) {
            let w = _mm512_loadu_si512(p.cast());
            let himask = _mm512_set1_epi32(0xffff_0000u32 as i32);
            (
                _mm512_castsi512_ps(_mm512_and_si512(w, himask)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)),
            )
        }
        #[inline(always)]
        unsafe fn key(p: *const f32) -> (__m512, __m512) {
            (_mm512_set1_ps(*p.add(1)), _mm512_set1_ps(*p))
        }
        #[inline(always)]
        unsafe fn mac(acc: __m512, q: (__m512, __m512), k: (__m512, __m512)) -> __m512 {
            _mm512_fmadd_ps(q.1, k.1, _mm512_fmadd_ps(q.0, k.0, acc))
        }
    }

    /// Scores of `G` groups of 16 heads (from group `g0`) × `X` keys (`G·X = 16`, from key `x0`;
    /// `xb ≤ X` of them real, the others rereading the last): accumulator `g·X + x` holds key
    /// `x`'s scores for the group's 16 heads, one pair product per column pair.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block<P: Pairs, const G: usize, const X: usize, const KD: usize>(
        qt: *const u32,
        hp: usize,
        h: usize,
        kp: *const P::Elem,
        dk: usize,
        g0: usize,
        x0: usize,
        xb: usize,
        n: usize,
        scale: f32,
        sp: *mut f32,
        pf: &mut Prefetch,
    ) {
        // With the width known at compile time (`KD`, a whole block), every key's pair is one
        // base register and a constant displacement; else one pointer per key (spilled).
        debug_assert!(KD == 0 || (KD == dk && xb == X));
        let rows: [*const P::Elem; X] = std::array::from_fn(|x| kp.add((x0 + x.min(xb - 1)) * dk));
        let base = kp.add(x0 * dk);
        let mut acc = [_mm512_setzero_ps(); 16];
        for i in 0..dk / 2 {
            if i % PF_PAIRS == 0 {
                pf.tick();
            }
            let q: [P::Q; G] = std::array::from_fn(|g| P::query(qt.add(i * hp + 16 * (g0 + g))));
            for (x, row) in rows.iter().enumerate() {
                let k = P::key(if KD > 0 {
                    base.add(x * KD + 2 * i)
                } else {
                    row.add(2 * i)
                });
                for (g, qg) in q.iter().enumerate() {
                    acc[g * X + x] = P::mac(acc[g * X + x], *qg, k);
                }
            }
        }
        store_block::<G, X>(&acc, h, g0, x0, xb, n, scale, sp);
    }

    /// A tile's score blocks: pairs of 16-head groups × 8 keys, then a last single group × 16
    /// keys, with `1/share` of `pf`'s lines paced over every block's column pairs; the released
    /// and `mini` row widths (576, 288) compiled as constants.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_blocks<P: Pairs>(
        qp: &[u32],
        h: usize,
        dk: usize,
        kp: *const P::Elem,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut Prefetch,
        share: usize,
    ) {
        let hp = super::padded_heads(h);
        let (qt, sp) = (qp.as_ptr(), scores.as_mut_ptr());
        let groups = hp / 16;
        let blocks = groups / 2 * n.div_ceil(8) + groups % 2 * n.div_ceil(16);
        pf.pace(share * blocks * (dk / 2).div_ceil(PF_PAIRS));
        let mut g0 = 0;
        while g0 < groups {
            let pair = groups - g0 >= 2;
            let xs = if pair { 8 } else { 16 };
            let mut x0 = 0;
            while x0 < n {
                let xb = (n - x0).min(xs);
                macro_rules! go {
                    ($g:literal, $x:literal) => {
                        match (dk, xb == $x) {
                            (576, true) => score_block::<P, $g, $x, 576>(
                                qt, hp, h, kp, dk, g0, x0, xb, n, scale, sp, pf,
                            ),
                            (288, true) => score_block::<P, $g, $x, 288>(
                                qt, hp, h, kp, dk, g0, x0, xb, n, scale, sp, pf,
                            ),
                            _ => score_block::<P, $g, $x, 0>(
                                qt, hp, h, kp, dk, g0, x0, xb, n, scale, sp, pf,
                            ),
                        }
                    };
                }
                if pair {
                    go!(2, 8)
                } else {
                    go!(1, 16)
                }
                x0 += xb;
            }
            g0 += if pair { 2 } else { 1 };
        }
    }

    /// [`super::tile_scores`] on AVX512-BF16: blocks of 16 heads × 16 keys (or 32 × 8), one
    /// product per broadcast key pair and 16 heads, no lane sums; the query's column pairs
    /// (`Dk/2` × 64 bytes per 16 heads) stay in L1.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_scores512(
        qp: &[u32],
        h: usize,
        dk: usize,
        keys: &[bf16],
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut Prefetch,
    ) {
        let kp = keys.as_ptr().cast::<u16>();
        // Half the next tile's lines here, the rest over `tile_pv512`.
        score_blocks::<Native>(qp, h, dk, kp, n, scale, scores, pf, 2);
    }

    /// [`super::tile_scores_widened`] on AVX-512F: [`tile_scores512`]'s blocks, two FMAs per
    /// column pair.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_scores_wide(
        qp: &[u32],
        h: usize,
        dk: usize,
        tile: &[f32],
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut Prefetch,
    ) {
        score_blocks::<Emulated>(qp, h, dk, tile.as_ptr(), n, scale, scores, pf, 1);
    }

    /// One AVX2 block: `G` groups of 8 heads (from head `h0`) × `X` keys (from `x0`, `xb` of
    /// them real), two FMAs per column pair, then stored lane by lane.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block8<const G: usize, const X: usize>(
        qt: *const u32,
        hp: usize,
        h: usize,
        tp: *const f32,
        dk: usize,
        h0: usize,
        x0: usize,
        xb: usize,
        n: usize,
        scale: f32,
        sp: *mut f32,
        pf: &mut Prefetch,
    ) {
        let rows: [*const f32; X] = std::array::from_fn(|x| tp.add((x0 + x.min(xb - 1)) * dk));
        let himask = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); X]; G];
        for i in 0..dk / 2 {
            if i % PF_PAIRS == 0 {
                pf.tick();
            }
            let mut qo = [_mm256_setzero_ps(); G];
            let mut qe = [_mm256_setzero_ps(); G];
            for g in 0..G {
                let w = _mm256_loadu_si256(qt.add(i * hp + h0 + 8 * g).cast());
                qo[g] = _mm256_castsi256_ps(_mm256_and_si256(w, himask));
                qe[g] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
            }
            for (x, row) in rows.iter().enumerate() {
                let ko = _mm256_broadcast_ss(&*row.add(2 * i + 1));
                let ke = _mm256_broadcast_ss(&*row.add(2 * i));
                for g in 0..G {
                    let a = _mm256_fmadd_ps(qo[g], ko, acc[g][x]);
                    acc[g][x] = _mm256_fmadd_ps(qe[g], ke, a);
                }
            }
        }
        let mut out = [0f32; 8];
        for (g, ag) in acc.iter().enumerate() {
            for (x, a) in ag.iter().enumerate().take(xb) {
                _mm256_storeu_ps(out.as_mut_ptr(), *a);
                for (l, o) in out.iter().enumerate() {
                    let hh = h0 + 8 * g + l;
                    if hh < h {
                        *sp.add(hh * n + x0 + x) = scale * o;
                    }
                }
            }
        }
    }

    /// [`super::tile_scores_widened`] on AVX2: blocks of 16 heads × 5 keys (two FMAs per
    /// column pair for each 8 heads, the key's two columns broadcast once for both; ten
    /// accumulator chains, as each takes two dependent FMAs a pair), a last 8 heads × 10 keys.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_scores(
        qp: &[u32],
        h: usize,
        dk: usize,
        tile: &[f32],
        n: usize,
        scale: f32,
        scores: &mut [f32],
        pf: &mut Prefetch,
    ) {
        let hp = super::padded_heads(h);
        let (qpp, tp, sp) = (qp.as_ptr(), tile.as_ptr(), scores.as_mut_ptr());
        let groups = h.div_ceil(8);
        let blocks = groups / 2 * n.div_ceil(5) + groups % 2 * n.div_ceil(10);
        pf.pace(blocks * (dk / 2).div_ceil(PF_PAIRS));
        let mut h0 = 0;
        while h0 < h {
            let pair = h - h0 > 8;
            let xs = if pair { 5 } else { 10 };
            let mut x0 = 0;
            while x0 < n {
                let xb = (n - x0).min(xs);
                if pair {
                    score_block8::<2, 5>(qpp, hp, h, tp, dk, h0, x0, xb, n, scale, sp, pf);
                } else {
                    score_block8::<1, 10>(qpp, hp, h, tp, dk, h0, x0, xb, n, scale, sp, pf);
                }
                x0 += xb;
            }
            h0 += if pair { 16 } else { 8 };
        }
    }

    /// The bf16 bits of up to 32 values at `src` (`left` of them real, the rest read as zero
    /// and never touched), in order in the result's 16-bit words: one `vcvtne2ps2bf16`.
    #[inline(always)]
    unsafe fn cvt32(src: *const f32, left: usize) -> __m512i {
        let (m0, m1) = masks32(left);
        let lo = _mm512_maskz_loadu_ps(m0, src);
        let hi = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// The lane masks of the first and second 16 of 32 values of which `left` are real.
    #[inline(always)]
    fn masks32(left: usize) -> (__mmask16, __mmask16) {
        (
            ((1u32 << left.min(16)) - 1) as __mmask16,
            ((1u32 << left.saturating_sub(16).min(16)) - 1) as __mmask16,
        )
    }

    /// Store 32 probabilities' bf16 bits `v` (in order, as [`cvt32`] gives them; `left` of them
    /// real) at `dst` as key pairs: each pair's halves swapped by a 16-bit rotate (key `2i`
    /// high), and only the dwords that hold a real key written.
    #[inline(always)]
    unsafe fn store_key_pairs(dst: *mut u32, left: usize, v: __m512i) {
        let dm = ((1u32 << left.div_ceil(2).min(16)) - 1) as __mmask16;
        _mm512_mask_storeu_epi32(dst.cast(), dm, _mm512_rol_epi32::<16>(v));
    }

    /// [`super::pack_query`]: 16 heads × 16 column pairs at a time, each head's 32 values one
    /// `vcvtne2ps2bf16` (bf16 values in memory order are the column pairs), then a 16 × 16
    /// transpose of the dwords; heads past `h` and pairs past `Dk/2` masked to zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_query(q: &[f32], h: usize, dk: usize, out: &mut [u32]) {
        let (hp, pairs) = (super::padded_heads(h), dk / 2);
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        let mut h0 = 0;
        while h0 < hp {
            let mut c0 = 0;
            while c0 < pairs {
                let left = pairs - c0;
                let mut r = [_mm512_setzero_ps(); 16];
                for (j, rj) in r.iter_mut().enumerate().take(h.saturating_sub(h0)) {
                    *rj = _mm512_castsi512_ps(cvt32(qp.add((h0 + j) * dk + 2 * c0), 2 * left));
                }
                let t = transpose16(&r);
                for (c, tc) in t.iter().enumerate().take(left.min(16)) {
                    _mm512_storeu_ps(op.add((c0 + c) * hp + h0).cast(), *tc);
                }
                c0 += 16;
            }
            h0 += 16;
        }
    }

    /// [`super::narrow_rounded`]: 32 values a conversion, the tail masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn narrow_rounded(src: &[f32], dst: &mut [bf16]) {
        let (n, sp, dp) = (src.len(), src.as_ptr(), dst.as_mut_ptr().cast::<u16>());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let m = ((1u64 << left.min(32)) - 1) as __mmask32;
            _mm512_mask_storeu_epi16(dp.add(i).cast(), m, cvt32(sp.add(i), left));
            i += 32;
        }
    }

    /// [`super::pack_probs`]: 32 probabilities per `vcvtne2ps2bf16`, each pair's halves then
    /// swapped (key `2i` high) by a 16-bit rotate.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_probs(p: &[f32], h: usize, n: usize, out: &mut [u32]) {
        let pw = n.div_ceil(2);
        for hh in 0..h {
            let (src, dst) = (p.as_ptr().add(hh * n), out.as_mut_ptr().add(hh * pw));
            let mut x = 0;
            while x < n {
                let left = n - x;
                store_key_pairs(dst.add(x / 2), left, cvt32(src.add(x), left));
                x += 32;
            }
        }
    }

    /// [`super::softmax_pack`]: the max as `softmax_update512` takes it (16-lane body, the tail
    /// one by one), then 32 scores at a time through `exp16`, their halves added in order into
    /// the 8-lane sum (lanes past the row zeroed, which adds nothing), and rounded in key pairs
    /// as [`pack_probs`] does.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub unsafe fn softmax_pack(row: &[f32], m: &mut f32, l: &mut f32, out: &mut [u32]) -> f32 {
        use crate::activation::x86::exp16;
        use crate::attention::x86::{high8, row_max512};
        let n = row.len();
        let (p, dst) = (row.as_ptr(), out.as_mut_ptr());
        let mx = row_max512(row, *m);
        let corr = (*m - mx).exp();
        let vmx = _mm512_set1_ps(mx);
        let mut acc = _mm256_setzero_ps();
        let mut x = 0;
        while x < n {
            let left = n - x;
            let (m0, m1) = masks32(left);
            let e0 = _mm512_maskz_mov_ps(
                m0,
                exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m0, p.add(x)), vmx)),
            );
            let e1 = _mm512_maskz_mov_ps(
                m1,
                exp16(_mm512_sub_ps(
                    _mm512_maskz_loadu_ps(m1, p.wrapping_add(x + 16)),
                    vmx,
                )),
            );
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e0));
            acc = _mm256_add_ps(acc, high8(e0));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e1));
            acc = _mm256_add_ps(acc, high8(e1));
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(e1, e0));
            store_key_pairs(dst.add(x / 2), left, v);
            x += 32;
        }
        *l = *l * corr + crate::simd::x86::hsum(acc);
        *m = mx;
        corr
    }

    /// Permuted column order of a 32-column strip (interleaving unpacks) → natural, for the
    /// low (`cols 0..16`) or high (`16..32`) register.
    #[inline(always)]
    unsafe fn unpermute(lo: __m512, hi: __m512) -> (__m512, __m512) {
        let i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        (
            _mm512_permutex2var_ps(lo, i0, hi),
            _mm512_permutex2var_ps(lo, i1, hi),
        )
    }

    /// `HB` heads × one 32-column strip at `c0` over all `n` keys: accumulators in the
    /// unpacks' column order (`lo`: columns 0–3, 8–11, 16–19, 24–27 of the strip; `hi` the
    /// others), one `vdpbf16ps` per head and register per key pair, then the odd last key by
    /// one FMA.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_strip<const HB: usize>(
        pk: *const u32,
        pw: usize,
        kp: *const u16,
        dk: usize,
        n: usize,
        ap: *mut f32,
        dv: usize,
        h0: usize,
        c0: usize,
    ) {
        let mut r = [[_mm512_setzero_ps(); 2]; HB];
        for (hi, rh) in r.iter_mut().enumerate() {
            let a = ap.add((h0 + hi) * dv + c0);
            let (n0, n1) = (_mm512_loadu_ps(a), _mm512_loadu_ps(a.add(16)));
            rh[0] = _mm512_shuffle_f32x4::<0b10_00_10_00>(n0, n1);
            rh[1] = _mm512_shuffle_f32x4::<0b11_01_11_01>(n0, n1);
        }
        let mut x = 0;
        while x + 2 <= n {
            let r0 = _mm512_loadu_si512(kp.add(x * dk + c0).cast());
            let r1 = _mm512_loadu_si512(kp.add((x + 1) * dk + c0).cast());
            // Dword = key x (high half) and key x + 1 (low half) of one column.
            let vl = std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi16(r1, r0));
            let vh = std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi16(r1, r0));
            for (hi, rh) in r.iter_mut().enumerate() {
                let e = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *pk.add((h0 + hi) * pw + x / 2) as i32,
                ));
                rh[0] = _mm512_dpbf16_ps(rh[0], vl, e);
                rh[1] = _mm512_dpbf16_ps(rh[1], vh, e);
            }
            x += 2;
        }
        if x < n {
            // The odd last key, widened into the same column order.
            let rl = _mm512_loadu_si512(kp.add(x * dk + c0).cast());
            let z = _mm512_setzero_si512();
            let wl = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, rl));
            let wh = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, rl));
            for (hi, rh) in r.iter_mut().enumerate() {
                let e = _mm512_set1_ps(f32::from_bits(
                    *pk.add((h0 + hi) * pw + x / 2) & 0xffff_0000,
                ));
                rh[0] = _mm512_fmadd_ps(e, wl, rh[0]);
                rh[1] = _mm512_fmadd_ps(e, wh, rh[1]);
            }
        }
        for (hi, rh) in r.iter().enumerate() {
            let (n0, n1) = unpermute(rh[0], rh[1]);
            let a = ap.add((h0 + hi) * dv + c0);
            _mm512_storeu_ps(a, n0);
            _mm512_storeu_ps(a.add(16), n1);
        }
    }

    /// [`super::tile_pv`]: 32-column strips in blocks of up to 8 heads (16 accumulators, two
    /// value registers per key pair), the columns past the last strip one FMA per key.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_pv512(
        pk: &[u32],
        h: usize,
        n: usize,
        keys: &[bf16],
        dk: usize,
        dv: usize,
        acc: &mut [f32],
        pf: &mut Prefetch,
    ) {
        let pw = n.div_ceil(2);
        let (pp, kp, ap) = (pk.as_ptr(), keys.as_ptr().cast::<u16>(), acc.as_mut_ptr());
        let c32 = dv / 32 * 32;
        pf.pace(c32 / 32 * h.div_ceil(8));
        let mut c0 = 0;
        while c0 < c32 {
            let mut h0 = 0;
            while h0 < h {
                pf.tick();
                let hb = (h - h0).min(8);
                match hb {
                    8 => pv_strip::<8>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    7 => pv_strip::<7>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    6 => pv_strip::<6>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    5 => pv_strip::<5>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    4 => pv_strip::<4>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    3 => pv_strip::<3>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    2 => pv_strip::<2>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                    _ => pv_strip::<1>(pp, pw, kp, dk, n, ap, dv, h0, c0),
                }
                h0 += hb;
            }
            c0 += 32;
        }
        // Columns past the last strip: one FMA per key, in order.
        for hh in 0..h {
            for c in c32..dv {
                let mut a = *ap.add(hh * dv + c);
                for x in 0..n {
                    let d = *pp.add(hh * pw + x / 2);
                    let e = f32::from_bits(if x % 2 == 0 { d & 0xffff_0000 } else { d << 16 });
                    let v = f32::from_bits(u32::from(*kp.add(x * dk + c)) << 16);
                    a = e.mul_add(v, a);
                }
                *ap.add(hh * dv + c) = a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift values: mostly ordinary magnitudes, some denormal, zero, infinite or NaN bits.
    fn values(n: usize, seed: u64, odd: bool) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                let s = crate::test_values::next(&mut s);
                let u = s as u32;
                match (s >> 40) % 16 {
                    0 if odd => f32::from_bits(u & 0x807f_ffff),
                    1 if odd => f32::from_bits(u | 0x7f80_0000),
                    2 if odd => 0.0,
                    _ => (u as f32 / u32::MAX as f32 - 0.5) * 3.0,
                }
            })
            .collect()
    }

    fn bf16s(x: &[f32]) -> Vec<bf16> {
        x.iter().map(|&v| bf16::from_f32(v)).collect()
    }

    /// Normal values round as `half` rounds them (to nearest even); denormals go to a zero of
    /// their sign and NaN stays NaN.
    #[test]
    fn rounding_is_round_to_nearest_even_with_denormals_flushed() {
        for x in values(10_000, 3, true) {
            let r = round_bf16(x);
            if x.is_nan() {
                assert!(round_f32(x).is_nan());
            } else if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
                assert_eq!(r, ((x.to_bits() >> 16) & 0x8000) as u16, "{x:e}");
            } else {
                assert_eq!(r, bf16::from_f32(x).to_bits(), "{x:e}");
            }
        }
    }

    /// The vector rounding in place, and the rounding into bf16 bits, give the scalar bits at
    /// every length (tails).
    #[test]
    fn round_in_place_matches_scalar_rounding() {
        for n in [1usize, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100] {
            let x = values(n, n as u64 + 5, true);
            let mut v = x.clone();
            round_in_place(&mut v);
            let mut w = vec![bf16::ZERO; n + 1];
            narrow_rounded(&x, &mut w[..n]);
            for ((a, b), c) in v.iter().zip(&x).zip(&w) {
                assert_eq!(a.to_bits(), round_f32(*b).to_bits(), "n {n}, {b:e}");
                assert_eq!(c.to_bits(), round_bf16(*b), "narrow, n {n}, {b:e}");
            }
            assert_eq!(w[n], bf16::ZERO, "narrow wrote past its values");
        }
    }

    /// A score by hand: pairs in order, the high half first, from the packed query.
    fn score_by_hand(q: &[f32], row: &[bf16], scale: f32) -> f32 {
        let mut a = 0f32;
        for i in 0..row.len() / 2 {
            a = round_f32(q[2 * i + 1]).mul_add(row[2 * i + 1].to_f32(), a);
            a = round_f32(q[2 * i]).mul_add(row[2 * i].to_f32(), a);
        }
        scale * a
    }

    /// Every path's scores are the hand-written order's bits (ordinary values: no flush
    /// needed), at head counts around the 8- and 16-head groups, pair tails and key tails.
    /// The instruction's packing gives the scalar rounding's bits, special values included,
    /// at odd head counts and widths (heads and pairs past the ends zero).
    #[test]
    fn packed_query_on_the_instruction_equals_the_scalar_packing() {
        if !native_products() {
            return;
        }
        for (h, dk) in [(1, 2), (17, 34), (40, 96), (16, 578), (64, 1024), (3, 30)] {
            let q = values(h * dk, 7 + dk as u64, true);
            let len = packed_query_len(h, dk);
            let (mut a, mut b) = (vec![7u32; len], vec![9u32; len]);
            pack_query(&q, h, dk, &mut a);
            pack_query_scalar(&q, h, dk, &mut b);
            assert_eq!(a, b, "H={h} Dk={dk}");
        }
    }

    #[test]
    fn scores_on_every_path_equal_the_pairwise_order() {
        for (h, dk, n) in [
            (1, 2, 1),
            (5, 30, 7),
            (16, 288, 64),
            (17, 64, 17),
            (32, 576, 9),
            (33, 46, 33),
            (8, 8, 15),
        ] {
            let q = values(h * dk, h as u64 * 7 + dk as u64, false);
            let keys = bf16s(&values(n * dk, n as u64 + 11, false));
            let mut qp = vec![0u32; packed_query_len(h, dk)];
            pack_query(&q, h, dk, &mut qp);
            let mut want = vec![0f32; h * n];
            for hh in 0..h {
                for x in 0..n {
                    want[hh * n + x] =
                        score_by_hand(&q[hh * dk..(hh + 1) * dk], &keys[x * dk..(x + 1) * dk], 0.3);
                }
            }
            let tile: Vec<f32> = keys.iter().map(|k| k.to_f32()).collect();
            let mut paths: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut run = |name, f: &dyn Fn(&mut [f32], &mut Prefetch)| {
                let mut s = vec![f32::NAN; h * n];
                f(&mut s, &mut Prefetch::default());
                paths.push((name, s));
            };
            run("portable", &|s, pf| {
                tile_scores_portable(&qp, h, dk, &tile, n, 0.3, s, pf)
            });
            run("widened", &|s, pf| {
                tile_scores_widened(&qp, h, dk, &tile, n, 0.3, s, pf)
            });
            #[cfg(target_arch = "x86_64")]
            {
                let f = crate::cpu::features();
                if f.avx2_fma {
                    run("avx2", &|s, pf| {
                        // SAFETY: AVX2 and FMA checked.
                        unsafe { x86::tile_scores(&qp, h, dk, &tile, n, 0.3, s, pf) }
                    });
                }
                if f.avx512f {
                    run("avx512f", &|s, pf| {
                        // SAFETY: AVX-512F checked.
                        unsafe { x86::tile_scores_wide(&qp, h, dk, &tile, n, 0.3, s, pf) }
                    });
                }
                if f.avx512bf16 {
                    run("avx512bf16", &|s, pf| {
                        tile_scores(&qp, h, dk, &keys, n, 0.3, s, pf)
                    });
                }
            }
            for (name, got) in &paths {
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name}: h {h}, dk {dk}, n {n}");
            }
        }
    }

    /// Under the flush, the AVX2 emulation gives the instruction's bits on denormal and tiny
    /// inputs too (keys and queries with denormal bf16 values, sums that underflow).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn emulation_matches_the_instruction_on_denormals() {
        let f = crate::cpu::features();
        if !(f.avx512bf16 && f.avx2_fma) {
            return;
        }
        let (h, dk, n) = (16, 64, 16);
        let tiny = |x: Vec<f32>| -> Vec<f32> {
            x.into_iter()
                .enumerate()
                .map(|(i, v)| if i % 3 == 0 { v * 1e-38 } else { v * 1e-19 })
                .collect()
        };
        let q = tiny(values(h * dk, 41, false));
        let keys = bf16s(&tiny(values(n * dk, 43, false)));
        let mut qp = vec![0u32; packed_query_len(h, dk)];
        pack_query(&q, h, dk, &mut qp);
        let tile: Vec<f32> = keys.iter().map(|k| k.to_f32()).collect();
        let _flush = crate::cpu::FlushDenormals::new();
        let mut a = vec![0f32; h * n];
        tile_scores(&qp, h, dk, &keys, n, 1.0, &mut a, &mut Prefetch::default());
        for wide in [false, true] {
            let mut b = vec![0f32; h * n];
            // SAFETY: AVX-512F (hence AVX2 and FMA) checked with AVX512-BF16.
            unsafe {
                if wide {
                    x86::tile_scores_wide(
                        &qp,
                        h,
                        dk,
                        &tile,
                        n,
                        1.0,
                        &mut b,
                        &mut Prefetch::default(),
                    );
                } else {
                    x86::tile_scores(&qp, h, dk, &tile, n, 1.0, &mut b, &mut Prefetch::default());
                }
            }
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "wide {wide}"
            );
        }
        assert!(a.contains(&0.0) && a.iter().any(|&x| x != 0.0));
    }

    /// `P·V` on the instruction equals one FMA per key in order with the rounded
    /// probabilities (what the FMA kernels compute), at odd key counts (a lone last key),
    /// head counts around the 8-head blocks and value widths with tails past the 32-column
    /// strips; the packed probabilities hold the rounded values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pv_on_the_instruction_equals_fmas_in_key_order() {
        if !native_products() {
            return;
        }
        for (h, n, dk, dv) in [
            (16, 64, 288, 256),
            (9, 17, 64, 48),
            (3, 1, 40, 40),
            (17, 33, 66, 66),
        ] {
            let p: Vec<f32> = values(h * n, 9 + n as u64, false)
                .iter()
                .map(|x| x.abs() / 1.5)
                .collect();
            let keys = bf16s(&values(n * dk, 19, false));
            let acc0 = values(h * dv, 23, false);
            let mut pk = vec![0u32; packed_probs_len(h, n)];
            pack_probs(&p, h, n, &mut pk);
            for hh in 0..h {
                for x in 0..n {
                    let d = pk[hh * n.div_ceil(2) + x / 2];
                    let got = half_of(d, x % 2 == 1);
                    assert_eq!(got.to_bits(), round_f32(p[hh * n + x]).to_bits());
                }
            }
            let mut got = acc0.clone();
            {
                let _flush = crate::cpu::FlushDenormals::new();
                tile_pv(&pk, h, n, &keys, dk, dv, &mut got, &mut Prefetch::default());
            }
            let mut want = acc0.clone();
            for hh in 0..h {
                for c in 0..dv {
                    let mut a = want[hh * dv + c];
                    for x in 0..n {
                        a = round_f32(p[hh * n + x]).mul_add(keys[x * dk + c].to_f32(), a);
                    }
                    want[hh * dv + c] = a;
                }
            }
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "h {h}, n {n}, dk {dk}, dv {dv}");
        }
    }

    /// The fused softmax step and packing give the bits of the step
    /// ([`crate::attention::softmax_update`]) and [`pack_probs`] one after the other: the
    /// probabilities, the running max and sum, and the factor returned, at every tail length,
    /// from an empty state and from one whose max is above or below the row's.
    #[test]
    fn softmax_pack_equals_the_step_then_the_packing() {
        if !native_products() {
            return;
        }
        for n in [1usize, 2, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 100, 128] {
            let row: Vec<f32> = values(n, 31 + n as u64, false)
                .iter()
                .map(|x| x.clamp(-40.0, 40.0))
                .collect();
            for (m0, l0) in [(f32::NEG_INFINITY, 0.0), (3.5f32, 2.25f32), (-60.0, 7.0)] {
                let (mut ma, mut la) = (m0, l0);
                let mut probs = row.clone();
                let ca = crate::attention::softmax_update(&mut probs, &mut ma, &mut la);
                let pw = n.div_ceil(2);
                let mut want = vec![5u32; pw + 1];
                pack_probs(&probs, 1, n, &mut want[..pw]);
                let (mut mb, mut lb) = (m0, l0);
                let mut got = vec![5u32; pw + 1];
                let cb = softmax_pack(&row, &mut mb, &mut lb, &mut got[..pw]);
                assert_eq!(got, want, "n {n}, m {m0}");
                assert_eq!(
                    (ma.to_bits(), la.to_bits(), ca.to_bits()),
                    (mb.to_bits(), lb.to_bits(), cb.to_bits()),
                    "n {n}, m {m0}"
                );
            }
        }
    }
}
