//! Several one-row products read as one set of long weight streams: a layer's decode products.
//!
//! Decode reads weights at memory speed only if every thread keeps several long, monotonic
//! streams of memory in flight: on the Zen 5 VM one sequential stream per thread reads at the
//! bandwidth probe's one-stream rate, three streams of at least 0.5–1 MiB each per thread
//! read like its multi-stream figure, and streams of 64–256 KiB fall in between or below (the
//! twelfth session's harness; [`super::StreamPlan`]). A single product of 3 MiB or more is
//! long enough to be cut into such streams, and [`super::matmul`] does so. Most of a small
//! model's decode products are not: `mini`'s projections are 1–2 MiB, each expert's matrices
//! 1 MiB. Taken together they are: a KDA layer's six products of its input are 6.3 MiB, the
//! gate and up products of the chosen experts and the shared one 10 MiB, their down products
//! 5 MiB.
//!
//! [`gemv_many`] runs such a set in one parallel region. Products with the same `K` form a
//! group whose weight rows are numbered one after the other, product after product (the
//! group's *rows*); a group large enough for [`super::StreamPlan`] is cut into its tasks over
//! those rows, each task's rows into three thirds, and each tile takes the next row of each
//! third, wherever it lies: in which matrix, against which `x`, into which `y`. A stream runs
//! from one matrix into the next as it reaches a matrix's end. Each tile prefetches every
//! stream's row [`super::STREAM_PREFETCH_ROWS`] rows on, at its own columns. Smaller groups
//! run their products as [`super::matmul`] would, one task each, in the same region.
//!
//! **Balance.** Such a region is short (a group is one task per thread, 100–200 µs), so
//! whichever thread finishes first would wait out the other's last rows. The tasks are handed
//! out in chunks of [`CHUNK_TILES`] tiles instead ([`balanced`]; a product without streams is
//! one chunk): each thread works through its own tasks from the front, then takes the chunks
//! still left in the others from the back. The single large products of
//! [`super::matmul`] (the output head) run the same way, as a group of one.
//!
//! **Bits.** A row's output is its own chain of fused multiply–adds in the canonical order of
//! the module above (one 8-lane accumulator, the zero-padded tail, the fixed lane tree), the
//! same whichever rows share its tile: every output equals [`super::matmul`]'s with `T = 1`,
//! bit for bit, and so the prefill's. Without AVX2 (or for an element type without SIMD
//! loads) every product simply runs through [`super::matmul`].
//!
//! **Memory.** Nothing is allocated: the products' pointers, the groups, the task table and
//! the chunks' claims live on the stack, [`MAX_JOBS`] products at a time.

#[cfg(target_arch = "x86_64")]
use super::{StreamPlan, STREAM_PREFETCH_ROWS};
use crate::Elem;

/// Products [`gemv_many`] plans together; a longer list runs in batches of this many.
pub const MAX_JOBS: usize = 32;

/// Products `y_i = x_i · W_iᵀ` of one `x` row each, by index, for [`gemv_many`]: a list the
/// caller need not build as a slice (so that a layer can name its products without
/// allocating).
pub trait OneRowJobs<W> {
    /// How many products.
    fn count(&self) -> usize;
    /// Product `i` (`i < count()`): its `x` (`K` values), `W` (`N × K`, row-major) and `y`
    /// (`N` values).
    fn job(&mut self, i: usize) -> (&[f32], &[W], &mut [f32]);
}

impl<W> OneRowJobs<W> for [(&[f32], &[W], &mut [f32])] {
    fn count(&self) -> usize {
        self.len()
    }
    fn job(&mut self, i: usize) -> (&[f32], &[W], &mut [f32]) {
        let (x, w, y) = &mut self[i];
        (x, w, y)
    }
}

/// One product's operands as pointers (the region's tasks share them).
#[derive(Clone, Copy)]
struct Job<W> {
    x: *const f32,
    w: *const W,
    y: *mut f32,
    k: usize,
    n: usize,
}

// SAFETY: the pointers come from the borrows `gemv_many` holds for the whole call; the region's
// tasks read `x` and `W` and write disjoint elements of the `y`s (each output row belongs to one
// task), so sharing them across threads is sound.
unsafe impl<W> Send for Job<W> {}
unsafe impl<W> Sync for Job<W> {}

impl<W> Job<W> {
    const EMPTY: Job<W> = Job {
        x: std::ptr::null(),
        w: std::ptr::null(),
        y: std::ptr::null_mut(),
        k: 0,
        n: 0,
    };
}

/// `y_i = x_i · W_iᵀ` for every product of `jobs` (one `x` row each), in one parallel region:
/// the same bits as [`super::matmul`] with `T = 1` on each (see the module notes).
///
/// # Panics
/// If a product's `W` does not hold `N·K` elements (`K` the length of its `x`, `N` of its `y`),
/// naming the product.
pub fn gemv_many<W: Elem, J: OneRowJobs<W> + ?Sized>(jobs: &mut J) {
    let count = jobs.count();
    let mut first = 0;
    while first < count {
        let end = (first + MAX_JOBS).min(count);
        let mut buf = [Job::<W>::EMPTY; MAX_JOBS];
        let mut used = 0;
        for i in first..end {
            let (x, w, y) = jobs.job(i);
            let (k, n) = (x.len(), y.len());
            assert_eq!(
                w.len(),
                n * k,
                "gemv_many: product {i}'s W has {} elements, expected N·K = {n}·{k} (its y and x)",
                w.len()
            );
            if n == 0 {
                continue;
            }
            if k == 0 {
                y.fill(0.0);
                continue;
            }
            buf[used] = Job {
                x: x.as_ptr(),
                w: w.as_ptr(),
                y: y.as_mut_ptr(),
                k,
                n,
            };
            used += 1;
        }
        dispatch(&buf[..used]);
        first = end;
    }
}

/// The element type's stream kernel where the CPU has one, else [`each`].
fn dispatch<W: Elem>(jobs: &[Job<W>]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{x86, Rows};
        use half::{bf16, f16};
        use std::any::TypeId;
        if crate::cpu::features().isa() >= crate::cpu::Isa::Avx2 {
            let id = TypeId::of::<W>();
            // SAFETY (each cast): `W` is exactly the type named by the `TypeId` test, so the
            // jobs are reinterpreted as themselves.
            if id == TypeId::of::<bf16>() && <[bf16] as Rows>::simd_ok() {
                let j = unsafe { &*(jobs as *const [Job<W>] as *const [Job<bf16>]) };
                return streams::<bf16, x86::Bf16>(j);
            }
            if id == TypeId::of::<f32>() && <[f32] as Rows>::simd_ok() {
                let j = unsafe { &*(jobs as *const [Job<W>] as *const [Job<f32>]) };
                return streams::<f32, x86::F32>(j);
            }
            if id == TypeId::of::<f16>() && <[f16] as Rows>::simd_ok() {
                let j = unsafe { &*(jobs as *const [Job<W>] as *const [Job<f16>]) };
                return streams::<f16, x86::F16>(j);
            }
        }
    }
    each(jobs)
}

/// Product `j` through [`super::matmul`] (parallel inside, as a lone call would be).
fn single<W: Elem>(j: Job<W>) {
    // SAFETY: `j` came from `x`, `W` and `y` slices of these lengths, borrowed for the call;
    // no other task touches this `y`.
    let (x, w, y) = unsafe {
        (
            std::slice::from_raw_parts(j.x, j.k),
            std::slice::from_raw_parts(j.w, j.n * j.k),
            std::slice::from_raw_parts_mut(j.y, j.n),
        )
    };
    super::matmul(x, w, y, 1, j.k, j.n);
}

/// Every product through [`super::matmul`], the products in one region.
fn each<W: Elem>(jobs: &[Job<W>]) {
    match jobs {
        [] => {}
        [j] => single(*j),
        _ => crate::par::for_each(jobs.len(), |i| single(jobs[i])),
    }
}

#[cfg(target_arch = "x86_64")]
/// A group of products with the same `K`: `order[first..first + len]` are its products.
#[derive(Clone, Copy)]
struct Group {
    first: usize,
    len: usize,
    /// Weight rows of all its products.
    rows: usize,
    k: usize,
    /// Its stream tasks, or `None`: one [`single`] task per product.
    plan: Option<StreamPlan>,
    /// Index of its first task in the region.
    base: usize,
}

#[cfg(target_arch = "x86_64")]
/// A position in a group's rows: product `pos` (of the group's list), row `row` of it.
#[derive(Clone, Copy)]
struct Cursor {
    pos: usize,
    row: usize,
}

/// The stream kernel: groups by `K`, one region over every group's tasks ([`balanced`]).
#[cfg(target_arch = "x86_64")]
fn streams<W: Elem, L: super::x86::Load<E = W>>(jobs: &[Job<W>]) {
    // Products sorted by K (stable, insertion: at most MAX_JOBS of them).
    let mut order = [0usize; MAX_JOBS];
    for i in 0..jobs.len() {
        order[i] = i;
        let mut p = i;
        while p > 0 && jobs[order[p - 1]].k > jobs[order[p]].k {
            order.swap(p - 1, p);
            p -= 1;
        }
    }
    let order = &order[..jobs.len()];
    let esz = std::mem::size_of::<W>().max(1);
    let mut groups = [Group {
        first: 0,
        len: 0,
        rows: 0,
        k: 0,
        plan: None,
        base: 0,
    }; MAX_JOBS];
    let (mut ng, mut tasks) = (0, 0);
    let mut p = 0;
    while p < order.len() {
        let k = jobs[order[p]].k;
        let mut q = p;
        let mut rows = 0;
        while q < order.len() && jobs[order[q]].k == k {
            rows += jobs[order[q]].n;
            q += 1;
        }
        let plan = StreamPlan::new(rows, k * esz);
        groups[ng] = Group {
            first: p,
            len: q - p,
            rows,
            k,
            plan,
            base: tasks,
        };
        tasks += plan.map_or(q - p, |pl| pl.tasks);
        ng += 1;
        p = q;
    }
    let groups = &groups[..ng];
    // Task `task` of the region: its group, its index there, and that group's products.
    let of = |task: usize| {
        let g = groups
            .iter()
            .rposition(|g| g.base <= task)
            .map_or(groups[0], |i| groups[i]);
        (g, task - g.base, &order[g.first..g.first + g.len])
    };
    let tiles = |task: usize| {
        let (g, local, _) = of(task);
        g.plan.map_or(0, |p| tiles_of(g, p, local))
    };
    // A product of a group without a plan is one task of no tiles: one chunk, run whole.
    balanced(tasks, tiles, |task, range| {
        let (g, local, list) = of(task);
        match g.plan {
            // SAFETY: `dispatch` checked the CPU's AVX2 and FMA (and F16C for f16).
            Some(plan) => unsafe { stream_task::<L>(jobs, list, g, plan, local, range) },
            // One of several tasks: whole, on this thread. Split again, it would open a
            // nested rayon region inside this one (KDA's two gate products of `K` = 64, split
            // eight ways each); see `Linear`'s per-head products in MLA for the same rule.
            None if tasks > 1 => crate::par::serial(|| single(jobs[list[local]])),
            None => single(jobs[list[local]]),
        }
    });
}

/// Tiles (rows of each third) of task `local` of group `g` split as `plan` says.
#[cfg(target_arch = "x86_64")]
fn tiles_of(g: Group, plan: StreamPlan, local: usize) -> usize {
    let v0 = local * plan.rows;
    let v1 = (v0 + plan.rows).min(g.rows);
    (v1 - v0) / 3
}

/// Tiles a claim on a stream task takes (see [`balanced`]): 32 tiles of `mini`'s 1024-wide
/// rows are 192 KiB, about 27 claims to a 5 MiB task.
#[cfg(target_arch = "x86_64")]
const CHUNK_TILES: usize = 32;

/// Most tasks [`balanced`] hands out chunk by chunk (more run whole, as rayon splits them).
#[cfg(target_arch = "x86_64")]
const MAX_BALANCED: usize = 256;

/// `run(task, (j0, j1, last))` over every chunk of [`CHUNK_TILES`] tiles of every task
/// (`tiles(task)` tiles each; `last` marks a task's last chunk, which also takes its
/// leftover rows), each chunk exactly once: each worker takes its own tasks' chunks in order
/// from the front, then the chunks still left in any task from the back, so that a thread
/// that finishes first takes over the end of a slower one's streams instead of waiting.
///
/// Why: a decode group is one task per thread of a few MiB (a region of 100–200 µs), and
/// rayon's split of whole tasks left the first thread done waiting for the other, in a fast
/// memory phase for about a tenth of the region. In-process (two threads, `mini`'s expert
/// gate/up groups and its output head, alternated round by round with whole tasks): in 298
/// fast-phase rounds the groups streamed 8.8% more bytes a second (0.87 of the probe against
/// 0.80) and the head 3.6% more; in 702 slow ones 0.2–0.4%. A claim is one compare-and-swap;
/// the stealing thread reads the end of the other's three streams, a chunk at a time.
#[cfg(target_arch = "x86_64")]
fn balanced(
    tasks: usize,
    tiles: impl Fn(usize) -> usize + Sync,
    run: impl Fn(usize, (usize, usize, bool)) + Sync,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let chunks = |t: usize| tiles(t).div_ceil(CHUNK_TILES).max(1);
    let chunk = |t: usize, c: usize| {
        let n = tiles(t);
        let j0 = (c * CHUNK_TILES).min(n);
        run(t, (j0, (j0 + CHUNK_TILES).min(n), c + 1 == chunks(t)))
    };
    let workers = crate::par::threads().min(tasks);
    if workers <= 1 || tasks > MAX_BALANCED {
        let whole = |t: usize| run(t, (0, tiles(t), true));
        return match tasks {
            1 => whole(0),
            _ => crate::par::for_each(tasks, whole),
        };
    }
    // Per task, the chunks not yet claimed: `front` in the low half, `back` in the high one;
    // each on its own pair of cache lines, so that a thread claiming its own task's chunks
    // keeps the line (packed eight to a line, every claim had moved it between the threads:
    // under `perf`, 2% of `mini`'s decode samples waited on that load). Only the first
    // `tasks` are written.
    #[repr(align(128))]
    struct Claims(AtomicU64);
    let mut slots = [const { std::mem::MaybeUninit::<Claims>::uninit() }; MAX_BALANCED];
    for (t, slot) in slots.iter_mut().enumerate().take(tasks) {
        slot.write(Claims(AtomicU64::new((chunks(t) as u64) << 32)));
    }
    // SAFETY: the first `tasks` slots (`tasks <= MAX_BALANCED`) were written just above.
    let state = unsafe { std::slice::from_raw_parts(slots.as_ptr().cast::<Claims>(), tasks) };
    let claim = |t: usize, front: bool| -> Option<usize> {
        let st = &state[t].0;
        let mut cur = st.load(Ordering::Relaxed);
        loop {
            let (f, b) = (cur & 0xffff_ffff, cur >> 32);
            if f >= b {
                return None;
            }
            let (next, c) = if front {
                (cur + 1, f)
            } else {
                (cur - (1 << 32), b - 1)
            };
            match st.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(c as usize),
                Err(now) => cur = now,
            }
        }
    };
    crate::par::for_each(workers, |w| {
        let mut t = w;
        while t < tasks {
            while let Some(c) = claim(t, true) {
                chunk(t, c);
            }
            t += workers;
        }
        for t in 0..tasks {
            while let Some(c) = claim(t, false) {
                chunk(t, c);
            }
        }
    });
}

/// One product `y = x · Wᵀ` (one `x` row, `W` of `n × k`) split as `plan` says: `matmul`'s
/// decode path for a single large product, the same tasks as a group of one.
///
/// # Safety
/// `x`, `w` and `y` hold `k`, `n·k` and `n` elements; the CPU has AVX2, FMA (and F16C for
/// f16).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn one_product<L: super::x86::Load>(
    x: &[f32],
    w: &[L::E],
    y: &mut [f32],
    k: usize,
    n: usize,
    plan: StreamPlan,
) {
    let job = [Job {
        x: x.as_ptr(),
        w: w.as_ptr(),
        y: y.as_mut_ptr(),
        k,
        n,
    }];
    let g = Group {
        first: 0,
        len: 1,
        rows: n,
        k,
        plan: Some(plan),
        base: 0,
    };
    balanced(
        plan.tasks,
        |task| tiles_of(g, plan, task),
        // SAFETY: as this function's.
        |task, range| unsafe { stream_task::<L>(&job, &[0], g, plan, task, range) },
    );
}

/// Tiles `j0..j1` of task `local` of group `g`'s [`StreamPlan`]: the task's rows in three
/// thirds, tile `j` taking row `j` of each; with `last`, also the 0–2 rows left over after the
/// thirds, one at a time. Compiled for AVX2, so that the row kernel is inlined into the loop.
///
/// # Safety
/// The CPU has AVX2, FMA (and F16C for f16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_task<L: super::x86::Load>(
    jobs: &[Job<L::E>],
    list: &[usize],
    g: Group,
    plan: StreamPlan,
    local: usize,
    (j0, j1, last): (usize, usize, bool),
) {
    let n_of = |pos: usize| jobs[list[pos]].n;
    let locate = |mut v: usize| {
        let mut pos = 0;
        while v >= n_of(pos) {
            v -= n_of(pos);
            pos += 1;
        }
        Cursor { pos, row: v }
    };
    // The next row of the group (past its end it stays on the last product's end, never read).
    let advance = |c: &mut Cursor| {
        c.row += 1;
        if c.row == n_of(c.pos) && c.pos + 1 < list.len() {
            c.pos += 1;
            c.row = 0;
        }
    };
    let k = g.k;
    let at = |c: Cursor| {
        let j = jobs[list[c.pos]];
        // SAFETY: `c.row < j.n`, so the row lies inside its W and its output inside its y.
        unsafe { (j.x, j.w.add(c.row * k), j.y.add(c.row)) }
    };
    let v0 = local * plan.rows;
    let v1 = (v0 + plan.rows).min(g.rows);
    let m = (v1 - v0) / 3;
    let d = STREAM_PREFETCH_ROWS;
    if j0 < j1 {
        let s = [v0 + j0, v0 + m + j0, v0 + 2 * m + j0];
        let mut cur = s.map(locate);
        let mut ahead = cur;
        if j0 + d < m {
            ahead = s.map(|v| locate(v + d));
        }
        for j in j0..j1 {
            let rows = cur.map(at);
            let pf = (j + d < m).then(|| ahead.map(|c| at(c).1 as *const u8));
            let xs = rows.map(|r| r.0);
            let ws = rows.map(|r| r.1);
            // SAFETY: each of the three rows holds `k` elements against an `x` of `k`; the CPU
            // has AVX2 and FMA (and F16C for f16: `dispatch` checked `simd_ok`); the prefetch
            // pointers are rows of the same group.
            let out = unsafe { x86::rows::<L, 3>(xs, ws, k, pf) };
            for (r, v) in rows.iter().zip(out) {
                // SAFETY: this output row is this task's only, written once.
                unsafe { *r.2 = v };
            }
            for c in &mut cur {
                advance(c);
            }
            if j + d + 1 < m {
                for c in &mut ahead {
                    advance(c);
                }
            }
        }
    }
    if !last || v0 + 3 * m == v1 {
        return;
    }
    let mut c = locate(v0 + 3 * m);
    for _ in v0 + 3 * m..v1 {
        let (x, w, y) = at(c);
        // SAFETY: as above, one row.
        let [v] = unsafe { x86::rows::<L, 1>([x], [w], k, None) };
        // SAFETY: as above.
        unsafe { *y = v };
        advance(&mut c);
    }
}

/// The AVX2 row kernel: `NR` independent rows, each against its own `x`.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::x86::{hsum, prefetch_line, Load};
    use std::arch::x86_64::*;

    /// `x_j · w_j` for `j < NR` (each `k` elements), each the canonical chain of the matrix
    /// tile (`super::super::x86::tile` with `x` rows of one), prefetching one line of each row
    /// at `pf` per 64 bytes of columns (non-temporal where
    /// [`crate::cpu::Features::nontemporal`] says so, else into L2). Where all the `x`s are one,
    /// it is loaded once a step.
    ///
    /// The column loop is compiled once per kind of prefetch, hint and `x` sharing and tests
    /// none of them. A first version of the streams' prefetch tested for it in every step: the
    /// decode product then streamed 68–69 GB/s in fast memory phases where a loop without the
    /// tests streamed 87–89 (the twelfth session's harness, the variants' order shuffled every
    /// round; slow phases 46–49 either way). Each step's instructions fill the reorder window
    /// that keeps the weight rows' loads in flight, and in a fast phase that window, not the
    /// memory, sets the pace.
    ///
    /// # Safety
    /// Every `xs[j]` and `ws[j]` holds `k` readable elements; the CPU has AVX2, FMA (and F16C
    /// for f16).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<L: Load, const NR: usize>(
        xs: [*const f32; NR],
        ws: [*const L::E; NR],
        k: usize,
        pf: Option<[*const u8; NR]>,
    ) -> [f32; NR] {
        let mut acc = [_mm256_setzero_ps(); NR];
        let k8 = k & !7;
        let shared = xs.iter().all(|&x| x == xs[0]);
        let nta = crate::cpu::features().nontemporal;
        let none = [std::ptr::null(); NR];
        let a = &mut acc;
        // Compiled once per kind of prefetch, hint and `x` sharing: no test in the loop (see
        // `super::super::x86::steps`).
        match (pf, nta, shared) {
            (None, _, true) => steps::<L, NR, 0, true>(a, xs, ws, k8, none),
            (None, _, false) => steps::<L, NR, 0, false>(a, xs, ws, k8, none),
            (Some(p), true, true) => steps::<L, NR, 1, true>(a, xs, ws, k8, p),
            (Some(p), true, false) => steps::<L, NR, 1, false>(a, xs, ws, k8, p),
            (Some(p), false, true) => steps::<L, NR, 2, true>(a, xs, ws, k8, p),
            (Some(p), false, false) => steps::<L, NR, 2, false>(a, xs, ws, k8, p),
        }
        if k8 < k {
            let m = k - k8;
            let mask = crate::activation::x86::mask(m);
            for j in 0..NR {
                let wv = L::load_tail(ws[j].add(k8), m);
                let xv = _mm256_maskload_ps(xs[j].add(k8), mask);
                acc[j] = _mm256_fmadd_ps(xv, wv, acc[j]);
            }
        }
        let mut out = [0f32; NR];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
        out
    }

    /// The whole 8-column steps `0..k8` of [`rows`]: `P` 0 no prefetch, 1 non-temporal, 2 into
    /// L2 (as `prefetch_line`); `SHARED`: every row's `x` is `xs[0]`.
    #[inline(always)]
    unsafe fn steps<L: Load, const NR: usize, const P: u8, const SHARED: bool>(
        acc: &mut [__m256; NR],
        xs: [*const f32; NR],
        ws: [*const L::E; NR],
        k8: usize,
        pf: [*const u8; NR],
    ) {
        let esz = std::mem::size_of::<L::E>();
        #[inline(always)]
        unsafe fn step<L: Load, const NR: usize, const SHARED: bool>(
            acc: &mut [__m256; NR],
            xs: [*const f32; NR],
            ws: [*const L::E; NR],
            i: usize,
        ) {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = L::load8(ws[j].add(i));
            }
            if SHARED {
                let xv = _mm256_loadu_ps(xs[0].add(i));
                for j in 0..NR {
                    acc[j] = _mm256_fmadd_ps(xv, wv[j], acc[j]);
                }
            } else {
                for j in 0..NR {
                    let xv = _mm256_loadu_ps(xs[j].add(i));
                    acc[j] = _mm256_fmadd_ps(xv, wv[j], acc[j]);
                }
            }
        }
        let mut i = 0;
        if P != 0 {
            // A line of each prefetched row, then the steps that cover 64 bytes of columns.
            let line = (64 / esz).max(8);
            while i + line <= k8 {
                for p in pf {
                    prefetch_line::<P>(p.wrapping_add(i * esz));
                }
                let end = i + line;
                while i < end {
                    step::<L, NR, SHARED>(acc, xs, ws, i);
                    i += 8;
                }
            }
        }
        while i < k8 {
            step::<L, NR, SHARED>(acc, xs, ws, i);
            i += 8;
        }
    }
}
