//! Memory flags shared by the commands that run a model: cache dtype, prefill chunk, memory
//! budget, max context, progress. Sizes accept `16GiB`, `800MB`, `1.5G`; contexts `1M`, `128K`.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kl_model::plan::{self, Footprint, PlanRequest};
use kl_model::{CacheDtype, KimiLinear, SequenceState};
use std::io::IsTerminal;
use std::num::NonZeroUsize;

/// Memory flags of `run` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Latent cache dtype.
    #[arg(long, value_enum, default_value_t = CacheDtypeArg::Bf16)]
    pub cache_dtype: CacheDtypeArg,
    /// Tokens per prefill chunk (activation memory depends on it, not on the prompt) [default:
    /// 2048 for a model with MLA layers, as every Kimi Linear model; else 512, or for many
    /// experts enough that each sees about 64 rows a chunk]
    #[arg(long)]
    pub prefill_chunk: Option<NonZeroUsize>,
    #[command(flatten)]
    pub mla: MlaPrefillArgs,
    /// Refuse before any work, or stop cleanly during the run, beyond this much memory: 16GiB, 800MB.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Reserve the latent cache for this many tokens up front and never exceed it: 1M, 128K.
    #[arg(long)]
    pub max_context: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl MemoryArgs {
    /// Model options from the flags.
    pub fn options(&self) -> Result<kl_model::ModelOptions> {
        Ok(kl_model::ModelOptions {
            cache_dtype: self.cache_dtype.into(),
            prefill_chunk: self.prefill_chunk.map_or(0, NonZeroUsize::get),
            mla_prefill: self.mla.mla_prefill.into(),
            ..Default::default()
        })
    }

    /// Check the budget for `prompt` tokens plus up to `generate` more (generation may stop
    /// early at `--max-context`, the prompt may not) and set the session's limit and reservation.
    pub fn apply(
        &self,
        session: &mut kl_engine::Session,
        prompt: usize,
        generate: usize,
    ) -> Result<Footprint> {
        let budget = self.memory_budget.as_deref().map(parse_size).transpose()?;
        let max_context = self.max_context.as_deref().map(parse_tokens).transpose()?;
        let context = match max_context {
            Some(m) if prompt > m => {
                bail!("the prompt is {prompt} tokens but --max-context is {m}")
            }
            Some(m) => (prompt + generate).min(m),
            None => prompt + generate,
        };
        if let (None, Some(b)) = (self.prefill_chunk, budget) {
            fit_prefill_chunk(session, context, b);
        }
        let mut probe = session.model().new_state();
        let f = apply_budget(
            session.model(),
            &mut probe,
            context,
            budget,
            max_context,
            false,
        )?;
        if let Some(limit) = probe.limit() {
            if limit < session.max_context() {
                let reason = match (budget, max_context) {
                    (Some(b), Some(m)) if m <= limit => {
                        format!("--max-context {m} (memory budget {})", human(b))
                    }
                    (Some(b), _) => format!("memory budget {}", human(b)),
                    (None, _) => format!("--max-context {limit}"),
                };
                session.set_max_context(limit, reason);
            }
        }
        if let Some(m) = max_context {
            session.reserve(m);
        }
        Ok(f)
    }
}

/// With the automatic prefill chunk and a memory budget: when the larger chunk chosen for a
/// model's MLA layers or many experts (`kl_model::auto_prefill_chunk`) keeps `context` tokens from fitting
/// `budget`, take the largest of its halvings, down to the default 512, that fits, and say so on
/// stderr. Nothing changes when the chunk already fits or when none does (the budget check then
/// reports it).
fn fit_prefill_chunk(session: &mut kl_engine::Session, context: usize, budget: u64) {
    let model = session.model();
    let req = plan_request(model, context, false);
    let fits = |chunk: usize| {
        let r = PlanRequest {
            prefill_chunk: chunk,
            ..req
        };
        fits_budget(model, r, budget)
    };
    let chosen = req.prefill_chunk;
    if chosen <= kl_model::DEFAULT_PREFILL_CHUNK || fits(chosen) {
        return;
    }
    let smaller = std::iter::successors(Some(chosen / 2), |c| Some(c / 2))
        .take_while(|&c| c >= kl_model::DEFAULT_PREFILL_CHUNK)
        .find(|&c| fits(c));
    if let Some(c) = smaller {
        if session.set_prefill_chunk(c) {
            eprintln!(
                "note: prefill chunks of {c} tokens: the memory budget {} leaves no room for the \
                 {chosen} chosen for this model",
                human(budget)
            );
        }
    }
}

/// The plan request of `context` tokens for `model` as its options stand (its cache dtype and
/// prefill chunk) on this pool's threads.
pub fn plan_request(model: &KimiLinear, context: usize, all_logits: bool) -> PlanRequest {
    let opts = model.options();
    PlanRequest {
        context,
        cache_dtype: opts.cache_dtype,
        prefill_chunk: opts.prefill_chunk,
        all_logits,
        threads: rayon::current_num_threads(),
    }
}

/// Whether `req.context` tokens fit `budget`: their footprint, and with a whole prefill chunk's
/// workspace (what the budget check sets the token limit from).
fn fits_budget(model: &KimiLinear, req: PlanRequest, budget: u64) -> bool {
    let (cfg, weights) = (model.config(), model.resident_weight_bytes());
    plan::plan(cfg, weights, req).total_bytes <= budget
        && plan::max_context(cfg, weights, req, budget).is_some_and(|n| n >= req.context)
}

/// Parse a byte size: a number with an optional unit (B, KB, MB, GB, TB decimal; KiB, MiB, GiB,
/// TiB binary; K/M/G/T alone are binary).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("invalid size `{s}`: expected e.g. 16GiB, 800MB, 1048576"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        u => bail!("invalid size `{s}`: unknown unit `{u}` (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    if !(n.is_finite() && n >= 0.0) {
        bail!("invalid size `{s}`: must be a non-negative number");
    }
    Ok((n * mult) as u64)
}

/// Parse a token count: `1048576`, `128K` (×1024), `1M` (×1024²).
pub fn parse_tokens(s: &str) -> Result<usize> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k') | Some('K') => (&t[..t.len() - 1], 1024usize),
        Some('m') | Some('M') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .with_context(|| format!("invalid token count `{s}`: expected e.g. 1M, 128K, 4096"))?;
    n.checked_mul(mult)
        .with_context(|| format!("token count `{s}` is too large"))
}

/// The values of `--cache-dtype` ([`CacheDtype`]).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDtypeArg {
    /// Two bytes a value (7.9 GiB at 1M tokens for the released model); attention over it runs
    /// bf16 products (query and probabilities rounded to bf16, twice as fast on AVX512-BF16).
    Bf16,
    /// Four bytes a value: exact parity with an f32 reference.
    F32,
    /// One byte a value (e4m3) and two f32 scales a row.
    #[value(alias = "fp8-e4m3")]
    Fp8,
}

impl From<CacheDtypeArg> for CacheDtype {
    fn from(a: CacheDtypeArg) -> Self {
        match a {
            CacheDtypeArg::Bf16 => CacheDtype::Bf16,
            CacheDtypeArg::F32 => CacheDtype::F32,
            CacheDtypeArg::Fp8 => CacheDtype::Fp8,
        }
    }
}

/// `--mla-prefill`, one flag for every command that prefills (`bench`, `forward`, `run`, `chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct MlaPrefillArgs {
    /// How MLA layers attend during prefill: `auto` takes, per chunk, the form with fewer FLOPs
    /// (expanded where it saves a third); `absorbed` scores every head against the latent cache
    /// rows; `expanded` rebuilds per-head keys and values from them. Decode is always absorbed.
    #[arg(long, value_enum, default_value_t = MlaPrefillArg::Auto)]
    pub mla_prefill: MlaPrefillArg,
}

/// The values of `--mla-prefill` ([`kl_model::MlaPrefill`]).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlaPrefillArg {
    /// Per chunk, by FLOPs.
    Auto,
    /// Weight absorption.
    Absorbed,
    /// Per-head keys and values from `kv_b_proj`.
    Expanded,
}

impl From<MlaPrefillArg> for kl_model::MlaPrefill {
    fn from(a: MlaPrefillArg) -> Self {
        match a {
            MlaPrefillArg::Auto => kl_model::MlaPrefill::Auto,
            MlaPrefillArg::Absorbed => kl_model::MlaPrefill::Absorbed,
            MlaPrefillArg::Expanded => kl_model::MlaPrefill::Expanded,
        }
    }
}

/// Human-readable bytes (binary units).
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// The parts of a footprint as table rows.
pub fn footprint_rows(f: &Footprint) -> Vec<(&'static str, u64)> {
    vec![
        ("weights", f.weights_bytes),
        ("MLA latent cache", f.mla_cache_bytes),
        ("KDA recurrent state", f.kda_state_bytes),
        ("conv state", f.conv_state_bytes),
        ("KDA chunk carry", f.kda_carry_bytes),
        ("workspace", f.workspace_bytes),
        ("total", f.total_bytes),
    ]
}

/// Check a planned run against an optional budget, then set the state's token limit: the
/// largest context that fits the budget, and `max_context` if given.
pub fn apply_budget(
    model: &KimiLinear,
    state: &mut SequenceState,
    context: usize,
    budget: Option<u64>,
    max_context: Option<usize>,
    all_logits: bool,
) -> Result<Footprint> {
    let req = plan_request(model, context, all_logits);
    let weights = model.resident_weight_bytes();
    let f = plan::plan(model.config(), weights, req);
    if let Some(mc) = max_context {
        if context > mc {
            bail!("the request needs {context} tokens but --max-context is {mc}");
        }
        state.set_limit(mc, format!("--max-context {mc}"));
        state.reserve(mc);
    }
    if let Some(b) = budget {
        let fits = plan::max_context(model.config(), weights, req, b);
        if f.total_bytes > b {
            let mut msg = format!(
                "a context of {context} tokens needs {} but the memory budget is {}:\n",
                human(f.total_bytes),
                human(b)
            );
            for (name, v) in footprint_rows(&f) {
                msg.push_str(&format!("  {name:<20} {:>12}\n", human(v)));
            }
            match fits {
                Some(n) => msg.push_str(&format!("the largest context that fits is {n} tokens")),
                None => msg.push_str("not even an empty context fits: the weights and workspace alone exceed the budget"),
            }
            if req.prefill_chunk > kl_model::DEFAULT_PREFILL_CHUNK {
                // The larger automatic chunk plans a larger workspace; say so when the
                // default chunk would fit.
                let small = PlanRequest {
                    prefill_chunk: kl_model::DEFAULT_PREFILL_CHUNK,
                    ..req
                };
                if fits_budget(model, small, b) {
                    msg.push_str(&format!(
                        "\n(the workspace is planned for prefill chunks of {} tokens; with \
                         --prefill-chunk {} it would fit)",
                        req.prefill_chunk,
                        kl_model::DEFAULT_PREFILL_CHUNK
                    ));
                }
            }
            bail!(msg);
        }
        let limit = fits.unwrap_or(context).max(context);
        let limit = max_context.map_or(limit, |m| m.min(limit));
        state.set_limit(limit, format!("memory budget {}", human(b)));
    }
    Ok(f)
}

/// A prefill progress bar on stderr, shown only when both stdout and stderr are terminals and
/// without `--quiet` (output piped to a file gets nothing extra).
pub fn progress_bar(total: usize, quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() || total < 2 {
        return None;
    }
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens  {tps}  ETA {eta}")
            .expect("valid template")
            .with_key(
                "tps",
                |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} tokens/s", st.per_sec());
                },
            ),
    );
    Some(pb)
}

/// Peak resident set size of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

/// This process's resident file-backed memory mapped by 2 MiB entries and all of it (Linux
/// `FilePmdMapped`, and `Rss` less `Anonymous`), if known: in `bench`, how much of the weights
/// decode reads through huge pages (the binary's own pages count in the second figure too).
/// Both count pages whole, shared with another process or not, so the share stays a share
/// when two processes map the same checkpoint (`Pss_File` would halve the second figure).
pub fn file_huge_mapped_bytes() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let file = kib_field(&s, "Rss:")?.saturating_sub(kib_field(&s, "Anonymous:")?);
    Some((kib_field(&s, "FilePmdMapped:")?, file))
}

/// The value in bytes of a `/proc` line `key  <n> kB`.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_in_kib() {
        let smaps = "Rss:              588996 kB\nFilePmdMapped:    569344 kB\nShared_Hugetlb:        0 kB\n";
        assert_eq!(kib_field(smaps, "FilePmdMapped:"), Some(569344 * 1024));
        assert_eq!(kib_field(smaps, "Rss:"), Some(588996 * 1024));
        assert_eq!(kib_field(smaps, "AnonHugePages:"), None);
        assert_eq!(kib_field("VmHWM:\tnot a number kB\n", "VmHWM:"), None);
        // The process's own figures, where there is a /proc.
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
            let (huge, file) = file_huge_mapped_bytes().expect("smaps_rollup");
            assert!(huge <= file && file > 0);
        }
    }

    #[test]
    fn sizes_and_tokens() {
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("800MB").unwrap(), 800_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_tokens("1M").unwrap(), 1_048_576);
        assert_eq!(parse_tokens("128K").unwrap(), 131_072);
        assert_eq!(parse_tokens("4096").unwrap(), 4096);
        assert!(parse_tokens("lots").is_err());
    }
}
