//! Kernels: the WGSL sources, the pipeline cache, and how one op is recorded and submitted.
//!
//! Every kernel has the same binding scheme, so one function launches them all: binding 0 is a
//! small uniform block of 32-bit parameters (the op's sizes and scalars, written by the caller as
//! `u32` words, `f32` values by their bits), bindings `1..` are the op's storage buffers in the
//! order the kernel lists them, inputs read-only and outputs read-write. Pipelines are compiled
//! on first use and cached for the backend's lifetime.
//!
//! Work is recorded into one pending command encoder, a compute pass per op, and submitted every
//! [`MAX_PENDING`] ops or whenever the host needs the queue in order (a write, a download, a sync).

use crate::context::{lock, Gpu};
use crate::profile::Profile;
use mae::backend::{BResult, BackendError, BackendErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wgpu::util::DeviceExt;

/// Invocations per workgroup of the 1-D kernels (`WG` in `common.wgsl`).
pub(crate) const WG: u32 = 256;
/// Workgroups per grid dimension (WebGPU's guaranteed minimum of the limit).
pub(crate) const MAX_GROUPS: u32 = 65535;
/// Ops recorded before the encoder is submitted: enough to amortize a submit, few enough that
/// the device starts working while the host records the rest of a step.
const MAX_PENDING: u32 = 64;

/// Helpers every shader source starts with.
const COMMON: &str = include_str!("shaders/common.wgsl");

/// One WGSL file: a family of kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Memory,
    Gemm,
    GemmTiled,
    GemmWide,
    GemmFast,
    Attention,
    Rows,
    Norm,
    Columns,
    Activation,
    Loss,
    AdamW,
}

impl Family {
    fn source(self) -> &'static str {
        match self {
            Family::Memory => include_str!("shaders/memory.wgsl"),
            Family::Gemm => concat!(
                include_str!("shaders/gemm_common.wgsl"),
                include_str!("shaders/gemm.wgsl")
            ),
            Family::GemmTiled => concat!(
                include_str!("shaders/gemm_common.wgsl"),
                include_str!("shaders/gemm_tiled.wgsl")
            ),
            Family::GemmWide => concat!(
                include_str!("shaders/gemm_common.wgsl"),
                include_str!("shaders/gemm_wide.wgsl")
            ),
            Family::GemmFast => concat!(
                include_str!("shaders/gemm_common.wgsl"),
                include_str!("shaders/gemm_fast.wgsl")
            ),
            Family::Attention => include_str!("shaders/attention.wgsl"),
            Family::Rows => include_str!("shaders/rows.wgsl"),
            Family::Norm => concat!(
                include_str!("shaders/row_group.wgsl"),
                include_str!("shaders/norm.wgsl")
            ),
            Family::Columns => include_str!("shaders/columns.wgsl"),
            Family::Activation => concat!(
                include_str!("shaders/row_group.wgsl"),
                include_str!("shaders/activation.wgsl")
            ),
            Family::Loss => concat!(
                include_str!("shaders/row_group.wgsl"),
                include_str!("shaders/loss.wgsl")
            ),
            Family::AdamW => include_str!("shaders/adamw.wgsl"),
        }
    }
}

/// How a kernel uses one storage binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}
use Access::{Read as R, Write as W};

/// Every kernel of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Fill,
    Add,
    Scale,
    ScaleRows,
    SumSlices,
    Gemm {
        trans_a: bool,
        trans_b: bool,
    },
    GemmTiled {
        trans_a: bool,
        trans_b: bool,
    },
    GemmWide {
        trans_a: bool,
        trans_b: bool,
    },
    GemmFast {
        trans_a: bool,
        trans_b: bool,
    },
    /// Fused attention for one head width, with `wg` invocations per workgroup.
    AttentionForward {
        head_dim: u32,
        wg: u32,
    },
    AttentionBackwardDq {
        head_dim: u32,
        wg: u32,
    },
    AttentionBackwardDkv {
        head_dim: u32,
        wg: u32,
    },
    CopyRows,
    CopyRowsBackward,
    GatherRows,
    GatherRowsBackward,
    Patchify,
    SplitHeads,
    MergeHeads,
    LayerNormForward,
    LayerNormBackwardRows,
    ColumnPartials,
    LayerNormParamPartials,
    ColumnSumFinish,
    NormalizeRows,
    /// The row kernels with one workgroup per row (`per_row.rs`).
    LayerNormForwardGroup,
    LayerNormBackwardRowsGroup,
    NormalizeRowsGroup,
    SoftmaxForwardGroup,
    SoftmaxBackwardGroup,
    GeluForward,
    BiasGelu,
    GeluBackward,
    SoftmaxForward,
    SoftmaxBackward,
    /// Each row's mean squared error, one invocation or one workgroup per row (`per_row.rs`).
    MseRows,
    MseRowsGroup,
    MseForward,
    MseCoefficient,
    MseBackward,
    AdamW,
}

impl Kernel {
    /// The file, entry point and storage bindings of the kernel.
    fn spec(self) -> (Family, &'static str, &'static [Access]) {
        match self {
            Kernel::Fill => (Family::Memory, "fill", &[W]),
            Kernel::Add => (Family::Memory, "add", &[R, W]),
            Kernel::Scale => (Family::Memory, "scale", &[W]),
            Kernel::ScaleRows => (Family::Memory, "scale_rows", &[R, R, W]),
            Kernel::SumSlices => (Family::Memory, "sum_slices", &[R, W]),
            Kernel::Gemm { .. } => (Family::Gemm, "gemm", &[R, R, W]),
            Kernel::GemmTiled { .. } => (Family::GemmTiled, "gemm_tiled", &[R, R, W]),
            Kernel::GemmWide { .. } => (Family::GemmWide, "gemm_wide", &[R, R, W]),
            Kernel::GemmFast { .. } => (Family::GemmFast, "gemm_fast", &[R, R, W]),
            Kernel::AttentionForward { .. } => (Family::Attention, "attention_forward", &[R, W, W]),
            Kernel::AttentionBackwardDq { .. } => (
                Family::Attention,
                "attention_backward_dq",
                &[R, R, R, R, W, W],
            ),
            Kernel::AttentionBackwardDkv { .. } => (
                Family::Attention,
                "attention_backward_dkv",
                &[R, R, R, R, W],
            ),
            Kernel::CopyRows => (Family::Rows, "copy_rows", &[R, W]),
            Kernel::CopyRowsBackward => (Family::Rows, "copy_rows_backward", &[R, W]),
            Kernel::GatherRows => (Family::Rows, "gather_rows", &[R, R, W]),
            Kernel::GatherRowsBackward => (Family::Rows, "gather_rows_backward", &[R, R, W]),
            Kernel::Patchify => (Family::Rows, "patchify", &[R, W]),
            Kernel::SplitHeads => (Family::Rows, "split_heads", &[R, W]),
            Kernel::MergeHeads => (Family::Rows, "merge_heads", &[R, W]),
            Kernel::LayerNormForward => (Family::Norm, "layernorm_forward", &[R, R, R, W, W, W]),
            Kernel::LayerNormBackwardRows => {
                (Family::Norm, "layernorm_backward_rows", &[R, R, R, R, R, W])
            }
            Kernel::ColumnPartials => (Family::Columns, "column_partials", &[R, W]),
            Kernel::LayerNormParamPartials => (
                Family::Columns,
                "layernorm_param_partials",
                &[R, R, R, R, W],
            ),
            Kernel::ColumnSumFinish => (Family::Columns, "column_sum_finish", &[R, W]),
            Kernel::NormalizeRows => (Family::Norm, "normalize_rows", &[R, W]),
            Kernel::LayerNormForwardGroup => {
                (Family::Norm, "layernorm_forward_group", &[R, R, R, W, W, W])
            }
            Kernel::LayerNormBackwardRowsGroup => (
                Family::Norm,
                "layernorm_backward_rows_group",
                &[R, R, R, R, R, W],
            ),
            Kernel::NormalizeRowsGroup => (Family::Norm, "normalize_rows_group", &[R, W]),
            Kernel::GeluForward => (Family::Activation, "gelu_forward", &[R, W]),
            Kernel::BiasGelu => (Family::Activation, "bias_gelu_forward", &[R, W, W]),
            Kernel::GeluBackward => (Family::Activation, "gelu_backward", &[R, R, W]),
            Kernel::SoftmaxForward => (Family::Activation, "softmax_forward", &[R, W]),
            Kernel::SoftmaxBackward => (Family::Activation, "softmax_backward", &[R, R, W]),
            Kernel::SoftmaxForwardGroup => (Family::Activation, "softmax_forward_group", &[R, W]),
            Kernel::SoftmaxBackwardGroup => {
                (Family::Activation, "softmax_backward_group", &[R, R, W])
            }
            Kernel::MseRows => (Family::Loss, "mse_rows", &[R, R, W]),
            Kernel::MseRowsGroup => (Family::Loss, "mse_rows_group", &[R, R, W]),
            Kernel::MseForward => (Family::Loss, "mse_forward", &[R, R, W]),
            Kernel::MseCoefficient => (Family::Loss, "mse_coefficient", &[R, W]),
            Kernel::MseBackward => (Family::Loss, "mse_backward", &[R, R, R, R, W]),
            Kernel::AdamW => (Family::AdamW, "adamw", &[W, R, W, W]),
        }
    }

    /// Values of the WGSL `override` constants.
    fn constants(self) -> Vec<(&'static str, f64)> {
        match self {
            Kernel::Gemm { trans_a, trans_b }
            | Kernel::GemmTiled { trans_a, trans_b }
            | Kernel::GemmWide { trans_a, trans_b }
            | Kernel::GemmFast { trans_a, trans_b } => vec![
                ("TRANS_A", f64::from(u8::from(trans_a))),
                ("TRANS_B", f64::from(u8::from(trans_b))),
            ],
            Kernel::AttentionForward { head_dim, wg }
            | Kernel::AttentionBackwardDq { head_dim, wg }
            | Kernel::AttentionBackwardDkv { head_dim, wg } => {
                vec![("HD", f64::from(head_dim)), ("ATT_WG", f64::from(wg))]
            }
            _ => Vec::new(),
        }
    }
}

/// A compiled kernel and the layout its bind groups follow.
struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Commands recorded but not yet submitted.
#[derive(Default)]
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    ops: u32,
}

/// The pipeline cache and the pending command encoder.
pub(crate) struct Kernels {
    modules: Mutex<HashMap<Family, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<Kernel, Arc<Pipeline>>>,
    pending: Mutex<Pending>,
    /// `MAE_WGPU_PROFILE`: wall time per kernel, printed when dropped.
    profile: Option<Profile>,
}

/// Workgroup counts `(x, y)` covering `threads` invocations of a 1-D kernel with [`WG`]
/// invocations per group, folded into two dimensions so that neither exceeds [`MAX_GROUPS`].
/// The kernels recover the flat index with `flat_id` (`common.wgsl`) and skip the excess.
pub(crate) fn grid_1d(threads: usize) -> [u32; 3] {
    let groups = threads.div_ceil(WG as usize);
    if groups == 0 {
        return [0, 0, 0];
    }
    let x = groups.min(MAX_GROUPS as usize);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// A `u32` kernel parameter, or the error for a size the kernels cannot index.
pub(crate) fn word(v: usize) -> BResult<u32> {
    u32::try_from(v).map_err(|_| {
        BackendError::new(
            BackendErrorKind::TooLarge {
                len: v,
                max: u32::MAX as usize,
            },
            "the wgpu kernels index with 32 bits",
        )
    })
}

impl Kernels {
    pub(crate) fn new() -> Kernels {
        Kernels {
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            profile: Profile::from_env(),
        }
    }

    /// Compiles `kernel` now rather than at its first launch.
    #[cfg(test)]
    pub(crate) fn prepare(&self, gpu: &Gpu, kernel: Kernel) -> BResult<()> {
        self.pipeline(gpu, kernel).map(|_| ())
    }

    fn pipeline(&self, gpu: &Gpu, kernel: Kernel) -> BResult<Arc<Pipeline>> {
        if let Some(p) = lock(&self.pipelines).get(&kernel) {
            return Ok(Arc::clone(p));
        }
        let (family, entry, access) = kernel.spec();
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(&family) {
                Some(m) => m.clone(),
                None => {
                    let source = format!("{COMMON}\n{}", family.source());
                    let m = gpu.scoped(0, || {
                        gpu.device
                            .create_shader_module(wgpu::ShaderModuleDescriptor {
                                label: Some(entry),
                                source: wgpu::ShaderSource::Wgsl(source.into()),
                            })
                    })?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, a) in access.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *a == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let constants = kernel.constants();
        let pipeline = gpu.scoped(0, || {
            let layout = gpu
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(entry),
                    entries: &entries,
                });
            let pipeline_layout =
                gpu.device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(entry),
                        bind_group_layouts: &[Some(&layout)],
                        immediate_size: 0,
                    });
            let pipeline = gpu
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Kernels write their workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            Pipeline { pipeline, layout }
        })?;
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines).insert(kernel, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// Records `kernel` over `groups` workgroups with `params` (at most 16 words) and the storage
    /// buffers `bufs`, in the kernel's binding order. An empty grid records nothing.
    pub(crate) fn launch(
        &self,
        gpu: &Gpu,
        kernel: Kernel,
        params: &[u32],
        bufs: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> BResult<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        if groups.iter().any(|&g| g > MAX_GROUPS) {
            return Err(BackendError::new(
                BackendErrorKind::TooLarge {
                    len: groups.iter().copied().max().unwrap_or(0) as usize,
                    max: MAX_GROUPS as usize,
                },
                format!("{kernel:?}: workgroups per dimension"),
            ));
        }
        debug_assert_eq!(bufs.len(), kernel.spec().2.len(), "{kernel:?} bindings");
        let pipeline = self.pipeline(gpu, kernel)?;
        // A uniform block is at least 16 bytes and a multiple of 16.
        let mut words = [0u32; 16];
        words[..params.len()].copy_from_slice(params);
        let used = params.len().max(1).div_ceil(4) * 4;
        let uniform = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&words[..used]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        let start = match &self.profile {
            Some(_) => Some(self.drain(gpu)?),
            None => None,
        };
        self.record(gpu, |encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
        if let (Some(p), Some(start)) = (&self.profile, start) {
            self.drain(gpu)?;
            p.add(format!("{kernel:?} {groups:?}"), start.elapsed());
        }
        Ok(())
    }

    /// Submits what is pending and waits for the queue to go idle (for the profile).
    fn drain(&self, gpu: &Gpu) -> BResult<Instant> {
        self.flush(gpu);
        gpu.wait()?;
        Ok(Instant::now())
    }

    /// Records commands into the pending encoder, submitting it when it is full.
    pub(crate) fn record(&self, gpu: &Gpu, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut pending = lock(&self.pending);
        let encoder = pending.encoder.get_or_insert_with(|| {
            gpu.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
        });
        f(encoder);
        pending.ops += 1;
        if pending.ops >= MAX_PENDING {
            Self::submit(gpu, &mut pending);
        }
    }

    fn submit(gpu: &Gpu, pending: &mut Pending) {
        if let Some(encoder) = pending.encoder.take() {
            gpu.queue.submit([encoder.finish()]);
        }
        pending.ops = 0;
    }

    /// Submits everything recorded so far.
    pub(crate) fn flush(&self, gpu: &Gpu) {
        Self::submit(gpu, &mut lock(&self.pending));
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprint!("{}", p.report());
        }
    }
}
