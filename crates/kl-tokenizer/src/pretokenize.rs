//! Pre-tokenisation: Kimi's regex and the 400k / 25k character splits.
//!
//! `TikTokenTokenizer.encode` cuts the text into 400,000-character chunks,
//! then cuts each chunk so that no run of whitespace and no run of
//! non-whitespace (Python `str.isspace()`) is longer than 25,000 characters,
//! and only then hands each piece to tiktoken. Characters here are Unicode
//! scalar values, as Python `str` indexes them.
//!
//! The regex itself is run by `fancy-regex`, as tiktoken does. `fancy-regex`
//! 0.20 passes character classes through to `regex-syntax`, which implements
//! class intersection `&&` (with lower precedence than the implicit union),
//! and it adds the backtracking needed for the look-ahead `(?!\S)`. So the
//! pattern is used verbatim; the unit tests and the fixtures' `pieces` prove
//! the intersection semantics.

/// Kimi's pre-tokenisation pattern (`TikTokenTokenizer.pat_str`), the eight
/// alternatives joined with `|`.
pub const KIMI_PAT_STR: &str = concat!(
    r"[\p{Han}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// Characters per chunk (`TIKTOKEN_MAX_ENCODE_CHARS`).
pub const CHUNK_CHARS: usize = 400_000;

/// Longest run of whitespace or of non-whitespace handed to tiktoken
/// (`MAX_NO_WHITESPACES_CHARS`).
pub const MAX_RUN_CHARS: usize = 25_000;

/// Python's `str.isspace()` for one character: general category `Zs` or
/// bidirectional class `WS`, `B` or `S`. That is Unicode `White_Space` plus
/// the four information separators U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Splits `text` into the pieces Kimi's `encode` passes to tiktoken, calling
/// `f` on each in order. Empty text produces no pieces.
pub fn for_each_piece(text: &str, mut f: impl FnMut(&str)) {
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .nth(CHUNK_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        split_runs(&rest[..cut], MAX_RUN_CHARS, &mut f);
        rest = &rest[cut..];
    }
}

/// Kimi's `_split_whitespaces_or_nonwhitespaces`: a cut falls just before
/// the `max_run + 1`-th character of a run of same-class characters. Always
/// yields at least one (possibly empty) piece, like the Python generator.
fn split_runs(s: &str, max_run: usize, f: &mut impl FnMut(&str)) {
    let mut run_is_space = s.chars().next().is_some_and(py_isspace);
    let mut run_len = 0usize;
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        let is_space = py_isspace(c);
        if is_space != run_is_space {
            run_is_space = is_space;
            run_len = 1;
        } else {
            run_len += 1;
            if run_len > max_run {
                f(&s[start..i]);
                start = i;
                run_len = 1;
            }
        }
    }
    f(&s[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str, max: usize) -> Vec<String> {
        let mut v = Vec::new();
        split_runs(s, max, &mut |p| v.push(p.to_string()));
        v
    }

    #[test]
    fn run_split_matches_python() {
        assert_eq!(pieces("", 3), vec![""]);
        assert_eq!(pieces("abc", 3), vec!["abc"]);
        assert_eq!(pieces("abcd", 3), vec!["abc", "d"]);
        assert_eq!(pieces("ab    cdefgh", 3), vec!["ab   ", " cde", "fgh"]);
        assert_eq!(
            pieces("\u{1c}\u{1d}\u{1e}\u{1f}x", 3),
            vec!["\u{1c}\u{1d}\u{1e}", "\u{1f}x"]
        );
    }

    #[test]
    fn isspace_table() {
        for c in [
            '\t', '\n', '\x0b', '\x0c', '\r', '\x1c', '\x1f', ' ', '\u{85}', '\u{a0}',
        ] {
            assert!(py_isspace(c), "{c:?}");
        }
        for c in [
            '\u{2000}', '\u{200a}', '\u{2028}', '\u{202f}', '\u{205f}', '\u{3000}',
        ] {
            assert!(py_isspace(c), "{c:?}");
        }
        for c in ['a', '\u{200b}', '\u{180e}', '\u{feff}', '\x00'] {
            assert!(!py_isspace(c), "{c:?}");
        }
    }

    #[test]
    fn chunks_of_400k_chars() {
        // 'é' is two bytes: chunking counts characters, not bytes.
        let text: String = "é".repeat(CHUNK_CHARS + 5);
        let mut lens = Vec::new();
        for_each_piece(&text, |p| lens.push(p.chars().count()));
        assert_eq!(lens.iter().sum::<usize>(), CHUNK_CHARS + 5);
        // 400,000 = 16 * 25,000: sixteen full runs, then the 5 leftover chars.
        assert_eq!(lens.len(), 17);
        assert_eq!(lens[16], 5);
    }

    #[test]
    fn intersection_is_supported() {
        let re = fancy_regex::Regex::new(KIMI_PAT_STR).unwrap();
        let split = |s: &str| -> Vec<String> {
            re.find_iter(s)
                .map(|m| m.unwrap().as_str().to_string())
                .collect()
        };
        // `&&` is intersection, not a literal '&' in the letter class.
        assert_eq!(split("a&&b"), vec!["a", "&&", "b"]);
        // Han is excluded from the letter classes; Latin is not.
        assert_eq!(split("Hello世界ok"), vec!["Hello", "世界", "ok"]);
        assert_eq!(split("x  y"), vec!["x", " ", " y"]);
    }
}
