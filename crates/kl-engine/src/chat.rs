//! Multi-turn chat over one [`Session`], feeding only what each turn adds.

use crate::sampler::Sampler;
use crate::session::{GenerationStats, Session};
use crate::stop::StopRules;
use crate::{EngineError, Result};
use serde_json::{json, Value};
use std::path::Path;

/// What [`Chat::sync`] fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Tokens fed.
    pub fed_tokens: usize,
    /// True when the state did not match the start of the rendered conversation and the whole
    /// conversation was prefilled again from an empty state.
    pub reprefilled: bool,
}

/// What one [`Chat::send`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    /// The assistant's reply as shown (no stop string, no end-of-sequence marker).
    pub reply: String,
    /// How the prompt part of the turn was fed.
    pub sync: SyncOutcome,
    /// The generation.
    pub stats: GenerationStats,
}

/// A conversation: the message list, rendered with the tokenizer's chat template each turn.
///
/// Each turn renders the whole conversation and compares its ids with the ids the state has
/// consumed ([`Session::history`]). When the history is a prefix of the rendering, only the rest is
/// fed — the usual case, since a reply that ended at `<|im_end|>` left exactly what the template
/// renders for it. When it is not (the template re-rendered an earlier turn differently, a reply
/// that does not re-tokenize to the sampled ids, a reply cut by a stop string), the state is reset
/// and the whole conversation prefilled again; [`SyncOutcome::reprefilled`] says so.
pub struct Chat {
    session: Session,
    messages: Vec<Value>,
    system: Option<String>,
    tools: Option<Value>,
}

impl Chat {
    /// A conversation on `session` (which must have a tokenizer with a chat template), starting
    /// with a system message when `system` is given. The session is reset.
    pub fn new(mut session: Session, system: Option<String>) -> Result<Self> {
        let tok = session.require_tokenizer("chat")?;
        if tok.chat_template().is_none() {
            return Err(kl_tokenizer::TokenizerError::NoChatTemplate.into());
        }
        session.reset();
        let mut chat = Chat {
            session,
            messages: Vec::new(),
            system,
            tools: None,
        };
        chat.clear_messages();
        Ok(chat)
    }

    /// Tool schemas passed to the template (`None`: no tools).
    pub fn set_tools(&mut self, tools: Option<Value>) {
        self.tools = tools;
    }

    fn clear_messages(&mut self) {
        self.messages.clear();
        if let Some(s) = &self.system {
            self.messages.push(json!({"role": "system", "content": s}));
        }
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session, mutably (sampling limits, context limit).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The messages so far.
    pub fn messages(&self) -> &[Value] {
        &self.messages
    }

    /// Append a message without generating (e.g. a tool result); fed at the next sync.
    pub fn push_message(&mut self, message: Value) {
        self.messages.push(message);
    }

    /// The ids of the conversation as the template renders it now.
    pub fn render_ids(&self, add_generation_prompt: bool) -> Result<Vec<u32>> {
        let tok = self.session.require_tokenizer("chat")?;
        let text = tok.apply_chat_template(
            &Value::Array(self.messages.clone()),
            self.tools.as_ref(),
            add_generation_prompt,
        )?;
        Ok(tok.encode(&text, true))
    }

    /// Bring the state up to the rendered conversation (with the assistant prefix when
    /// `add_generation_prompt`): feed the ids after the common prefix, or reset and feed all.
    pub fn sync(&mut self, add_generation_prompt: bool) -> Result<SyncOutcome> {
        let ids = self.render_ids(add_generation_prompt)?;
        let hist = self.session.history();
        let common = hist.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        let reprefilled = common < hist.len();
        let start = if reprefilled {
            // Check the limit before throwing the state away.
            if ids.len() > self.session.max_context() {
                return Err(EngineError::ContextFull {
                    used: 0,
                    requested: ids.len(),
                    limit: self.session.max_context(),
                    reason: "the conversation no longer fits".into(),
                });
            }
            self.session.reset();
            0
        } else {
            common
        };
        let rest = &ids[start..];
        if !rest.is_empty() {
            self.session.feed(rest)?;
        }
        Ok(SyncOutcome {
            fed_tokens: rest.len(),
            reprefilled,
        })
    }

    /// One turn: add the user message, feed what it adds, generate the reply (streamed through
    /// `on_text`) and record it as the assistant message. If feeding fails (e.g. the context is
    /// full) the user message is withdrawn and the error returned.
    pub fn send(
        &mut self,
        user: &str,
        sampler: &mut Sampler,
        max_new: usize,
        stop: &StopRules,
        mut on_text: impl FnMut(&str),
    ) -> Result<TurnOutcome> {
        self.messages.push(json!({"role": "user", "content": user}));
        let sync = match self.sync(true) {
            Ok(s) => s,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        let mut reply = String::new();
        let stats = self.session.generate(sampler, max_new, stop, |t| {
            reply.push_str(t);
            on_text(t);
        })?;
        self.messages
            .push(json!({"role": "assistant", "content": reply}));
        Ok(TurnOutcome { reply, sync, stats })
    }

    /// Start over: the system message only, an empty state.
    pub fn reset(&mut self) {
        self.clear_messages();
        self.session.reset();
    }

    /// Save the state, the history and the messages (see [`Session::save`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = json!({"messages": self.messages, "tools": self.tools});
        self.session.save_with_meta(path, meta)
    }

    /// Restore what [`Chat::save`] wrote.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let meta = self.session.load_with_meta(path)?;
        let Some(messages) = meta["messages"].as_array() else {
            self.reset();
            return Err(EngineError::SessionFile {
                path: path.display().to_string(),
                message: "no chat messages saved with this state (was it saved by a chat?)".into(),
            });
        };
        self.messages = messages.clone();
        self.tools = match &meta["tools"] {
            Value::Null => None,
            t => Some(t.clone()),
        };
        Ok(())
    }
}
