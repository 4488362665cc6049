//! A query's attention output does not depend on how many queries share the call or on the
//! thread count (fixed key segments merged in order).

mod common;
use common::Rng;
use kl_kernels::attention::{latent_attention, LatentAttnShape, QBLOCK, SEGMENT};

/// Prefill runs its queries in blocks that share each widened key tile (`QBLOCK`); every shape
/// here has a last block that is not full, storage blocks that end inside tiles and segments,
/// and queries whose limits end inside tiles.
#[test]
fn prefill_rows_equal_single_query_calls_bitwise() {
    for (h, dk, dv, block_rows, tq) in [
        (2, 20, 16, 256, 40),
        (5, 40, 32, 100, 41),
        (16, 96, 64, 77, 3 * QBLOCK + 2),
    ] {
        prefill_rows_equal_single_query_calls(LatentAttnShape { h, dk, dv }, block_rows, tq);
    }
}

fn prefill_rows_equal_single_query_calls(s: LatentAttnShape, block_rows: usize, tq: usize) {
    let mut rng = Rng::new(11);
    let n_keys = 2 * SEGMENT + 300;
    let store = rng.vec(n_keys.div_ceil(block_rows) * block_rows * s.dk, 1.0);
    let blocks: Vec<&[f32]> = store.chunks(block_rows * s.dk).collect();
    let q = rng.vec(tq * s.h * s.dk, 1.5);
    let mut all = vec![0f32; tq * s.h * s.dv];
    latent_attention(s, &q, &blocks, block_rows, n_keys, 0.2, &mut all);
    for threads in [1usize, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for i in 0..tq {
                let mut one = vec![0f32; s.h * s.dv];
                let lim = n_keys - tq + i + 1;
                latent_attention(
                    s,
                    &q[i * s.h * s.dk..(i + 1) * s.h * s.dk],
                    &blocks,
                    block_rows,
                    lim,
                    0.2,
                    &mut one,
                );
                assert_eq!(
                    one,
                    all[i * s.h * s.dv..(i + 1) * s.h * s.dv],
                    "query {i}, {threads} threads, {s:?}, block rows {block_rows}"
                );
            }
        });
    }
}

#[test]
fn real_width_rows_match_reference() {
    use kl_kernels::attention::latent_attention_reference;
    let mut rng = Rng::new(12);
    // The released model's row (R 512 + P 64), odd head count and key counts.
    let s = LatentAttnShape {
        h: 5,
        dk: 576,
        dv: 512,
    };
    let block_rows = 256;
    for &(tq, n_keys) in &[(1usize, 1usize), (1, 77), (3, 300), (1, 1500)] {
        let store = rng.vec(n_keys.div_ceil(block_rows) * block_rows * s.dk, 1.0);
        let blocks: Vec<&[f32]> = store.chunks(block_rows * s.dk).collect();
        let q = rng.vec(tq * s.h * s.dk, 0.2);
        let (mut o, mut r) = (vec![0f32; tq * s.h * s.dv], vec![0f32; tq * s.h * s.dv]);
        latent_attention(s, &q, &blocks, block_rows, n_keys, 0.0417, &mut o);
        latent_attention_reference(s, &q, &blocks, block_rows, n_keys, 0.0417, &mut r);
        let d = common::max_abs_diff(&o, &r);
        assert!(d < 1e-5, "tq={tq} n={n_keys}: {d}");
    }
}

/// Decode past one wave of segments (`WAVE`), and past two with a partial last wave: the single
/// query's output equals the same query's row in a prefill call (which merges its segments one
/// by one) bit for bit, on 1 and 3 threads, and the plain twin to f32 rounding; the same over
/// the rows stored as bf16 (the bf16 products).
#[test]
fn decode_across_waves_equals_prefill_bitwise() {
    use kl_kernels::attention::{latent_attention_reference, WAVE};
    use kl_kernels::Elem;
    let mut rng = Rng::new(13);
    let s = LatentAttnShape {
        h: 3,
        dk: 24,
        dv: 16,
    };
    let block_rows = 256;
    // The last query's row of a two-query prefill, checked against that query decoded alone
    // on 1 and 3 threads.
    fn last_row<C: Elem>(
        s: LatentAttnShape,
        q: &[f32],
        blocks: &[&[C]],
        block_rows: usize,
        n_keys: usize,
    ) -> Vec<f32> {
        let mut pre = vec![0f32; 2 * s.h * s.dv];
        latent_attention(s, q, blocks, block_rows, n_keys, 0.3, &mut pre);
        let want = pre[s.h * s.dv..].to_vec();
        for threads in [1usize, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut one = vec![0f32; s.h * s.dv];
            let last = &q[s.h * s.dk..];
            pool.install(|| latent_attention(s, last, blocks, block_rows, n_keys, 0.3, &mut one));
            assert_eq!(one, want, "{n_keys} keys, {threads} threads");
        }
        want
    }
    for n_keys in [WAVE * SEGMENT + 1, 2 * WAVE * SEGMENT + 700] {
        let store = rng.vec(n_keys.div_ceil(block_rows) * block_rows * s.dk, 1.0);
        let blocks: Vec<&[f32]> = store.chunks(block_rows * s.dk).collect();
        let q = rng.vec(2 * s.h * s.dk, 1.5);
        let want = last_row(s, &q, &blocks, block_rows, n_keys);
        let mut r = vec![0f32; s.h * s.dv];
        let last = &q[s.h * s.dk..];
        latent_attention_reference(s, last, &blocks, block_rows, n_keys, 0.3, &mut r);
        let d = common::max_abs_diff(&want, &r);
        assert!(d < 1e-4, "{n_keys} keys: reference differs by {d}");
        // The same rows stored as bf16 take the bf16 products, with the same wave logic.
        let store16: Vec<half::bf16> = store.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let blocks16: Vec<&[half::bf16]> = store16.chunks(block_rows * s.dk).collect();
        let want16 = last_row(s, &q, &blocks16, block_rows, n_keys);
        let d = common::max_abs_diff(&want16, &want);
        assert!(
            d < 1e-2,
            "{n_keys} keys: bf16 products differ from f32 by {d}"
        );
    }
}

/// A bf16 store whose rows do not split into column pairs (odd `Dk`) runs the f32 products,
/// read in place or widened into a tile, and gives exactly the bits of an f32 store holding
/// the same values: odd head counts, storage blocks that end inside tiles, decode and prefill.
#[test]
fn bf16_store_with_odd_width_equals_its_f32_widening_bitwise() {
    use half::bf16;
    let mut rng = Rng::new(14);
    for (h, dk, dv, block_rows) in [(3, 41, 32, 100), (9, 23, 16, 64), (1, 9, 8, 13)] {
        let s = LatentAttnShape { h, dk, dv };
        let n_keys = SEGMENT + 141;
        let wide = common::bf16_rows(&mut rng, n_keys.div_ceil(block_rows) * block_rows, dk);
        let narrow: Vec<f32> = wide.iter().map(|x| x.to_f32()).collect();
        let bf: Vec<&[bf16]> = wide.chunks(block_rows * dk).collect();
        let f: Vec<&[f32]> = narrow.chunks(block_rows * dk).collect();
        for tq in [1usize, QBLOCK + 1] {
            let q = rng.vec(tq * h * dk, 1.5);
            let mut a = vec![0f32; tq * h * dv];
            let mut b = vec![0f32; tq * h * dv];
            latent_attention(s, &q, &bf, block_rows, n_keys, 0.2, &mut a);
            latent_attention(s, &q, &f, block_rows, n_keys, 0.2, &mut b);
            assert!(a.iter().all(|x| x.is_finite()));
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{s:?}, {tq} queries, block rows {block_rows}");
        }
    }
}

/// A bf16 store with whole column pairs runs the bf16 products (`attention_bf16`): the query
/// and the probabilities rounded to bf16. Against the plain twin given the rounded query (so
/// that only the probabilities' rounding and the order of the sums differ), each output is
/// within 1e-3 (the values lie in ±1; measured 0.4–1.3e-4); decode and prefill agree bit for bit (prefill rows against
/// single-query calls); odd head counts around the 16-head groups, `mini`'s and the released
/// model's rows, widths with pair tails, storage blocks that end inside tiles.
#[test]
fn bf16_store_runs_bf16_products() {
    use half::bf16;
    use kl_kernels::attention::latent_attention_reference;
    use kl_kernels::attention_bf16::round_f32;
    let mut rng = Rng::new(15);
    for (h, dk, dv, block_rows) in [
        (16, 288, 256, 77),
        (17, 576, 512, 256),
        (33, 64, 48, 100),
        (3, 40, 32, 100),
        (9, 24, 16, 64),
        (5, 46, 40, 77),
        (1, 2, 2, 13),
    ] {
        let s = LatentAttnShape { h, dk, dv };
        let n_keys = SEGMENT + 141;
        let store = common::bf16_rows(&mut rng, n_keys.div_ceil(block_rows) * block_rows, dk);
        let blocks: Vec<&[bf16]> = store.chunks(block_rows * dk).collect();
        let tq = QBLOCK + 1;
        // Small queries keep the softmax spread over many keys.
        let q = rng.vec(tq * h * dk, 0.3);
        let mut got = vec![0f32; tq * h * dv];
        latent_attention(s, &q, &blocks, block_rows, n_keys, 0.2, &mut got);
        let qr: Vec<f32> = q.iter().map(|&x| round_f32(x)).collect();
        let mut want = vec![0f32; tq * h * dv];
        latent_attention_reference(s, &qr, &blocks, block_rows, n_keys, 0.2, &mut want);
        let d = common::max_abs_diff(&got, &want);
        assert!(d <= 1e-3, "{s:?}: {d}");
        for i in [0, tq - 1] {
            let mut one = vec![0f32; h * dv];
            let lim = n_keys - tq + i + 1;
            let qi = &q[i * h * dk..(i + 1) * h * dk];
            latent_attention(s, qi, &blocks, block_rows, lim, 0.2, &mut one);
            assert_eq!(one, got[i * h * dv..(i + 1) * h * dv], "{s:?}, query {i}");
        }
    }
}
