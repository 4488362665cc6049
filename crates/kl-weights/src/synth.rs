//! Synthetic checkpoints: a complete model directory (config, weights, tokenizer, chat template)
//! with random weights, for tests, benchmarks and demos when the real weights are not at hand.
//!
//! Every command of the engine works on the result; the model is meaningless as a language model.
//!
//! Initialisation (chosen so activations stay O(1), as in the golden tiny model; uniform
//! distributions with the stated standard deviation, which are cheap to draw):
//! - linear weights: std `1/sqrt(fan_in)` with `fan_in` the last dimension; conv weights
//!   `[P, 1, W]`: std `1/sqrt(W)`; `model.embed_tokens.weight`: std 1;
//! - norm weights (`*norm.weight`): `1 ± 0.1`;
//! - `A_log = ln U(1, 16)`; `dt_bias = softplus⁻¹(dt)` with `dt` log-uniform in `[1e-3, 1e-1]`;
//! - `e_score_correction_bias`: std 0.1.
//!
//! Determinism: each tensor is cut into blocks of [`BLOCK`] elements, and block `b` of tensor
//! `name` draws from a ChaCha8 stream keyed by FNV-1a(`seed`, `name`) with stream number `b`. Blocks
//! are generated in parallel (rayon) but written in order, so the bytes depend only on the seed
//! and the config, never on thread scheduling; memory stays below [`PAR_BLOCKS`] blocks.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use kl_config::{ModelConfig, RawConfig, TokenIds};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::WeightsError;
use crate::inventory::{expected_tensors, TensorSpec};
use crate::synth_tokenizer::{
    ordinary_tokens, tiktoken_model, tokenizer_config_json, CHAT_TEMPLATE,
};
use crate::tensor::Dtype;
use crate::writer::{write_checkpoint, Sink};

/// Elements per RNG block (and per written piece).
pub const BLOCK: usize = 1 << 20;
/// Blocks generated in parallel before they are written (≤ 64 MiB of f32 in flight).
pub const PAR_BLOCKS: usize = 16;

/// What [`synth_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The output directory.
    pub dir: PathBuf,
    /// Every file written: `config.json`, the tokenizer files, the safetensors shards and index.
    pub files: Vec<PathBuf>,
    /// Number of tensors.
    pub num_tensors: usize,
    /// Number of parameters.
    pub num_params: u64,
    /// Bytes of tensor data (headers excluded).
    pub tensor_bytes: u64,
    /// Size of all files written.
    pub total_bytes: u64,
    /// The number of ordinary token ranks `N = vocab_size - 256`; specials start at `N`.
    pub num_ranks: usize,
}

/// How one tensor is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// `center + U(-half_width, half_width)`.
    Uniform { center: f32, half_width: f32 },
    /// `ln U(1, 16)`.
    ALog,
    /// `softplus⁻¹(dt)`, `dt` log-uniform in `[1e-3, 1e-1]`.
    DtBias,
}

/// Uniform half-width for a standard deviation.
fn hw(std: f32) -> f32 {
    std * 3f32.sqrt()
}

fn init_for(spec: &TensorSpec) -> Init {
    let n = spec.name.as_str();
    let last = *spec.shape.last().unwrap_or(&1) as f32;
    if n.ends_with("A_log") {
        Init::ALog
    } else if n.ends_with("dt_bias") {
        Init::DtBias
    } else if n.ends_with("e_score_correction_bias") {
        Init::Uniform {
            center: 0.0,
            half_width: hw(0.1),
        }
    } else if n.ends_with("norm.weight") {
        Init::Uniform {
            center: 1.0,
            half_width: 0.1,
        }
    } else if n == "model.embed_tokens.weight" {
        Init::Uniform {
            center: 0.0,
            half_width: hw(1.0),
        }
    } else {
        // Linear weights [out, in] and conv weights [P, 1, W]: fan-in is the last dimension.
        Init::Uniform {
            center: 0.0,
            half_width: hw(1.0 / last.max(1.0).sqrt()),
        }
    }
}

/// 64-bit FNV-1a of the seed and the tensor name: a stable per-tensor RNG key.
fn stream_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in seed.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn sample(init: Init, rng: &mut ChaCha8Rng) -> f32 {
    let u: f32 = rng.gen();
    match init {
        Init::Uniform { center, half_width } => center + (2.0 * u - 1.0) * half_width,
        Init::ALog => (1.0 + 15.0 * u).ln(),
        Init::DtBias => {
            let (lo, hi) = (1e-3f64.ln(), 1e-1f64.ln());
            let dt = (lo + f64::from(u) * (hi - lo)).exp();
            // softplus⁻¹(y) = y + ln(1 - e^-y) = y + ln(-expm1(-y))
            (dt + (-(-dt).exp_m1()).ln()) as f32
        }
    }
}

/// Little-endian bytes of block `b` of `spec`.
fn gen_block(spec: &TensorSpec, init: Init, key: u64, b: usize) -> Vec<u8> {
    let start = b * BLOCK;
    let len = BLOCK.min(spec.numel() - start);
    let mut rng = ChaCha8Rng::seed_from_u64(key);
    rng.set_stream(b as u64);
    let mut out = Vec::with_capacity(len * spec.dtype.size());
    for _ in 0..len {
        let x = sample(init, &mut rng);
        match spec.dtype {
            Dtype::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    out
}

/// Emit the deterministic random contents of `spec` into `sink`, block by block.
fn fill_tensor(spec: &TensorSpec, seed: u64, sink: &mut Sink<'_>) -> io::Result<()> {
    let init = init_for(spec);
    let key = stream_key(seed, &spec.name);
    let blocks = spec.numel().div_ceil(BLOCK);
    for first in (0..blocks).step_by(PAR_BLOCKS) {
        let last = blocks.min(first + PAR_BLOCKS);
        if last - first == 1 {
            sink(&gen_block(spec, init, key, first))?;
        } else {
            let pieces: Vec<Vec<u8>> = (first..last)
                .into_par_iter()
                .map(|b| gen_block(spec, init, key, b))
                .collect();
            for p in &pieces {
                sink(p)?;
            }
        }
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, files: &mut Vec<PathBuf>) -> Result<(), WeightsError> {
    fs::write(path, text).map_err(|e| WeightsError::io(path, e))?;
    files.push(path.to_path_buf());
    Ok(())
}

/// Write a synthetic checkpoint for `cfg_raw` into `out` (created if needed): `config.json`,
/// `tiktoken.model`, `tokenizer_config.json`, `chat_template.jinja` and the weights (sharded when
/// they exceed `max_shard_bytes`). The same config and seed always give the same bytes.
/// The weight files are written to disk and dropped from the page cache
/// ([`crate::evict_from_page_cache`]), so that the first load maps them in 2 MiB pages.
///
/// The written config differs from `cfg_raw` only in its token ids: with `N = vocab_size - 256`
/// ordinary ranks, `bos_token_id = N` (`[BOS]`), `eos_token_id = N + 2` (`<|im_end|>`, so
/// generation stops at the end of a chat turn) and `pad_token_id = N + 255` (`[PAD]`).
/// `vocab_size` must be at least 512 (256 byte tokens plus 256 special ids).
pub fn synth_checkpoint(
    cfg_raw: &RawConfig,
    out: &Path,
    seed: u64,
    max_shard_bytes: u64,
) -> Result<SynthReport, WeightsError> {
    if cfg_raw.vocab_size < 512 {
        return Err(WeightsError::Synth {
            field: "vocab_size".into(),
            value: cfg_raw.vocab_size.to_string(),
            message: "a synthetic checkpoint needs at least 512 (256 single-byte ranks plus 256 special-token ids)"
                .into(),
        });
    }
    let n = cfg_raw.vocab_size - 256;
    let mut raw = cfg_raw.clone();
    raw.bos_token_id = Some(n as i64);
    raw.eos_token_id = Some(TokenIds::One(n as i64 + 2));
    raw.pad_token_id = Some(n as i64 + 255);
    let cfg = ModelConfig::from_raw(raw.clone())?;

    fs::create_dir_all(out).map_err(|e| WeightsError::io(out, e))?;
    let mut files = Vec::new();
    write_file(
        &out.join("config.json"),
        &(raw.to_json() + "\n"),
        &mut files,
    )?;
    write_file(
        &out.join("tiktoken.model"),
        &tiktoken_model(&ordinary_tokens(n)),
        &mut files,
    )?;
    write_file(
        &out.join("tokenizer_config.json"),
        &tokenizer_config_json(n),
        &mut files,
    )?;
    write_file(&out.join("chat_template.jinja"), CHAT_TEMPLATE, &mut files)?;

    let specs = expected_tensors(&cfg);
    files.extend(write_checkpoint(
        out,
        &specs,
        max_shard_bytes,
        None,
        |spec, sink| fill_tensor(spec, seed, sink),
    )?);

    let mut total_bytes = 0;
    for f in &files {
        total_bytes += fs::metadata(f).map_err(|e| WeightsError::io(f, e))?.len();
        // The first load then maps the weights in 2 MiB pages, not the written 4 KiB ones.
        if f.extension().is_some_and(|e| e == "safetensors") {
            crate::evict_from_page_cache(f)?;
        }
    }
    Ok(SynthReport {
        dir: out.to_path_buf(),
        files,
        num_tensors: specs.len(),
        num_params: specs.iter().map(|s| s.numel() as u64).sum(),
        tensor_bytes: specs.iter().map(TensorSpec::nbytes).sum(),
        total_bytes,
        num_ranks: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let a = sample(Init::ALog, &mut rng);
            assert!((0.0..=16f32.ln()).contains(&a));
            let d = sample(Init::DtBias, &mut rng) as f64;
            let softplus = d.exp().ln_1p();
            assert!((0.999e-3..=1.001e-1).contains(&softplus), "{softplus}");
        }
        let spec = TensorSpec::new("x.weight", vec![8, 64]);
        let Init::Uniform { half_width, .. } = init_for(&spec) else {
            panic!()
        };
        assert!((half_width - (3f32 / 64.0).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn blocks_are_independent_of_piece_order() {
        let spec = TensorSpec::new("big.weight", vec![3, BLOCK]);
        let mut a = Vec::new();
        fill_tensor(&spec, 7, &mut |p: &[u8]| {
            a.extend_from_slice(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(a.len(), 3 * BLOCK * 2);
        let key = stream_key(7, "big.weight");
        assert_eq!(
            &a[2 * BLOCK * 2..],
            &gen_block(&spec, init_for(&spec), key, 2)[..]
        );
    }
}
