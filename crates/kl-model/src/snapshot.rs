//! Bit-exact state snapshots on disk (`chat /save`, `/load`).
//!
//! Format: the magic `KLSTATE1`, a little-endian `u64` header length, a JSON header (layer kinds,
//! dims, cache dtype, position, per-layer byte counts) and then the raw little-endian payload of
//! every layer in order — KDA: the three conv histories and the recurrent state as f32; MLA: the
//! cached rows in their storage dtype (plus fp8 scales). Loading checks the header against the
//! model's config, so a snapshot from another model is refused with a message, never misread.
//!
//! Both directions stream: the header is computed from the state's sizes before anything is
//! written, and the payload goes layer by layer through buffered I/O straight from and into the
//! state (the cache block by block), so saving or loading a multi-gigabyte cache needs no second
//! copy of it (a `mini` state with a 302 MB cache: peak RSS of a load plus a save 777 MB when
//! the payload was assembled in memory, 348 MB streamed). A file cut short is "truncated", one
//! with bytes past the payload is refused too.

use crate::state::{LayerState, SequenceState};
use crate::ModelError;
use kl_config::{Mixer, ModelConfig};
use kl_layers::cache::{read_le, write_le, CacheDtype, LatentCache};
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

fn layout(cfg: &ModelConfig) -> serde_json::Value {
    json!({
        "layers": cfg.layers.iter().map(|l| if l.mixer == Mixer::Kda { "kda" } else { "mla" }).collect::<Vec<_>>(),
        "kda": [cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.conv_kernel],
        "mla_width": cfg.mla.latent_width(),
    })
}

/// Write `state` to `path`, streaming: the header is computed from the state's sizes, then every
/// layer is written in place through a buffered writer, so saving a multi-gigabyte cache holds
/// no copy of it.
pub fn save_state(state: &SequenceState, cfg: &ModelConfig, path: &Path) -> Result<(), ModelError> {
    let mut sizes = Vec::new();
    let mut dtype = None;
    let mut mla_len = 0usize;
    for l in &state.layers {
        match l {
            // The conv histories, the recurrent state and the chunk carry, as f32.
            LayerState::Kda(s) => sizes.push(json!([s.bytes(), s.pending.rows])),
            LayerState::Mla(c) => {
                dtype = Some(c.dtype().name());
                mla_len = c.len();
                let (data, scales) = LatentCache::raw_sizes(c.dtype(), c.width(), c.len());
                sizes.push(json!([data, scales]));
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
    let f = std::fs::File::create(path).map_err(|e| err(path, format!("cannot create: {e}")))?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
    let w = (|| -> std::io::Result<()> {
        f.write_all(MAGIC)?;
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let mut stage = Vec::new();
        for l in &state.layers {
            match l {
                LayerState::Kda(s) => {
                    let pd = &s.pending;
                    for v in [&s.conv[0], &s.conv[1], &s.conv[2], &s.recurrent] {
                        write_le(&mut f, &mut stage, v, f32::to_le_bytes)?;
                    }
                    for v in [&pd.k, &pd.v, &pd.g, &pd.beta] {
                        write_le(&mut f, &mut stage, v, f32::to_le_bytes)?;
                    }
                }
                LayerState::Mla(c) => c.write_raw(&mut f)?,
            }
        }
        f.flush()?;
        f.get_ref().sync_data()
    })();
    w.map_err(|e| err(path, format!("cannot write: {e}")))
}

/// Largest header accepted (a real one is well under a kilobyte per layer).
const MAX_HEADER: u64 = 16 << 20;

/// Read a snapshot written by [`save_state`] for the same model configuration, streaming: each
/// layer is read straight into its state (the cache into its blocks), so loading holds no copy
/// of the file.
pub fn load_state(path: &Path, cfg: &ModelConfig) -> Result<SequenceState, ModelError> {
    let f = std::fs::File::open(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    // Reading errors: a short file is "truncated", anything else is what the OS said.
    let io = |e: std::io::Error, what: &str| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => err(path, format!("truncated {what}")),
        _ => err(path, format!("cannot read {what}: {e}")),
    };
    let mut head = [0u8; 16];
    let got = read_full(&mut r, &mut head).map_err(|e| io(e, "header"))?;
    if got < 16 || &head[..8] != MAGIC {
        return Err(err(path, "not a kimi-linear state snapshot (bad magic)"));
    }
    let hlen = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    if hlen > MAX_HEADER {
        return Err(err(
            path,
            format!("header of {hlen} bytes, at most {MAX_HEADER}"),
        ));
    }
    let mut hb = vec![0u8; hlen as usize];
    r.read_exact(&mut hb).map_err(|e| io(e, "header"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&hb).map_err(|e| err(path, format!("bad header: {e}")))?;
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
    if sizes.len() != cfg.layers.len() {
        return Err(err(
            path,
            format!(
                "{} layer sizes for {} layers",
                sizes.len(),
                cfg.layers.len()
            ),
        ));
    }
    let mut state = SequenceState::new(cfg, dtype);
    let mut stage = Vec::new();
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
                if b >= kl_kernels::kda::CHUNK {
                    return Err(err(
                        path,
                        format!(
                            "layer {i}: {b} pending rows, at most {}",
                            kl_kernels::kda::CHUNK - 1
                        ),
                    ));
                }
                let pd = &mut s.pending;
                let [c0, c1, c2] = &mut s.conv;
                for v in [
                    c0,
                    c1,
                    c2,
                    &mut s.recurrent,
                    &mut pd.k,
                    &mut pd.v,
                    &mut pd.g,
                    &mut pd.beta,
                ] {
                    read_le(&mut r, &mut stage, v, f32::from_le_bytes)
                        .map_err(|e| io(e, "payload"))?;
                }
                s.pending.rows = b;
            }
            LayerState::Mla(c) => {
                let (w, split) = (cfg.mla.latent_width(), cfg.mla.kv_lora_rank);
                *c = LatentCache::read_raw(w, split, dtype, mla_len, (a, b), &mut r).map_err(
                    |e| match e.kind() {
                        std::io::ErrorKind::InvalidData => err(
                            path,
                            format!("layer {i}: cache size disagrees with {mla_len} rows: {e}"),
                        ),
                        _ => io(e, "payload"),
                    },
                )?;
            }
        }
    }
    let mut one = [0u8; 1];
    if read_full(&mut r, &mut one).map_err(|e| io(e, "payload"))? != 0 {
        return Err(err(path, "trailing bytes after the payload"));
    }
    state.pos = pos;
    Ok(state)
}

/// Read until `buf` is full or the end of the input; the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
