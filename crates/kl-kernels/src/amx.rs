//! Prefill products on Intel AMX tiles (`TDPBF16PS`), opt-in.
//!
//! Sapphire Rapids and later Xeons carry a matrix unit beside the vector units: eight tile
//! registers of up to 16 rows × 64 bytes, and an instruction that multiplies a 16 × 32 tile of
//! bf16 by a 32 × 16 one into a 16 × 16 tile of f32 sums. One core runs it at several times the
//! AVX-512 FMA peak (1.1–1.2 TFLOP/s per core on the development VM against 140–180 GFLOP/s).
//! Weights stored in bf16 feed it directly; activations, which the engine keeps in f32, do not.
//!
//! **Numerics: three bf16 terms per activation, exact.** Rounding the activations to bf16, as
//! llama.cpp does for bf16 weights, keeps 8 significant bits and moves the logits of a random
//! model visibly (docs/performance.md). Here each activation is split as `x = hi + mid + lo`
//! with `hi = bf16(x)`, `mid = bf16(x − hi)`, `lo = bf16(x − hi − mid)`: the differences are
//! exact in f32 and each term takes the next 8 significant bits, so the three add up to `x`
//! exactly (short of the bf16 exponent range: terms below `1.2·10⁻³⁸` are flushed). Products of
//! two bf16 values are exact in f32 and the unit accumulates in f32 (round to nearest even,
//! denormals flushed), so the result differs from the FMA path's only in the order of the f32
//! sums, like any other summation order: the golden tests pass at the same tolerances
//! (`KL_AMX=1`). Two terms (16 bits of each activation) ran 20–30% faster on the 48B shape
//! but moved the golden logits by up to 1.9·10⁻⁴, past the tests' 10⁻⁴. Infinite activations
//! give NaN (`x − hi` is `∞ − ∞`).
//!
//! **Not batch invariant.** Among themselves the tile products are: an output element sees the
//! same tile products in the same order whatever the number of rows (tested bit for bit). But
//! decode (matrix–vector, `T ≤ 8`) stays on the FMA kernel in the canonical order of
//! [`crate::matmul`], whose last bits differ, so a prompt prefilled in pieces no longer gives
//! bit-identical results to one prefill (they agree to f32 rounding). Decode on the tiles was
//! built and measured: 14–22 GB/s against the FMA kernel's 20–24 on cold bf16 weights (the
//! tile loads read 32 weight rows 64 bytes at a time, which streams worse than whole rows), and
//! 44–62 against 66–79 tokens/s on `mini`. That is why this path is off unless asked for:
//! `KL_AMX=1`, or [`set_enabled`] (`--amx` on the command line). With it off, nothing here
//! runs.
//!
//! **Layout.** `y = x·Wᵀ` is computed transposed, `yᵀ = W·xᵀ`: the `A` operand is then `W`
//! itself (16 rows × 32 columns straight from the stored matrix, no packing), and the `B`
//! operand, which the unit wants in pairs of rows ("VNNI": row `r` holds `(B[2r][j],
//! B[2r+1][j])` for each column `j`), is built from `x` once per call: for 16 tokens and 32
//! columns of `K`, a 1 KiB tile whose row `r` holds `(x[m][2r], x[m][2r+1])` for tokens
//! `m = 0..16`, once per term. Four accumulator tiles hold a 32 × 32 block of `yᵀ` (two tiles
//! of `W` rows by two of tokens); per 32 columns of `K` the block takes two `W` tiles, six `x`
//! tiles and twelve tile products (up to 16 tokens: one token tile, six products). Tasks are
//! panels of `W` rows (up to 128 while several token blocks pass, so that the panel stays in
//! L2) times ranges of tokens, as in the FMA path. The `x` tiles and the output are transposed
//! with the 8 × 8 register transpose of [`crate::transpose`].
//!
//! Linux only (the process must ask the kernel for the tile state: `arch_prctl
//! (ARCH_REQ_XCOMP_PERM)`), x86-64 with AMX-TILE and AMX-BF16, `K` a multiple of 32 and weights
//! in bf16; anything else takes the FMA path.
//!
//! The same switch also sends latent attention over a bf16 cache to the tiles
//! ([`crate::amx_attention`], which reuses this module's product block for its scores).

use half::bf16;
use std::sync::OnceLock;

/// Whether this machine and OS can run the tile kernels (detected once: CPUID, then the
/// kernel's permission for the tile state).
pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // Leaf 7 exists when leaf 0 reports it.
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let edx7 = std::arch::x86_64::__cpuid_count(7, 0).edx;
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    if edx7 & (AMX_BF16 | AMX_TILE) != (AMX_BF16 | AMX_TILE) {
        return false;
    }
    // The packing and the transposes around the tiles use AVX-512 and AVX2 (every AMX CPU has
    // them; a hypervisor could still hide them).
    let vector = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma");
    if !vector {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 when the kernel supports and grants
    // the tile state to this process (all its threads), a negative errno otherwise.
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; it reads and writes no user memory.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The switch (`KL_AMX=1`, or [`set_enabled`]).
static SWITCH: crate::cpu::OptIn = crate::cpu::OptIn::new("KL_AMX");

/// Ask for (or stop) the tile kernels in prefill products. Returns whether they will be used:
/// `false` when asked for on a machine without them ([`available`]).
pub fn set_enabled(on: bool) -> bool {
    SWITCH.set(on, available())
}

/// Whether prefill products use the tile kernels: [`set_enabled`], or else `KL_AMX=1` in the
/// environment, on a machine where they are [`available`].
pub fn enabled() -> bool {
    SWITCH.get(available)
}

/// Bytes that [`matmul_bf16`] keeps on a calling thread between calls after a product of `t` rows
/// and `K = k` (the packed `x`: three bf16 terms per element, rows padded to whole token tiles;
/// and the zero-padded copy of a last group of fewer than 32 weight rows), for memory planning.
/// Each thread keeps its largest.
pub fn scratch_bytes(t: usize, k: usize) -> usize {
    let rows = if t <= 16 { 16 } else { t.div_ceil(32) * 32 };
    rows * k * 3 * 2 + 32 * k * 2
}

/// Whether [`matmul_bf16`] takes a product of this shape (`K` a multiple of 32).
pub fn fits(k: usize) -> bool {
    k > 0 && k.is_multiple_of(32)
}

/// `y = x·Wᵀ` on the tile unit (same contract as [`crate::matmul::matmul_reference`]; see the
/// module docs for the numerics).
///
/// # Panics
/// If [`available`] is false, `K` is not a multiple of 32 ([`fits`]), or a length is not the
/// shape's.
pub fn matmul_bf16(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert!(available(), "amx: this machine or OS has no AMX-BF16 tiles");
    assert!(fits(k), "amx: K = {k} is not a multiple of 32");
    crate::matmul::check_shape("amx", x.len(), w.len(), y.len(), t, k, n);
    if t == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    x86::matmul(x, w, y, t, k, n);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::bf16;
    use crate::par::SendPtr;
    use crate::simd::Prefetch;
    use std::arch::asm;
    use std::cell::RefCell;

    /// Tokens per `x` tile (its columns) and `W` rows per `W` tile (its rows).
    pub(crate) const TILE: usize = 16;
    /// `K` columns per tile step (32 bf16 = 64 bytes, one tile row).
    pub(crate) const KSTEP: usize = 32;
    /// u32 elements (bf16 pairs) of one tile (16 rows × 64 bytes).
    pub(crate) const TILE_U32: usize = 256;
    /// bf16 terms per activation: `hi`, `mid`, `lo` (see the module docs).
    pub(crate) const TERMS: usize = 3;

    /// The tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// The tile state of this thread, configured while alive and released on drop (so that the
    /// OS need not save 8 KiB of tiles at every switch away from a thread that is done).
    pub(crate) struct Tiles;

    impl Tiles {
        pub(crate) fn new() -> Self {
            // SAFETY: `available()` was checked by the caller (the process holds the tile
            // permission); the configuration is a valid palette-1 layout.
            unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: tiles are configured (by `new`).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    thread_local! {
        /// The calling thread's packed `x` (reused between calls: no allocation once warm).
        static XPACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
        /// A task's zero-padded last weight group (reused between calls).
        static PAD: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
    }

    /// bf16 bits of `v` (in the low 16 bits), rounded to nearest even; a NaN stays a (quiet)
    /// NaN. Branch-free, so that a row of them vectorises; the same bits as `half::bf16`.
    #[inline(always)]
    fn bits(v: f32) -> u32 {
        let b = v.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        if v.is_nan() {
            (b >> 16) | 0x40
        } else {
            rounded
        }
    }

    /// The [`TERMS`] bf16 terms `hi`, `mid`, `lo` of the pair `(a, b)` (see the module docs),
    /// each as one u32 of a VNNI tile row: `a`'s term in the low half, `b`'s in the high.
    #[inline(always)]
    pub(crate) fn split3(mut a: f32, mut b: f32) -> [u32; TERMS] {
        let mut terms = [0; TERMS];
        for t in &mut terms {
            let (ha, hb) = (bits(a), bits(b));
            *t = ha | (hb << 16);
            a -= f32::from_bits(ha << 16);
            b -= f32::from_bits(hb << 16);
        }
        terms
    }

    /// Pack `x` rows `m0..m0+16` (zero past `t`), columns `kc·32..kc·32+32`, as the
    /// [`TERMS`] VNNI tiles `hi`, `mid`, `lo` at `dst[0..256]`, `dst[256..512]`,
    /// `dst[512..768]` (bf16 pairs: row `r`, column `m` is `(x[m][2r], x[m][2r+1])`): the
    /// 16 × 32 block of `x` transposed first (pure data movement), so that every term of a
    /// tile row is a 16-lane vertical operation on columns `2r` and `2r + 1`.
    ///
    /// # Safety
    /// The CPU has AVX2 (the transposition).
    #[inline(always)]
    unsafe fn pack_block(x: &[f32], t: usize, k: usize, m0: usize, kc: usize, dst: &mut [u32]) {
        let mut xt = [[0f32; TILE]; KSTEP];
        let nt = TILE.min(t.saturating_sub(m0));
        if nt > 0 {
            let src = &x[m0 * k + kc * KSTEP..(m0 + nt - 1) * k + (kc + 1) * KSTEP];
            crate::transpose::x86::transpose(
                src.as_ptr(),
                nt,
                KSTEP,
                k,
                xt.as_mut_ptr().cast::<f32>(),
                TILE,
            );
        }
        let (hi, rest) = dst.split_at_mut(TILE_U32);
        let (mid, lo) = rest.split_at_mut(TILE_U32);
        for r in 0..KSTEP / 2 {
            for (m, (&a, &b)) in xt[2 * r].iter().zip(&xt[2 * r + 1]).enumerate() {
                let i = r * TILE + m;
                [hi[i], mid[i], lo[i]] = split3(a, b);
            }
        }
    }

    /// [`pack_block`] over a token tile's `K` steps, compiled for AVX-512 (the conversion
    /// vectorises 16-wide; every AMX CPU has AVX-512).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(crate) unsafe fn pack_tile(x: &[f32], t: usize, k: usize, m0: usize, dst: &mut [u32]) {
        for (s, d) in dst.chunks_exact_mut(TERMS * TILE_U32).enumerate() {
            // SAFETY: AVX2 is present (checked in `detect`, as every caller requires `available`).
            unsafe { pack_block(x, t, k, m0, s, d) };
        }
    }

    /// One 32 × 32 block of `yᵀ`: `W` rows at `wp` (two tiles, rows `ldw` bytes apart), `x`
    /// tiles at `xp0` / `xp1` (two token tiles; per `K` step the [`TERMS`] tiles), over
    /// `steps` K steps, into `out` as four 16 × 16 f32 tiles `[W tile][x tile]`. With `TWO`
    /// false, only the first token tile (`xp0`; tiles `[·][1]` of `out` are then zero): every
    /// output element still sees the same tile products in the same order.
    ///
    /// `pf` advances one [`Prefetch::tick`] per `K` step (the next rows of a latent cache in
    /// attention; nothing for products).
    ///
    /// Tile registers are not renamed, so a load waits for the products that read its register;
    /// loads placed right after their register's last reader measured no faster than this plain
    /// order (the core overlaps them).
    ///
    /// # Safety
    /// Tiles configured; `wp` has 32 rows of `steps·32` bf16 `ldw` bytes apart; `xp0`, `xp1`
    /// have `steps` steps of [`TERMS`] tiles each; `out` has 1024 writable floats.
    #[inline(always)]
    pub(crate) unsafe fn block<const TWO: bool>(
        wp: *const u8,
        ldw: usize,
        xp0: *const u32,
        xp1: *const u32,
        steps: usize,
        out: *mut f32,
        pf: &mut Prefetch,
    ) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let w1 = wp.add(TILE * ldw);
        for s in 0..steps {
            pf.tick();
            let (a0, a1) = (wp.add(s * 64), w1.add(s * 64));
            let (b0, b1) = (xp0.add(s * TERMS * TILE_U32), xp1.add(s * TERMS * TILE_U32));
            if !TWO {
                asm!(
                    "tileloadd tmm4, [{a0} + {lw}*1]",
                    "tileloadd tmm5, [{a1} + {lw}*1]",
                    "tileloadd tmm6, [{b0} + {s64}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm7, [{b0m} + {s64}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm7",
                    "tileloadd tmm6, [{b0l} + {s64}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b0m = in(reg) b0.add(TILE_U32),
                    b0l = in(reg) b0.add(2 * TILE_U32),
                    lw = in(reg) ldw,
                    s64 = in(reg) 64usize,
                    options(nostack, readonly)
                );
                continue;
            }
            asm!(
                "tileloadd tmm4, [{a0} + {lw}*1]",
                "tileloadd tmm5, [{a1} + {lw}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{b0m} + {s64}*1]",
                "tileloadd tmm7, [{b1m} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{b0l} + {s64}*1]",
                "tileloadd tmm7, [{b1l} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                b0m = in(reg) b0.add(TILE_U32),
                b1m = in(reg) b1.add(TILE_U32),
                b0l = in(reg) b0.add(2 * TILE_U32),
                b1l = in(reg) b1.add(2 * TILE_U32),
                lw = in(reg) ldw,
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{o} + {s64}*1], tmm0",
            "tilestored [{o1} + {s64}*1], tmm1",
            "tilestored [{o2} + {s64}*1], tmm2",
            "tilestored [{o3} + {s64}*1], tmm3",
            o = in(reg) out,
            o1 = in(reg) out.add(256),
            o2 = in(reg) out.add(512),
            o3 = in(reg) out.add(768),
            s64 = in(reg) 64usize,
            options(nostack)
        );
    }

    pub(super) fn matmul(x: &[f32], w: &[bf16], y: &mut [f32], t: usize, k: usize, n: usize) {
        let kc = k / KSTEP;
        // Token tiles, padded to pairs (a block covers 32 tokens), or one alone for at most 16
        // tokens (the same sequence of tile products per output element, on one token tile).
        let two = t > TILE;
        let mtiles = if two { t.div_ceil(2 * TILE) * 2 } else { 1 };
        let per_tile = kc * TERMS * TILE_U32;
        // Taken out of the thread's slot for the call (a task that this thread runs while it
        // waits below may be another product, which then finds the slot empty and allocates).
        let mut xp = XPACK.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        {
            if xp.len() < mtiles * per_tile {
                xp.resize(mtiles * per_tile, 0);
            }
            // Pack x: token tile `mt`, K step `s` at `(mt·kc + s)·TERMS·TILE_U32`; in parallel
            // over token tiles.
            let xpp = SendPtr(xp.as_mut_ptr());
            let pack = |mt: usize| {
                // SAFETY: tile `mt`'s `per_tile` elements are written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(xpp.get().add(mt * per_tile), per_tile)
                };
                // SAFETY: AVX-512F/BW and AVX2 are present (checked in `detect`).
                unsafe { pack_tile(x, t, k, mt * TILE, dst) };
            };
            // A parallel region costs more than packing one or two token tiles.
            if mtiles <= 2 {
                (0..mtiles).for_each(pack);
            } else {
                crate::par::for_each(mtiles, pack);
            }
            let xp: &[u32] = &xp[..mtiles * per_tile];
            // Tasks: panels of W rows (whole 32-row groups) × token ranges (whole 32-token
            // blocks), at least two per thread.
            let threads = crate::par::threads();
            let groups = n.div_ceil(2 * TILE);
            let blocks = mtiles.div_ceil(2);
            // Up to 4 groups (128 rows) a panel, so that a panel stays in L2 while token blocks
            // pass; with one token block nothing is reused, and larger panels mean fewer tasks,
            // each with its tile setup.
            let panel_groups = groups
                .div_ceil(2 * threads)
                .clamp(1, if blocks == 1 { groups } else { 4 });
            let panels = groups.div_ceil(panel_groups);
            let t_parts = (2 * threads).div_ceil(panels).min(blocks).max(1);
            let t_step = blocks.div_ceil(t_parts);
            let t_parts = blocks.div_ceil(t_step);
            let yp = SendPtr(y.as_mut_ptr());
            let ldw = k * 2;
            crate::par::for_each(panels * t_parts, |task| {
                let (pi, ti) = (task / t_parts, task % t_parts);
                let (g0, g1) = (pi * panel_groups, ((pi + 1) * panel_groups).min(groups));
                let (b0, b1) = (ti * t_step, ((ti + 1) * t_step).min(blocks));
                let _tiles = Tiles::new();
                let mut out = [0f32; 4 * TILE * TILE];
                // The zero-padded copy of a last group of fewer than 32 rows, in a buffer kept
                // by the thread (nothing is allocated once warm).
                let mut pad = PAD.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
                let mut padded = false;
                for bi in b0..b1 {
                    let x0 = xp[2 * bi * per_tile..].as_ptr();
                    let x1 = xp[(2 * bi + usize::from(two)) * per_tile..].as_ptr();
                    for g in g0..g1 {
                        let (n0, rows) = (g * 2 * TILE, (n - g * 2 * TILE).min(2 * TILE));
                        let wp = if rows == 2 * TILE {
                            w[n0 * k..].as_ptr().cast::<u8>()
                        } else {
                            // A last group of fewer than 32 rows reads a zero-padded copy.
                            if !padded {
                                pad.clear();
                                pad.extend_from_slice(&w[n0 * k..]);
                                pad.resize(2 * TILE * k, bf16::ZERO);
                                padded = true;
                            }
                            pad.as_ptr().cast::<u8>()
                        };
                        // SAFETY: tiles configured; `wp` has 32 rows of K bf16 (`ldw` bytes
                        // apart), the x tiles `kc` steps each; `out` has 1024 floats.
                        unsafe {
                            let o = out.as_mut_ptr();
                            let pf = &mut Prefetch::default();
                            if two {
                                block::<true>(wp, ldw, x0, x1, kc, o, pf)
                            } else {
                                block::<false>(wp, ldw, x0, x1, kc, o, pf)
                            }
                        };
                        // out[wt][xt][i][j] = yᵀ[n0 + 16·wt + i][32·bi + 16·xt + j]: each tile
                        // transposed into its place in y, clipped at T and N.
                        for (q, tile) in out.chunks_exact(TILE * TILE).enumerate() {
                            let (wt, xt) = (q / 2, q % 2);
                            let nr = TILE.min(rows.saturating_sub(wt * TILE));
                            let row0 = 2 * bi * TILE + xt * TILE;
                            // (With one token tile, the second's rows start at 16 ≥ T: none.)
                            let nt = TILE.min(t.saturating_sub(row0));
                            if nr > 0 && nt > 0 {
                                // SAFETY: rows row0..row0+nt, columns n0+16·wt..+nr of y lie
                                // inside it and belong to this task's token block and W
                                // group; AVX2 is present.
                                unsafe {
                                    crate::transpose::x86::transpose(
                                        tile.as_ptr(),
                                        nr,
                                        nt,
                                        TILE,
                                        yp.get().add(row0 * n + n0 + wt * TILE),
                                        n,
                                    )
                                };
                            }
                        }
                    }
                }
                PAD.with(|cell| *cell.borrow_mut() = pad);
            });
        }
        XPACK.with(|cell| *cell.borrow_mut() = xp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [−1, 1] with full f32 mantissas.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Against an f64 sum of the same bf16 weights and f32 activations, every element is within
    /// `2⁻²⁰·Σ|x·w|` (f32 summation; the three-term split is exact, where plain bf16 activations
    /// would miss by up to `2⁻⁸·Σ|x·w|` and two terms by `2⁻¹⁶`), at sizes with partial token
    /// blocks and partial 32-row groups. On machines without AMX there is nothing to run.
    /// Batch invariance on the tile unit: row `r` of `y` has the same bits whatever the number of
    /// rows (one token tile for up to 16, pairs of tiles beyond) and the task split.
    #[test]
    fn amx_rows_do_not_depend_on_the_row_count() {
        if !available() {
            eprintln!("amx_rows_do_not_depend_on_the_row_count: no AMX-BF16 here");
            return;
        }
        let (k, n, tmax) = (96, 70, 45);
        let x = values(tmax * k, 5);
        let w: Vec<bf16> = values(n * k, 6).into_iter().map(bf16::from_f32).collect();
        let mut full = vec![0f32; tmax * n];
        matmul_bf16(&x, &w, &mut full, tmax, k, n);
        for t in [1, 2, 8, 9, 16, 17, 32, 33] {
            let mut y = vec![0f32; t * n];
            matmul_bf16(&x[..t * k], &w, &mut y, t, k, n);
            for (i, (a, b)) in y.iter().zip(&full).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "T = {t}: y[{}][{}]", i / n, i % n);
            }
        }
    }

    #[test]
    fn amx_matches_f64_reference() {
        if !available() {
            eprintln!("amx_matches_f64_reference: no AMX-BF16 here; the FMA path serves instead");
            return;
        }
        for (t, k, n) in [
            (1, 32, 1),
            (9, 64, 17),
            (17, 96, 33),
            (40, 2304, 48),
            (100, 512, 70),
            (33, 1024, 64),
        ] {
            let x = values(t * k, (t * 31 + k) as u64);
            let w: Vec<bf16> = values(n * k, (n * 7 + k) as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut y = vec![f32::NAN; t * n];
            matmul_bf16(&x, &w, &mut y, t, k, n);
            let mut worst = 0f64;
            for ti in 0..t {
                for ni in 0..n {
                    let (mut s, mut a) = (0f64, 0f64);
                    for ki in 0..k {
                        let p = x[ti * k + ki] as f64 * w[ni * k + ki].to_f64();
                        s += p;
                        a += p.abs();
                    }
                    let err = (y[ti * n + ni] as f64 - s).abs() / a.max(1e-30);
                    assert!(
                        err <= 2f64.powi(-20),
                        "({t}, {k}, {n}) y[{ti}][{ni}] = {} vs {s}: {err:e} of Σ|xw|",
                        y[ti * n + ni]
                    );
                    worst = worst.max(err);
                }
            }
            eprintln!("({t}, {k}, {n}): worst error {worst:e} of Σ|xw|");
        }
    }
}
