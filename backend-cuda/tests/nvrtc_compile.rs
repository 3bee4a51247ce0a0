//! Every kernel compiles with NVRTC for the architectures the project targets. Needs `libnvrtc`
//! but no GPU: where it is missing the test prints `SKIP` and passes, unless
//! `MAE_REQUIRE_BACKENDS` names `cuda` (the GPU check sets it), where it fails.
//!
//! To run it on a machine without CUDA: `pip install nvidia-cuda-nvrtc` (or
//! `nvidia-cuda-nvrtc-cu12` with `--no-default-features --features cuda-12`) and put the wheel's
//! `lib` folder on `LD_LIBRARY_PATH`.

use mae_backend_cuda::kernels::{compile_ptx, compile_ptx_for};
use mae_backend_cuda::Library;
use std::io::Write;

/// Ampere (A100), Ada (L4, RTX 40xx) and Hopper (H100, H200).
const ARCHS: &[&str] = &["compute_80", "compute_89", "compute_90"];

fn required() -> bool {
    std::env::var("MAE_REQUIRE_BACKENDS")
        .unwrap_or_default()
        .split(',')
        .any(|b| b.trim().eq_ignore_ascii_case("cuda"))
}

#[test]
fn every_kernel_compiles_for_each_target_architecture() {
    if !Library::Nvrtc.is_present() {
        let why = format!(
            "libnvrtc not found (searched {})",
            Library::Nvrtc.candidates().join(", ")
        );
        assert!(
            !required(),
            "cuda is required by MAE_REQUIRE_BACKENDS: {why}"
        );
        // Past libtest's output capture: a skip must be visible.
        let _ = writeln!(std::io::stderr(), "SKIP cuda kernels compile: {why}");
        return;
    }
    for arch in ARCHS {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for k in [
            "fill_f32",
            "adamw",
            "adamw_many",
            "copy_rows_backward_partials",
            "layernorm_backward_dx",
            "softmax_forward",
            "masked_mse_backward",
        ] {
            assert!(
                text.contains(&format!(".entry {k}(")),
                "{arch}: kernel {k} missing from the PTX"
            );
        }
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(text.contains(&target), "{arch}: PTX lacks {target:?}");
        let _ = writeln!(
            std::io::stderr(),
            "cuda kernels compile for {arch}: {} bytes of PTX",
            text.len()
        );
    }
    // `MAE_CUDA_ATTENTION_OCCUPANCY`: the tensor-core attention kernels ask for one block more
    // or fewer per multiprocessor (the hd32 forward's own is 5).
    for (delta, blocks) in [(0, 5), (1, 6), (-1, 4)] {
        let ptx = compile_ptx_for("compute_90", delta).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        let entry = text
            .split(".entry ")
            .find(|e| e.starts_with("attention_forward_mma_bf16_hd32("))
            .expect("the hd32 forward in the PTX");
        let head = &entry[..entry.find('{').expect("the kernel's body")];
        assert!(
            head.contains(&format!(".minnctapersm {blocks}")),
            "blocks {delta:+}: {head}"
        );
    }
}
