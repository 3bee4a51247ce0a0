//! Strided-batched GEMM: four kernels and the choice between them.
//!
//! - [`GemmKernel::Register`] (`shaders/gemm.wgsl`): each invocation holds an 8 x 8 block of C in
//!   registers and reads A and B straight from the storage buffers, with no workgroup memory
//!   and no barriers. This is what is fast on lavapipe, where barriers are expensive and loads
//!   set the pace.
//! - [`GemmKernel::Tiled`] (`shaders/gemm_tiled.wgsl`): 64 x 64 blocks of C per workgroup of
//!   256 invocations, 64 x 16 and 16 x 64 tiles of A and B staged in workgroup memory, a 4 x 4
//!   register block per invocation. This is what real GPUs want: each value read from memory
//!   feeds 64 multiply-adds instead of 8.
//! - [`GemmKernel::Wide`] (`shaders/gemm_wide.wgsl`): the tiled scheme with 128 x 128 blocks of C
//!   and an 8 x 8 register block per invocation, twice the multiply-adds per staged value.
//! - [`GemmKernel::Fast`] (`shaders/gemm_fast.wgsl`): 128 x 128 blocks and 8 x 8 per invocation
//!   as in the wide kernel, with what NVIDIA GPUs want from a shader SGEMM: tiles read as
//!   vectors (4 vector loads per step of k instead of 16 scalar ones), the next step's values
//!   loaded into registers while the current one is multiplied out, two copies of the tiles in
//!   workgroup memory (one barrier per step instead of two), no bounds checks inside the
//!   operands (16.5 KiB of workgroup memory).
//!
//! The backend takes the fast kernel on GPU adapters (discrete, integrated, virtual) and the
//! register kernel on CPU adapters such as lavapipe; `MAE_WGPU_GEMM=fast|wide|tiled|register`
//! overrides that, and a device whose limits cannot hold a kernel's workgroup gets the next
//! smaller one (fast, wide, tiled, register). On an H200 the fast kernel ran the Linear
//! layers' products 1.5-1.8x as fast as the wide one (18-30 TFLOP/s) and a whole ViT-B/16
//! training step 1.4x as fast as the wide kernel for single products with the tiled one for
//! batched ones, the default before it (docs/results-gpu.md).
//! Every kernel sums each value's k products in ascending order.
//!
//! A weight gradient (`dW = dY^T X`, A transposed) has few blocks of C and a long k, the batch's
//! token count: on a GPU its few workgroups would each walk all of k while most of the device
//! idles. The workgroup-memory kernels run such a product split along k ([`k_splits`]): one
//! batched launch over slices of k writes each slice's product, and a second pass adds the
//! slices in order.

use crate::kernel::{grid_1d, word, Kernel, MAX_GROUPS};
use crate::{buffer, Buf, WgpuBackend};
use mae::backend::{BResult, BackendError, BackendErrorKind, Gemm};

/// Rows and columns of C per workgroup of the register and tiled kernels.
const TILE: usize = 64;
/// Rows and columns of C per workgroup of the wide and fast kernels.
const WIDE_TILE: usize = 128;
/// Workgroup memory of the tiled kernel: two tiles of 16 rows of 65 floats.
const TILED_SHARED_BYTES: u32 = 2 * 16 * 65 * 4;
/// Workgroup memory of the wide kernel: two tiles of 16 rows of 129 floats, just over
/// WebGPU's default limit of 16 KiB (GPUs' own limits are larger).
const WIDE_SHARED_BYTES: u32 = 2 * 16 * 129 * 4;
/// Workgroup memory of the fast kernel: two copies of two tiles of 8 rows of 33 vec4s.
const FAST_SHARED_BYTES: u32 = 2 * 2 * 8 * 33 * 16;
/// Invocations per workgroup of the workgroup-memory kernels (16 x 16).
const TILED_INVOCATIONS: u32 = 256;

/// Which GEMM kernel the backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// Register blocks without workgroup memory (`shaders/gemm.wgsl`): for CPU adapters.
    Register,
    /// Workgroup-shared tiles (`shaders/gemm_tiled.wgsl`): for GPUs.
    Tiled,
    /// Workgroup-shared 128 x 128 tiles (`shaders/gemm_wide.wgsl`): for GPUs.
    Wide,
    /// [`GemmKernel::Wide`]'s blocks with vector tile reads, register prefetch and double
    /// buffered tiles (`shaders/gemm_fast.wgsl`): for GPUs.
    Fast,
}

impl GemmKernel {
    /// The kernel for an adapter: `requested` (from `MAE_WGPU_GEMM`) if given, else the fast
    /// kernel on anything but a CPU adapter; the next smaller kernel where the device's limits
    /// cannot hold the one wanted.
    pub(crate) fn choose(
        requested: Option<GemmKernel>,
        device_type: wgpu::DeviceType,
        limits: &wgpu::Limits,
    ) -> GemmKernel {
        let wanted = requested.unwrap_or(if device_type == wgpu::DeviceType::Cpu {
            GemmKernel::Register
        } else {
            GemmKernel::Fast
        });
        match wanted {
            GemmKernel::Fast if fast_fits(limits) => wanted,
            GemmKernel::Fast | GemmKernel::Wide if wide_fits(limits) => GemmKernel::Wide,
            GemmKernel::Fast | GemmKernel::Wide | GemmKernel::Tiled if tiled_fits(limits) => {
                GemmKernel::Tiled
            }
            _ => GemmKernel::Register,
        }
    }

    /// Reads `MAE_WGPU_GEMM`: `fast`, `wide`, `tiled`, `register`, or unset for the adapter's
    /// default.
    pub(crate) fn from_env() -> BResult<Option<GemmKernel>> {
        match std::env::var("MAE_WGPU_GEMM") {
            Err(_) => Ok(None),
            Ok(v) if v == "tiled" => Ok(Some(GemmKernel::Tiled)),
            Ok(v) if v == "wide" => Ok(Some(GemmKernel::Wide)),
            Ok(v) if v == "fast" => Ok(Some(GemmKernel::Fast)),
            Ok(v) if v == "register" => Ok(Some(GemmKernel::Register)),
            Ok(v) => Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("MAE_WGPU_GEMM={v:?}: expected `fast`, `wide`, `tiled` or `register`"),
            )),
        }
    }
}

/// Whether a workgroup of the tiled kernel fits the device's limits.
pub(crate) fn tiled_fits(limits: &wgpu::Limits) -> bool {
    fits(TILED_SHARED_BYTES, limits)
}

/// Whether a workgroup of the wide kernel fits the device's limits.
pub(crate) fn wide_fits(limits: &wgpu::Limits) -> bool {
    fits(WIDE_SHARED_BYTES, limits)
}

/// Whether a workgroup of the fast kernel fits the device's limits.
pub(crate) fn fast_fits(limits: &wgpu::Limits) -> bool {
    fits(FAST_SHARED_BYTES, limits)
}

/// Whether a 16 x 16 workgroup using `shared` bytes of workgroup memory fits.
fn fits(shared: u32, limits: &wgpu::Limits) -> bool {
    limits.max_compute_workgroup_storage_size >= shared
        && limits.max_compute_invocations_per_workgroup >= TILED_INVOCATIONS
        && limits.max_compute_workgroup_size_x >= 16
        && limits.max_compute_workgroup_size_y >= 16
}

/// `g` with the backend's kernel.
pub(crate) fn gemm(be: &WgpuBackend, g: &Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> BResult<()> {
    gemm_with(be, be.gemm_kernel, g, a, b, c)
}

/// `g` with a given kernel (the caller checked that it fits the device).
pub(crate) fn gemm_with(
    be: &WgpuBackend,
    which: GemmKernel,
    g: &Gemm,
    a: &Buf,
    b: &Buf,
    c: &mut Buf,
) -> BResult<()> {
    debug_assert!({
        let (la, lb, lc) = g.lens();
        a.len() >= la && b.len() >= lb && c.len() >= lc
    });
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let (trans_a, trans_b) = (g.trans_a, g.trans_b);
    let (kernel, tile, splits) = match which {
        GemmKernel::Register => (Kernel::Gemm { trans_a, trans_b }, TILE, 1),
        GemmKernel::Tiled => (
            Kernel::GemmTiled { trans_a, trans_b },
            TILE,
            k_splits(g, TILE),
        ),
        GemmKernel::Fast => (
            Kernel::GemmFast { trans_a, trans_b },
            WIDE_TILE,
            k_splits(g, WIDE_TILE),
        ),
        GemmKernel::Wide => (
            Kernel::GemmWide { trans_a, trans_b },
            WIDE_TILE,
            k_splits(g, WIDE_TILE),
        ),
    };
    let grid = [word(g.n.div_ceil(tile))?, word(g.m.div_ceil(tile))?];
    if splits > 1 {
        return split_along_k(be, kernel, grid, g, splits, [a, b], c);
    }
    // The batch is the grid's z dimension, in launches of at most MAX_GROUPS items.
    let mut first = 0;
    while first < g.batch {
        let items = (g.batch - first).min(MAX_GROUPS as usize);
        let params = [
            word(g.m)?,
            word(g.n)?,
            word(g.k)?,
            word(first)?,
            word(g.stride_a)?,
            word(g.stride_b)?,
            word(g.stride_c)?,
            g.alpha.to_bits(),
            g.beta.to_bits(),
        ];
        be.launch(
            kernel,
            &params,
            &[&a.raw, &b.raw, &c.raw],
            [grid[0], grid[1], items as u32],
        )?;
        first += items;
    }
    Ok(())
}

/// Blocks of C that keep a GPU busy (a few per multiprocessor of a large GPU).
const BUSY_BLOCKS: usize = 1024;
/// The shortest slice of k worth its own product.
const MIN_SLICE: usize = 256;

/// Slices of k for `g` on a kernel with `tile` x `tile` blocks: 1 (no split) unless `g` is one
/// product with A transposed and B not, the layout in which a slice of k is a block of rows of
/// both stored operands (so the slices are a batch with strides); then the number of slices,
/// a power of two dividing k, is doubled while the blocks stay below [`BUSY_BLOCKS`] and each
/// slice keeps at least [`MIN_SLICE`] of k.
pub(crate) fn k_splits(g: &Gemm, tile: usize) -> usize {
    if g.batch != 1 || !g.trans_a || g.trans_b {
        return 1;
    }
    let blocks = g.m.div_ceil(tile) * g.n.div_ceil(tile);
    let mut splits = 1;
    // BUSY_BLOCKS bounds the slices far below MAX_GROUPS, the batch one launch holds.
    while blocks * splits < BUSY_BLOCKS
        && g.k % (2 * splits) == 0
        && g.k / (2 * splits) >= MIN_SLICE
    {
        splits *= 2;
    }
    splits
}

/// `g` as `splits` products over slices of k into a scratch buffer (the batch of one launch:
/// slice `s` reads rows `s * k / splits ..` of the stored A and B), then `c = sum of slices +
/// beta c` in slice order.
fn split_along_k(
    be: &WgpuBackend,
    kernel: Kernel,
    grid: [u32; 2],
    g: &Gemm,
    splits: usize,
    [a, b]: [&Buf; 2],
    c: &mut Buf,
) -> BResult<()> {
    let slice = g.k / splits;
    let len = g.m * g.n;
    let partials: Buf = buffer::alloc(&be.gpu, splits * len)?;
    let params = [
        word(g.m)?,
        word(g.n)?,
        word(slice)?,
        0,
        word(slice * g.m)?,
        word(slice * g.n)?,
        word(len)?,
        g.alpha.to_bits(),
        0f32.to_bits(),
    ];
    be.launch(
        kernel,
        &params,
        &[&a.raw, &b.raw, &partials.raw],
        [grid[0], grid[1], word(splits)?],
    )?;
    be.launch(
        Kernel::SumSlices,
        &[word(len)?, word(splits)?, g.beta.to_bits()],
        &[&partials.raw, &c.raw],
        grid_1d(len),
    )
}
