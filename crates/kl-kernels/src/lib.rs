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
//! **CPU features** are detected once at run time ([`cpu::features`]); one binary uses AVX2+FMA
//! where present and falls back to portable code elsewhere (including aarch64).
#![deny(missing_docs)]

pub mod activation;
pub mod attention;
pub mod conv1d;
pub mod cpu;
mod dense;
pub mod elem;
pub mod fp8;
pub mod kda;
pub mod matmul;
pub mod norm;
pub mod roofline;
pub mod simd;

pub use elem::Elem;
