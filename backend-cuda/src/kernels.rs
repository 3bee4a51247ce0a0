//! The CUDA C kernels: their sources, the parameter list of each, and their compilation with
//! NVRTC into one module for the device's architecture, done once per backend at first use.
//!
//! Kernel parameters cross an untyped boundary (`cuLaunchKernel` takes an array of pointers), so
//! each kernel's parameter kinds are written down here ([`Kernel::params`]) and every launch is
//! checked against them; a unit test parses the CUDA sources and checks that the table matches
//! the signatures there.

use crate::error;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use mae::backend::BackendError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// The prelude and the kernel files, in the order they are concatenated into one program.
pub const SOURCES: &[(&str, &str)] = &[
    ("prelude.cuh", include_str!("kernels/prelude.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("rows.cu", include_str!("kernels/rows.cu")),
    ("norm.cu", include_str!("kernels/norm.cu")),
    ("softmax.cu", include_str!("kernels/softmax.cu")),
    ("loss.cu", include_str!("kernels/loss.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("attention_mma.cu", include_str!("kernels/attention_mma.cu")),
];

/// The whole program: every file of [`SOURCES`], each introduced by a `#line` directive so
/// that compiler messages name the file and line they come from.
pub fn program_source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// The NVRTC options: the virtual architecture `arch` (`compute_90`; the driver finishes the
/// compile for the exact chip when it loads the PTX), IEEE division and square root, no flush
/// of denormals, and no contraction of `a * b + c` into FMAs, so that the kernels round as the
/// CPU reference does.
pub fn compile_options(arch: &str) -> CompileOptions {
    compile_options_for(arch, 0)
}

/// [`compile_options`] with every tensor-core attention kernel asking for `attention_blocks`
/// more resident blocks per multiprocessor than its own (`MAE_CUDA_ATTENTION_OCCUPANCY`:
/// `attention_mma.cu`'s `MMA_BLOCKS_DELTA`).
pub fn compile_options_for(arch: &str, attention_blocks: i32) -> CompileOptions {
    let mut options = vec![format!("--gpu-architecture={arch}")];
    if attention_blocks != 0 {
        options.push(format!("-DMMA_BLOCKS_DELTA={attention_blocks}"));
    }
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        options,
        name: Some("mae_kernels.cu".into()),
        ..Default::default()
    }
}

/// The virtual architecture NVRTC compiles for on a device of compute capability
/// `major.minor`.
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles every kernel to PTX for `arch` (`compute_80`, `compute_90`, ...). Needs `libnvrtc`
/// but no GPU and no driver.
pub fn compile_ptx(arch: &str) -> Result<Ptx, BackendError> {
    compile_ptx_for(arch, 0)
}

/// [`compile_ptx`] with the options of [`compile_options_for`].
pub fn compile_ptx_for(arch: &str, attention_blocks: i32) -> Result<Ptx, BackendError> {
    let src = program_source();
    // cudarc unwraps a few NVRTC results internally (the log after a failed compile): a
    // panic there becomes an error, not a crash of the caller.
    let result = catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(&src, compile_options_for(arch, attention_blocks))
    }));
    match result {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(CompileError::CompileError { nvrtc, log, .. })) => Err(error::device(format!(
            "NVRTC failed to compile the kernels for {arch} ({:?}):\n{}",
            nvrtc.0,
            log.to_string_lossy()
        ))),
        Ok(Err(e)) => Err(error::device(format!("NVRTC failed for {arch}: {e:?}"))),
        Err(_) => Err(error::device(format!(
            "NVRTC panicked while compiling the kernels for {arch}"
        ))),
    }
}

/// The kind of one kernel parameter, as the launch passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    /// A device pointer (`float*`, `const u32*`, `double*`, ...), passed as its 64-bit address.
    Ptr,
    /// `u64` (`unsigned long long`): every size and index.
    U64,
    /// `u32` (`unsigned int`): flags.
    U32,
    /// `float`.
    F32,
}

/// One kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    Ptr(u64),
    U64(u64),
    U32(u32),
    F32(f32),
}

impl Arg {
    pub(crate) fn param(&self) -> Param {
        match self {
            Arg::Ptr(_) => Param::Ptr,
            Arg::U64(_) => Param::U64,
            Arg::U32(_) => Param::U32,
            Arg::F32(_) => Param::F32,
        }
    }
}

macro_rules! kernels {
    ($($variant:ident = $name:literal ($($p:ident),*);)*) => {
        /// Every kernel of the program.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kernel { $($variant),* }

        impl Kernel {
            /// All kernels, in declaration order (the index of each is `kernel as usize`).
            pub(crate) const ALL: &'static [Kernel] = &[$(Kernel::$variant),*];

            /// The `extern "C"` name in the CUDA source.
            pub(crate) fn name(self) -> &'static str {
                match self { $(Kernel::$variant => $name),* }
            }

            /// The parameter kinds, in order.
            pub(crate) fn params(self) -> &'static [Param] {
                match self { $(Kernel::$variant => &[$(Param::$p),*]),* }
            }
        }
    };
}

kernels! {
    Fill = "fill_f32" (Ptr, U64, F32);
    Add = "add_f32" (Ptr, Ptr, U64);
    SumPartials = "sum_partials_f32" (Ptr, Ptr, U64, F32, Ptr, Ptr, U64, F32, U32);
    Scale = "scale_f32" (Ptr, U64, F32);
    ScaleRows = "scale_rows" (Ptr, Ptr, Ptr, U64, U64, U32);
    GeluForward = "gelu_forward" (Ptr, Ptr, Ptr, Ptr, U64);
    BiasGeluForward = "bias_gelu_forward" (Ptr, Ptr, Ptr, Ptr, U64, U64);
    GeluBackward = "gelu_backward" (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U32);
    GeluForwardF32 = "gelu_forward_f32" (Ptr, Ptr, Ptr, Ptr, U64);
    BiasGeluForwardF32 = "bias_gelu_forward_f32" (Ptr, Ptr, Ptr, Ptr, U64, U64);
    GeluBackwardF32 = "gelu_backward_f32" (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U32);
    AdamW = "adamw" (Ptr, Ptr, Ptr, Ptr, U64, F32, F32, F32, F32, F32, F32, F32, F32);
    AdamWMany = "adamw_many" (Ptr, U64, U64);
    RoundToBf16 = "round_to_bf16" (Ptr, Ptr, U64);
    FloatsOfBf16 = "floats_of_bf16" (Ptr, Ptr, U64);
    CopyRows = "copy_rows" (Ptr, Ptr, U64, U64, U64, U64, U64, U64, U64, U64, U32);
    CopyRowsBackwardPartials = "copy_rows_backward_partials"
        (Ptr, Ptr, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64);
    CopyRowsBackwardFinish = "copy_rows_backward_finish"
        (Ptr, Ptr, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64);
    GatherRows = "gather_rows" (Ptr, Ptr, Ptr, U64, U64, U64, U64, U64, U64, U64, U64);
    GatherRowsBackward = "gather_rows_backward"
        (Ptr, Ptr, Ptr, U64, U64, U64, U64, U64, U64, U64, U64);
    Patchify = "patchify" (Ptr, Ptr, U64, U64, U64, U64, U64, U32);
    SplitHeads = "split_heads" (Ptr, Ptr, U64, U64, U64, U64, U64, U64);
    MergeHeads = "merge_heads" (Ptr, Ptr, U64, U64, U64, U64, U64, U64);
    LayerNormForward = "layernorm_forward" (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, F32);
    LayerNormBackwardDx = "layernorm_backward_dx"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64);
    LayerNormParamPartials = "layernorm_param_partials"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64);
    ColumnSumPartials = "column_sum_partials" (Ptr, Ptr, U64, U64, U64, U64, U64);
    ColumnSumPartialsBf16 = "column_sum_partials_bf16" (Ptr, Ptr, U64, U64, U64, U64, U64);
    ColumnSumFinish = "column_sum_finish" (Ptr, Ptr, U64, U64);
    ColumnSumFinishPair = "column_sum_finish_pair" (Ptr, Ptr, Ptr, Ptr, U64, U64);
    NormalizeRows = "normalize_rows" (Ptr, Ptr, U64, U64, F32);
    SoftmaxForward = "softmax_forward" (Ptr, Ptr, U64, U64, F32);
    SoftmaxBackward = "softmax_backward" (Ptr, Ptr, Ptr, U64, U64, F32);
    MaskedMseRows = "masked_mse_rows" (Ptr, Ptr, Ptr, Ptr, U64, U64);
    MaskedMseTotal = "masked_mse_total" (Ptr, Ptr, Ptr, U64);
    MaskSum = "mask_sum" (Ptr, Ptr, U64);
    MaskedMseBackward = "masked_mse_backward" (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, F32);
    AttentionForwardHd32 = "attention_forward_hd32" (Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionForwardHd64 = "attention_forward_hd64" (Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionBackwardDqHd32 = "attention_backward_dq_hd32"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionBackwardDqHd64 = "attention_backward_dq_hd64"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionBackwardDkvHd32 = "attention_backward_dkv_hd32"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionBackwardDkvHd64 = "attention_backward_dkv_hd64"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32);
    AttentionForwardMma = "attention_forward_mma"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDqMma = "attention_backward_dq_mma"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDkvMma = "attention_backward_dkv_mma"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionForwardMmaBf16Hd32 = "attention_forward_mma_bf16_hd32"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionForwardMmaBf16Hd64 = "attention_forward_mma_bf16_hd64"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDqMmaBf16Hd32 = "attention_backward_dq_mma_bf16_hd32"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDqMmaBf16Hd64 = "attention_backward_dq_mma_bf16_hd64"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDkvMmaBf16Hd32 = "attention_backward_dkv_mma_bf16_hd32"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDkvMmaBf16Hd64 = "attention_backward_dkv_mma_bf16_hd64"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionForwardMmaTail = "attention_forward_mma_tail"
        (Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDqMmaTail = "attention_backward_dq_mma_tail"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
    AttentionBackwardDkvMmaTail = "attention_backward_dkv_mma_tail"
        (Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64, F32, U32);
}

/// Checks `args` against the parameter list of `kernel`: a mismatch is a bug in this crate,
/// reported as an error instead of a launch that would read garbage.
pub(crate) fn check_args(kernel: Kernel, args: &[Arg]) -> Result<(), BackendError> {
    let got: Vec<Param> = args.iter().map(Arg::param).collect();
    if got == kernel.params() {
        Ok(())
    } else {
        Err(error::device(format!(
            "bug: kernel {} takes {:?}, was given {got:?}",
            kernel.name(),
            kernel.params()
        )))
    }
}

/// The compiled module and a handle to every kernel in it, indexed by `Kernel as usize`.
pub(crate) struct Compiled {
    functions: Vec<CudaFunction>,
    _module: Arc<CudaModule>,
}

impl Compiled {
    /// Compiles the program for `arch` (with `attention_blocks` as in [`compile_options_for`])
    /// and loads it into `ctx`.
    pub(crate) fn build(
        ctx: &Arc<CudaContext>,
        arch: &str,
        attention_blocks: i32,
    ) -> Result<Compiled, BackendError> {
        let ptx = compile_ptx_for(arch, attention_blocks)?;
        let module = ctx.load_module(ptx).map_err(|e| {
            error::driver(e, &format!("loading the kernels compiled for {arch}"), 0)
        })?;
        let functions = Kernel::ALL
            .iter()
            .map(|k| {
                module
                    .load_function(k.name())
                    .map_err(|e| error::driver(e, &format!("finding kernel {}", k.name()), 0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Compiled {
            functions,
            _module: module,
        })
    }

    pub(crate) fn function(&self, kernel: Kernel) -> &CudaFunction {
        &self.functions[kernel as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, parameter kinds)` of every `extern "C" __global__` function in the sources.
    fn parse_signatures(src: &str) -> Vec<(String, Vec<Param>)> {
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(at) = rest.find("extern \"C\" __global__ void ") {
            rest = rest[at + "extern \"C\" __global__ void ".len()..].trim_start();
            // An occupancy hint between the return type and the name.
            if let Some(hinted) = rest.strip_prefix("__launch_bounds__(") {
                rest = hinted[hinted.find(')').unwrap() + 1..].trim_start();
            }
            let open = rest.find('(').unwrap();
            let close = rest.find(')').unwrap();
            let name = rest[..open].trim().to_string();
            let params = rest[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                    if p.contains('*') {
                        Param::Ptr
                    } else if p.starts_with("u64 ") {
                        Param::U64
                    } else if p.starts_with("u32 ") {
                        Param::U32
                    } else if p.starts_with("float ") {
                        Param::F32
                    } else {
                        panic!("kernel {name}: parameter kind of {p:?} unknown")
                    }
                })
                .collect();
            out.push((name, params));
            rest = &rest[close..];
        }
        out
    }

    #[test]
    fn parameter_table_matches_the_cuda_sources() {
        let parsed = parse_signatures(&program_source());
        assert_eq!(
            parsed.len(),
            Kernel::ALL.len(),
            "kernels in source vs table"
        );
        for k in Kernel::ALL {
            let (_, params) = parsed
                .iter()
                .find(|(n, _)| n == k.name())
                .unwrap_or_else(|| panic!("kernel {} not in the sources", k.name()));
            assert_eq!(params.as_slice(), k.params(), "kernel {}", k.name());
        }
    }

    #[test]
    fn kernel_indices_follow_declaration_order() {
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn block_size_agrees_with_the_cuda_prelude() {
        let want = format!("#define BLOCK {}\n", crate::launch::BLOCK);
        assert!(
            program_source().contains(&want),
            "prelude must say {want:?}"
        );
    }

    #[test]
    fn attention_block_size_agrees_with_the_cuda_source() {
        let want = format!("#define ATT_THREADS {}\n", crate::launch::ATTENTION_THREADS);
        assert!(
            program_source().contains(&want),
            "attention.cu must say {want:?}"
        );
    }

    #[test]
    fn tensor_core_attention_sizes_agree_with_the_cuda_source() {
        for want in [
            format!(
                "#define MMA_THREADS {}\n",
                crate::launch::ATTENTION_MMA_THREADS
            ),
            format!("#define MMA_ROWS {}\n", crate::launch::ATTENTION_MMA_ROWS),
            format!(
                "#define MMA_PREFETCH {}u\n",
                crate::launch::ATTENTION_MMA_PREFETCH
            ),
            format!(
                "#define MMA_SPLIT {}u\n",
                crate::launch::ATTENTION_MMA_SPLIT
            ),
        ] {
            assert!(
                program_source().contains(&want),
                "attention_mma.cu must say {want:?}"
            );
        }
    }

    #[test]
    fn layernorm_row_width_agrees_with_the_cuda_source() {
        let want = format!(
            "#define LN_HELD {}\n",
            crate::launch::LAYERNORM_WARP_COLS / 32
        );
        assert!(
            program_source().contains(&want),
            "norm.cu must say {want:?}"
        );
    }

    #[test]
    fn fused_layernorm_width_agrees_with_the_cuda_source() {
        let per_thread = crate::launch::LAYERNORM_FUSED_COLS / crate::launch::BLOCK as u64;
        let want = format!("#define LN_FUSED_PER_THREAD {per_thread}\n");
        assert!(
            program_source().contains(&want),
            "norm.cu must say {want:?}"
        );
    }

    #[test]
    fn layernorm_backward_blocks_agree_with_the_cuda_source() {
        let want = format!(
            "#define LN_BACKWARD_PER_SM {}\n",
            crate::launch::LAYERNORM_BACKWARD_PER_SM
        );
        assert!(
            program_source().contains(&want),
            "norm.cu must say {want:?}"
        );
    }

    #[test]
    fn mismatched_arguments_are_refused() {
        let ok = [Arg::Ptr(0), Arg::U64(3), Arg::F32(1.0)];
        check_args(Kernel::Fill, &ok).unwrap();
        let e = check_args(Kernel::Fill, &ok[..2]).unwrap_err();
        assert!(e.message.contains("fill_f32"), "{e}");
        let swapped = [Arg::Ptr(0), Arg::F32(1.0), Arg::U64(3)];
        assert!(check_args(Kernel::Fill, &swapped).is_err());
    }

    #[test]
    fn options_pin_the_rounding_and_the_architecture() {
        assert_eq!(arch_for(9, 0), "compute_90");
        let o = compile_options("compute_90");
        assert_eq!(o.fmad, Some(false));
        assert_eq!(o.ftz, Some(false));
        assert!(o
            .options
            .contains(&"--gpu-architecture=compute_90".to_string()));
        assert!(!o.options.iter().any(|d| d.contains("MMA_BLOCKS_DELTA")));
        for (delta, define) in [(1, "-DMMA_BLOCKS_DELTA=1"), (-1, "-DMMA_BLOCKS_DELTA=-1")] {
            let o = compile_options_for("compute_90", delta);
            assert!(o.options.contains(&define.to_string()), "{:?}", o.options);
            assert_eq!((o.fmad, o.ftz), (Some(false), Some(false)));
        }
    }
}
