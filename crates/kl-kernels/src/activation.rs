//! Activations: scalar functions with the reference's exact formulas, and vectorised slice
//! versions of them.
//!
//! The scalar [`silu`], [`sigmoid`] and [`softplus`] transcribe PyTorch's definitions over the C
//! library's `expf` / `log1pf`; they are the reference twins. The slice kernels ([`swiglu`],
//! [`silu_inplace`], [`sigmoid_inplace`], [`mul_sigmoid`], [`softplus_scaled`]) evaluate the same formulas on 8
//! lanes with a polynomial `exp` and `log` (Cephes, within a few ulp of the C library) where the
//! CPU has AVX2+FMA, and call the scalar functions elsewhere.
//!
//! **Position independence.** Each output element is a function of its input element only: the
//! `len mod 8` tail runs the same 8-lane code on masked loads, so an element gets the same bits
//! whatever slice it sits in (a prompt prefilled in pieces stays bit-exact).

/// `x·sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch `softplus(x, beta=1, threshold=20)`: `x` above 20, `log1p(e^x)` otherwise.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU), in place on `gate`; vectorised.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up lengths differ");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked; lengths equal.
        unsafe { x86::swiglu(gate, up) };
        return;
    }
    swiglu_reference(gate, up);
}

/// [`swiglu`] with the scalar [`silu`].
pub fn swiglu_reference(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up lengths differ");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `x[i] = silu(x[i])` in place; vectorised.
pub fn silu_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked.
        unsafe { x86::silu_inplace(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = silu(*v));
}

/// `x[i] = sigmoid(x[i])` in place; vectorised.
pub fn sigmoid_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked.
        unsafe { x86::sigmoid_inplace(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = sigmoid(*v));
}

/// `x[i] = x[i] · sigmoid(gate[i])` in place (a sigmoid-gated output); vectorised.
pub fn mul_sigmoid(x: &mut [f32], gate: &[f32]) {
    assert_eq!(
        x.len(),
        gate.len(),
        "mul_sigmoid: x and gate lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked; lengths equal.
        unsafe { x86::mul_sigmoid(x, gate) };
        return;
    }
    x.iter_mut().zip(gate).for_each(|(v, g)| *v *= sigmoid(*g));
}

/// `x[i] = a · softplus(x[i] + bias[i])` in place (KDA's forget gate); vectorised.
pub fn softplus_scaled(x: &mut [f32], bias: &[f32], a: f32) {
    assert_eq!(
        x.len(),
        bias.len(),
        "softplus_scaled: x and bias lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2+FMA checked; lengths equal.
        unsafe { x86::softplus_scaled(x, bias, a) };
        return;
    }
    softplus_scaled_reference(x, bias, a);
}

/// [`softplus_scaled`] with the scalar [`softplus`].
pub fn softplus_scaled_reference(x: &mut [f32], bias: &[f32], a: f32) {
    assert_eq!(
        x.len(),
        bias.len(),
        "softplus_scaled: x and bias lengths differ"
    );
    for (v, b) in x.iter_mut().zip(bias) {
        *v = a * softplus(*v + b);
    }
}

/// `x[i] = exp(x[i])` in place, vectorised where the CPU allows (≤ 2 ulp; results below about
/// 1e-38, and `exp(−∞)`, are 0).
pub fn exp_inplace(x: &mut [f32]) {
    crate::dense::exp_inplace(x)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Constants of [`exp8`] and [`exp16`] (one table, so the two stay the same function):
    /// the clamps, `ln 2` in two parts (Cody–Waite), and the Cephes polynomial from its highest
    /// coefficient down.
    const EXP_LO: f32 = -87.336_55;
    const EXP_HI: f32 = 88.0;
    const EXP_LN2: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];
    const EXP_POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    /// `exp` on 8 lanes (Cephes polynomial; inputs clamped to [−87.34, 88]; below → +0).
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(EXP_LO);
        let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(EXP_HI));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))
    }

    /// [`exp8`] on 16 lanes (AVX-512F): the same operations lane by lane, so the same bits.
    #[inline(always)]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        let lo = _mm512_set1_ps(EXP_LO);
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
        let x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(EXP_HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[0]), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[1]), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_maskz_mul_ps(!under, y, _mm512_castsi512_ps(e))
    }

    /// Natural log on 8 lanes of positive, finite, normal inputs (Cephes `logf` polynomial).
    #[inline(always)]
    pub unsafe fn log8(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let bits = _mm256_castps_si256(x);
        // x = m · 2^e with m in [0.5, 1).
        let e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
        let m = _mm256_or_ps(
            _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff))),
            _mm256_set1_ps(0.5),
        );
        let mut e = _mm256_cvtepi32_ps(e);
        // m < √½: m ← 2m − 1 and e ← e − 1; else m ← m − 1.
        let small = _mm256_cmp_ps(
            m,
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            _CMP_LT_OQ,
        );
        e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
        let m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(m, small)), one);
        let z = _mm256_mul_ps(m, m);
        let mut p = _mm256_set1_ps(7.037_683_6e-2);
        for c in [
            -1.151_461e-1,
            1.167_699_9e-1,
            -1.242_014_1e-1,
            1.424_932_3e-1,
            -1.666_805_8e-1,
            2.000_071_4e-1,
            -2.499_999_4e-1,
            3.333_333e-1,
        ] {
            p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(c));
        }
        let mut y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
        y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.121_944_4e-4), y);
        y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5), z, y);
        _mm256_fmadd_ps(e, _mm256_set1_ps(0.693_359_4), _mm256_add_ps(m, y))
    }

    /// `1 / (1 + e^-x)` on 8 lanes.
    #[inline(always)]
    pub unsafe fn sigmoid8(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(one, _mm256_add_ps(one, e))
    }

    /// `x / (1 + e^-x)` on 8 lanes.
    #[inline(always)]
    pub unsafe fn silu8(x: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    /// PyTorch softplus on 8 lanes: `x` above 20, else `max(x, 0) + log1p(e^−|x|)` with the
    /// `log1p(u) = log(1 + u) · u / ((1 + u) − 1)` correction (`u` itself where `1 + u` rounds
    /// to 1).
    #[inline(always)]
    pub unsafe fn softplus8(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        let u = exp8(_mm256_sub_ps(_mm256_setzero_ps(), abs));
        let w = _mm256_add_ps(one, u);
        let dw = _mm256_sub_ps(w, one);
        let exact = _mm256_cmp_ps(dw, _mm256_setzero_ps(), _CMP_EQ_OQ);
        // Where dw = 0 the division is 0/0; that lane is replaced by u below.
        let l = _mm256_mul_ps(log8(w), _mm256_div_ps(u, dw));
        let l = _mm256_blendv_ps(l, u, exact);
        let s = _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), l);
        _mm256_blendv_ps(s, x, _mm256_cmp_ps(x, _mm256_set1_ps(20.0), _CMP_GT_OQ))
    }

    /// Lanes `0..m` set.
    #[inline(always)]
    pub unsafe fn mask(m: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(m as i32), idx)
    }

    /// `x[i] = f(x[i])`, 8 lanes at a time, the tail on masked lanes.
    #[inline(always)]
    pub unsafe fn map(x: &mut [f32], f: impl Fn(__m256) -> __m256) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), f(_mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        if i < n {
            let mk = mask(n - i);
            _mm256_maskstore_ps(p.add(i), mk, f(_mm256_maskload_ps(p.add(i), mk)));
        }
    }

    /// [`map`] 16 lanes at a time (AVX-512F).
    #[inline(always)]
    pub unsafe fn map16(x: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(p.add(i), f(_mm512_loadu_ps(p.add(i))));
            i += 16;
        }
        if i < n {
            let mk = ((1u32 << (n - i)) - 1) as __mmask16;
            _mm512_mask_storeu_ps(p.add(i), mk, f(_mm512_maskz_loadu_ps(mk, p.add(i))));
        }
    }

    /// `x[i] = f(x[i], y[i])` (lengths equal), as [`map`].
    #[inline(always)]
    pub unsafe fn map2(x: &mut [f32], y: &[f32], f: impl Fn(__m256, __m256) -> __m256) {
        let n = x.len();
        let (p, q) = (x.as_mut_ptr(), y.as_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let v = f(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(q.add(i)));
            _mm256_storeu_ps(p.add(i), v);
            i += 8;
        }
        if i < n {
            let mk = mask(n - i);
            let v = f(
                _mm256_maskload_ps(p.add(i), mk),
                _mm256_maskload_ps(q.add(i), mk),
            );
            _mm256_maskstore_ps(p.add(i), mk, v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        map2(gate, up, |g, u| _mm256_mul_ps(silu8(g), u));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_inplace(x: &mut [f32]) {
        map(x, |v| silu8(v));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid_inplace(x: &mut [f32]) {
        map(x, |v| sigmoid8(v));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_sigmoid(x: &mut [f32], gate: &[f32]) {
        map2(x, gate, |v, g| _mm256_mul_ps(v, sigmoid8(g)));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softplus_scaled(x: &mut [f32], bias: &[f32], a: f32) {
        let av = _mm256_set1_ps(a);
        map2(x, bias, |v, b| {
            _mm256_mul_ps(av, softplus8(_mm256_add_ps(v, b)))
        });
    }
}
