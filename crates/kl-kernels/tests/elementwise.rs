//! Vectorised elementwise kernels (activations, KDA gate, short convolution, gated norm) against
//! their scalar reference twins at odd sizes, over extreme inputs, and for position independence
//! (an element's bits do not depend on the slice it sits in: prefill in pieces stays bit-exact).

mod common;
use common::Rng;
use kl_kernels::activation::{
    mul_sigmoid, sigmoid, sigmoid_inplace, silu, silu_inplace, softplus, softplus_scaled,
    softplus_scaled_reference, swiglu, swiglu_reference,
};
use kl_kernels::conv1d::{
    conv1d_causal_silu, conv1d_causal_silu_heads, conv1d_causal_silu_heads_reference,
    conv1d_causal_silu_reference,
};
use kl_kernels::kda::{
    copy_rows, kda_gate, kda_gate_heads, kda_gate_heads_reference, kda_gate_reference, KdaShape,
};
use kl_kernels::norm::{
    rms_norm, rms_norm_gated, rms_norm_gated_heads, rms_norm_gated_heads_reference,
    rms_norm_gated_reference, rms_norm_reference,
};

/// `x` (`[T, H, w]`) laid out head-major (`[H, T, w]`).
fn head_major(x: &[f32], t: usize, h: usize, w: usize) -> Vec<f32> {
    let s = KdaShape::new(t, h, w, w);
    let mut y = vec![f32::NAN; x.len()];
    copy_rows(x, s, 0, &mut y, s.head_major(), 0, t, w);
    y
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Inputs across the interesting ranges: around 0, the softplus threshold 20, large of both
/// signs, tiny, and ±0.
fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let specials = [
        0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 19.99, 20.0, 20.01, -20.0, 87.0, -87.0, 88.5, -88.5,
        100.0, -100.0, 1e4, -1e4,
    ];
    (0..n)
        .map(|i| match i % 4 {
            0 => specials[(i / 4) % specials.len()],
            1 => rng.uniform() * 30.0,
            2 => rng.uniform() * 3.0,
            _ => rng.uniform() * 200.0,
        })
        .collect()
}

/// `|a − b| ≤ rel·|b| + abs` elementwise, with the index of the first failure.
fn assert_near(name: &str, got: &[f32], want: &[f32], rel: f32, abs: f32, input: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs() + abs,
            "{name}[{i}] of x = {}: got {g:e}, want {w:e}",
            input[i]
        );
    }
}

const SIZES: [usize; 7] = [1, 3, 7, 8, 9, 31, 1037];

#[test]
fn activations_match_scalar_formulas() {
    let mut rng = Rng::new(11);
    for n in SIZES {
        let x = inputs(&mut rng, n);
        let mut s = x.clone();
        silu_inplace(&mut s);
        let want: Vec<f32> = x.iter().map(|&v| silu(v)).collect();
        assert_near("silu", &s, &want, 4e-7, 1e-30, &x);
        let mut s = x.clone();
        sigmoid_inplace(&mut s);
        let want: Vec<f32> = x.iter().map(|&v| sigmoid(v)).collect();
        assert_near("sigmoid", &s, &want, 4e-7, 1e-30, &x);
        let up = rng.vec(n, 2.0);
        let mut a = up.clone();
        mul_sigmoid(&mut a, &x);
        let want: Vec<f32> = up.iter().zip(&x).map(|(u, &g)| u * sigmoid(g)).collect();
        assert_near("mul_sigmoid", &a, &want, 5e-7, 1e-30, &x);
        let (mut a, mut b) = (x.clone(), x.clone());
        swiglu(&mut a, &up);
        swiglu_reference(&mut b, &up);
        assert_near("swiglu", &a, &b, 5e-7, 1e-30, &x);
        let bias = rng.vec(n, 1.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        softplus_scaled(&mut a, &bias, -1.7);
        softplus_scaled_reference(&mut b, &bias, -1.7);
        let shifted: Vec<f32> = x.iter().zip(&bias).map(|(v, b)| v + b).collect();
        assert_near("softplus", &a, &b, 4e-7, 1e-37, &shifted);
    }
    // The threshold and the tails exactly.
    let mut a = vec![20.5f32, 25.0, -120.0];
    softplus_scaled(&mut a, &[0.0; 3], 1.0);
    assert_eq!(&a[..2], &[20.5, 25.0]);
    assert!(a[2] >= 0.0 && a[2] < 1e-37, "softplus(-120) = {}", a[2]);
    assert!((softplus(-120.0) - a[2]).abs() < 1e-37);
}

#[test]
fn elementwise_bits_do_not_depend_on_position() {
    let mut rng = Rng::new(12);
    let x = inputs(&mut rng, 53);
    let bias = rng.vec(53, 1.0);
    let up = rng.vec(53, 1.0);
    type Op = fn(&mut [f32], &[f32], &[f32]);
    let ops: [(&str, Op); 5] = [
        ("mul_sigmoid", |x, _, u| mul_sigmoid(x, u)),
        ("silu", |x, _, _| silu_inplace(x)),
        ("sigmoid", |x, _, _| sigmoid_inplace(x)),
        ("swiglu", |x, _, u| swiglu(x, u)),
        ("softplus", |x, b, _| softplus_scaled(x, b, 0.3)),
    ];
    for (name, op) in ops {
        let mut whole = x.clone();
        op(&mut whole, &bias, &up);
        for start in [0usize, 1, 5, 8, 13] {
            for len in [1usize, 2, 8, 11, 40] {
                if start + len > x.len() {
                    continue;
                }
                let r = start..start + len;
                let mut part = x[r.clone()].to_vec();
                op(&mut part, &bias[r.clone()], &up[r.clone()]);
                assert_eq!(
                    part.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    whole[r].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{name} at {start}+{len}"
                );
            }
        }
    }
}

#[test]
fn kda_gate_matches_reference() {
    let mut rng = Rng::new(13);
    for (t, h, k) in [(1, 3, 5), (7, 2, 9), (200, 4, 17)] {
        let x = rng.vec(t * h * k, 8.0);
        let a_log: Vec<f32> = (0..h).map(|i| (1.0 + i as f32).ln()).collect();
        let dt_bias = rng.vec(h * k, 2.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        kda_gate(&mut a, &a_log, &dt_bias, h, k);
        kda_gate_reference(&mut b, &a_log, &dt_bias, h, k);
        assert_near("kda_gate", &a, &b, 4e-7, 1e-37, &x);
        // Head-major: the same bits, each row where the layout puts it.
        let mut c = vec![f32::NAN; x.len()];
        kda_gate_heads(&x, &a_log, &dt_bias, h, k, &mut c);
        assert_eq!(
            bits(&c),
            bits(&head_major(&a, t, h, k)),
            "kda_gate_heads t {t}"
        );
        let mut d = vec![f32::NAN; x.len()];
        kda_gate_heads_reference(&x, &a_log, &dt_bias, h, k, &mut d);
        assert_near(
            "kda_gate_heads",
            &c,
            &d,
            4e-7,
            1e-37,
            &head_major(&x, t, h, k),
        );
    }
}

#[test]
fn conv1d_matches_reference_and_splits() {
    let mut rng = Rng::new(14);
    // Kernel widths with gathered taps and one past them; channel counts around the block size;
    // enough rows for the parallel split.
    for (c, w, t, hw) in [
        (7, 4, 11, 7),
        (67, 3, 130, 67),
        (130, 4, 1, 13),
        (5, 9, 9, 1),
        (64, 1, 3, 16),
        (130, 4, 150, 13),
    ] {
        let x = rng.vec(t * c, 3.0);
        let wt = rng.vec(c * w, 1.0);
        let st0 = rng.vec((w - 1) * c, 1.0);
        let (mut s1, mut s2) = (st0.clone(), st0.clone());
        let (mut o1, mut o2) = (vec![0.0; t * c], vec![0.0; t * c]);
        conv1d_causal_silu(&x, c, &wt, w, &mut s1, &mut o1);
        conv1d_causal_silu_reference(&x, c, &wt, w, &mut s2, &mut o2);
        assert_near("conv1d", &o1, &o2, 5e-7, 1e-30, &x);
        assert_eq!(s1, s2, "conv1d state, c {c} w {w} t {t}");
        // Token by token (decode) gives the bits of one call (prefill).
        let mut s3 = st0.clone();
        let mut o3 = vec![0.0; t * c];
        for ti in 0..t {
            let r = ti * c..(ti + 1) * c;
            conv1d_causal_silu(&x[r.clone()], c, &wt, w, &mut s3, &mut o3[r]);
        }
        assert_eq!(o1, o3, "conv1d split, c {c} w {w} t {t}");
        assert_eq!(s1, s3);
        // Head-major: the same bits and state.
        let mut s4 = st0.clone();
        let mut o4 = vec![f32::NAN; t * c];
        conv1d_causal_silu_heads(&x, c, &wt, w, hw, &mut s4, &mut o4);
        let expect = head_major(&o1, t, c / hw, hw);
        assert_eq!(bits(&o4), bits(&expect), "conv1d heads, c {c} w {w} t {t}");
        assert_eq!(s1, s4);
        let mut s5 = st0.clone();
        let mut o5 = vec![f32::NAN; t * c];
        conv1d_causal_silu_heads_reference(&x, c, &wt, w, hw, &mut s5, &mut o5);
        let xh = head_major(&x, t, c / hw, hw);
        assert_near("conv1d heads", &o4, &o5, 5e-7, 1e-30, &xh);
        assert_eq!(s1, s5);
    }
}

#[test]
fn rms_norm_gated_matches_reference() {
    let mut rng = Rng::new(15);
    for (rows, d, h) in [(1, 5, 1), (3, 64, 3), (300, 17, 4)] {
        let x = rng.vec(rows * d, 2.0);
        let gate = inputs(&mut rng, rows * d);
        let w = rng.vec(d, 1.0);
        let (mut a, mut b) = (vec![0.0; rows * d], vec![0.0; rows * d]);
        rms_norm_gated(&x, &gate, &w, 1e-5, &mut a);
        rms_norm_gated_reference(&x, &gate, &w, 1e-5, &mut b);
        assert_near("rms_norm_gated", &a, &b, 5e-7, 1e-30, &gate);
        // `x` head-major: the same bits.
        let mut c = vec![f32::NAN; rows * d];
        let xh = head_major(&x, rows / h, h, d);
        rms_norm_gated_heads(&xh, &gate, &w, 1e-5, h, &mut c);
        assert_eq!(bits(&c), bits(&a), "rms_norm_gated_heads rows {rows} h {h}");
        let mut e = vec![f32::NAN; rows * d];
        rms_norm_gated_heads_reference(&xh, &gate, &w, 1e-5, h, &mut e);
        assert_near("rms_norm_gated_heads", &c, &e, 5e-7, 1e-30, &gate);
    }
}

/// RMSNorm against its plain twin at odd widths (SIMD tails) and row counts (the parallel
/// split), f32 and bf16 weights; each row's bits do not depend on the rows beside it.
#[test]
fn rms_norm_matches_reference_row_by_row() {
    let mut rng = Rng::new(16);
    for (rows, d) in [(1, 5), (3, 64), (130, 17), (67, 1027)] {
        let x = rng.vec(rows * d, 2.0);
        let w = rng.vec(d, 1.0);
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let (mut a, mut b) = (vec![0.0; rows * d], vec![0.0; rows * d]);
        rms_norm(&x, &w, 1e-6, &mut a);
        rms_norm_reference(&x, &w, 1e-6, &mut b);
        assert_near("rms_norm", &a, &b, 2e-6, 1e-30, &x);
        rms_norm(&x, &wb, 1e-6, &mut a);
        rms_norm_reference(&x, &wb, 1e-6, &mut b);
        assert_near("rms_norm bf16", &a, &b, 2e-6, 1e-30, &x);
        for r in [0, rows / 2, rows - 1] {
            let mut one = vec![0.0; d];
            rms_norm(&x[r * d..(r + 1) * d], &wb, 1e-6, &mut one);
            assert_eq!(
                one,
                a[r * d..(r + 1) * d],
                "row {r} of {rows} alone, width {d}"
            );
        }
    }
}

#[test]
fn serial_marks_only_its_scope() {
    use kl_kernels::par;
    assert!(!par::is_serial());
    let inner = par::serial(|| (par::is_serial(), par::threads()));
    assert_eq!(inner, (true, 1));
    assert!(!par::is_serial());
    // A panic inside restores the mark.
    let r = std::panic::catch_unwind(|| par::serial(|| panic!("inside")));
    assert!(r.is_err());
    assert!(!par::is_serial());
    // rows_mut visits every row once, with the right first-row index, serial or not.
    for serial in [false, true] {
        let mut v = vec![0f32; 1000 * 3];
        let fill = |v: &mut [f32]| {
            par::rows_mut(v, 3, 7, |r0, rows| {
                for (i, row) in rows.chunks_mut(3).enumerate() {
                    row.iter_mut().for_each(|x| *x += (r0 + i) as f32);
                }
            })
        };
        if serial {
            par::serial(|| fill(&mut v));
        } else {
            fill(&mut v);
        }
        for (i, row) in v.chunks(3).enumerate() {
            assert_eq!(row, [i as f32; 3]);
        }
    }
}

/// The blocked transpose moves exactly the reference's elements, at sizes around the 8 × 8
/// blocks and with leading dimensions wider than the block; nothing else is written.
#[test]
fn transpose_matches_reference() {
    use kl_kernels::transpose::{transpose, transpose_reference};
    let mut rng = Rng::new(41);
    for &(rows, cols, lds, ldd) in &[
        (1usize, 1usize, 1usize, 1usize),
        (8, 8, 8, 8),
        (17, 9, 12, 20),
        (256, 64, 300, 256),
        (7, 130, 131, 7),
        (33, 8, 9, 40),
    ] {
        let src = rng.vec((rows - 1) * lds + cols, 1.0);
        let sentinel = -7.0;
        let (mut a, mut b) = (
            vec![sentinel; (cols - 1) * ldd + rows],
            vec![sentinel; (cols - 1) * ldd + rows],
        );
        transpose(&src, rows, cols, lds, &mut a, ldd);
        transpose_reference(&src, rows, cols, lds, &mut b, ldd);
        assert_eq!(a, b, "{rows}x{cols} lds {lds} ldd {ldd}");
        assert_eq!(
            a.iter().filter(|&&x| x == sentinel).count(),
            a.len() - rows * cols
        );
    }
}

/// The online-softmax step agrees with its twin (which uses libm's `exp`) at odd lengths, from
/// an empty state and from a carried one, including a block far below the running maximum.
#[test]
fn softmax_update_matches_reference() {
    use kl_kernels::attention::{softmax_update, softmax_update_reference};
    let mut rng = Rng::new(43);
    for &(n, shift) in &[
        (1usize, 0.0f32),
        (7, 0.0),
        (8, 3.0),
        (29, 1.0),
        (45, -2.0),
        (63, -5.0),
        (256, -100.0),
    ] {
        for &(m0, l0) in &[(f32::NEG_INFINITY, 0.0f32), (2.0, 5.0)] {
            let x: Vec<f32> = rng.vec(n, 4.0).iter().map(|v| v + shift).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            let (mut ma, mut la, mut mb, mut lb) = (m0, l0, m0, l0);
            let ca = softmax_update(&mut a, &mut ma, &mut la);
            let cb = softmax_update_reference(&mut b, &mut mb, &mut lb);
            assert_eq!(ma, mb, "n {n}: max");
            assert!(
                (ca - cb).abs() <= 1e-6 * cb.abs().max(1e-30),
                "n {n}: correction"
            );
            assert!(
                (la - lb).abs() <= 1e-6 * lb.abs(),
                "n {n}: sum {la} vs {lb}"
            );
            assert_near("softmax_update", &a, &b, 1e-6, 1e-37, &x);
        }
    }
}

/// Widening bf16 is exact on every path: each element equals `to_f32`, bit for bit, at lengths
/// around the 8- and 16-lane blocks, infinities, NaNs and subnormals included.
#[test]
fn widen_bf16_is_exact() {
    use half::bf16;
    use kl_kernels::simd::widen_bf16;
    let mut rng = Rng::new(47);
    let specials = [
        bf16::INFINITY,
        bf16::NEG_INFINITY,
        bf16::NAN,
        bf16::from_bits(0x0001),
        bf16::from_bits(0x8001),
        bf16::ZERO,
        bf16::NEG_ZERO,
        bf16::MAX,
        bf16::MIN,
    ];
    for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
        let src: Vec<bf16> = (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    specials[(i / 5) % specials.len()]
                } else {
                    bf16::from_f32(rng.uniform() * 1e3)
                }
            })
            .collect();
        let mut dst = vec![0f32; n];
        widen_bf16(&src, &mut dst);
        for (d, s) in dst.iter().zip(&src) {
            assert_eq!(d.to_bits(), s.to_f32().to_bits(), "n {n}: {s:?}");
        }
    }
}

/// The vectorised fp8 decode gives the table's values times the scale bit for bit: every code
/// (NaN codes included), at lengths around the vector widths and at unaligned starts, for
/// scales that are powers of two, odd, tiny and large.
#[test]
fn fp8_decode_scaled_matches_the_table() {
    use kl_kernels::fp8::{decode_scaled, decode_scaled_reference};
    let codes: Vec<u8> = (0..=255u8)
        .chain((0..300).map(|i| (i * 37 % 256) as u8))
        .collect();
    for scale in [1.0f32, 0.25, 1.0 / 448.0, 3.7e-3, 123.456, 1e-30, -2.5] {
        for (start, len) in [
            (0, 556),
            (1, 255),
            (3, 17),
            (5, 16),
            (7, 15),
            (0, 1),
            (9, 0),
        ] {
            let src = &codes[start..start + len];
            let (mut got, mut want) = (vec![0f32; len], vec![0f32; len]);
            decode_scaled(src, scale, &mut got);
            decode_scaled_reference(src, scale, &mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "code {:#04x} scale {scale}: got {g:e}, want {w:e}",
                    src[i]
                );
            }
        }
    }
}

/// The vectorised fp8 encode picks the table search's codes: values around every code and
/// midpoint after scaling, at odd lengths and offsets, for several scales.
#[test]
fn fp8_encode_scaled_matches_the_search() {
    use kl_kernels::fp8::{encode_scaled, encode_scaled_reference, table};
    let mut rng = Rng::new(21);
    let t = table();
    let mut xs: Vec<f32> = (0..0x7F)
        .flat_map(|c| [t[c], -t[c], (t[c] + t[(c + 1).min(0x7E)]) / 2.0])
        .collect();
    xs.extend((0..400).map(|_| rng.uniform() * 500.0));
    xs.extend([0.0, -0.0, f32::NAN, f32::INFINITY, -1e6, 1e-40]);
    for scale in [1.0f32, 0.5, 3.0 / 448.0, 0.013, 7.25] {
        let scaled: Vec<f32> = xs.iter().map(|x| x * scale).collect();
        for (start, len) in [
            (0, scaled.len()),
            (1, 255),
            (3, 17),
            (5, 16),
            (7, 15),
            (9, 0),
        ] {
            let src = &scaled[start..start + len];
            let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
            encode_scaled(src, scale, &mut got);
            encode_scaled_reference(src, scale, &mut want);
            assert_eq!(got, want, "scale {scale}, start {start}, len {len}");
        }
    }
}
