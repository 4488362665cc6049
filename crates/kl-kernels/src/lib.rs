//! # kl-kernels — pure functions over slices
//!
//! Every numeric operation the Kimi Linear forward pass needs, as plain functions over `&[f32]`
//! (activations) and `&[W]` (weights in their stored dtype: f32, bf16 or f16). Nothing here knows
//! about Kimi, safetensors or config files; the layers crate binds weights to these kernels.
//!
//! **Reference twins.** Each optimized kernel has a `*_reference` twin with the same signature:
//! a direct transcription of the math, used by the tests (`tests/`) on random inputs at odd sizes
//! so that SIMD tails and block edges are exercised.
//!
//! **Dimension legend** (PyTorch order in shape comments): `T` tokens, `H` heads, `K` key width,
//! `V` value width, `D` model width, `N` output rows of a weight matrix.
//!
//! **Numerics.** All accumulation is f32. Weights are converted element by element (bf16 → f32 is
//! exact), never materialised as whole f32 copies: [`matmul`] converts a panel of rows at a time.
//!
//! **Batch invariance.** [`matmul`] accumulates every output element in one canonical order
//! (8 lanes over `K`, fixed tail and lane-sum order) in both its decode and prefill paths, so
//! `y[t, n]` is bit-identical whatever the number of rows, the tiling or the thread count: a
//! prompt prefilled in pieces gives the same bits as one prefill (unless the opt-in [`amx`]
//! kernel is switched on: same precision, another summation order; or the opt-in
//! [`bf16_activations`], which also rounds the activations to bf16). [`kda::kda_chunked`] makes
//! every output row of a chunk depend only on the rows before it (bitwise), so a partial chunk
//! recomputed with more rows reproduces its earlier rows.
//!
//! **Speed.** The compute-bound kernels are register-blocked (prefill matmul: 6 × 4 tiles of
//! row-pair 16-lane accumulators on AVX-512, 4 × 3 tiles of 8-lane ones on AVX2, over an
//! L2-resident f32 panel, K-blocked for L1; KDA: 8 × 32 / 6 × 16 tiles of small dense products,
//! see the private `dense` module; latent attention: head-pair × key blocks over f32 keys,
//! 16 heads × 16 keys of `vdpbf16ps` products over a bf16 cache ([`attention_bf16`]; the
//! expanded prefill form's blocks the same way, 16 queries to a register, [`expanded_bf16`]), or
//! AMX tiles with the opt-in switch, [`amx_attention`]); decode matmul
//! streams bf16 weights in register-width groups with software prefetch. [`roofline`] measures
//! the machine's FMA peak (at the widest ISA in use) and read bandwidth so that
//! `cargo bench -p kl-kernels` can quote each kernel as a fraction of it.
//!
//! **CPU features** are detected once at run time ([`cpu::features`]); one binary uses AVX-512F
//! (with AVX512-BF16 for bf16 attention products) or AVX2+FMA where present and falls back to
//! portable code elsewhere (including aarch64). Every AVX-512 kernel computes exactly the bits of
//! its AVX2 twin (each 16-lane register holds two 8-lane accumulators), and the AVX512-BF16
//! products exactly those of their FMA emulation, so `KL_NO_AVX512=1` and
//! `KL_NO_AVX512BF16=1` change speed only.
#![deny(missing_docs)]

pub mod activation;
pub mod amx;
pub mod amx_attention;
pub mod attention;
pub mod attention_bf16;
pub mod bf16_activations;
pub mod conv1d;
pub mod cpu;
mod dense;
pub mod elem;
pub mod expanded_bf16;
pub mod fp8;
pub mod kda;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod roofline;
pub mod simd;
pub mod transpose;

pub use elem::Elem;

/// Deterministic test inputs shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// One xorshift step of the state `s` (start from an odd seed), returning the new state.
    pub(crate) fn next(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// `n` xorshift values, uniform in `[-scale/2, scale/2)`.
    pub(crate) fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| ((next(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
            .collect()
    }
}
