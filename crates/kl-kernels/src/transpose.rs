//! Out-of-place transposition of f32 blocks with arbitrary leading dimensions: the chunked KDA
//! kernel's key block and the expanded latent attention's value block.

#[cfg(target_arch = "x86_64")]
use crate::cpu::features;

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`: a strided row-major block
/// into a strided column-major one (8 × 8 register blocks with AVX2). Pure data movement, so
/// every path gives the same bits.
pub fn transpose(src: &[f32], rows: usize, cols: usize, lds: usize, dst: &mut [f32], ldd: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        cols <= lds && src.len() >= (rows - 1) * lds + cols,
        "transpose: source smaller than {rows} rows of {cols} at stride {lds}"
    );
    assert!(
        rows <= ldd && dst.len() >= (cols - 1) * ldd + rows,
        "transpose: destination smaller than {cols} rows of {rows} at stride {ldd}"
    );
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2 checked; bounds asserted.
        unsafe { x86::transpose(src.as_ptr(), rows, cols, lds, dst.as_mut_ptr(), ldd) };
        return;
    }
    transpose_reference(src, rows, cols, lds, dst, ldd);
}

/// Reference twin of [`transpose`]: the element loop.
pub fn transpose_reference(
    src: &[f32],
    rows: usize,
    cols: usize,
    lds: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * ldd + r] = src[r * lds + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// 8×8 blocks in registers, scalar edges.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose(
        src: *const f32,
        rows: usize,
        cols: usize,
        lds: usize,
        dst: *mut f32,
        ldd: usize,
    ) {
        let (r8, c8) = (rows & !7, cols & !7);
        let mut r0 = 0;
        while r0 < r8 {
            let mut c0 = 0;
            while c0 < c8 {
                let s = src.add(r0 * lds + c0);
                let mut v = [_mm256_setzero_ps(); 8];
                for (i, x) in v.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(s.add(i * lds));
                }
                let t0 = _mm256_unpacklo_ps(v[0], v[1]);
                let t1 = _mm256_unpackhi_ps(v[0], v[1]);
                let t2 = _mm256_unpacklo_ps(v[2], v[3]);
                let t3 = _mm256_unpackhi_ps(v[2], v[3]);
                let t4 = _mm256_unpacklo_ps(v[4], v[5]);
                let t5 = _mm256_unpackhi_ps(v[4], v[5]);
                let t6 = _mm256_unpacklo_ps(v[6], v[7]);
                let t7 = _mm256_unpackhi_ps(v[6], v[7]);
                let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
                let u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
                let u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
                let u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
                let u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                let o = [
                    _mm256_permute2f128_ps(u0, u4, 0x20),
                    _mm256_permute2f128_ps(u1, u5, 0x20),
                    _mm256_permute2f128_ps(u2, u6, 0x20),
                    _mm256_permute2f128_ps(u3, u7, 0x20),
                    _mm256_permute2f128_ps(u0, u4, 0x31),
                    _mm256_permute2f128_ps(u1, u5, 0x31),
                    _mm256_permute2f128_ps(u2, u6, 0x31),
                    _mm256_permute2f128_ps(u3, u7, 0x31),
                ];
                let d = dst.add(c0 * ldd + r0);
                for (i, x) in o.iter().enumerate() {
                    _mm256_storeu_ps(d.add(i * ldd), *x);
                }
                c0 += 8;
            }
            r0 += 8;
        }
        for r in 0..rows {
            let cstart = if r < r8 { c8 } else { 0 };
            for c in cstart..cols {
                *dst.add(c * ldd + r) = *src.add(r * lds + c);
            }
        }
    }
}
