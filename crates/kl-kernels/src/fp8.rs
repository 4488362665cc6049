//! FP8 E4M3 (the `e4m3fn` variant: no infinities, max ±448) encode and decode.
//!
//! Used for the optional fp8 latent cache. Decoding one code is a 256-entry table; decoding a
//! run of codes with a scale ([`decode_scaled`], what the attention kernels' widening of fp8 cache
//! rows does) computes the same values from the code's bits, branch-free, so that the loop
//! vectorises (16 codes per step with AVX-512, 8 with AVX2); [`decode_scaled_reference`] is its
//! table twin. Encoding rounds to the nearest representable value (ties to even mantissa) and
//! saturates at ±448.

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
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::features().isa() {
        // SAFETY: AVX-512F checked; the body is the safe loop below compiled 16 lanes wide.
        crate::cpu::Isa::Avx512 => return unsafe { decode_scaled_avx512(src, scale, dst) },
        // SAFETY: AVX2 checked; the same loop 8 lanes wide.
        crate::cpu::Isa::Avx2 => return unsafe { decode_scaled_avx2(src, scale, dst) },
        crate::cpu::Isa::Portable => {}
    }
    decode_scaled_body(src, scale, dst)
}

#[inline(always)]
fn decode_scaled_body(src: &[u8], scale: f32, dst: &mut [f32]) {
    for (o, &c) in dst.iter_mut().zip(src) {
        *o = decode_bits_branchless(c) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn decode_scaled_avx512(src: &[u8], scale: f32, dst: &mut [f32]) {
    decode_scaled_body(src, scale, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_scaled_avx2(src: &[u8], scale: f32, dst: &mut [f32]) {
    decode_scaled_body(src, scale, dst)
}

/// [`decode_scaled`] by table lookups.
pub fn decode_scaled_reference(src: &[u8], scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fp8::decode_scaled: lengths differ");
    let t = table();
    for (o, &c) in dst.iter_mut().zip(src) {
        *o = t[c as usize] * scale;
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
}
