//! A weight matrix `[N, K]` (PyTorch Linear layout) kept in its stored dtype.

use half::{bf16, f16};
use kl_kernels::matmul::{gemv_many, matmul, matmul_f32_activations, OneRowJobs};
use kl_weights::{Checkpoint, Dtype, Tensor, WeightsError};

#[derive(Clone)]
enum Store {
    /// Zero-copy view into the checkpoint mmap.
    Mapped(Tensor),
    /// Owned bf16 (load-time re-layouts of bf16 weights).
    Bf16(Vec<bf16>),
    /// Owned f16.
    F16(Vec<f16>),
    /// Owned f32.
    F32(Vec<f32>),
}

/// A borrowed view of the elements, by dtype.
#[derive(Clone, Copy)]
pub enum MatView<'a> {
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
    /// f32 elements.
    F32(&'a [f32]),
}

/// One product of [`Linear::forward_many`]: the matrix, its `x` and its `y`.
type Job<'l, 'x, 'y> = (&'l Linear, &'x [f32], &'y mut [f32]);

/// Products of one `x` row each, by index, for [`Linear::forward_one_row`]: a layer's decode
/// products named without building a list (the chosen experts' matrices, say).
pub trait RowJobs {
    /// How many products.
    fn count(&self) -> usize;
    /// Product `i` (`i < count()`): the matrix, its `x` (one row, `K` values) and its `y`
    /// (`N` values).
    fn job(&mut self, i: usize) -> (&Linear, &[f32], &mut [f32]);
}

impl RowJobs for [Job<'_, '_, '_>] {
    fn count(&self) -> usize {
        self.len()
    }
    fn job(&mut self, i: usize) -> (&Linear, &[f32], &mut [f32]) {
        let (l, x, y) = &mut self[i];
        (l, x, y)
    }
}

/// The element types a [`Linear`] stores, read back as slices of themselves.
trait StoredAs: kl_kernels::Elem {
    /// `v`'s elements, if they are stored as `Self`.
    fn of(v: MatView<'_>) -> Option<&[Self]>;
}

impl StoredAs for bf16 {
    fn of(v: MatView<'_>) -> Option<&[bf16]> {
        match v {
            MatView::Bf16(w) => Some(w),
            _ => None,
        }
    }
}
impl StoredAs for f16 {
    fn of(v: MatView<'_>) -> Option<&[f16]> {
        match v {
            MatView::F16(w) => Some(w),
            _ => None,
        }
    }
}
impl StoredAs for f32 {
    fn of(v: MatView<'_>) -> Option<&[f32]> {
        match v {
            MatView::F32(w) => Some(w),
            _ => None,
        }
    }
}

/// [`RowJobs`] whose matrices are all stored as `W`, as the kernel's [`OneRowJobs`] reads them.
struct Typed<'j, J: ?Sized, W>(&'j mut J, std::marker::PhantomData<W>);

impl<J: RowJobs + ?Sized, W: StoredAs> OneRowJobs<W> for Typed<'_, J, W> {
    fn count(&self) -> usize {
        self.0.count()
    }
    fn job(&mut self, i: usize) -> (&[f32], &[W], &mut [f32]) {
        let (l, x, y) = self.0.job(i);
        let w = W::of(l.view()).expect("forward_one_row checked every product's dtype");
        (x, w, y)
    }
}

/// A weight matrix of `rows × cols`, computing `y = x · Wᵀ`.
#[derive(Clone)]
pub struct Linear {
    rows: usize,
    cols: usize,
    store: Store,
    /// Keep this product's activations in f32 under `--bf16-activations` (see
    /// [`Linear::with_f32_activations`]).
    f32_activations: bool,
}

impl Linear {
    /// Bind checkpoint tensor `name`, requiring `rows × cols` elements (any leading shape that
    /// flattens to it, e.g. conv `[P,1,W]`).
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Self, WeightsError> {
        let t = ckpt.get(name)?;
        if t.numel() != rows * cols {
            return Err(WeightsError::ShapeMismatch {
                tensor: name.to_string(),
                path: t.file().to_path_buf(),
                expected: vec![rows, cols],
                found: t.shape().to_vec(),
            });
        }
        Ok(Linear {
            rows,
            cols,
            store: Store::Mapped(t.clone()),
            f32_activations: false,
        })
    }

    /// Build from owned data in `like`'s dtype: `f(row, col)` gives element values as f32,
    /// narrowed back to the dtype (exact when the values came from that dtype).
    pub fn from_fn(like: Dtype, rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Self {
        let it = (0..rows * cols).map(|i| f(i / cols, i % cols));
        let store = match like {
            Dtype::BF16 => Store::Bf16(it.map(bf16::from_f32).collect()),
            Dtype::F16 => Store::F16(it.map(f16::from_f32).collect()),
            Dtype::F32 => Store::F32(it.collect()),
        };
        Linear {
            rows,
            cols,
            store,
            f32_activations: false,
        }
    }

    /// This product keeps f32 activations even under `--bf16-activations`
    /// (`kl_kernels::bf16_activations`): for a product the reference computes in f32 (the MoE
    /// router).
    pub fn with_f32_activations(mut self) -> Self {
        self.f32_activations = true;
        self
    }

    /// Output features N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Stored dtype.
    pub fn dtype(&self) -> Dtype {
        match self.view() {
            MatView::Bf16(_) => Dtype::BF16,
            MatView::F16(_) => Dtype::F16,
            MatView::F32(_) => Dtype::F32,
        }
    }

    /// Bytes of weight data.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// The elements.
    pub fn view(&self) -> MatView<'_> {
        match &self.store {
            Store::Mapped(t) => match t.dtype() {
                Dtype::BF16 => MatView::Bf16(t.as_bf16().expect("bf16 tensor")),
                Dtype::F16 => MatView::F16(t.as_f16().expect("f16 tensor")),
                Dtype::F32 => MatView::F32(t.as_f32().expect("f32 tensor")),
            },
            Store::Bf16(v) => MatView::Bf16(v),
            Store::F16(v) => MatView::F16(v),
            Store::F32(v) => MatView::F32(v),
        }
    }

    /// Element (r, c) as f32.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let i = r * self.cols + c;
        match self.view() {
            MatView::Bf16(v) => v[i].to_f32(),
            MatView::F16(v) => v[i].to_f32(),
            MatView::F32(v) => v[i],
        }
    }

    /// Row `r` widened into `dst` (embedding lookup).
    pub fn row_f32(&self, r: usize, dst: &mut [f32]) {
        use kl_kernels::Elem;
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match self.view() {
            MatView::Bf16(w) => Elem::widen(&w[a..b], dst),
            MatView::F16(w) => Elem::widen(&w[a..b], dst),
            MatView::F32(w) => dst.copy_from_slice(&w[a..b]),
        }
    }

    /// All elements widened to f32 (for small matrices only: conv weights).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| self.get(i / self.cols, i % self.cols))
            .collect()
    }

    /// `y[T, N] = x[T, K] · Wᵀ`.
    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32]) {
        self.forward_rows(x, t, 0, self.rows, y)
    }

    /// `y[T, n] = x[T, K] · W[r0..r0+n]ᵀ`: a contiguous block of output rows.
    pub fn forward_rows(&self, x: &[f32], t: usize, r0: usize, n: usize, y: &mut [f32]) {
        let (k, a, b) = (self.cols, r0 * self.cols, (r0 + n) * self.cols);
        fn product<W: kl_kernels::Elem>(
            f32_act: bool,
            x: &[f32],
            w: &[W],
            y: &mut [f32],
            t: usize,
            k: usize,
            n: usize,
        ) {
            if f32_act {
                matmul_f32_activations(x, w, y, t, k, n)
            } else {
                matmul(x, w, y, t, k, n)
            }
        }
        let f = self.f32_activations;
        match self.view() {
            MatView::Bf16(w) => product(f, x, &w[a..b], y, t, k, n),
            MatView::F16(w) => product(f, x, &w[a..b], y, t, k, n),
            MatView::F32(w) => product(f, x, &w[a..b], y, t, k, n),
        }
    }

    /// This product's bf16 weights, when it can take `x0` rounded once for several products:
    /// bf16 weights, f32 activations not asked for, `x` that very `x0`, and `K` its width.
    fn shares_rounded(&self, x: &[f32], x0: &[f32], k: usize) -> Option<&[bf16]> {
        match self.view() {
            MatView::Bf16(w) if std::ptr::eq(x, x0) && !self.f32_activations && self.cols == k => {
                Some(w)
            }
            _ => None,
        }
    }

    /// Several independent products `y_i = x_i · W_iᵀ`, each of `t` rows, in one parallel
    /// region: a thread that finishes its share of one product helps with the others instead of
    /// waiting at a barrier after each. Results are those of [`Linear::forward`], bit for bit.
    ///
    /// Under `--bf16-activations`, products of one `x` that take the panel products round it to
    /// bf16 once for all of them (`kl_kernels::bf16_activations::with_rounded_rows`) instead of
    /// once each (a KDA layer's six products of its input, MLA's query and `kv_a`): the same
    /// bits.
    pub fn forward_many(t: usize, jobs: &mut [(&Linear, &[f32], &mut [f32])]) {
        Self::run_jobs(t, jobs, !kl_kernels::par::is_serial())
    }

    /// The products of [`Linear::forward_many`] one after the other (each parallel inside, as
    /// [`Linear::forward`] is), with the same shared rounding: for products whose order and
    /// regions should stay as separate calls would make them (a SwiGLU's gate and up).
    pub fn forward_each(t: usize, jobs: &mut [(&Linear, &[f32], &mut [f32])]) {
        Self::run_jobs(t, jobs, false)
    }

    /// Several products of one `x` row each (decode), in one parallel region whose weight
    /// rows are read as long streams across the matrices (`kl_kernels::matmul::gemv_many`):
    /// the bits of [`Linear::forward`] on each. Products of mixed dtypes run one after the other.
    ///
    /// # Panics
    /// If a product's `x` and `y` are not one row of its matrix's `K` and `N`, naming it.
    pub fn forward_one_row<J: RowJobs + ?Sized>(jobs: &mut J) {
        let n = jobs.count();
        // Every product's shape checked, and whether all share the first one's dtype.
        let (mut dtype, mut uniform) = (None, true);
        for i in 0..n {
            let (l, x, y) = jobs.job(i);
            assert!(
                x.len() == l.cols && y.len() == l.rows,
                "forward_one_row: product {i} has x of {} and y of {} values, expected one row: \
                 K = {}, N = {}",
                x.len(),
                y.len(),
                l.cols,
                l.rows
            );
            uniform &= *dtype.get_or_insert(l.dtype()) == l.dtype();
        }
        let Some(dtype) = dtype else {
            return;
        };
        if !uniform {
            for i in 0..n {
                let (l, x, y) = jobs.job(i);
                l.forward(x, 1, y);
            }
            return;
        }
        use std::marker::PhantomData;
        match dtype {
            Dtype::BF16 => gemv_many(&mut Typed::<J, bf16>(jobs, PhantomData)),
            Dtype::F16 => gemv_many(&mut Typed::<J, f16>(jobs, PhantomData)),
            Dtype::F32 => gemv_many(&mut Typed::<J, f32>(jobs, PhantomData)),
        }
    }

    /// [`Linear::forward_many`] (`parallel`) or [`Linear::forward_each`]; one row outside
    /// `par::serial` through [`Linear::forward_one_row`] either way (the same bits).
    fn run_jobs(t: usize, jobs: &mut [Job<'_, '_, '_>], parallel: bool) {
        use rayon::prelude::*;
        if t == 1 && !kl_kernels::par::is_serial() {
            return Self::forward_one_row(jobs);
        }
        let Some(x0) = jobs.first().map(|j| j.1) else {
            return;
        };
        let k = x0.len() / t.max(1);
        let sharing = jobs
            .iter()
            .filter(|(l, x, _)| l.shares_rounded(x, x0, k).is_some())
            .count();
        let mut run = |one: &(dyn Fn(&mut Job<'_, '_, '_>) + Sync)| {
            if parallel {
                jobs.par_iter_mut().for_each(one);
            } else {
                jobs.iter_mut().for_each(one);
            }
        };
        if sharing >= 2 && kl_kernels::matmul::rounds_rows(t, k) {
            kl_kernels::bf16_activations::with_rounded_rows(x0, t, k, |xr| {
                run(&|(l, x, y)| match l.shares_rounded(x, x0, k) {
                    Some(w) => kl_kernels::matmul::matmul_rounded(xr, w, y, l.rows),
                    None => l.forward(x, t, y),
                })
            });
        } else {
            run(&|(l, x, y)| l.forward(x, t, y));
        }
    }

    /// `x · Wᵀ` into a buffer taken from `scratch` (give it back when done).
    pub fn apply_in(&self, x: &[f32], t: usize, scratch: &mut crate::Scratch) -> Vec<f32> {
        let mut y = scratch.take_for_write(t * self.rows);
        self.forward(x, t, &mut y);
        y
    }

    /// Convenience: allocate and return `x · Wᵀ`.
    pub fn apply(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * self.rows];
        self.forward(x, t, &mut y);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(dtype: Dtype, n: usize, k: usize, seed: usize) -> Linear {
        Linear::from_fn(dtype, n, k, move |r, c| {
            (((r * 31 + c * 17 + seed) * 2654435761usize % 4099) as f32 / 4099.0) - 0.5
        })
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|a| a.to_bits()).collect()
    }

    /// One-row products in one region (long enough for the kernel's streams, 7 MB of bf16
    /// rows, and in a list of mixed dtypes, which runs them one by one) keep the bits of each
    /// product's own `forward`, through `forward_one_row` and through `forward_many`.
    #[test]
    fn one_row_products_keep_each_products_bits() {
        let k = 1001;
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        let x2: Vec<f32> = x.iter().map(|v| v * 0.75 + 0.01).collect();
        let uniform: Vec<Linear> = (0..6).map(|i| lin(Dtype::BF16, 600 + i, k, i)).collect();
        let mixed = vec![
            lin(Dtype::BF16, 70, k, 1),
            lin(Dtype::F32, 40, k, 2),
            lin(Dtype::F16, 33, k, 3),
        ];
        for (ls, many) in [(&uniform, false), (&uniform, true), (&mixed, false)] {
            let xs: Vec<&[f32]> = (0..ls.len())
                .map(|i| if i % 3 == 2 { &x2[..] } else { &x[..] })
                .collect();
            let want: Vec<Vec<f32>> = ls.iter().zip(&xs).map(|(l, x)| l.apply(x, 1)).collect();
            let mut ys: Vec<Vec<f32>> = ls.iter().map(|l| vec![f32::NAN; l.rows()]).collect();
            let mut jobs: Vec<Job<'_, '_, '_>> = ls
                .iter()
                .zip(&xs)
                .zip(ys.iter_mut())
                .map(|((l, x), y)| (l, *x, &mut y[..]))
                .collect();
            if many {
                Linear::forward_many(1, &mut jobs);
            } else {
                Linear::forward_one_row(&mut jobs[..]);
            }
            drop(jobs);
            for (i, (a, b)) in ys.iter().zip(&want).enumerate() {
                assert_eq!(bits(a), bits(b), "product {i} of {}", ls.len());
            }
        }
    }

    /// A product whose `x` is not one row of its matrix is refused, naming it.
    #[test]
    #[should_panic(expected = "product 1 has x of 8 and y of 3 values, expected one row: K = 4")]
    fn one_row_products_name_a_wrong_shape() {
        let (a, b) = (lin(Dtype::BF16, 3, 4, 0), lin(Dtype::BF16, 3, 4, 1));
        let (x, x8) = ([1f32; 4], [1f32; 8]);
        let (mut y0, mut y1) = ([0f32; 3], [0f32; 3]);
        let mut jobs: [Job<'_, '_, '_>; 2] = [(&a, &x, &mut y0), (&b, &x8, &mut y1)];
        Linear::forward_one_row(&mut jobs[..]);
    }
}
