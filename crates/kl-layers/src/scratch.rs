//! Reusable activation buffers, so that decode allocates nothing per token.
//!
//! Every temporary a forward pass needs is taken from a [`Scratch`] and given back before the
//! pass returns. Buffers are kept on a stack: a pass takes and gives them in the same order
//! every token, so after one warm-up token each `take` finds a buffer whose capacity already
//! fits and nothing is allocated again. A sequence owns one `Scratch` for decode (it holds
//! single-token activations, kilobytes); prefill takes a scratch from the model's kept
//! workspaces, so its chunk-sized buffers are reused across the chunks of a call and by the next
//! call (`KimiLinear::release_workspaces` frees them).
//!
//! Forgetting to give a buffer back is not unsafe, only an allocation on the next token — which
//! the model's allocation test catches.

/// A stack of `f32` and index buffers.
#[derive(Debug, Default)]
pub struct Scratch {
    f: Vec<Vec<f32>>,
    u: Vec<Vec<usize>>,
}

/// A clone starts empty: scratch contents are never state.
impl Clone for Scratch {
    fn clone(&self) -> Self {
        Scratch::new()
    }
}

impl Scratch {
    /// An empty scratch (buffers are created by the first pass that needs them).
    pub fn new() -> Self {
        Self::default()
    }

    /// A zero-filled buffer of `n` values: the smallest held buffer that fits, else the largest
    /// one, grown. (Taking the top of the stack instead would let every buffer grow to the
    /// largest size ever asked of its position, so that the held total could exceed the largest
    /// set of buffers in use at once several times over.)
    pub fn take(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.take_for_write(n);
        v.fill(0.0);
        v
    }

    /// A buffer of `n` values whose contents are unspecified (stale values of an earlier pass,
    /// zeros where it had to grow), for an output the caller writes in full before reading any
    /// of it: a matrix product's, a convolution's, a norm's. It skips [`Scratch::take`]'s fill,
    /// which for a 512-token prefill chunk is megabytes per buffer written by one thread while
    /// the others wait (about 2% of `mini`'s prefill).
    pub fn take_for_write(&mut self, n: usize) -> Vec<f32> {
        let mut v = match best_fit(&self.f, n) {
            Some(i) => self.f.swap_remove(i),
            None => Vec::new(),
        };
        // Cut to `n`, or grown with zeros.
        v.resize(n, 0.0);
        v
    }

    /// Return a buffer taken with [`Scratch::take`] or [`Scratch::take_for_write`].
    pub fn give(&mut self, v: Vec<f32>) {
        self.f.push(v);
    }

    /// An empty index buffer.
    pub fn take_idx(&mut self) -> Vec<usize> {
        let mut v = self.u.pop().unwrap_or_default();
        v.clear();
        v
    }

    /// Return a buffer taken with [`Scratch::take_idx`].
    pub fn give_idx(&mut self, v: Vec<usize>) {
        self.u.push(v);
    }

    /// Bytes held (capacities), for memory accounting.
    pub fn bytes(&self) -> usize {
        self.f.iter().map(|v| 4 * v.capacity()).sum::<usize>()
            + self.u.iter().map(|v| 8 * v.capacity()).sum::<usize>()
    }
}

/// Index of the smallest buffer with capacity ≥ `n`, else of the largest (`None` if empty).
fn best_fit<T>(bufs: &[Vec<T>], n: usize) -> Option<usize> {
    let fits = bufs
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= n)
        .min_by_key(|(_, v)| v.capacity());
    fits.or_else(|| bufs.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn buffers_are_zeroed_and_reused() {
        let mut s = Scratch::new();
        let mut a = s.take(10);
        a[3] = 1.0;
        let p = a.as_ptr();
        s.give(a);
        let b = s.take(8);
        assert_eq!(b.as_ptr(), p, "the same buffer comes back");
        assert!(b.iter().all(|&x| x == 0.0) && b.len() == 8);
        s.give(b);
        assert!(s.bytes() >= 40);
    }

    #[test]
    fn buffers_for_write_keep_their_length_and_reuse() {
        let mut s = Scratch::new();
        let mut a = s.take_for_write(10);
        assert_eq!(a.len(), 10);
        a.fill(2.0);
        let p = a.as_ptr();
        s.give(a);
        let b = s.take_for_write(6);
        assert_eq!(
            (b.as_ptr(), b.len()),
            (p, 6),
            "the same buffer, cut to length"
        );
        s.give(b);
        // Grown past its old length: the new part is zeros.
        let c = s.take_for_write(12);
        assert_eq!(c.len(), 12);
        assert!(c[6..].iter().all(|&x| x == 0.0));
        s.give(c);
        // `take` still zeroes everything.
        assert!(s.take(12).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn held_total_stays_at_the_live_peak() {
        // A pass takes a large and a small buffer; the next pass asks in the other order. The
        // scratch keeps one of each (a stack would grow both to the large size).
        let mut s = Scratch::new();
        for pass in 0..4 {
            let (a, b) = if pass % 2 == 0 {
                let a = s.take(100_000);
                (a, s.take(10))
            } else {
                let b = s.take(10);
                (s.take(100_000), b)
            };
            s.give(b);
            s.give(a);
            assert!(
                s.bytes() <= 4 * (100_000 + 64),
                "pass {pass}: {} bytes",
                s.bytes()
            );
        }
    }
}
