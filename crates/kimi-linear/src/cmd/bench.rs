//! `kimi-linear bench`: prefill and decode speed on a model, quoted against the machine's
//! measured roofline (FMA GFLOP/s, memory stream GB/s).
//!
//! - Prefill at each `--prompt-tokens` length: a fresh sequence, one timed prefill of random ids
//!   (the time includes making the sequence's state, whose pages a first prompt faults in).
//!   Fraction of the FMA peak = (matmul + KDA + attention FLOPs) / time / peak. The
//!   compute-bound matrix products are also quoted alone: their FLOPs over the wall time during
//!   which any of them ran (a `kl_kernels::matmul` tally), against the peak, and that time's
//!   share of the prefill.
//! - Decode at each `--depth`: the sequence is first filled to that depth (a real prefill by
//!   default; `--depth-fill random` writes random latent rows instead, which costs the same per
//!   decoded token and is much faster to set up), then `--gen-tokens` greedy steps are timed.
//!   Fraction of the bandwidth roofline = (active weight bytes + KDA state read/write + latent
//!   cache read) per token × tokens/s / stream bandwidth.
//! - The roofline is measured before the runs and again after them; fractions use the higher
//!   of each pair (`roofline_measured` in `--json` has both), so that a measurement that lands
//!   in a slow minute of a shared machine cannot inflate them.
//! - `--scaling 1,2,…` repeats every run on each thread count, in a rayon pool of that size
//!   (the runs on the main pool's count are not repeated), each count against a roofline
//!   measured on its own threads, and reports tokens/s with the speed-up over the first count
//!   and the fraction of that count's roofline: how far the engine scales on the machine, in
//!   one command.

use crate::memory::{file_huge_mapped_bytes, human, peak_rss_bytes, CacheDtypeArg, MlaPrefillArgs};
use anyhow::{bail, Context, Result};
use kl_engine::argmax;
use kl_kernels::roofline::Roofline;
use kl_model::{
    CacheDtype, KimiLinear, LayerState, LogitsMode, ModelOptions, Probe, SequenceState,
};
use serde_json::json;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

/// How `bench` reaches a decode depth.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthFill {
    /// A real prefill of random token ids (what a user's context costs to build).
    Prefill,
    /// Random latent rows and state written straight into the cache (fast; decode reads the
    /// same bytes either way).
    Random,
}

/// Flags of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt lengths to prefill (comma-separated).
    #[arg(long, default_value = "512", value_delimiter = ',')]
    prompt_tokens: Vec<usize>,
    /// Tokens decoded per depth.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Context depths at which decode is measured (comma-separated).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    depth: Vec<usize>,
    /// How a decode depth is reached.
    #[arg(long, value_enum, default_value_t = DepthFill::Prefill)]
    depth_fill: DepthFill,
    /// Latent cache dtype.
    #[arg(long, value_enum, default_value_t = CacheDtypeArg::Bf16)]
    cache_dtype: CacheDtypeArg,
    /// Tokens per prefill chunk (activation memory depends on it, not on the prompt) [default:
    /// 2048 for a model with MLA layers, as every Kimi Linear model; else 512, or for many
    /// experts enough that each sees about 64 rows a chunk]
    #[arg(long)]
    prefill_chunk: Option<NonZeroUsize>,
    #[command(flatten)]
    mla: MlaPrefillArgs,
    /// Runs of each measurement: every prefill length and every block of `--gen-tokens` decode
    /// steps is timed this many times; the median run is reported, with the best and the range
    /// (on a shared machine the spread is the neighbours', not the engine's).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Skip the roofline measurement (its 256 MiB buffer would dominate peak RSS in memory
    /// measurements); fractions of the roofline are then not reported.
    #[arg(long)]
    no_roofline: bool,
    /// Thread counts to measure the same runs on as well (comma-separated, as `llama-bench -t
    /// 1,2,4`), each in a thread pool of its own and against its own roofline, reported as a
    /// table of tokens/s and the speed-up over the first count (`scaling` in `--json`).
    #[arg(long, value_delimiter = ',')]
    scaling: Vec<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// Fill `state` to `depth` tokens with random latent rows (unit-RMS latent, small rope part) and
/// random KDA state; decode cost per token is the same as after a real prefill.
fn random_fill(model: &KimiLinear, state: &mut SequenceState, depth: usize) {
    let m = model.config().mla;
    let w = m.latent_width();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let chunk = 256;
    let mut rows = vec![0f32; chunk * w];
    for l in &mut state.layers {
        match l {
            LayerState::Mla(c) => {
                let mut done = 0;
                while done < depth {
                    let n = chunk.min(depth - done);
                    for v in rows[..n * w].iter_mut() {
                        *v = rnd() * 1.7;
                    }
                    c.append(&rows[..n * w]);
                    done += n;
                }
            }
            LayerState::Kda(s) => s.recurrent.iter_mut().for_each(|v| *v = rnd() * 0.1),
        }
    }
    state.pos = depth;
}

/// Tokens per second of each run, sorted, and their median.
struct Runs(Vec<f64>);

impl Runs {
    /// Sorted ascending.
    fn new(mut v: Vec<f64>) -> Runs {
        v.sort_by(f64::total_cmp);
        Runs(v)
    }
    /// The middle run (the lower middle of an even count: a measured value, not a mean).
    fn median(&self) -> f64 {
        self.0[(self.0.len() - 1) / 2]
    }
    fn best(&self) -> f64 {
        self.0[self.0.len() - 1]
    }
    fn worst(&self) -> f64 {
        self.0[0]
    }
    /// ` (best …, N runs: worst–best)` for text output; empty for one run.
    fn spread(&self, digits: usize) -> String {
        if self.0.len() < 2 {
            return String::new();
        }
        format!(
            " (best {:.digits$}; {} runs {:.digits$}–{:.digits$})",
            self.best(),
            self.0.len(),
            self.worst(),
            self.best()
        )
    }
}

/// One measured prefill length (its figures from the median run).
struct PrefillRow {
    t: usize,
    runs: Runs,
    tps: f64,
    gflops: f64,
    /// The compute-bound matrix products alone (`kl_kernels::matmul::Tally`): their FLOPs over
    /// the wall time during which any of them ran; `None` when none ran (a prompt of at most
    /// `GEMV_MAX_ROWS` tokens takes the matrix–vector path only).
    matmul_gflops: Option<f64>,
    /// That time's share of the prefill.
    matmul_share: f64,
}

impl PrefillRow {
    /// All prefill FLOPs per second, and the matrix products' alone (if any ran), over the FMA
    /// peak.
    fn of_peak(&self, roof: Roofline) -> (f64, Option<f64>) {
        (
            self.gflops / roof.fma.gflops,
            self.matmul_gflops.map(|g| g / roof.fma.gflops),
        )
    }

    /// The matrix products' rate over the peak they run against, and that peak's name: the
    /// bf16 dot-product peak with `--bf16-activations` (where it was measured), else the FMA
    /// peak.
    fn products_of_peak(&self, roof: Roofline) -> Option<(f64, &'static str)> {
        let bf16 = kl_kernels::bf16_activations::enabled() && roof.bf16_dot_gflops.is_some();
        let name = if bf16 { "the bf16 dot peak" } else { "peak" };
        self.matmul_gflops
            .map(|g| (g / roof.products_gflops(bf16), name))
    }
}

/// One measured decode depth (its figures from the median run).
struct DecodeRow {
    depth: usize,
    runs: Runs,
    tps: f64,
    gbps: f64,
    gflops: f64,
    /// Bytes and FLOPs of one token (for the roofline), and the attention's share of the FLOPs.
    bytes: f64,
    flops: f64,
    attn_flops: f64,
    /// Whether the attention runs bf16 products (a bf16 cache): its FLOPs then count against
    /// the bf16 dot-product peak where the machine has one.
    bf16_cache: bool,
}

impl DecodeRow {
    /// Bytes per second over the stream bandwidth; roofline time over measured time, the
    /// roofline being the slower of the token's bytes at stream bandwidth and its FLOPs at the
    /// FMA peak (the attention's at the bf16 dot-product peak where its bf16 products run on
    /// one, [`Roofline::products_gflops`]); and which of the two that is.
    fn against(&self, roof: Roofline) -> (f64, f64, &'static str) {
        let (t_mem, t_fma) = (
            self.bytes / (roof.stream_gbps * 1e9),
            (self.flops - self.attn_flops) / (roof.fma.gflops * 1e9)
                + self.attn_flops / (roof.products_gflops(self.bf16_cache) * 1e9),
        );
        let bound = if t_fma > t_mem { "compute" } else { "memory" };
        (
            self.gbps / roof.stream_gbps,
            t_mem.max(t_fma) * self.tps,
            bound,
        )
    }
}

/// `{key(row): value(row)}` over `rows`: one `--json` object keyed by prompt length or depth.
fn keyed<R>(
    rows: &[R],
    key: impl Fn(&R) -> usize,
    value: impl Fn(&R) -> serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    rows.iter()
        .map(|r| (key(r).to_string(), value(r)))
        .collect()
}

/// Run `bench`.
pub fn run(a: Args) -> Result<()> {
    let opts = ModelOptions {
        cache_dtype: a.cache_dtype.into(),
        prefill_chunk: a.prefill_chunk.map_or(0, NonZeroUsize::get),
        mla_prefill: a.mla.mla_prefill.into(),
        ..Default::default()
    };
    if a.repeat == 0 {
        bail!("--repeat 0: expected at least one run of each measurement");
    }
    if let Some(&bad) = a.scaling.iter().find(|&&c| c == 0) {
        bail!("--scaling {bad}: expected thread counts of at least 1");
    }
    let model = KimiLinear::load(&a.model, opts)
        .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    let threads = rayon::current_num_threads();
    if !a.json && !a.no_roofline {
        eprintln!(
            "measuring the roofline on {threads} threads ({})…",
            kl_kernels::cpu::describe()
        );
    }
    // The roofline is measured before the runs and again after them, and the higher of each
    // pair is what the runs are quoted against: on a shared machine one measurement can land in
    // a slow minute, which would make every fraction look better than it is.
    let measure = || (!a.no_roofline).then(|| Roofline::measure(threads));
    let before = measure();
    let (prefill_rows, decode_rows) = measure_runs(&a, &model)?;
    // Before the second roofline measurement, whose buffer would count in it (and before the
    // other thread counts' pools and scratch).
    let rss = peak_rss_bytes().unwrap_or(0);
    let huge = file_huge_mapped_bytes();
    if before.is_some() && !a.json {
        eprintln!("measuring the roofline again…");
    }
    let after = measure();
    let measured = before.zip(after);
    // What the runs are quoted against: the higher of the two; none when not measured, and then
    // every roofline figure (fractions, the decode bound) is null in `--json` and left out of
    // the text, never computed against a made-up peak.
    let roofline = measured.map(|(b, a)| b.max(&a));
    let scaling = measure_scaling(&a, &model, threads, roofline, &prefill_rows, &decode_rows)?;
    report(
        &a,
        &model,
        threads,
        measured,
        roofline,
        &prefill_rows,
        &decode_rows,
        (rss, huge),
        &scaling,
    )
}

/// Every prefill length and decode depth of `a`, timed on the current thread pool (after a
/// warm-up that pages the weights in).
fn measure_runs(a: &Args, model: &KimiLinear) -> Result<(Vec<PrefillRow>, Vec<DecodeRow>)> {
    let vocab = model.config().vocab_size;
    let opts = model.options();
    // Warm-up: touch the weights once (page in the mmap) so the first timing is not I/O.
    {
        let mut st = model.new_state();
        model.prefill(
            &random_ids(
                8.min(a.prompt_tokens.iter().copied().max().unwrap_or(8))
                    .max(1),
                vocab,
                1,
            ),
            &mut st,
            LogitsMode::Last,
            &mut Probe::off(),
        )?;
        model.decode(1, &mut st, &mut Probe::off())?;
    }

    let mut prefill_rows = Vec::new();
    for &t in &a.prompt_tokens {
        if t == 0 {
            continue;
        }
        let ids = random_ids(t, vocab, t as u64);
        // Each run prefills a fresh sequence; keep (seconds, product tally) per run. Making the
        // state is timed too: it faults in the KDA state's pages, which a first prompt pays for
        // either way.
        let mut timed = Vec::new();
        for _ in 0..a.repeat {
            let start = Instant::now();
            let mut st = model.new_state();
            kl_kernels::matmul::tally_start();
            model.prefill(&ids, &mut st, LogitsMode::Last, &mut Probe::off())?;
            let mm = kl_kernels::matmul::tally_stop();
            timed.push((start.elapsed().as_secs_f64(), mm));
        }
        timed.sort_by(|x, y| x.0.total_cmp(&y.0));
        let runs = Runs::new(timed.iter().map(|r| t as f64 / r.0).collect());
        // The median run: the lower middle of the speeds is the upper middle of the times.
        let (secs, mm) = timed[timed.len() / 2];
        let c = model.token_cost(0);
        // Attention FLOPs chunk by chunk, in the form (absorbed or expanded) each chunk used.
        let chunk = model.options().prefill_chunk;
        let attn: u64 = (0..t)
            .step_by(chunk)
            .map(|p0| {
                let n = (p0 + chunk).min(t);
                model.prefill_attention_flops(n - p0, n)
            })
            .sum();
        // The output head runs once (LogitsMode::Last), everything else per token.
        let per_token = c.matmul_flops - c.head_flops + c.kda_flops;
        let flops = per_token as f64 * t as f64 + (c.head_flops + attn) as f64;
        let tps = t as f64 / secs;
        prefill_rows.push(PrefillRow {
            t,
            runs,
            tps,
            gflops: flops / secs / 1e9,
            matmul_gflops: (mm.busy_secs > 0.0).then(|| mm.flops as f64 / mm.busy_secs / 1e9),
            matmul_share: mm.busy_secs / secs,
        });
    }

    let mut decode_rows = Vec::new();
    for &depth in &a.depth {
        let mut st = model.new_state();
        let mut next = 1u32;
        if depth > 0 {
            if a.depth_fill == DepthFill::Random {
                random_fill(model, &mut st, depth);
            } else {
                let l = model.prefill(
                    &random_ids(depth, vocab, 7 + depth as u64),
                    &mut st,
                    LogitsMode::Last,
                    &mut Probe::off(),
                )?;
                next = argmax(&l);
            }
        }
        // One untimed step (first-touch of buffers), then the timed steps.
        let mut logits = vec![0f32; vocab];
        model.decode_into(next, &mut st, &mut Probe::off(), &mut logits)?;
        next = argmax(&logits);
        // Runs are consecutive blocks of `n` steps on the same sequence.
        let n = a.gen_tokens.max(1);
        let mut times = Vec::new();
        for _ in 0..a.repeat {
            let start = Instant::now();
            for _ in 0..n {
                model.decode_into(next, &mut st, &mut Probe::off(), &mut logits)?;
                next = argmax(&logits);
            }
            times.push(start.elapsed().as_secs_f64());
        }
        let runs = Runs::new(times.iter().map(|s| n as f64 / s).collect());
        let tps = runs.median();
        let ctx = depth + n * a.repeat as usize / 2;
        let c = model.token_cost(ctx);
        let bytes = (c.weight_bytes + c.state_bytes + c.cache_bytes) as f64;
        let attn_flops = (c.attn_flops_per_key * ctx as u64) as f64;
        let flops = c.matmul_flops as f64 + attn_flops;
        let gbps = bytes * tps / 1e9;
        decode_rows.push(DecodeRow {
            depth,
            runs,
            tps,
            gbps,
            gflops: flops * tps / 1e9,
            bytes,
            flops,
            attn_flops,
            bf16_cache: opts.cache_dtype == CacheDtype::Bf16,
        });
    }
    Ok((prefill_rows, decode_rows))
}

/// One thread count's runs for `--scaling`: its roofline (the higher of two measurements, as
/// for the main runs), and per prompt length and depth its tokens/s with the fraction of that
/// roofline (prefill: of the FMA peak; decode: of the decode roofline; none without one).
struct Scaled {
    threads: usize,
    roofline: Option<Roofline>,
    prefill: Vec<(usize, f64, Option<f64>)>,
    decode: Vec<(usize, f64, Option<f64>)>,
}

/// The `--scaling` thread counts, ascending, each measured in a pool of its own (the main
/// runs' count reuses their figures); empty without the flag.
fn measure_scaling(
    a: &Args,
    model: &KimiLinear,
    threads: usize,
    roofline: Option<Roofline>,
    prefill_rows: &[PrefillRow],
    decode_rows: &[DecodeRow],
) -> Result<Vec<Scaled>> {
    let mut counts = a.scaling.clone();
    counts.sort_unstable();
    counts.dedup();
    let tps = |p: &[PrefillRow], d: &[DecodeRow], roof: Option<Roofline>| {
        (
            p.iter()
                .map(|r| (r.t, r.tps, roof.map(|f| r.of_peak(f).0)))
                .collect::<Vec<_>>(),
            d.iter()
                .map(|r| (r.depth, r.tps, roof.map(|f| r.against(f).1)))
                .collect::<Vec<_>>(),
        )
    };
    let mut out = Vec::new();
    for c in counts {
        if c == threads {
            let (prefill, decode) = tps(prefill_rows, decode_rows, roofline);
            out.push(Scaled {
                threads: c,
                roofline,
                prefill,
                decode,
            });
            continue;
        }
        if !a.json {
            eprintln!("measuring on {}…", count(c));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(c)
            .stack_size(crate::WORKER_STACK_BYTES)
            .build()
            .with_context(|| format!("--scaling {c}: cannot start {c} threads"))?;
        // Inside the pool, as the main runs are inside the global one: every parallel region
        // starts from one of its workers.
        let scaled = pool.install(|| -> Result<Scaled> {
            let measure = || (!a.no_roofline).then(|| Roofline::measure(c));
            let before = measure();
            let (p, d) = measure_runs(a, model)?;
            let after = measure();
            let roofline = before.zip(after).map(|(b, a)| b.max(&a));
            let (prefill, decode) = tps(&p, &d, roofline);
            Ok(Scaled {
                threads: c,
                roofline,
                prefill,
                decode,
            })
        })?;
        out.push(scaled);
    }
    Ok(out)
}

/// "1 thread", "2 threads".
fn count(threads: usize) -> String {
    format!("{threads} thread{}", if threads == 1 { "" } else { "s" })
}

/// `value / base` where both are measured (the speed-up of a scaling row over the first).
fn speedup(value: f64, base: Option<f64>) -> Option<f64> {
    base.filter(|b| *b > 0.0).map(|b| value / b)
}

/// Print the results (text, or one JSON object with `--json`).
#[allow(clippy::too_many_arguments)]
fn report(
    a: &Args,
    model: &KimiLinear,
    threads: usize,
    measured: Option<(Roofline, Roofline)>,
    roofline: Option<Roofline>,
    prefill_rows: &[PrefillRow],
    decode_rows: &[DecodeRow],
    (rss, huge): (u64, Option<(u64, u64)>),
    scaling: &[Scaled],
) -> Result<()> {
    let opts = model.options();
    // What the planner predicts for the largest sequence this run held.
    let max_ctx = a.prompt_tokens.iter().copied().max().unwrap_or(0).max(
        a.depth
            .iter()
            .map(|d| d + a.gen_tokens.max(1) * a.repeat as usize + 1)
            .max()
            .unwrap_or(0),
    );
    let req = crate::memory::plan_request(model, max_ctx, false);
    let planned =
        kl_model::plan::plan(model.config(), model.resident_weight_bytes(), req).total_bytes;
    if a.json {
        let v = json!({
            "model": a.model.display().to_string(),
            "threads": threads,
            "cpu": kl_kernels::cpu::describe(),
            "amx": kl_kernels::amx::enabled(),
            "bf16_activations": kl_kernels::bf16_activations::enabled(),
            "cache_dtype": opts.cache_dtype.name(),
            "prefill_chunk": model.options().prefill_chunk,
            "fma_gflops": roofline.map(|r| r.fma.gflops),
            "fma_isa": roofline.map(|r| r.fma.isa.name()),
            "stream_gbps": roofline.map(|r| r.stream_gbps),
            "bf16_dot_gflops": roofline.and_then(|r| r.bf16_dot_gflops),
            "roofline_measured": measured.map(|(b, a)| json!({
                "fma_gflops": [b.fma.gflops, a.fma.gflops],
                "stream_gbps": [b.stream_gbps, a.stream_gbps],
                "bf16_dot_gflops": [b.bf16_dot_gflops, a.bf16_dot_gflops],
            })),
            "repeat": a.repeat,
            "prefill_tokens_per_s": keyed(prefill_rows, |r| r.t, |r| json!(r.tps)),
            "decode_tokens_per_s": keyed(decode_rows, |r| r.depth, |r| json!(r.tps)),
            "prefill_tokens_per_s_runs": keyed(prefill_rows, |r| r.t, |r| json!(r.runs.0)),
            "decode_tokens_per_s_runs": keyed(decode_rows, |r| r.depth, |r| json!(r.runs.0)),
            "prefill_fraction_of_fma_peak": keyed(prefill_rows, |r| r.t, |r| json!(roofline.map(|f| r.of_peak(f).0))),
            "prefill_matmul_fraction_of_fma_peak": keyed(prefill_rows, |r| r.t, |r| json!(roofline.and_then(|f| r.of_peak(f).1))),
            "prefill_matmul_fraction_of_products_peak": keyed(prefill_rows, |r| r.t, |r| json!(roofline.and_then(|f| r.products_of_peak(f)).map(|(p, _)| p))),
            "prefill_matmul_time_share": keyed(prefill_rows, |r| r.t, |r| json!(r.matmul_share)),
            "decode_fraction_of_bandwidth": keyed(decode_rows, |r| r.depth, |r| json!(roofline.map(|f| r.against(f).0))),
            "decode_fraction_of_roofline": keyed(decode_rows, |r| r.depth, |r| json!(roofline.map(|f| r.against(f).1))),
            "decode_bound": keyed(decode_rows, |r| r.depth, |r| json!(roofline.map(|f| r.against(f).2))),
            "decode_bytes_per_token": model.token_cost(0).weight_bytes + model.token_cost(0).state_bytes,
            "peak_rss_bytes": rss,
            "planned_bytes": planned,
            "checkpoint_bytes": model.checkpoint_bytes(),
            "file_huge_page_bytes": huge.map(|h| h.0),
            "file_resident_bytes": huge.map(|h| h.1),
            "scaling": scaling_json(scaling),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    // The opt-in product paths, named where they run.
    let switches = [
        (kl_kernels::amx::enabled(), "  amx"),
        (
            kl_kernels::bf16_activations::enabled(),
            "  bf16 activations",
        ),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect::<String>();
    println!(
        "model {}  threads {threads}  cpu {}  cache {}  prefill chunk {}{switches}",
        a.model.display(),
        kl_kernels::cpu::describe(),
        opts.cache_dtype.name(),
        model.options().prefill_chunk
    );
    if let (Some((b, a)), Some(roof)) = (measured, roofline) {
        println!(
            "roofline: FMA {:.1} GFLOP/s ({}), stream {:.1} GB/s (the higher of two \
             measurements, before and after the runs: FMA {:.1} and {:.1}, stream {:.1} and {:.1})",
            roof.fma.gflops,
            roof.fma.isa.name(),
            roof.stream_gbps,
            b.fma.gflops,
            a.fma.gflops,
            b.stream_gbps,
            a.stream_gbps
        );
        if let Some(g) = roof.bf16_dot_gflops {
            println!(
                "          bf16 dot products (vdpbf16ps: attention over a bf16 cache, and the \
                 matrix products with --bf16-activations) {g:.1} GFLOP/s"
            );
        }
    }
    for r in prefill_rows {
        let of = if let Some(roof) = roofline {
            let (all, _) = r.of_peak(roof);
            let products = match r.products_of_peak(roof) {
                Some((p, peak)) => format!(
                    "matrix products {:.1}% of {peak} ({:.0}% of the time)",
                    p * 100.0,
                    r.matmul_share * 100.0
                ),
                None => format!(
                    "no compute-bound matrix products (at most {} tokens take the matrix-vector path)",
                    kl_kernels::matmul::GEMV_MAX_ROWS
                ),
            };
            format!("  {:>5.1}% of FMA peak; {products}", all * 100.0)
        } else {
            String::new()
        };
        println!(
            "prefill {:>7} tokens: {:>9.1} tok/s  {:>7.1} GFLOP/s{of}{}",
            r.t,
            r.tps,
            r.gflops,
            r.runs.spread(1)
        );
    }
    for r in decode_rows {
        let of = if let Some(roof) = roofline {
            let (bandwidth, of_roofline, bound) = r.against(roof);
            format!(
                "  {:>5.1}% of bandwidth, {:>5.1}% of roofline ({bound}-bound)",
                bandwidth * 100.0,
                of_roofline * 100.0,
            )
        } else {
            String::new()
        };
        println!(
            "decode at depth {:>7}: {:>9.2} tok/s  {:>7.2} GB/s  {:>6.1} GFLOP/s{of}{}",
            r.depth,
            r.tps,
            r.gbps,
            r.gflops,
            r.runs.spread(2)
        );
    }
    println!(
        "peak RSS {}  (planner: {} for {max_ctx} tokens)",
        human(rss),
        human(planned)
    );
    if let Some((h, file)) = huge {
        println!(
            "weights in 2 MiB pages: {} of {} resident file pages ({:.0}%){}",
            human(h),
            human(file),
            100.0 * h as f64 / file.max(1) as f64,
            if h < file / 2 {
                "; decode reads faster through them (docs/performance.md, \"Weights in 2 MiB pages\")"
            } else {
                ""
            }
        );
    }
    print_scaling(scaling);
    Ok(())
}

/// `--scaling` for `--json`: one object per thread count, ascending, with its roofline, its
/// tokens/s keyed by prompt length and depth, and the speed-ups over the first count.
fn scaling_json(scaling: &[Scaled]) -> serde_json::Value {
    let (fp, fd) = scaling
        .first()
        .map_or((&[][..], &[][..]), |f| (&f.prefill[..], &f.decode[..]));
    type Row = (usize, f64, Option<f64>);
    let base = |rows: &[Row], key: usize| rows.iter().find(|r| r.0 == key).map(|r| r.1);
    let obj = |v: &[Row], f: &dyn Fn(&Row) -> serde_json::Value| {
        v.iter()
            .map(|r| (r.0.to_string(), f(r)))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::Value::Array(
        scaling
            .iter()
            .map(|s| {
                json!({
                    "threads": s.threads,
                    "fma_gflops": s.roofline.map(|r| r.fma.gflops),
                    "stream_gbps": s.roofline.map(|r| r.stream_gbps),
                    "prefill_tokens_per_s": obj(&s.prefill, &|r| json!(r.1)),
                    "decode_tokens_per_s": obj(&s.decode, &|r| json!(r.1)),
                    "prefill_speedup": obj(&s.prefill, &|r| json!(speedup(r.1, base(fp, r.0)))),
                    "decode_speedup": obj(&s.decode, &|r| json!(speedup(r.1, base(fd, r.0)))),
                    "prefill_fraction_of_fma_peak": obj(&s.prefill, &|r| json!(r.2)),
                    "decode_fraction_of_roofline": obj(&s.decode, &|r| json!(r.2)),
                })
            })
            .collect(),
    )
}

/// `--scaling` as a table: a row per thread count (its roofline, then tokens/s per prompt
/// length and depth, each with its speed-up over the first row).
fn print_scaling(scaling: &[Scaled]) {
    let Some(first) = scaling.first() else {
        return;
    };
    let mut head = format!(
        "{:>7}  {:>12}  {:>11}",
        "threads", "FMA GFLOP/s", "stream GB/s"
    );
    for &(t, ..) in &first.prefill {
        head += &format!("  {:>23}", format!("prefill {t}"));
    }
    for &(d, ..) in &first.decode {
        head += &format!("  {:>23}", format!("decode @{d}"));
    }
    println!(
        "scaling (tok/s, × over {}, and % of the roofline: prefill of the FMA peak, decode of \
         its roofline):",
        count(first.threads)
    );
    println!("{head}");
    let cell = |&(_, x, of): &(usize, f64, Option<f64>), base: f64, digits: usize| {
        let of = of.map_or_else(String::new, |f| format!("{:.0}%", f * 100.0));
        let up = speedup(x, Some(base)).map_or_else(String::new, |r| format!("×{r:.2}"));
        format!("  {x:>10.digits$} {up:<6} {of:>5}")
    };
    for s in scaling {
        let roof = |f: fn(&Roofline) -> f64| {
            s.roofline
                .map_or_else(|| "–".to_string(), |r| format!("{:.1}", f(&r)))
        };
        let mut line = format!(
            "{:>7}  {:>12}  {:>11}",
            s.threads,
            roof(|r| r.fma.gflops),
            roof(|r| r.stream_gbps)
        );
        for (r, b) in s.prefill.iter().zip(&first.prefill) {
            line += &cell(r, b.1, 1);
        }
        for (r, b) in s.decode.iter().zip(&first.decode) {
            line += &cell(r, b.1, 2);
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kl_kernels::roofline::FmaPeak;

    fn roof(gflops: f64, stream_gbps: f64) -> Roofline {
        Roofline {
            fma: FmaPeak {
                gflops,
                isa: kl_kernels::cpu::Isa::Portable,
            },
            stream_gbps,
            bf16_dot_gflops: None,
        }
    }

    /// A token of 1 GB and 10 GFLOP at 5 tok/s: against 20 GB/s and 400 GFLOP/s its bytes take
    /// 50 ms and its FLOPs 25 ms (memory-bound, 25% of the bandwidth and of the roofline);
    /// against 100 GFLOP/s the FLOPs take 100 ms (compute-bound, 50% of the roofline).
    #[test]
    fn decode_fractions_take_the_slower_bound() {
        let row = DecodeRow {
            depth: 0,
            runs: Runs::new(vec![5.0]),
            tps: 5.0,
            gbps: 5.0,
            gflops: 50.0,
            bytes: 1e9,
            flops: 10e9,
            attn_flops: 8e9,
            bf16_cache: true,
        };
        let (bw, of_roof, bound) = row.against(roof(400.0, 20.0));
        assert!((bw - 0.25).abs() < 1e-12 && (of_roof - 0.25).abs() < 1e-12);
        assert_eq!(bound, "memory");
        let (bw, of_roof, bound) = row.against(roof(100.0, 20.0));
        assert!((bw - 0.25).abs() < 1e-12 && (of_roof - 0.5).abs() < 1e-12);
        assert_eq!(bound, "compute");
        // The attention's 8 GFLOP at a bf16 dot-product peak of 400 GFLOP/s: 20 + 20 ms, under
        // the bytes' 50 ms again.
        let with_bf16 = Roofline {
            bf16_dot_gflops: Some(400.0),
            ..roof(100.0, 20.0)
        };
        let (_, of_roof, bound) = row.against(with_bf16);
        assert!((of_roof - 0.25).abs() < 1e-12 && bound == "memory");
        // An f32 cache keeps the FMA peak for its attention.
        let f32_row = DecodeRow {
            bf16_cache: false,
            runs: Runs::new(vec![5.0]),
            ..row
        };
        assert_eq!(f32_row.against(with_bf16).2, "compute");
    }
}
