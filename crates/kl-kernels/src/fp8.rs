//! FP8 E4M3 (the `e4m3fn` variant: no infinities, max ±448) encode and decode.
//!
//! Used for the optional fp8 latent cache. Decoding is a 256-entry table; encoding rounds to the
//! nearest representable value (ties to even mantissa) and saturates at ±448.

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
}
