//! Who runs a kernel's tasks: the rayon pool, or only the calling thread.
//!
//! The multithreaded kernels ([`crate::matmul`] and friends) split their work into independent
//! tasks and hand them to rayon. That is right for one large product, and wrong for many small
//! ones that are already being run in parallel by the caller — the mixture-of-experts prefill
//! runs each expert's whole MLP as one task on one thread, where splitting every product again
//! would only cut it into pieces too small to balance (and pack each weight panel twice).
//! [`serial`] marks the calling thread so that, until it returns, kernels called on this thread
//! run their tasks in order on it ([`threads`] answers 1, [`for_each`] is a plain loop).
//!
//! Results do not depend on this: every kernel computes the same bits whatever its task split
//! (see the batch-invariance notes in [`crate::matmul`]). The mark is per thread and never
//! crosses into rayon: a kernel inside [`serial`] makes no rayon call, so no other task can be
//! stolen onto this thread while the mark is set.

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the kernels it calls on this thread single-threaded (see the module notes).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the previous mark, also when `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// A raw pointer that tasks on other threads may hold: the output of a kernel whose tasks each
/// write their own disjoint set of elements through it (every use site says which, in its
/// `SAFETY` comment), where no safe split of the slice fits the access pattern.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// By hand: the derives would ask `T: Copy`, and a pointer is copied whatever it points to.
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements (see above);
// it is never read through concurrently with a write to the same element.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Whether the calling thread is inside [`serial`].
pub fn is_serial() -> bool {
    SERIAL.with(Cell::get)
}

/// Threads a kernel called here may use: 1 inside [`serial`], else the rayon pool's size.
pub fn threads() -> usize {
    if is_serial() {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// `body(i)` for `i` in `0..n`: in order on this thread inside [`serial`], else on the pool.
pub fn for_each(n: usize, body: impl Fn(usize) + Sync + Send) {
    if is_serial() {
        (0..n).for_each(body);
    } else {
        (0..n).into_par_iter().for_each(body);
    }
}

/// `body(item)` for every item of `items`, taken in order by whichever thread is free next: list
/// scheduling, so tasks sorted largest first balance to within the last one (the longest
/// processing time first rule). Rayon's own split of a slice cannot do this: it cuts the slice
/// into a few ranges up front and a range that a thread has started is not split again, so one
/// thread can be left running a whole range of large tasks while the other has finished its own
/// (the mixture-of-experts prefill had one of two threads idle for a third of each layer). In
/// order on this thread inside [`serial`] or with one thread.
pub fn for_each_queued<T: Send>(items: &mut [T], body: impl Fn(&mut T) + Sync + Send) {
    let n = items.len();
    let workers = threads().min(n);
    if workers <= 1 {
        items.iter_mut().for_each(body);
        return;
    }
    let next = AtomicUsize::new(0);
    let base = SendPtr(items.as_mut_ptr());
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        // SAFETY: `fetch_add` hands out each index below `n` exactly once, so this is the only
        // reference to item `i`; `items` is borrowed mutably for the whole call, which returns
        // only after every worker has (the scope joins them).
        body(unsafe { &mut *base.get().add(i) });
    };
    let work = &work;
    rayon::scope(|s| {
        for _ in 1..workers {
            s.spawn(move |_| work());
        }
        work();
    });
}

/// `body(r0, rows)` over blocks of whole rows of `out` (`row_len` floats each; `r0` is the
/// block's first row), in parallel once there are at least `2·min_rows` rows and more than one
/// thread, else as one block on this thread (decode stays free of pool traffic).
pub fn rows_mut(
    out: &mut [f32],
    row_len: usize,
    min_rows: usize,
    body: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let n = out.len() / row_len.max(1);
    let per = block_rows(n, min_rows);
    if per >= n {
        body(0, out);
        return;
    }
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(i, rows)| body(i * per, rows));
}

/// `body(rows)` over blocks of `0..n`, split as [`rows_mut`] splits its rows: for kernels whose
/// output rows are not one contiguous block each (a head-major output written token by token).
pub fn row_blocks(n: usize, min_rows: usize, body: impl Fn(std::ops::Range<usize>) + Sync + Send) {
    let per = block_rows(n, min_rows);
    if per >= n {
        body(0..n);
        return;
    }
    (0..n.div_ceil(per))
        .into_par_iter()
        .for_each(|i| body(i * per..((i + 1) * per).min(n)));
}

/// Rows a block of [`rows_mut`] and [`row_blocks`] takes: all `n` of them (one block, on this
/// thread) with one thread or fewer than `2·min_rows` rows, else a few blocks per thread, so
/// that a slow thread does not hold the others up.
fn block_rows(n: usize, min_rows: usize) -> usize {
    let threads = threads();
    if threads == 1 || n < 2 * min_rows.max(1) {
        return n.max(1);
    }
    n.div_ceil(4 * threads).max(min_rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item is handed to exactly one call, on a pool of any size and inside [`serial`],
    /// and a single thread takes them in order.
    #[test]
    fn queued_items_run_once_each() {
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a test pool");
            for n in [0, 1, 2, 7, 64] {
                let mut items: Vec<(usize, usize)> = (0..n).map(|i| (i, 0)).collect();
                pool.install(|| for_each_queued(&mut items, |(_, runs)| *runs += 1));
                assert!(
                    items.iter().all(|&(_, runs)| runs == 1),
                    "{threads} threads, {n} items"
                );
            }
        }
        let order = std::sync::Mutex::new(Vec::new());
        let mut items: Vec<usize> = (0..9).collect();
        serial(|| for_each_queued(&mut items, |i| order.lock().unwrap().push(*i)));
        assert_eq!(order.into_inner().unwrap(), (0..9).collect::<Vec<_>>());
    }
}
