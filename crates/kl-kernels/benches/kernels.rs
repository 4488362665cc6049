//! Micro-benchmarks of the hot kernels against the measured roofline.
//!
//! ```text
//! cargo bench -p kl-kernels --bench kernels                 # everything
//! cargo bench -p kl-kernels --bench kernels -- matmul gemv  # only names containing a filter
//! RAYON_NUM_THREADS=1 cargo bench -p kl-kernels --bench kernels -- kda
//! ```
//!
//! Each case is warmed up, then run until ~`KL_BENCH_SECS` seconds (default 1) or at least 5
//! iterations have passed; the median time is reported with GFLOP/s (compute-bound kernels) or
//! GB/s of compulsory traffic (bandwidth-bound kernels), and the fraction of the roofline with
//! the same number of threads; then the same for the best iteration (useful on a shared, noisy
//! machine). The roofline is measured before the cases and again after them, and every fraction
//! is quoted against the higher of the two (as `kimi-linear bench` does), so that a measurement
//! taken in a slow minute cannot inflate them; the rows are printed once both are known.
//!
//! The FMA peak is measured with the widest vector width the kernels use (AVX-512 when the
//! matmul prefill kernel uses it; `KL_NO_AVX512=1` forces AVX2 everywhere). With AVX-512 active,
//! every matmul case also runs on the AVX2 kernels (same bits) and is quoted against the AVX2
//! peak, an A/B comparison within one run. Latent attention over its bf16 cache runs the bf16
//! products (`kl_kernels::attention_bf16`); where they run on AVX512-BF16 the rows are quoted
//! against the measured `vdpbf16ps` peak (about twice the FMA peak), else against the FMA peak.
//! Its decode rows at 32K keys run once over one cache, which stays in L3 from call to call,
//! and once `(cache from memory)`, each call over the next of several caches, as in the model,
//! where a token's weights evict the cache between its calls.
//! Where the CPU has AMX tiles, each bf16 matmul case and each latent attention case also runs
//! on the opt-in AMX kernels (`[amx]`, `kl_kernels::amx`), quoted against the FMA peak.

use half::bf16;
use kl_kernels::attention::{latent_attention, LatentAttnShape};
use kl_kernels::cpu::Isa;
use kl_kernels::expanded_bf16::{attend_block, pack_queries, packed_queries_len, BlockBufs};
use kl_kernels::kda::{kda_chunked, kda_recurrent, KdaShape, CHUNK};
use kl_kernels::matmul::{matmul, matmul_isa};
use kl_kernels::roofline::{measure_fma_isa, Roofline};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

struct Roof {
    /// The FMA peak of the widest ISA in use and the stream bandwidth.
    main: Roofline,
    /// The AVX2 FMA peak, when AVX-512 is in use (for the AVX2 A/B rows of `matmul`).
    avx2: Option<f64>,
}

impl Roof {
    /// Measure with `threads` threads: the roofline at the widest ISA (and the FMA peak at AVX2
    /// when that is AVX-512).
    fn measure(threads: usize) -> Roof {
        let main = Roofline::measure(threads);
        let avx2 =
            (main.fma.isa == Isa::Avx512).then(|| measure_fma_isa(threads, Isa::Avx2).gflops);
        Roof { main, avx2 }
    }

    /// The higher of two measurements, figure by figure.
    fn max(&self, o: &Roof) -> Roof {
        Roof {
            main: self.main.max(&o.main),
            avx2: self.avx2.zip(o.avx2).map(|(a, b)| a.max(b)),
        }
    }

    fn describe(&self) -> String {
        let avx2 = self
            .avx2
            .map_or(String::new(), |g| format!("; avx2 {g:.1}"));
        let dot = self
            .main
            .bf16_dot_gflops
            .map_or(String::new(), |g| format!(", bf16 dot peak {g:.1} GFLOP/s"));
        format!(
            "FMA peak {:.1} GFLOP/s ({}{avx2}), stream read {:.1} GB/s{dot}",
            self.main.fma.gflops, self.main.fma.isa, self.main.stream_gbps
        )
    }
}

/// What a row is quoted against.
#[derive(Clone, Copy)]
enum Against {
    /// The FMA peak of the widest ISA; the work is FLOPs.
    Fma,
    /// The AVX2 FMA peak; the work is FLOPs.
    Avx2,
    /// The bf16 dot-product peak where it was measured, else the FMA peak; the work is FLOPs.
    Bf16Dot,
    /// The stream bandwidth; the work is bytes, and the kernel's FLOPs are shown alongside.
    Stream { flops: f64 },
}

/// One measured case, printed once the roofline is known.
struct Row {
    name: String,
    /// Median and best seconds per call.
    secs: (f64, f64),
    work: f64,
    against: Against,
}

/// The rows measured so far.
#[derive(Default)]
struct Rows(std::cell::RefCell<Vec<Row>>);

impl Rows {
    /// Keep a row (and name it on stderr, for progress: the rows print at the end).
    fn push(&self, row: Row) {
        eprintln!("measured {}", row.name);
        self.0.borrow_mut().push(row);
    }

    fn flops(&self, name: &str, secs: (f64, f64), flops: f64, against: Against) {
        self.push(Row {
            name: name.to_string(),
            secs,
            work: flops,
            against,
        });
    }

    fn bytes(&self, name: &str, secs: (f64, f64), bytes: f64, flops: f64) {
        self.push(Row {
            name: name.to_string(),
            secs,
            work: bytes,
            against: Against::Stream { flops },
        });
    }

    fn print(&self, roof: &Roof) {
        for r in self.0.borrow().iter() {
            let (secs, best) = r.secs;
            let (rate, bestrate) = (r.work / secs / 1e9, r.work / best / 1e9);
            match r.against {
                Against::Fma | Against::Avx2 | Against::Bf16Dot => {
                    let (peak, what) = match r.against {
                        Against::Avx2 => (roof.avx2.unwrap_or(roof.main.fma.gflops), "FMA"),
                        Against::Bf16Dot => match roof.main.bf16_dot_gflops {
                            Some(g) => (g, "dot"),
                            None => (roof.main.fma.gflops, "FMA"),
                        },
                        _ => (roof.main.fma.gflops, "FMA"),
                    };
                    println!(
                        "{:<42} {:>9.3} ms {:>7.1} GFLOP/s {:>5.1}% of {what} peak | best {:>7.1} GFLOP/s {:>5.1}%",
                        r.name,
                        secs * 1e3,
                        rate,
                        100.0 * rate / peak,
                        bestrate,
                        100.0 * bestrate / peak
                    );
                }
                Against::Stream { flops } => println!(
                    "{:<42} {:>9.3} ms {:>7.1} GB/s    {:>5.1}% of stream   | best {:>7.1} GB/s    {:>5.1}%  ({:.1} GFLOP/s)",
                    r.name,
                    secs * 1e3,
                    rate,
                    100.0 * rate / roof.main.stream_gbps,
                    bestrate,
                    100.0 * bestrate / roof.main.stream_gbps,
                    flops / secs / 1e9
                ),
            }
        }
    }
}

/// Seconds per call of `f`: (median, best).
fn time(mut f: impl FnMut()) -> (f64, f64) {
    let budget = std::env::var("KL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    let t0 = Instant::now();
    f(); // warm-up
    let first = t0.elapsed();
    let extra = (first.as_secs_f64() < 0.2).then(|| {
        for _ in 0..2 {
            f();
        }
    });
    let _ = extra;
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < 5 || (start.elapsed() < Duration::from_secs_f64(budget) && v.len() < 10_000) {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0])
}

fn bench_matmul(rows: &Rows, avx512: bool, rng: &mut Rng) {
    let t = 512;
    // One case at the default (widest) ISA, then on the AVX2 kernels against the AVX2 peak.
    let case = |name: &str, run: &mut dyn FnMut(Isa), flops: f64| {
        rows.flops(name, time(|| run(Isa::Avx512)), flops, Against::Fma);
        if avx512 {
            let name = format!("{name} [avx2]");
            rows.flops(&name, time(|| run(Isa::Avx2)), flops, Against::Avx2);
        }
    };
    for &(k, n) in &[
        (2304, 4096),
        (2304, 1024),
        (1024, 2304),
        (2304, 512),
        (4096, 2304),
    ] {
        let x = rng.vec(t * k, 1.0);
        let w: Vec<bf16> = rng
            .vec(n * k, 0.05)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut y = vec![0f32; t * n];
        case(
            &format!("matmul bf16 T={t} K={k} N={n}"),
            &mut |isa| matmul_isa(isa, black_box(&x), &w, &mut y, t, k, n),
            2.0 * (t * k * n) as f64,
        );
        // The opt-in AMX kernel (`--amx`), against the same FMA peak.
        if kl_kernels::amx::available() {
            rows.flops(
                &format!("matmul bf16 T={t} K={k} N={n} [amx]"),
                time(|| kl_kernels::amx::matmul_bf16(black_box(&x), &w, &mut y, t, k, n)),
                2.0 * (t * k * n) as f64,
                Against::Fma,
            );
        }
    }
    // The released model's experts: 8 of 256 per token, so about 16 rows each in a 512-token
    // chunk and 64 in the 2048-token chunk it gets by default (`kl_model::auto_prefill_chunk`);
    // each product runs start to finish on one thread, as the MoE layer runs them, over more
    // distinct matrices (80 × 4.7 MB) than the L3 holds, so the weights come from memory. The
    // gate and up projections are 2304 × 1024, the down projection 1024 × 2304 (its x rows
    // 4 KiB apart, so they are packed).
    let one: Vec<bf16> = rng
        .vec(2304 * 1024, 0.05)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let experts: Vec<Vec<bf16>> = (0..80).map(|_| one.clone()).collect();
    for (t, k, n) in [
        (16, 2304, 1024),
        (32, 2304, 1024),
        (64, 2304, 1024),
        (64, 1024, 2304),
    ] {
        let x = rng.vec(t * k, 1.0);
        let mut ys: Vec<Vec<f32>> = experts.iter().map(|_| vec![0f32; t * n]).collect();
        rows.flops(
            &format!("matmul bf16 experts T={t} K={k} N={n}, 80 from memory"),
            time(|| {
                experts
                    .par_iter()
                    .zip(ys.par_iter_mut())
                    .for_each(|(w, y)| {
                        kl_kernels::par::serial(|| matmul(black_box(&x), w, y, t, k, n))
                    })
            }),
            2.0 * (t * k * n * experts.len()) as f64,
            Against::Fma,
        );
    }
    let (k, n) = (2304, 2304);
    let x = rng.vec(t * k, 1.0);
    let w = rng.vec(n * k, 0.05);
    let mut y = vec![0f32; t * n];
    case(
        &format!("matmul f32 T={t} K={k} N={n}"),
        &mut |isa| matmul_isa(isa, black_box(&x), &w, &mut y, t, k, n),
        2.0 * (t * k * n) as f64,
    );
}

fn bench_gemv(rows: &Rows, rng: &mut Rng) {
    for &(n, k) in &[(2304, 9216), (163840, 2304)] {
        // Enough copies of W that one pass over all of them exceeds the last-level cache
        // (512 MiB), cycled call by call, so the weights stream from DRAM as in real decode
        // (a model's layers do not fit in cache). The 163840×2304 matrix alone is 755 MB.
        let bytes = 2 * n * k;
        let copies = (512usize << 20).div_ceil(bytes).max(1);
        let ws: Vec<Vec<bf16>> = (0..copies)
            .map(|_| {
                rng.vec(n * k, 0.05)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            })
            .collect();
        for &t in &[1usize, 4] {
            let x = rng.vec(t * k, 1.0);
            let mut y = vec![0f32; t * n];
            let mut i = 0;
            let secs = time(|| {
                matmul(black_box(&x), &ws[i % copies], &mut y, t, k, n);
                i += 1;
            });
            rows.bytes(
                &format!("gemv bf16 T={t} N={n} K={k} (cold)"),
                secs,
                bytes as f64,
                2.0 * (t * n * k) as f64,
            );
            if copies > 1 {
                let secs = time(|| matmul(black_box(&x), &ws[0], &mut y, t, k, n));
                rows.bytes(
                    &format!("gemv bf16 T={t} N={n} K={k} (hot, LLC)"),
                    secs,
                    bytes as f64,
                    2.0 * (t * n * k) as f64,
                );
            }
        }
    }
}

fn kda_inputs(rng: &mut Rng, s: KdaShape) -> [Vec<f32>; 6] {
    let KdaShape { t, h, k, v, .. } = s;
    let mut q = rng.vec(t * h * k, 1.0);
    let mut kk = rng.vec(t * h * k, 1.0);
    kl_kernels::norm::l2_normalize_rows(&mut q, k, 1e-6, (k as f32).powf(-0.5));
    kl_kernels::norm::l2_normalize_rows(&mut kk, k, 1e-6, 1.0);
    let vv = rng.vec(t * h * v, 1.0);
    let g: Vec<f32> = (0..t * h * k)
        .map(|_| -((rng.uniform() + 1.0) * 0.5).powi(4) * 3.0)
        .collect();
    let beta: Vec<f32> = (0..t * h).map(|_| (rng.uniform() + 1.0) * 0.5).collect();
    let st = rng.vec(h * k * v, 0.5);
    [q, kk, vv, g, beta, st]
}

fn bench_kda(rows: &Rows, rng: &mut Rng) {
    let (h, kd, vd) = (32, 128, 128);
    let t = 1024;
    let s = KdaShape::new(t, h, kd, vd);
    let [q, k, v, g, beta, st0] = kda_inputs(rng, s);
    let mut st = st0.clone();
    let mut o = vec![0f32; t * h * vd];
    // Paper Eq. 13 (per head): 6·T·d² + 3·T·C·d + T·C².
    let (tf, d, c) = (t as f64, kd as f64, CHUNK as f64);
    let flops = h as f64 * (6.0 * tf * d * d + 3.0 * tf * c * d + tf * c * c);
    // Head-major is the layout the layers give it; token-major is PyTorch's.
    let hm = s.head_major();
    let relaid = |x: &[f32], w: usize| {
        let mut y = vec![0f32; x.len()];
        kl_kernels::kda::copy_rows(x, s, 0, &mut y, hm, 0, t, w);
        y
    };
    let (qh, kh, vh, gh) = (
        relaid(&q, kd),
        relaid(&k, kd),
        relaid(&v, vd),
        relaid(&g, kd),
    );
    for (shape, [q, k, v, g], name) in [
        (s, [&q, &k, &v, &g], "token-major"),
        (hm, [&qh, &kh, &vh, &gh], "head-major"),
    ] {
        let secs = time(|| {
            st.copy_from_slice(&st0);
            kda_chunked(shape, q, k, v, g, &beta, &mut st, &mut o)
        });
        rows.flops(
            &format!("kda_chunked H={h} K=V={kd} T={t} {name}"),
            secs,
            flops,
            Against::Fma,
        );
    }

    let s1 = KdaShape { t: 1, ..s };
    let (q1, k1, v1, g1, b1) = (
        &q[..h * kd],
        &k[..h * kd],
        &v[..h * vd],
        &g[..h * kd],
        &beta[..h],
    );
    let mut o1 = vec![0f32; h * vd];
    st.copy_from_slice(&st0);
    let secs = time(|| kda_recurrent(s1, q1, k1, v1, g1, b1, &mut st, &mut o1));
    // State read + written once per step; ~7 flops per state element.
    let state_bytes = (h * kd * vd * 4) as f64;
    rows.bytes(
        &format!("kda_recurrent step H={h} K=V={kd}"),
        secs,
        2.0 * state_bytes,
        7.0 * (h * kd * vd) as f64,
    );
}

/// A bf16 latent cache of whole `block_rows`-row blocks holding at least `n_keys` random rows.
fn random_cache(rng: &mut Rng, n_keys: usize, block_rows: usize, dk: usize) -> Vec<bf16> {
    rng.vec(n_keys.div_ceil(block_rows) * block_rows * dk, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

fn bench_attention(rows: &Rows, rng: &mut Rng) {
    // The released model's heads and latent row (32 heads, rank 512 + rope 64), at 4K and 32K
    // keys, and `mini`'s (16 heads, rank 256 + rope 32) at 32K.
    for (h, dk, dv, n_keys) in [
        (32, 576, 512, 4096usize),
        (32, 576, 512, 32768),
        (16, 288, 256, 32768),
    ] {
        let s = LatentAttnShape { h, dk, dv };
        let block_rows = 256;
        let store = random_cache(rng, n_keys, block_rows, dk);
        let blocks: Vec<&[bf16]> = store.chunks(block_rows * s.dk).collect();
        let q = rng.vec(s.h * s.dk, 1.0);
        let mut o = vec![0f32; s.h * s.dv];
        let secs = time(|| latent_attention(s, &q, &blocks, block_rows, n_keys, 0.07, &mut o));
        let flops = 2.0 * (s.h * n_keys * (s.dk + s.dv)) as f64;
        let name = format!(
            "latent_attention decode H={} Dk={} keys={n_keys}",
            s.h, s.dk
        );
        rows.flops(&name, secs, flops, Against::Bf16Dot);
        // The opt-in AMX kernel (`--amx`; the cache is bf16 and the shape whole head tiles).
        if kl_kernels::amx::set_enabled(true) {
            let secs = time(|| latent_attention(s, &q, &blocks, block_rows, n_keys, 0.07, &mut o));
            kl_kernels::amx::set_enabled(false);
            rows.flops(&format!("{name} [amx]"), secs, flops, Against::Fma);
        }
    }
}

/// Decode attention over caches that come from memory, as in the model (where a token's
/// weights evict the cache from L3 between calls): `mini`'s and the released model's shapes at
/// 32K keys, each call on the next of several caches (over 100 MB together) in rotation.
fn bench_attention_cold(rows: &Rows, rng: &mut Rng) {
    for (h, dk, dv, copies) in [(16, 288, 256, 6usize), (32, 576, 512, 3)] {
        let n_keys = 32768usize;
        let s = LatentAttnShape { h, dk, dv };
        let block_rows = 256;
        let stores: Vec<Vec<bf16>> = (0..copies)
            .map(|_| random_cache(rng, n_keys, block_rows, dk))
            .collect();
        let blocks: Vec<Vec<&[bf16]>> = stores
            .iter()
            .map(|st| st.chunks(block_rows * s.dk).collect())
            .collect();
        let q = rng.vec(s.h * s.dk, 1.0);
        let mut o = vec![0f32; s.h * s.dv];
        let mut next = 0;
        let secs = time(|| {
            latent_attention(s, &q, &blocks[next], block_rows, n_keys, 0.07, &mut o);
            next = (next + 1) % copies;
        });
        let flops = 2.0 * (s.h * n_keys * (s.dk + s.dv)) as f64;
        let name = format!(
            "latent_attention decode H={} Dk={} keys={n_keys} (cache from memory)",
            s.h, s.dk
        );
        rows.flops(&name, secs, flops, Against::Bf16Dot);
    }
}

fn bench_expanded(rows: &Rows, rng: &mut Rng) {
    // The expanded prefill form over a bf16 cache: every head's 2048 queries (a prefill chunk)
    // against one block of 256 keys they all see (an earlier block), heads in parallel as the
    // layer runs them; `mini`'s head widths and the released model's.
    for (h, qk, dv) in [(16usize, 96usize, 64usize), (32, 192, 128)] {
        let (t, nb) = (2048, 256);
        let q = rng.vec(t * h * qk, 0.3);
        let mut qp = vec![0u32; h * packed_queries_len(t, qk)];
        for (hh, dst) in qp.chunks_exact_mut(packed_queries_len(t, qk)).enumerate() {
            pack_queries(&q[hh * qk..], h * qk, t, qk, 1.0, dst);
        }
        let (k0, v0) = (rng.vec(h * nb * qk, 1.0), rng.vec(h * nb * dv, 1.0));
        let mut state: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..h)
            .map(|_| (vec![0f32; t], vec![0f32; t], vec![0f32; t * dv]))
            .collect();
        let secs = time(|| {
            state
                .par_iter_mut()
                .enumerate()
                .for_each(|(hh, (m, l, acc))| {
                    m.fill(f32::NEG_INFINITY);
                    l.fill(0.0);
                    acc.fill(0.0);
                    let mut k = k0[hh * nb * qk..(hh + 1) * nb * qk].to_vec();
                    let mut v = v0[hh * nb * dv..(hh + 1) * nb * dv].to_vec();
                    let qp = &qp[hh * packed_queries_len(t, qk)..];
                    BUFS.with(|b| {
                        let b = &mut b.borrow_mut();
                        attend_block(qp, t, qk, dv, &mut k, &mut v, nb, 0, |_| nb, m, l, acc, b)
                    });
                })
        });
        let flops = 2.0 * (h * t * nb * (qk + dv)) as f64;
        let name = format!("expanded attention block H={h} qk={qk} dv={dv} T={t} keys={nb}");
        rows.flops(&name, secs, flops, Against::Bf16Dot);
    }
}

fn bench_argmax(rows: &Rows, rng: &mut Rng) {
    // Greedy decoding's pick over a row of logits (`mini`'s vocabulary and the released
    // model's), against the plain loop; the row sits in L2, so the rate is not a stream's.
    for n in [32_000usize, 163_840] {
        let x = rng.vec(n, 3.0);
        type Pick = fn(&[f32]) -> usize;
        let kernels: [(&str, Pick); 2] = [
            ("argmax", kl_kernels::simd::argmax),
            ("argmax_reference", kl_kernels::simd::argmax_reference),
        ];
        for (name, f) in kernels {
            let secs = time(|| {
                std::hint::black_box(f(std::hint::black_box(&x)));
            });
            rows.bytes(&format!("{name} n={n} (in L2)"), secs, 4.0 * n as f64, 0.0);
        }
    }
}

thread_local! {
    static BUFS: std::cell::RefCell<BlockBufs> = std::cell::RefCell::new(BlockBufs::default());
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let threads = rayon::current_num_threads();
    let before = Roof::measure(threads);
    println!(
        "# {} | {threads} threads | roofline before the cases: {}",
        kl_kernels::cpu::describe(),
        before.describe()
    );
    let rows = Rows::default();
    let mut rng = Rng(0x9E3779B97F4A7C15);
    if want("matmul") {
        bench_matmul(&rows, before.avx2.is_some(), &mut rng);
    }
    if want("gemv") {
        bench_gemv(&rows, &mut rng);
    }
    if want("kda") {
        bench_kda(&rows, &mut rng);
    }
    if want("attention") {
        bench_attention(&rows, &mut rng);
        bench_attention_cold(&rows, &mut rng);
    }
    if want("expanded") {
        bench_expanded(&rows, &mut rng);
    }
    if want("argmax") {
        bench_argmax(&rows, &mut rng);
    }
    let after = Roof::measure(threads);
    let roof = before.max(&after);
    println!("# roofline after the cases: {}", after.describe());
    println!(
        "# fractions below are of the higher of the two: {}",
        roof.describe()
    );
    rows.print(&roof);
}
