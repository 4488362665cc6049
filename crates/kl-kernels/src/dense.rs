//! Small dense building blocks for the chunked KDA kernel: a register-blocked f32 product of
//! small row-major matrices (operands in L1/L2) and a vectorised `exp`.
//!
//! AVX-512 or AVX2+FMA when present, portable loops otherwise (also on aarch64). Every element
//! of a product is the same FMA chain over `p` in order in both SIMD paths (a 16-lane register
//! simply covers 16 columns instead of 8), so the two give identical bits.

use crate::cpu::features;

/// How [`gemm()`] combines the product with `C`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode<'a> {
    /// `C = A·B`.
    Set,
    /// `C += A·B`.
    Add,
    /// `C −= A·B`.
    Sub,
    /// `C = Diag(s)·C + A·B` (`s` has one factor per row of `C`).
    ScaleAdd(&'a [f32]),
}

/// A read-only matrix view with arbitrary strides: element `(i, p)` at `ptr[i·rs + p·cs]`
/// (so a transposed row-major matrix is just `rs = 1`, `cs = ld`).
#[derive(Clone, Copy)]
pub(crate) struct MatA<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `C[m×n] (=|+=|−=) A[m×kk] · B[kk×n]`; `B` row-major with leading dimension `ldb`, `C` with
/// `ldc`. Bounds are checked once up front (then raw pointers are used).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    kk: usize,
    a: MatA<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    mode: Mode<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "gemm: C too small"
    );
    // SAFETY: C's rows are inside `c`, borrowed exclusively for the call.
    unsafe { gemm_ptr(m, n, kk, a, b, ldb, c.as_mut_ptr(), ldc, mode) }
}

/// [`gemm()`] writing through a raw pointer, for a `C` whose rows are interleaved with rows
/// other threads write (a KDA head's output rows).
///
/// # Safety
/// `c.add(i·ldc + j)` must be valid for reads and writes for `i < m`, `j < n`, and no other
/// access to those elements may happen during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    kk: usize,
    a: MatA<'_>,
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    mode: Mode<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= ldc, "gemm: C rows overlap");
    // SAFETY (every `row` call): row i < m of C, valid and unaliased per the contract.
    let row = |i: usize| unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
    if kk == 0 {
        for i in 0..m {
            match mode {
                Mode::Set => row(i).fill(0.0),
                Mode::ScaleAdd(sc) => row(i).iter_mut().for_each(|x| *x *= sc[i]),
                _ => {}
            }
        }
        return;
    }
    assert!(
        n <= ldb && b.len() >= (kk - 1) * ldb + n,
        "gemm: B too small"
    );
    assert!(
        a.data.len() > (m - 1) * a.rs + (kk - 1) * a.cs,
        "gemm: A too small"
    );
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma && features().avx512f && n >= 16 {
        // SAFETY: AVX-512F, AVX2 and FMA checked; A and B inside the ranges asserted above, C
        // per the contract.
        unsafe { x86::gemm512(m, n, kk, a, b.as_ptr(), ldb, c, ldc, mode) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2+FMA checked; as above.
        unsafe { x86::gemm(m, n, kk, a, b.as_ptr(), ldb, c, ldc, mode) };
        return;
    }
    let _ = features;
    // Portable: each element summed over `p` in order into a stack block of columns (no
    // allocation, so decode stays allocation-free on the portable path too), then applied.
    const BLOCK: usize = 64;
    let mut acc = [0f32; BLOCK];
    for i in 0..m {
        let cr = row(i);
        for j0 in (0..n).step_by(BLOCK) {
            let w = BLOCK.min(n - j0);
            let acc = &mut acc[..w];
            acc.fill(0.0);
            for p in 0..kk {
                let av = a.data[i * a.rs + p * a.cs];
                for (r, bv) in acc.iter_mut().zip(&b[p * ldb + j0..p * ldb + j0 + w]) {
                    *r += av * bv;
                }
            }
            let cb = &mut cr[j0..j0 + w];
            match mode {
                Mode::Set => cb.copy_from_slice(acc),
                Mode::Add => cb.iter_mut().zip(acc.iter()).for_each(|(c, r)| *c += r),
                Mode::Sub => cb.iter_mut().zip(acc.iter()).for_each(|(c, r)| *c -= r),
                Mode::ScaleAdd(sc) => cb
                    .iter_mut()
                    .zip(acc.iter())
                    .for_each(|(c, r)| *c = *c * sc[i] + r),
            }
        }
    }
}

/// `x[i] = exp(x[i])` (≤ 2 ulp on AVX2; results below ~1e-38 flush to 0).
pub(crate) fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx512f {
        // SAFETY: AVX-512F (and AVX2+FMA) checked.
        unsafe { x86::exp_inplace512(x) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2+FMA checked.
        unsafe { x86::exp_inplace(x) };
        return;
    }
    for v in x {
        *v = v.exp();
    }
}

/// `dst[i] = src[i] · exp(a[i] − b[i])`.
pub(crate) fn mul_exp_diff(dst: &mut [f32], src: &[f32], a: &[f32], b: &[f32]) {
    let n = dst.len();
    assert!(src.len() == n && a.len() == n && b.len() == n);
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2+FMA checked; lengths equal.
        unsafe { x86::mul_exp_diff(dst, src, a, b) };
        return;
    }
    for i in 0..n {
        dst[i] = src[i] * (a[i] - b[i]).exp();
    }
}

/// Forward substitution on rows: for `i` in `0..m`, `X_i −= Σ_{j<i} L[i·ldl + j] · X_j`, where
/// `X` rows have width `w` and leading dimension `ldx` (unit lower-triangular `L` implied).
pub(crate) fn forward_subst(m: usize, l: &[f32], ldl: usize, x: &mut [f32], ldx: usize, w: usize) {
    if m == 0 || w == 0 {
        return;
    }
    assert!(w <= ldx && x.len() >= (m - 1) * ldx + w);
    assert!(l.len() >= (m - 1) * ldl + m.saturating_sub(1));
    #[cfg(target_arch = "x86_64")]
    if features().avx512f {
        // SAFETY: AVX-512F (and AVX2+FMA) checked; bounds asserted.
        unsafe { x86::forward_subst512(m, l.as_ptr(), ldl, x.as_mut_ptr(), ldx, w) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma {
        // SAFETY: AVX2+FMA checked; bounds asserted.
        unsafe { x86::forward_subst(m, l.as_ptr(), ldl, x.as_mut_ptr(), ldx, w) };
        return;
    }
    for i in 1..m {
        let (done, rest) = x.split_at_mut(i * ldx);
        let xi = &mut rest[..w];
        for j in 0..i {
            let a = l[i * ldl + j];
            if a != 0.0 {
                for (xv, xj) in xi.iter_mut().zip(&done[j * ldx..j * ldx + w]) {
                    *xv -= a * xj;
                }
            }
        }
    }
}

/// [`forward_subst`] by blocks of `nb` rows: each block first subtracts every row above it as
/// one product `X_b −= L_{b,<b}·X_{<b}` ([`gemm()`], register-tiled), then solves within the
/// block row by row. The same solution up to reassociation, about three quarters of it at the
/// speed of a product for 64 rows; row `i` still depends only on rows `≤ i`, in a fixed order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_subst_blocked(
    m: usize,
    l: &[f32],
    ldl: usize,
    x: &mut [f32],
    ldx: usize,
    w: usize,
    nb: usize,
) {
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + nb.max(1)).min(m);
        let (done, rest) = x.split_at_mut(r0 * ldx);
        if r0 > 0 {
            let a = MatA {
                data: &l[r0 * ldl..],
                rs: ldl,
                cs: 1,
            };
            gemm(r1 - r0, w, r0, a, done, ldx, rest, ldx, Mode::Sub);
        }
        forward_subst(r1 - r0, &l[r0 * ldl + r0..], ldl, rest, ldx, w);
        r0 = r1;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MatA, Mode};
    use std::arch::x86_64::*;

    pub use crate::activation::x86::{exp8, mask};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_inplace(x: &mut [f32]) {
        crate::activation::x86::map(x, |v| exp8(v));
    }

    /// [`exp_inplace`] 16 lanes at a time ([`exp16`](crate::activation::x86::exp16): the
    /// same bits as the AVX2 path).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_inplace512(x: &mut [f32]) {
        crate::activation::x86::map16(x, |v| crate::activation::x86::exp16(v));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_exp_diff(dst: &mut [f32], src: &[f32], a: &[f32], b: &[f32]) {
        let n = dst.len();
        let (d, s, pa, pb) = (dst.as_mut_ptr(), src.as_ptr(), a.as_ptr(), b.as_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
            ));
            _mm256_storeu_ps(d.add(i), _mm256_mul_ps(_mm256_loadu_ps(s.add(i)), e));
            i += 8;
        }
        if i < n {
            let mk = mask(n - i);
            let e = exp8(_mm256_sub_ps(
                _mm256_maskload_ps(pa.add(i), mk),
                _mm256_maskload_ps(pb.add(i), mk),
            ));
            _mm256_maskstore_ps(
                d.add(i),
                mk,
                _mm256_mul_ps(_mm256_maskload_ps(s.add(i), mk), e),
            );
        }
    }

    /// Register tile `MR × 8·NV` of `C (op)= A·B`; the last vector of each row is masked when
    /// `!FULL`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kern<const MR: usize, const NV: usize, const FULL: bool>(
        kk: usize,
        a: *const f32,
        rs: usize,
        cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mk: __m256i,
        mode: Mode<'_>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for p in 0..kk {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                let bp = b.add(p * ldb + 8 * v);
                *x = if FULL || v + 1 < NV {
                    _mm256_loadu_ps(bp)
                } else {
                    _mm256_maskload_ps(bp, mk)
                };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(i * rs + p * cs));
                for v in 0..NV {
                    row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let cp = c.add(i * ldc + 8 * v);
                let full = FULL || v + 1 < NV;
                let old = match mode {
                    Mode::Set => _mm256_setzero_ps(),
                    _ if full => _mm256_loadu_ps(cp),
                    _ => _mm256_maskload_ps(cp, mk),
                };
                let r = match mode {
                    Mode::Set => *x,
                    Mode::Add => _mm256_add_ps(old, *x),
                    Mode::Sub => _mm256_sub_ps(old, *x),
                    Mode::ScaleAdd(sc) => {
                        _mm256_add_ps(_mm256_mul_ps(old, _mm256_set1_ps(sc[i])), *x)
                    }
                };
                if full {
                    _mm256_storeu_ps(cp, r);
                } else {
                    _mm256_maskstore_ps(cp, mk, r);
                }
            }
        }
    }

    const MR: usize = 6;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        kk: usize,
        a: MatA<'_>,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mode: Mode<'_>,
    ) {
        let (ap, rs, cs) = (a.data.as_ptr(), a.rs, a.cs);
        let mut j0 = 0;
        while j0 < n {
            let cols = 16.min(n - j0);
            let nv = cols.div_ceil(8);
            let full = cols % 8 == 0;
            let mk = mask(if full { 8 } else { cols % 8 });
            let mut i0 = 0;
            while i0 < m {
                // Rows per tile: 6, but never leave a 1- or 2-row tail (too few accumulator
                // chains to cover the FMA latency): 7 → 4 + 3, 8 → 4 + 4.
                let left = m - i0;
                let mr = if left == 7 || left == 8 {
                    4
                } else {
                    MR.min(left)
                };
                let (a0, b0, c0) = (ap.add(i0 * rs), b.add(j0), c.add(i0 * ldc + j0));
                let mode = match mode {
                    Mode::ScaleAdd(sc) => Mode::ScaleAdd(&sc[i0..]),
                    other => other,
                };
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (mr, nv, full) {
                            $(
                                ($r, 1, true) => kern::<$r, 1, true>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                                ($r, 1, false) => kern::<$r, 1, false>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                                ($r, 2, true) => kern::<$r, 2, true>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                                ($r, 2, false) => kern::<$r, 2, false>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                            )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6);
                i0 += mr;
            }
            j0 += cols;
        }
    }

    /// Row `i` of `X` minus `Σ_{j<i} L[i,j]·X_j`, 64 columns (8 registers) at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_subst(
        m: usize,
        l: *const f32,
        ldl: usize,
        x: *mut f32,
        ldx: usize,
        w: usize,
    ) {
        for i in 1..m {
            let li = l.add(i * ldl);
            let xi = x.add(i * ldx);
            let mut c0 = 0;
            while c0 < w {
                let cols = 64.min(w - c0);
                if cols == 64 {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_loadu_ps(xi.add(c0 + 8 * v));
                    }
                    for j in 0..i {
                        let lv = _mm256_broadcast_ss(&*li.add(j));
                        let xj = x.add(j * ldx + c0);
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fnmadd_ps(lv, _mm256_loadu_ps(xj.add(8 * v)), *a);
                        }
                    }
                    for (v, a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(xi.add(c0 + 8 * v), *a);
                    }
                } else {
                    // Narrow tail: 8 columns at a time, masked at the end.
                    let mut cc = 0;
                    while cc < cols {
                        let mk = mask((cols - cc).min(8));
                        let mut a = _mm256_maskload_ps(xi.add(c0 + cc), mk);
                        for j in 0..i {
                            let lv = _mm256_broadcast_ss(&*li.add(j));
                            let xj = _mm256_maskload_ps(x.add(j * ldx + c0 + cc), mk);
                            a = _mm256_fnmadd_ps(lv, xj, a);
                        }
                        _mm256_maskstore_ps(xi.add(c0 + cc), mk, a);
                        cc += 8;
                    }
                }
                c0 += cols;
            }
        }
    }

    /// [`forward_subst`] with 16-lane registers, 128 columns (8 registers) at a time: each
    /// element is the same fused chain over `j` as in the AVX2 kernel, so the bits are equal.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn forward_subst512(
        m: usize,
        l: *const f32,
        ldl: usize,
        x: *mut f32,
        ldx: usize,
        w: usize,
    ) {
        for i in 1..m {
            let li = l.add(i * ldl);
            let xi = x.add(i * ldx);
            let mut c0 = 0;
            while c0 < w {
                let cols = 128.min(w - c0);
                if cols == 128 {
                    let mut acc = [_mm512_setzero_ps(); 8];
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_loadu_ps(xi.add(c0 + 16 * v));
                    }
                    for j in 0..i {
                        let lv = _mm512_set1_ps(*li.add(j));
                        let xj = x.add(j * ldx + c0);
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fnmadd_ps(lv, _mm512_loadu_ps(xj.add(16 * v)), *a);
                        }
                    }
                    for (v, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(xi.add(c0 + 16 * v), *a);
                    }
                } else {
                    // Narrow tail: 16 columns at a time, masked at the end.
                    let mut cc = 0;
                    while cc < cols {
                        let mk = mask16(cols - cc);
                        let mut a = _mm512_maskz_loadu_ps(mk, xi.add(c0 + cc));
                        for j in 0..i {
                            let lv = _mm512_set1_ps(*li.add(j));
                            let xj = _mm512_maskz_loadu_ps(mk, x.add(j * ldx + c0 + cc));
                            a = _mm512_fnmadd_ps(lv, xj, a);
                        }
                        _mm512_mask_storeu_ps(xi.add(c0 + cc), mk, a);
                        cc += 16;
                    }
                }
                c0 += cols;
            }
        }
    }

    /// Lanes `< m` of a 16-lane mask.
    #[inline(always)]
    fn mask16(m: usize) -> __mmask16 {
        if m >= 16 {
            0xffff
        } else {
            ((1u32 << m) - 1) as __mmask16
        }
    }

    /// [`kern`] with 16-lane registers: tile `MR × 16·NV`, the last register of a row masked
    /// to `mk` (all lanes when the tile is full).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kern512<const MR: usize, const NV: usize>(
        kk: usize,
        a: *const f32,
        rs: usize,
        cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mk: __mmask16,
        mode: Mode<'_>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..kk {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                let m = if v + 1 < NV { 0xffff } else { mk };
                *x = _mm512_maskz_loadu_ps(m, b.add(p * ldb + 16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * rs + p * cs));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let m = if v + 1 < NV { 0xffff } else { mk };
                let cp = c.add(i * ldc + 16 * v);
                let old = match mode {
                    Mode::Set => _mm512_setzero_ps(),
                    _ => _mm512_maskz_loadu_ps(m, cp),
                };
                let r = match mode {
                    Mode::Set => *x,
                    Mode::Add => _mm512_add_ps(old, *x),
                    Mode::Sub => _mm512_sub_ps(old, *x),
                    Mode::ScaleAdd(sc) => {
                        _mm512_add_ps(_mm512_mul_ps(old, _mm512_set1_ps(sc[i])), *x)
                    }
                };
                _mm512_mask_storeu_ps(cp, m, r);
            }
        }
    }

    /// [`gemm()`](fn@gemm) with 16-lane registers: tiles of up to 8 rows × 32 columns (16 accumulators).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn gemm512(
        m: usize,
        n: usize,
        kk: usize,
        a: MatA<'_>,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mode: Mode<'_>,
    ) {
        let (ap, rs, cs) = (a.data.as_ptr(), a.rs, a.cs);
        let mut j0 = 0;
        while j0 < n {
            let cols = 32.min(n - j0);
            let nv = cols.div_ceil(16);
            let mk = mask16(cols - 16 * (nv - 1));
            let mut i0 = 0;
            while i0 < m {
                let left = m - i0;
                // 8 rows per tile, never a 1- or 2-row tail: 9 → 5 + 4, 10 → 5 + 5.
                let mr = if left == 9 || left == 10 {
                    5
                } else {
                    8.min(left)
                };
                let (a0, b0, c0) = (ap.add(i0 * rs), b.add(j0), c.add(i0 * ldc + j0));
                let mode = match mode {
                    Mode::ScaleAdd(sc) => Mode::ScaleAdd(&sc[i0..]),
                    other => other,
                };
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (mr, nv) {
                            $(
                                ($r, 1) => kern512::<$r, 1>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                                ($r, 2) => kern512::<$r, 2>(kk, a0, rs, cs, b0, ldb, c0, ldc, mk, mode),
                            )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6, 7, 8);
                i0 += mr;
            }
            j0 += cols;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 0.3)
            .collect()
    }

    /// The blocked substitution solves the same system as the row-by-row one, at odd sizes
    /// (blocks that do not divide the rows, widths past the 16- and 128-lane steps).
    #[test]
    fn blocked_forward_substitution_matches_rows() {
        for &(m, w, nb) in &[
            (64usize, 128usize, 16usize),
            (37, 19, 16),
            (9, 130, 4),
            (5, 3, 8),
        ] {
            let ldl = m + 3;
            let ldx = w + 5;
            let l = pseudo(m * ldl, 1);
            let x0 = pseudo(m * ldx, 2);
            let (mut a, mut b) = (x0.clone(), x0.clone());
            forward_subst(m, &l, ldl, &mut a, ldx, w);
            forward_subst_blocked(m, &l, ldl, &mut b, ldx, w, nb);
            for i in 0..m {
                for j in 0..w {
                    let (p, q) = (a[i * ldx + j], b[i * ldx + j]);
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                        "{m}x{w}/{nb} ({i},{j}): {p} vs {q}"
                    );
                }
                // Padding between rows is never written.
                assert_eq!(
                    &a[i * ldx + w..(i * ldx + ldx).min(a.len())],
                    &x0[i * ldx + w..(i * ldx + ldx).min(a.len())]
                );
                assert_eq!(
                    &b[i * ldx + w..(i * ldx + ldx).min(b.len())],
                    &x0[i * ldx + w..(i * ldx + ldx).min(b.len())]
                );
            }
        }
    }

    /// The 16-lane exponential gives the 8-lane one's bits, across the clamps and the
    /// underflow edge, with a masked tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_has_the_bits_of_exp8() {
        let f = features();
        if !(f.avx2_fma && f.avx512f) {
            return; // nothing to compare on this CPU; the AVX2 path is the only one
        }
        let mut x: Vec<f32> = (0..4001).map(|i| -110.0 + i as f32 * 0.0505).collect();
        x.extend([
            -87.336_55, -87.336_54, -87.4, 88.0, 88.1, 0.0, -0.0, 1e-30, -1e-30,
        ]);
        let (mut a, mut b) = (x.clone(), x.clone());
        // SAFETY: AVX-512F, AVX2 and FMA checked above.
        unsafe {
            x86::exp_inplace(&mut a);
            x86::exp_inplace512(&mut b);
        }
        for ((xa, xb), xi) in a.iter().zip(&b).zip(&x) {
            assert_eq!(xa.to_bits(), xb.to_bits(), "exp({xi})");
        }
        // And it is exp: within 2 ulp inside the clamps.
        for (e, x) in a
            .iter()
            .zip(&x)
            .filter(|(_, x)| (-87.3..=88.0).contains(*x))
        {
            let r = (*x as f64).exp();
            assert!(
                ((*e as f64) - r).abs() <= 2.5e-7 * r,
                "exp({x}) = {e}, not {r}"
            );
        }
    }
}
