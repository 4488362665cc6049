//! Bit-exact state snapshots on disk (`chat /save`, `/load`).
//!
//! Format: the magic `KLSTATE1`, a little-endian `u64` header length, a JSON header (layer kinds,
//! dims, cache dtype, position, per-layer byte counts) and then the raw little-endian payload of
//! every layer in order — KDA: the three conv histories and the recurrent state as f32; MLA: the
//! cached rows in their storage dtype (plus fp8 scales). Loading checks the header against the
//! model's config, so a snapshot from another model is refused with a message, never misread.

use crate::state::{LayerState, SequenceState};
use crate::ModelError;
use kl_config::{Mixer, ModelConfig};
use kl_layers::cache::{CacheDtype, LatentCache};
use kl_layers::kda::KdaState;
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"KLSTATE1";

fn err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Snapshot {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn f32_bytes(v: &[f32], out: &mut Vec<u8>) {
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn layout(cfg: &ModelConfig) -> serde_json::Value {
    json!({
        "layers": cfg.layers.iter().map(|l| if l.mixer == Mixer::Kda { "kda" } else { "mla" }).collect::<Vec<_>>(),
        "kda": [cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.conv_kernel],
        "mla_width": cfg.mla.latent_width(),
    })
}

/// Write `state` to `path`.
pub fn save_state(state: &SequenceState, cfg: &ModelConfig, path: &Path) -> Result<(), ModelError> {
    let mut payload = Vec::new();
    let mut sizes = Vec::new();
    let mut dtype = None;
    let mut mla_len = 0usize;
    for l in &state.layers {
        let start = payload.len();
        match l {
            LayerState::Kda(s) => {
                for c in &s.conv {
                    f32_bytes(c, &mut payload);
                }
                f32_bytes(&s.recurrent, &mut payload);
                let pd = &s.pending;
                for v in [&pd.k, &pd.v, &pd.g, &pd.beta] {
                    f32_bytes(v, &mut payload);
                }
                sizes.push(json!([payload.len() - start, pd.rows]));
            }
            LayerState::Mla(c) => {
                dtype = Some(c.dtype().name());
                mla_len = c.len();
                let (data, scales) = c.raw_bytes();
                payload.extend_from_slice(&data);
                payload.extend_from_slice(&scales);
                sizes.push(json!([data.len(), scales.len()]));
            }
        }
    }
    let header = json!({
        "layout": layout(cfg),
        "pos": state.pos,
        "cache_dtype": dtype,
        "mla_len": mla_len,
        "sizes": sizes,
    });
    let h = serde_json::to_vec(&header).expect("JSON header");
    let mut f =
        std::fs::File::create(path).map_err(|e| err(path, format!("cannot create: {e}")))?;
    let w = (|| -> std::io::Result<()> {
        f.write_all(MAGIC)?;
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        f.write_all(&payload)?;
        f.flush()
    })();
    w.map_err(|e| err(path, format!("cannot write: {e}")))
}

/// Read a snapshot written by [`save_state`] for the same model configuration.
pub fn load_state(path: &Path, cfg: &ModelConfig) -> Result<SequenceState, ModelError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| err(path, format!("cannot read: {e}")))?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(err(path, "not a kimi-linear state snapshot (bad magic)"));
    }
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    if 16 + hlen > bytes.len() {
        return Err(err(path, "truncated header"));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[16..16 + hlen])
        .map_err(|e| err(path, format!("bad header: {e}")))?;
    if header["layout"] != layout(cfg) {
        return Err(err(
            path,
            format!(
                "made for another model: layout {} but this model has {}",
                header["layout"],
                layout(cfg)
            ),
        ));
    }
    let pos = header["pos"]
        .as_u64()
        .ok_or_else(|| err(path, "header lacks pos"))? as usize;
    let mla_len = header["mla_len"].as_u64().unwrap_or(0) as usize;
    let dtype = match header["cache_dtype"].as_str() {
        Some(s) => {
            CacheDtype::parse(s).ok_or_else(|| err(path, format!("unknown cache dtype {s}")))?
        }
        None => CacheDtype::Bf16,
    };
    let sizes = header["sizes"]
        .as_array()
        .ok_or_else(|| err(path, "header lacks sizes"))?;
    let mut state = SequenceState::new(cfg, dtype);
    let mut off = 16 + hlen;
    let mut take = |n: usize| -> Result<&[u8], ModelError> {
        if off + n > bytes.len() {
            return Err(err(path, "truncated payload"));
        }
        off += n;
        Ok(&bytes[off - n..off])
    };
    let to_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect()
    };
    for (i, l) in state.layers.iter_mut().enumerate() {
        let sz = &sizes[i];
        let (a, b) = (
            sz[0].as_u64().unwrap_or(0) as usize,
            sz[1].as_u64().unwrap_or(0) as usize,
        );
        match l {
            LayerState::Kda(s) => {
                let fresh = KdaState::new(&cfg.kda);
                if a != fresh.bytes() {
                    return Err(err(
                        path,
                        format!(
                            "layer {i}: {a} bytes of KDA state, expected {}",
                            fresh.bytes()
                        ),
                    ));
                }
                let all = to_f32(take(a)?);
                let mut off = 0;
                let parts: [&mut Vec<f32>; 8] = {
                    let [c0, c1, c2] = &mut s.conv;
                    let pd = &mut s.pending;
                    [
                        c0,
                        c1,
                        c2,
                        &mut s.recurrent,
                        &mut pd.k,
                        &mut pd.v,
                        &mut pd.g,
                        &mut pd.beta,
                    ]
                };
                for v in parts {
                    let n = v.len();
                    v.copy_from_slice(&all[off..off + n]);
                    off += n;
                }
                if b >= kl_kernels::kda::CHUNK {
                    return Err(err(
                        path,
                        format!(
                            "layer {i}: {b} pending rows, at most {}",
                            kl_kernels::kda::CHUNK - 1
                        ),
                    ));
                }
                s.pending.rows = b;
            }
            LayerState::Mla(c) => {
                let data = take(a)?.to_vec();
                let scales = take(b)?.to_vec();
                *c = LatentCache::from_raw(
                    cfg.mla.latent_width(),
                    cfg.mla.kv_lora_rank,
                    dtype,
                    mla_len,
                    &data,
                    &scales,
                )
                .ok_or_else(|| {
                    err(
                        path,
                        format!("layer {i}: cache size disagrees with {mla_len} rows"),
                    )
                })?;
            }
        }
    }
    if off != bytes.len() {
        return Err(err(path, "trailing bytes after the payload"));
    }
    state.pos = pos;
    Ok(state)
}
