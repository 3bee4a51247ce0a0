//! Backend-specific checks; the op semantics are tested in `mae-conformance` on every backend.
//! Each test skips (and says so) when no adapter exists.

use super::*;
use mae::backend::BackendErrorKind;
use std::sync::OnceLock;

fn be() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("SKIP wgpu: {e}");
            None
        }
    })
    .as_ref()
}

fn down(be: &WgpuBackend, b: &Buf) -> Vec<f32> {
    let mut host = vec![0.0; b.len()];
    be.download(b, &mut host).unwrap();
    host
}

#[test]
fn every_kernel_compiles() {
    let Some(be) = be() else { return };
    let kernels = [
        Kernel::Fill,
        Kernel::Add,
        Kernel::Scale,
        Kernel::ScaleRows,
        Kernel::Gemm {
            trans_a: false,
            trans_b: false,
        },
        Kernel::Gemm {
            trans_a: true,
            trans_b: true,
        },
        Kernel::CopyRows,
        Kernel::CopyRowsBackward,
        Kernel::GatherRows,
        Kernel::GatherRowsBackward,
        Kernel::Patchify,
        Kernel::SplitHeads,
        Kernel::MergeHeads,
        Kernel::LayerNormForward,
        Kernel::LayerNormBackwardRows,
        Kernel::LayerNormBackwardCols,
        Kernel::NormalizeRows,
        Kernel::GeluForward,
        Kernel::GeluBackward,
        Kernel::SoftmaxForward,
        Kernel::SoftmaxBackward,
        Kernel::MseForward,
        Kernel::MseCoefficient,
        Kernel::MseBackward,
        Kernel::AdamW,
    ];
    for k in kernels {
        if let Err(e) = be.kernels.prepare(&be.gpu, k) {
            panic!("{k:?}: {e}");
        }
    }
    be.sync().unwrap();
}

/// An instance with no graphics API enabled has no adapter: a typed error, not a panic. (This
/// needs no GPU, so it runs everywhere.)
#[test]
fn no_adapter_is_a_no_device_error() {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::empty();
    match Gpu::from_instance(desc) {
        Err(e) => assert_eq!(e.kind, BackendErrorKind::NoDevice, "{e}"),
        Ok(_) => panic!("an adapter without any backend"),
    }
}

#[test]
fn empty_buffers_have_length_zero_and_work_with_every_memory_op() {
    let Some(be) = be() else { return };
    let mut e = be.alloc(0).unwrap();
    assert_eq!(be.len(&e), 0);
    be.fill(&mut e, 1.0).unwrap();
    be.scale(&mut e, 2.0).unwrap();
    let src = be.upload(&[]).unwrap();
    be.copy(&src, &mut e).unwrap();
    be.write(&mut e, &[]).unwrap();
    assert!(down(be, &e).is_empty());
    assert_eq!(be.idx_len(&be.upload_idx(&[]).unwrap()), 0);
    be.sync().unwrap();
}

#[test]
fn buffers_longer_than_a_binding_are_refused_with_the_sizes() {
    let Some(be) = be() else { return };
    let max = be.max_buf_len();
    assert!(max >= 1 << 20, "max_buf_len {max}");
    let err = be.alloc(max + 1).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::TooLarge { len: max + 1, max });
    let err = be.upload(&[]).map(|b| b.len());
    assert_eq!(err, Ok(0));
}

/// wgpu reports validation errors asynchronously and by default panics on them; the backend
/// records the error and returns it, typed, from the next sync (once).
#[test]
fn an_asynchronous_validation_error_is_a_typed_error_at_sync() {
    if be().is_none() {
        return;
    }
    // A backend of its own: the error must not reach the other tests' syncs.
    let be = WgpuBackend::new().unwrap();
    // MAP_READ may only be combined with COPY_DST: a validation error outside any error scope.
    let _bad = be.gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("invalid on purpose"),
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let err = be.sync().unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Device, "{err}");
    be.sync().unwrap();
}

#[test]
fn mismatched_host_lengths_are_errors_not_panics() {
    let Some(be) = be() else { return };
    let mut b = be.alloc(3).unwrap();
    assert!(be.write(&mut b, &[1.0, 2.0]).is_err());
    let mut host = [0.0; 4];
    assert!(be.download(&b, &mut host).is_err());
}

/// scale_rows with buffers that disagree with `scales.len() * rows_per_scale * cols` is a typed
/// error that leaves `dst` as it was, not a read past the end or half an update.
#[test]
fn scale_rows_refuses_mismatched_lengths() {
    let Some(be) = be() else { return };
    let scales = be.upload(&[2.0, 3.0]).unwrap();
    let (src6, src5) = (be.upload(&[1.0; 6]).unwrap(), be.upload(&[1.0; 5]).unwrap());
    let mut dst = be.upload(&[7.0; 6]).unwrap();
    let err = be
        .scale_rows(&src5, &scales, &mut dst, 1, 3, false)
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Device, "{err}");
    assert!(err.message.contains("src holds 5"), "{err}");
    let mut short = be.upload(&[7.0; 4]).unwrap();
    assert!(be
        .scale_rows(&src6, &scales, &mut short, 1, 3, true)
        .is_err());
    assert!(be
        .scale_rows(&src6, &scales, &mut dst, usize::MAX, 2, false)
        .is_err());
    assert_eq!(down(be, &dst), [7.0; 6]);
    be.scale_rows(&src6, &scales, &mut dst, 1, 3, true).unwrap();
    assert_eq!(down(be, &dst), [9.0, 9.0, 9.0, 10.0, 10.0, 10.0]);
}

/// More than 65535 workgroups of 256: the launch folds into a 2-D grid and still covers every
/// element exactly once.
#[test]
fn one_dimensional_ops_beyond_65535_workgroups_cover_every_element() {
    let Some(be) = be() else { return };
    let n = 65535 * 256 + 1000;
    let mut b = be.alloc(n).unwrap();
    be.fill(&mut b, 1.5).unwrap();
    be.scale(&mut b, 2.0).unwrap();
    let host = down(be, &b);
    assert!(host.iter().all(|&x| x == 3.0));
}

#[test]
fn gemm_by_hand_all_transposes() {
    let Some(be) = be() else { return };
    // A = [[1, 2, 3], [4, 5, 6]], B = [[1, 0], [0, 1], [1, 1]]: A B = [[4, 5], [10, 11]].
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
    let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let bt = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut g = Gemm::new(2, 2, 3);
        g.trans_a = ta;
        g.trans_b = tb;
        let ab = be.upload(if ta { &at } else { &a }).unwrap();
        let bb = be.upload(if tb { &bt } else { &b }).unwrap();
        let mut c = be.upload(&[f32::NAN; 4]).unwrap();
        be.gemm(&g, &ab, &bb, &mut c).unwrap();
        assert_eq!(down(be, &c), [4.0, 5.0, 10.0, 11.0], "trans {ta} {tb}");
    }
}

#[test]
fn the_adapter_is_named() {
    let Some(be) = be() else { return };
    assert!(!be.adapter_info().name.is_empty());
    assert!(format!("{be:?}").contains(&be.adapter_info().name));
}

/// GEMM on every transpose combination, on blocks cut by the edges of C (8 x 8 per invocation,
/// 64 x 64 per workgroup), with a padded batch, a broadcast operand, alpha and beta, against a
/// plain host product.
#[test]
fn gemm_matches_the_host_product_across_block_edges() {
    let Some(be) = be() else { return };
    for (ta, tb, m, n, k) in [
        (false, false, 8, 8, 8),
        (true, false, 9, 70, 7),
        (false, true, 67, 13, 12),
        (true, true, 3, 129, 5),
    ] {
        let batch = 2;
        let mut g = Gemm::new(m, n, k)
            .alpha(0.5)
            .batched(batch, m * k + 3, 0, m * n + 1);
        g.trans_a = ta;
        g.trans_b = tb;
        g.beta = 1.0;
        let (la, lb, lc) = g.lens();
        let val = |i: usize, s: usize| ((i * s % 23) as f32 - 11.0) / 8.0;
        let a: Vec<f32> = (0..la).map(|i| val(i, 7)).collect();
        let b: Vec<f32> = (0..lb).map(|i| val(i, 5)).collect();
        let c0: Vec<f32> = (0..lc).map(|i| val(i, 3)).collect();
        let mut want = c0.clone();
        for item in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0f64;
                    for t in 0..k {
                        let av = if ta {
                            a[item * g.stride_a + t * m + i]
                        } else {
                            a[item * g.stride_a + i * k + t]
                        };
                        let bv = if tb { b[j * k + t] } else { b[t * n + j] };
                        s += av as f64 * bv as f64;
                    }
                    let at = item * g.stride_c + i * n + j;
                    want[at] = (0.5 * s + c0[at] as f64) as f32;
                }
            }
        }
        let (ab, bb, mut cb) = (
            be.upload(&a).unwrap(),
            be.upload(&b).unwrap(),
            be.upload(&c0).unwrap(),
        );
        be.gemm(&g, &ab, &bb, &mut cb).unwrap();
        let got = down(be, &cb);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{g:?} at {i}: {x} vs {y}"
            );
        }
    }
}
