//! # kl-weights — safetensors checkpoints, mapped in place and checked against the config
//!
//! A Kimi Linear checkpoint is a directory of safetensors files (one `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`) whose tensor names and shapes follow the HF
//! remote-code modules (`../shared/docs/kimi-linear-spec.md` §3). This crate does three things:
//!
//! 1. **Load** ([`Checkpoint::open`]). Each file is memory-mapped once and shared through an
//!    `Arc`; a [`Tensor`] is a name, a dtype, a shape and a byte range of that map. Nothing is
//!    read or copied at open time beyond the headers, and typed views
//!    ([`Tensor::as_bf16`], [`Tensor::as_f32`], …) reinterpret the mapped bytes in place —
//!    this is what *zero-copy* means here. The single exception is a tensor whose offset in its
//!    file is not a multiple of its element size: it is copied, alone and in its stored dtype,
//!    into an aligned buffer. Each tensor keeps the dtype its header declares (BF16, F16 or F32;
//!    anything else is refused); nothing is upcast except by the explicit
//!    [`Tensor::to_f32_vec`]. On Linux each map asks for 2 MiB pages (`MADV_HUGEPAGE`; the
//!    variable `KL_NO_HUGEPAGE` turns that off): pages read from disk through the map then come
//!    in 2 MiB folios, which decode streams faster. Pages already cached keep their size, so
//!    [`evict_from_page_cache`] (which `synth` runs on the files it writes) lets a file just
//!    written be mapped that way on its next load.
//! 2. **Validate** ([`Checkpoint::validate`]) against the inventory a [`kl_config::ModelConfig`]
//!    implies ([`expected_tensors`]): one error lists every missing, unexpected and wrong-shaped
//!    tensor, so a mismatched checkpoint is diagnosed in one run.
//! 3. **Write** ([`write_checkpoint`]) safetensors files from a callback, shard by shard and
//!    piece by piece with bounded memory, and **synthesize** complete random model directories
//!    ([`synth_checkpoint`]) for tests and benchmarks.
//!
//! ## What this crate deliberately does not do
//!
//! No format adaptation happens here: conv weights stay `[P, 1, W]`, `A_log` stays
//! `[1, 1, H, 1]`, `kv_b_proj` is not split, experts are not stacked, bf16 is not converted.
//! The layer code that consumes a tensor decides how to view or prepare it, so this crate stays
//! a faithful, cheap window onto the files.
//!
//! ## Errors
//!
//! Every failure is a [`WeightsError`] whose message names the file and, where one is involved,
//! the tensor: a file shorter than 8 bytes, a header length past the end of the file, a header
//! that is not JSON, offsets past the end, a byte length that disagrees with dtype × shape, an
//! unsupported dtype, a tensor in two shards, an index naming a missing shard, a path that does
//! not exist, a directory without safetensors. Malformed input never panics.
#![deny(missing_docs)]

mod checkpoint;
mod error;
mod header;
mod inventory;
mod page_cache;
mod synth;
mod synth_tokenizer;
mod tensor;
mod writer;

pub use checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE};
pub use error::{Problem, WeightsError};
pub use inventory::{expected_tensors, TensorSpec};
pub use page_cache::evict_from_page_cache;
pub use synth::{synth_checkpoint, SynthReport, BLOCK, PAR_BLOCKS};
pub use tensor::{Dtype, Tensor};
pub use writer::{shard_file_name, write_checkpoint, Sink};
