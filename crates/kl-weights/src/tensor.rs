//! [`Dtype`] and [`Tensor`]: a named, shaped view of stored bytes.
//!
//! A tensor normally borrows its bytes from the memory map of the shard that holds it (an
//! `Arc<Mmap>` shared by every tensor of that shard), so opening a checkpoint copies nothing. The
//! one exception is a tensor whose absolute file offset is not a multiple of its element size: a
//! typed slice of it could not be formed, so exactly that tensor is copied into an owned, 8-aligned
//! buffer in its *stored* dtype. No tensor is ever converted to another dtype here, except by the
//! explicit [`Tensor::to_f32_vec`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

#[cfg(target_endian = "big")]
compile_error!("kl-weights reinterprets little-endian safetensors bytes in place; big-endian hosts are not supported");

/// Element type of a stored tensor. Only these three are read; any other safetensors dtype is
/// refused when the file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// bfloat16 (the bulk of Kimi Linear's weights).
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The safetensors header spelling (`"BF16"`, `"F16"`, `"F32"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
        }
    }

    /// Parse the safetensors header spelling; `None` for any other dtype.
    pub fn from_header(s: &str) -> Option<Dtype> {
        match s {
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
enum Storage {
    /// A byte range of a shard's memory map (zero-copy).
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    /// A private copy, made only for a tensor that is misaligned in its file. `u64` words keep
    /// the buffer 8-aligned; `len` is the byte length.
    Owned { words: Arc<[u64]>, len: usize },
}

/// A named tensor with its stored dtype and shape (PyTorch order, `[out, in]` for linear weights).
#[derive(Clone)]
pub struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    file: Arc<PathBuf>,
    storage: Storage,
}

impl Tensor {
    /// A tensor over `range` of `map`. The caller has checked that the range lies inside the map
    /// and that its length is `numel × dtype.size()`. If the range start is not aligned to the
    /// element size, the bytes are copied into an owned aligned buffer.
    pub(crate) fn from_map(
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        file: Arc<PathBuf>,
        map: &Arc<Mmap>,
        range: Range<usize>,
    ) -> Tensor {
        let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(dtype.size());
        let storage = if aligned {
            Storage::Mapped {
                map: Arc::clone(map),
                range,
            }
        } else {
            let src = &map[range];
            let mut words = vec![0u64; src.len().div_ceil(8)];
            for (w, chunk) in words.iter_mut().zip(src.chunks(8)) {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                *w = u64::from_le_bytes(b);
            }
            Storage::Owned {
                words: words.into(),
                len: src.len(),
            }
        };
        Tensor {
            name,
            dtype,
            shape,
            file,
            storage,
        }
    }

    /// The checkpoint name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dtype stored in the file.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The stored shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The file that holds this tensor.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `true` when the bytes are borrowed from the memory map, `false` when the tensor had to be
    /// copied because it is misaligned in its file.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// The raw little-endian bytes, `numel × dtype.size()` long.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, range } => &map[range.clone()],
            Storage::Owned { words, len } => {
                // SAFETY: `words` holds `words.len() * 8 >= len` initialized bytes, any byte value
                // is a valid u8, and the slice borrows `self`, which keeps the Arc alive.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) }
            }
        }
    }

    /// Reinterpret the bytes as `T` when the dtype matches; the storage is always aligned.
    fn view<T: Pod>(&self, want: Dtype) -> Option<&[T]> {
        if self.dtype != want {
            return None;
        }
        // SAFETY: `T` is one of bf16/f16/f32 (sealed `Pod`): plain old data for which every bit
        // pattern is valid, so reinterpreting initialized bytes is sound. `align_to` puts only
        // suitably aligned elements into the middle slice.
        let (pre, mid, post) = unsafe { self.bytes().align_to::<T>() };
        // Storage is aligned by construction (see `from_map`), so nothing is left over.
        (pre.is_empty() && post.is_empty()).then_some(mid)
    }

    /// Zero-copy `bf16` view, `Some` only when the stored dtype is BF16.
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        self.view(Dtype::BF16)
    }

    /// Zero-copy `f16` view, `Some` only when the stored dtype is F16.
    pub fn as_f16(&self) -> Option<&[f16]> {
        self.view(Dtype::F16)
    }

    /// Zero-copy `f32` view, `Some` only when the stored dtype is F32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        self.view(Dtype::F32)
    }

    /// All elements upcast to `f32` (exact for every supported dtype). Allocates; meant for small
    /// tensors such as norms, biases and `A_log`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("file", &self.file)
            .field("zero_copy", &self.is_zero_copy())
            .finish()
    }
}

/// Element types a tensor may be viewed as. Sealed: only plain-old-data floats.
trait Pod: Copy + private::Sealed {}
impl Pod for bf16 {}
impl Pod for f16 {}
impl Pod for f32 {}
mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for f32 {}
}
