//! When generation ends, and stop strings that may span several tokens.

/// What ends a generation besides the token budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopRules {
    /// Stop as soon as the generated text contains one of these; the stop string and anything
    /// after it is not emitted. Empty strings are ignored.
    pub stop_strings: Vec<String>,
    /// Extra ids that end generation like an end-of-sequence id.
    pub stop_ids: Vec<u32>,
    /// Do not stop at end-of-sequence ids (they are then generated like any token).
    pub ignore_eos: bool,
}

impl StopRules {
    /// Stop at end-of-sequence ids only.
    pub fn eos_only() -> Self {
        StopRules::default()
    }

    /// Stop at end-of-sequence ids and at any of `strings`.
    pub fn with_strings<S: Into<String>>(strings: impl IntoIterator<Item = S>) -> Self {
        StopRules {
            stop_strings: strings.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence id (or one of [`StopRules::stop_ids`]) was sampled.
    Eos(u32),
    /// The text reached a stop string (its index in [`StopRules::stop_strings`]).
    StopString(usize),
    /// The token budget was used up.
    MaxTokens,
    /// The context limit was reached.
    ContextFull,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Eos(id) => write!(f, "eos (id {id})"),
            StopReason::StopString(i) => write!(f, "stop string #{i}"),
            StopReason::MaxTokens => f.write_str("max tokens"),
            StopReason::ContextFull => f.write_str("context full"),
        }
    }
}

/// Streams text while watching for stop strings.
///
/// Text that could be the beginning of a stop string is held back until the next piece shows
/// whether it is one; when a stop string is found, only the text before it is released. Pieces
/// are `&str`, so a held-back part never splits a UTF-8 character.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// Result of [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopScan {
    /// Text that is safe to show now.
    pub emit: String,
    /// The index of the stop string that was found, if any (the stream is over then).
    pub stopped: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings never match).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.to_vec(),
            held: String::new(),
        }
    }

    /// Add a piece of text.
    pub fn push(&mut self, piece: &str) -> StopScan {
        self.held.push_str(piece);
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|p| (p, i)))
            .min();
        if let Some((pos, i)) = found {
            let emit = self.held[..pos].to_string();
            self.held.clear();
            return StopScan {
                emit,
                stopped: Some(i),
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopScan {
            emit,
            stopped: None,
        }
    }

    /// End of the stream: release whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let s = m.push(p);
            out.push_str(&s.emit);
            if s.stopped.is_some() {
                return (out, s.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_strings_split_across_pieces() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), Some(0))
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "X"]),
            ("abc ENX".into(), None)
        );
        assert_eq!(run(&["END"], &["abc EN"]), ("abc EN".into(), None));
        assert_eq!(run(&["xy", "b"], &["a", "xb"]), ("ax".into(), Some(1)));
        assert_eq!(run(&["ab", "abc"], &["zab"]), ("z".into(), Some(0)));
        assert_eq!(run(&["", "你好"], &["a你", "好b"]), ("a".into(), Some(1)));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_match() {
        let mut m = StopMatcher::new(&["<stop>".to_string()]);
        assert_eq!(m.push("hi <st").emit, "hi ");
        assert_eq!(m.push("x").emit, "<stx");
        assert_eq!(m.push("<").emit, "");
        assert_eq!(m.finish(), "<");
    }
}
