//! The AVX-512 attention kernels give exactly the AVX2 kernels' bits (one test in its own binary:
//! it switches the kernels process-wide).

mod common;
use common::Rng;
use half::bf16;
use kl_kernels::attention::{latent_attention, set_wide_kernels, LatentAttnShape, SEGMENT};

#[test]
fn avx512_and_avx2_kernels_agree_bitwise() {
    eprintln!(
        "cpu: {} (without AVX-512 both runs take the same path)",
        kl_kernels::cpu::describe()
    );
    let mut rng = Rng::new(21);
    // Odd head counts (a half-empty head pair), widths with tails past the 8-, 16- and 32-lane
    // blocks, the released model's row, key counts past several segments and partial tiles.
    for &(h, dk, dv) in &[
        (7usize, 44usize, 40usize),
        (3, 20, 17),
        (5, 576, 512),
        (2, 8, 8),
    ] {
        let s = LatentAttnShape { h, dk, dv };
        let block_rows = 256;
        let n_keys = 2 * SEGMENT + 77;
        let store: Vec<bf16> = rng
            .vec(n_keys.div_ceil(block_rows) * block_rows * dk, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let blocks: Vec<&[bf16]> = store.chunks(block_rows * dk).collect();
        for tq in [1usize, 6] {
            let q = rng.vec(tq * h * dk, 1.5);
            let run = |wide: bool| {
                set_wide_kernels(wide);
                let mut o = vec![0f32; tq * h * dv];
                latent_attention(s, &q, &blocks, block_rows, n_keys, 0.15, &mut o);
                o
            };
            let (a, b) = (run(true), run(false));
            set_wide_kernels(true);
            assert!(a.iter().all(|x| x.is_finite()));
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "h {h} dk {dk} dv {dv} tq {tq}: the two paths differ");
        }
    }
}
