//! Latent attention on AMX tiles (`--amx`): against the plain reference at odd sizes, and the
//! same bits for a query whether it is decoded (segments in parallel) or prefilled with others.
//! Its own test binary, because enabling the tiles is process-wide. On a machine without AMX
//! there is nothing to run: the FMA kernels, tested elsewhere, serve instead.

mod common;
use common::{max_abs_diff, Rng};
use half::bf16;
use kl_kernels::attention::{
    latent_attention, latent_attention_reference, LatentAttnShape, SEGMENT,
};

fn tiles_or_skip(test: &str) -> bool {
    if kl_kernels::amx::set_enabled(true) {
        return true;
    }
    eprintln!("{test}: no AMX-BF16 here; the FMA kernels serve instead");
    false
}

fn bf16_store(rng: &mut Rng, rows: usize, dk: usize) -> Vec<bf16> {
    rng.vec(rows * dk, 1.5)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// Shapes the tile kernel takes (16, 32 and 48 heads; the released row of 576 with values of
/// 512), key counts with partial 32- and 64-key blocks and several segments, storage blocks
/// that split the kernel's blocks (7 and 100 rows), and prefill with several queries.
#[test]
fn amx_latent_attention_matches_reference() {
    if !tiles_or_skip("amx_latent_attention_matches_reference") {
        return;
    }
    let mut rng = Rng::new(21);
    for (h, dk, dv) in [(16, 64, 64), (32, 96, 64), (48, 576, 512)] {
        let s = LatentAttnShape { h, dk, dv };
        for (tq, n_keys, block_rows) in [
            (1usize, 1usize, 4usize),
            (1, 33, 7),
            (1, 2500, 256),
            (3, 1100, 100),
            (2, 130, 256),
        ] {
            let store = bf16_store(&mut rng, n_keys.div_ceil(block_rows) * block_rows, dk);
            let blocks: Vec<&[bf16]> = store.chunks(block_rows * dk).collect();
            let q = rng.vec(tq * h * dk, 1.0);
            let (mut o, mut r) = (vec![f32::NAN; tq * h * dv], vec![0f32; tq * h * dv]);
            let scale = (dk as f32).powf(-0.5);
            latent_attention(s, &q, &blocks, block_rows, n_keys, scale, &mut o);
            latent_attention_reference(s, &q, &blocks, block_rows, n_keys, scale, &mut r);
            let err = max_abs_diff(&o, &r);
            assert!(
                err < 2e-6,
                "H={h} Dk={dk} Dv={dv}, {tq} queries, {n_keys} keys in blocks of {block_rows}: {err:e}"
            );
        }
    }
}

/// Under AMX, every query still attends in the same fixed segments with the same code, so a
/// query's output has the same bits alone (decode: segments in parallel) or among others
/// (prefill: segments in order).
#[test]
fn amx_decode_equals_prefill_rows_bitwise() {
    if !tiles_or_skip("amx_decode_equals_prefill_rows_bitwise") {
        return;
    }
    let mut rng = Rng::new(22);
    let s = LatentAttnShape {
        h: 16,
        dk: 96,
        dv: 64,
    };
    let (block_rows, n_keys, tq) = (256, 2 * SEGMENT + 300, 5);
    let store = bf16_store(&mut rng, n_keys.div_ceil(block_rows) * block_rows, s.dk);
    let blocks: Vec<&[bf16]> = store.chunks(block_rows * s.dk).collect();
    let q = rng.vec(tq * s.h * s.dk, 1.0);
    let mut all = vec![0f32; tq * s.h * s.dv];
    latent_attention(s, &q, &blocks, block_rows, n_keys, 0.1, &mut all);
    for i in 0..tq {
        let mut one = vec![0f32; s.h * s.dv];
        let lim = n_keys - tq + i + 1;
        let qi = &q[i * s.h * s.dk..(i + 1) * s.h * s.dk];
        latent_attention(s, qi, &blocks, block_rows, lim, 0.1, &mut one);
        assert_eq!(one, all[i * s.h * s.dv..(i + 1) * s.h * s.dv], "query {i}");
    }
}
