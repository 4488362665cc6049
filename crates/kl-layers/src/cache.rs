//! The MLA latent cache of one layer of one sequence.
//!
//! Each token contributes one row `[c (R, after kv_a_layernorm) ; k_pe (P)]` of width `R + P`
//! (576 for the released model). Rows live in fixed-size blocks of [`BLOCK_ROWS`] tokens that are
//! allocated as the context grows: growth never copies or doubles existing data, so a
//! multi-gigabyte cache grows in 256-token steps and the memory in use is always
//! `ceil(len / BLOCK_ROWS)` blocks. [`LatentCache::reserve`] allocates blocks up front.
//!
//! Storage ([`CacheDtype`]):
//! - `f32`: exact (4 B/value).
//! - `bf16`: 2 B/value, rounded to nearest even (default for generation).
//! - `fp8`: e4m3 (1 B/value) with **one f32 scale per token row and part**: the `R` latent
//!   values share one scale and the `P` key values another (`scale = amax / 448`). Per-row scales
//!   keep appends local (no re-quantisation of old rows) and cost 8 B per row (1.4% at 576).
//!
//! Rows are rounded on write and widened on read by the attention kernel.

use half::bf16;
use kl_kernels::attention::{
    for_blocks, latent_attention_rows, BlockRows, KeyRows, LatentAttnShape, Prefetch,
};
use kl_kernels::fp8;

/// Tokens per block.
pub const BLOCK_ROWS: usize = 256;

/// Element type of the latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDtype {
    /// 4 bytes per value; exact.
    F32,
    /// 2 bytes per value.
    Bf16,
    /// 1 byte per value (e4m3) plus two f32 scales per row.
    Fp8,
}

impl CacheDtype {
    /// Parse `f32`, `bf16`, `fp8`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(CacheDtype::F32),
            "bf16" => Some(CacheDtype::Bf16),
            "fp8" | "fp8-e4m3" => Some(CacheDtype::Fp8),
            _ => None,
        }
    }

    /// Name as accepted by [`CacheDtype::parse`].
    pub fn name(self) -> &'static str {
        match self {
            CacheDtype::F32 => "f32",
            CacheDtype::Bf16 => "bf16",
            CacheDtype::Fp8 => "fp8",
        }
    }

    /// Bytes of one cached row of `width` values.
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            CacheDtype::F32 => 4 * width,
            CacheDtype::Bf16 => 2 * width,
            CacheDtype::Fp8 => width + 8,
        }
    }

    /// Bytes held by the blocks needed for `tokens` rows of `width` values.
    pub fn bytes_for(self, tokens: usize, width: usize) -> usize {
        tokens.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * self.row_bytes(width)
    }
}

/// One fp8 block: codes `[BLOCK_ROWS, width]` and scales `[BLOCK_ROWS, 2]`.
type Fp8Block = (Box<[u8]>, Box<[f32]>);

#[derive(Debug, Clone)]
enum Blocks {
    F32(Vec<Box<[f32]>>),
    Bf16(Vec<Box<[bf16]>>),
    /// Codes `[BLOCK_ROWS, width]` and scales `[BLOCK_ROWS, 2]` per block.
    Fp8(Vec<Fp8Block>),
}

/// Block-allocated latent rows of one MLA layer.
#[derive(Debug, Clone)]
pub struct LatentCache {
    width: usize,
    split: usize,
    len: usize,
    blocks: Blocks,
}

impl LatentCache {
    /// An empty cache of rows of `width` values whose first `split` values (the latent) are
    /// scaled separately from the rest under fp8.
    pub fn new(width: usize, split: usize, dtype: CacheDtype) -> Self {
        assert!(split <= width);
        let blocks = match dtype {
            CacheDtype::F32 => Blocks::F32(Vec::new()),
            CacheDtype::Bf16 => Blocks::Bf16(Vec::new()),
            CacheDtype::Fp8 => Blocks::Fp8(Vec::new()),
        };
        LatentCache {
            width,
            split,
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
            Blocks::Fp8(_) => CacheDtype::Fp8,
        }
    }

    /// Whether attention over this cache runs bf16 products (a bf16 or fp8 cache holding rows;
    /// see `kl_kernels::attention_bf16`): decode, the absorbed form and the expanded form alike.
    /// The rows' own answer ([`KeyRows::bf16_products`]), which the absorbed form reads too.
    pub fn bf16_products(&self) -> bool {
        self.rows_view(|rows| rows.bf16_products())
    }

    fn num_blocks(&self) -> usize {
        match &self.blocks {
            Blocks::F32(b) => b.len(),
            Blocks::Bf16(b) => b.len(),
            Blocks::Fp8(b) => b.len(),
        }
    }

    /// Bytes held by allocated blocks.
    pub fn allocated_bytes(&self) -> usize {
        self.num_blocks() * BLOCK_ROWS * self.dtype().row_bytes(self.width)
    }

    /// Bytes that appending `tokens` more rows would newly allocate.
    pub fn growth_bytes(&self, tokens: usize) -> usize {
        let need = (self.len + tokens).div_ceil(BLOCK_ROWS);
        need.saturating_sub(self.num_blocks()) * BLOCK_ROWS * self.dtype().row_bytes(self.width)
    }

    fn grow_to_blocks(&mut self, nb: usize) {
        let w = self.width;
        while self.num_blocks() < nb {
            match &mut self.blocks {
                Blocks::F32(b) => b.push(vec![0f32; BLOCK_ROWS * w].into_boxed_slice()),
                Blocks::Bf16(b) => b.push(vec![bf16::ZERO; BLOCK_ROWS * w].into_boxed_slice()),
                Blocks::Fp8(b) => b.push((
                    vec![0u8; BLOCK_ROWS * w].into_boxed_slice(),
                    vec![0f32; BLOCK_ROWS * 2].into_boxed_slice(),
                )),
            }
        }
    }

    /// Allocate blocks for `tokens` rows in total now (a `--max-context` reservation).
    pub fn reserve(&mut self, tokens: usize) {
        self.grow_to_blocks(tokens.div_ceil(BLOCK_ROWS));
    }

    /// Append rows `[n, width]`.
    pub fn append(&mut self, rows: &[f32]) {
        let w = self.width;
        assert_eq!(rows.len() % w, 0);
        let n = rows.len() / w;
        self.grow_to_blocks((self.len + n).div_ceil(BLOCK_ROWS));
        let split = self.split;
        for (i, src) in rows.chunks_exact(w).enumerate() {
            let pos = self.len + i;
            let (b, r) = (pos / BLOCK_ROWS, pos % BLOCK_ROWS);
            match &mut self.blocks {
                Blocks::F32(bl) => bl[b][r * w..(r + 1) * w].copy_from_slice(src),
                Blocks::Bf16(bl) => {
                    for (d, s) in bl[b][r * w..(r + 1) * w].iter_mut().zip(src) {
                        *d = bf16::from_f32(*s);
                    }
                }
                Blocks::Fp8(bl) => {
                    let (codes, scales) = &mut bl[b];
                    for (part, (lo, hi)) in [(0, split), (split, w)].into_iter().enumerate() {
                        let amax = src[lo..hi].iter().fold(0f32, |m, x| m.max(x.abs()));
                        let scale = if amax > 0.0 {
                            amax / fp8::E4M3_MAX
                        } else {
                            1.0
                        };
                        scales[r * 2 + part] = scale;
                        fp8::encode_scaled(&src[lo..hi], scale, &mut codes[r * w + lo..r * w + hi]);
                    }
                }
            }
        }
        self.len += n;
    }

    /// Row `i` widened to f32.
    pub fn row(&self, i: usize) -> Vec<f32> {
        assert!(i < self.len);
        let mut v = vec![0f32; self.width];
        self.rows_view(|rows| {
            rows.widen(i, 1, &mut v);
        });
        v
    }

    /// Bytes of the two parts of [`LatentCache::write_raw`] for `len` rows of `width` values
    /// stored as `dtype`: (row bytes, scale bytes).
    pub fn raw_sizes(dtype: CacheDtype, width: usize, len: usize) -> (usize, usize) {
        match dtype {
            CacheDtype::F32 => (len * width * 4, 0),
            CacheDtype::Bf16 => (len * width * 2, 0),
            CacheDtype::Fp8 => (len * width, len * 8),
        }
    }

    /// Write rows `0..len` for a snapshot: every row's stored values (little-endian), then, under
    /// fp8, every row's two scales. Block by block through a small staging buffer, so that saving
    /// a multi-gigabyte cache holds no copy of it.
    pub fn write_raw(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut stage = Vec::with_capacity(STAGE_BYTES);
        let used = |b: usize| (self.len - b * BLOCK_ROWS).min(BLOCK_ROWS);
        match &self.blocks {
            Blocks::F32(bl) => {
                for (b, blk) in bl.iter().enumerate().take(self.num_used_blocks()) {
                    write_le(w, &mut stage, &blk[..used(b) * self.width], |x| {
                        x.to_le_bytes()
                    })?;
                }
            }
            Blocks::Bf16(bl) => {
                for (b, blk) in bl.iter().enumerate().take(self.num_used_blocks()) {
                    let rows = &blk[..used(b) * self.width];
                    write_le(w, &mut stage, rows, |x| x.to_bits().to_le_bytes())?;
                }
            }
            Blocks::Fp8(bl) => {
                for (b, (codes, _)) in bl.iter().enumerate().take(self.num_used_blocks()) {
                    w.write_all(&codes[..used(b) * self.width])?;
                }
                for (b, (_, scales)) in bl.iter().enumerate().take(self.num_used_blocks()) {
                    write_le(w, &mut stage, &scales[..used(b) * 2], |x| x.to_le_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Blocks holding rows `0..len`.
    fn num_used_blocks(&self) -> usize {
        self.len.div_ceil(BLOCK_ROWS)
    }

    /// Rebuild `len` rows from [`LatentCache::write_raw`]'s bytes, read from `r` straight into
    /// the cache's blocks (through a small staging buffer). `data` and `scales` are the byte
    /// counts the snapshot declares; if they are not [`LatentCache::raw_sizes`]' the error is
    /// `InvalidData` and nothing is read; a short read is `UnexpectedEof`.
    pub fn read_raw(
        width: usize,
        split: usize,
        dtype: CacheDtype,
        len: usize,
        (data, scales): (usize, usize),
        r: &mut impl std::io::Read,
    ) -> std::io::Result<Self> {
        if (data, scales) != Self::raw_sizes(dtype, width, len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{data} row bytes and {scales} scale bytes for {len} rows of {width} {} values",
                    dtype.name()
                ),
            ));
        }
        let mut c = LatentCache::new(width, split, dtype);
        c.grow_to_blocks(len.div_ceil(BLOCK_ROWS));
        c.len = len;
        let used = |b: usize| (len - b * BLOCK_ROWS).min(BLOCK_ROWS);
        let nb = c.num_used_blocks();
        let mut stage = Vec::with_capacity(STAGE_BYTES);
        match &mut c.blocks {
            Blocks::F32(bl) => {
                for (b, blk) in bl.iter_mut().enumerate().take(nb) {
                    read_le(
                        r,
                        &mut stage,
                        &mut blk[..used(b) * width],
                        f32::from_le_bytes,
                    )?;
                }
            }
            Blocks::Bf16(bl) => {
                for (b, blk) in bl.iter_mut().enumerate().take(nb) {
                    read_le(r, &mut stage, &mut blk[..used(b) * width], |x| {
                        bf16::from_bits(u16::from_le_bytes(x))
                    })?;
                }
            }
            Blocks::Fp8(bl) => {
                for (b, (codes, _)) in bl.iter_mut().enumerate().take(nb) {
                    r.read_exact(&mut codes[..used(b) * width])?;
                }
                for (b, (_, sc)) in bl.iter_mut().enumerate().take(nb) {
                    read_le(r, &mut stage, &mut sc[..used(b) * 2], f32::from_le_bytes)?;
                }
            }
        }
        Ok(c)
    }

    /// Rows `r0 .. r0 + n` widened to f32 into `dst` (`[n, width]`).
    pub fn widen_rows(&self, r0: usize, n: usize, dst: &mut [f32]) {
        assert!(r0 + n <= self.len && dst.len() >= n * self.width);
        self.rows_view(|rows| {
            let mut done = 0;
            while done < n {
                done += rows.widen(r0 + done, n - done, &mut dst[done * self.width..]);
            }
        });
    }

    /// Run `f` with a [`KeyRows`] view of the cached rows.
    fn rows_view<R>(&self, f: impl FnOnce(&dyn KeyRows) -> R) -> R {
        let (dk, n_rows) = (self.width, self.len);
        match &self.blocks {
            Blocks::F32(b) => f(&BlockRows::new(b, BLOCK_ROWS, dk, n_rows)),
            Blocks::Bf16(b) => f(&BlockRows::new(b, BLOCK_ROWS, dk, n_rows)),
            Blocks::Fp8(b) => f(&Fp8Rows {
                blocks: b,
                dk,
                split: self.split,
                n_rows,
            }),
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
        self.rows_view(|rows| latent_attention_rows(s, q, rows, scale, out));
    }
}

/// fp8 rows with per-row, per-part scales.
struct Fp8Rows<'a> {
    blocks: &'a [Fp8Block],
    dk: usize,
    split: usize,
    n_rows: usize,
}

impl Fp8Rows<'_> {
    /// Up to `n` rows from `r0` (stopping at the end of `r0`'s block) decoded into `dst` by
    /// `decode` (codes, scale, out), each row's two parts (latent, rope) with their own scale;
    /// returns the rows written.
    fn decode<T>(
        &self,
        r0: usize,
        n: usize,
        dst: &mut [T],
        decode: impl Fn(&[u8], f32, &mut [T]),
    ) -> usize {
        let (b, r) = (r0 / BLOCK_ROWS, r0 % BLOCK_ROWS);
        let n = n.min(BLOCK_ROWS - r).min(self.n_rows - r0);
        let (codes, scales) = &self.blocks[b];
        let (dk, split) = (self.dk, self.split);
        for i in 0..n {
            let row = r + i;
            let src = &codes[row * dk..(row + 1) * dk];
            let d = &mut dst[i * dk..(i + 1) * dk];
            decode(&src[..split], scales[row * 2], &mut d[..split]);
            decode(&src[split..], scales[row * 2 + 1], &mut d[split..]);
        }
        n
    }
}

impl KeyRows for Fp8Rows<'_> {
    fn rows(&self) -> usize {
        self.n_rows
    }
    fn widen(&self, r0: usize, n: usize, dst: &mut [f32]) -> usize {
        self.decode(r0, n, dst, fp8::decode_scaled)
    }
    fn widen_bf16(&self, r0: usize, n: usize, dst: &mut [bf16]) -> Option<usize> {
        Some(self.decode(r0, n, dst, fp8::decode_scaled_bf16))
    }
    /// fp8 rows take latent attention's bf16 products, widened (each code times its row scale)
    /// and rounded to bf16: e4m3 carries 4 significant bits, so the rounding adds about 2⁻⁹
    /// of a value to an error of up to 2⁻⁴ already there, for products twice as fast on
    /// AVX512-BF16.
    fn bf16_products(&self) -> bool {
        self.n_rows > 0
    }
    fn spans(&self, r0: usize, n: usize, pf: &mut Prefetch) {
        for_blocks(BLOCK_ROWS, r0, (r0 + n).min(self.n_rows), |b, o, m| {
            let (codes, scales) = &self.blocks[b];
            pf.push(&codes[o * self.dk..(o + m) * self.dk]);
            pf.push(&scales[o * 2..(o + m) * 2]);
        });
    }
}

/// Largest piece [`write_le`] and [`read_le`] move at once (and their staging buffer's size).
pub const STAGE_BYTES: usize = 64 << 10;

/// Write `vals` as little-endian bytes (`N` per value, `le` of each) through `stage`, at most
/// [`STAGE_BYTES`] a call: how snapshots stream a cache (and the KDA state) without a copy.
pub fn write_le<T: Copy, const N: usize>(
    w: &mut impl std::io::Write,
    stage: &mut Vec<u8>,
    vals: &[T],
    le: impl Fn(T) -> [u8; N],
) -> std::io::Result<()> {
    for part in vals.chunks(STAGE_BYTES / N) {
        stage.clear();
        for &x in part {
            stage.extend_from_slice(&le(x));
        }
        w.write_all(stage)?;
    }
    Ok(())
}

/// Fill `vals` from little-endian bytes (`N` per value, `from` of each) read through `stage`,
/// at most [`STAGE_BYTES`] a call; a short input is `UnexpectedEof`.
pub fn read_le<T, const N: usize>(
    r: &mut impl std::io::Read,
    stage: &mut Vec<u8>,
    vals: &mut [T],
    from: impl Fn([u8; N]) -> T,
) -> std::io::Result<()> {
    for part in vals.chunks_mut(STAGE_BYTES / N) {
        stage.resize(part.len() * N, 0);
        r.read_exact(stage)?;
        for (v, b) in part.iter_mut().zip(stage.chunks_exact(N)) {
            *v = from(b.try_into().expect("N bytes"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A writer that keeps what it gets and the largest single write.
    #[derive(Default)]
    struct Sink {
        bytes: Vec<u8>,
        largest: usize,
    }
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.largest = self.largest.max(b.len());
            self.bytes.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A reader over bytes that records the largest single read asked for.
    struct Source<'a> {
        bytes: &'a [u8],
        largest: usize,
    }
    impl Read for Source<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.largest = self.largest.max(b.len());
            self.bytes.read(b)
        }
    }

    /// A copy holds the same rows in blocks of its own, reserved blocks included: appending to
    /// either leaves the other as it was.
    #[test]
    fn a_copy_has_its_own_blocks() {
        let (width, split) = (40, 32);
        let len = 2 * BLOCK_ROWS + 9;
        let row = |i: usize| -> Vec<f32> {
            (0..width)
                .map(|j| ((i * 31 + j * 7) % 97) as f32 * 0.25 - 12.0)
                .collect()
        };
        let rows: Vec<f32> = (0..len).flat_map(row).collect();
        for dtype in [CacheDtype::F32, CacheDtype::Bf16, CacheDtype::Fp8] {
            let mut a = LatentCache::new(width, split, dtype);
            a.reserve(4 * BLOCK_ROWS);
            a.append(&rows);
            let mut b = a.clone();
            assert_eq!(
                (b.len(), b.allocated_bytes()),
                (a.len(), a.allocated_bytes())
            );
            for i in [0, BLOCK_ROWS - 1, BLOCK_ROWS, len - 1] {
                assert_eq!(a.row(i), b.row(i), "{dtype:?} row {i}");
            }
            let before = a.row(len - 1);
            b.append(&row(len));
            a.append(&row(len + 1));
            assert_eq!(b.row(len - 1), before, "{dtype:?}");
            assert_ne!(
                a.row(len),
                b.row(len),
                "{dtype:?}: the copies share a block"
            );
        }
    }

    /// Snapshot bytes round-trip bit for bit for every dtype, in pieces no larger than the
    /// staging buffer (so neither direction holds a copy of the cache), with the declared sizes
    /// checked before anything is read and a short input reported as such.
    #[test]
    fn raw_bytes_stream_in_small_pieces_and_round_trip() {
        let (width, split) = (40, 32);
        let len = 3 * BLOCK_ROWS + 17;
        let rows: Vec<f32> = (0..len * width)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
            .collect();
        for dtype in [CacheDtype::F32, CacheDtype::Bf16, CacheDtype::Fp8] {
            let mut c = LatentCache::new(width, split, dtype);
            c.append(&rows);
            let mut out = Sink::default();
            c.write_raw(&mut out).unwrap();
            let sizes = LatentCache::raw_sizes(dtype, width, len);
            assert_eq!(out.bytes.len(), sizes.0 + sizes.1, "{dtype:?}");
            assert!(out.largest <= STAGE_BYTES && out.largest < out.bytes.len() / 2);
            let mut src = Source {
                bytes: &out.bytes,
                largest: 0,
            };
            let back = LatentCache::read_raw(width, split, dtype, len, sizes, &mut src).unwrap();
            assert!(
                src.largest <= STAGE_BYTES && src.bytes.is_empty(),
                "{dtype:?}"
            );
            let mut again = Sink::default();
            back.write_raw(&mut again).unwrap();
            assert_eq!(again.bytes, out.bytes, "{dtype:?}");
            assert_eq!(back.row(len - 1), c.row(len - 1));
            let wrong = (sizes.0 + 1, sizes.1);
            let e = LatentCache::read_raw(width, split, dtype, len, wrong, &mut &out.bytes[..]);
            assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
            let short = &out.bytes[..out.bytes.len() - 1];
            let e = LatentCache::read_raw(width, split, dtype, len, sizes, &mut &short[..]);
            assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        }
    }

    /// An fp8 cache's attention takes the bf16 products over its rows rounded to bf16: the last
    /// query of a prefill equals that query decoded alone bit for bit (past two segments and
    /// inside a partial block), and both are within 1e-3 of attention over an f32 cache holding
    /// the fp8 rows as widened (values in ±1).
    #[test]
    fn fp8_attention_runs_bf16_products_and_decode_equals_prefill() {
        let (width, split, h, dv) = (64, 48, 17, 48);
        let len = 2 * kl_kernels::attention::SEGMENT + 3 * BLOCK_ROWS / 2 + 5;
        let rows: Vec<f32> = (0..len * width)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.002)
            .collect();
        let mut c = LatentCache::new(width, split, CacheDtype::Fp8);
        c.append(&rows);
        let tq = 3;
        let q: Vec<f32> = (0..tq * h * width)
            .map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 0.0006)
            .collect();
        let mut pre = vec![0f32; tq * h * dv];
        c.attend(h, dv, &q, 0.125, &mut pre);
        let mut one = vec![0f32; h * dv];
        c.attend(h, dv, &q[(tq - 1) * h * width..], 0.125, &mut one);
        assert_eq!(one, pre[(tq - 1) * h * dv..]);
        let mut f = LatentCache::new(width, split, CacheDtype::F32);
        for i in 0..len {
            f.append(&c.row(i));
        }
        let mut want = vec![0f32; tq * h * dv];
        f.attend(h, dv, &q, 0.125, &mut want);
        let d = pre
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-3, "fp8 against its f32 widening: {d}");
        assert!(d > 0.0, "the bf16 rounding must show somewhere");
    }
}
