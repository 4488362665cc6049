//! Byte-level BPE over a rank table, as tiktoken does it.
//!
//! A piece (one match of the pre-tokenisation regex) is first looked up whole;
//! if it is not a token it starts as a list of single bytes, and the adjacent
//! pair whose concatenation has the lowest rank is merged, again and again,
//! until no adjacent pair is a token. Ties between equal ranks cannot occur
//! (ranks are unique), but the same rank can appear at two positions (`aa aa`);
//! then the leftmost pair wins. That is exactly tiktoken's `byte_pair_merge`.
//!
//! Short pieces use tiktoken's vector loop (a linear scan for the minimum per
//! merge, which is quadratic but fastest for the usual few-byte pieces). Long
//! pieces (up to 25,000 characters can reach BPE as one piece) use a binary
//! heap over a linked list, which picks the same pair at every step: the
//! smallest `(rank, start offset)`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Pieces at least this long (in bytes) use the heap-based merge.
const LARGE_PIECE: usize = 256;

/// "No merge possible" marker.
const NONE: u32 = u32::MAX;

/// A small, fast, non-cryptographic hasher (the FxHash mixing step) for the
/// rank table, whose keys are short byte strings from a trusted file.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Map from token bytes to rank.
pub(crate) type RankMap = HashMap<Box<[u8]>, u32, BuildHasherDefault<FxHasher>>;

/// Rank of `bytes`, or [`NONE`].
#[inline]
fn rank_of(ranks: &RankMap, bytes: &[u8]) -> u32 {
    ranks.get(bytes).copied().unwrap_or(NONE)
}

/// Encodes one regex piece into ranks, appending them to `out`.
///
/// Every single byte must be in `ranks` (the loader checks this); should one
/// be missing anyway, that byte is skipped rather than panicking.
pub(crate) fn encode_piece(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    if piece.is_empty() {
        return;
    }
    if let Some(&r) = ranks.get(piece) {
        out.push(r);
        return;
    }
    let bounds = if piece.len() < LARGE_PIECE {
        merge_small(ranks, piece)
    } else {
        merge_large(ranks, piece)
    };
    for w in bounds.windows(2) {
        if let Some(&r) = ranks.get(&piece[w[0]..w[1]]) {
            out.push(r);
        }
    }
}

/// tiktoken's vector loop. Returns the part boundaries (start offsets of the
/// final parts, followed by `piece.len()`).
fn merge_small(ranks: &RankMap, piece: &[u8]) -> Vec<usize> {
    // parts[i] = (start offset, rank of merging part i with part i+1).
    let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
    for i in 0..piece.len() - 1 {
        parts.push((i, rank_of(ranks, &piece[i..i + 2])));
    }
    parts.push((piece.len() - 1, NONE));
    parts.push((piece.len(), NONE));

    // Rank of the part starting at parts[i] merged with the one after it,
    // as it would be once parts[i+1] is removed.
    let pair_rank = |parts: &[(usize, u32)], i: usize| -> u32 {
        if i + 3 < parts.len() {
            rank_of(ranks, &piece[parts[i].0..parts[i + 3].0])
        } else {
            NONE
        }
    };

    loop {
        let mut best = (NONE, 0usize);
        for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
            if r < best.0 {
                best = (r, i);
            }
        }
        if best.0 == NONE {
            break;
        }
        let i = best.1;
        if i > 0 {
            parts[i - 1].1 = pair_rank(&parts, i - 1);
        }
        parts[i].1 = pair_rank(&parts, i);
        parts.remove(i + 1);
    }
    parts.into_iter().map(|(start, _)| start).collect()
}

/// The same merge order with a heap and a doubly linked list of parts,
/// `O(n log n)` for long pieces.
fn merge_large(ranks: &RankMap, piece: &[u8]) -> Vec<usize> {
    let n = piece.len();
    // Parts are identified by their start offset; next/prev link live parts.
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    // Current rank of merging part i with its successor.
    let mut pair: Vec<u32> = vec![NONE; n];
    let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        let r = rank_of(ranks, &piece[i..i + 2]);
        pair[i] = r;
        if r != NONE {
            heap.push(Reverse((r, i)));
        }
    }
    // Rank of part i merged with its successor (end offset of the successor).
    let rank_after = |next: &[usize], i: usize| -> u32 {
        let j = next[i];
        if j >= n {
            return NONE;
        }
        rank_of(ranks, &piece[i..next[j]])
    };

    while let Some(Reverse((r, i))) = heap.pop() {
        if !alive[i] || pair[i] != r || r == NONE {
            continue; // stale entry
        }
        // Merge part i with its successor j.
        let j = next[i];
        alive[j] = false;
        next[i] = next[j];
        if next[j] < n {
            prev[next[j]] = i;
        }
        let r_i = rank_after(&next, i);
        pair[i] = r_i;
        if r_i != NONE {
            heap.push(Reverse((r_i, i)));
        }
        let p = prev[i];
        if p < n {
            let r_p = rank_after(&next, p);
            pair[p] = r_p;
            if r_p != NONE {
                heap.push(Reverse((r_p, p)));
            }
        }
    }

    let mut bounds = Vec::new();
    let mut i = 0;
    while i < n {
        bounds.push(i);
        i = next[i];
    }
    bounds.push(n);
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tokens: &[&[u8]]) -> RankMap {
        let mut m = RankMap::default();
        for b in 0..=255u8 {
            m.insert(vec![b].into_boxed_slice(), m.len() as u32);
        }
        for t in tokens {
            m.insert(t.to_vec().into_boxed_slice(), m.len() as u32);
        }
        m
    }

    #[test]
    fn small_and_large_agree() {
        let ranks = table(&[
            b"ab", b"cd", b"abcd", b"aa", b"aaaa", b"ba", b"dab", b"abab",
        ]);
        // Deterministic pseudo-random strings over a small alphabet.
        let mut state = 12345u64;
        for len in [2usize, 3, 5, 17, 64, 300, 1000] {
            for _ in 0..20 {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        b"abcd"[(state >> 60) as usize & 3]
                    })
                    .collect();
                assert_eq!(merge_small(&ranks, &s), merge_large(&ranks, &s), "{s:?}");
            }
        }
    }

    #[test]
    fn leftmost_wins_on_equal_rank() {
        let ranks = table(&[b"aa"]);
        let mut out = Vec::new();
        encode_piece(&ranks, b"aaa", &mut out);
        assert_eq!(out, vec![256, u32::from(b'a')]);
    }
}
