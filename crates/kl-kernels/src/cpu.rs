//! Run-time CPU feature detection, done once and cached.
//!
//! Environment variables narrow or override what is used (read once, at the first call):
//! - `KL_NO_SIMD=1` forces the portable paths (to test them on SIMD machines);
//! - `KL_NO_AVX512=1` forces the AVX2 paths where AVX-512 kernels exist (they give the same bits,
//!   so this only changes speed; used to compare the two);
//! - `KL_NONTEMPORAL=0` or `1` turns the non-temporal memory hints ([`Features::nontemporal`])
//!   off or on whatever the vendor (the same bits either way);
//! - `KL_NO_AVX512BF16=1` runs latent attention's bf16 products on their FMA emulation instead
//!   of the AVX512-BF16 instruction (the same bits; [`Features::avx512bf16`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A process-wide opt-in switch for a kernel path that only some CPUs run and that changes
/// results (the AMX products, bf16 activations): off unless asked for by [`OptIn::set`] or its
/// environment variable (`=1`), and never on where the path is not available.
pub struct OptIn {
    /// 0: not decided yet (read the environment at the first query); 1: off; 2: on.
    mode: AtomicU8,
    env: &'static str,
}

impl OptIn {
    /// A switch read from the environment variable `env` until [`set`](Self::set) decides.
    pub const fn new(env: &'static str) -> Self {
        OptIn {
            mode: AtomicU8::new(0),
            env,
        }
    }

    /// Ask for (or stop) the path. Returns whether it will be used: `false` when asked for
    /// where it is not `available`.
    pub fn set(&self, on: bool, available: bool) -> bool {
        let on = on && available;
        self.mode.store(if on { 2 } else { 1 }, Ordering::Relaxed);
        on
    }

    /// Whether the path is on: [`set`](Self::set), or else the environment variable, where it
    /// is `available` (asked only the first time).
    pub fn get(&self, available: impl FnOnce() -> bool) -> bool {
        match self.mode.load(Ordering::Relaxed) {
            0 => {
                let want = std::env::var(self.env).is_ok_and(|v| v == "1");
                // A concurrent `set` wins over the environment.
                let on = want && available();
                let _ = self.mode.compare_exchange(
                    0,
                    if on { 2 } else { 1 },
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                self.mode.load(Ordering::Relaxed) == 2
            }
            m => m == 2,
        }
    }
}

/// The SIMD features the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA (x86-64).
    pub avx2_fma: bool,
    /// AVX-512F (x86-64); only set together with `avx2_fma`.
    pub avx512f: bool,
    /// AVX512-BF16 with AVX512-BW (`vdpbf16ps`, `vcvtne2ps2bf16`); only set together with
    /// `avx512f`. Latent attention over a bf16 cache uses it for its products
    /// ([`crate::attention_bf16`]); without it the same products are emulated with FMAs, to the
    /// same bits.
    pub avx512bf16: bool,
    /// Non-temporal memory hints for data touched once: decode's weight rows are prefetched
    /// with `prefetchnta` instead of into L2 (`prefetcht1`), and the KDA chunk kernel streams
    /// its output rows (`simd::stream_copy`) instead of computing them in place. Set on AMD
    /// cores, where they measured 2–10% and 4–5% faster on the Zen 5 VM; the Intel VM's Xeon
    /// had measured both slower (25–50% and 2–7%; docs/performance.md).
    pub nontemporal: bool,
}

/// The instruction sets the kernels are written for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (any target).
    Portable,
    /// x86-64 AVX2 + FMA: 8-lane (256-bit) vectors.
    Avx2,
    /// x86-64 AVX-512F (with AVX2 + FMA): 16-lane (512-bit) vectors.
    Avx512,
}

impl Isa {
    /// Short lower-case name: `"portable"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Lanes of one f32 vector register (8 for the portable code, whose canonical order has 8
    /// lanes too).
    pub fn f32_lanes(self) -> usize {
        match self {
            Isa::Portable | Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Features {
    /// The widest instruction set these features allow.
    pub fn isa(self) -> Isa {
        if self.avx2_fma && self.avx512f {
            Isa::Avx512
        } else if self.avx2_fma {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }
}

/// Whether environment variable `name` is set to `1`.
fn env_flag(name: &str) -> bool {
    env_choice(name, || false)
}

/// `false` or `true` when environment variable `name` is `0` or `1`, else `default()`.
fn env_choice(name: &str, default: fn() -> bool) -> bool {
    match std::env::var(name).as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => default(),
    }
}

/// Features of the running CPU (detected on first call), narrowed by `KL_NO_SIMD=1` (none),
/// `KL_NO_AVX512=1` (no AVX-512) and `KL_NO_AVX512BF16=1` (no AVX512-BF16).
///
/// Inlined: kernels ask once per register tile (the decode matrix–vector product about 40 000
/// times a `mini` token), so after the first call this is one load and a test; the detection
/// itself stays out of line.
#[inline]
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    match F.get() {
        Some(f) => *f,
        None => *F.get_or_init(detect),
    }
}

/// What [`features`] reports, detected (once).
#[cold]
#[inline(never)]
fn detect() -> Features {
    let off = env_flag("KL_NO_SIMD");
    #[cfg(target_arch = "x86_64")]
    {
        if !off {
            let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512f =
                avx2_fma && is_x86_feature_detected!("avx512f") && !env_flag("KL_NO_AVX512");
            let avx512bf16 = avx512f
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
                && !env_flag("KL_NO_AVX512BF16");
            return Features {
                avx2_fma,
                avx512f,
                avx512bf16,
                nontemporal: env_choice("KL_NONTEMPORAL", vendor_is_amd),
            };
        }
    }
    let _ = off;
    Features {
        avx2_fma: false,
        avx512f: false,
        avx512bf16: false,
        nontemporal: false,
    }
}

/// Whether the CPU's vendor string (CPUID leaf 0) is AMD's.
#[cfg(target_arch = "x86_64")]
fn vendor_is_amd() -> bool {
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU. (`__cpuid` is a safe function in newer
    // Rust releases and an unsafe one in older ones.)
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
        v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    &v == b"AuthenticAMD"
}

/// A one-line description, e.g. for `bench` output: the architecture, the instruction sets, the
/// vendor-chosen path (`nontemporal`; see [`Features`]) and `amx` when
/// the opt-in AMX products are on ([`crate::amx::enabled`]).
pub fn describe() -> String {
    let f = features();
    let mut s = vec![std::env::consts::ARCH.to_string()];
    if f.avx2_fma {
        s.push("avx2+fma".into());
    }
    if f.avx512f {
        s.push("avx512f".into());
    }
    if f.avx512bf16 {
        s.push("avx512bf16".into());
    }
    if f.nontemporal {
        s.push("nontemporal".into());
    }
    if crate::amx::enabled() {
        s.push("amx".into());
    }
    if s.len() == 1 {
        s.push("portable".into());
    }
    s.join(" ")
}

/// While alive, the current thread's vector unit flushes denormal (subnormal) results to zero
/// and reads denormal inputs as zero (x86-64 MXCSR FTZ and DAZ); the previous mode comes back on
/// drop. Elsewhere it does nothing.
///
/// Why: x86 cores take a microcode assist, on the order of a hundred cycles, for an
/// instruction whose result is denormal. The chunked KDA kernel multiplies keys and queries by
/// decay factors `e^{Γ}` that reach `1e-35` and below within a chunk for strongly decaying
/// channels, so many of its products land in the denormal range; with them flushed, the
/// kernel runs 1.5–1.8 times as fast on such inputs (docs/performance.md). Values below
/// `1.2·10⁻³⁸` are far under the f32 resolution of the O(1e-3..1) sums they are part of, and the
/// flush is deterministic, so results stay reproducible bit for bit.
///
/// The mode is set with `ldmxcsr` in an `asm!` block that the compiler treats as touching
/// memory: no load or store moves across it, and the arithmetic in between depends on loads
/// made after it and feeds stores made before the restore.
#[must_use = "the mode is restored when the guard is dropped"]
pub struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushDenormals {
    /// Flush denormals on this thread until the guard is dropped.
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // MXCSR flush-to-zero (bit 15), and denormals-are-zero (bit 6), which a few early
            // x86-64 cores lack (setting it there faults); every AVX2 core has it.
            let bits = (1 << 15) | if features().avx2_fma { 1 << 6 } else { 0 };
            let saved = read_mxcsr();
            write_mxcsr(saved | bits);
            FlushDenormals { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushDenormals {}
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        write_mxcsr(self.saved);
    }
}

#[cfg(target_arch = "x86_64")]
fn read_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores the 32-bit MXCSR into a live local (SSE is part of x86-64).
    unsafe {
        std::arch::asm!("stmxcsr [{p}]", p = in(reg) &mut v, options(nostack, preserves_flags))
    };
    v
}

#[cfg(target_arch = "x86_64")]
fn write_mxcsr(v: u32) {
    // SAFETY: loads MXCSR from a live local; only the rounding/flush/mask bits that `v` carries
    // (a value read from MXCSR, plus FTZ/DAZ) are set, so no reserved bit faults.
    unsafe { std::arch::asm!("ldmxcsr [{p}]", p = in(reg) &v, options(nostack, preserves_flags)) };
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use super::FlushDenormals;
    #[cfg(target_arch = "x86_64")]
    use std::hint::black_box;

    /// The vendor test reads the vendor the kernel reports (Linux's `/proc/cpuinfo`).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn vendor_matches_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo is readable");
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|rest| rest.split(':').nth(1))
            .map(str::trim)
            .expect("/proc/cpuinfo names a vendor_id");
        assert_eq!(
            super::vendor_is_amd(),
            vendor == "AuthenticAMD",
            "vendor {vendor}"
        );
    }

    /// Inside the guard a denormal product is flushed to zero; outside it is not, and the mode
    /// returns when the guard is dropped (also for nested guards).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn flush_denormals_is_scoped() {
        let tiny = || black_box(1e-30f32) * black_box(1e-10f32);
        assert!(tiny() > 0.0 && tiny() < f32::MIN_POSITIVE);
        {
            let _outer = FlushDenormals::new();
            assert_eq!(tiny(), 0.0);
            {
                let _inner = FlushDenormals::new();
                assert_eq!(tiny(), 0.0);
            }
            assert_eq!(tiny(), 0.0);
        }
        assert!(tiny() > 0.0 && tiny() < f32::MIN_POSITIVE);
    }
}
