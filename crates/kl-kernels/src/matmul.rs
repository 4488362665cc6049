//! `y = x · Wᵀ` with activations in f32 and weights in their stored dtype.
//!
//! `x` is `[T, K]`, `W` is `[N, K]` (PyTorch Linear layout), `y` is `[T, N]`.
//!
//! Two regimes:
//! - **Few rows** (`T ≤ GEMV_MAX_ROWS`, decode): a bandwidth-bound matrix–vector product. Weight
//!   rows are split across threads; a group of rows (3 for a single `x` row, the decode case) is
//!   streamed once in its stored dtype (bf16 and f16 widened in registers), with the group two
//!   on prefetched (non-temporal on AMD: each weight line is read once per token), and dotted
//!   against every `x` row. A single `x` row over a matrix of a few MiB or more takes its three
//!   rows from three thirds of a task instead (`StreamPlan`): three long streams per thread,
//!   each prefetched a couple of rows ahead, which read memory faster than one; several
//!   one-row products at once ([`gemv_many`], a layer's decode products) are read as one set of
//!   such streams across their matrices, where each alone would be too short. Up to 4 `x`
//!   rows it stays on AVX2 even where AVX-512 is available: it is bound by memory bandwidth,
//!   not by the vector width. 5 to 8 `x` rows take a 16-lane
//!   tile there (two W rows a register, the same bits), which widens each weight once for all
//!   of them.
//! - **Many rows** (prefill): a compute-bound product. A panel of `W` rows is widened once into a
//!   thread-local f32 buffer (never the whole matrix, ~768 KiB so it stays in L2) and multiplied
//!   against blocks of `x` rows with a register-blocked microkernel. `K` goes in blocks, the `x`
//!   rows of a block packed so that they stay in L1; the accumulators are saved between blocks
//!   bit for bit. Tasks are (panel, row range) pairs. Two kernels:
//!   - **AVX2** (and portable): 4 `x` rows × 3 `W` rows = 12 8-lane accumulators, `K` blocks of
//!     at most 1024 columns, panel rows padded against 4 KiB aliasing.
//!   - **AVX-512F** (where the CPU has it, unless `KL_NO_AVX512=1`): 6 `x` rows × 4 *pairs* of
//!     `W` rows = 24 16-lane accumulators, `K` blocks of at most 768 columns. A 512-bit register
//!     holds the 8-lane accumulators of two `W` rows side by side, `[acc(x, W[j]) | acc(x,
//!     W[j+1])]`; the panel is packed with rows `j` and `j+1` interleaved in 8-column chunks, so
//!     that one 64-byte load gives `[W[j][k..k+8] | W[j+1][k..k+8]]`, and the 8 `x` columns are
//!     broadcast to both halves. The `x` rows are read in place when `K` is a multiple of 8
//!     (packed, with a zeroed tail, otherwise); the next `x` block is prefetched while the
//!     current one is swept. A task with at most
//!     `SLICE_MAX_ROWS` (128) `x` rows — an expert of the released model, which sees about 64
//!     rows of a 2048-token chunk, or a short prompt — packs its panel one (8-row group, `K`
//!     block) slice at a time into L1 and sweeps every `x` block over it, instead of writing the
//!     whole panel to L2 for a few sweeps: the same tiles, the same bits.
//!
//! **Batch invariance.** Every output element is accumulated in one canonical order that depends
//! only on `K`: one 8-lane accumulator, lane `l` summing `x[k]·w[k]` for `k ≡ l (mod 8)` in
//! increasing `k` (fused multiply–add on AVX2 and AVX-512, multiply then add in the portable code),
//! the `K mod 8` tail as one last step on zero-padded lanes (`+0` in both `x` and `W`), then the
//! fixed tree `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. Decode and prefill run the same AVX2 tile
//! kernel (or the same portable one). The AVX-512 kernel computes the same bits: each half of a
//! 512-bit accumulator is exactly one AVX2 accumulator — its lane `l` sees the same operands
//! (`x[k]` from the broadcast, `W[j][k]` from the interleaved panel) in the same order, with the
//! same fused multiply–add and rounding, starting from `+0` and saved/restored bit for bit across
//! `K` blocks — and the final reduction adds the same pairs in the same tree, several registers
//! at a time (IEEE addition is commutative, so only which operands meet matters, not which lane
//! they sit in; as everywhere in Rust, the payload bits of a NaN result are not specified). Hence `y[t, n]` is a function of `x[t, :]` and `W[n, :]` only — bit-identical
//! whatever `T`, the thread count, the tiling, the SIMD width, or whether the row went through the
//! decode or the prefill path — so a prompt prefilled in pieces gives the same bits as one
//! prefill, and decode (AVX2) agrees with prefill (AVX-512). [`matmul_isa`] runs a narrower path
//! on purpose, to compare them.
//!
//! [`matmul_reference`] is the plain triple loop both are tested against.

use crate::cpu::Isa;
use crate::par::SendPtr;
use crate::Elem;
use half::{bf16, f16};
use std::any::TypeId;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

mod many;
pub use many::{gemv_many, OneRowJobs};

/// Row count up to which the matrix–vector path is used.
pub const GEMV_MAX_ROWS: usize = 8;

/// W rows per tile of the 16-lane matrix–vector path (5 to 8 x rows, AVX-512): two pairs.
const WIDE_GEMV_ROWS: usize = 4;

/// Plain `y[t][n] = Σ_k x[t][k]·w[n][k]`.
pub fn matmul_reference<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    assert_eq!(x.len(), t * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(y.len(), t * n);
    for ti in 0..t {
        for ni in 0..n {
            let mut s = 0f32;
            for ki in 0..k {
                s += x[ti * k + ki] * w[ni * k + ki].to_f32();
            }
            y[ti * n + ni] = s;
        }
    }
}

/// Optimised `y = x · Wᵀ` (same contract as [`matmul_reference`]).
///
/// Batch invariant: `y[t, n]` depends only on `x[t, :]` and `W[n, :]` (bitwise), not on `T`, the
/// thread count or the path taken (see the module docs).
pub fn matmul<W: Elem>(x: &[f32], w: &[W], y: &mut [f32], t: usize, k: usize, n: usize) {
    matmul_isa(crate::cpu::features().isa(), x, w, y, t, k, n)
}

/// Whether [`matmul`] gives a bf16-weight product of `t` rows and `K = k` to
/// [`crate::bf16_activations`]'s panel products (the switch on, no AMX), whose rounded rows
/// several products of one `x` can then share: [`crate::bf16_activations::with_rounded_rows`]
/// and [`matmul_rounded`] give each of them [`matmul`]'s bits with one rounding of `x`.
pub fn rounds_rows(t: usize, k: usize) -> bool {
    bf16_opt_in(crate::cpu::features().isa(), true, t, k) == Bf16OptIn::Bf16Activations
        && crate::bf16_activations::shares_rounding(t, k)
}

/// The opt-in prefill path a product of bf16 weights takes (decode stays on the
/// bandwidth-bound FMA kernel, so batch invariance is lost under either).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bf16OptIn {
    /// AMX tiles (`crate::amx`; AMX did not match the FMA kernel in decode).
    Amx,
    /// bf16 activations (`crate::bf16_activations`).
    Bf16Activations,
    /// Neither: the f32-activation kernels.
    None,
}

/// [`Bf16OptIn`] for a product of `t` rows and `K = k` on kernels no wider than `isa`; bf16
/// activations only with `bf16_ok` (false for `matmul_f32_activations`). The one rule both
/// `matmul` and [`rounds_rows`] follow.
fn bf16_opt_in(isa: Isa, bf16_ok: bool, t: usize, k: usize) -> Bf16OptIn {
    if !cfg!(target_arch = "x86_64") || t <= GEMV_MAX_ROWS || isa != Isa::Avx512 {
        Bf16OptIn::None
    } else if crate::amx::fits(k) && crate::amx::enabled() {
        Bf16OptIn::Amx
    } else if bf16_ok && crate::bf16_activations::fits(k) && crate::bf16_activations::enabled() {
        Bf16OptIn::Bf16Activations
    } else {
        Bf16OptIn::None
    }
}

/// [`matmul`] of bf16 weights on rows rounded once, where [`rounds_rows`] says so: the same
/// bits (and counted in the products' tally, as [`matmul`] is).
pub fn matmul_rounded(
    x: crate::bf16_activations::RoundedRows<'_>,
    w: &[bf16],
    y: &mut [f32],
    n: usize,
) {
    let (t, k) = (x.rows(), x.cols());
    tallied(t, k, n, || {
        crate::bf16_activations::matmul_bf16_rounded(x, w, y, n)
    });
}

/// [`matmul`] with f32 activations whatever [`crate::bf16_activations`] says: for products
/// whose reference keeps their inputs in f32 (the MoE router's logits, spec §7.2). The same
/// bits as [`matmul`] with the switch off.
pub fn matmul_f32_activations<W: Elem>(
    x: &[f32],
    w: &[W],
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    matmul_on(crate::cpu::features().isa(), false, x, w, y, t, k, n)
}

/// [`matmul`] using kernels no wider than `isa` (capped at what [`crate::cpu::features`] allows):
/// `Isa::Avx2` runs the AVX2 prefill kernel even where the AVX-512 one is available (decode,
/// `T ≤ GEMV_MAX_ROWS`, is AVX2 either way).
///
/// The AVX2 and AVX-512 paths give the same bits (see the module docs), so choosing between them
/// only changes speed; this exists to compare them in tests and benchmarks. `Isa::Portable`
/// selects the portable code, whose bits differ (multiply then add instead of fused
/// multiply–add).
pub fn matmul_isa<W: Elem>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    matmul_on(isa, true, x, w, y, t, k, n)
}

/// [`matmul_isa`], taking the opt-in bf16 activations where they are switched on only if
/// `bf16_ok`.
#[allow(clippy::too_many_arguments)]
fn matmul_on<W: Elem>(
    isa: Isa,
    bf16_ok: bool,
    x: &[f32],
    w: &[W],
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    let isa = isa.min(crate::cpu::features().isa());
    check_shape("matmul", x.len(), w.len(), y.len(), t, k, n);
    if t == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let id = TypeId::of::<W>();
    // SAFETY (all three casts): `W` is exactly the type named by the `TypeId` test.
    if id == TypeId::of::<bf16>() {
        let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const bf16, w.len()) };
        run(isa, bf16_ok, x, w, y, t, k, n);
    } else if id == TypeId::of::<f32>() {
        let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) };
        run(isa, bf16_ok, x, w, y, t, k, n);
    } else if id == TypeId::of::<f16>() {
        let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f16, w.len()) };
        run(isa, bf16_ok, x, w, y, t, k, n);
    } else {
        run(isa, bf16_ok, x, &Generic(w), y, t, k, n);
    }
}

/// Weight storage the tile kernels can read: a row-major `[N, K]` matrix of some element type.
trait Rows: Sync {
    /// Element type (for the AVX2 loads).
    type E: Copy + Sync + 'static;
    /// The whole matrix.
    fn data(&self) -> &[Self::E];
    /// Widen `src` into `dst` (same length).
    fn widen(src: &[Self::E], dst: &mut [f32]);
    /// Whether the AVX2 loads of `E` may be used on this CPU.
    fn simd_ok() -> bool;
    /// AVX2 loads of `E`.
    #[cfg(target_arch = "x86_64")]
    type L: x86::Load<E = Self::E>;
}

macro_rules! rows_impl {
    ($t:ty, $load:ty, $ok:expr) => {
        impl Rows for [$t] {
            type E = $t;
            fn data(&self) -> &[$t] {
                self
            }
            fn widen(src: &[$t], dst: &mut [f32]) {
                <$t as Elem>::widen(src, dst)
            }
            fn simd_ok() -> bool {
                $ok
            }
            #[cfg(target_arch = "x86_64")]
            type L = $load;
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    crate::cpu::features().avx2_fma
}
#[cfg(target_arch = "x86_64")]
fn avx2_f16c() -> bool {
    crate::cpu::features().avx2_fma && std::arch::is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn avx2() -> bool {
    false
}
#[cfg(not(target_arch = "x86_64"))]
fn avx2_f16c() -> bool {
    false
}

rows_impl!(f32, x86::F32, avx2());
rows_impl!(bf16, x86::Bf16, avx2());
rows_impl!(f16, x86::F16, avx2_f16c());

/// Any other [`Elem`]: only the prefill path's widening is used (decode widens row pieces too).
struct Generic<'a, W>(&'a [W]);

impl<W: Elem> Rows for Generic<'_, W> {
    type E = W;
    fn data(&self) -> &[W] {
        self.0
    }
    fn widen(src: &[W], dst: &mut [f32]) {
        W::widen(src, dst)
    }
    fn simd_ok() -> bool {
        false
    }
    #[cfg(target_arch = "x86_64")]
    type L = x86::Never<W>;
}

/// Work and time of the compute-bound products (`T > GEMV_MAX_ROWS`) run, on any thread, since
/// [`tally_start`]: a benchmark aid (`kimi-linear bench` quotes the matrix products of a prefill
/// against the FMA peak with it). While no tally runs, a product pays one relaxed atomic load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Floating-point operations (`2·T·K·N` per product).
    pub flops: u64,
    /// Wall time during which at least one product was running (overlapping products, such as
    /// experts on different threads, count once).
    pub busy_secs: f64,
}

static TALLY_ON: AtomicBool = AtomicBool::new(false);

/// Products running now, when the first of them started, and the totals.
struct TallyState {
    active: usize,
    since: Option<Instant>,
    busy: f64,
    flops: u64,
}

static TALLY: Mutex<TallyState> = Mutex::new(TallyState {
    active: 0,
    since: None,
    busy: 0.0,
    flops: 0,
});

fn tally_state() -> std::sync::MutexGuard<'static, TallyState> {
    TALLY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Start (or restart from zero) the process-wide [`Tally`].
pub fn tally_start() {
    let mut st = tally_state();
    *st = TallyState {
        active: 0,
        since: None,
        busy: 0.0,
        flops: 0,
    };
    TALLY_ON.store(true, Ordering::Release);
}

/// Stop the tally and return what it counted.
pub fn tally_stop() -> Tally {
    TALLY_ON.store(false, Ordering::Release);
    let st = tally_state();
    Tally {
        flops: st.flops,
        busy_secs: st.busy,
    }
}

/// Panics, naming `op` and the operand, unless `x`, `W` and `y` hold `T·K`, `N·K` and `T·N`
/// elements.
pub(crate) fn check_shape(op: &str, x: usize, w: usize, y: usize, t: usize, k: usize, n: usize) {
    assert_eq!(x, t * k, "{op}: x has {x} elements, expected T·K = {t}·{k}");
    assert_eq!(w, n * k, "{op}: W has {w} elements, expected N·K = {n}·{k}");
    assert_eq!(y, t * n, "{op}: y has {y} elements, expected T·N = {t}·{n}");
}

/// Dispatch to the decode (gemv) or prefill path.
#[allow(clippy::too_many_arguments)]
fn run<R: Rows + ?Sized>(
    isa: Isa,
    bf16_ok: bool,
    x: &[f32],
    w: &R,
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    tallied(t, k, n, || run_path(isa, bf16_ok, x, w, y, t, k, n));
}

/// `f`, a product of `t × k` by `k × n`, counted in the tally when it is on (prefill products
/// only: more than [`GEMV_MAX_ROWS`] rows).
fn tallied(t: usize, k: usize, n: usize, f: impl FnOnce()) {
    if t > GEMV_MAX_ROWS && TALLY_ON.load(Ordering::Relaxed) {
        {
            let mut st = tally_state();
            if st.active == 0 {
                st.since = Some(Instant::now());
            }
            st.active += 1;
            st.flops += 2 * (t * k * n) as u64;
        }
        f();
        let mut st = tally_state();
        st.active -= 1;
        if st.active == 0 {
            if let Some(t0) = st.since.take() {
                st.busy += t0.elapsed().as_secs_f64();
            }
        }
    } else {
        f();
    }
}

/// [`run`] without the tally.
#[allow(clippy::too_many_arguments)]
fn run_path<R: Rows + ?Sized>(
    isa: Isa,
    bf16_ok: bool,
    x: &[f32],
    w: &R,
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    let simd = isa >= Isa::Avx2 && R::simd_ok();
    #[cfg(target_arch = "x86_64")]
    if simd && TypeId::of::<R::E>() == TypeId::of::<bf16>() {
        let wd = w.data();
        // SAFETY: `R::E` is `bf16` (checked above), so the slice is reinterpreted as itself.
        let wb = unsafe { std::slice::from_raw_parts(wd.as_ptr().cast::<bf16>(), wd.len()) };
        match bf16_opt_in(isa, bf16_ok, t, k) {
            Bf16OptIn::Amx => return crate::amx::matmul_bf16(x, wb, y, t, k, n),
            Bf16OptIn::Bf16Activations => {
                return crate::bf16_activations::matmul_bf16(x, wb, y, t, k, n)
            }
            Bf16OptIn::None => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bf16_ok;
    if t <= GEMV_MAX_ROWS {
        gemv(simd, isa == Isa::Avx512, x, w, y, t, k, n);
    } else {
        #[cfg(target_arch = "x86_64")]
        if simd && isa == Isa::Avx512 {
            return prefill_wide(x, w, y, t, k, n);
        }
        prefill(simd, x, w, y, t, k, n);
    }
}

/// One `mr × nr` tile: `y[r·ldy + j] = dot8(x row r, w row j)` for `r < mr`, `j < nr`.
///
/// `x` rows start at `xp` with stride `ldx`; `w` rows at `wp` with stride `ldw` (elements of `E`).
///
/// # Safety
/// All rows hold `k` readable elements; the `y` elements are writable and not aliased.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile_dyn<R: Rows + ?Sized>(
    simd: bool,
    mr: usize,
    nr: usize,
    xp: *const f32,
    ldx: usize,
    wp: *const R::E,
    ldw: usize,
    k: usize,
    yp: *mut f32,
    ldy: usize,
    pf: *const u8,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let null = std::ptr::null_mut();
        return x86::tile_dyn::<R::L>(mr, nr, xp, ldx, wp, ldw, (0, k), null, false, yp, ldy, pf);
    }
    let _ = (simd, pf);
    portable::tile_dyn::<R>(mr, nr, xp, ldx, wp, ldw, k, yp, ldy)
}

/// Decode: weight rows split across threads, each group of `nr` rows streamed once. `wide`:
/// the CPU has AVX-512 and the caller allows it (5 to 8 x rows then take the 16-lane tile).
#[allow(clippy::too_many_arguments)]
fn gemv<R: Rows + ?Sized>(
    simd: bool,
    wide: bool,
    x: &[f32],
    w: &R,
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    // Rows of W per tile and x rows per tile. A single row reads 3 W rows at a time (3 weight
    // streams plus the prefetch of the block two tiles on): on the Zen 5 VM, alternating in the
    // model, decode streamed 6–14% more bytes a second than with 6 rows (48B shape 6.49 → 6.92,
    // 8.87 → 10.13 tok/s; `mini` 154 → 167, 185 → 206), where 2 and 4 rows gained less; with
    // weights already in L3 the 3 chains of FMAs are about 10% slower than 6 (`cargo bench`'s
    // hot row), which decode, streaming from memory, never sees. The bits do not depend on it.
    // Three x rows take three W rows, not four: a 3 × 4 tile's 12 accumulators, 4 weight
    // registers and the x register are one more than AVX2's 16 registers, and with the spill a
    // 3-row product ran at a fixed 9.5–9.8 ms (`cargo bench`'s experts from memory, Zen 5 VM)
    // where 3 × 3 tiles stream like 2 or 4 rows do: 5.6–8.7 ms, with the memory's phase.
    // Five to eight x rows, where the CPU has AVX-512: one pass of the 16-lane tile over 4 W
    // rows (`x512::gemv_tile`, the same bits), instead of two passes of the AVX2 tile that
    // widen every W element twice and ran compute-bound: `cargo bench`'s experts from memory
    // (2304 × 1024, three alternations) 5 and 6 rows 12.2–13.0 → 9.1–11.5 ms, 7 and 8 rows
    // 13.4–15.4 → 12.4–13.6 (4 rows, memory-bound: 8.5–11.8). With 8 rows the product's
    // FLOPs alone take most of the time its bytes do, and the two barely overlap.
    let wide = cfg!(target_arch = "x86_64") && simd && wide && (5..=8).contains(&t);
    #[cfg(target_arch = "x86_64")]
    if t == 1 && simd {
        if let Some(plan) = StreamPlan::new(n, k * std::mem::size_of::<R::E>().max(1)) {
            // SAFETY: `matmul` checked the shapes; `simd` says the CPU has AVX2 and FMA (and
            // F16C for f16).
            return unsafe { many::one_product::<R::L>(x, w.data(), y, k, n, plan) };
        }
    }
    let (nr, mr) = match t {
        _ if wide => (WIDE_GEMV_ROWS, t),
        1 => (3, 1),
        2 => (4, 2),
        3 => (3, 3),
        _ => (3, 4),
    };
    let threads = crate::par::threads();
    let esz = std::mem::size_of::<R::E>().max(1);
    // About 64 KiB of weights per task, at least 4 tasks per thread when there is enough work:
    // the threads then finish a product within a small task of each other (256 KiB tasks
    // streamed 2–7% slower on 1–2 MiB products, in-process).
    let rows_per_task = ((64 * 1024) / (k * esz).max(1))
        .clamp(1, n.div_ceil(threads * 4).max(1))
        .next_multiple_of(nr);
    let yp = SendPtr(y.as_mut_ptr());
    let wd = w.data();
    let body = |task: usize| {
        let n0 = task * rows_per_task;
        let n1 = (n0 + rows_per_task).min(n);
        let mut nb = n0;
        while nb < n1 {
            let nr_here = nr.min(n1 - nb);
            // Prefetch the next rows of W while the first x block streams these.
            let next = nb + 2 * nr_here;
            let mut tb = 0;
            while tb < t {
                let pf = if tb == 0 && next < n {
                    // SAFETY: row `next` < n starts inside W.
                    unsafe { wd.as_ptr().add(next * k) as *const u8 }
                } else {
                    std::ptr::null()
                };
                let mr_here = mr.min(t - tb);
                // SAFETY: rows nb..nb+nr_here of W and tb..tb+mr_here of x hold k elements;
                // y elements (tb.., nb..) belong to this task only; `wide` only where the CPU
                // has AVX-512 (x86-64).
                #[cfg(target_arch = "x86_64")]
                if wide {
                    unsafe {
                        x512::gemv_tile_dyn::<R::L>(
                            mr_here,
                            x.as_ptr().add(tb * k),
                            k,
                            wd.as_ptr().add(nb * k),
                            k,
                            nr_here,
                            k,
                            yp.get().add(tb * n + nb),
                            n,
                            pf,
                        );
                    }
                    tb += mr_here;
                    continue;
                }
                // SAFETY: as above.
                unsafe {
                    tile_dyn::<R>(
                        simd,
                        mr_here,
                        nr_here,
                        x.as_ptr().add(tb * k),
                        k,
                        wd.as_ptr().add(nb * k),
                        k,
                        k,
                        yp.get().add(tb * n + nb),
                        n,
                        pf,
                    );
                }
                tb += mr_here;
            }
            nb += nr_here;
        }
    };
    let tasks = n.div_ceil(rows_per_task);
    if tasks == 1 {
        body(0);
    } else {
        crate::par::for_each(tasks, body);
    }
}

/// Bytes of weights that each of a decode task's three streams should read at least: a
/// shorter product keeps [`gemv`]'s adjacent row groups (see [`StreamPlan`]). At 256 KiB,
/// `mini`'s 2 MiB projections (two tasks of 341 KiB streams, one per thread, where 32 small
/// tasks had balanced the threads) decoded 3% slower in the model in a slow memory phase (12
/// alternating pairs, medians 157.1 against 162.6 tok/s); from 512 KiB on only products of
/// 3 MiB and more take the streams, and `mini` decodes as before (its output head aside).
#[cfg(target_arch = "x86_64")]
const STREAM_MIN_BYTES: usize = 512 * 1024;

/// Bytes per stream that a product is split for when it is large: tasks get longer streams up
/// to about this, then more tasks. With 2 MiB each of `mini`'s decode groups
/// ([`gemv_many`]: 5–10 MiB) is one task per thread. In-process (the thirteenth session, two
/// threads, the variants alternated round by round over 320 MiB of `mini`'s expert gate/up
/// groups and its 62.5 MiB output head): 2 MiB against 1 MiB read the groups 2.9% faster in
/// fast memory phases (273 rounds; 0.9% in 727 slow ones) and the head the same; 512 KiB read
/// both 8–10% slower in fast phases. In the model, `mini`'s decode in a fast phase +1.0%
/// (median of 30 alternating pairs, 20 won); the 48B shape the same.
#[cfg(target_arch = "x86_64")]
const STREAM_TARGET_BYTES: usize = 2 * 1024 * 1024;

/// Rows ahead, within each of its three streams, that a decode tile prefetches (see
/// [`many`]).
#[cfg(target_arch = "x86_64")]
const STREAM_PREFETCH_ROWS: usize = 2;

/// How a one-row product ([`gemv`], decode) is split when its weights are read as three
/// streams per task: `tasks` contiguous row ranges of `rows` rows (the last one shorter), as
/// many per thread.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamPlan {
    tasks: usize,
    rows: usize,
}

#[cfg(target_arch = "x86_64")]
impl StreamPlan {
    /// The split of `n` weight rows of `row_bytes` bytes over the pool's threads, or `None`
    /// where a stream would read less than [`STREAM_MIN_BYTES`].
    ///
    /// Why three streams: a tile reads three weight rows at once (three chains of FMAs, one
    /// per output, hide the FMA latency). Taken next to each other, as in [`gemv`]'s other
    /// paths, they are one stream of memory per thread, which on the Zen 5 VM streams at one
    /// sequential reader's rate (the bandwidth probe's one-stream figure); three long
    /// monotonic streams per thread (the tile's rows from three thirds of a task, each moving
    /// down its third) read like the probe's several streams. A throwaway harness, two threads
    /// over 151 MB of 2304-wide matrices, variants alternated round by round (history, the
    /// twelfth session), in fast memory phases: three streams of 64 / 128 / 256 / 512 / 1024
    /// KiB per task 71 / 77 / 84 / 89 / 92 GB/s against 82 for adjacent rows (slow phases: 44,
    /// 47, then 49 for all). The library before and after, built into the same harness and
    /// alternated: 2304 × 4096 products in fast phases 82.6 → 88.0 GB/s (0.98 → 1.05 of the
    /// probe's one-stream read in the same rounds), 1024 × 1024 ones (`mini`'s, two tasks of
    /// 341 KiB streams) 0.84 → 0.97 of its four-stream read; in slow phases the same (but see
    /// [`STREAM_MIN_BYTES`] for what short streams did in the model). The bits are the same
    /// either way: each output is one row's chain, whichever rows share its tile.
    fn new(n: usize, row_bytes: usize) -> Option<StreamPlan> {
        let threads = crate::par::threads();
        let total = n * row_bytes;
        let per_thread = total.div_ceil(threads * 3 * STREAM_TARGET_BYTES).max(1);
        let tasks = threads * per_thread;
        let rows = n.div_ceil(tasks);
        (rows * row_bytes >= 3 * STREAM_MIN_BYTES).then_some(StreamPlan {
            tasks: n.div_ceil(rows),
            rows,
        })
    }
}

/// x rows per prefill tile.
const MR: usize = 4;
/// W rows per prefill tile.
const NR: usize = 3;

/// Largest K block of the prefill path: `MR` rows of x (`MR·KC·4` bytes) stay in L1 while the
/// panel's rows stream past them from L2.
const KC: usize = 1024;

/// Per-thread scratch of the prefill path (grows to the largest panel seen, ≤ ~1 MiB; on the
/// AVX-512 path, when `K` is not a multiple of 8, also to a slice task's packed x rows, at most
/// `SLICE_MAX_ROWS · (K + 16 · K blocks)` floats).
#[derive(Default)]
struct Scratch {
    /// Widened weight panel `[rows, ldp]` (`ldp ≥ K`, padded so rows do not alias in L1).
    panel: Vec<f32>,
    /// Saved accumulators between K blocks: `[rows / NR][MR·NR][8]`.
    part: Vec<f32>,
    /// The current `MR × K-block` of x, packed with a padded stride (every block of a slice
    /// task's x rows, on the AVX-512 path).
    xpack: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Prefill: `(T range, W panel)` tasks; each widens its panel into a thread-local f32 buffer and
/// sweeps its x rows in `MR`-row blocks over the panel's `NR`-row groups, `K` in blocks of at
/// most `KC` columns (partial accumulators saved between blocks, so the order is unchanged).
fn prefill<R: Rows + ?Sized>(
    simd: bool,
    x: &[f32],
    w: &R,
    y: &mut [f32],
    t: usize,
    k: usize,
    n: usize,
) {
    let (nc, panels, t_step, t_parts) = plan_tasks(n, t, k, NR, MR);
    // K blocks: equal widths, multiples of 8 (the last one takes the tail).
    let kblocks = if simd { k.div_ceil(KC) } else { 1 };
    let kb_w = k.div_ceil(kblocks).next_multiple_of(8);
    let yp = SendPtr(y.as_mut_ptr());
    let wd = w.data();
    let body = |task: usize| {
        let (pi, ti) = (task / t_parts, task % t_parts);
        let (n0, n1) = (pi * nc, ((pi + 1) * nc).min(n));
        let (t0, t1) = (ti * t_step, ((ti + 1) * t_step).min(t));
        let rows = n1 - n0;
        SCRATCH.with(|cell| {
            let mut sc = cell.borrow_mut();
            let Scratch { panel, part, xpack } = &mut *sc;
            // Row strides padded by 64 bytes so that the 4 x rows and 3 W rows of a tile do not
            // all map to the same L1 sets when K·4 is a multiple of 4 KiB.
            let ldp = k.next_multiple_of(16) + 16;
            if panel.len() < rows * ldp {
                panel.resize(rows * ldp, 0.0);
            }
            for r in 0..rows {
                let src = &wd[(n0 + r) * k..(n0 + r + 1) * k];
                R::widen(src, &mut panel[r * ldp..r * ldp + k]);
            }
            if !simd {
                for tb in (t0..t1).step_by(MR) {
                    let mr = MR.min(t1 - tb);
                    for nb in (0..rows).step_by(NR) {
                        let nr = NR.min(rows - nb);
                        // SAFETY: panel rows nb..nb+nr and x rows tb..tb+mr hold k elements;
                        // the y elements (tb.., n0+nb..) belong to this task only.
                        unsafe {
                            portable::tile_dyn::<[f32]>(
                                mr,
                                nr,
                                x[tb * k..].as_ptr(),
                                k,
                                panel[nb * ldp..].as_ptr(),
                                ldp,
                                k,
                                yp.get().add(tb * n + n0 + nb),
                                n,
                            );
                        }
                    }
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            {
                let groups = rows.div_ceil(NR);
                if part.len() < groups * MR * NR * 8 {
                    part.resize(groups * MR * NR * 8, 0.0);
                }
                let ldxp = kb_w + 16;
                if xpack.len() < MR * ldxp {
                    xpack.resize(MR * ldxp, 0.0);
                }
                let partp = part.as_mut_ptr();
                for tb in (t0..t1).step_by(MR) {
                    let mr = MR.min(t1 - tb);
                    let mut k0 = 0;
                    while k0 < k {
                        let k1 = (k0 + kb_w).min(k);
                        let kw = k1 - k0;
                        pack_x_block(x, k, tb, mr, (k0, k1), ldxp, xpack);
                        for nb in (0..rows).step_by(NR) {
                            let nr = NR.min(rows - nb);
                            // SAFETY: xpack rows hold kw elements, panel rows nb..nb+nr hold
                            // k ≥ k0 + kw; `part` holds this group's MR·NR·8 floats; the y
                            // elements (tb.., n0+nb..) belong to this task only. k0 is a multiple
                            // of 8, so the block's tail (if any) is the row's tail.
                            unsafe {
                                let yo = if k1 == k {
                                    yp.get().add(tb * n + n0 + nb)
                                } else {
                                    std::ptr::null_mut()
                                };
                                x86::tile_dyn::<x86::F32>(
                                    mr,
                                    nr,
                                    xpack.as_ptr(),
                                    ldxp,
                                    panel[nb * ldp + k0..].as_ptr(),
                                    ldp,
                                    (0, kw),
                                    partp.add(nb / NR * MR * NR * 8),
                                    k0 > 0,
                                    yo,
                                    n,
                                    std::ptr::null(),
                                );
                            }
                        }
                        k0 = k1;
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (part, xpack, kb_w);
        });
    };
    crate::par::for_each(panels * t_parts, body);
}

/// Most x rows for which a task of the AVX-512 prefill path packs its panel a slice at a time
/// into L1 instead of whole into L2 (see `prefill_wide`).
///
/// A slice is swept by every x block of the task, so each sweep reads the task's x rows of one
/// `K` block (at most `128 · 768 · 4` bytes = 384 KiB here) from L2; a whole panel (up to 768
/// KiB) is written to L2 once and read by each x block. `cargo bench`'s expert products (80
/// distinct matrices from memory, two threads, alternating on the Zen 5 VM) favour slices up
/// to 128 rows and panels from 192 on: 64 × 2304 × 1024 70–71% → 81–82% of the FMA peak,
/// 64 × 1024 × 2304 72–73% → 83–85%, 128 × 1024 × 2304 79–81% → 87–88%, 96 and
/// 128 × 2304 × 1024 within the noise; 256 × 2304 × 1024 80% with panels against 75–77% with
/// slices. In the model (from 32 rows, the experts' share of a 512-token chunk): 128-token
/// prompts 8–10% faster on `mini` and 7% on the 48B shape, every product of them a slice task
/// now; the 256-expert model's 4096-token prefill (about 64 rows an expert) 1–2% on the best
/// runs. The bits are the same either way.
#[cfg(target_arch = "x86_64")]
const SLICE_MAX_ROWS: usize = 128;

/// Largest K block of the AVX-512 prefill path: the `x512::MR` packed x rows of a block
/// (`MR·KC·4` bytes) stay in L1 while the panel streams past them.
#[cfg(target_arch = "x86_64")]
const KC_WIDE: usize = 768;

/// Tasks of a prefill product: panels of `W` rows (about 768 KiB of f32, so that a panel stays
/// in L2 while `x` blocks stream past it; whole `g`-row groups; shared out evenly over the
/// threads), times parts of `T` (a multiple of `mr` rows each) when there are too few panels to
/// keep every thread busy. Returns `(panel rows, panels, T rows per part, T parts)`.
fn plan_tasks(n: usize, t: usize, k: usize, g: usize, mr: usize) -> (usize, usize, usize, usize) {
    let threads = crate::par::threads();
    let nc = ((768 * 1024) / (4 * k)).clamp(g, 192) / g * g;
    let nc = balanced_panel(
        n,
        nc.min(n.div_ceil(threads).next_multiple_of(g)),
        threads,
        g,
    );
    let panels = n.div_ceil(nc);
    let t_parts = (2 * threads)
        .div_ceil(panels)
        .min(t.div_ceil(16 * mr))
        .max(1);
    let t_step = t.div_ceil(t_parts).next_multiple_of(mr);
    (nc, panels, t_step, t.div_ceil(t_step))
}

/// Panel height (a multiple of `g`, at most `nc`) for `n` rows such that the number of panels is
/// a multiple of `threads` where rounding allows: 7 equal panels on 2 threads leave one thread
/// idle for a seventh of the product, 8 slightly smaller ones do not.
fn balanced_panel(n: usize, nc: usize, threads: usize, g: usize) -> usize {
    let threads = threads.max(1);
    let first = n.div_ceil(nc).next_multiple_of(threads);
    // Rounding the height up to `g` can merge panels again (13 → 14 → 13): try a few more.
    (first..=2 * first)
        .step_by(threads)
        .map(|p| n.div_ceil(p).next_multiple_of(g).clamp(g, nc.max(g)))
        .find(|&h| n.div_ceil(h).is_multiple_of(threads))
        .unwrap_or(nc)
}

/// Index (< 16) of the first element of `v` whose address is a multiple of 64 bytes.
#[cfg(target_arch = "x86_64")]
fn aligned64(v: &[f32]) -> usize {
    (64 - v.as_ptr() as usize % 64) % 64 / 4
}

/// `len` floats of `buf` starting 64-byte aligned, growing `buf` (by 16 floats of slack) as
/// needed.
#[cfg(target_arch = "x86_64")]
fn aligned_window(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let o = aligned64(buf);
    &mut buf[o..o + len]
}

/// Columns `k0..k1` of `rows` rows of `x` (`k` columns each) from row `t0` into `dst`, rows
/// `ldxp` apart, each zero-padded to a whole 8-column chunk (the AVX-512 tiles' tail step reads
/// the zeros; the AVX2 tile masks its tail and never reads them).
#[cfg(target_arch = "x86_64")]
fn pack_x_block(
    x: &[f32],
    k: usize,
    t0: usize,
    rows: usize,
    (k0, k1): (usize, usize),
    ldxp: usize,
    dst: &mut [f32],
) {
    let kw = k1 - k0;
    for r in 0..rows {
        let d = &mut dst[r * ldxp..r * ldxp + kw.div_ceil(8) * 8];
        d[..kw].copy_from_slice(&x[(t0 + r) * k + k0..(t0 + r) * k + k1]);
        d[kw..].fill(0.0);
    }
}

/// Prefill with the AVX-512 tile kernel ([`x512`]): the tasks and blocking of [`prefill`], with
/// two changes that give the same bits faster.
///
/// - The panel is packed in row pairs: for `K` block `b`, group `g` of `2·NP` rows, 8-column
///   chunk `c` and pair `p`, the 16 floats `[W[2p][8c..8c+8] | W[2p+1][8c..8c+8]]` (zeros past
///   `K` and in the missing partner of an odd last row), stored `[b][g][c][p][16]`: each tile
///   reads one contiguous 64-byte aligned stream.
/// - The `MR` x rows of a block are packed zero-padded to a multiple of 8 columns (the tail step
///   is then an ordinary step on zeros, as in the AVX2 kernel), and the sources of the next block
///   are prefetched into L2 while the current one is swept.
#[cfg(target_arch = "x86_64")]
fn prefill_wide<R: Rows + ?Sized>(x: &[f32], w: &R, y: &mut [f32], t: usize, k: usize, n: usize) {
    use x512::{MR, NP};
    /// W rows per tile.
    const G: usize = 2 * NP;
    let (nc, panels, t_step, t_parts) = plan_tasks(n, t, k, G, MR);
    // K blocks of `cb` 8-column chunks, equal but for the last.
    let kchunks = k.div_ceil(8);
    let cb = kchunks.div_ceil(k.div_ceil(KC_WIDE));
    let kblocks = kchunks.div_ceil(cb);
    // Columns of K block `b`.
    let kblock = |b: usize| (b * cb * 8, ((b + 1) * cb * 8).min(k));
    let yp = SendPtr(y.as_mut_ptr());
    let wd = w.data();
    let serial = crate::par::is_serial();
    let body = |task: usize| {
        let (pi, ti) = (task / t_parts, task % t_parts);
        let (n0, n1) = (pi * nc, ((pi + 1) * nc).min(n));
        let (t0, t1) = (ti * t_step, ((ti + 1) * t_step).min(t));
        let rows = n1 - n0;
        let groups = rows.div_ceil(G);
        SCRATCH.with(|cell| {
            let mut sc = cell.borrow_mut();
            let Scratch { panel, part, xpack } = &mut *sc;
            // x is read in place when its rows are whole 8-column chunks (`K` a multiple of 8,
            // as in every real model); else each block is packed (tail zeroed; 64-byte
            // aligned, 16 floats of padding against L1 set conflicts). A packed block is copied
            // again for every weight panel, so in place is faster: in-process A/B, K = 2304,
            // 2816, 512: 0–7% (an expert's 150 × 2304 × 1024 product on one thread 3–5%). Rows
            // a multiple of 4 KiB apart (K = 1024, 4096) put a tile's six x rows into the same
            // L1 sets; on the Zen 5 VM in place still won there (the 256-expert model's prefill
            // +1–8%, its packing 4.7% of the time), where the Intel VM, whose cores' siblings
            // ran another guest, had measured it 1–8% slower (docs/performance.md).
            let in_place = k.is_multiple_of(8);
            let ldxp = cb * 8 + 16;
            if t1 - t0 <= SLICE_MAX_ROWS {
                // Few x rows (see SLICE_MAX_ROWS): rather than a whole packed panel written to L2
                // and read back by each x block, each (group, K block) slice of it (`cb·NP·16`
                // floats, 24 KiB) is packed into L1 and swept by every x block at once. The x blocks
                // are packed once per task when they cannot be read in place.
                let xbs = (t1 - t0).div_ceil(MR);
                let pan = aligned_window(panel, cb * NP * 16);
                if part.len() < xbs * MR * NP * 16 {
                    part.resize(xbs * MR * NP * 16, 0.0);
                }
                let xlen = if in_place {
                    0
                } else {
                    xbs * kblocks * MR * ldxp
                };
                let xpk = aligned_window(xpack, xlen);
                if !in_place {
                    for (xi, tb) in (t0..t1).step_by(MR).enumerate() {
                        for b in 0..kblocks {
                            let blk = &mut xpk[(xi * kblocks + b) * MR * ldxp..][..MR * ldxp];
                            pack_x_block(x, k, tb, MR.min(t1 - tb), kblock(b), ldxp, blk);
                        }
                    }
                }
                let partp = part.as_mut_ptr();
                for g in 0..groups {
                    let r0 = n0 + g * G;
                    let gr = G.min(rows - g * G);
                    // The next group's rows (one contiguous block of W, also past this panel:
                    // run serially, this thread packs the next panel next) into L2, a share
                    // per tile of this group, a line per tile step. (Fetching each block's
                    // source one block ahead from the packing loop instead, into L1, measured
                    // 5–15% slower in-process.)
                    let next = (r0 + G).min(n);
                    let mut gpf = if next < n {
                        let bytes = G.min(n - next) * k * size_of::<R::E>();
                        x512::Prefetch::new(wd[next * k..].as_ptr().cast(), 0, 1, bytes / 4)
                    } else {
                        x512::Prefetch::none()
                    };
                    let quota = gpf.left().div_ceil(kblocks * xbs);
                    for b in 0..kblocks {
                        let (k0, k1) = kblock(b);
                        let steps = (k1 - k0).div_ceil(8);
                        // SAFETY: rows r0..r0+gr of W hold k elements each, columns k0..k1 of
                        // them are read; `pan` holds one K block of one group.
                        unsafe {
                            x512::pack_panel::<R::L>(
                                wd[r0 * k + k0..].as_ptr(),
                                k1 - k0,
                                k,
                                gr,
                                pan,
                                cb,
                                0,
                            );
                        }
                        for (xi, tb) in (t0..t1).step_by(MR).enumerate() {
                            let (xsrc, ldxs) = if in_place {
                                (x[tb * k + k0..].as_ptr(), k)
                            } else {
                                (xpk[(xi * kblocks + b) * MR * ldxp..].as_ptr(), ldxp)
                            };
                            // SAFETY: as in the whole-panel loop below; `part` holds a tile's
                            // sums for each x block, and the y elements (tb.., r0..r0+gr)
                            // belong to this task only.
                            unsafe {
                                let yo = if b + 1 == kblocks {
                                    yp.get().add(tb * n + r0)
                                } else {
                                    std::ptr::null_mut()
                                };
                                x512::tile_dyn(
                                    MR.min(t1 - tb),
                                    gr,
                                    xsrc,
                                    ldxs,
                                    pan.as_ptr(),
                                    steps,
                                    partp.add(xi * MR * NP * 16),
                                    b > 0,
                                    yo,
                                    n,
                                    gpf.take(quota),
                                );
                            }
                        }
                    }
                }
                return;
            }
            // Run serially, this thread packs the next panel next: fetch its weight rows into L2
            // during this task, a few lines per tile (they come from memory, and the hardware
            // prefetcher stops at every 4 KiB page).
            let mut next_w = crate::simd::Prefetch::default();
            if serial && ti + 1 == t_parts && n1 < n {
                next_w.push(&wd[n1 * k..(n1 + nc).min(n) * k]);
            }
            let w_quota = next_w
                .lines()
                .div_ceil((t1 - t0).div_ceil(MR) * kblocks * groups);
            let pan = aligned_window(panel, kblocks * groups * cb * NP * 16);
            // SAFETY: rows n0..n1 of W hold k elements each; `pan` holds the packed panel.
            unsafe {
                x512::pack_panel::<R::L>(
                    wd[n0 * k..].as_ptr(),
                    k,
                    k,
                    rows,
                    pan,
                    cb,
                    x512::PACK_AHEAD / size_of::<R::E>(),
                );
            }
            if part.len() < groups * MR * NP * 16 {
                part.resize(groups * MR * NP * 16, 0.0);
            }
            let xpk = aligned_window(xpack, MR * ldxp);
            let partp = part.as_mut_ptr();
            for tb in (t0..t1).step_by(MR) {
                let mr = MR.min(t1 - tb);
                for b in 0..kblocks {
                    let (k0, k1) = kblock(b);
                    let steps = (k1 - k0).div_ceil(8);
                    if !in_place {
                        pack_x_block(x, k, tb, mr, (k0, k1), ldxp, xpk);
                    }
                    let (xsrc, ldxs) = if in_place {
                        (x[tb * k + k0..].as_ptr(), k)
                    } else {
                        (xpk.as_ptr(), ldxp)
                    };
                    // The next x block's sources, prefetched a share per tile of this sweep.
                    let next = if b + 1 < kblocks {
                        Some((tb, b + 1))
                    } else if tb + MR < t1 {
                        Some((tb + MR, 0))
                    } else {
                        None
                    };
                    let mut pf = match next {
                        Some((nt, nb)) => {
                            let (nk0, nk1) = kblock(nb);
                            x512::Prefetch::new(
                                x[nt * k + nk0..].as_ptr(),
                                k,
                                MR.min(t1 - nt),
                                nk1 - nk0,
                            )
                        }
                        _ => x512::Prefetch::none(),
                    };
                    let quota = pf.left().div_ceil(groups);
                    for g in 0..groups {
                        next_w.step(w_quota);
                        // SAFETY: xpk rows hold `steps·8` floats; the (b, g) block of the panel
                        // holds `steps` chunks of NP·16 floats, 64-byte aligned; `part` holds
                        // this group's MR·NP·16 floats; the y elements (tb.., n0+g·G..) belong
                        // to this task only.
                        unsafe {
                            let yo = if b + 1 == kblocks {
                                yp.get().add(tb * n + n0 + g * G)
                            } else {
                                std::ptr::null_mut()
                            };
                            x512::tile_dyn(
                                mr,
                                G.min(rows - g * G),
                                xsrc,
                                ldxs,
                                pan.as_ptr().add((b * groups + g) * cb * NP * 16),
                                steps,
                                partp.add(g * MR * NP * 16),
                                b > 0,
                                yo,
                                n,
                                pf.take(quota),
                            );
                        }
                    }
                }
            }
        });
    };
    crate::par::for_each(panels * t_parts, body);
}

/// The canonical lane-sum tree on 8 scalar lanes (also used by attention's softmax sum).
pub(crate) use portable::hsum as hsum8;

/// Portable tile kernel: the canonical order with 8 scalar lanes (multiply, then add).
mod portable {
    use super::Rows;

    /// Fixed reduction tree `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
    #[inline]
    pub fn hsum(a: &[f32; 8]) -> f32 {
        let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (s[0] + s[2]) + (s[1] + s[3])
    }

    /// Elements of a W row widened per step (on the stack).
    const CH: usize = 256;

    /// See [`super::tile_dyn`].
    ///
    /// # Safety
    /// As [`super::tile_dyn`]; `mr ≤ 8`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_dyn<R: Rows + ?Sized>(
        mr: usize,
        nr: usize,
        xp: *const f32,
        ldx: usize,
        wp: *const R::E,
        ldw: usize,
        k: usize,
        yp: *mut f32,
        ldy: usize,
    ) {
        // One W row at a time against all x rows; each output keeps its own accumulator, so
        // the per-element order is the canonical one.
        let mut wbuf = [0f32; CH];
        for j in 0..nr {
            let wr = std::slice::from_raw_parts(wp.add(j * ldw), k);
            let mut acc = [[0f32; 8]; super::GEMV_MAX_ROWS];
            let mut i0 = 0;
            while i0 < k {
                let m = CH.min(k - i0);
                R::widen(&wr[i0..i0 + m], &mut wbuf[..m]);
                wbuf[m..m.next_multiple_of(8).min(CH)].fill(0.0);
                for (r, a) in acc.iter_mut().enumerate().take(mr) {
                    let xr = std::slice::from_raw_parts(xp.add(r * ldx + i0), m);
                    let mut b = 0;
                    while b < m {
                        let mut xv = [0f32; 8];
                        let mb = 8.min(m - b);
                        xv[..mb].copy_from_slice(&xr[b..b + mb]);
                        for l in 0..8 {
                            a[l] += xv[l] * wbuf[b + l];
                        }
                        b += 8;
                    }
                }
                i0 += m;
            }
            for (r, a) in acc.iter().enumerate().take(mr) {
                *yp.add(r * ldy + j) = hsum(a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::marker::PhantomData;

    /// 8-wide widening loads of one element type.
    pub trait Load {
        /// Stored element (plain bits; all-zero bits is +0).
        type E: Copy;
        /// Widen 8 elements at `p` (unaligned).
        ///
        /// # Safety
        /// 8 readable elements at `p`; AVX2 (and F16C for f16) present.
        unsafe fn load8(p: *const Self::E) -> __m256;
        /// Widen `m < 8` elements at `p`, +0 in the other lanes.
        ///
        /// # Safety
        /// `m` readable elements at `p`; CPU features as [`Load::load8`].
        #[inline(always)]
        unsafe fn load_tail(p: *const Self::E, m: usize) -> __m256 {
            // SAFETY: `E` is f32, bf16 or f16, for which all-zero bits is +0.
            let mut buf: [Self::E; 8] = std::mem::zeroed();
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
            Self::load8(buf.as_ptr())
        }
    }

    /// f32 loads.
    pub struct F32;
    /// bf16 loads (shift into the high half).
    pub struct Bf16;
    /// f16 loads (F16C).
    pub struct F16;
    /// Placeholder for element types without SIMD loads (never called).
    pub struct Never<W>(PhantomData<W>);

    impl Load for F32 {
        type E = f32;
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }
    impl Load for Bf16 {
        type E = bf16;
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
    impl Load for F16 {
        type E = f16;
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }
    impl<W: Copy> Load for Never<W> {
        type E = W;
        unsafe fn load8(_: *const W) -> __m256 {
            unreachable!("no SIMD loads for this element type")
        }
        unsafe fn load_tail(_: *const W, _: usize) -> __m256 {
            unreachable!("no SIMD loads for this element type")
        }
    }

    /// Prefetch the `step` bytes at `*pf` (non-temporal where `nta`, else into L2) and move
    /// `*pf` past them; nothing for a null `*pf`. One step of a matrix–vector tile's prefetch of
    /// the next block of W rows.
    ///
    /// # Safety
    /// A non-null `*pf` plus `step` stays inside (or one past) the block being prefetched.
    #[inline(always)]
    pub unsafe fn prefetch_step(pf: &mut *const u8, step: usize, nta: bool) {
        if pf.is_null() {
            return;
        }
        if nta {
            prefetch_block::<1>(pf, step)
        } else {
            prefetch_block::<2>(pf, step)
        }
    }

    /// [`prefetch_step`] with the hint fixed at compile time (`P` as in [`prefetch_line`]) and
    /// `*pf` known to be non-null: one line per 64 of the `step` bytes at `*pf`, then `*pf`
    /// moves past them.
    #[inline(always)]
    unsafe fn prefetch_block<const P: u8>(pf: &mut *const u8, step: usize) {
        let mut o = 0;
        while o < step {
            prefetch_line::<P>(pf.wrapping_add(o));
            o += 64;
        }
        *pf = pf.wrapping_add(step);
    }

    /// Fixed reduction tree `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))` (same as the portable one).
    #[inline(always)]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi); // [l0+l4, l1+l5, l2+l6, l3+l7]
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // [s0+s2, s1+s3, ..]
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1)); // (s0+s2)+(s1+s3)
        _mm_cvtss_f32(s)
    }

    /// The register-blocked tile: `MR × NR` 8-lane accumulators over columns `k0..k1` (`k0` a
    /// multiple of 8; `k1` a multiple of 8 or the row length, the zero-padded tail being the last
    /// step). Accumulators start at zero, or from `part` (`[MR·NR][8]`) when `resume`;
    /// they end reduced into `y` when `yp` is non-null, else saved to `part` bit for bit.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<L: Load, const MR: usize, const NR: usize>(
        xp: *const f32,
        ldx: usize,
        wp: *const L::E,
        ldw: usize,
        (k0, k1): (usize, usize),
        part: *mut f32,
        resume: bool,
        yp: *mut f32,
        ldy: usize,
        pf: *const u8,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        if resume {
            for (r, a) in acc.iter_mut().enumerate() {
                for (j, v) in a.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(part.add((r * NR + j) * 8));
                }
            }
        }
        let k8 = k1 & !7;
        // The whole 8-column steps, compiled once per kind of prefetch and hint, so that the
        // loop itself tests neither (see `steps`).
        let nta = crate::cpu::features().nontemporal;
        let a = &mut acc;
        match (pf.is_null(), nta) {
            (true, _) => steps::<L, MR, NR, 0>(a, xp, ldx, wp, ldw, k0, k8, pf),
            (false, true) => steps::<L, MR, NR, 1>(a, xp, ldx, wp, ldw, k0, k8, pf),
            (false, false) => steps::<L, MR, NR, 2>(a, xp, ldx, wp, ldw, k0, k8, pf),
        }
        if k8 < k1 {
            let m = k1 - k8;
            let mask = crate::activation::x86::mask(m);
            let mut wv = [_mm256_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = L::load_tail(wp.add(j * ldw + k8), m);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_maskload_ps(xp.add(r * ldx + k8), mask);
                for j in 0..NR {
                    a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                }
            }
        }
        if yp.is_null() {
            for (r, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    _mm256_storeu_ps(part.add((r * NR + j) * 8), *v);
                }
            }
        } else {
            for (r, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    *yp.add(r * ldy + j) = hsum(*v);
                }
            }
        }
    }

    /// One prefetch of the line at `p`: non-temporal for odd `P`, into L2 (`prefetcht1`) for
    /// even `P` (see [`steps`]).
    #[inline(always)]
    pub unsafe fn prefetch_line<const P: u8>(p: *const u8) {
        if P % 2 == 1 {
            _mm_prefetch::<_MM_HINT_NTA>(p as *const i8);
        } else {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
        }
    }

    /// Columns `k0..k8` (whole 8-column steps) of [`tile`] into `acc`, prefetching as `P`
    /// says: 0 nothing; 1 (non-temporal) or 2 (L2) the block at `pf`, `NR·8` elements of it a
    /// step (`tile_dyn`'s non-null `pf`). Compiled per `P`, the loop carries no test
    /// for the prefetch (see `many`'s row kernel for what such tests cost).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn steps<L: Load, const MR: usize, const NR: usize, const P: u8>(
        acc: &mut [[__m256; NR]; MR],
        xp: *const f32,
        ldx: usize,
        wp: *const L::E,
        ldw: usize,
        k0: usize,
        k8: usize,
        pf: *const u8,
    ) {
        let esz = std::mem::size_of::<L::E>();
        #[inline(always)]
        unsafe fn step<L: Load, const MR: usize, const NR: usize>(
            acc: &mut [[__m256; NR]; MR],
            xp: *const f32,
            ldx: usize,
            wp: *const L::E,
            ldw: usize,
            i: usize,
        ) {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = L::load8(wp.add(j * ldw + i));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * ldx + i));
                for j in 0..NR {
                    a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                }
            }
        }
        let mut i = k0;
        // Bytes of the next W block per step (`Block`).
        let block_step = NR * 8 * esz;
        let mut pfp = pf;
        while i < k8 {
            if P == 1 || P == 2 {
                prefetch_block::<P>(&mut pfp, block_step);
            }
            step::<L, MR, NR>(acc, xp, ldx, wp, ldw, i);
            i += 8;
        }
    }

    /// See [`super::tile_dyn`]; `(mr, nr)` one of the pairs listed below.
    ///
    /// # Safety
    /// As [`super::tile_dyn`], and the CPU has AVX2, FMA (and F16C for f16).
    /// `kr = (k0, k1)`, `part`, `resume` as in [`tile`]; a null `yp` saves the partial sums.
    ///
    /// A non-null `pf` is the start of the next contiguous W block (`nr` rows of `ldw` elements
    /// at the same column range), prefetched in step with this one: each 8-column step touches
    /// `nr·8` elements of the next block, so by the end of this tile the next one is on its way.
    /// Decode streams weights straight from memory in short rows, where the hardware
    /// prefetcher alone leaves bandwidth unused. The hint is non-temporal (`prefetchnta`) where
    /// [`crate::cpu::Features::nontemporal`] says so (AMD): weight lines are read once per
    /// token, and not keeping them in the outer caches streamed more bytes a second on the
    /// Zen 5 VM than the L2 hint (`prefetcht1`): `mini` 150–164 → 166–168 tok/s, the 48B shape
    /// 6.6–6.9 → 7.0–7.1, one thread +10%, and `cargo bench`'s gemv rows equal or faster,
    /// weights already in L3 included; on the Intel VM the same hint had cost 25–50%, so other
    /// CPUs keep `prefetcht1`. Prefetching never changes a result.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_dyn<L: Load>(
        mr: usize,
        nr: usize,
        xp: *const f32,
        ldx: usize,
        wp: *const L::E,
        ldw: usize,
        kr: (usize, usize),
        part: *mut f32,
        resume: bool,
        yp: *mut f32,
        ldy: usize,
        pf: *const u8,
    ) {
        macro_rules! go {
            ($( ($a:literal, $b:literal) ),*) => {
                match (mr, nr) {
                    $( ($a, $b) => tile::<L, $a, $b>(xp, ldx, wp, ldw, kr, part, resume, yp, ldy, pf), )*
                    _ => unreachable!("tile {mr}x{nr}"),
                }
            };
        }
        go!(
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4),
            (1, 5),
            (1, 6),
            (2, 1),
            (2, 2),
            (2, 3),
            (2, 4),
            (3, 1),
            (3, 2),
            (3, 3),
            (3, 4),
            (4, 1),
            (4, 2),
            (4, 3)
        )
    }
}

/// The AVX-512 prefill tile: the AVX2 kernel's canonical 8-lane order, two W rows per register.
///
/// Each 512-bit accumulator holds `[acc(x row r, W row 2p) | acc(x row r, W row 2p+1)]`, each half
/// exactly an 8-lane accumulator of the AVX2 kernel: the 8 x columns of a step are broadcast to
/// both halves and the W pair is one 64-byte load from the interleaved panel, so every lane runs
/// the same fused multiply–add sequence on the same operands. The final reduction applies the
/// AVX2 kernel's tree to each half (see `reduce8`).
#[cfg(target_arch = "x86_64")]
mod x512 {
    use super::x86::Load;
    use std::arch::x86_64::*;

    /// x rows per tile.
    pub const MR: usize = 6;
    /// W row pairs per tile: `MR·NP` = 24 accumulators of the 32 vector registers (measured
    /// against 8 × 3, 7 × 4, 5 × 5, 4 × 6 and 12 × 2: 6 × 4 was the fastest, about 20% over
    /// 8 × 3, with one thread or two).
    pub const NP: usize = 4;

    /// How far ahead [`pack_panel`] prefetches its source rows when packing a whole panel, in
    /// bytes: a pair of rows is often one 4 KiB page, where the hardware prefetcher stops (past a
    /// row's end this reaches the next pair's rows).
    pub const PACK_AHEAD: usize = 4096;

    /// Pack `rows` rows of `W` (`k` elements each, `ld` apart, from `src`) into the interleaved
    /// panel layout of [`super::prefill_wide`] with `cb` chunks per K block, widening to f32,
    /// prefetching `ahead` elements past each row position read (nothing if `ahead` is 0).
    ///
    /// # Safety
    /// `src` holds `rows` rows of `k` elements `ld` apart; `pan` holds `kblocks·groups·cb·NP·16`
    /// floats and is 64-byte aligned; the CPU has AVX-512F, AVX2 (and F16C for f16).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn pack_panel<L: Load>(
        src: *const L::E,
        k: usize,
        ld: usize,
        rows: usize,
        pan: &mut [f32],
        cb: usize,
        ahead: usize,
    ) {
        let g_rows = 2 * NP;
        let groups = rows.div_ceil(g_rows);
        let whole = k / 8;
        let gsz = cb * NP * 16;
        let pp = pan.as_mut_ptr();
        for q in 0..rows.div_ceil(2) {
            let (r0, r1) = (2 * q, 2 * q + 1);
            let (g, p) = (r0 / g_rows, r0 % g_rows / 2);
            let s0 = src.add(r0 * ld);
            // Chunk `ci` of this pair lands in K block `ci / cb`, slot `ci % cb` of group `g`.
            let base = pp.add(g * gsz + p * 16);
            let slot = |ci: usize| base.add((ci / cb * groups) * gsz + ci % cb * NP * 16);
            if r1 < rows {
                let s1 = src.add(r1 * ld);
                pair_chunks::<L, true>(s0, s1, whole, cb, groups * gsz, base, ahead);
            } else {
                pair_chunks::<L, false>(s0, s0, whole, cb, groups * gsz, base, ahead);
            }
            let m = k - whole * 8;
            if m > 0 {
                let i = whole * 8;
                let hi = if r1 < rows {
                    L::load_tail(src.add(r1 * ld + i), m)
                } else {
                    _mm256_setzero_ps()
                };
                store_pair(slot(whole), L::load_tail(s0.add(i), m), hi);
            }
        }
    }

    /// `[lo | hi]` in one register.
    #[inline(always)]
    unsafe fn pair(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    /// `[lo | hi]` into the 64-byte aligned slot `dst`.
    #[inline(always)]
    unsafe fn store_pair(dst: *mut f32, lo: __m256, hi: __m256) {
        _mm512_store_ps(dst, pair(lo, hi));
    }

    /// The `whole` 8-column chunks of the row pair at `s0`, `s1` (`s1` unread and its half zero
    /// unless `HAS1`), K block by K block: consecutive chunks of a block are `NP·16` floats
    /// apart in the panel, blocks `block` floats apart, starting at `base`. A plain counted
    /// loop per block, so that each chunk costs its two loads, the widening and one store.
    #[inline(always)]
    unsafe fn pair_chunks<L: Load, const HAS1: bool>(
        s0: *const L::E,
        s1: *const L::E,
        whole: usize,
        cb: usize,
        block: usize,
        base: *mut f32,
        ahead: usize,
    ) {
        // The caller's prefetch distance, `ahead` elements past what is read (none if 0), once
        // per 64-byte line of each row (a prefetch never faults).
        let per_line = (64 / (8 * size_of::<L::E>())).max(1);
        let mut ci = 0;
        let mut b = 0;
        while ci < whole {
            let end = (ci + cb).min(whole);
            let mut dst = base.add(b * block);
            while ci < end {
                let i = ci * 8;
                if ahead > 0 && ci % per_line == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(s0.wrapping_add(i + ahead) as *const i8);
                    if HAS1 {
                        _mm_prefetch::<_MM_HINT_T0>(s1.wrapping_add(i + ahead) as *const i8);
                    }
                }
                let hi = if HAS1 {
                    L::load8(s1.add(i))
                } else {
                    _mm256_setzero_ps()
                };
                store_pair(dst, L::load8(s0.add(i)), hi);
                dst = dst.add(NP * 16);
                ci += 1;
            }
            b += 1;
        }
    }

    /// Software prefetch of a block of rows (`rows` rows of `len` floats, `ld` apart), one cache
    /// line per tile step, handed out to the tiles of a sweep in shares.
    pub struct Prefetch {
        base: *const f32,
        ld: usize,
        lines: usize,
        row: usize,
        line: usize,
        left: usize,
    }

    impl Prefetch {
        /// Prefetch `rows` rows of `len` floats at `base`, `ld` floats apart.
        pub fn new(base: *const f32, ld: usize, rows: usize, len: usize) -> Self {
            let lines = len.div_ceil(16);
            Prefetch {
                base,
                ld,
                lines,
                row: 0,
                line: 0,
                left: rows * lines,
            }
        }
        /// Nothing to prefetch.
        pub fn none() -> Self {
            Prefetch {
                base: std::ptr::null(),
                ld: 0,
                lines: 1,
                row: 0,
                line: 0,
                left: 0,
            }
        }
        /// Lines not yet prefetched.
        pub fn left(&self) -> usize {
            self.left
        }
        /// The next `n` lines (or fewer), for one tile.
        pub fn take(&mut self, n: usize) -> Prefetch {
            let m = n.min(self.left);
            let share = Prefetch { left: m, ..*self };
            self.left -= m;
            self.line += m;
            self.row += self.line / self.lines;
            self.line %= self.lines;
            share
        }
    }

    /// The fixed tree of [`super::x86::hsum`] on both 8-lane halves of 8 registers at once: 16
    /// sums, `u[q]`'s half `h` at index `4·(2·(q % 2) + h) + q / 2`.
    ///
    /// Each level adds the same operand pairs as `hsum`: `l_i + l_{i+4}`, then `s_0 + s_2` and
    /// `s_1 + s_3`, then their sum; only the lanes they sit in differ.
    #[inline(always)]
    unsafe fn reduce8(u: &[__m512; 8]) -> __m512 {
        // Level 1: 128-bit blocks [q.A0-3, q.B0-3, q'.A0-3, q'.B0-3] + [the upper 4 lanes].
        let l1 = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        // Level 2: per block [s0+s2, s1+s3] of `a`, then of `b`.
        let l2 = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        };
        // Level 3: per block [t0+t1 of a's two sums, then of b's].
        let l3 = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
                _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
            )
        };
        let s01 = l1(u[0], u[1]);
        let s23 = l1(u[2], u[3]);
        let s45 = l1(u[4], u[5]);
        let s67 = l1(u[6], u[7]);
        l3(l2(s01, s23), l2(s45, s67))
    }

    /// One `MR × 2·NP` tile over `steps` 8-column chunks (see [`super::prefill_wide`]).
    ///
    /// `xp`: `MR` rows of x, `ldx` apart, each holding `steps·8` floats (zeros past K). `wp`: the
    /// tile's panel block, chunk `s` at `s·NPF·16` (`NPF` = [`NP`], the panel's pairs per chunk),
    /// pair `p` of a chunk at `p·16`, 64-byte aligned. Accumulators start at zero, or from `part`
    /// (`[MR][NP][16]`) when `resume`; they end reduced into `y` (`nrows ≤ 2·NP` W rows; the
    /// partner of an odd last row is dropped) when `yp` is non-null, else saved to `part` bit for
    /// bit. One line of `pf` is prefetched per step.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NP: usize>(
        xp: *const f32,
        ldx: usize,
        wp: *const f32,
        steps: usize,
        part: *mut f32,
        resume: bool,
        yp: *mut f32,
        ldy: usize,
        nrows: usize,
        mut pf: Prefetch,
    ) {
        let cs = super::x512::NP * 16;
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        if resume {
            for (r, a) in acc.iter_mut().enumerate() {
                for (p, v) in a.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(part.add((r * NP + p) * 16));
                }
            }
        }
        for s in 0..steps {
            if pf.left > 0 {
                _mm_prefetch::<_MM_HINT_T1>(pf.base.add(pf.row * pf.ld + pf.line * 16) as *const i8);
                pf.line += 1;
                if pf.line == pf.lines {
                    pf.line = 0;
                    pf.row += 1;
                }
                pf.left -= 1;
            }
            let w = wp.add(s * cs);
            let mut wv = [_mm512_setzero_ps(); NP];
            for (p, v) in wv.iter_mut().enumerate() {
                *v = _mm512_load_ps(w.add(p * 16));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let x8 = _mm256_loadu_pd(xp.add(r * ldx + s * 8) as *const f64);
                let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(x8));
                for p in 0..NP {
                    a[p] = _mm512_fmadd_ps(xv, wv[p], a[p]);
                }
            }
        }
        if yp.is_null() {
            for (r, a) in acc.iter().enumerate() {
                for (p, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(part.add((r * NP + p) * 16), *v);
                }
            }
            return;
        }
        if NP == 4 && MR.is_multiple_of(2) && nrows == 8 {
            // Whole tile: each group of 8 accumulators is two x rows × 8 W rows; one permute
            // puts each row's 8 sums in W-row order for two 8-float stores.
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            for g in 0..MR / 2 {
                let u: [__m512; 8] = std::array::from_fn(|q| acc[2 * g + q / 4][q % 4]);
                let v = _mm512_permutexvar_ps(order, reduce8(&u));
                let (r0, r1) = (yp.add(2 * g * ldy), yp.add((2 * g + 1) * ldy));
                _mm256_storeu_ps(r0, _mm512_castps512_ps256(v));
                _mm256_storeu_ps(
                    r1,
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
            }
            return;
        }
        // Reduce 8 accumulators at a time (zeros pad the last group), then scatter to y.
        let mut sums = [[0f32; 16]; 3];
        let flat = |i: usize| {
            if i < MR * NP {
                acc[i / NP][i % NP]
            } else {
                _mm512_setzero_ps()
            }
        };
        for (gi, out) in sums.iter_mut().enumerate().take((MR * NP).div_ceil(8)) {
            let u: [__m512; 8] = std::array::from_fn(|q| flat(gi * 8 + q));
            _mm512_storeu_ps(out.as_mut_ptr(), reduce8(&u));
        }
        for r in 0..MR {
            for j in 0..nrows {
                let i = r * NP + j / 2;
                let (q, h) = (i % 8, j % 2);
                *yp.add(r * ldy + j) = sums[i / 8][4 * (2 * (q % 2) + h) + q / 2];
            }
        }
    }

    /// [`tile`] for `mr ≤ MR` x rows and `nrows ≤ 2·NP` W rows (`nrows.div_ceil(2)` pairs).
    ///
    /// # Safety
    /// As [`tile`]; the CPU has AVX-512F, AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tile_dyn(
        mr: usize,
        nrows: usize,
        xp: *const f32,
        ldx: usize,
        wp: *const f32,
        steps: usize,
        part: *mut f32,
        resume: bool,
        yp: *mut f32,
        ldy: usize,
        pf: Prefetch,
    ) {
        macro_rules! by_np {
            ($m:literal) => {
                match nrows.div_ceil(2) {
                    1 => tile::<$m, 1>(xp, ldx, wp, steps, part, resume, yp, ldy, nrows, pf),
                    2 => tile::<$m, 2>(xp, ldx, wp, steps, part, resume, yp, ldy, nrows, pf),
                    3 => tile::<$m, 3>(xp, ldx, wp, steps, part, resume, yp, ldy, nrows, pf),
                    4 => tile::<$m, 4>(xp, ldx, wp, steps, part, resume, yp, ldy, nrows, pf),
                    np => unreachable!("{np} pairs"),
                }
            };
        }
        match mr {
            1 => by_np!(1),
            2 => by_np!(2),
            3 => by_np!(3),
            4 => by_np!(4),
            5 => by_np!(5),
            6 => by_np!(6),
            _ => unreachable!("{mr} x rows"),
        }
    }

    /// Matrix–vector tile for 5 to 8 x rows (`MR`): the W rows are widened in registers from
    /// their stored rows, two to a 512-bit register (`[W[j][k..k+8] | W[j+1][k..k+8]]`), with
    /// each x row's 8 columns broadcast to both halves, so every half is exactly an 8-lane
    /// accumulator of the AVX2 tile (the same fused multiply–adds on the same operands, the same
    /// zero-padded tail step, the same reduction tree): the same bits, with every W element
    /// widened once for all `MR` rows instead of once per 4 (two or more passes of the AVX2
    /// tile, which ran compute-bound there). `nrows ≤ WIDE_GEMV_ROWS` rows are valid; the
    /// others are read from row 0 and dropped. `pf`, when non-null, is the next block of W rows,
    /// prefetched a line per step as in the AVX2 tile.
    ///
    /// # Safety
    /// `MR` x rows of `k` floats at `xp`, `ldx` apart; `nrows` W rows of `k` elements at `wp`,
    /// `ldw` apart; `y` elements `(r, j)` at `yp + r·ldy + j` writable for `r < MR`, `j <
    /// nrows`; the CPU has AVX-512F, AVX2, FMA (and F16C for f16).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn gemv_tile<L: Load, const MR: usize>(
        xp: *const f32,
        ldx: usize,
        wp: *const L::E,
        ldw: usize,
        nrows: usize,
        k: usize,
        yp: *mut f32,
        ldy: usize,
        pf: *const u8,
    ) {
        use super::WIDE_GEMV_ROWS as ROWS;
        const NPG: usize = ROWS / 2;
        let row = |j: usize| if j < nrows { wp.add(j * ldw) } else { wp };
        let rows: [*const L::E; ROWS] = std::array::from_fn(row);
        let mut acc = [[_mm512_setzero_ps(); NPG]; MR];
        let pf_step = ROWS * 8 * std::mem::size_of::<L::E>();
        let nta = crate::cpu::features().nontemporal;
        let mut pfp = pf;
        let k8 = k & !7;
        let mut i = 0;
        while i < k8 {
            super::x86::prefetch_step(&mut pfp, pf_step, nta);
            let wv: [__m512; NPG] = std::array::from_fn(|p| {
                pair(
                    L::load8(rows[2 * p].add(i)),
                    L::load8(rows[2 * p + 1].add(i)),
                )
            });
            for (r, a) in acc.iter_mut().enumerate() {
                let x8 = _mm256_loadu_pd(xp.add(r * ldx + i) as *const f64);
                let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(x8));
                for p in 0..NPG {
                    a[p] = _mm512_fmadd_ps(xv, wv[p], a[p]);
                }
            }
            i += 8;
        }
        if k8 < k {
            let m = k - k8;
            let mask = crate::activation::x86::mask(m);
            let wv: [__m512; NPG] = std::array::from_fn(|p| {
                pair(
                    L::load_tail(rows[2 * p].add(k8), m),
                    L::load_tail(rows[2 * p + 1].add(k8), m),
                )
            });
            for (r, a) in acc.iter_mut().enumerate() {
                let x8 = _mm256_maskload_ps(xp.add(r * ldx + k8), mask);
                let xv = pair(x8, x8);
                for p in 0..NPG {
                    a[p] = _mm512_fmadd_ps(xv, wv[p], a[p]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (p, v) in a.iter().enumerate() {
                let lo = _mm512_castps512_ps256(*v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v)));
                for (h, half) in [lo, hi].into_iter().enumerate() {
                    let j = 2 * p + h;
                    if j < nrows {
                        *yp.add(r * ldy + j) = super::x86::hsum(half);
                    }
                }
            }
        }
    }

    /// [`gemv_tile`] for `mr` in 5..=8 x rows.
    ///
    /// # Safety
    /// As [`gemv_tile`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn gemv_tile_dyn<L: Load>(
        mr: usize,
        xp: *const f32,
        ldx: usize,
        wp: *const L::E,
        ldw: usize,
        nrows: usize,
        k: usize,
        yp: *mut f32,
        ldy: usize,
        pf: *const u8,
    ) {
        match mr {
            5 => gemv_tile::<L, 5>(xp, ldx, wp, ldw, nrows, k, yp, ldy, pf),
            6 => gemv_tile::<L, 6>(xp, ldx, wp, ldw, nrows, k, yp, ldy, pf),
            7 => gemv_tile::<L, 7>(xp, ldx, wp, ldw, nrows, k, yp, ldy, pf),
            8 => gemv_tile::<L, 8>(xp, ldx, wp, ldw, nrows, k, yp, ldy, pf),
            _ => unreachable!("{mr} x rows"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::balanced_panel;

    #[test]
    fn panels_share_out_evenly() {
        // 512 rows in panels of at most 80: 7 panels would leave a thread idle; 8 of 64 do not.
        assert_eq!(balanced_panel(512, 80, 2, 8), 64);
        // 1024 rows: 13 → 14 panels rounds back to 13; 16 of 64 works.
        assert!(1024usize
            .div_ceil(balanced_panel(1024, 80, 2, 8))
            .is_multiple_of(2));
        for n in [1usize, 7, 100, 513, 4096, 163_840] {
            for nc in [8usize, 24, 80, 192] {
                for threads in [1usize, 2, 3, 16] {
                    for g in [3usize, 8] {
                        let nc = nc / g * g;
                        let h = balanced_panel(n, nc, threads, g);
                        assert!(
                            h >= g && h <= nc.max(g) && h.is_multiple_of(g),
                            "{n} {nc} {threads}"
                        );
                    }
                }
            }
        }
    }
}
