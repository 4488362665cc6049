//! Small vector primitives with an AVX2+FMA path chosen at run time and a portable fallback.
//!
//! The portable versions use four independent accumulators so that the compiler can vectorise
//! them; the AVX2 versions use four 8-lane FMA accumulators. Results differ from a sequential sum
//! only by reassociation (well within the f32 tolerances the tests use).

#[cfg(target_arch = "x86_64")]
use crate::cpu::features;
use half::bf16;

/// Memory to be read soon (up to six spans of bytes), prefetched into L2 (or, made by
/// [`Prefetch::to_l1`], into L1) a few cache lines at a time by a kernel's loop, so that the
/// reads overlap its arithmetic: the next tile's key rows in latent attention, the next weight
/// panel in a serial prefill product. All at once would
/// stall: the core tracks only a few misses in flight. (Spread out or not, prefetches of short
/// rows far apart, each a page of its own, stalled a loop that had other work: the KDA chunk
/// kernel ran faster without prefetching its next chunk's rows.)
pub struct Prefetch {
    spans: [(*const u8, usize); 6],
    len: usize,
    /// The span being prefetched and the offset in it.
    span: usize,
    off: usize,
    per_tick: usize,
    /// `prefetcht0` (into L1) instead of `prefetcht1` (into L2).
    l1: bool,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            spans: [(std::ptr::null(), 0); 6],
            len: 0,
            span: 0,
            off: 0,
            per_tick: 0,
            l1: false,
        }
    }
}

impl Prefetch {
    /// An empty set whose lines go into L1 (`prefetcht0`) rather than L2. Latent attention's
    /// next key tile (docs/performance.md): on the AMD Zen 5 VM, decode over a 32K-key cache
    /// that comes from memory, tiles of 128 keys, took 0.85–0.88 ms a call with it and
    /// 0.93–1.17 with `prefetcht1` (`mini`'s shape, three series of an experimental binary),
    /// the released shape 2.85–2.91 against 2.87–3.02.
    pub fn to_l1() -> Self {
        Prefetch {
            l1: true,
            ..Prefetch::default()
        }
    }

    /// Add the bytes of `s` (at most six spans are kept; more, and empty ones, are ignored).
    pub fn push<T>(&mut self, s: &[T]) {
        let bytes = std::mem::size_of_val(s);
        if self.len < self.spans.len() && bytes > 0 {
            self.spans[self.len] = (s.as_ptr().cast(), bytes);
            self.len += 1;
        }
    }

    /// Lines not yet prefetched.
    pub fn lines(&self) -> usize {
        let rest: usize = self.spans[self.span.min(self.len)..self.len]
            .iter()
            .map(|&(_, bytes)| bytes.div_ceil(64))
            .sum();
        rest - self.off / 64
    }

    /// Spread what is left over `ticks` calls of [`tick`](Self::tick).
    pub fn pace(&mut self, ticks: usize) {
        self.per_tick = self.lines().div_ceil(ticks.max(1));
    }

    /// Prefetch the share of lines set by [`pace`](Self::pace) (none before it is called).
    #[inline(always)]
    pub fn tick(&mut self) {
        self.step(self.per_tick);
    }

    /// Prefetch the next `k` lines (or fewer). The span bookkeeping runs once per span piece;
    /// the inner loop is one prefetch and one add per line.
    #[inline(always)]
    pub fn step(&mut self, mut k: usize) {
        while k > 0 && self.span < self.len {
            let (ptr, bytes) = self.spans[self.span];
            let n = k.min((bytes - self.off).div_ceil(64));
            for i in 0..n {
                let p = ptr.wrapping_add(self.off + 64 * i);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a prefetch reads nothing architecturally and never faults, whatever
                // the address.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
                    if self.l1 {
                        _mm_prefetch::<_MM_HINT_T0>(p.cast());
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(p.cast());
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (p, self.l1);
            }
            k -= n;
            self.off += 64 * n;
            if self.off >= bytes {
                self.off = 0;
                self.span += 1;
            }
        }
    }
}

/// Prefetch every cache line of `s` into L1, for a loop about to read it (a few lines; for
/// more, use [`Prefetch`], which spreads them out).
#[inline(always)]
pub fn prefetch_l1<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = s.as_ptr().cast::<u8>();
        let mut off = 0;
        while off < std::mem::size_of_val(s) {
            // SAFETY: a prefetch reads nothing architecturally and never faults; the address
            // is inside `s`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.add(off).cast(),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

// SAFETY: the pointers are only ever used as prefetch hints (never dereferenced).
unsafe impl Send for Prefetch {}

/// Copy `src` to `dst` with non-temporal (streaming) stores where the destination allows them
/// (x86-64, 16-byte aligned, a whole number of 4-float stores), a plain copy otherwise: for
/// results that the next pass reads long after, such as rows spread over many pages, whose
/// cache lines would otherwise be read from memory first and then crowd the caches.
/// Streaming stores are weakly ordered: call [`stream_fence`] before anything that publishes
/// the data to another thread.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` floats that nothing else reads or writes
/// during the call, and must not overlap `src`.
#[inline]
pub unsafe fn stream_copy(dst: *mut f32, src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if (dst as usize).is_multiple_of(16) && src.len().is_multiple_of(4) {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        for (i, x) in src.chunks_exact(4).enumerate() {
            // SAFETY: SSE is part of x86-64; `dst + 4i` is 16-byte aligned and inside the
            // destination (per the contract); `x` holds 4 floats.
            unsafe { _mm_stream_ps(dst.add(4 * i), _mm_loadu_ps(x.as_ptr())) };
        }
        return;
    }
    // SAFETY: per the contract.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

/// Orders every [`stream_copy`] store of this thread before its later stores (`sfence`), so
/// that a later release (a lock, a join) publishes them; nothing to do off x86-64.
#[inline]
pub fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// `Σ a[i]·b[i]`.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { x86::dot_f32(a, b) };
    }
    dot_f32_portable(a, b)
}

/// Portable `Σ a[i]·b[i]`.
pub fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `Σ w[i]·x[i]` with bf16 `w`.
#[inline]
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2 and FMA checked at run time.
        return unsafe { x86::dot_bf16(w, x) };
    }
    let mut acc = [0f32; 8];
    let n8 = w.len() / 8 * 8;
    for (cw, cx) in w[..n8].chunks_exact(8).zip(x[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += cw[i].to_f32() * cx[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n8..w.len() {
        s += w[i].to_f32() * x[i];
    }
    s
}

/// Widen bf16 to f32 (16 lanes at a time with AVX-512: 3–4% off `mini`'s decode attention,
/// in-process, against the 8-lane loop).
#[inline]
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if f.avx2_fma && f.avx512f {
            // SAFETY: AVX-512F and AVX2 checked at run time.
            return unsafe { x86::widen_bf16_512(src, dst) };
        }
        if f.avx2_fma {
            // SAFETY: AVX2 checked at run time.
            return unsafe { x86::widen_bf16(src, dst) };
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// `y[i] += a·x[i]`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2 and FMA checked at run time.
        return unsafe { x86::axpy(a, x, y) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Index of the first largest value of `x`; NaNs never win, and with no value above −∞ (or
/// no value) the answer is 0. Greedy decoding takes one a token over the whole vocabulary
/// (32K–160K logits): the plain loop is a chain of dependent compares, about a nanosecond an
/// element, where this takes the maximum 16 lanes at a time and then looks for its first
/// occurrence a block at a time. [`argmax_reference`] is the plain loop.
pub fn argmax(x: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2 checked at run time; the body is safe code compiled for it.
        return unsafe { x86::argmax(x) };
    }
    argmax_blocks(x)
}

/// [`argmax`] as one loop: the first value greater than every value before it.
pub fn argmax_reference(x: &[f32]) -> usize {
    let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            (best, best_v) = (i, v);
        }
    }
    best
}

/// [`argmax`]'s body: lane-wise maxima (a compare the compiler turns into vector maxima: a NaN
/// never replaces a lane's value), then the first block holding the maximum, then its first
/// index in the block. Any value equal to the maximum (`-0.0` to `0.0` included) is one the
/// plain loop could have kept, and the plain loop keeps the first such.
#[inline(always)]
fn argmax_blocks(x: &[f32]) -> usize {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let blocks = x.chunks_exact(L);
    let tail = blocks.remainder();
    for b in blocks {
        for (m, &v) in lanes.iter_mut().zip(b) {
            if v > *m {
                *m = v;
            }
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let mut base = 0;
    for b in x.chunks(L) {
        if b.iter().fold(false, |hit, &v| hit | (v == max)) {
            return base + b.iter().position(|&v| v == max).unwrap_or(0);
        }
        base += b.len();
    }
    0
}

/// `y[i] *= a`.
#[inline]
pub fn scale(a: f32, y: &mut [f32]) {
    for v in y {
        *v *= a;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// [`super::argmax`] compiled for AVX2 (8-lane maxima and compares).
    #[target_feature(enable = "avx2")]
    pub unsafe fn argmax(x: &[f32]) -> usize {
        super::argmax_blocks(x)
    }

    /// Sum of the 8 lanes (fixed order: halves, then pairs, then the last two).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                let va = _mm256_loadu_ps(pa.add(i + 8 * u));
                let vb = _mm256_loadu_ps(pb.add(i + 8 * u));
                *acc_u = _mm256_fmadd_ps(va, vb, *acc_u);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut r = hsum(s);
        while i < n {
            r += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        r
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                let vw = load_bf16x8(pw.add(i + 8 * u));
                let vx = _mm256_loadu_ps(px.add(i + 8 * u));
                *acc_u = _mm256_fmadd_ps(vw, vx, *acc_u);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load_bf16x8(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut r = hsum(s);
        while i < n {
            r += (*pw.add(i)).to_f32() * *px.add(i);
            i += 1;
        }
        r
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load_bf16x8(src.as_ptr().add(i)));
            i += 8;
        }
        while i < n {
            dst[i] = src[i].to_f32();
            i += 1;
        }
    }

    /// [`widen_bf16`] 16 lanes at a time (the tail by the 8-lane kernel).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn widen_bf16_512(src: &[bf16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(sp.add(i) as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_ps(dp.add(i), _mm512_castsi512_ps(w));
            i += 16;
        }
        widen_bf16(&src[i..n], &mut dst[i..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let py = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                py,
                _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(py)),
            );
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Prefetch;

    /// `stream_copy` writes exactly `src` (streamed at aligned offsets with whole 4-float
    /// stores, copied at the others) and nothing around it.
    #[test]
    fn stream_copy_writes_exactly_the_source() {
        let src: Vec<f32> = (0..70).map(|i| i as f32 * 0.5 - 3.0).collect();
        for off in 0..5 {
            for n in [0, 1, 3, 4, 7, 8, 64, 67] {
                let mut dst = vec![-1f32; 80];
                // SAFETY: `off + n ≤ 80` floats of `dst`, which nothing else touches.
                unsafe { super::stream_copy(dst.as_mut_ptr().add(off), &src[..n]) };
                super::stream_fence();
                assert_eq!(&dst[off..off + n], &src[..n], "offset {off}, {n} floats");
                assert!(dst[..off].iter().chain(&dst[off + n..]).all(|&x| x == -1.0));
            }
        }
    }

    /// Lines are counted per span (a partial line is a line) and handed out exactly once, evenly
    /// over the ticks set by `pace`; empty spans and spans past the sixth are ignored.
    #[test]
    fn prefetch_counts_lines_and_paces() {
        let a = vec![0f32; 1000];
        let b = vec![0u8; 200];
        let mut pf = Prefetch::default();
        pf.push(&a[..100]); // 400 bytes: 7 lines
        pf.push(&b); // 200 bytes: 4 lines
        pf.push(&a[..0]); // empty: ignored
        pf.push(&b[..1]); // 1 line
        assert_eq!(pf.lines(), 7 + 4 + 1);
        for _ in 0..4 {
            pf.push(&b[..64]); // the fourth to sixth spans: 1 line each, then one ignored
        }
        assert_eq!(pf.lines(), 7 + 4 + 1 + 3);
        pf.step(9); // the first span and two lines of the second
        assert_eq!(pf.lines(), 6);
        pf.step(100);
        assert_eq!(pf.lines(), 0);
        let mut pf = Prefetch::default();
        pf.push(&a);
        pf.push(&b);
        pf.step(3);
        assert_eq!(pf.lines(), 63 + 4 - 3);
        pf.pace(16);
        pf.tick();
        assert_eq!(pf.lines(), 64 - 4); // 64 lines over 16 ticks: 4 a tick
        for _ in 0..20 {
            pf.tick();
        }
        assert_eq!(pf.lines(), 0);
        let mut none = Prefetch::default();
        none.tick();
        none.step(5);
        assert_eq!(none.lines(), 0);
    }
}
