//! From a `--model` argument to a loaded model and tokenizer.

use crate::Result;
use kl_model::{KimiLinear, ModelOptions};
use kl_tokenizer::{Tokenizer, TIKTOKEN_MODEL_FILE, TOKENIZER_CONFIG_FILE};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A local directory, or a Hugging Face repo id (`owner/name`) found in the local hub cache. The
/// network is never used.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(kl_tokenizer::resolve_model(spec)?)
}

/// The tokenizer in `dir`: `None` when the directory has neither `tiktoken.model` nor
/// `tokenizer_config.json`, an error naming the missing or broken file when it has only part of
/// a tokenizer or a malformed one.
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let any = [TIKTOKEN_MODEL_FILE, TOKENIZER_CONFIG_FILE]
        .iter()
        .any(|f| dir.join(f).exists());
    if !any {
        return Ok(None);
    }
    Ok(Some(Tokenizer::from_dir(dir)?))
}

/// A model and its tokenizer, ready for [`crate::Session::new`].
pub struct Loaded {
    /// The resolved model directory.
    pub dir: PathBuf,
    /// The model.
    pub model: Arc<KimiLinear>,
    /// The tokenizer found in the same directory, if any.
    pub tokenizer: Option<Arc<Tokenizer>>,
}

/// Resolve `spec` and load the model with `opts`, and the tokenizer beside it if there is one.
pub fn load(spec: &str, opts: ModelOptions) -> Result<Loaded> {
    let dir = resolve_model(spec)?;
    let tokenizer = load_tokenizer(&dir)?.map(Arc::new);
    let model = Arc::new(KimiLinear::load(&dir, opts)?);
    Ok(Loaded {
        dir,
        model,
        tokenizer,
    })
}
