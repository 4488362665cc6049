//! Incremental decoding for streaming generation.
//!
//! A BPE token can end in the middle of a UTF-8 character (a CJK character
//! or an emoji is often split over two or more tokens), so printing each
//! token's lossy text on its own would print U+FFFD where the finished text
//! has a real character. [`StreamDecoder`] keeps the bytes of an incomplete
//! trailing character back until the next token completes it.
//!
//! Invalid bytes are replaced by U+FFFD exactly as
//! [`String::from_utf8_lossy`] (and Python's `errors="replace"`) would do on
//! the whole byte stream: one U+FFFD per maximal invalid subpart. A sequence
//! is held back only while it could still become valid; as soon as a byte
//! makes it invalid, its replacement is emitted. Hence the concatenation of
//! everything [`StreamDecoder::push`] and [`StreamDecoder::finish`] return
//! equals [`Tokenizer::decode`](crate::Tokenizer::decode) of all the ids.

use crate::error::TokenizerError;
use crate::Tokenizer;

/// Turns a stream of token ids into text, emitting only complete UTF-8.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    /// Bytes of an incomplete (but so far valid) trailing UTF-8 sequence.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token and returns the text it completes: everything that has
    /// become decodable and was not returned before (often empty while a
    /// multi-byte character is still incomplete). Fails, changing nothing,
    /// if `id` is out of range.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        let bytes = tokenizer
            .token_bytes(id)
            .ok_or(TokenizerError::IdOutOfRange {
                id,
                n_vocab: tokenizer.n_vocab(),
            })?;
        Ok(self.push_bytes(bytes))
    }

    /// Adds raw bytes (as if they were one token) and returns the text they
    /// complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            // Incomplete sequence at the end: keep it.
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }

    /// True when no bytes are held back.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Ends the stream: an incomplete trailing character becomes U+FFFD.
    /// The decoder is empty afterwards and can be reused.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = StreamDecoder::new();
        let mut v: Vec<String> = chunks.iter().map(|c| d.push_bytes(c)).collect();
        v.push(d.finish());
        v
    }

    #[test]
    fn holds_back_incomplete_characters() {
        assert_eq!(run(&[b"\xe4", b"\xbd", b"\xa0A"]), ["", "", "你A", ""]);
        assert_eq!(run(&[b"\xe4\xbd", b"A"]), ["", "\u{fffd}A", ""]);
        assert_eq!(run(&[b"\xe4\xbd"]), ["", "\u{fffd}"]);
        assert_eq!(run(&[b"\x80z", b"\xff"]), ["\u{fffd}z", "\u{fffd}", ""]);
        assert_eq!(run(&[b"a\xf0\x9f", b"\x99\x82b"]), ["a", "\u{1f642}b", ""]);
    }

    #[test]
    fn matches_lossy_on_all_splits() {
        let data: &[u8] =
            b"x\xe4\xbd\xa0\xe4\xbdA\x80\xf0\x9f\x99\x82\xed\xa0\x80\xc0\xafz\xf4\x90";
        let want = String::from_utf8_lossy(data);
        for i in 0..=data.len() {
            for j in i..=data.len() {
                let got = run(&[&data[..i], &data[i..j], &data[j..]]).concat();
                assert_eq!(got, want, "split at {i},{j}");
            }
        }
    }
}
