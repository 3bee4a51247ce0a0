//! The compute backend: the only thing a CPU, CUDA or wgpu implementation provides.
//!
//! # Contract
//! - Buffers are opaque, owned device allocations of `f32` (`Buf`) or `u32` (`Idx`), row-major
//!   and contiguous. They cross to the host only through [`Backend::upload`], [`Backend::write`]
//!   and [`Backend::download`]; no op reads back to the host, so a GPU backend queues work freely.
//! - Outputs are allocated by the caller (`mae`), once per configuration and batch size, and ops
//!   write into them. Rust's borrows rule out aliasing: an output is a `&mut` that no input shares.
//! - Each op says whether it **overwrites** its output or **accumulates** (`+=`) into it. Backward
//!   ops accumulate into every gradient they produce, so several consumers of one value (a
//!   residual branch, a shared token) add up without extra passes; gradients are zeroed once
//!   per step, by [`Backend::adamw_many`] after the update. Where the model would zero a
//!   scratch gradient just to accumulate into it once, the op takes `accumulate: false` instead
//!   ([`Backend::gelu_backward`]).
//! - A buffer from [`Backend::alloc_operand`] may hold its values at the precision of the
//!   backend's GEMM operands (the CUDA bf16 mode stores bf16): the model uses it for
//!   activations that only GEMMs read.
//! - `mae` checks every length before calling an op (see the `*_lens` helpers of the descriptor
//!   types); backends may `debug_assert!` and otherwise trust the caller.
//! - Results are deterministic: no floating-point atomics, fixed reduction orders, so two runs of
//!   one step on one backend are bitwise identical.
//! - Errors may be deferred (a GPU reports a failed launch at the next sync); [`Backend::sync`] and
//!   [`Backend::download`] surface them.
//!
//! Signatures follow llm.c's kernel style (buffers, then dimensions), hence the argument counts.
#![allow(clippy::too_many_arguments)]

use alloc::string::String;
use core::fmt;

/// `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]` for `b` in `0..batch`, all row-major.
///
/// `op(A)` is `m x k`: stored `m x k` (leading dimension `k`), or `k x m` when `trans_a`.
/// `op(B)` is `k x n`: stored `k x n` (leading dimension `n`), or `n x k` when `trans_b`.
/// `C[b]` is `m x n`. Batch `b` starts at element `b * stride_*` of each buffer; a stride of 0
/// broadcasts A or B over the batch (C's stride must be at least `m * n` when `batch > 1`).
/// With `beta == 0` the old contents of C are ignored, even NaN; `beta == 1` accumulates.
///
/// ```
/// // A linear layer y = x W^T: x [rows, in], W [out, in].
/// let g = mae::backend::Gemm::new(8, 16, 32).trans_b();
/// assert_eq!(g.lens(), (8 * 32, 16 * 32, 8 * 16));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A single `m x k` by `k x n` product that overwrites C.
    pub fn new(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
    /// A is stored transposed (`k x m`).
    pub fn trans_a(self) -> Gemm {
        Gemm {
            trans_a: true,
            ..self
        }
    }
    /// B is stored transposed (`n x k`).
    pub fn trans_b(self) -> Gemm {
        Gemm {
            trans_b: true,
            ..self
        }
    }
    /// Accumulate into C (`beta = 1`).
    pub fn accumulate(self) -> Gemm {
        Gemm { beta: 1.0, ..self }
    }
    /// Scale the product by `alpha`.
    pub fn alpha(self, alpha: f32) -> Gemm {
        Gemm { alpha, ..self }
    }
    /// `batch` products with the given element strides (0 broadcasts an operand).
    pub fn batched(self, batch: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Gemm {
        Gemm {
            batch,
            stride_a,
            stride_b,
            stride_c,
            ..self
        }
    }
    /// Minimum lengths of A, B and C.
    pub fn lens(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        (
            last * self.stride_a + self.m * self.k,
            last * self.stride_b + self.k * self.n,
            last * self.stride_c + self.m * self.n,
        )
    }
}

/// Moves whole rows of `cols` floats: for `b < batch` and `i < count`, destination row
/// `b * dst_stride + dst_start + i` pairs with source row `b * src_stride + src_start + i * src_step`.
///
/// `src_step` is 0 (one source row repeated: a bias, a cls or mask token) or 1 (a block of rows:
/// a position table, a slice of another buffer); `src_stride` 0 shares the source over the batch.
/// Strides are in rows. Destination rows must be distinct.
///
/// ```
/// // Add a bias [cols] to every row of x [rows, cols].
/// let bias = mae::backend::RowMap::bias(100, 64);
/// assert_eq!(bias.lens(), (64, 6400));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMap {
    pub batch: usize,
    pub count: usize,
    pub cols: usize,
    pub src_stride: usize,
    pub src_start: usize,
    pub src_step: usize,
    pub dst_stride: usize,
    pub dst_start: usize,
}

impl RowMap {
    /// One source row onto each of `rows` destination rows.
    pub fn bias(rows: usize, cols: usize) -> RowMap {
        RowMap {
            batch: rows,
            count: 1,
            cols,
            src_stride: 0,
            src_start: 0,
            src_step: 0,
            dst_stride: 1,
            dst_start: 0,
        }
    }
    /// Source row index of pair `(b, i)`.
    pub fn src_row(&self, b: usize, i: usize) -> usize {
        b * self.src_stride + self.src_start + i * self.src_step
    }
    /// Destination row index of pair `(b, i)`.
    pub fn dst_row(&self, b: usize, i: usize) -> usize {
        b * self.dst_stride + self.dst_start + i
    }
    /// Minimum lengths (in floats) of the source and destination buffers.
    pub fn lens(&self) -> (usize, usize) {
        if self.batch == 0 || self.count == 0 {
            return (0, 0);
        }
        let (b, i) = (self.batch - 1, self.count - 1);
        (
            (self.src_row(b, i).max(self.src_row(b, 0)) + 1) * self.cols,
            (self.dst_row(b, i) + 1) * self.cols,
        )
    }
}

/// Row gather by index: for `b < batch` and `j < count`, destination row
/// `b * dst_rows + dst_start + j` pairs with source row
/// `b * src_stride + src_start + idx[b * count + j]`, where every index is below `src_rows`.
///
/// Each item gathers from rows of its own (`src_stride = src_rows`, `src_start = 0`: a
/// permutation per image, as masking gives), or every item from one table (`src_stride = 0`:
/// the position table, past its cls row with `src_start = 1`). In mae the indices of one item are
/// distinct, so the backward scatter has no collisions and needs no atomics; it is defined only
/// where each item's sources lie in a block of their own ([`Gather::sources_apart`]).
///
/// ```
/// use mae::backend::Gather;
/// // 49 of each image's 196 patch tokens into rows 1..=49 of its 50 (row 0: the cls token).
/// let keep = Gather::per_item(8, 49, 768, 196, 50, 1);
/// assert_eq!(keep.lens(), (8 * 196 * 768, 8 * 49, 8 * 50 * 768));
/// // Their positions, from the one table [1 + 196, 768] past its cls row: forward only.
/// let positions = Gather { src_stride: 0, src_start: 1, ..keep };
/// assert_eq!(positions.lens().0, 197 * 768);
/// assert!(keep.sources_apart() && !positions.sources_apart());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gather {
    pub batch: usize,
    pub count: usize,
    pub cols: usize,
    /// Indices are below this.
    pub src_rows: usize,
    /// Source rows from one item's first to the next one's (0: every item reads one table).
    pub src_stride: usize,
    /// Source rows before index 0 of each item.
    pub src_start: usize,
    pub dst_rows: usize,
    pub dst_start: usize,
}

impl Gather {
    /// Each of `batch` items gathers `count` of its own `src_rows` rows into rows
    /// `dst_start..` of its `dst_rows` (`src_stride = src_rows`, `src_start = 0`).
    pub fn per_item(
        batch: usize,
        count: usize,
        cols: usize,
        src_rows: usize,
        dst_rows: usize,
        dst_start: usize,
    ) -> Self {
        Gather {
            batch,
            count,
            cols,
            src_rows,
            src_stride: src_rows,
            src_start: 0,
            dst_rows,
            dst_start,
        }
    }
    /// Minimum lengths of the source, index and destination buffers.
    pub fn lens(&self) -> (usize, usize, usize) {
        let src = match self.batch * self.src_rows {
            0 => 0,
            _ => (self.batch - 1) * self.src_stride + self.src_start + self.src_rows,
        };
        (
            src * self.cols,
            self.batch * self.count,
            self.batch * self.dst_rows * self.cols,
        )
    }
    /// Whether each item's source rows lie in a block of `src_stride` rows of its own, so that
    /// no two items scatter into one row: what [`Backend::gather_rows_backward`] needs.
    pub fn sources_apart(&self) -> bool {
        self.src_start + self.src_rows <= self.src_stride
    }
    /// [`Gather::sources_apart`] as the `Unsupported` error a backward of another gather
    /// returns.
    pub fn check_backward(&self) -> BResult<()> {
        if self.sources_apart() {
            return Ok(());
        }
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            alloc::format!(
                "gather_rows_backward of a gather whose items share source rows: {self:?}"
            ),
        ))
    }
}

/// Attention heads as a view of a token matrix: tokens `[batch * tokens, row_width]` whose
/// columns `col_offset + h * head_dim + j` hold head `h` (timm's qkv layout: q | k | v, each
/// head-major), and the per-head tensor `[batch, heads, tokens, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub row_width: usize,
    pub col_offset: usize,
}

impl Heads {
    /// Lengths of the token matrix and of the per-head tensor.
    pub fn lens(&self) -> (usize, usize) {
        (
            self.batch * self.tokens * self.row_width,
            self.batch * self.heads * self.tokens * self.head_dim,
        )
    }
}

/// Fused multi-head self-attention over timm's qkv projection (see [`Backend::attention_forward`]):
/// `batch` images of `tokens` tokens, `heads` heads of `head_dim` columns, the scores scaled by
/// `scale` (`head_dim^-0.5`) after the product `q k^T`, as timm does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    /// Images.
    pub batch: usize,
    /// Tokens per image (cls included).
    pub tokens: usize,
    /// Attention heads.
    pub heads: usize,
    /// Columns per head.
    pub head_dim: usize,
    /// Factor on `q k^T` before the softmax.
    pub scale: f32,
}

impl Attention {
    /// Width of q (and of k, v and the merged output): `heads * head_dim`.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// The [`Heads`] view of this attention's heads inside rows of `row_width` columns, starting
    /// at column `col_offset`: q, k, v of `qkv` are `(3 * dim, 0 | dim | 2 * dim)`, the merged
    /// output `(dim, 0)`. For composing the attention from `split_heads` / `merge_heads`.
    pub fn heads(&self, row_width: usize, col_offset: usize) -> Heads {
        Heads {
            batch: self.batch,
            tokens: self.tokens,
            heads: self.heads,
            head_dim: self.head_dim,
            row_width,
            col_offset,
        }
    }
    /// Lengths of `qkv` (`[batch * tokens, 3 * dim]`), of `out` (`[batch * tokens, dim]`) and of
    /// `lse` (`[batch * heads * tokens]`).
    pub fn lens(&self) -> (usize, usize, usize) {
        let rows = self.batch * self.tokens;
        (
            rows * 3 * self.dim(),
            rows * self.dim(),
            self.batch * self.heads * self.tokens,
        )
    }
}

/// The value order inside one flattened patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOrder {
    /// `(c, y, x)`, channel slowest: the order the Conv2d patch embedding consumes
    /// (`patch_embed.proj.weight` is `[D, C, p, p]`).
    Chw,
    /// `(y, x, c)`, channel fastest: the official `patchify`, the loss target and prediction.
    Hwc,
}

/// Images `[batch, channels, height, width]` to patches `[batch, L, p * p * channels]`, patches in
/// row-major order (`l = (y / p) * (width / p) + x / p`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patchify {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
    pub order: PatchOrder,
}

impl Patchify {
    /// Lengths of the image batch and of the patch matrix.
    pub fn lens(&self) -> (usize, usize) {
        let n = self.batch * self.channels * self.height * self.width;
        (n, n)
    }
    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.height / self.patch) * (self.width / self.patch)
    }
}

/// One AdamW update with PyTorch semantics (decoupled weight decay, bias correction):
/// `p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
/// `p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`.
/// The bias corrections `bc = 1 - beta^t` are computed once on the host (in f64) so every
/// backend applies the same constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bias_correction1: f32,
    pub bias_correction2: f32,
}

impl AdamWStep {
    /// The constants of update number `step` (1-based).
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        AdamWStep {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            bias_correction1: (1.0 - libm::pow(beta1, t as f64)) as f32,
            bias_correction2: (1.0 - libm::pow(beta2, t as f64)) as f32,
        }
    }
}

/// One tensor of [`Backend::adamw_many`]: a parameter, its gradient, its two AdamW moments
/// (all of one length) and the update to apply, `None` for a tensor that does not train (only
/// its gradient is zeroed, and `param`, `m` and `v` are left as they are).
#[derive(Debug)]
pub struct AdamWTensor<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a mut Buf,
    pub m: &'a mut Buf,
    pub v: &'a mut Buf,
    pub step: Option<AdamWStep>,
}

/// What went wrong inside a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// No usable device, driver or library.
    NoDevice,
    /// An allocation of this many bytes failed.
    OutOfMemory { bytes: usize },
    /// A buffer longer than the device can bind or address.
    TooLarge { len: usize, max: usize },
    /// A kernel failed to compile or launch, or the device was lost.
    Device,
    /// The backend does not implement this op or mode.
    Unsupported,
}

/// A backend failure, with the backend's own words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    pub kind: BackendErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BackendErrorKind::NoDevice => write!(f, "no device: {}", self.message),
            BackendErrorKind::OutOfMemory { bytes } => {
                write!(
                    f,
                    "out of memory allocating {bytes} bytes: {}",
                    self.message
                )
            }
            BackendErrorKind::TooLarge { len, max } => write!(
                f,
                "buffer of {len} elements exceeds the device limit of {max}: {}",
                self.message
            ),
            BackendErrorKind::Device => write!(f, "device error: {}", self.message),
            BackendErrorKind::Unsupported => write!(f, "unsupported: {}", self.message),
        }
    }
}

impl core::error::Error for BackendError {}

/// Result of a backend op.
pub type BResult<T> = Result<T, BackendError>;

/// The ops an MAE training step and the embedding path need. See the module docs for the rules
/// every op follows.
pub trait Backend {
    /// An owned buffer of `f32`.
    type Buf;
    /// An owned buffer of `u32` indices.
    type Idx;

    /// Short name: `cpu`, `cuda`, `wgpu`.
    fn name(&self) -> &str;

    /// Longest buffer (in elements) the device can hold and bind.
    fn max_buf_len(&self) -> usize {
        usize::MAX
    }

    // ---- memory -----------------------------------------------------------------------------

    /// A zero-filled buffer of `len` floats (`len` may be 0: unused gradient slots of an
    /// inference-only model are empty buffers).
    fn alloc(&self, len: usize) -> BResult<Self::Buf>;
    /// [`Backend::alloc`] for an activation whose every read tolerates the rounding of a
    /// reduced-precision mode: in the model, the operands of [`Backend::gemm`] and its fused
    /// forms, the dY whose column sums are a Linear layer's bias gradient, the MLP's
    /// pre-activation and its gradient, which only the GELU and its gradient read, the qkv
    /// projection that only the fused attention reads, the fused attention's output, which only
    /// `proj` and the attention's backward (as O of `dO . O`) read, and the gradient of a
    /// block's LayerNorm output, which only that LayerNorm's backward reads. A backend whose GEMMs round their
    /// operands to bf16 (the CUDA backend's bf16 mode) may then keep just the bf16 values,
    /// written so by the op that produces them (a kernel, or a product that overwrites the whole
    /// buffer), and skip storing the floats. Every read sees those rounded values: a GEMM that
    /// rounds its operands to nearest computes bitwise what it would from [`Backend::alloc`]'s
    /// buffer holding them, and other reads (the column sums, the GELU, another op, a download)
    /// see them as floats. The default is [`Backend::alloc`].
    fn alloc_operand(&self, len: usize) -> BResult<Self::Buf> {
        self.alloc(len)
    }
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[f32]) -> BResult<Self::Buf>;
    /// Overwrites `dst` (same length) with `host`.
    fn write(&self, dst: &mut Self::Buf, host: &[f32]) -> BResult<()>;
    /// Copies `src` (same length) to `host`; waits for queued work.
    fn download(&self, src: &Self::Buf, host: &mut [f32]) -> BResult<()>;
    /// Length in floats.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// An index buffer holding a copy of `host`.
    fn upload_idx(&self, host: &[u32]) -> BResult<Self::Idx>;
    /// Overwrites `dst` (same length) with `host`.
    fn write_idx(&self, dst: &mut Self::Idx, host: &[u32]) -> BResult<()>;
    /// Length in indices.
    fn idx_len(&self, idx: &Self::Idx) -> usize;
    /// Overwrites every element with `value`.
    fn fill(&self, dst: &mut Self::Buf, value: f32) -> BResult<()>;
    /// `dst = src` (same length).
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) -> BResult<()>;
    /// Waits for queued work and reports deferred errors.
    fn sync(&self) -> BResult<()>;

    // ---- dense ------------------------------------------------------------------------------

    /// Strided-batched GEMM, see [`Gemm`]. `c` is overwritten or accumulated per `beta`.
    fn gemm(&self, g: &Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> BResult<()>;
    /// A Linear's forward in one op: the single product `g` (`batch == 1`) into `c`, then
    /// `c[r][j] += bias[j]` for every row `r < m` and column `j < n` (one `f32` add, as
    /// [`Backend::copy_rows`] accumulating a [`RowMap::bias`] does). `bias` holds `n` values.
    /// The result equals bitwise those two ops in turn, where the override sums the product
    /// in `gemm`'s order; one that runs a library's own GEMM kernel with a bias epilogue (CUDA's
    /// cuBLASLt) may sum in another order, and then equals them within the GEMM's tolerance.
    ///
    /// The default is exactly those two ops; backends override it to add the bias while the
    /// product is still in registers instead of in a second pass over `c`.
    fn gemm_bias(
        &self,
        g: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: &Self::Buf,
        c: &mut Self::Buf,
    ) -> BResult<()> {
        debug_assert_eq!(g.batch, 1, "gemm_bias: a single product");
        self.gemm(g, a, b, c)?;
        self.copy_rows(bias, c, &RowMap::bias(g.m, g.n), true)
    }
    /// [`Backend::gemm_bias`] with C read from `base` instead of `c`:
    /// `c = alpha op(a) op(b) + beta base + bias`, `base` left as it is (`base` and `c` distinct,
    /// each holding at least `m x n`; only those elements of `c` are written). A residual
    /// branch's last Linear layer where the stream's old value must be kept (a block's input,
    /// which its backward reads): the stream's new value is written once, instead of a copy of
    /// the old one followed by an accumulating product. The result equals bitwise
    /// [`Backend::copy`] of `base` into `c` then `gemm_bias`, where the override sums as
    /// `gemm_bias` does, and within the GEMM's tolerance of them otherwise.
    ///
    /// The default is exactly those two ops; backends override it to read `base` as the
    /// product's C (CUDA's cuBLASLt).
    fn gemm_bias_onto(
        &self,
        g: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: &Self::Buf,
        base: &Self::Buf,
        c: &mut Self::Buf,
    ) -> BResult<()> {
        self.copy(base, c)?;
        self.gemm_bias(g, a, b, bias, c)
    }
    /// A Linear layer's weight and bias gradients in one op: [`Backend::gemm`] of `g` into `c`
    /// (`g` is `dW = dY^T X`: `trans_a`, one matrix, `a` = dY `[k, m]`, `b` = X), and
    /// `db += ` the column sums of `a` over its `k` rows, as [`Backend::copy_rows_backward`]
    /// of a [`RowMap::bias`] does (`db` holds `m` values).
    ///
    /// The default is exactly those two ops. A backend may sum the columns inside the product,
    /// which reads `a` anyway (CUDA's cuBLASLt in bf16): in f32 in its own order, and of `a` as
    /// its product rounds it, so `db` is then within the tolerance of a product over `k` rows of
    /// those operands, not bitwise the column sums.
    fn gemm_bias_grad(
        &self,
        g: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        c: &mut Self::Buf,
        db: &mut Self::Buf,
    ) -> BResult<()> {
        debug_assert!(g.batch == 1 && g.trans_a, "gemm_bias_grad: dW = dY^T X");
        self.gemm(g, a, b, c)?;
        self.copy_rows_backward(a, db, &RowMap::bias(g.k, g.m))
    }
    /// The MLP's `fc1` in one op: [`Backend::gemm_bias`] into `pre`, then `act = gelu(pre)`
    /// with the GELU of [`Backend::gelu_forward`] (`pre` and `act` are `m x n`, distinct; the
    /// backward reads `pre`). The result equals bitwise [`Backend::gemm`] followed by
    /// [`Backend::bias_gelu_forward`].
    ///
    /// The default is exactly those two ops; backends override it to apply bias and GELU to
    /// each tile of the product as it is computed, instead of reading `pre` back from memory.
    fn gemm_bias_gelu(
        &self,
        g: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: &Self::Buf,
        pre: &mut Self::Buf,
        act: &mut Self::Buf,
    ) -> BResult<()> {
        debug_assert_eq!(g.batch, 1, "gemm_bias_gelu: a single product");
        self.gemm(g, a, b, pre)?;
        self.bias_gelu_forward(bias, pre, act, g.m, g.n)
    }
    /// `dst += src` elementwise over `dst`'s length.
    fn add(&self, src: &Self::Buf, dst: &mut Self::Buf) -> BResult<()>;
    /// `buf *= s` elementwise.
    fn scale(&self, buf: &mut Self::Buf, s: f32) -> BResult<()>;
    /// `dst[r] = src[r] * scales[r / rows_per_scale]` (or `+=` with `accumulate`) for every row
    /// `r` of `cols` values: one factor per image, such as drop path's 0 or `1 / keep_prob`.
    /// `src` and `dst` have the same length, `scales.len() * rows_per_scale * cols` of it.
    ///
    /// The default goes through the host, correct on any backend but slow; backends override it.
    fn scale_rows(
        &self,
        src: &Self::Buf,
        scales: &Self::Buf,
        dst: &mut Self::Buf,
        rows_per_scale: usize,
        cols: usize,
        accumulate: bool,
    ) -> BResult<()> {
        let (mut s, mut f, mut d) = (
            alloc::vec![0.0; self.len(src)],
            alloc::vec![0.0; self.len(scales)],
            alloc::vec![0.0; self.len(dst)],
        );
        self.download(src, &mut s)?;
        self.download(scales, &mut f)?;
        if accumulate {
            self.download(dst, &mut d)?;
        }
        let group = rows_per_scale * cols;
        for ((d, s), f) in d.chunks_mut(group).zip(s.chunks(group)).zip(&f) {
            for (d, s) in d.iter_mut().zip(s) {
                *d = if accumulate { *d + s * f } else { s * f };
            }
        }
        self.write(dst, &d)
    }

    // ---- rows: tokens, biases, masking ----------------------------------------------------

    /// Per [`RowMap`]: destination rows are overwritten with (`accumulate == false`) or
    /// increased by (`true`) their source rows.
    fn copy_rows(
        &self,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        map: &RowMap,
        accumulate: bool,
    ) -> BResult<()>;
    /// The backward of [`Backend::copy_rows`] with respect to its source: every source row
    /// accumulates the sum of the `d_dst` rows it was copied to, summed in ascending `(b, i)`.
    fn copy_rows_backward(
        &self,
        d_dst: &Self::Buf,
        d_src: &mut Self::Buf,
        map: &RowMap,
    ) -> BResult<()>;
    /// Per [`Gather`]: destination rows are overwritten with the indexed source rows.
    fn gather_rows(
        &self,
        src: &Self::Buf,
        idx: &Self::Idx,
        dst: &mut Self::Buf,
        g: &Gather,
    ) -> BResult<()>;
    /// The backward of [`Backend::gather_rows`]: indexed rows of `d_src` accumulate the `d_dst`
    /// rows gathered from them. Only for gathers whose items read apart
    /// ([`Gather::sources_apart`]; a table shared by every item is not trained through a
    /// gather): others are an `Unsupported` error ([`Gather::check_backward`]).
    fn gather_rows_backward(
        &self,
        d_dst: &Self::Buf,
        idx: &Self::Idx,
        d_src: &mut Self::Buf,
        g: &Gather,
    ) -> BResult<()>;
    /// Images to patches, see [`Patchify`]. Overwrites `out`.
    fn patchify(&self, imgs: &Self::Buf, out: &mut Self::Buf, p: &Patchify) -> BResult<()>;
    /// Token matrix to per-head tensor: `heads[b,h,t,j] = x[b*T+t, off + h*hd + j]`. Overwrites.
    fn split_heads(&self, x: &Self::Buf, heads: &mut Self::Buf, h: &Heads) -> BResult<()>;
    /// Per-head tensor to token matrix, the inverse of [`Backend::split_heads`]: overwrites the
    /// columns `col_offset .. col_offset + heads * head_dim` of `x` and leaves the others.
    fn merge_heads(&self, heads: &Self::Buf, x: &mut Self::Buf, h: &Heads) -> BResult<()>;

    // ---- normalization and activation ----------------------------------------------------

    /// LayerNorm over rows of `cols` with biased variance:
    /// `y = (x - mean) * rstd * gamma + beta`, `rstd = 1 / sqrt(var + eps)`. Overwrites `y`,
    /// `mean` and `rstd` (`rows` each), which the backward reuses.
    fn layernorm_forward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()>;
    /// Accumulates into `dx`, `dgamma` and `dbeta`.
    fn layernorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()>;
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`. Overwrites `y`.
    fn gelu_forward(&self, x: &Self::Buf, y: &mut Self::Buf) -> BResult<()>;
    /// The MLP's `fc1` epilogue in one op: `pre[r][c] += bias[c]` (one `f32` add, as
    /// [`Backend::copy_rows`] accumulating a [`RowMap::bias`] does), then `act = gelu(pre)` with
    /// the GELU of [`Backend::gelu_forward`], for `r < rows`, `c < cols`. `bias` holds `cols`
    /// values, `pre` and `act` (distinct buffers) exactly `rows * cols`; `pre` is updated in place (the
    /// backward reads it) and `act` overwritten. The result equals bitwise those two ops in turn.
    ///
    /// The default is exactly those two ops; backends override it to read and write the matrix
    /// once instead of twice.
    fn bias_gelu_forward(
        &self,
        bias: &Self::Buf,
        pre: &mut Self::Buf,
        act: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        self.copy_rows(bias, pre, &RowMap::bias(rows, cols), true)?;
        self.gelu_forward(pre, act)
    }
    /// `dx = dx + dy * gelu'(x)` where `accumulate`, else `dx = 0 + dy * gelu'(x)`: bitwise the
    /// result of [`Backend::fill`]ing `dx` with zeros and accumulating, without reading `dx`
    /// (the MLP's backward overwrites its `d_pre`, which saves a pass and a read).
    fn gelu_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> BResult<()>;
    /// Row softmax of `scale * x` (attention scores, scale `head_dim^-0.5` applied after the
    /// product as timm does). Overwrites `y`.
    fn softmax_forward(
        &self,
        x: &Self::Buf,
        y: &mut Self::Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()>;
    /// Given the forward output `y`, accumulates `scale * y * (dy - sum(dy * y))` into `dx`.
    fn softmax_backward(
        &self,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()>;

    // ---- fused attention ----------------------------------------------------------------------

    /// Whether this backend implements [`Backend::attention_forward`] and
    /// [`Backend::attention_backward`] for the dims `a`; the model composes attention from
    /// `split_heads`, `gemm`, `softmax_*` and `merge_heads` where it does not.
    fn fused_attention(&self, a: &Attention) -> bool {
        let _ = a;
        false
    }
    /// Multi-head self-attention without the `[tokens, tokens]` score matrices in memory.
    /// `qkv` is the qkv projection `[batch * tokens, 3 D]` (`D = heads * head_dim`): q, k, v side
    /// by side, each head-major (column `s * D + h * head_dim + j` for `s` in q, k, v). Overwrites
    /// `out` `[batch * tokens, D]` with the heads concatenated, `softmax(scale * q k^T) v` in
    /// columns `h * head_dim ..`, and `lse` `[batch, heads, tokens]` with each score row's
    /// `log(sum(exp(scale * q k^T)))`, which the backward reuses.
    fn attention_forward(
        &self,
        qkv: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        a: &Attention,
    ) -> BResult<()> {
        let _ = (qkv, out, lse, a);
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            alloc::format!("{} has no fused attention ({a:?})", self.name()),
        ))
    }
    /// The backward of [`Backend::attention_forward`], given its inputs and outputs and `d_out`,
    /// the gradient of `out`. Unlike the other backward ops it **overwrites** `d_qkv`
    /// (`[batch * tokens, 3 D]`, the qkv layout) with the gradients of q, k and v: `qkv` has no
    /// other consumer, so there is nothing to add to.
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        d_out: &Self::Buf,
        d_qkv: &mut Self::Buf,
        a: &Attention,
    ) -> BResult<()> {
        let _ = (qkv, out, lse, d_out, d_qkv, a);
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            alloc::format!("{} has no fused attention ({a:?})", self.name()),
        ))
    }

    // ---- loss ---------------------------------------------------------------------------------

    /// The norm-pix target: each row becomes `(x - mean) / sqrt(var + eps)` with the unbiased
    /// variance (`cols >= 2`). Overwrites `y`.
    fn normalize_rows(
        &self,
        x: &Self::Buf,
        y: &mut Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()>;
    /// Masked MSE: `loss[0] = sum_r mask[r] * mean_c (pred - target)^2 / sum_r mask[r]`.
    /// Overwrites the one-element `loss`.
    fn masked_mse_forward(
        &self,
        pred: &Self::Buf,
        target: &Self::Buf,
        mask: &Self::Buf,
        loss: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()>;
    /// Accumulates `d_loss * d(loss)/d(pred)` into `d_pred`, `d_loss` being the gradient of the
    /// objective with respect to the loss (1, or 1 / accumulation steps).
    fn masked_mse_backward(
        &self,
        pred: &Self::Buf,
        target: &Self::Buf,
        mask: &Self::Buf,
        d_pred: &mut Self::Buf,
        rows: usize,
        cols: usize,
        d_loss: f32,
    ) -> BResult<()>;

    // ---- optimizer ----------------------------------------------------------------------------

    /// One AdamW step in place on `param`, `m` and `v` (all of one length), see [`AdamWStep`].
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamWStep,
    ) -> BResult<()>;
    /// The optimizer step of a whole model in one op: for each tensor in order,
    /// [`Backend::adamw`] with its `step` when it has one, then its gradient zeroed
    /// ([`Backend::fill`] with `0.0`). The result equals bitwise that composition, tensor by
    /// tensor; the tensors are distinct buffers (the `&mut` borrows say so).
    ///
    /// The default is exactly that composition; backends override it to update every tensor in
    /// one launch instead of two per tensor.
    ///
    /// The tensors come as an iterator, so that a caller need not collect them into a list on
    /// every step.
    fn adamw_many<'a>(
        &self,
        tensors: impl Iterator<Item = AdamWTensor<'a, Self::Buf>>,
    ) -> BResult<()>
    where
        Self::Buf: 'a,
    {
        for t in tensors {
            if let Some(step) = &t.step {
                self.adamw(t.param, t.grad, t.m, t.v, step)?;
            }
            self.fill(t.grad, 0.0)?;
        }
        Ok(())
    }
}

/// Work that runs on whichever backend a program picks at run time: written once, generic over
/// the backend, and handed to a dispatcher (`mae-examples`' and `mae-conformance`'s `backends`
/// modules) that constructs the backend named on the command line and calls [`OnBackend::run`].
///
/// ```
/// use mae::backend::{Backend, OnBackend};
///
/// struct Name;
/// impl OnBackend for Name {
///     type Output = String;
///     fn run<B: Backend>(self, b: &B) -> String {
///         b.name().to_string()
///     }
/// }
/// # let _ = Name;
/// ```
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Runs the work on `b`.
    fn run<B: Backend>(self, b: &B) -> Self::Output;
}
