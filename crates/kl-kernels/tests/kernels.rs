//! Every optimised kernel against its reference twin, on random inputs at odd sizes.

mod common;
use common::{kda_inputs, max_abs_diff, Rng};
use half::{bf16, f16};
use kl_kernels::attention::{latent_attention, latent_attention_reference, LatentAttnShape};
use kl_kernels::cpu::Isa;
use kl_kernels::kda::{
    copy_rows, kda_chunked, kda_chunked_carry, kda_chunked_reference, kda_chunked_state,
    kda_recurrent, KdaShape, CHUNK,
};
use kl_kernels::matmul::{matmul, matmul_isa, matmul_reference};

/// `argmax` equals the plain loop at odd lengths, with ties, NaNs, infinities, signed zeros,
/// rows with nothing above −∞, and the maximum in the tail or the first lane.
#[test]
fn argmax_matches_reference() {
    use kl_kernels::simd::{argmax, argmax_reference};
    let mut rng = Rng::new(41);
    for n in [0, 1, 2, 7, 15, 16, 17, 31, 33, 100, 1000, 32_003] {
        for case in 0..8 {
            let mut x: Vec<f32> = (0..n).map(|_| rng.uniform() * 4.0).collect();
            match case {
                1 if n > 3 => {
                    // A tie: the maximum twice, the later copy in an earlier lane.
                    let m = x.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
                    x[n / 2] = m;
                    x[n - 1] = m;
                }
                2 => x.iter_mut().step_by(3).for_each(|v| *v = f32::NAN),
                3 => x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                4 => x.iter_mut().for_each(|v| *v = f32::NAN),
                5 if n > 2 => {
                    x.iter_mut().for_each(|v| *v = -v.abs() - 1.0);
                    x[1] = -0.0;
                    x[n - 1] = 0.0;
                }
                6 if n > 0 => x[n - 1] = f32::INFINITY,
                7 if n > 0 => x[0] = 9.0,
                _ => {}
            }
            assert_eq!(argmax(&x), argmax_reference(&x), "n {n} case {case}");
        }
    }
    assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 1.0]), 1);
    assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
}

#[test]
fn matmul_matches_reference_bf16_f16_and_f32() {
    // T > 8 takes the prefill path: the AVX-512 kernel where the CPU has it (the narrower paths
    // are compared bit for bit in `matmul_isa_paths_agree_bitwise`).
    eprintln!(
        "cpu: {} (matmul prefill kernel: {})",
        kl_kernels::cpu::describe(),
        kl_kernels::cpu::features().isa()
    );
    let mut rng = Rng::new(1);
    for &(t, k, n) in &[
        (1, 1, 1),
        (1, 7, 5),
        (3, 33, 17),
        (8, 100, 129),
        (9, 65, 31),
        (64, 200, 300),
        (130, 37, 1),
        (37, 1001, 29),
        (17, 2100, 13),
    ] {
        let x = rng.vec(t * k, 1.0);
        let wf = rng.vec(n * k, 1.0);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let tol = 1e-4 * (k as f32).sqrt();
        let (mut y, mut yr) = (vec![0f32; t * n], vec![0f32; t * n]);
        matmul(&x, &wb, &mut y, t, k, n);
        matmul_reference(&x, &wb, &mut yr, t, k, n);
        assert!(max_abs_diff(&y, &yr) < tol, "bf16 t={t} k={k} n={n}");
        matmul(&x, &wh, &mut y, t, k, n);
        matmul_reference(&x, &wh, &mut yr, t, k, n);
        assert!(max_abs_diff(&y, &yr) < tol, "f16 t={t} k={k} n={n}");
        matmul(&x, &wf, &mut y, t, k, n);
        matmul_reference(&x, &wf, &mut yr, t, k, n);
        assert!(max_abs_diff(&y, &yr) < tol, "f32 t={t} k={k} n={n}");
    }
}

/// The AVX-512 prefill kernel gives exactly the AVX2 kernels' bits, and both give each row of a
/// many-row call exactly as a one-row (decode, AVX2 gemv) call does. On a CPU without AVX-512
/// (or under `KL_NO_AVX512=1` / `KL_NO_SIMD=1`) the paths requested collapse onto the widest one
/// available and the same checks run on it.
#[test]
fn matmul_isa_paths_agree_bitwise() {
    let widest = kl_kernels::cpu::features().isa();
    eprintln!(
        "cpu: {}; comparing matmul on {:?} (capped at {widest})",
        kl_kernels::cpu::describe(),
        [Isa::Avx512, Isa::Avx2]
    );
    fn check<W: kl_kernels::Elem>(name: &str, x: &[f32], w: &[W], t: usize, k: usize, n: usize) {
        let run = |isa: Isa, t: usize, x: &[f32]| {
            let mut y = vec![0f32; t * n];
            matmul_isa(isa, x, w, &mut y, t, k, n);
            y
        };
        let wide = run(Isa::Avx512, t, x);
        let narrow = run(Isa::Avx2, t, x);
        // On one thread a product is one task per panel, all its rows: the AVX-512 path's whole
        // panels past `SLICE_MAX_ROWS` (128) x rows, whatever the machine's thread count.
        let serial = kl_kernels::par::serial(|| run(Isa::Avx512, t, x));
        let default = {
            let mut y = vec![0f32; t * n];
            matmul(x, w, &mut y, t, k, n);
            y
        };
        for i in 0..t * n {
            let (a, b, c) = (wide[i], narrow[i], default[i]);
            let at = format!("{name} t={t} k={k} n={n} element ({}, {})", i / n, i % n);
            assert_eq!(a.to_bits(), b.to_bits(), "{at}: AVX-512 {a} vs AVX2 {b}");
            assert_eq!(a.to_bits(), c.to_bits(), "{at}: AVX-512 {a} vs matmul {c}");
            let d = serial[i];
            assert_eq!(
                a.to_bits(),
                d.to_bits(),
                "{at}: AVX-512 {a} vs one thread {d}"
            );
        }
        for r in 0..t {
            let row = run(Isa::Avx512, 1, &x[r * k..(r + 1) * k]);
            for j in 0..n {
                let (a, b) = (wide[r * n + j], row[j]);
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{name} t={t} k={k} n={n}: row {r} of the prefill {a} vs decode {b} (col {j})"
                );
            }
        }
    }
    let mut rng = Rng::new(11);
    // T: partial blocks of x rows (6 per AVX-512 tile, 4 per AVX2 tile). N: odd (a W row pair
    // with one row), fewer rows than a tile, several tiles. K: tails of 1..7 columns, one and
    // several K blocks (at most 768 and 1024 columns), with saved partial sums.
    for &(t, k, n) in &[
        (37usize, 1usize, 7usize),
        (37, 13, 1),
        (37, 67, 5),
        (37, 200, 37),
        (9, 769, 11),
        (37, 1025, 13),
        (37, 2003, 31),
        (12, 1536, 6),
        (40, 4099, 3),
        // K a multiple of 8 (x read in place by the AVX-512 path) over uneven K blocks, and
        // one whose rows are 4 KiB apart (packed).
        (23, 2000, 9),
        (13, 2304, 16),
        (11, 1024, 10),
        // More x rows than a slice task takes (whole panels; two of them on one thread), and
        // a slice task of more than one x block per K block.
        (300, 1000, 200),
        (100, 1001, 45),
        // 5 to 8 x rows: the 16-lane matrix–vector tile (W rows in pairs, a last tile of 1 to
        // 3 rows, column tails).
        (5, 67, 5),
        (6, 200, 37),
        (7, 1025, 13),
        (8, 33, 9),
        (8, 2304, 16),
    ] {
        let mut x = rng.vec(t * k, 1.0);
        // Signed zeros: a row of −0 and a row a third of −0 (sums of zeros, zero-padded tails).
        x[..k].iter_mut().for_each(|v| *v = -0.0);
        if t > 3 {
            x[2 * k..3 * k]
                .iter_mut()
                .step_by(3)
                .for_each(|v| *v = -0.0);
        }
        let wf = rng.vec(n * k, 1.0);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        check("bf16", &x, &wb, t, k, n);
        check("f16", &x, &wh, t, k, n);
        check("f32", &x, &wf, t, k, n);
    }
}

#[test]
fn kda_chunked_equals_recurrent_at_odd_sizes() {
    let mut rng = Rng::new(2);
    for &t in &[1usize, 63, 64, 65, 200] {
        for &(h, k, v) in &[(1, 5, 3), (3, 12, 20), (2, 33, 17)] {
            let s = KdaShape::new(t, h, k, v);
            let [q, kk, vv, g, beta, st0] = kda_inputs(&mut rng, s);
            let (mut s1, mut s2, mut s3) = (st0.clone(), st0.clone(), st0.clone());
            let (mut o1, mut o2, mut o3) = (
                vec![0.0; t * h * v],
                vec![0.0; t * h * v],
                vec![0.0; t * h * v],
            );
            kda_chunked(s, &q, &kk, &vv, &g, &beta, &mut s1, &mut o1);
            kda_recurrent(s, &q, &kk, &vv, &g, &beta, &mut s2, &mut o2);
            kda_chunked_reference(s, &q, &kk, &vv, &g, &beta, &mut s3, &mut o3);
            // The state-only entry point gives kda_chunked's state bit for bit.
            let mut s4 = st0.clone();
            kda_chunked_state(s, &kk, &vv, &g, &beta, &mut s4);
            for (i, (a, b)) in s1.iter().zip(&s4).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "state only, t={t} {h}x{k}x{v} [{i}]"
                );
            }
            assert!(
                max_abs_diff(&o1, &o2) < 2e-5,
                "o chunked vs recurrent t={t} {h}x{k}x{v}: {}",
                max_abs_diff(&o1, &o2)
            );
            assert!(
                max_abs_diff(&s1, &s2) < 2e-5,
                "state t={t}: {}",
                max_abs_diff(&s1, &s2)
            );
            assert!(
                max_abs_diff(&o2, &o3) < 2e-5,
                "recurrent vs reference t={t}"
            );
            assert!(
                max_abs_diff(&s2, &s3) < 2e-5,
                "recurrent vs reference state t={t}"
            );
        }
    }
}

/// `x`'s rows as `to` lays them out (`x` laid out as `from`), rows `w` wide.
fn relaid(x: &[f32], from: KdaShape, to: KdaShape, w: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.len()];
    copy_rows(x, from, 0, &mut y, to, 0, from.t, w);
    y
}

fn assert_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what} [{i}]: {x} vs {y}");
    }
}

/// Head-major rows give the token-major bits in every entry point, and the carry entry point
/// gives the bits of the whole chunks followed by the rest on a copy of the state.
#[test]
fn kda_head_major_and_carry_give_the_same_bits() {
    let mut rng = Rng::new(5);
    for &t in &[1usize, 17, 64, 65, 150] {
        for &(h, k, v) in &[(1, 5, 3), (3, 12, 20), (2, 33, 17)] {
            let s = KdaShape::new(t, h, k, v);
            let hm = s.head_major();
            let [q, kk, vv, g, beta, st0] = kda_inputs(&mut rng, s);
            let (qh, kh, vh, gh) = (
                relaid(&q, s, hm, k),
                relaid(&kk, s, hm, k),
                relaid(&vv, s, hm, v),
                relaid(&g, s, hm, k),
            );
            let what = format!("t={t} {h}x{k}x{v}");
            type Entry =
                fn(KdaShape, &[f32], &[f32], &[f32], &[f32], &[f32], &mut [f32], &mut [f32]);
            let entries: [(&str, Entry); 4] = [
                ("chunked", kda_chunked),
                ("carry", kda_chunked_carry),
                ("recurrent", kda_recurrent),
                ("reference", kda_chunked_reference),
            ];
            for (name, f) in entries {
                let (mut st, mut o) = (st0.clone(), vec![0.0; t * h * v]);
                f(s, &q, &kk, &vv, &g, &beta, &mut st, &mut o);
                let (mut sth, mut oh) = (st0.clone(), vec![0.0; t * h * v]);
                f(hm, &qh, &kh, &vh, &gh, &beta, &mut sth, &mut oh);
                assert_bits(&st, &sth, &format!("{name} state, {what}"));
                assert_bits(&o, &relaid(&oh, hm, s, v), &format!("{name} out, {what}"));
            }
            let mut sth = st0.clone();
            kda_chunked_state(hm, &kh, &vh, &gh, &beta, &mut sth);
            let mut st = st0.clone();
            kda_chunked_state(s, &kk, &vv, &g, &beta, &mut st);
            assert_bits(&st, &sth, &format!("state only, {what}"));

            // The carry: kda_chunked on the whole chunks, then on the rest with a copy.
            let full = t / CHUNK * CHUNK;
            let (mut se, mut oe) = (st0.clone(), vec![0.0; t * h * v]);
            let (pk, pv) = (full * h * k, full * h * v);
            if full > 0 {
                let sh = KdaShape { t: full, ..s };
                kda_chunked(
                    sh,
                    &q[..pk],
                    &kk[..pk],
                    &vv[..pv],
                    &g[..pk],
                    &beta[..full * h],
                    &mut se,
                    &mut oe[..pv],
                );
            }
            if t > full {
                let sh = KdaShape { t: t - full, ..s };
                let mut copy = se.clone();
                kda_chunked(
                    sh,
                    &q[pk..],
                    &kk[pk..],
                    &vv[pv..],
                    &g[pk..],
                    &beta[full * h..],
                    &mut copy,
                    &mut oe[pv..],
                );
            }
            let (mut sc, mut oc) = (st0.clone(), vec![0.0; t * h * v]);
            kda_chunked_carry(hm, &qh, &kh, &vh, &gh, &beta, &mut sc, &mut oc);
            assert_bits(&se, &sc, &format!("carry state, {what}"));
            assert_bits(&oe, &relaid(&oc, hm, s, v), &format!("carry out, {what}"));
        }
    }
}

#[test]
fn kda_split_anywhere_equals_one_call() {
    let mut rng = Rng::new(3);
    let s = KdaShape::new(150, 2, 9, 11);
    let [q, kk, vv, g, beta, st0] = kda_inputs(&mut rng, s);
    let mut sa = st0.clone();
    let mut oa = vec![0.0; 150 * 2 * 11];
    kda_chunked(s, &q, &kk, &vv, &g, &beta, &mut sa, &mut oa);
    for &cut in &[1usize, 30, 64, 65, 129, 149] {
        let mut sb = st0.clone();
        let mut ob = vec![0.0; 150 * 2 * 11];
        for (a, b) in [(0, cut), (cut, 150)] {
            let sh = KdaShape { t: b - a, ..s };
            let (qk, vr, br) = (a * 18..b * 18, a * 22..b * 22, a * 2..b * 2);
            kda_chunked(
                sh,
                &q[qk.clone()],
                &kk[qk.clone()],
                &vv[vr.clone()],
                &g[qk],
                &beta[br],
                &mut sb,
                &mut ob[vr],
            );
        }
        assert!(max_abs_diff(&oa, &ob) < 2e-5, "cut {cut}");
        assert!(max_abs_diff(&sa, &sb) < 2e-5, "cut {cut} state");
    }
}

#[test]
fn latent_attention_matches_reference() {
    let mut rng = Rng::new(4);
    for &(tq, n_keys, block_rows) in &[
        (1usize, 1usize, 4usize),
        (1, 300, 64),
        (1, 1000, 100),
        (5, 5, 3),
        (7, 200, 50),
        (65, 70, 16),
    ] {
        let s = LatentAttnShape {
            h: 3,
            dk: 13,
            dv: 9,
        };
        let q = rng.vec(tq * s.h * s.dk, 2.0);
        let nblocks = n_keys.div_ceil(block_rows);
        let store = rng.vec(nblocks * block_rows * s.dk, 1.0);
        let blocks_f: Vec<&[f32]> = store.chunks(block_rows * s.dk).collect();
        let (mut o, mut orf) = (vec![0.0; tq * s.h * s.dv], vec![0.0; tq * s.h * s.dv]);
        latent_attention(s, &q, &blocks_f, block_rows, n_keys, 0.3, &mut o);
        latent_attention_reference(s, &q, &blocks_f, block_rows, n_keys, 0.3, &mut orf);
        assert!(
            max_abs_diff(&o, &orf) < 1e-5,
            "tq={tq} n={n_keys}: {}",
            max_abs_diff(&o, &orf)
        );
        let store_b: Vec<bf16> = store.iter().map(|&x| bf16::from_f32(x)).collect();
        let blocks_b: Vec<&[bf16]> = store_b.chunks(block_rows * s.dk).collect();
        latent_attention(s, &q, &blocks_b, block_rows, n_keys, 0.3, &mut o);
        latent_attention_reference(s, &q, &blocks_b, block_rows, n_keys, 0.3, &mut orf);
        assert!(max_abs_diff(&o, &orf) < 1e-5, "bf16 tq={tq} n={n_keys}");
        // An f32 store is read in place, a bf16 one widened into a tile first: the same values
        // stored either way give the same bits.
        let widened: Vec<f32> = store_b.iter().map(|x| x.to_f32()).collect();
        let blocks_w: Vec<&[f32]> = widened.chunks(block_rows * s.dk).collect();
        let mut ow = vec![0.0; tq * s.h * s.dv];
        latent_attention(s, &q, &blocks_w, block_rows, n_keys, 0.3, &mut ow);
        for (i, (a, b)) in o.iter().zip(&ow).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "tq={tq} n={n_keys} element {i}");
        }
    }
}

#[test]
fn conv_split_equals_one_call() {
    let mut rng = Rng::new(5);
    let (c, w, t) = (7, 4, 11);
    let x = rng.vec(t * c, 1.0);
    let wt = rng.vec(c * w, 1.0);
    let mut s1 = vec![0.0; (w - 1) * c];
    let mut o1 = vec![0.0; t * c];
    kl_kernels::conv1d::conv1d_causal_silu(&x, c, &wt, w, &mut s1, &mut o1);
    for cut in [1usize, 2, 5, 10] {
        let mut s2 = vec![0.0; (w - 1) * c];
        let mut o2 = vec![0.0; t * c];
        kl_kernels::conv1d::conv1d_causal_silu(
            &x[..cut * c],
            c,
            &wt,
            w,
            &mut s2,
            &mut o2[..cut * c],
        );
        // then one token at a time
        for ti in cut..t {
            kl_kernels::conv1d::conv1d_causal_silu(
                &x[ti * c..(ti + 1) * c],
                c,
                &wt,
                w,
                &mut s2,
                &mut o2[ti * c..(ti + 1) * c],
            );
        }
        assert!(max_abs_diff(&o1, &o2) < 1e-6, "cut {cut}");
        assert_eq!(s1, s2);
    }
}

/// Every output row computed alone (T = 1, the decode path) must equal, bitwise, the same row of
/// a many-row call (prefill path) and of calls under different thread counts.
#[test]
fn matmul_is_batch_invariant() {
    let mut rng = Rng::new(6);
    for &(k, n) in &[
        (1usize, 5usize),
        (7, 9),
        (64, 70),
        (203, 37),
        (1000, 130),
        (2100, 23),
    ] {
        let x = rng.vec(200 * k, 1.0);
        let wf = rng.vec(n * k, 1.0);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        fn check<W: kl_kernels::Elem>(x: &[f32], w: &[W], k: usize, n: usize) {
            // Row by row (gemv, T = 1).
            let mut single = vec![0f32; 200 * n];
            for t in 0..200 {
                matmul(
                    &x[t * k..(t + 1) * k],
                    w,
                    &mut single[t * n..(t + 1) * n],
                    1,
                    k,
                    n,
                );
            }
            for &t in &[2usize, 3, 4, 5, 8, 9, 37, 200] {
                for threads in [1usize, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut y = vec![0f32; t * n];
                    pool.install(|| matmul(&x[..t * k], w, &mut y, t, k, n));
                    for (i, (a, b)) in y.iter().zip(&single[..t * n]).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "k={k} n={n} T={t} threads={threads} element {i}: {a} vs {b}"
                        );
                    }
                }
            }
            // A block of W rows alone gives the same columns.
            if n > 4 {
                let (r0, r1) = (1, n - 2);
                let mut y = vec![0f32; 37 * (r1 - r0)];
                matmul(&x[..37 * k], &w[r0 * k..r1 * k], &mut y, 37, k, r1 - r0);
                for t in 0..37 {
                    for j in 0..r1 - r0 {
                        assert_eq!(
                            y[t * (r1 - r0) + j].to_bits(),
                            single[t * n + r0 + j].to_bits()
                        );
                    }
                }
            }
        }
        check(&x, &wb, k, n);
        check(&x, &wf, k, n);
        check(&x, &wh, k, n);
    }
}

/// Products large enough that decode reads each task's weights as three streams (tiles of rows
/// a third of a task apart, `matmul::StreamPlan`): every output row alone (T = 1) equals,
/// bitwise, the same row of a prefill and of the reference-ordered small tiles, on 1–3
/// threads, with the last task short and 0–2 rows left over after the thirds; and each output
/// is close to the reference's.
#[test]
fn matmul_decode_streams_keep_the_bits() {
    let mut rng = Rng::new(12);
    for &(k, n) in &[(1000usize, 4001usize), (1003, 4003), (397, 9002)] {
        let t = 9;
        let x = rng.vec(t * k, 1.0);
        let wf = rng.vec(n * k, 1.0);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        fn check<W: kl_kernels::Elem>(
            name: &str,
            x: &[f32],
            w: &[W],
            t: usize,
            k: usize,
            n: usize,
        ) {
            // The prefill path (T = 9 > 8) on the widest kernel: the canonical order.
            let mut full = vec![0f32; t * n];
            matmul(x, w, &mut full, t, k, n);
            let mut reference = vec![0f32; t * n];
            matmul_reference(x, w, &mut reference, t, k, n);
            assert!(
                max_abs_diff(&full, &reference) < 1e-4 * (k as f32).sqrt(),
                "{name}"
            );
            for threads in [1usize, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for r in 0..t {
                    let mut y = vec![0f32; n];
                    pool.install(|| matmul(&x[r * k..(r + 1) * k], w, &mut y, 1, k, n));
                    for (j, (a, b)) in y.iter().zip(&full[r * n..(r + 1) * n]).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{name} k={k} n={n} threads={threads} row {r} col {j}: decode {a} vs prefill {b}"
                        );
                    }
                }
            }
        }
        check("bf16", &x, &wb, t, k, n);
        check("f32", &x, &wf, t, k, n);
    }
}

/// Several one-row products at once (`matmul::gemv_many`, a layer's decode products read as
/// long streams across matrices): every output equals, bitwise, the same product run alone
/// through `matmul` with T = 1, on 1–3 threads and inside `par::serial`. The lists mix `K`s
/// (groups long enough for the streams and groups too short), odd `K`s (tails), matrices whose
/// rows a stream crosses from one to the next, shared and separate `x`s, empty products
/// (`N` = 0 and `K` = 0), more products than one batch holds, and the three stored dtypes.
#[test]
fn gemv_many_equals_each_product_alone() {
    use kl_kernels::matmul::gemv_many;
    let mut rng = Rng::new(31);
    // (K, N, which x: 0 the shared one of its K, 1 its own)
    let lists: Vec<Vec<(usize, usize, usize)>> = vec![
        // A MoE's gate/up of five experts (one x) then a short group of another K.
        vec![
            (1000, 517, 0),
            (1000, 517, 0),
            (1000, 515, 0),
            (1000, 2, 0),
            (1000, 521, 0),
            (1000, 519, 0),
            (1000, 1, 0),
            (1000, 520, 0),
            (64, 300, 1),
            (64, 301, 1),
        ],
        // Down products: each its own x, odd K, some tiny.
        vec![
            (515, 1003, 1),
            (515, 997, 1),
            (515, 3, 1),
            (515, 1000, 1),
            (515, 0, 1),
            (0, 7, 1),
            (515, 1001, 1),
        ],
        // One large product alone, and two that share nothing.
        vec![(1003, 4003, 0)],
        vec![(8, 5, 1), (9, 4, 1)],
        // More than one batch: 40 products of one K.
        (0..40).map(|i| (261, 100 + i, i % 2)).collect(),
    ];
    fn check<W: kl_kernels::Elem>(
        name: &str,
        rng: &mut Rng,
        list: &[(usize, usize, usize)],
        conv: fn(f32) -> W,
    ) {
        let shared: Vec<Vec<f32>> = (0..=1003).map(|k| rng.vec(k, 1.0)).collect();
        let own: Vec<Vec<f32>> = list.iter().map(|&(k, _, _)| rng.vec(k, 1.0)).collect();
        let ws: Vec<Vec<W>> = list
            .iter()
            .map(|&(k, n, _)| rng.vec(n * k, 1.0).into_iter().map(conv).collect())
            .collect();
        let xs: Vec<&[f32]> = list
            .iter()
            .enumerate()
            .map(|(i, &(k, _, which))| match which {
                0 => &shared[k][..],
                _ => &own[i][..],
            })
            .collect();
        let want: Vec<Vec<f32>> = list
            .iter()
            .enumerate()
            .map(|(i, &(k, n, _))| {
                let mut y = vec![f32::NAN; n];
                matmul(xs[i], &ws[i], &mut y, 1, k, n);
                y
            })
            .collect();
        for threads in [1usize, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for serial in [false, true] {
                let mut ys: Vec<Vec<f32>> =
                    list.iter().map(|&(_, n, _)| vec![f32::NAN; n]).collect();
                let mut jobs: Vec<(&[f32], &[W], &mut [f32])> = ys
                    .iter_mut()
                    .enumerate()
                    .map(|(i, y)| (xs[i], &ws[i][..], &mut y[..]))
                    .collect();
                pool.install(|| {
                    if serial {
                        kl_kernels::par::serial(|| gemv_many(&mut jobs[..]))
                    } else {
                        gemv_many(&mut jobs[..])
                    }
                });
                for (i, (y, w)) in ys.iter().zip(&want).enumerate() {
                    for (j, (a, b)) in y.iter().zip(w).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{name} {list:?} threads={threads} serial={serial} product {i} row {j}: \
                             together {a} vs alone {b}"
                        );
                    }
                }
            }
        }
    }
    for list in &lists {
        check("bf16", &mut rng, list, bf16::from_f32);
        check("f16", &mut rng, list, f16::from_f32);
        check("f32", &mut rng, list, |v| v);
    }
}

/// A product whose `W` does not hold `N·K` elements is refused, naming it.
#[test]
#[should_panic(expected = "product 1's W has 5 elements, expected N·K = 2·3")]
fn gemv_many_names_a_misshapen_product() {
    let (x, w0, w1) = ([1f32; 3], [bf16::ONE; 6], [bf16::ONE; 5]);
    let (mut y0, mut y1) = ([0f32; 2], [0f32; 2]);
    let mut jobs: [(&[f32], &[bf16], &mut [f32]); 2] = [(&x, &w0, &mut y0), (&x, &w1, &mut y1)];
    kl_kernels::matmul::gemv_many(&mut jobs[..]);
}

/// Chunked vs recurrent under decay regimes that stress the sub-chunk factorisation: no decay,
/// mild decays (the diagonal blocks factorised too), very strong decays down to −100 per token
/// (pairwise diagonal blocks, factors underflowing to 0), and mixtures per channel. Nothing may
/// overflow to inf/NaN and both forms must agree.
#[test]
fn kda_chunked_extreme_decays_match_recurrent() {
    let mut rng = Rng::new(7);
    type Gen = fn(&mut Rng, usize) -> f32;
    let regimes: [(&str, Gen); 9] = [
        ("zero", |_, _| 0.0),
        ("mild", |r, _| -(r.uniform() + 1.0) * 0.025),
        ("uniform to -100", |r, _| -(r.uniform() + 1.0) * 50.0),
        ("constant -100", |_, _| -100.0),
        ("mixed channels", |r, d| {
            if d % 3 == 0 {
                -100.0 + r.uniform()
            } else {
                -(r.uniform() + 1.0) * 0.01
            }
        }),
        ("steady -3.4 (factorised, cross-block underflow)", |r, _| {
            -3.4 + 0.01 * r.uniform()
        }),
        ("steady -3.9 (rows switch to pairwise)", |r, _| {
            -3.9 + 0.01 * r.uniform()
        }),
        ("rare huge", |r, _| {
            if r.uniform() > 0.95 {
                -100.0
            } else {
                -(r.uniform() + 1.0) * 0.5
            }
        }),
        (
            "mild with rare huge (rows switch path mid-chunk, earlier blocks matter)",
            |r, _| {
                if r.uniform() > 0.998 {
                    -100.0
                } else {
                    -(r.uniform() + 1.0) * 0.005
                }
            },
        ),
    ];
    for &(t, h, k, v) in &[(200usize, 2usize, 128usize, 128usize), (130, 3, 33, 17)] {
        let s = KdaShape::new(t, h, k, v);
        for (name, gen) in regimes {
            let [q, kk, vv, _, beta, st0] = kda_inputs(&mut rng, s);
            let g: Vec<f32> = (0..t * h * k).map(|i| gen(&mut rng, i % k)).collect();
            let (mut s1, mut s2) = (st0.clone(), st0.clone());
            let (mut o1, mut o2) = (vec![0.0; t * h * v], vec![0.0; t * h * v]);
            kda_chunked(s, &q, &kk, &vv, &g, &beta, &mut s1, &mut o1);
            kda_recurrent(s, &q, &kk, &vv, &g, &beta, &mut s2, &mut o2);
            assert!(
                o1.iter().chain(&s1).all(|x| x.is_finite()),
                "{name} {t}x{h}x{k}x{v}: non-finite chunked result"
            );
            let (od, sd) = (max_abs_diff(&o1, &o2), max_abs_diff(&s1, &s2));
            assert!(
                od < 2e-5 && sd < 2e-5,
                "{name} {t}x{h}x{k}x{v}: o {od:e} state {sd:e}"
            );
            let mut s3 = st0.clone();
            kda_chunked_state(s, &kk, &vv, &g, &beta, &mut s3);
            assert!(
                s1.iter().zip(&s3).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {t}x{h}x{k}x{v}: the state-only form differs from kda_chunked's state"
            );
        }
    }
}

/// Output row `i` of a chunk depends only on rows `≤ i` of that chunk, bit for bit: recomputing
/// a partial chunk from its start with more rows (what the layers crate does for split prefill)
/// reproduces the earlier rows exactly, whatever the decay regime of the later rows.
#[test]
fn kda_chunked_rows_are_causal_bitwise() {
    let mut rng = Rng::new(8);
    for &(h, k, v) in &[(2usize, 128usize, 128usize), (3, 33, 17)] {
        let t = 64 + 50;
        let s = KdaShape::new(t, h, k, v);
        let [q, kk, vv, _, beta, st0] = kda_inputs(&mut rng, s);
        // Mild decays, with a burst of very strong ones on some rows of the partial chunk (so
        // that later rows take other paths than earlier ones of the same sub-chunk).
        let g: Vec<f32> = (0..t * h * k)
            .map(|i| {
                let row = i / (h * k);
                if row % 16 == 9 || row == 64 + 37 {
                    -70.0 + rng.uniform()
                } else {
                    -(rng.uniform() + 1.0) * 0.3
                }
            })
            .collect();
        let mut full_state = st0.clone();
        let mut full = vec![0.0; t * h * v];
        kda_chunked(s, &q, &kk, &vv, &g, &beta, &mut full_state, &mut full);
        for n in [1usize, 5, 9, 10, 16, 17, 37, 38, 49] {
            let tt = 64 + n;
            let sp = KdaShape { t: tt, ..s };
            let (a, b) = (tt * h * k, tt * h);
            let mut st = st0.clone();
            let mut o = vec![0.0; tt * h * v];
            kda_chunked(
                sp,
                &q[..a],
                &kk[..a],
                &vv[..tt * h * v],
                &g[..a],
                &beta[..b],
                &mut st,
                &mut o,
            );
            for (i, (x, y)) in o.iter().zip(&full).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{h}x{k}x{v}: prefix of {tt} rows, element {i}: {x} vs {y}"
                );
            }
        }
    }
}

/// Inside `par::serial` (one thread, tasks in order, next panel prefetched) a product gives the
/// bits of the pool-parallel one, on shapes with several panels and a ragged last one.
#[test]
fn matmul_serial_equals_parallel_bitwise() {
    let mut rng = Rng::new(21);
    // The last: more x rows than a slice task takes (whole panels, in both runs on up to two
    // threads).
    for (t, k, n) in [
        (9, 33, 7),
        (37, 130, 401),
        (70, 1000, 200),
        (300, 1000, 200),
    ] {
        let x = rng.vec(t * k, 1.0);
        let w: Vec<bf16> = rng
            .vec(n * k, 0.1)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
        matmul(&x, &w, &mut a, t, k, n);
        kl_kernels::par::serial(|| matmul(&x, &w, &mut b, t, k, n));
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "T={t} K={k} N={n}"
        );
        let mut r = vec![0f32; t * n];
        matmul_reference(&x, &w, &mut r, t, k, n);
        assert!(max_abs_diff(&a, &r) < 1e-3, "T={t} K={k} N={n}");
    }
}
