//! Small vector primitives with an AVX2+FMA path chosen at run time and a portable fallback.
//!
//! The portable versions use four independent accumulators so that the compiler can vectorise
//! them; the AVX2 versions use four 8-lane FMA accumulators. Results differ from a sequential sum
//! only by reassociation (well within the f32 tolerances the tests use).

#[cfg(target_arch = "x86_64")]
use crate::cpu::features;
use half::bf16;

/// Memory to be read soon (up to six spans, each one or more equally spaced rows of bytes),
/// prefetched into L2 a few cache lines at a time by a kernel's loop, so that the reads overlap
/// its arithmetic: the next tile's key rows in latent attention, the next weight panel in a
/// serial prefill product. All at once would stall: the core tracks only a few misses in
/// flight. (Rows far apart, each a page of its own, can stall a loop anyway: the KDA chunk
/// kernel measured faster without prefetching its next chunk's rows this way.)
pub struct Prefetch {
    spans: [Span; 6],
    len: usize,
    span: usize,
    row: usize,
    off: usize,
    per_tick: usize,
}

/// `rows` rows of `bytes` bytes at `ptr`, `stride` bytes apart.
#[derive(Clone, Copy)]
struct Span {
    ptr: *const u8,
    bytes: usize,
    stride: usize,
    rows: usize,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            spans: [Span {
                ptr: std::ptr::null(),
                bytes: 0,
                stride: 0,
                rows: 0,
            }; 6],
            len: 0,
            span: 0,
            row: 0,
            off: 0,
            per_tick: 0,
        }
    }
}

impl Prefetch {
    /// Add the bytes of `s` (at most six spans are kept; more are ignored).
    pub fn push<T>(&mut self, s: &[T]) {
        self.push_rows(s, 1, s.len(), 0);
    }

    /// Add `rows` rows of `len` elements of `s`, `ld` elements apart (row `r` is
    /// `s[r·ld .. r·ld + len]`); rows past the end of `s` are dropped.
    pub fn push_rows<T>(&mut self, s: &[T], rows: usize, len: usize, ld: usize) {
        let rows = if len == 0 || s.len() < len {
            0
        } else {
            // Rows that fit in `s` (one when `ld` is 0).
            rows.min((s.len() - len).checked_div(ld).map_or(1, |r| r + 1))
        };
        let size = std::mem::size_of::<T>();
        self.push_raw_rows(s.as_ptr().cast(), rows, len * size, ld * size);
    }

    /// Add `rows` rows of `bytes` bytes at `ptr`, `stride` bytes apart. Nothing is read
    /// through `ptr` (a prefetch never faults), so any address will do; for memory that other
    /// threads may be writing, where no slice may be formed.
    pub fn push_raw_rows(&mut self, ptr: *const u8, rows: usize, bytes: usize, stride: usize) {
        if self.len < self.spans.len() && rows > 0 && bytes > 0 {
            self.spans[self.len] = Span {
                ptr,
                bytes,
                stride,
                rows,
            };
            self.len += 1;
        }
    }

    /// Lines not yet prefetched.
    pub fn lines(&self) -> usize {
        let per_row = |s: &Span| s.bytes.div_ceil(64);
        let rest: usize = self.spans[self.span.min(self.len)..self.len]
            .iter()
            .map(|s| per_row(s) * s.rows)
            .sum();
        let done = if self.span < self.len {
            per_row(&self.spans[self.span]) * self.row + self.off / 64
        } else {
            0
        };
        rest - done
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

    /// Prefetch the next `k` lines (or fewer). The span bookkeeping runs once per row piece;
    /// the inner loop is one prefetch and one add per line.
    #[inline(always)]
    pub fn step(&mut self, mut k: usize) {
        while k > 0 && self.span < self.len {
            let s = self.spans[self.span];
            let row = s.ptr.wrapping_add(self.row * s.stride);
            let n = k.min((s.bytes - self.off).div_ceil(64));
            for i in 0..n {
                let p = row.wrapping_add(self.off + 64 * i);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a prefetch reads nothing architecturally and never faults, whatever
                // the address (spans from `push_raw_rows` need not be inside a slice).
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(p.cast());
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = p;
            }
            k -= n;
            self.off += 64 * n;
            if self.off >= s.bytes {
                self.off = 0;
                self.row += 1;
                if self.row >= s.rows {
                    self.row = 0;
                    self.span += 1;
                }
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

/// Widen bf16 to f32.
#[inline]
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2 checked at run time.
        return unsafe { x86::widen_bf16(src, dst) };
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

    /// Lines are counted per row (rows past the slice dropped) and handed out exactly once,
    /// evenly over the ticks set by `pace`.
    #[test]
    fn prefetch_counts_rows_and_paces() {
        let a = vec![0f32; 1000];
        let b = vec![0u8; 200];
        let mut pf = Prefetch::default();
        pf.push_rows(&a, 3, 100, 300); // 3 rows of 400 bytes: 7 lines each
        pf.push_rows(&a[900..], 5, 50, 60); // only 1 row fits (50 of 100 left)
        pf.push(&b); // 200 bytes: 4 lines
        pf.push_raw_rows(a.as_ptr().cast(), 2, 65, 1 << 20); // 2 rows of 2 lines (no bounds)
        pf.push_raw_rows(a.as_ptr().cast(), 3, 0, 64); // empty rows: ignored
        assert_eq!(pf.lines(), 21 + 4 + 4 + 4);
        pf.push_raw_rows(b.as_ptr(), 3, 64, 64); // the fifth and sixth spans: 3 lines each
        pf.push_raw_rows(b.as_ptr(), 3, 64, 64);
        pf.push_raw_rows(b.as_ptr(), 3, 64, 64); // a seventh: ignored
        assert_eq!(pf.lines(), 21 + 4 + 4 + 4 + 3 + 3);
        pf.step(7);
        assert_eq!(pf.lines(), 21 + 4 + 4 + 4 + 3 + 3 - 7);
        pf.step(100);
        assert_eq!(pf.lines(), 0);
        let mut pf = Prefetch::default();
        pf.push_rows(&a, 3, 100, 300);
        pf.push_rows(&a[900..], 5, 50, 60);
        pf.push(&b);
        pf.step(8); // the first row and one line of the second
        assert_eq!(pf.lines(), 21);
        pf.pace(7);
        pf.tick();
        assert_eq!(pf.lines(), 18);
        for _ in 0..10 {
            pf.tick();
        }
        assert_eq!(pf.lines(), 0);
        let mut none = Prefetch::default();
        none.tick();
        none.push_rows(&a, 0, 10, 10);
        none.push_rows(&a[..5], 2, 10, 10);
        assert_eq!(none.lines(), 0);
    }
}
