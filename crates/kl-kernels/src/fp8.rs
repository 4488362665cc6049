//! FP8 E4M3 (the `e4m3fn` variant: no infinities, max ±448) encode and decode.
//!
//! Used for the optional fp8 latent cache. Decoding one code is a 256-entry table; decoding a
//! run of codes with a scale ([`decode_scaled`], what the attention kernels' widening of fp8 cache
//! rows does) computes the same values from the code's bits, branch-free, so that the loop
//! vectorises (16 codes per step with AVX-512, 8 with AVX2); [`decode_scaled_reference`] is its
//! table twin. Encoding rounds to the nearest representable value (ties to even mantissa) and
//! saturates at ±448; [`encode_scaled`] does it branch-free for a run of values (its twin
//! searches the table).

use std::sync::OnceLock;

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

fn decode_bits(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0F && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The decode table.
pub fn table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| decode_bits(i as u8)))
}

/// Decode one byte.
#[inline]
pub fn decode(b: u8) -> f32 {
    table()[b as usize]
}

/// Code `c`'s value from its bits, equal to `table()[c]` bit for bit: a normal code
/// (exponent field `e > 0`) is the f32 with exponent `e − 7 + 127` and the code's three mantissa
/// bits on top; a subnormal one is `m · 2⁻⁹` (exact); `0x7F` and `0xFF` are the table's NaN.
#[inline(always)]
fn decode_bits_branchless(c: u8) -> f32 {
    let mag = (c & 0x7F) as u32;
    let normal = f32::from_bits((mag << 20) + (120 << 23));
    let sub = (mag & 7) as f32 * (1.0 / 512.0);
    let v = if mag < 8 { sub } else { normal };
    let v = f32::from_bits(v.to_bits() | ((c as u32 & 0x80) << 24));
    if mag == 0x7F {
        f32::NAN
    } else {
        v
    }
}

/// `dst[i] = decode(src[i]) · scale` (equal lengths), vectorised (see the module docs); the same
/// bits as [`decode_scaled_reference`].
pub fn decode_scaled(src: &[u8], scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fp8::decode_scaled: lengths differ");
    widest(|| {
        for (o, &c) in dst.iter_mut().zip(src) {
            *o = decode_bits_branchless(c) * scale;
        }
    })
}

/// [`decode_scaled`] rounded to bf16 by [`crate::attention_bf16::round_bf16`] (what latent
/// attention's bf16 products read from an fp8 cache), written as bf16 bits: the same values as
/// decoding into f32 and rounding there, without the f32 copy.
pub fn decode_scaled_bf16(src: &[u8], scale: f32, dst: &mut [half::bf16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::decode_scaled_bf16: lengths differ"
    );
    widest(|| {
        for (o, &c) in dst.iter_mut().zip(src) {
            let v = decode_bits_branchless(c) * scale;
            *o = half::bf16::from_bits(crate::attention_bf16::round_bf16(v));
        }
    })
}

/// `f` compiled for the widest vector instruction set the CPU has (the same safe code; only the
/// width its loops vectorise to changes, and element-wise operations give the same bits at any
/// width).
#[inline(always)]
fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::features().isa() {
        // SAFETY: AVX-512F and BW checked.
        crate::cpu::Isa::Avx512 => return unsafe { on_avx512(f) },
        // SAFETY: AVX2 checked.
        crate::cpu::Isa::Avx2 => return unsafe { on_avx2(f) },
        crate::cpu::Isa::Portable => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`decode_scaled`] by table lookups.
pub fn decode_scaled_reference(src: &[u8], scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fp8::decode_scaled: lengths differ");
    let t = table();
    for (o, &c) in dst.iter_mut().zip(src) {
        *o = t[c as usize] * scale;
    }
}

/// [`encode`] branch-free (so that a loop over it vectorises), the same code for every input:
/// below `2⁻⁶` (the subnormal codes, steps of `2⁻⁹`) the magnitude times 512 rounded to the
/// nearest integer, ties to even; above, the f32's mantissa rounded to three bits, ties to even,
/// by adding `0x7FFFF` plus the kept part's lowest bit (a carry moves into the exponent, as it
/// should), the exponent rebased from 127 to 7.
#[inline(always)]
fn encode_branchless(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs().min(E4M3_MAX);
    let sub = (a * 512.0).round_ties_even() as u32;
    let b = a.to_bits();
    let normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20).wrapping_sub((127 - 7) << 3);
    let code = if a < 1.0 / 64.0 { sub } else { normal };
    if x.is_nan() {
        0x7F
    } else {
        sign | code as u8
    }
}

/// `dst[i] = encode(src[i] / scale)` (equal lengths), vectorised like [`decode_scaled`]; the same
/// codes as [`encode_scaled_reference`].
pub fn encode_scaled(src: &[f32], scale: f32, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "fp8::encode_scaled: lengths differ");
    widest(|| {
        for (o, &x) in dst.iter_mut().zip(src) {
            *o = encode_branchless(x / scale);
        }
    })
}

/// [`encode_scaled`] by [`encode`]'s search of the table.
pub fn encode_scaled_reference(src: &[f32], scale: f32, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "fp8::encode_scaled: lengths differ");
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = encode(x / scale);
    }
}

/// Encode one value (round to nearest, ties to even; saturating; NaN → 0x7F).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    let t = table();
    // Positive codes 0x00..=0x7E are increasing in value; binary search the nearest.
    let (mut lo, mut hi) = (0usize, 0x7Eusize);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if t[mid] < a {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // t[lo] ≥ a; compare with the code below.
    let code = if lo > 0 {
        let (below, above) = (t[lo - 1], t[lo]);
        let (db, da) = (a - below, above - a);
        if db < da || (db == da && (lo - 1) % 2 == 0) {
            lo - 1
        } else {
            lo
        }
    } else {
        lo
    };
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_code_and_rounds_to_nearest() {
        for b in 0u8..=0xFE {
            if b == 0x7F {
                continue;
            }
            let v = decode(b);
            assert_eq!(
                encode(v),
                if v == 0.0 { b & 0x80 } else { b },
                "code {b:#x} = {v}"
            );
        }
        assert_eq!(decode(encode(1000.0)), 448.0);
        assert_eq!(decode(encode(-1000.0)), -448.0);
        assert_eq!(decode(encode(1.06)), 1.0); // between 1.0 and 1.125
        assert_eq!(decode(encode(1.07)), 1.125);
    }

    /// The branch-free encoder picks the search's code for every code's value, the midpoints
    /// between neighbouring codes and one f32 step either side of them, zeros, the saturation
    /// range, infinities, NaN and a sweep of magnitudes from 1e-12 to 1e4.
    #[test]
    fn branchless_encode_equals_the_search() {
        let t = table();
        let mut xs = vec![0.0f32, -0.0, 448.0, 449.0, 464.0, 465.0, 1e9, f32::INFINITY];
        xs.extend([
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-45,
            f32::MIN_POSITIVE,
        ]);
        for c in 0..0x7Eusize {
            let (v, w) = (t[c], t[c + 1]);
            let mid = (v + w) / 2.0;
            for y in [
                v,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                xs.push(y);
            }
        }
        let mut y = 1e-12f32;
        while y < 1e4 {
            xs.push(y);
            y *= 1.0007;
        }
        for x in xs.clone() {
            xs.push(-x);
        }
        for x in xs {
            assert_eq!(
                encode_branchless(x),
                encode(x),
                "x = {x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }

    /// Every code decodes from its bits to the table's value, bit for bit (NaN included).
    #[test]
    fn bits_decode_equals_the_table_for_every_code() {
        for c in 0u8..=0xFF {
            assert_eq!(
                decode_bits_branchless(c).to_bits(),
                table()[c as usize].to_bits(),
                "code {c:#04x}"
            );
        }
    }

    /// Decoding into bf16 gives, for every code and several scales (one that makes some values
    /// denormal), at lengths around the vector widths, exactly the bits of decoding into f32 and
    /// rounding there (what the attention's emulation does).
    #[test]
    fn decode_into_bf16_equals_decode_then_round() {
        let codes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for scale in [1.0f32, 3.7e-3, 1.234_567, 1e-40] {
            for len in [1usize, 15, 16, 17, 33, 64, 512] {
                let src = &codes[..len];
                let mut f = vec![0f32; len];
                decode_scaled(src, scale, &mut f);
                let mut h = vec![half::bf16::ZERO; len];
                decode_scaled_bf16(src, scale, &mut h);
                for ((a, b), c) in h.iter().zip(&f).zip(src) {
                    let want = crate::attention_bf16::round_bf16(*b);
                    assert_eq!(a.to_bits(), want, "code {c:#04x}, scale {scale:e}");
                }
            }
        }
    }
}
