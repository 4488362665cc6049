//! Reading one safetensors file: explicit checks with clear messages, then the `safetensors`
//! crate's own validation, then one [`Tensor`] per header entry over a shared memory map.
//!
//! Layout of a safetensors file: 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [start, end]}, ...}`), then
//! the data section. Offsets are relative to the data section, contiguous, and cover it exactly.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;

use crate::error::WeightsError;
use crate::tensor::{Dtype, Tensor};

/// One tensor entry of a header, before checks.
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Ask Linux to fault the map in with 2 MiB page-cache folios (`MADV_HUGEPAGE`), where the
/// file's pages are not cached yet; `KL_NO_HUGEPAGE` (any value) leaves the map as it is.
///
/// Decode streams every active weight each token, and with 4 KiB pages each of its streams
/// crosses a page every 4 KiB, whose translation the page walker then fetches. With the weights
/// in 2 MiB pages (`FilePmdMapped` in `/proc/PID/smaps`: 97% of `mini` after a cold load with
/// the advice, 3% without), `mini`'s decode on the AMD Zen 5 VM ran 2.4% faster at depth 0
/// and 1.9% at 32K (10 alternating pairs, slow memory phase, each run after its own cold load),
/// and 2.5–5.6% in fast phases (docs/performance.md). Pages already cached stay as they were: a
/// file just written, or read through small folios, keeps 4 KiB pages until evicted
/// ([`crate::evict_from_page_cache`]).
fn advise_huge_pages(map: &Mmap) {
    #[cfg(target_os = "linux")]
    if std::env::var_os("KL_NO_HUGEPAGE").is_none() {
        // Advisory: a kernel without transparent huge pages for files just says no.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

/// Memory-map `path` and return its tensors in data-offset order.
pub(crate) fn read_shard(path: &Path) -> Result<Vec<Tensor>, WeightsError> {
    let header_err = |message: String| WeightsError::Header {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| WeightsError::io(path, e))?
        .len();
    if len < 8 {
        return Err(header_err(format!(
            "file is {len} bytes, shorter than the 8-byte header length field (truncated?)"
        )));
    }
    // SAFETY: the map is read-only and shared; like every mmap-based loader we rely on the file
    // not being truncated or rewritten while the checkpoint is open (documented on `Checkpoint`).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
    advise_huge_pages(&map);
    let map = Arc::new(map);
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if n > len - 8 {
        return Err(header_err(format!(
            "header length field says {n} bytes but only {} bytes follow it (file is {len} bytes; truncated or not safetensors?)",
            len - 8
        )));
    }
    let data_start = 8 + n as usize;
    let data_len = map.len() - data_start;
    let text = std::str::from_utf8(&map[8..data_start])
        .map_err(|e| header_err(format!("header is not UTF-8 text: {e}")))?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| header_err(format!("header is not a JSON object: {e}")))?;

    let file_name = Arc::new(path.to_path_buf());
    let mut infos = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let tensor_err = |message: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        let info: RawInfo = serde_json::from_value(value).map_err(|e| {
            tensor_err(format!(
                "malformed header entry (need dtype, shape, data_offsets): {e}"
            ))
        })?;
        let Some(dtype) = Dtype::from_header(&info.dtype) else {
            return Err(WeightsError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name,
                dtype: info.dtype,
            });
        };
        let (start, end) = info.data_offsets;
        let nbytes = info
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| tensor_err(format!("shape {:?} overflows", info.shape)))?;
        if end < start {
            return Err(tensor_err(format!(
                "data_offsets [{start}, {end}] end before they start"
            )));
        }
        if end > data_len {
            return Err(tensor_err(format!(
                "data_offsets [{start}, {end}] run past the end of the file: the data section is {data_len} bytes \
                 (file {len} bytes, header {n} bytes; truncated?)"
            )));
        }
        if end - start != nbytes {
            return Err(tensor_err(format!(
                "dtype {dtype} with shape {:?} needs {nbytes} bytes ({} per element) but data_offsets [{start}, {end}] span {} bytes",
                info.shape,
                dtype.size(),
                end - start
            )));
        }
        infos.push((name, dtype, info.shape, start..end));
    }
    // Everything the explicit checks above do not cover (gaps or overlaps between tensors, bytes
    // after the last tensor, malformed `__metadata__`) is left to the reference parser.
    safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| header_err(format!("rejected by the safetensors parser: {e}")))?;

    infos.sort_by_key(|(_, _, _, r)| r.start);
    Ok(infos
        .into_iter()
        .map(|(name, dtype, shape, r)| {
            let range = data_start + r.start..data_start + r.end;
            Tensor::from_map(name, dtype, shape, Arc::clone(&file_name), &map, range)
        })
        .collect())
}
