//! Reusable activation buffers, so that decode allocates nothing per token.
//!
//! Every temporary a forward pass needs is taken from a [`Scratch`] and given back before the
//! pass returns. Buffers are kept on a stack: a pass takes and gives them in the same order
//! every token, so after one warm-up token each `take` finds a buffer whose capacity already
//! fits and nothing is allocated again. A sequence owns one `Scratch` for decode (it holds
//! single-token activations, kilobytes); prefill uses a scratch that lives for one call, so its
//! chunk-sized buffers are reused across the chunks of that call and freed after it.
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
        let mut v = match best_fit(&self.f, n) {
            Some(i) => self.f.swap_remove(i),
            None => Vec::new(),
        };
        v.clear();
        v.resize(n, 0.0);
        v
    }

    /// Return a buffer taken with [`Scratch::take`].
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
