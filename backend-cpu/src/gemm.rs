//! Strided-batched GEMM on one of three single-threaded kernels: the crate's own ([`packed`],
//! x86-64 with AVX2 and FMA, with AVX-512 tiles where the CPU has AVX-512F, the default there;
//! `MAE_CPU_GEMM=packed-avx2` keeps it to AVX2), the `gemm` crate (the default elsewhere, or
//! `MAE_CPU_GEMM=gemm`) or `matrixmultiply::sgemm` (`MAE_CPU_GEMM=matrixmultiply`).
//!
//! Every kernel takes a row and a column stride per operand, so a stored transpose is only a
//! swap of the two strides: no operand is copied before the kernel packs it. The kernels run single-threaded; the
//! threads are the crate's [`crate::pool`], so GEMMs and the other ops share one set of threads
//! and never oversubscribe the cores. A batch of products (attention heads) runs one product per
//! task; a single big product is cut into bands of rows (or columns) of C, one per thread. The
//! `k` sum is never split, so every element of C is the same dot product, accumulated in the same
//! order, whatever the thread count or the scheduling (a unit test checks the split products
//! bitwise against unsplit ones).
//!
//! The crate's own kernel packs into per-thread buffers made on a thread's first product; the
//! two libraries allocate their packing buffers on each call (the `gemm` crate also a small
//! flags `Vec` for some shapes), the only allocations an op then makes.

#[cfg(target_arch = "x86_64")]
mod packed;

use core::ops::Range;
use mae::backend::Gemm;
use std::sync::OnceLock;

/// Reserves the calling thread's packing buffers for the crate's own kernel (address space,
/// untouched; nothing where the kernel does not exist): the pool's threads do it when they start,
/// so that their first product, in whichever step it comes, allocates nothing.
pub(crate) fn reserve_workspace() {
    #[cfg(target_arch = "x86_64")]
    packed::reserve_workspace();
}

/// Elements one operand spans over the whole batch: `(batch - 1) * stride + rows * cols`.
///
/// Checked, unlike [`Gemm::lens`]: a product that wrapped around could let the bounds assertion
/// pass while the kernel walks past the buffer, which would make safe callers able to cause UB.
fn span(batch: usize, stride: usize, rows: usize, cols: usize) -> Option<usize> {
    (batch - 1)
        .checked_mul(stride)?
        .checked_add(rows.checked_mul(cols)?)
}

/// A stride or offset as the `isize` matrixmultiply wants. Every value passed here is at most a
/// buffer length, and a `Vec<f32>` never holds more than `isize::MAX` bytes, so this cannot fail.
fn stride(x: usize) -> isize {
    isize::try_from(x).expect("gemm stride exceeds isize::MAX")
}

/// `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]`, see [`Gemm`]; for a single product,
/// followed by its epilogue when `bias` is given, tile by tile as the kernel finishes them:
/// `C[i][j] += bias[j]`, then `act = gelu(C)` when `act` is given (`Backend::gemm_bias` and
/// `Backend::gemm_bias_gelu`). B comes with its buffer's [`PackCache`] where it has one.
///
/// # Panics
/// If a buffer is shorter than the descriptor needs (or the needed length overflows `usize`).
/// `mae` checks lengths before calling, so this only fires on a bug; it is an `assert!`, not a
/// `debug_assert!`, because the unsafe kernel call below relies on it. Also if the epilogue is
/// asked of a batch, `bias` is shorter than `n`, `act` shorter than `m * n`, or `act` comes
/// without `bias`.
pub(crate) fn gemm(
    g: &Gemm,
    a: &[f32],
    (b, b_cache): (&[f32], Option<&PackCache>),
    c: &mut [f32],
    bias: Option<&[f32]>,
    act: Option<&mut [f32]>,
) {
    let (m, n, k) = (g.m, g.n, g.k);
    assert!(
        bias.is_some() || act.is_none(),
        "gemm: a GELU epilogue without a bias"
    );
    if let Some(bias) = bias {
        assert!(
            g.batch == 1 && bias.len() >= n,
            "gemm: an epilogue needs a single product and {n} bias values ({g:?}, {})",
            bias.len()
        );
    }
    if let Some(act) = &act {
        assert!(
            act.len() >= m * n,
            "gemm: act has {} of {} elements",
            act.len(),
            m * n
        );
    }
    let epilogue = Epilogue {
        bias: bias.map_or(core::ptr::null(), <[f32]>::as_ptr),
        act: act.map_or(core::ptr::null_mut(), <[f32]>::as_mut_ptr),
    };
    if g.batch == 0 || m == 0 || n == 0 {
        return; // C has no elements.
    }
    let need_a = span(g.batch, g.stride_a, m, k);
    let need_b = span(g.batch, g.stride_b, k, n);
    let need_c = span(g.batch, g.stride_c, m, n);
    assert!(
        need_a.is_some_and(|need| need <= a.len()),
        "gemm: A has {} elements, {g:?} needs {need_a:?}",
        a.len()
    );
    assert!(
        need_b.is_some_and(|need| need <= b.len()),
        "gemm: B has {} elements, {g:?} needs {need_b:?}",
        b.len()
    );
    assert!(
        need_c.is_some_and(|need| need <= c.len()),
        "gemm: C has {} elements, {g:?} needs {need_c:?}",
        c.len()
    );
    debug_assert!(
        g.batch == 1 || g.stride_c >= m * n,
        "gemm: C blocks of a batch overlap ({g:?})"
    );

    let [(rsa, csa), (rsb, csb)] = operand_strides(g);
    // Held until the product is done, so the panel cannot go while the tasks read it.
    let mut cache = match b_cache {
        Some(cache) if g.batch == 1 => cache.lock(),
        _ => None,
    };
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let panel = cache.as_mut().and_then(|c| c.panel(g, b, (rsb, csb)));
    let ptrs = Ptrs {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        epilogue,
    };
    // Captured whole (a closure would otherwise capture the non-`Sync` fields one by one).
    let ptrs = &ptrs;
    // The block of rows `rows` and columns `cols` of C[bi], computed by one single-threaded
    // kernel call.
    let block = |bi: usize, rows: Range<usize>, cols: Range<usize>| {
        // Cannot overflow: bi * stride <= (batch - 1) * stride <= need <= len (checked above), and
        // every offset below is at most the offset of an element of that item's operand.
        let oa = bi * g.stride_a + rows.start * rsa;
        let ob = bi * g.stride_b + cols.start * csb;
        let oc = bi * g.stride_c + rows.start * n + cols.start;
        let (mb, nb) = (rows.len(), cols.len());
        // SAFETY: the asserts above give `need_x <= x.len()` for each operand, where need_x is
        // computed without overflow. For batch item `bi`, the kernel reads A at offsets
        // `bi*stride_a + i*rsa + p*csa` for i < m, p < k; the largest is `bi*stride_a + m*k - 1`
        // in both layouts (`(m-1)*k + (k-1)` or `(k-1)*m + (m-1)`), which is below
        // `(batch-1)*stride_a + m*k = need_a <= a.len()`; a block reads the rows
        // `rows` (within 0..m) of that, so a subset. The same argument bounds B (k x n, columns
        // `cols` within 0..n) and C (m x n). When k == 0 no element of A or B is read and the
        // offsets are at most the lengths, so the pointers stay within or one past their
        // allocations, as `add` requires. C's strides (n, 1) with n >= 1 map distinct (i, j) to
        // distinct elements, as sgemm requires. C is borrowed mutably and A, B shared, so C
        // aliases neither. The strides fit `isize` (checked by `stride`). With beta == 0 sgemm
        // does not read C, so stale or NaN contents are fine (and C is initialized memory
        // anyway). Blocks run in parallel (below) write disjoint parts of C: disjoint row or
        // column ranges of one item, or items whose C blocks are disjoint because
        // `stride_c >= m*n` was checked.
        let (pa, pb, pc) = unsafe { (ptrs.a.add(oa), ptrs.b.add(ob), ptrs.c.add(oc)) };
        // SAFETY: an epilogue comes only with a single product (bi == 0, so oc < m * n), its
        // bias holding n values and its act m * n (asserted above).
        let epilogue = unsafe { ptrs.epilogue.at(cols.start, oc) };
        #[cfg(target_arch = "x86_64")]
        if let (Some(panel), Kernel::Packed(isa)) = (panel, kernel_choice()) {
            // SAFETY: as above for A and C; the panel is the packing of this product's whole B
            // (`PackedB::packs` checked its shape and strides), and a band of columns starts on
            // a multiple of 16, so on one of its strips. `kernel_choice` picks an `isa` that
            // runs here.
            unsafe {
                packed::gemm(
                    isa,
                    (mb, nb, k),
                    g.alpha,
                    packed::Operand {
                        ptr: pa,
                        rs: rsa,
                        cs: csa,
                    },
                    packed::BSource::Packed {
                        panel,
                        first_strip: cols.start / 16,
                    },
                    g.beta,
                    pc,
                    n,
                    epilogue,
                )
            };
            return;
        }
        // SAFETY: as above.
        unsafe {
            kernel(
                (mb, nb, k),
                g.alpha,
                (pa, rsa, csa),
                (pb, rsb, csb),
                g.beta,
                (pc, n),
                epilogue,
            )
        };
    };
    let threads = crate::pool::threads();
    let work = m * n * k.max(1);
    if threads == 1 || g.batch * work < SPLIT_WORK {
        (0..g.batch).for_each(|bi| block(bi, 0..m, 0..n));
    } else if g.batch > 1 && g.stride_c >= m * n {
        // A batch of products (attention heads): one product per task.
        crate::pool::for_each(g.batch, |bi| block(bi, 0..m, 0..n));
    } else {
        // One big product at a time, its rows (or columns, when wider than tall) split into
        // bands. Each element of C is still one dot product over k, accumulated in the same
        // order whatever band it falls in, so the result does not depend on the split.
        // Every band packs the whole of the operand that is not split, so cut the dimension
        // whose other operand is smaller (rows of C when B is the smaller), into one band per
        // thread.
        let split_rows = m >= n;
        let len = if split_rows { m } else { n };
        let band = len.div_ceil(threads).next_multiple_of(16);
        // A product too small to be worth splitting gets a single band.
        let band = if work < SPLIT_WORK { len } else { band };
        let bands = len.div_ceil(band);
        for bi in 0..g.batch {
            crate::pool::for_each(bands, |p| {
                let r = p * band..((p + 1) * band).min(len);
                if split_rows {
                    block(bi, r, 0..n)
                } else {
                    block(bi, 0..m, r)
                }
            });
        }
    }
}

/// A buffer's B operand packed once for many products ([`packed::PackedB`]), kept while the
/// buffer does not change.
///
/// Nothing says which buffers are constant (the weights while a model only runs forward), so
/// the cache learns it: the first product that reads the buffer as B notes the layout, a second
/// one in the same layout with no write in between packs the whole of B into a panel and keeps
/// it, and later ones read that panel. Any write (every mutable borrow of the buffer's floats)
/// drops both ([`PackCache::clear`]). In a training step every weight is written by AdamW and
/// read as B once in each of two layouts (`x W^T` forward, `dY W` backward), so training never
/// keeps a panel (and allocates nothing for one); an encoder that only embeds packs its weights
/// on its second call and never again. The panel costs as much memory as the buffer.
#[derive(Default)]
pub(crate) struct PackCache(std::sync::Mutex<PackState>);

#[derive(Default)]
pub(crate) struct PackState {
    /// The `(k, n, row stride, column stride)` of the last product that read the buffer as B.
    seen: Option<(usize, usize, usize, usize)>,
    #[cfg(target_arch = "x86_64")]
    panel: Option<packed::PackedB>,
}

impl PackCache {
    /// Forgets what was seen and packed: the buffer is about to change.
    pub(crate) fn clear(&mut self) {
        let state = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        if state.seen.is_some() {
            *state = PackState::default();
        }
    }

    /// The state, unless another thread is using it (that product then packs as usual).
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, PackState>> {
        match self.0.try_lock() {
            Ok(state) => Some(state),
            // The state is only a record of B's layout and a copy of B: still valid.
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl PackState {
    /// The packed panel of `b` (read as `g`'s B with strides `(rsb, csb)`) if it has one or this
    /// is the second product in a row to read it so; records the layout otherwise.
    #[cfg(target_arch = "x86_64")]
    fn panel(
        &mut self,
        g: &Gemm,
        b: &[f32],
        (rsb, csb): (usize, usize),
    ) -> Option<&packed::PackedB> {
        if !matches!(kernel_choice(), Kernel::Packed(_)) || g.k == 0 {
            return None;
        }
        let key = (g.k, g.n, rsb, csb);
        let operand = packed::Operand {
            ptr: b.as_ptr(),
            rs: rsb,
            cs: csb,
        };
        let fresh = !self
            .panel
            .as_ref()
            .is_some_and(|p| p.packs(g.k, g.n, operand));
        if fresh {
            if self.seen != Some(key) {
                self.seen = Some(key);
                return None;
            }
            // SAFETY: `gemm` checked that B holds the k x n elements these strides address;
            // the kernel is a packed one, so `available()` holds.
            self.panel = unsafe { packed::PackedB::pack(g.k, g.n, operand) };
        }
        self.panel.as_ref()
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn panel(&mut self, _: &Gemm, _: &[f32], _: (usize, usize)) -> Option<&Never> {
        None
    }
}

/// The panel type where there is no packed kernel: never made.
#[cfg(not(target_arch = "x86_64"))]
enum Never {}

/// The (row, column) strides of op(A) and op(B) of one batch item. op(A) is m x k: stored
/// m x k, row stride k and column stride 1; stored k x m (`trans_a`), element (i, p) sits at
/// p * m + i, so row stride 1 and column stride m. Likewise for B.
fn operand_strides(g: &Gemm) -> [(usize, usize); 2] {
    [
        if g.trans_a { (1, g.m) } else { (g.k, 1) },
        if g.trans_b { (1, g.k) } else { (g.n, 1) },
    ]
}

/// A strided read-only matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl MatRef<'_> {
    /// Whether every element lies inside `data` (the last one is the farthest).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.row_stride)
                .zip((self.cols - 1).checked_mul(self.col_stride))
                .and_then(|(r, c)| r.checked_add(c))
                .is_some_and(|last| last < self.data.len())
    }
}

/// `C = alpha * A * B + beta * C` on the calling thread, for strided views (C's columns
/// contiguous, `c_row_stride` apart; `beta == 0` never reads C). For ops that run many small
/// products inside their own parallel tasks (the fused attention).
///
/// # Panics
/// If the shapes disagree or a view reaches past its slice.
pub(crate) fn product(
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: &mut [f32],
    c_row_stride: usize,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "product: A is {m} x {k}, B has {} rows", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.fits() && b.fits(),
        "product: A or B reaches past its slice"
    );
    let c_view = MatRef {
        data: c,
        rows: m,
        cols: n,
        row_stride: c_row_stride,
        col_stride: 1,
    };
    assert!(
        c_view.fits() && (m == 1 || c_row_stride >= n),
        "product: C ({m} x {n}, row stride {c_row_stride}) reaches past its {} elements or \
         overlaps itself",
        c.len()
    );
    // SAFETY: `fits` checked that every element of A, B and C lies inside its slice; C's rows
    // (stride >= n) do not overlap, and C is borrowed mutably, so it aliases neither A nor B.
    unsafe {
        kernel(
            (m, n, k),
            alpha,
            (a.data.as_ptr(), a.row_stride, a.col_stride),
            (b.data.as_ptr(), b.row_stride, b.col_stride),
            beta,
            (c.as_mut_ptr(), c_row_stride),
            Epilogue::NONE,
        )
    }
}

/// One single-threaded product `C = alpha * A * B + beta * C` of an `m x k` A and a `k x n` B,
/// each given as (pointer, row stride, column stride), into C given as (pointer, row stride).
///
/// # Safety
/// Every element `(i, j)` of each operand, at `ptr + i * row_stride + j * col_stride`, must be
/// inside one allocation; C's elements must be distinct (row stride >= n when m > 1) and must
/// not overlap A or B; with `beta == 0` C is only written. With `k == 0` A and B are not read.
/// The epilogue's pointers are null or valid as [`Epilogue`] says, for this `m x n` block with
/// C's row stride.
unsafe fn kernel(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (pa, rsa, csa): (*const f32, usize, usize),
    (pb, rsb, csb): (*const f32, usize, usize),
    beta: f32,
    (pc, rsc): (*mut f32, usize),
    epilogue: Epilogue,
) {
    // SAFETY: the caller's contract.
    unsafe {
        kernel_with(
            kernel_choice(),
            (m, n, k),
            alpha,
            (pa, rsa, csa),
            (pb, rsb, csb),
            beta,
            (pc, rsc),
            epilogue,
        )
    }
}

/// [`kernel`] with the kernel named.
///
/// # Safety
/// As [`kernel`]; `Packed(isa)` only where `isa` runs.
unsafe fn kernel_with(
    choice: Kernel,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (pa, rsa, csa): (*const f32, usize, usize),
    (pb, rsb, csb): (*const f32, usize, usize),
    beta: f32,
    (pc, rsc): (*mut f32, usize),
    epilogue: Epilogue,
) {
    match choice {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Kernel::Packed(isa) => unsafe {
            packed::gemm(
                isa,
                (m, n, k),
                alpha,
                packed::Operand {
                    ptr: pa,
                    rs: rsa,
                    cs: csa,
                },
                packed::BSource::Strided(packed::Operand {
                    ptr: pb,
                    rs: rsb,
                    cs: csb,
                }),
                beta,
                pc,
                rsc,
                epilogue,
            )
        },
        // SAFETY: the caller's contract; gemm takes the same pointers and strides (column
        // stride first) and computes `dst = alpha_dst * dst + beta_prod * lhs rhs`, reading dst
        // only when `read_dst`.
        Kernel::Gemm => unsafe {
            gemm::gemm(
                m,
                n,
                k,
                pc,
                1,
                stride(rsc),
                beta != 0.0,
                pa,
                stride(csa),
                stride(rsa),
                pb,
                stride(csb),
                stride(rsb),
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        },
        // SAFETY: the caller's contract.
        Kernel::MatrixMultiply => unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha,
                pa,
                stride(rsa),
                stride(csa),
                pb,
                stride(rsb),
                stride(csb),
                beta,
                pc,
                stride(rsc),
                1,
            )
        },
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(choice, Kernel::Packed(_)) {
        return; // Its tiles took the epilogue as they were stored.
    }
    // SAFETY: the caller's contract on C and the epilogue.
    unsafe { epilogue.apply(m, n, pc, rsc) };
}

/// The single-threaded GEMM kernel every block goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// The crate's own ([`packed`]), on x86-64 with AVX2 and FMA, with AVX-512 tiles where the
    /// CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    Packed(packed::Isa),
    /// The `gemm` crate (sarah-quinones), with its AVX-512 kernels where the CPU has them.
    Gemm,
    /// `matrixmultiply`.
    MatrixMultiply,
}

/// The GEMM kernel this process uses: `"packed-avx512"` or `"packed-avx2"` (the crate's own),
/// `"gemm"` or `"matrixmultiply"`.
pub(crate) fn kernel_name() -> &'static str {
    match kernel_choice() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Packed(packed::Isa::Avx512) => "packed-avx512",
        #[cfg(target_arch = "x86_64")]
        Kernel::Packed(packed::Isa::Avx2) => "packed-avx2",
        Kernel::Gemm => "gemm",
        Kernel::MatrixMultiply => "matrixmultiply",
    }
}

/// `MAE_CPU_GEMM=gemm` or `=matrixmultiply` picks that crate, `=packed-avx2` the crate's own
/// kernel without its AVX-512 tiles (to compare them). Anything else (or nothing) picks the
/// crate's own kernel where the CPU has AVX2 and FMA (it measured fastest on this project's
/// shapes, docs/results.md), with AVX-512 tiles where it also has AVX-512F; else the `gemm`
/// crate.
fn kernel_choice() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let choice = std::env::var("MAE_CPU_GEMM");
        match choice.as_deref() {
            Ok("matrixmultiply") => return Kernel::MatrixMultiply,
            Ok("gemm") => return Kernel::Gemm,
            _ => {}
        }
        #[cfg(target_arch = "x86_64")]
        {
            let isa = match choice.as_deref() {
                Ok("packed-avx2") => packed::available().then_some(packed::Isa::Avx2),
                _ => packed::Isa::best(),
            };
            if let Some(isa) = isa {
                return Kernel::Packed(isa);
            }
        }
        Kernel::Gemm
    })
}

/// Products with fewer multiply-adds than this run on the calling thread: splitting them costs
/// more in waking threads and packing operands twice than it saves.
const SPLIT_WORK: usize = 1 << 17;

/// Every kernel this CPU runs, named (for the tests).
#[cfg(test)]
fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut kernels = vec![
        ("gemm", Kernel::Gemm),
        ("matrixmultiply", Kernel::MatrixMultiply),
    ];
    #[cfg(target_arch = "x86_64")]
    for (name, isa) in [
        ("packed-avx512", packed::Isa::Avx512),
        ("packed-avx2", packed::Isa::Avx2),
    ] {
        if isa.runs_here() {
            kernels.insert(0, (name, Kernel::Packed(isa)));
        }
    }
    kernels
}

/// The operand pointers, shared by the tasks of a parallel product.
struct Ptrs {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    epilogue: Epilogue,
}

/// A product's epilogue at one block of C: `bias` points at the block's first column's bias
/// (null: no epilogue), `act` at the block's first element of the GELU output, laid out as C
/// (null: no GELU).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue {
    pub(crate) bias: *const f32,
    pub(crate) act: *mut f32,
}

impl Epilogue {
    /// Nothing after the product.
    pub(crate) const NONE: Epilogue = Epilogue {
        bias: core::ptr::null(),
        act: core::ptr::null_mut(),
    };

    /// Moved to the block whose first column is `col` and first element `elem` (C's layout).
    ///
    /// # Safety
    /// Both offsets stay inside (or one past) the allocations the non-null pointers point into.
    pub(crate) unsafe fn at(self, col: usize, elem: usize) -> Epilogue {
        // SAFETY: the caller's contract; a null pointer is never offset.
        unsafe {
            Epilogue {
                bias: if self.bias.is_null() {
                    self.bias
                } else {
                    self.bias.add(col)
                },
                act: if self.act.is_null() {
                    self.act
                } else {
                    self.act.add(elem)
                },
            }
        }
    }

    /// The epilogue as a pass over an `m x n` block of C (row stride `rsc`) that a kernel left
    /// without it: per element one `f32` add of the column's bias, then the GELU of the row,
    /// the same operations the packed kernel applies in registers (bitwise the same results).
    ///
    /// # Safety
    /// The block's elements of C (and of `act`, same layout) are valid and distinct; the bias
    /// holds the block's `n` columns.
    pub(crate) unsafe fn apply(self, m: usize, n: usize, c: *mut f32, rsc: usize) {
        if self.bias.is_null() {
            return;
        }
        for i in 0..m {
            // SAFETY: the caller's contract: row i of the block, n elements from column 0.
            let (row, bias) = unsafe {
                (
                    core::slice::from_raw_parts_mut(c.add(i * rsc), n),
                    core::slice::from_raw_parts(self.bias, n),
                )
            };
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            if !self.act.is_null() {
                // SAFETY: as above, for act, which does not overlap C.
                let act = unsafe { core::slice::from_raw_parts_mut(self.act.add(i * rsc), n) };
                crate::fastmath::gelu_forward(row, act);
            }
        }
    }
}

/// `g`'s single product by one unsplit call of `kernel`, with the epilogue of `bias` (and
/// `act`) when given (for the tests).
#[cfg(test)]
fn single(
    kernel: Kernel,
    g: &Gemm,
    (a, b, c): (&[f32], &[f32], &mut [f32]),
    bias: Option<&[f32]>,
    act: Option<&mut [f32]>,
) {
    let (m, n, k) = (g.m, g.n, g.k);
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    assert!(bias.is_none_or(|x| x.len() >= n) && act.as_ref().is_none_or(|x| x.len() >= m * n));
    let epilogue = Epilogue {
        bias: bias.map_or(core::ptr::null(), <[f32]>::as_ptr),
        act: act.map_or(core::ptr::null_mut(), <[f32]>::as_mut_ptr),
    };
    let [(rsa, csa), (rsb, csb)] = operand_strides(g);
    // SAFETY: the buffers hold the m x k, k x n and m x n elements these strides address,
    // bias n and act m x n (asserted above); the callers pass only kernels that run here.
    unsafe {
        kernel_with(
            kernel,
            (m, n, k),
            g.alpha,
            (a.as_ptr(), rsa, csa),
            (b.as_ptr(), rsb, csb),
            g.beta,
            (c.as_mut_ptr(), n),
            epilogue,
        )
    };
}

// SAFETY: the tasks only read A and B, and write disjoint blocks of C (see `gemm`).
unsafe impl Sync for Ptrs {}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::{Backend, Gemm};

    /// The textbook triple loop over logical indices, reading the stored layouts directly.
    fn naive(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for bi in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0f64;
                    for p in 0..g.k {
                        let av = if g.trans_a {
                            a[bi * g.stride_a + p * g.m + i]
                        } else {
                            a[bi * g.stride_a + i * g.k + p]
                        };
                        let bv = if g.trans_b {
                            b[bi * g.stride_b + j * g.k + p]
                        } else {
                            b[bi * g.stride_b + p * g.n + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    let ci = bi * g.stride_c + i * g.n + j;
                    let old = if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta as f64 * c[ci] as f64
                    };
                    c[ci] = (g.alpha as f64 * s + old) as f32;
                }
            }
        }
    }

    fn run(g: &Gemm, a: &[f32], b: &[f32], c0: &[f32]) -> crate::CpuBuf {
        let be = be();
        let mut c = up(c0);
        be.gemm(g, &up(a), &up(b), &mut c).unwrap();
        c
    }

    // A = [[1, 2, 3], [4, 5, 6]] (2 x 3), B = [[1, 0], [0, 1], [1, 1]] (3 x 2).
    const A: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    const AT: [f32; 6] = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
    const B: [f32; 6] = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    const BT: [f32; 6] = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
    const AB: [f32; 4] = [4.0, 5.0, 10.0, 11.0];

    #[test]
    fn plain_2x3_by_3x2() {
        assert_eq!(run(&Gemm::new(2, 2, 3), &A, &B, &[0.0; 4]), AB);
    }

    #[test]
    fn trans_a_reads_a_stored_k_by_m() {
        assert_eq!(run(&Gemm::new(2, 2, 3).trans_a(), &AT, &B, &[0.0; 4]), AB);
    }

    #[test]
    fn trans_b_reads_b_stored_n_by_k() {
        assert_eq!(run(&Gemm::new(2, 2, 3).trans_b(), &A, &BT, &[0.0; 4]), AB);
    }

    #[test]
    fn both_transposed() {
        let g = Gemm::new(2, 2, 3).trans_a().trans_b();
        assert_eq!(run(&g, &AT, &BT, &[0.0; 4]), AB);
    }

    #[test]
    fn non_square_outer_product_shape() {
        // 3 x 1 times 1 x 2, trans_a: A stored 1 x 3.
        let g = Gemm::new(3, 2, 1).trans_a();
        let c = run(&g, &[1.0, 2.0, 3.0], &[10.0, 20.0], &[0.0; 6]);
        assert_eq!(c, [10.0, 20.0, 20.0, 40.0, 30.0, 60.0]);
    }

    #[test]
    fn beta_zero_ignores_nan_in_c() {
        assert_eq!(run(&Gemm::new(2, 2, 3), &A, &B, &[f32::NAN; 4]), AB);
    }

    #[test]
    fn accumulate_twice_with_alpha() {
        let be = be();
        let g = Gemm::new(2, 2, 3).alpha(0.5).accumulate();
        let (a, b) = (up(&A), up(&B));
        let mut c = up(&[1.0; 4]);
        be.gemm(&g, &a, &b, &mut c).unwrap();
        be.gemm(&g, &a, &b, &mut c).unwrap();
        assert_eq!(c, [5.0, 6.0, 11.0, 12.0]); // 1 + 2 * 0.5 * AB
    }

    #[test]
    fn general_beta_scales_old_c() {
        let g = Gemm {
            beta: 2.0,
            ..Gemm::new(2, 2, 3)
        };
        assert_eq!(run(&g, &A, &B, &[1.0; 4]), [6.0, 7.0, 12.0, 13.0]);
    }

    #[test]
    fn batch_broadcasts_b_with_stride_zero() {
        // Two A matrices (the second is 2 * A), one shared B, C blocks padded to stride 5.
        let a2: Vec<f32> = A.iter().map(|x| x * 2.0).collect();
        let a = [&A[..], &a2[..]].concat();
        let g = Gemm::new(2, 2, 3).batched(2, 6, 0, 5);
        let c = run(&g, &a, &B, &[-1.0; 9]);
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0, -1.0, 8.0, 10.0, 20.0, 22.0]);
    }

    #[test]
    fn batch_broadcasts_a_with_stride_zero() {
        let b3: Vec<f32> = B.iter().map(|x| x * 3.0).collect();
        let b = [&B[..], &b3[..]].concat();
        let g = Gemm::new(2, 2, 3).batched(2, 0, 6, 4);
        let c = run(&g, &A, &b, &[0.0; 8]);
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0, 12.0, 15.0, 30.0, 33.0]);
    }

    /// `g` with every combination of the transpose flags, with `alpha` and a `beta` of 0 (C
    /// not read) and 1 (accumulate).
    fn every_layout(g: Gemm, alpha: f32) -> Vec<Gemm> {
        let mut all = Vec::new();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for beta in [0.0, 1.0] {
                all.push(Gemm {
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                    ..g
                });
            }
        }
        all
    }

    /// Deterministic A and B values for `batch` products, spread over about `+-scale`.
    fn operands(
        batch: usize,
        (m, n, k): (usize, usize, usize),
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let a = (0..batch * m * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 506.0 * scale)
            .collect();
        let b = (0..batch * k * n)
            .map(|i| ((i * 104_729 % 2027) as f32 - 1013.0) / 1013.0 * scale)
            .collect();
        (a, b)
    }

    #[test]
    fn matches_naive_loop_for_every_flag_combination() {
        // The second shape has partial register tiles in both directions and k in two packed
        // blocks (of 300). The values are multiples of 1/4 and 1/8, so every sum is exact in f32
        // and only alpha and beta round.
        for (m, n, k, batch) in [(5, 7, 9, 3), (13, 35, 600, 2)] {
            let a: Vec<f32> = (0..batch * m * k)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let b: Vec<f32> = (0..batch * k * n)
                .map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0)
                .collect();
            let c0: Vec<f32> = (0..batch * m * n).map(|i| (i % 3) as f32).collect();
            for g in every_layout(Gemm::new(m, n, k).batched(batch, m * k, k * n, m * n), 0.75) {
                let mut expect = c0.clone();
                naive(&g, &a, &b, &mut expect);
                assert_close(&run(&g, &a, &b, &c0), &expect, 1e-6);
            }
        }
    }

    /// One unsplit single-threaded kernel call per batch item (the kernel the backend uses):
    /// the reference the split and parallel paths must reproduce bitwise.
    fn unsplit(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for bi in 0..g.batch {
            let (oa, ob, oc) = (bi * g.stride_a, bi * g.stride_b, bi * g.stride_c);
            let (a, b, c) = (&a[oa..], &b[ob..], &mut c[oc..oc + g.m * g.n]);
            super::single(super::kernel_choice(), g, (a, b, c), None, None);
        }
    }

    /// `c[i][j] += bias[j]` (one f32 add each), then `act = gelu(c)`: the composed ops the
    /// epilogue replaces.
    fn bias_then_gelu(c: &mut [f32], bias: &[f32]) -> Vec<f32> {
        for row in c.chunks_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        let mut act = vec![0.0; c.len()];
        crate::fastmath::gelu_forward(c, &mut act);
        act
    }

    #[test]
    fn epilogue_is_bitwise_the_product_then_bias_then_gelu() {
        // Edge tiles with k past one packed block, products split into row and column bands,
        // and an empty sum; every transpose flag, overwriting and accumulating.
        for (m, n, k) in [(13, 35, 600), (301, 77, 300), (45, 410, 97), (4, 5, 0)] {
            let (a, b) = operands(1, (m, n, k), 0.25);
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.3 - 0.9).collect();
            for g in every_layout(Gemm::new(m, n, k), 0.5) {
                // Through the backend's threaded path, with the kernel this CPU uses.
                let mut want = run(&g, &a, &b, &c0);
                let want_act = bias_then_gelu(&mut want, &bias);
                let mut pre = c0.clone();
                let mut act = vec![f32::NAN; m * n];
                super::gemm(&g, &a, (&b, None), &mut pre, Some(&bias), Some(&mut act));
                assert!(
                    *pre == *want && act == want_act,
                    "{g:?}: bias + GELU epilogue"
                );
                let mut pre = c0.clone();
                super::gemm(&g, &a, (&b, None), &mut pre, Some(&bias), None);
                assert!(*pre == *want, "{g:?}: bias epilogue");
                // Each kernel unsplit, against the same kernel without the epilogue.
                for (name, kernel) in super::kernels() {
                    let mut c = [c0.clone(), c0.clone()];
                    let mut act = vec![f32::NAN; m * n];
                    let [plain, fused] = &mut c;
                    super::single(kernel, &g, (&a, &b, plain), None, None);
                    super::single(kernel, &g, (&a, &b, fused), Some(&bias), Some(&mut act));
                    let [mut want, got] = c;
                    let want_act = bias_then_gelu(&mut want, &bias);
                    assert!(got == want && act == want_act, "{name} {g:?}: epilogue");
                }
            }
        }
    }

    /// The AVX-512 tiles compute every element as the AVX2 tiles do (the same FMA chain, the
    /// same rounding in the store and the epilogue), so the two kernels give the same bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_tiles_give_the_bits_of_the_avx2_tiles() {
        use super::packed::Isa;
        if !(Isa::Avx2.runs_here() && Isa::Avx512.runs_here()) {
            println!("SKIP avx512_tiles_give_the_bits_of_the_avx2_tiles: no AVX-512F here");
            return;
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // Last tiles of every kind: 1 to 8 columns (the 6 x 8 kernel), one to four 16-column
        // strips, full 64-column tiles and a block of 128 with a tail; rows that fill the
        // 6-row strips or not; k in one block or three; an empty sum.
        for (m, n, k) in [
            (7, 1, 5),
            (13, 9, 40),
            (6, 24, 3),
            (11, 40, 600),
            (17, 57, 1100),
            (25, 64, 33),
            (6, 65, 70),
            (19, 131, 17),
            (9, 200, 300),
            (5, 33, 0),
        ] {
            let (a, b) = operands(1, (m, n, k), 0.25);
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.3 - 0.9).collect();
            // A beta that rounds too (0.3 C is not exact), so that its multiply-add counts.
            let layouts = every_layout(Gemm::new(m, n, k), 0.7);
            let rounding = layouts.iter().map(|g| Gemm { beta: 0.3, ..*g });
            for g in layouts.clone().into_iter().chain(rounding) {
                for (with_bias, with_gelu) in [(false, false), (true, false), (true, true)] {
                    let [avx2, avx512] = [Isa::Avx2, Isa::Avx512].map(|isa| {
                        let (mut c, mut act) = (c0.clone(), vec![f32::NAN; m * n]);
                        super::single(
                            super::Kernel::Packed(isa),
                            &g,
                            (&a, &b, &mut c),
                            with_bias.then_some(&bias[..]),
                            with_gelu.then_some(&mut act[..]),
                        );
                        (bits(&c), bits(&act))
                    });
                    assert!(
                        avx2 == avx512,
                        "{g:?}, bias {with_bias}, GELU {with_gelu}: AVX-512 tiles differ"
                    );
                }
            }
        }
    }

    #[test]
    fn split_and_batched_products_are_bitwise_the_unsplit_ones() {
        // Big enough to be split into bands (rows when tall, columns when wide) and batches of
        // products run in parallel, with every transpose flag and an accumulating beta.
        for (m, n, k, batch) in [(301, 77, 300, 1), (45, 410, 97, 1), (70, 70, 40, 9)] {
            let (a, b) = operands(batch, (m, n, k), 5.0);
            let c0: Vec<f32> = (0..batch * m * n).map(|i| (i % 13) as f32 * 0.1).collect();
            for g in every_layout(Gemm::new(m, n, k).batched(batch, m * k, k * n, m * n), 0.5) {
                let mut want = c0.clone();
                unsplit(&g, &a, &b, &mut want);
                let got = run(&g, &a, &b, &c0);
                assert!(
                    got == want,
                    "{g:?}: split result differs from the unsplit one"
                );
            }
        }
    }

    /// Whether `b`'s cache holds a packed panel.
    fn has_panel(b: &crate::CpuBuf) -> bool {
        #[cfg(target_arch = "x86_64")]
        return b.packed.0.lock().unwrap().panel.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Whether this process multiplies with the packed kernel, the one that keeps panels.
    fn packs() -> bool {
        matches!(super::kernel_choice(), super::Kernel::Packed(_))
    }

    #[test]
    fn a_b_read_unchanged_is_packed_once_and_gives_the_same_bits() {
        // Row bands (tall C), column bands (wide C: the second band starts on strip 7, and the
        // panel's strips are packed in groups of eight with a short last one), `k` in three
        // packed blocks (367, 367, 366) or one, `n` not a multiple of 16, every transpose flag.
        for (m, n, k) in [(301, 77, 1100), (45, 410, 297)] {
            let (a, b) = operands(1, (m, n, k), 5.0);
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32 * 0.1).collect();
            for g in every_layout(Gemm::new(m, n, k), 0.5) {
                // Fresh buffers every time: never a panel.
                let want = run(&g, &a, &b, &c0);
                let (be, a, b) = (be(), up(&a), up(&b));
                for call in 0..3 {
                    let mut c = up(&c0);
                    be.gemm(&g, &a, &b, &mut c).unwrap();
                    assert!(
                        c == want,
                        "{g:?}, call {call}: differs from the unpacked product"
                    );
                    // The first call notes B's layout, the second packs it, the third reads
                    // the panel.
                    assert_eq!(has_panel(&b), call > 0 && packs(), "{g:?}, call {call}");
                }
            }
        }
    }

    #[test]
    fn a_write_to_b_or_another_layout_drops_the_panel() {
        let (m, n, k) = (64, 48, 40);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut host: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let (be, a_buf, mut b) = (be(), up(&a), up(&host));
        let g = Gemm::new(m, n, k);
        let product = |b: &crate::CpuBuf| {
            let mut c = up(&vec![0.0; m * n]);
            be.gemm(&g, &a_buf, b, &mut c).unwrap();
            c
        };
        product(&b);
        product(&b);
        assert_eq!(has_panel(&b), packs());
        // A write through the buffer's floats: the next product must see it.
        b[3] = 100.0;
        host[3] = 100.0;
        assert!(!has_panel(&b));
        for _ in 0..3 {
            assert!(product(&b) == run(&g, &a, &host, &vec![0.0; m * n]));
        }
        // The same floats read as a stored transpose (`n x k`): a different packing, not the
        // panel of the other layout.
        let gt = Gemm::new(m, k, n).trans_b();
        let at: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
        let at_buf = up(&at);
        for _ in 0..3 {
            let mut c = up(&vec![0.0; m * k]);
            be.gemm(&gt, &at_buf, &b, &mut c).unwrap();
            assert!(c == run(&gt, &at, &host, &vec![0.0; m * k]));
        }
        // A clone shares no panel.
        assert!(!has_panel(&b.clone()));
    }

    #[test]
    fn product_reads_strided_views_like_the_naive_loop() {
        // q and k of one head inside a [tokens, 3 * dim] qkv row layout, and C with padded rows:
        // S = 0.5 * q k^T, then S += q k^T, checked element by element.
        use super::{product, MatRef};
        let (tokens, dim, hd, off) = (7, 12, 4, 4);
        let qkv: Vec<f32> = (0..tokens * 3 * dim)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 8.0)
            .collect();
        let q = MatRef {
            data: &qkv[off..],
            rows: tokens,
            cols: hd,
            row_stride: 3 * dim,
            col_stride: 1,
        };
        // k^T: element (p, j) is k[j][p].
        let kt = MatRef {
            data: &qkv[dim + off..],
            rows: hd,
            cols: tokens,
            row_stride: 1,
            col_stride: 3 * dim,
        };
        let ldc = tokens + 3;
        let mut c = vec![f32::NAN; (tokens - 1) * ldc + tokens];
        product(0.5, q, kt, 0.0, &mut c, ldc);
        product(1.0, q, kt, 1.0, &mut c, ldc);
        for i in 0..tokens {
            for j in 0..tokens {
                let dot: f64 = (0..hd)
                    .map(|p| {
                        qkv[i * 3 * dim + off + p] as f64 * qkv[j * 3 * dim + dim + off + p] as f64
                    })
                    .sum();
                let got = c[i * ldc + j] as f64;
                assert!(
                    (got - 1.5 * dot).abs() < 1e-5,
                    "({i}, {j}): {got} vs {}",
                    1.5 * dot
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "reaches past")]
    fn product_refuses_a_view_past_its_slice() {
        use super::{product, MatRef};
        let a = MatRef {
            data: &A,
            rows: 2,
            cols: 3,
            row_stride: 4,
            col_stride: 1,
        };
        let b = MatRef {
            data: &B,
            rows: 3,
            cols: 2,
            row_stride: 2,
            col_stride: 1,
        };
        product(1.0, a, b, 0.0, &mut [0.0; 4], 2);
    }

    #[test]
    fn k_zero_scales_c_by_beta() {
        let g = Gemm::new(2, 2, 0);
        assert_eq!(run(&g, &[], &[], &[f32::NAN; 4]), [0.0; 4]);
        assert_eq!(run(&g.accumulate(), &[], &[], &[3.0; 4]), [3.0; 4]);
    }

    #[test]
    fn empty_output_touches_nothing() {
        assert_eq!(run(&Gemm::new(0, 2, 3), &[], &B, &[]), Vec::<f32>::new());
        let g = Gemm::new(2, 2, 3).batched(0, 6, 6, 4);
        assert_eq!(run(&g, &[], &[], &[]), Vec::<f32>::new());
    }

    #[test]
    #[should_panic(expected = "gemm: A has")]
    fn short_a_panics_instead_of_reading_past_it() {
        run(&Gemm::new(2, 2, 3), &A[..5], &B, &[0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "gemm: C has")]
    fn short_c_in_a_batch_panics() {
        run(&Gemm::new(2, 2, 3).batched(2, 0, 0, 4), &A, &B, &[0.0; 7]);
    }

    #[test]
    #[should_panic(expected = "gemm: A has")]
    fn overflowing_dimensions_panic_instead_of_wrapping() {
        let huge = 1usize << (usize::BITS / 2 + 1);
        run(&Gemm::new(huge, 1, huge), &A, &B, &[0.0; 4]);
    }
}

#[cfg(test)]
mod speed {
    use super::{kernels, single};
    use mae::backend::Gemm;

    /// Nanoseconds this thread has run on a CPU (Linux's schedstat): unlike wall time, it does
    /// not count the time other processes hold the core. Its clock advances in steps of
    /// milliseconds on some VMs, too coarse to see 2 % differences: with `GEMM_SPEED_WALL` set,
    /// wall time since the first call instead (for an idle machine).
    fn cpu_ns() -> f64 {
        if std::env::var_os("GEMM_SPEED_WALL").is_some() {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            return START
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_nanos() as f64;
        }
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        s.split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Single-threaded GFLOP/s of each kernel on the ViT-B/16 step's shapes (half of a batch-8
    /// token block, as one thread gets it) per second of this thread's CPU time, alternating
    /// kernels and keeping each one's best of several runs, so that a busy machine disturbs the
    /// comparison less. Timing only:
    /// `cargo test --release -p mae-backend-cpu -- --ignored --nocapture gemm_speed`.
    #[test]
    #[ignore]
    fn gemm_speed() {
        let kernels = kernels();
        // (m, n, k, B stored transposed): qkv / proj / fc1 / fc2 forward (x W^T), a weight
        // gradient (dY^T X: A stored transposed) and an input gradient (dY W).
        for (m, n, k, ta, tb) in [
            (788, 2304, 768, false, true),
            (788, 768, 768, false, true),
            (788, 3072, 768, false, true),
            (788, 768, 3072, false, true),
            (768, 768, 1576, true, false),
            (788, 768, 2304, false, false),
            // tiny32's fc2 (half of batch 64's 4,160 rows): a narrow C, so packing A weighs most.
            (2080, 192, 768, false, true),
            // small64's encoder in training (half of 544 rows per thread): fc1 and fc2
            // forward, fc1's weight gradient (k = 544 rows) and fc2's input gradient.
            (272, 1536, 384, false, true),
            (272, 384, 1536, false, true),
            (1536, 384, 544, true, false),
            (272, 1536, 384, false, false),
            // Its decoder (half of 2,080 rows): fc1 forward.
            (1040, 1024, 256, false, true),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut c = vec![0.0f32; m * n];
            let g = Gemm {
                trans_a: ta,
                trans_b: tb,
                ..Gemm::new(m, n, k)
            };
            let mut best = vec![f64::INFINITY; kernels.len()];
            // Each sample repeats the product 8 times: the clock behind schedstat advances in
            // steps of milliseconds on this VM, as long as one product takes.
            const REPEAT: usize = 8;
            for _ in 0..5 {
                for (t, &(_, kernel)) in best.iter_mut().zip(&kernels) {
                    let start = cpu_ns();
                    for _ in 0..REPEAT {
                        single(kernel, &g, (&a, &b, &mut c), None, None);
                    }
                    *t = t.min((cpu_ns() - start) * 1e-9 / REPEAT as f64);
                }
            }
            let rates: Vec<String> = kernels
                .iter()
                .zip(&best)
                .map(|((name, _), t)| format!("{name} {:.1}", 2.0 * (m * n * k) as f64 / t / 1e9))
                .collect();
            println!("{m}x{n}x{k} ta={ta} tb={tb}: GFLOP/s {}", rates.join(", "));
        }
    }
}
