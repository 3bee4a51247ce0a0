//! Fused multi-head self-attention (`shaders/attention.wgsl`): a forward pass that keeps one
//! log-sum-exp per score row instead of the `[tokens, tokens]` probabilities, and a backward in
//! two passes (dQ per query row, then dK and dV per key row) that recompute the probabilities
//! from it. Deterministic: every sum runs in ascending row order, without atomics.
//!
//! Whether the model uses it is [`AttentionPath`]: by default it does not, because the composed
//! ops measured faster on both lavapipe and an H200 (see [`AttentionPath::choose`]);
//! `MAE_WGPU_ATTENTION=fused` takes it, for the memory of the scores it saves.

use crate::kernel::{word, Kernel, MAX_GROUPS};
use crate::{Buf, WgpuBackend};
use mae::backend::{Attention, BResult, BackendError, BackendErrorKind};

/// The widest head the kernels take (`MAX_HD` in the shader): a row lives in private arrays.
pub(crate) const MAX_HEAD_DIM: usize = 64;

/// How the model computes attention on this backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// `attention_forward` and `attention_backward` (`shaders/attention.wgsl`).
    Fused,
    /// `split_heads`, `gemm`, `softmax_*` and `merge_heads`, with the `[N, H, T, T]` scores.
    Composed,
}

impl AttentionPath {
    /// The path: `requested` (from `MAE_WGPU_ATTENTION`) if given, else composed. The fused
    /// kernels run one invocation per query or key row in f32, with no workgroup tiles and no
    /// matrix units, and were slower wherever they were measured: on lavapipe 2 to 3 times as
    /// long as the composed ops at the `tiny32` shapes (`timing_fused_and_composed_attention` in
    /// `tests.rs`), on an H200 (Vulkan) ViT-B/16 training at batch 64 ran at 116 img/s fused
    /// against 164 composed (docs/results-gpu.md). They save the `[N, H, T, T]` scores: 5 %
    /// of the peak memory there.
    pub(crate) fn choose(requested: Option<AttentionPath>) -> AttentionPath {
        requested.unwrap_or(AttentionPath::Composed)
    }

    /// Reads `MAE_WGPU_ATTENTION`: `fused`, `composed`, or unset for the adapter's default.
    pub(crate) fn from_env() -> BResult<Option<AttentionPath>> {
        match std::env::var("MAE_WGPU_ATTENTION") {
            Err(_) => Ok(None),
            Ok(v) if v == "fused" => Ok(Some(AttentionPath::Fused)),
            Ok(v) if v == "composed" => Ok(Some(AttentionPath::Composed)),
            Ok(v) => Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("MAE_WGPU_ATTENTION={v:?}: expected `fused` or `composed`"),
            )),
        }
    }
}

/// Whether the kernels take the dims `a`: head widths 1 to [`MAX_HEAD_DIM`], and one grid row
/// per (image, head) pair.
pub(crate) fn supported(a: &Attention) -> bool {
    (1..=MAX_HEAD_DIM).contains(&a.head_dim)
        && a.batch.saturating_mul(a.heads) <= MAX_GROUPS as usize
}

fn unsupported(a: &Attention) -> BackendError {
    BackendError::new(
        BackendErrorKind::Unsupported,
        format!(
            "wgpu fused attention takes head_dim 1 to {MAX_HEAD_DIM} and at most {MAX_GROUPS} \
             (image, head) pairs: {a:?}"
        ),
    )
}

/// The uniform parameters every attention kernel reads, after checking that every buffer
/// length fits the kernels' 32-bit indices; and the grid: rows in x, (image, head) in y.
fn launch_dims(a: &Attention, wg: u32) -> BResult<([u32; 4], [u32; 3])> {
    if !supported(a) {
        return Err(unsupported(a));
    }
    let (lq, lo, ll) = a.lens();
    word(lq.max(lo).max(ll))?;
    let params = [
        word(a.batch)?,
        word(a.tokens)?,
        word(a.heads)?,
        a.scale.to_bits(),
    ];
    let rows = word(a.tokens.div_ceil(wg as usize))?;
    Ok((params, [rows, word(a.batch * a.heads)?, 1]))
}

/// The forward with the backend's workgroup size.
pub(crate) fn forward(
    be: &WgpuBackend,
    qkv: &Buf,
    out: &mut Buf,
    lse: &mut Buf,
    a: &Attention,
) -> BResult<()> {
    forward_with(be, be.attention_wg, qkv, out, lse, a)
}

/// The backward with the backend's workgroup size.
pub(crate) fn backward(
    be: &WgpuBackend,
    qkv: &Buf,
    out: &Buf,
    lse: &Buf,
    d_out: &Buf,
    d_qkv: &mut Buf,
    a: &Attention,
) -> BResult<()> {
    backward_with(be, be.attention_wg, qkv, out, lse, d_out, d_qkv, a)
}

/// The forward with `wg` invocations per workgroup.
pub(crate) fn forward_with(
    be: &WgpuBackend,
    wg: u32,
    qkv: &Buf,
    out: &mut Buf,
    lse: &mut Buf,
    a: &Attention,
) -> BResult<()> {
    let (params, grid) = launch_dims(a, wg)?;
    let head_dim = a.head_dim as u32;
    debug_assert!({
        let (lq, lo, ll) = a.lens();
        qkv.len() >= lq && out.len() >= lo && lse.len() >= ll
    });
    be.launch(
        Kernel::AttentionForward { head_dim, wg },
        &params,
        &[&qkv.raw, &out.raw, &lse.raw],
        grid,
    )
}

/// The backward with `wg` invocations per workgroup.
pub(crate) fn backward_with(
    be: &WgpuBackend,
    wg: u32,
    qkv: &Buf,
    out: &Buf,
    lse: &Buf,
    d_out: &Buf,
    d_qkv: &mut Buf,
    a: &Attention,
) -> BResult<()> {
    let (params, grid) = launch_dims(a, wg)?;
    let head_dim = a.head_dim as u32;
    let (lq, lo, ll) = a.lens();
    debug_assert!(
        qkv.len() >= lq
            && out.len() >= lo
            && lse.len() >= ll
            && d_out.len() >= lo
            && d_qkv.len() >= lq
    );
    // drow_i = dO_i . O_i for every score row: written by the dQ pass, read by the dK, dV pass.
    let drow: Buf = crate::buffer::alloc(&be.gpu, ll)?;
    be.launch(
        Kernel::AttentionBackwardDq { head_dim, wg },
        &params,
        &[
            &qkv.raw, &out.raw, &lse.raw, &d_out.raw, &d_qkv.raw, &drow.raw,
        ],
        grid,
    )?;
    be.launch(
        Kernel::AttentionBackwardDkv { head_dim, wg },
        &params,
        &[&qkv.raw, &lse.raw, &d_out.raw, &drow.raw, &d_qkv.raw],
        grid,
    )
}
