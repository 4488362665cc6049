//! Loading `tiktoken.model`: one `base64(token bytes) rank` line per token.
//!
//! This follows `tiktoken.load.load_tiktoken_bpe`: blank lines are skipped,
//! each other line splits on whitespace into exactly two fields. Unlike the
//! Python loader (a dict comprehension that silently keeps the last of two
//! equal tokens), duplicates are reported as errors, because they would make
//! encoding and decoding disagree.

use base64::Engine as _;

use crate::bpe::RankMap;
use crate::error::TokenizerError;

/// The mergeable ranks of a vocabulary, both ways round.
#[derive(Debug, Clone)]
pub(crate) struct Vocab {
    /// token bytes → rank.
    pub(crate) encoder: RankMap,
    /// rank → token bytes; ranks are exactly `0..N`.
    pub(crate) decoder: Vec<Box<[u8]>>,
}

impl Vocab {
    /// Parses the text of a `tiktoken.model` file; `file` names it in errors.
    pub(crate) fn parse(text: &str, file: &str) -> Result<Vocab, TokenizerError> {
        let mut encoder = RankMap::default();
        // rank -> line of its first appearance
        let mut rank_line: std::collections::HashMap<u32, usize> = Default::default();
        let mut entries: Vec<(u32, Box<[u8]>)> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let mut fields = raw.split_whitespace();
            let (Some(b64), Some(rank_text)) = (fields.next(), fields.next()) else {
                if raw.trim().is_empty() {
                    continue;
                }
                return Err(malformed(file, line_no, "expected `<base64 token> <rank>`"));
            };
            if fields.next().is_some() {
                return Err(malformed(file, line_no, "more than two fields"));
            }
            let rank: u32 = rank_text.parse().map_err(|_| {
                malformed(
                    file,
                    line_no,
                    &format!("rank {rank_text:?} is not a non-negative integer below 2^32"),
                )
            })?;
            if rank == u32::MAX {
                return Err(malformed(file, line_no, "rank 4294967295 is reserved"));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| TokenizerError::BadBase64 {
                    file: file.to_string(),
                    line: line_no,
                    token: b64.to_string(),
                    reason: e.to_string(),
                })?;
            if bytes.is_empty() {
                return Err(malformed(file, line_no, "empty token"));
            }
            if let Some(&first_line) = rank_line.get(&rank) {
                return Err(TokenizerError::DuplicateRank {
                    file: file.to_string(),
                    line: line_no,
                    first_line,
                    rank,
                });
            }
            let bytes = bytes.into_boxed_slice();
            if let Some(&other) = encoder.get(&bytes) {
                return Err(TokenizerError::DuplicateToken {
                    file: file.to_string(),
                    line: line_no,
                    first_line: rank_line.get(&other).copied().unwrap_or(0),
                    token: b64.to_string(),
                });
            }
            encoder.insert(bytes.clone(), rank);
            rank_line.insert(rank, line_no);
            entries.push((rank, bytes));
        }
        if encoder.is_empty() {
            return Err(TokenizerError::BadVocab {
                file: file.to_string(),
                reason: "no tokens".into(),
            });
        }
        for byte in 0..=255u8 {
            if !encoder.contains_key([byte].as_slice()) {
                return Err(TokenizerError::MissingByte {
                    file: file.to_string(),
                    byte,
                });
            }
        }
        // Special ids start at N = number of ranks, so the ranks must be
        // exactly 0..N (unique, hence dense).
        let n = entries.len();
        let mut slots: Vec<Option<Box<[u8]>>> = vec![None; n];
        for (rank, bytes) in entries {
            let Some(slot) = slots.get_mut(rank as usize) else {
                return Err(TokenizerError::BadVocab {
                    file: file.to_string(),
                    reason: format!(
                        "rank {rank} (line {}) is not below the number of ranks {n}; \
                         ranks must be 0..{n} because special ids start at {n}",
                        rank_line.get(&rank).copied().unwrap_or(0)
                    ),
                });
            };
            *slot = Some(bytes);
        }
        let decoder = slots.into_iter().flatten().collect();
        Ok(Vocab { encoder, decoder })
    }

    /// Number of ranks (`len(mergeable_ranks)`), where the special ids start.
    pub(crate) fn len(&self) -> usize {
        self.encoder.len()
    }
}

fn malformed(file: &str, line: usize, reason: &str) -> TokenizerError {
    TokenizerError::MalformedLine {
        file: file.to_string(),
        line,
        reason: reason.to_string(),
    }
}
