//! Roofline measurement: the machine's peak f32 FMA throughput and its memory read bandwidth,
//! so that benchmarks can quote each kernel as a fraction of what the hardware can do.
//!
//! - [`measure_fma`] runs independent FMA chains (12 vector accumulators, enough to cover the FMA
//!   latency on two ports) on every thread for a fixed time and reports GFLOP/s (one FMA = 2
//!   flops) together with the instruction set measured: the widest one the kernels use
//!   ([`crate::cpu::Features::isa`]), i.e. 16-lane AVX-512 FMAs when the AVX-512 matmul prefill
//!   kernel is active (`KL_NO_AVX512=1` measures AVX2, `KL_NO_SIMD=1` the portable loop).
//!   [`measure_fma_gflops`] is its GFLOP/s alone.
//! - [`measure_bf16_dot_gflops`] does the same with `vdpbf16ps` (16 lanes of two bf16
//!   multiply-adds each, 64 flops an instruction) where the CPU has AVX512-BF16: the ceiling of
//!   latent attention's bf16 products ([`crate::attention_bf16`]), about twice the FMA peak.
//! - [`measure_stream_gbps`] sums an f32 buffer of 256 MiB (or twice the last-level cache if that
//!   is larger, at most 1 GiB: see [`stream_bytes`]) split across threads, each thread reading
//!   its part as 2, 4 or 8 sequential streams advanced together (which is fastest depends on
//!   the machine's prefetchers), the best of four passes of each, and reports bytes read per
//!   second in GB/s (10⁹ bytes). The buffer holds distinct values throughout, so no two of its
//!   pages are alike: a precaution against a host that merges identical pages and would then
//!   serve the whole buffer from one cached page (it changed no reading on the Zen 5 VM).
//!
//! Both spawn their own `threads` OS threads (not the rayon pool), pinned to nothing; each takes
//! about 0.2–0.5 s. The workers read the clock themselves and a run lasts from the first one's
//! start to the last one's finish: with as many workers as CPUs, a spawning thread that timed the
//! run might only get a CPU back after the work was done (on a 2-vCPU VM this read 300 TB/s).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::cpu::Isa;

/// Independent accumulator chains of the FMA probe (each one vector register).
const CHAINS: usize = 12;

/// A measured FMA peak and the instruction set it was measured with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmaPeak {
    /// f32 GFLOP/s over all threads (2 flops per FMA lane).
    pub gflops: f64,
    /// The vector width measured: `Avx512` (16 lanes), `Avx2` (8 lanes) or `Portable`.
    pub isa: Isa,
}

/// Peak f32 FMA throughput with `threads` threads (≥ 1), measured with the widest instruction
/// set the kernels use on this machine ([`crate::cpu::features`]`().isa()`): AVX-512 where the
/// matmul prefill runs its AVX-512 kernel, else AVX2+FMA, else a portable 8-wide loop. Takes
/// about 0.3 s.
pub fn measure_fma(threads: usize) -> FmaPeak {
    measure_fma_isa(threads, crate::cpu::features().isa())
}

/// [`measure_fma`] with FMAs no wider than `isa` (capped at what the CPU allows; the result
/// says which was used), e.g. `Isa::Avx2` for the peak of the AVX2-only kernels.
pub fn measure_fma_isa(threads: usize, isa: Isa) -> FmaPeak {
    let isa = isa.min(crate::cpu::features().isa());
    let flops = (CHAINS * isa.f32_lanes() * 2) as f64;
    let gflops = peak_gflops(threads, flops, |iters| fma_loop(isa, iters));
    FmaPeak { gflops, isa }
}

/// The best of four timed runs of `kernel(iters)` on each of `threads` threads (≥ 1), in
/// GFLOP/s for `flops` per iteration: `iters` is calibrated on one thread so that a run lasts
/// about 60 ms.
fn peak_gflops(threads: usize, flops: f64, kernel: impl Fn(u64) -> f32 + Sync) -> f64 {
    let threads = threads.max(1);
    let mut iters = 1u64 << 16;
    loop {
        let t = Instant::now();
        black_box(kernel(iters));
        if t.elapsed() > Duration::from_millis(20) || iters > 1 << 34 {
            let per = t.elapsed().as_secs_f64() / iters as f64;
            iters = ((0.06 / per) as u64).max(1);
            break;
        }
        iters *= 2;
    }
    let mut best = 0f64;
    for _ in 0..4 {
        let secs = run_threads(threads, |_| {
            black_box(kernel(iters));
        });
        best = best.max(threads as f64 * iters as f64 * flops / secs / 1e9);
    }
    best
}

/// One measurement of the roofline: the FMA peak ([`measure_fma`]) and the stream bandwidth
/// ([`measure_stream_gbps`]) with the same threads.
///
/// On a shared machine one measurement can land in a slow minute, which would flatter every
/// fraction quoted against it; benchmarks measure before and after their runs and quote against
/// [`Roofline::max`] of the two.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    /// The FMA peak and the instruction set it was measured with.
    pub fma: FmaPeak,
    /// Stream read bandwidth, GB/s.
    pub stream_gbps: f64,
    /// The bf16 dot-product peak ([`measure_bf16_dot_gflops`]), where latent attention's bf16
    /// products run on it (AVX512-BF16); `None` elsewhere.
    pub bf16_dot_gflops: Option<f64>,
}

impl Roofline {
    /// Measure every figure with `threads` threads (about 0.5–1.5 s).
    pub fn measure(threads: usize) -> Roofline {
        let fma = measure_fma(threads);
        Roofline {
            fma,
            stream_gbps: measure_stream_gbps(threads),
            bf16_dot_gflops: measure_bf16_dot_gflops(threads),
        }
    }

    /// The peak that FLOPs run against: the bf16 dot-product peak where they are bf16 products
    /// (`bf16_products`: latent attention over a bf16 cache, prefill products under
    /// `--bf16-activations`) and the peak was measured, else the FMA peak.
    pub fn products_gflops(&self, bf16_products: bool) -> f64 {
        match self.bf16_dot_gflops {
            Some(g) if bf16_products => g,
            _ => self.fma.gflops,
        }
    }

    /// The higher of two measurements, figure by figure.
    pub fn max(&self, other: &Roofline) -> Roofline {
        Roofline {
            fma: FmaPeak {
                gflops: self.fma.gflops.max(other.fma.gflops),
                isa: self.fma.isa,
            },
            stream_gbps: self.stream_gbps.max(other.stream_gbps),
            bf16_dot_gflops: match (self.bf16_dot_gflops, other.bf16_dot_gflops) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// Peak bf16 dot-product throughput with `threads` threads, in GFLOP/s (two flops per bf16
/// multiply-add): independent chains of `vdpbf16ps` like [`measure_fma`]'s, where the CPU has
/// AVX512-BF16 and the kernels use it ([`crate::cpu::Features::avx512bf16`]); `None` elsewhere.
pub fn measure_bf16_dot_gflops(threads: usize) -> Option<f64> {
    if !crate::cpu::features().avx512bf16 {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let flops = (BF16_CHAINS * 64) as f64;
        // SAFETY: AVX512-BF16 checked above.
        Some(peak_gflops(threads, flops, |iters| unsafe {
            x86::bf16_dot_loop(iters)
        }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// Independent accumulator chains of the bf16 dot-product probe (`vdpbf16ps` has a longer
/// latency than an FMA).
#[cfg(target_arch = "x86_64")]
const BF16_CHAINS: usize = 16;

/// [`measure_fma`]'s GFLOP/s alone.
pub fn measure_fma_gflops(threads: usize) -> f64 {
    measure_fma(threads).gflops
}

/// Memory read bandwidth in GB/s (10⁹ bytes/s) with `threads` threads (≥ 1): a sum over a
/// buffer of [`stream_bytes`] bytes (≥ 256 MiB, ≥ 2 × LLC), each thread reading its own
/// contiguous part as 2, 4 or 8 concurrent streams; the best of 4 passes of each. Allocates and
/// touches the buffer once (in parallel); takes about 0.3–1 s.
pub fn measure_stream_gbps(threads: usize) -> f64 {
    measure_stream_gbps_bytes(threads, stream_bytes())
}

/// Buffer size of [`measure_stream_gbps`]: 256 MiB, or twice the last-level cache when that is
/// larger (as reported by Linux sysfs; some hosts have several hundred MiB), at most 1 GiB.
pub fn stream_bytes() -> usize {
    let llc = llc_bytes().unwrap_or(0);
    (256usize << 20).max(2 * llc).min(1 << 30)
}

/// Size of the largest cache level Linux reports for CPU 0, if any.
fn llc_bytes() -> Option<usize> {
    let mut best = None;
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let Ok(size) = std::fs::read_to_string(format!("{dir}/size")) else {
            continue;
        };
        let size = size.trim();
        let (num, mul) = match size.as_bytes().last() {
            Some(b'K') => (&size[..size.len() - 1], 1usize << 10),
            Some(b'M') => (&size[..size.len() - 1], 1 << 20),
            Some(b'G') => (&size[..size.len() - 1], 1 << 30),
            _ => (size, 1),
        };
        if let Ok(v) = num.parse::<usize>() {
            best = best.max(Some(v * mul));
        }
    }
    best
}

/// [`measure_stream_gbps`] over a buffer of `bytes` bytes (rounded to whole f32s, at least 1 MiB).
pub fn measure_stream_gbps_bytes(threads: usize, bytes: usize) -> f64 {
    let threads = threads.max(1);
    let n = bytes.max(1 << 20) / 4;
    let bytes = n * 4;
    let per = n.div_ceil(threads).div_ceil(64) * 64;
    let mut buf = vec![0f32; n];
    // First touch by the threads that will read (matters on NUMA machines).
    std::thread::scope(|s| {
        for (i, part) in buf.chunks_mut(per).enumerate() {
            s.spawn(move || {
                // Distinct values (no two pages alike; see the module doc).
                for (j, v) in part.iter_mut().enumerate() {
                    *v = (i * per + j) as f32;
                }
            });
        }
    });
    let buf = &buf;
    let mut best = 0f64;
    for (_, sum_streams) in STREAMS {
        for _ in 0..4 {
            let secs = run_threads(threads, |i| {
                let lo = (i * per).min(n);
                let hi = ((i + 1) * per).min(n);
                black_box(sum_streams(&buf[lo..hi]));
            });
            best = best.max(bytes as f64 / secs / 1e9);
        }
    }
    best
}

/// The reads the bandwidth probe tries, by concurrent sequential streams per thread (4 passes
/// each; the best counts). Which is fastest depends on the machine: on the Intel VM several
/// streams kept more hardware-prefetch requests in flight than one; on the Zen 5 VM one thread
/// read 33–34 GB/s as 8 streams and 40–41 as 2, while two threads read about the same either way.
const STREAMS: [(usize, SumFn); 3] = [
    (2, sum_streams::<2>),
    (4, sum_streams::<4>),
    (8, sum_streams::<8>),
];

/// A read of the bandwidth probe: the sum of a slice.
type SumFn = fn(&[f32]) -> f32;

/// Sum of `x`, read as `S` sequential streams advanced together (one 8-float vector of each per
/// step).
fn sum_streams<const S: usize>(x: &[f32]) -> f32 {
    let part = x.len() / (S * 8) * 8;
    let len = part * S;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 checked; the streams cover x[..len].
        return unsafe { x86::sum_streams::<S>(&x[..len], part) } + sum_f32(&x[len..]);
    }
    let mut acc = [[0f32; 8]; S];
    for i in (0..part).step_by(8) {
        for (s, a) in acc.iter_mut().enumerate() {
            for l in 0..8 {
                a[l] += x[s * part + i + l];
            }
        }
    }
    acc.iter().flatten().sum::<f32>() + sum_f32(&x[len..])
}

/// Run `f(thread_index)` on `threads` scoped threads started together; wall seconds from the
/// first thread's start to the last thread's finish, as the threads themselves read the clock.
/// (Timing from the spawning thread would be wrong when it has no CPU of its own: with as many
/// workers as CPUs it may only run again after a worker has finished.)
fn run_threads(threads: usize, f: impl Fn(usize) + Sync) -> f64 {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    f(i);
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("roofline probe thread panicked"))
            .collect()
    });
    let first = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let last = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    (last - first).as_secs_f64()
}

/// `iters` rounds of `CHAINS` independent FMAs of `isa.f32_lanes()` lanes (`isa` no wider than
/// the CPU allows); returns a value depending on all chains.
fn fma_loop(isa: Isa, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa` is capped at the features detected at run time.
        Isa::Avx512 => return unsafe { x86::fma_loop_512(iters) },
        Isa::Avx2 => return unsafe { x86::fma_loop(iters) },
        Isa::Portable => {}
    }
    let _ = isa;
    let (a, b) = (black_box(0.999_999f32), black_box(1e-7f32));
    let mut acc = [[1f32; 8]; CHAINS];
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for v in chain.iter_mut() {
                *v = *v * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

/// Sum of a slice (read-bandwidth probe).
fn sum_f32(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: AVX2 checked at run time.
        return unsafe { x86::sum_f32(x) };
    }
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_loop(iters: u64) -> f32 {
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn fma_loop_512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        sum512(&acc)
    }

    /// The sum of every lane of `acc` (what the probe loops return, so no chain is dead code).
    #[inline(always)]
    unsafe fn sum512(acc: &[__m512]) -> f32 {
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, *v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `iters` rounds of `BF16_CHAINS` independent `vdpbf16ps` (values that stay finite).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot_loop(iters: u64) -> f32 {
        // bf16 1.0 and a tiny step, so the sums grow slowly and stay finite.
        let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(black_box(0x3f80)));
        let b = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(black_box(0x2f80)));
        let mut acc = [_mm512_set1_ps(1.0); super::BF16_CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        sum512(&acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_streams<const S: usize>(x: &[f32], part: usize) -> f32 {
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); S];
        let mut i = 0;
        while i < part {
            for (s, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(s * part + i)));
            }
            i += 8;
        }
        let mut t = _mm256_setzero_ps();
        for a in acc {
            t = _mm256_add_ps(t, a);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), t);
        out.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_f32(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 64 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(i + 8 * u)));
            }
            i += 64;
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum::<f32>() + x[i..].iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timed run spans every worker's own work: with more busy workers than CPUs the span is
    /// still at least the longest one (timing from the spawning thread could read far less).
    #[test]
    fn run_threads_spans_every_worker() {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
        let busy = Duration::from_millis(15);
        for _ in 0..3 {
            let longest = std::sync::Mutex::new(Duration::ZERO);
            let secs = run_threads(threads, |_| {
                let t = Instant::now();
                while t.elapsed() < busy {
                    std::hint::spin_loop();
                }
                let mut l = longest.lock().unwrap();
                *l = (*l).max(t.elapsed());
            });
            let longest = longest.into_inner().unwrap().as_secs_f64();
            assert!(secs >= longest, "span {secs} s < a worker's {longest} s");
        }
    }

    /// Every stream count reads every element once, tails included (small integers, so every
    /// order of summation is exact).
    #[test]
    fn sum_streams_reads_every_element() {
        for n in [0usize, 7, 64, 131, 1000, 4099] {
            let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
            let want: f32 = x.iter().sum();
            for (streams, sum_streams) in STREAMS {
                assert_eq!(sum_streams(&x), want, "n {n}, {streams} streams");
            }
        }
    }

    /// The probes give finite positive figures (small buffer, one thread).
    #[test]
    fn probes_report_positive_figures() {
        let gbps = measure_stream_gbps_bytes(1, 1 << 20);
        assert!(gbps.is_finite() && gbps > 0.0, "{gbps}");
        let fma = measure_fma(1);
        assert!(fma.gflops.is_finite() && fma.gflops > 0.0, "{fma:?}");
        let bf16 = measure_bf16_dot_gflops(1);
        assert_eq!(bf16.is_some(), crate::cpu::features().avx512bf16);
        if let Some(g) = bf16 {
            assert!(g.is_finite() && g > 0.0, "{g}");
        }
    }
}
