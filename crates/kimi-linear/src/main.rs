//! # kimi-linear — command-line front end
//!
//! The binary is glue: it parses flags (clap), resolves files, calls the engine crates, and turns
//! every error into one clear message and a non-zero exit code. No numerics live here.
//!
//! Subcommands:
//! - `forward`: logits for every prompt position (and an optional greedy continuation) written to
//!   a safetensors file with the golden file's tensor names.
//! - `synth`: a random-weight checkpoint in the real layout (config, shards, tokenizer).
//! - `run`, `chat`: text generation and interactive chat through `kl-engine`.
//! - `tokenize`, `detokenize`, `chat-template`: the tokenizer and chat template on their own.

mod cmd;
mod ids;
mod memory;
mod output;

use clap::{Parser, Subcommand};

/// Kimi Linear inference engine.
#[derive(Parser)]
#[command(name = "kimi-linear", version, about, long_about = None)]
struct Cli {
    /// Worker threads (default: the physical cores this process may run on; hyper-threads are
    /// not counted).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Run prefill matrix products (bf16 weights) and latent attention over a bf16 cache on
    /// Intel AMX tiles (Sapphire Rapids or later, Linux): faster prefill and long-context
    /// decode, results within f32 rounding of the default but no longer bit-identical between a
    /// prompt prefilled whole and in pieces. Also `KL_AMX=1`.
    #[arg(long, global = true)]
    amx: bool,
    /// Round the activations of prefill matrix products (bf16 weights) to bf16, on CPUs with
    /// AVX512-BF16 (AMD Zen 4 or later, Intel Sapphire Rapids or later): prefill 1.5-1.8 times
    /// as fast, and the logits move (a median 0.09 a position on the golden model, whose
    /// default matches an f32 reference to 1e-4; docs/memory.md); a prompt prefilled in pieces
    /// is no longer bit-identical to one prefill. Decode is unchanged. Also
    /// `KL_BF16_ACTIVATIONS=1`.
    #[arg(long, global = true)]
    bf16_activations: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the model on token ids and write logits (and a greedy continuation) to safetensors.
    Forward(cmd::forward::Args),
    /// Write a random-weight checkpoint in the real Kimi Linear layout.
    Synth(cmd::synth::Args),
    /// Plan the memory of a context: weights, latent cache, KDA state, workspace.
    Plan(cmd::plan::Args),
    /// Measure prefill and decode speed against the machine's roofline.
    Bench(cmd::bench::Args),
    /// No-download demo: a synthetic model, a long context, memory measured vs planned.
    Demo(cmd::demo::Args),
    /// Generate text from a prompt, streamed to stdout; one stats line on stderr.
    Run(cmd::run::Args),
    /// Interactive chat on stdin (/reset, /save FILE, /load FILE; Ctrl-D quits).
    Chat(cmd::chat::Args),
    /// Encode text to token ids (a JSON array).
    Tokenize(cmd::tokenize::TokenizeArgs),
    /// Decode a JSON array of token ids to text.
    Detokenize(cmd::tokenize::DetokenizeArgs),
    /// Render messages with the chat template.
    ChatTemplate(cmd::tokenize::ChatTemplateArgs),
}

/// Stack of every thread-pool worker: the global pool's, and `bench --scaling`'s pools, which
/// must run the same code as it.
pub(crate) const WORKER_STACK_BYTES: usize = 16 << 20;

fn main() {
    tune_allocator();
    restore_sigpipe();
    let cli = Cli::parse();
    let threads = match cli.threads {
        Some(0) => {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(2);
        }
        Some(n) => n,
        None => physical_cores(),
    };
    if cli.amx && !kl_kernels::amx::set_enabled(true) {
        eprintln!(
            "error: --amx: this CPU or OS has no AMX-BF16 tiles (Intel Sapphire Rapids or later, \
             on Linux)"
        );
        std::process::exit(2);
    }
    if cli.bf16_activations && !kl_kernels::bf16_activations::set_enabled(true) {
        eprintln!(
            "error: --bf16-activations: this CPU has no AVX512-BF16 (AMD Zen 4 or later, Intel \
             Sapphire Rapids or later); without it bf16 products are no faster than the default"
        );
        std::process::exit(2);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(WORKER_STACK_BYTES)
        .build_global()
        .expect("thread pool is built once");
    // The command runs on a pool worker, so every parallel region of prefill and decode starts
    // from a worker (the calling thread works too, and no job is injected from outside the pool,
    // which would cost a wake-up and, now and then, an allocation per region).
    let result = rayon::scope(|_| run(cli.command));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Dispatch one command.
fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Forward(a) => cmd::forward::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Tokenize(a) => cmd::tokenize::run_tokenize(a),
        Command::Detokenize(a) => cmd::tokenize::run_detokenize(a),
        Command::ChatTemplate(a) => cmd::tokenize::run_chat_template(a),
    }
}

/// Physical cores this process may run on: distinct (physical id, core id) pairs in
/// /proc/cpuinfo among the CPUs of its affinity mask (`taskset`, a container's cpuset), at most
/// the available parallelism (which also counts CPU quotas); else the available parallelism.
/// Hyper-threads share FMA units and bandwidth, so they are not counted.
fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let allowed = affinity();
    match cores_in(&info, |cpu| {
        allowed.as_ref().is_none_or(|a| a.contains(&cpu))
    }) {
        0 => logical,
        n => n.min(logical),
    }
}

/// Distinct (physical id, core id) pairs among the processors of a /proc/cpuinfo text that
/// `allowed` accepts (0 when the text names none, as on machines that omit the ids).
fn cores_in(info: &str, allowed: impl Fn(usize) -> bool) -> usize {
    let mut cores = std::collections::BTreeSet::new();
    let (mut cpu, mut phys, mut core) = (None, None, None);
    for line in info.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                // A block without a processor number is counted (older formats).
                if cpu.is_none_or(&allowed) {
                    cores.insert((p, c));
                }
            }
            cpu = None;
            continue;
        }
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("processor"), Some(v)) => cpu = v.parse::<usize>().ok(),
            (Some("physical id"), Some(v)) => phys = Some(v.to_string()),
            (Some("core id"), Some(v)) => core = Some(v.to_string()),
            _ => {}
        }
    }
    cores.len()
}

/// The CPUs this process may run on (`None` where that cannot be asked).
fn affinity() -> Option<std::collections::BTreeSet<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an all-zero cpu_set_t is a valid empty set, and sched_getaffinity writes at
        // most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `set` is a live cpu_set_t of `size` bytes; pid 0 is this thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
            return None;
        }
        // SAFETY: every index is below CPU_SETSIZE, the set's capacity in bits.
        let cpus: std::collections::BTreeSet<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect();
        (!cpus.is_empty()).then_some(cpus)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Serve every allocation of 128 KiB or more (cache blocks, activation buffers) with its own
/// mapping that is returned to the OS when freed. glibc's default raises this threshold
/// dynamically, after which freed multi-megabyte buffers stay in the heap and the resident size
/// drifts above what the planner predicts.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is called once, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Die quietly on a closed pipe (`kimi-linear demo | head`) like other Unix tools, instead of
/// panicking in `println!`: Rust ignores SIGPIPE by default.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::cores_in;

    /// Two cores with two hyper-threads each (processors 0 and 2 on core 0, 1 and 3 on core 1),
    /// as Linux lists them.
    const CPUINFO: &str = "processor\t: 0\nphysical id\t: 0\ncore id\t\t: 0\n\n\
        processor\t: 1\nphysical id\t: 0\ncore id\t\t: 1\n\n\
        processor\t: 2\nphysical id\t: 0\ncore id\t\t: 0\n\n\
        processor\t: 3\nphysical id\t: 0\ncore id\t\t: 1\n";

    /// Hyper-threads are not counted, and only the CPUs of the affinity mask are.
    #[test]
    fn cores_count_physical_cores_in_the_affinity_mask() {
        assert_eq!(cores_in(CPUINFO, |_| true), 2);
        assert_eq!(cores_in(CPUINFO, |c| c == 0 || c == 2), 1, "two siblings");
        assert_eq!(cores_in(CPUINFO, |c| c <= 1), 2, "one thread of each core");
        assert_eq!(cores_in(CPUINFO, |c| c == 3), 1);
        assert_eq!(cores_in(CPUINFO, |_| false), 0);
        // No ids (some virtual machines and architectures): none counted.
        assert_eq!(cores_in("processor\t: 0\nmodel name\t: x\n", |_| true), 0);
    }
}
