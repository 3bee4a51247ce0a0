//! The row kernels (LayerNorm forward and its `dx`, the norm-pix target, softmax forward and
//! backward, the loss's per-row errors) in two variants, and the choice between them.
//!
//! - [`RowKernel::Invocation`]: one invocation walks a whole row, in order. No workgroup memory
//!   and no barriers, which suits CPU adapters such as lavapipe, where each invocation is a SIMD
//!   lane and barriers are expensive.
//! - [`RowKernel::Workgroup`]: one workgroup of 64 invocations per row (`shaders/row_group.wgsl`),
//!   each taking every 64th column, the partial sums combined by a fixed tree in workgroup
//!   memory. On a GPU the one-invocation kernel reads addresses a row apart in neighbouring
//!   invocations, uncoalesced: on an H200, `layernorm_forward` over 12,608 rows of 768 took
//!   742 us, about 100 GB/s.
//!
//! Both sum in `f32` with compensated sums in an order fixed by the shapes alone, so each is
//! deterministic; they differ from each other by about one rounding. The backend takes the
//! workgroup kernels on GPU adapters and the invocation kernels on CPU adapters;
//! `MAE_WGPU_ROWS=workgroup|invocation` overrides.

use crate::kernel::{grid_1d, Kernel, MAX_GROUPS};
use crate::WgpuBackend;
use mae::backend::{BResult, BackendError, BackendErrorKind};

/// Which variant of the row kernels the backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKernel {
    /// One invocation per row: for CPU adapters.
    Invocation,
    /// One workgroup per row, coalesced: for GPUs.
    Workgroup,
}

impl RowKernel {
    /// The variant for an adapter: `requested` (from `MAE_WGPU_ROWS`) if given, else the
    /// invocation kernels on CPU adapters and the workgroup kernels on anything else.
    pub(crate) fn choose(requested: Option<RowKernel>, device_type: wgpu::DeviceType) -> RowKernel {
        requested.unwrap_or(if device_type == wgpu::DeviceType::Cpu {
            RowKernel::Invocation
        } else {
            RowKernel::Workgroup
        })
    }

    /// Reads `MAE_WGPU_ROWS`: `workgroup`, `invocation`, or unset for the adapter's default.
    pub(crate) fn from_env() -> BResult<Option<RowKernel>> {
        match std::env::var("MAE_WGPU_ROWS") {
            Err(_) => Ok(None),
            Ok(v) if v == "workgroup" => Ok(Some(RowKernel::Workgroup)),
            Ok(v) if v == "invocation" => Ok(Some(RowKernel::Invocation)),
            Ok(v) => Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("MAE_WGPU_ROWS={v:?}: expected `workgroup` or `invocation`"),
            )),
        }
    }
}

/// The one-workgroup-per-row kernel computing what the one-invocation-per-row `kernel` does.
fn workgroup_variant(kernel: Kernel) -> Kernel {
    match kernel {
        Kernel::LayerNormForward => Kernel::LayerNormForwardGroup,
        Kernel::LayerNormBackwardRows => Kernel::LayerNormBackwardRowsGroup,
        Kernel::NormalizeRows => Kernel::NormalizeRowsGroup,
        Kernel::SoftmaxForward => Kernel::SoftmaxForwardGroup,
        Kernel::SoftmaxBackward => Kernel::SoftmaxBackwardGroup,
        Kernel::MseRows => Kernel::MseRowsGroup,
        other => other,
    }
}

/// One workgroup per row, the grid folded into two dimensions so that neither exceeds
/// [`MAX_GROUPS`]; the kernels recover the row with `group_row` and skip the excess.
pub(crate) fn grid_rows(rows: usize) -> [u32; 3] {
    if rows == 0 {
        return [0, 0, 0];
    }
    let x = rows.min(MAX_GROUPS as usize);
    // Past MAX_GROUPS^2 rows, y saturates and the launch refuses it as TooLarge.
    let y = u32::try_from(rows.div_ceil(x)).unwrap_or(u32::MAX);
    [x as u32, y, 1]
}

/// Launches the one-invocation-per-row `kernel` over `rows` rows, or its workgroup variant,
/// as the backend chose.
pub(crate) fn launch_rows(
    be: &WgpuBackend,
    kernel: Kernel,
    params: &[u32],
    bufs: &[&wgpu::Buffer],
    rows: usize,
) -> BResult<()> {
    match be.row_kernel {
        RowKernel::Invocation => be.launch(kernel, params, bufs, grid_1d(rows)),
        RowKernel::Workgroup => be.launch(workgroup_variant(kernel), params, bufs, grid_rows(rows)),
    }
}
