//! # kimi-linear — command-line front end
//!
//! The binary is glue: it parses flags (clap), resolves files, calls the engine crates, and turns
//! every error into one clear message and a non-zero exit code. No numerics live here.
//!
//! Subcommands:
//! - `forward`: logits for every prompt position (and an optional greedy continuation) written to
//!   a safetensors file with the golden file's tensor names.
//! - `synth`: a random-weight checkpoint in the real layout (config, shards, tokenizer).

mod cmd;
mod ids;
mod output;

use clap::{Parser, Subcommand};

/// Kimi Linear inference engine.
#[derive(Parser)]
#[command(name = "kimi-linear", version, about, long_about = None)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the model on token ids and write logits (and a greedy continuation) to safetensors.
    Forward(cmd::forward::Args),
    /// Write a random-weight checkpoint in the real Kimi Linear layout.
    Synth(cmd::synth::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(2);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("thread pool is built once");
    }
    let result = match cli.command {
        Command::Forward(a) => cmd::forward::run(a),
        Command::Synth(a) => cmd::synth::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
