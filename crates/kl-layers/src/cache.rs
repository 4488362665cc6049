//! The MLA latent cache of one layer of one sequence.
//!
//! Each token contributes one row `[c (R, after kv_a_layernorm) ; k_pe (P)]` of width `R + P`
//! (576 for the released model). Rows live in fixed-size blocks of [`BLOCK_ROWS`] tokens that are
//! allocated as the context grows: growth never copies or doubles existing data, so a
//! multi-gigabyte cache grows in 256-token steps, and the memory in use is always
//! `ceil(len / BLOCK_ROWS)` blocks.
//!
//! Storage dtype is chosen per cache ([`CacheDtype`]); rows are rounded on write and widened on
//! read by the attention kernel.

use half::bf16;
use kl_kernels::attention::{latent_attention, LatentAttnShape};
use kl_kernels::Elem;

/// Tokens per block.
pub const BLOCK_ROWS: usize = 256;

/// Element type of the latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDtype {
    /// 4 bytes per value; exact.
    F32,
    /// 2 bytes per value.
    Bf16,
}

impl CacheDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            CacheDtype::F32 => 4,
            CacheDtype::Bf16 => 2,
        }
    }
}

#[derive(Debug, Clone)]
enum Blocks {
    F32(Vec<Box<[f32]>>),
    Bf16(Vec<Box<[bf16]>>),
}

/// Block-allocated latent rows of one MLA layer.
#[derive(Debug, Clone)]
pub struct LatentCache {
    width: usize,
    len: usize,
    blocks: Blocks,
}

fn push_rows<E: Elem>(blocks: &mut Vec<Box<[E]>>, width: usize, len: usize, rows: &[f32]) {
    let n = rows.len() / width;
    for i in 0..n {
        let pos = len + i;
        let (b, r) = (pos / BLOCK_ROWS, pos % BLOCK_ROWS);
        if b == blocks.len() {
            blocks.push(vec![E::from_f32(0.0); BLOCK_ROWS * width].into_boxed_slice());
        }
        for (d, s) in blocks[b][r * width..(r + 1) * width]
            .iter_mut()
            .zip(&rows[i * width..(i + 1) * width])
        {
            *d = E::from_f32(*s);
        }
    }
}

impl LatentCache {
    /// An empty cache of rows of `width` values.
    pub fn new(width: usize, dtype: CacheDtype) -> Self {
        let blocks = match dtype {
            CacheDtype::F32 => Blocks::F32(Vec::new()),
            CacheDtype::Bf16 => Blocks::Bf16(Vec::new()),
        };
        LatentCache {
            width,
            len: 0,
            blocks,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Row width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Storage dtype.
    pub fn dtype(&self) -> CacheDtype {
        match self.blocks {
            Blocks::F32(_) => CacheDtype::F32,
            Blocks::Bf16(_) => CacheDtype::Bf16,
        }
    }

    /// Bytes held by allocated blocks.
    pub fn allocated_bytes(&self) -> usize {
        let nb = match &self.blocks {
            Blocks::F32(b) => b.len(),
            Blocks::Bf16(b) => b.len(),
        };
        nb * BLOCK_ROWS * self.width * self.dtype().size()
    }

    /// Append rows `[n, width]`.
    pub fn append(&mut self, rows: &[f32]) {
        assert_eq!(rows.len() % self.width, 0);
        match &mut self.blocks {
            Blocks::F32(b) => push_rows(b, self.width, self.len, rows),
            Blocks::Bf16(b) => push_rows(b, self.width, self.len, rows),
        }
        self.len += rows.len() / self.width;
    }

    /// Row `i` widened to f32.
    pub fn row(&self, i: usize) -> Vec<f32> {
        assert!(i < self.len);
        let (b, r, w) = (i / BLOCK_ROWS, i % BLOCK_ROWS, self.width);
        match &self.blocks {
            Blocks::F32(bl) => bl[b][r * w..(r + 1) * w].to_vec(),
            Blocks::Bf16(bl) => bl[b][r * w..(r + 1) * w]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        }
    }

    /// Causal attention of queries `q` `[Tq, H, width]` (the last `Tq` cached positions) over the
    /// cache; `out` `[Tq, H, dv]` reads the first `dv` columns as values.
    pub fn attend(&self, h: usize, dv: usize, q: &[f32], scale: f32, out: &mut [f32]) {
        let s = LatentAttnShape {
            h,
            dk: self.width,
            dv,
        };
        match &self.blocks {
            Blocks::F32(b) => {
                let v: Vec<&[f32]> = b.iter().map(|x| &x[..]).collect();
                latent_attention(s, q, &v, BLOCK_ROWS, self.len, scale, out)
            }
            Blocks::Bf16(b) => {
                let v: Vec<&[bf16]> = b.iter().map(|x| &x[..]).collect();
                latent_attention(s, q, &v, BLOCK_ROWS, self.len, scale, out)
            }
        }
    }
}
