//! `kimi-linear chat`: an interactive conversation on stdin/stdout.

use crate::cmd::run::{emit, open_session, SamplingArgs};
use crate::memory::human;
use anyhow::{Context, Result};
use kl_engine::Chat;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

/// Flags of `chat`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory, or a Hugging Face repo id in the local cache.
    #[arg(long)]
    model: String,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    memory: crate::memory::MemoryArgs,
}

const HELP: &str =
    "commands: /reset (forget the conversation), /save FILE, /load FILE, /quit; Ctrl-D quits";

/// A line of input: a command or a user message.
enum Input<'a> {
    Reset,
    Save(&'a str),
    Load(&'a str),
    Quit,
    Help,
    Usage(&'a str),
    Say(&'a str),
}

fn parse(line: &str) -> Input<'_> {
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    match word {
        "/reset" if rest.is_empty() => Input::Reset,
        "/save" if !rest.is_empty() => Input::Save(rest),
        "/load" if !rest.is_empty() => Input::Load(rest),
        "/quit" | "/exit" if rest.is_empty() => Input::Quit,
        "/help" if rest.is_empty() => Input::Help,
        "/save" | "/load" => Input::Usage(word),
        _ => Input::Say(line),
    }
}

/// Run `chat`. Each stdin line is one user turn; errors in a turn are reported and the
/// conversation goes on, and the exit status is 1 if any turn or command failed.
pub fn run(a: Args) -> Result<()> {
    let (mut sampler, stop, seed) = a.sampling.build()?;
    let mut session = open_session(&a.model, "chat", a.memory.options()?)?;
    // A chat grows turn by turn: the budget is checked for its first reply up front, and the
    // session stops cleanly (a clear error, the chat goes on) when a later turn would pass it.
    a.memory.apply(&mut session, 0, a.sampling.n_predict)?;
    a.sampling.limit(&mut session)?;
    let mut chat = Chat::new(session, a.system.clone()).context("cannot start the chat")?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {} (seed {seed}); {HELP}", a.model);
    }
    let mut failures = 0usize;
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin.read_line(&mut line).context("cannot read stdin")? == 0 {
            if interactive {
                eprintln!();
            }
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let outcome: Result<()> = match parse(text) {
            Input::Quit => break,
            Input::Help => {
                eprintln!("{HELP}");
                Ok(())
            }
            Input::Usage(cmd) => Err(anyhow::anyhow!("usage: {cmd} FILE")),
            Input::Reset => {
                chat.reset();
                eprintln!("[conversation reset]");
                Ok(())
            }
            Input::Save(f) => chat
                .save(Path::new(f))
                .map(|_| {
                    eprintln!(
                        "[saved {} tokens, {} messages to {f}]",
                        chat.session().context_used(),
                        chat.messages().len()
                    )
                })
                .with_context(|| format!("cannot save to {f}")),
            Input::Load(f) => chat
                .load(Path::new(f))
                .map(|_| {
                    eprintln!(
                        "[loaded {} tokens, {} messages from {f}]",
                        chat.session().context_used(),
                        chat.messages().len()
                    )
                })
                .with_context(|| format!("cannot load {f}")),
            Input::Say(msg) => {
                let n = a.sampling.n_predict;
                match chat.send(msg, &mut sampler, n, &stop, emit) {
                    Ok(turn) => {
                        emit("\n");
                        if turn.sync.reprefilled {
                            eprintln!(
                                "[the state did not match the rendered conversation: this turn re-prefilled all {} tokens]",
                                turn.sync.fed_tokens
                            );
                        }
                        let s = &turn.stats;
                        eprintln!(
                            "[prompt {} tokens, {:.2} tok/s | reply {} tokens, {:.2} tok/s | context {} tokens | stop: {} | state {}]",
                            s.prompt_tokens,
                            s.prompt_tokens_per_second(),
                            s.generated_tokens,
                            s.gen_tokens_per_second(),
                            s.context_used,
                            s.stop_reason,
                            human(chat.session().state_bytes() as u64)
                        );
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                }
            }
        };
        if let Err(e) = outcome {
            failures += 1;
            eprintln!("error: {e:#}");
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} chat command(s) failed");
    }
    Ok(())
}
