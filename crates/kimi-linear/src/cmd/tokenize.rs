//! `kimi-linear tokenize`, `detokenize` and `chat-template`: the tokenizer on its own.

use anyhow::{bail, Context, Result};
use kl_tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Flags of `tokenize`.
#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Tokenizer directory (tiktoken.model, tokenizer_config.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Text to encode.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// File whose UTF-8 contents to encode.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Encode special-token strings (`<|im_end|>`, ...) as ordinary text.
    #[arg(long)]
    no_special: bool,
}

/// Flags of `detokenize`.
#[derive(clap::Args)]
pub struct DetokenizeArgs {
    /// Tokenizer directory (tiktoken.model, tokenizer_config.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// JSON array of token ids.
    #[arg(long)]
    ids: PathBuf,
}

/// Flags of `chat-template`.
#[derive(clap::Args)]
pub struct ChatTemplateArgs {
    /// Tokenizer directory (tokenizer_config.json and chat_template.jinja).
    #[arg(long)]
    tokenizer: PathBuf,
    /// JSON array of messages ({"role": ..., "content": ...}).
    #[arg(long)]
    messages: PathBuf,
    /// JSON array of tool schemas.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// End with the assistant prefix, ready for generation.
    #[arg(long)]
    add_generation_prompt: bool,
    /// Write the rendered prompt here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn load(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::from_dir(dir)
        .with_context(|| format!("cannot load the tokenizer in {}", dir.display()))
}

fn read_json(path: &Path, what: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{what} file {} is not valid JSON", path.display()))
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|_| out.flush())
        .context("cannot write to stdout")
}

/// Run `tokenize`: print the ids as a JSON array.
pub fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = load(&a.tokenizer)?;
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read text file {} (it must be UTF-8)", f.display()))?,
        (None, None) => bail!("give --text TEXT or --file FILE"),
    };
    let ids = tok.encode(&text, !a.no_special);
    write_stdout(format!("{}\n", serde_json::to_string(&ids)?).as_bytes())
}

/// Run `detokenize`: print exactly the decoded text (invalid UTF-8 becomes U+FFFD).
pub fn run_detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = load(&a.tokenizer)?;
    let v = read_json(&a.ids, "ids")?;
    let Some(arr) = v.as_array() else {
        bail!(
            "ids file {}: expected a JSON array of token ids",
            a.ids.display()
        );
    };
    let n = tok.n_vocab();
    let ids = arr
        .iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(id) if id < n as u64 => Ok(id as u32),
            _ => bail!(
                "ids file {}: element {i} is {x}, expected a token id in 0..{n}",
                a.ids.display()
            ),
        })
        .collect::<Result<Vec<u32>>>()?;
    let text = tok.decode(&ids)?;
    write_stdout(text.as_bytes())
}

/// Run `chat-template`: write the rendered prompt exactly (no added newline).
pub fn run_chat_template(a: ChatTemplateArgs) -> Result<()> {
    let tok = load(&a.tokenizer)?;
    let messages = read_json(&a.messages, "messages")?;
    if !messages.is_array() {
        bail!(
            "messages file {}: expected a JSON array of {{\"role\", \"content\"}} objects",
            a.messages.display()
        );
    }
    let tools = a
        .tools
        .as_deref()
        .map(|p| read_json(p, "tools"))
        .transpose()?;
    let rendered = tok
        .apply_chat_template(&messages, tools.as_ref(), a.add_generation_prompt)
        .context("cannot render the chat template")?;
    match &a.output {
        Some(p) => std::fs::write(p, rendered.as_bytes())
            .with_context(|| format!("cannot write {}", p.display())),
        None => write_stdout(rendered.as_bytes()),
    }
}
