//! Backend-specific checks; the op semantics are tested in `mae-conformance` on every backend.
//! Each test skips (and says so) when no adapter exists.

use super::*;
use mae::backend::{Attention, BackendErrorKind};
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
        Kernel::GemmTiled {
            trans_a: false,
            trans_b: true,
        },
        Kernel::GemmTiled {
            trans_a: true,
            trans_b: false,
        },
        Kernel::GemmWide {
            trans_a: true,
            trans_b: true,
        },
        Kernel::GemmFast {
            trans_a: false,
            trans_b: false,
        },
        Kernel::GemmFast {
            trans_a: true,
            trans_b: false,
        },
        Kernel::GemmFast {
            trans_a: false,
            trans_b: true,
        },
        Kernel::GemmFast {
            trans_a: true,
            trans_b: true,
        },
        Kernel::AttentionForward {
            head_dim: 64,
            wg: 64,
        },
        Kernel::AttentionBackwardDq { head_dim: 1, wg: 8 },
        Kernel::AttentionBackwardDkv {
            head_dim: 32,
            wg: 64,
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
        Kernel::ColumnPartials,
        Kernel::LayerNormParamPartials,
        Kernel::ColumnSumFinish,
        Kernel::NormalizeRows,
        Kernel::LayerNormForwardGroup,
        Kernel::LayerNormBackwardRowsGroup,
        Kernel::NormalizeRowsGroup,
        Kernel::SoftmaxForwardGroup,
        Kernel::SoftmaxBackwardGroup,
        Kernel::GeluForward,
        Kernel::BiasGelu,
        Kernel::GeluBackward,
        Kernel::SoftmaxForward,
        Kernel::SoftmaxBackward,
        Kernel::MseRows,
        Kernel::MseRowsGroup,
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

/// `g` on `kernel` against a plain `f64` host product, with pseudo-random A, B and C.
fn check_gemm_on(be: &WgpuBackend, kernel: GemmKernel, g: &Gemm) {
    let (m, n, k) = (g.m, g.n, g.k);
    let (la, lb, lc) = g.lens();
    let val = |i: usize, s: usize| ((i * s % 23) as f32 - 11.0) / 8.0;
    let a: Vec<f32> = (0..la).map(|i| val(i, 7)).collect();
    let b: Vec<f32> = (0..lb).map(|i| val(i, 5)).collect();
    let c0: Vec<f32> = (0..lc).map(|i| val(i, 3)).collect();
    // With beta 0, C starts as NaN: the old contents must be ignored, not multiplied by 0.
    let start: Vec<f32> = if g.beta == 0.0 {
        vec![f32::NAN; lc]
    } else {
        c0.clone()
    };
    // The values between batch items (stride_c > m n) must keep their old value.
    let mut want = start.clone();
    // Per value, the magnitude that bounds its rounding error: alpha sum |a b| + |beta c|.
    let mut mag = vec![0.0f64; lc];
    for item in 0..g.batch {
        let (base_a, base_b) = (item * g.stride_a, item * g.stride_b);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0.0f64, 0.0f64);
                for t in 0..k {
                    let av = a[base_a + if g.trans_a { t * m + i } else { i * k + t }];
                    let bv = b[base_b + if g.trans_b { j * k + t } else { t * n + j }];
                    s += av as f64 * bv as f64;
                    abs += (av as f64 * bv as f64).abs();
                }
                let at = item * g.stride_c + i * n + j;
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * c0[at] as f64
                };
                want[at] = (g.alpha as f64 * s + old) as f32;
                mag[at] = (g.alpha as f64).abs() * abs + old.abs();
            }
        }
    }
    let (ab, bb, mut cb) = (
        be.upload(&a).unwrap(),
        be.upload(&b).unwrap(),
        be.upload(&start).unwrap(),
    );
    gemm::gemm_with(be, kernel, g, &ab, &bb, &mut cb).unwrap();
    let got = down(be, &cb);
    for (i, (x, y)) in got.iter().zip(&want).enumerate() {
        let bound = (k as f64 + 2.0) * f64::from(f32::EPSILON) * mag[i] + 1e-30;
        assert!(
            f64::from((x - y).abs()) <= bound || (x.is_nan() && y.is_nan()),
            "{kernel:?} {g:?} at {i}: {x} vs {y}"
        );
    }
}

/// GEMM on every transpose combination, on blocks cut by the edges of C (8 x 8 per invocation
/// and 64 x 64 per workgroup in the register kernel, 4 x 4 and 64 x 64 in the tiled one, 8 x 8
/// and 128 x 128 in the wide and fast ones, steps of 16 along k in the tiled and wide ones, of 8
/// in the fast one, whose blocks inside C skip the bounds checks except in a last, partial step
/// of k), with k shorter than one step, a padded batch, a broadcast operand, alpha and beta,
/// against a plain host product; on every kernel, whichever the adapter would choose.
#[test]
fn every_gemm_kernel_matches_the_host_product_across_block_edges() {
    let Some(be) = be() else { return };
    let mut kernels = vec![GemmKernel::Register];
    if gemm::tiled_fits(&be.gpu.limits) {
        kernels.push(GemmKernel::Tiled);
    }
    if gemm::wide_fits(&be.gpu.limits) {
        kernels.push(GemmKernel::Wide);
    }
    if gemm::fast_fits(&be.gpu.limits) {
        kernels.push(GemmKernel::Fast);
    }
    if kernels.len() < 4 {
        eprintln!(
            "SKIP {} of the workgroup-memory GEMM kernels: they do not fit {}'s limits",
            4 - kernels.len(),
            be.adapter_info().name
        );
    }
    let shapes = [
        (8, 8, 8),
        (9, 70, 7),
        (67, 13, 33),
        (3, 129, 5),
        (65, 64, 16),
        (1, 1, 1),
        (130, 257, 20),
        (129, 128, 33),
        (256, 128, 24),
    ];
    let mut cases = 0;
    for kernel in kernels {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            for (t, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)]
                .into_iter()
                .enumerate()
            {
                // Rotate alpha, beta and the batch layout over the cases.
                let mut g = Gemm::new(m, n, k);
                g.trans_a = ta;
                g.trans_b = tb;
                match (s + t) % 3 {
                    0 => {}
                    1 => {
                        g = g
                            .alpha(0.5)
                            .accumulate()
                            .batched(2, m * k + 3, 0, m * n + 1)
                    }
                    _ => g = g.alpha(-1.25).batched(3, 0, k * n, m * n),
                }
                check_gemm_on(be, kernel, &g);
                cases += 1;
            }
        }
    }
    assert!(cases >= 24);
}

/// A weight gradient's layout (A transposed, one product, long k) splits along k on the
/// workgroup-memory kernels: into 4 and 2 slices here (and none for an odd k), with and without
/// beta, against the host product.
#[test]
fn products_split_along_k_match_the_host_product() {
    assert_eq!(gemm::k_splits(&Gemm::new(70, 50, 1024).trans_a(), 64), 4);
    assert_eq!(gemm::k_splits(&Gemm::new(70, 50, 1000).trans_a(), 64), 2);
    assert_eq!(gemm::k_splits(&Gemm::new(70, 50, 1001).trans_a(), 64), 1);
    assert_eq!(gemm::k_splits(&Gemm::new(70, 50, 1024), 64), 1);
    assert_eq!(
        gemm::k_splits(&Gemm::new(70, 50, 1024).trans_a().trans_b(), 64),
        1
    );
    // ViT-B's fc1 weight gradient at batch 64 (12,608 token rows): 576 blocks of 64 x 64
    // become 1,152; its 768 x 768 ones (144 blocks) become 1,152 too.
    assert_eq!(
        gemm::k_splits(&Gemm::new(3072, 768, 12608).trans_a(), 64),
        2
    );
    assert_eq!(gemm::k_splits(&Gemm::new(768, 768, 12608).trans_a(), 64), 8);
    let Some(be) = be() else { return };
    for kernel in [GemmKernel::Tiled, GemmKernel::Wide, GemmKernel::Fast] {
        for (m, n, k) in [
            (70, 50, 1024),
            (129, 3, 1000),
            (5, 65, 1001),
            (128, 256, 1024),
        ] {
            check_gemm_on(be, kernel, &Gemm::new(m, n, k).trans_a());
            check_gemm_on(
                be,
                kernel,
                &Gemm::new(m, n, k).trans_a().alpha(0.5).accumulate(),
            );
        }
    }
}

/// The fast kernel sums in the wide kernel's order (ascending k, one rounding per step), so its
/// results are the wide kernel's bit for bit: on blocks inside C and across its edges, with k
/// no multiple of either kernel's step, batched, with beta, and split along k.
#[test]
fn the_fast_gemm_kernel_is_bitwise_the_wide_one() {
    let Some(be) = be() else { return };
    if !gemm::fast_fits(&be.gpu.limits) {
        eprintln!(
            "SKIP the fast GEMM kernel: it does not fit {}'s limits",
            be.adapter_info().name
        );
        return;
    }
    let wave = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
    for (m, n, k) in [(256, 128, 40), (200, 300, 37), (128, 256, 1024)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for g in [
                Gemm::new(m, n, k),
                Gemm::new(m, n, k)
                    .alpha(0.75)
                    .accumulate()
                    .batched(2, m * k + 1, 0, m * n + 5),
            ] {
                let g = Gemm {
                    trans_a: ta,
                    trans_b: tb,
                    ..g
                };
                let (la, lb, lc) = g.lens();
                let (a, b) = (
                    be.upload(&wave(la, 0.731)).unwrap(),
                    be.upload(&wave(lb, 0.377)).unwrap(),
                );
                let c0 = wave(lc, 0.213);
                let run = |kernel| {
                    let mut c = be.upload(&c0).unwrap();
                    gemm::gemm_with(be, kernel, &g, &a, &b, &mut c).unwrap();
                    down(be, &c).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let (wide, fast) = (run(GemmKernel::Wide), run(GemmKernel::Fast));
                let differ = fast.iter().zip(&wide).filter(|(x, y)| x != y).count();
                assert_eq!(differ, 0, "{g:?}: {differ} of {lc} values differ");
            }
        }
    }
}

/// The fused bias + GELU equals `copy_rows` accumulating the bias, then `gelu_forward`, bit for
/// bit, on rows whose length is no multiple of the workgroup.
#[test]
fn bias_gelu_forward_is_bitwise_bias_then_gelu() {
    let Some(be) = be() else { return };
    let (rows, cols) = (37, 1001);
    let wave =
        |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * 4.0).collect() };
    let (bias, x) = (
        be.upload(&wave(cols, 0.37)).unwrap(),
        wave(rows * cols, 0.011),
    );
    let (mut pre, mut act) = (
        be.upload(&x).unwrap(),
        be.upload(&vec![f32::NAN; rows * cols]).unwrap(),
    );
    be.bias_gelu_forward(&bias, &mut pre, &mut act, rows, cols)
        .unwrap();
    let (mut want_pre, mut want_act) = (
        be.upload(&x).unwrap(),
        be.upload(&vec![f32::NAN; rows * cols]).unwrap(),
    );
    be.copy_rows(&bias, &mut want_pre, &RowMap::bias(rows, cols), true)
        .unwrap();
    be.gelu_forward(&want_pre, &mut want_act).unwrap();
    let bits = |b: &Buf| down(be, b).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&pre), bits(&want_pre));
    assert_eq!(bits(&act), bits(&want_act));
    assert!(down(be, &act).iter().all(|v| v.is_finite()));
    // An empty matrix is no work and no error.
    be.bias_gelu_forward(&bias, &mut pre, &mut act, 0, cols)
        .unwrap();
}

/// Attention composed of the backend's own ops, as `mae::model::attention` composes it:
/// `out`, and `d_qkv` given `d_out`.
fn composed_attention(
    be: &WgpuBackend,
    qkv: &Buf,
    d_out: &Buf,
    a: &Attention,
) -> (Vec<f32>, Vec<f32>) {
    let (n, t, hd) = (a.batch * a.heads, a.tokens, a.head_dim);
    let dim = a.dim();
    let (lq, lo, _) = a.lens();
    let view = |row_width, col_offset| a.heads(row_width, col_offset);
    let per_head =
        |m: usize, nn: usize, k: usize| Gemm::new(m, nn, k).batched(n, m * k, k * nn, m * nn);
    let alloc = |len: usize| be.alloc(len).unwrap();
    let (mut q, mut k, mut v) = (alloc(lo), alloc(lo), alloc(lo));
    be.split_heads(qkv, &mut q, &view(3 * dim, 0)).unwrap();
    be.split_heads(qkv, &mut k, &view(3 * dim, dim)).unwrap();
    be.split_heads(qkv, &mut v, &view(3 * dim, 2 * dim))
        .unwrap();
    let (mut scores, mut att, mut heads_out, mut out) =
        (alloc(n * t * t), alloc(n * t * t), alloc(lo), alloc(lo));
    be.gemm(&per_head(t, t, hd).trans_b(), &q, &k, &mut scores)
        .unwrap();
    be.softmax_forward(&scores, &mut att, n * t, t, a.scale)
        .unwrap();
    be.gemm(&per_head(t, hd, t), &att, &v, &mut heads_out)
        .unwrap();
    be.merge_heads(&heads_out, &mut out, &view(dim, 0)).unwrap();

    let (mut d_heads_out, mut d_att) = (alloc(lo), alloc(n * t * t));
    let (mut d_q, mut d_k, mut d_v, mut d_qkv) = (alloc(lo), alloc(lo), alloc(lo), alloc(lq));
    be.split_heads(d_out, &mut d_heads_out, &view(dim, 0))
        .unwrap();
    be.gemm(&per_head(t, t, hd).trans_b(), &d_heads_out, &v, &mut d_att)
        .unwrap();
    be.gemm(&per_head(t, hd, t).trans_a(), &att, &d_heads_out, &mut d_v)
        .unwrap();
    be.fill(&mut scores, 0.0).unwrap();
    be.softmax_backward(&att, &d_att, &mut scores, n * t, t, a.scale)
        .unwrap();
    be.gemm(&per_head(t, hd, t), &scores, &k, &mut d_q).unwrap();
    be.gemm(&per_head(t, hd, t).trans_a(), &scores, &q, &mut d_k)
        .unwrap();
    be.merge_heads(&d_q, &mut d_qkv, &view(3 * dim, 0)).unwrap();
    be.merge_heads(&d_k, &mut d_qkv, &view(3 * dim, dim))
        .unwrap();
    be.merge_heads(&d_v, &mut d_qkv, &view(3 * dim, 2 * dim))
        .unwrap();
    (down(be, &out), down(be, &d_qkv))
}

/// The fused attention kernels, with the workgroup sizes of both CPU and GPU adapters and
/// whichever path the backend takes by default, equal the composed ops within the rounding of
/// sums over `tokens + head_dim` terms; the log-sum-exp equals an `f64` host value; the backward
/// repeats bitwise.
#[test]
fn fused_attention_equals_the_composed_ops_at_both_workgroup_sizes() {
    let Some(be) = be() else { return };
    for &(batch, heads, tokens, head_dim) in &[(2, 2, 17, 8), (2, 2, 50, 64), (1, 3, 9, 1)] {
        let a = Attention {
            batch,
            tokens,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let (lq, lo, ll) = a.lens();
        let wave =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
        let (qkv_h, d_out_h) = (wave(lq, 0.731), wave(lo, 0.377));
        let (qkv, d_out) = (be.upload(&qkv_h).unwrap(), be.upload(&d_out_h).unwrap());
        let (want_out, want_d_qkv) = composed_attention(be, &qkv, &d_out, &a);
        // The log-sum-exp of every score row in f64.
        let dim = a.dim();
        let mut want_lse = vec![0.0f32; ll];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..tokens {
                    let q = &qkv_h[(b * tokens + i) * 3 * dim + h * head_dim..][..head_dim];
                    let s: Vec<f64> = (0..tokens)
                        .map(|j| {
                            let k = &qkv_h[(b * tokens + j) * 3 * dim + dim + h * head_dim..]
                                [..head_dim];
                            let dot: f64 =
                                q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum();
                            a.scale as f64 * dot
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    want_lse[(b * heads + h) * tokens + i] = (mx + sum.ln()) as f32;
                }
            }
        }
        let tol = (tokens + head_dim) as f32 * f32::EPSILON * 4.0;
        let close = |what: &str, wg: u32, got: &[f32], want: &[f32]| {
            for (i, (x, y)) in got.iter().zip(want).enumerate() {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{what} wg {wg} {a:?} at {i}: fused {x} vs {y}"
                );
            }
        };
        for wg in [8, 64] {
            let (mut out, mut lse) = (
                be.upload(&vec![f32::NAN; lo]).unwrap(),
                be.upload(&vec![f32::NAN; ll]).unwrap(),
            );
            attention::forward_with(be, wg, &qkv, &mut out, &mut lse, &a).unwrap();
            close("out", wg, &down(be, &out), &want_out);
            close("lse", wg, &down(be, &lse), &want_lse);
            let backward = || {
                let mut d_qkv = be.upload(&vec![f32::NAN; lq]).unwrap();
                attention::backward_with(be, wg, &qkv, &out, &lse, &d_out, &mut d_qkv, &a).unwrap();
                down(be, &d_qkv)
            };
            let d_qkv = backward();
            close("d_qkv", wg, &d_qkv, &want_d_qkv);
            let again = backward();
            assert!(
                d_qkv
                    .iter()
                    .zip(&again)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "two backward runs differ"
            );
        }
    }
}

/// Head widths past the kernels' private arrays are refused, typed: `fused_attention` is false
/// there, so the model composes; calling the fused ops anyway is an error, not a panic.
#[test]
fn fused_attention_refuses_heads_wider_than_64() {
    let Some(be) = be() else { return };
    let a = Attention {
        batch: 1,
        tokens: 3,
        heads: 1,
        head_dim: 80,
        scale: 1.0,
    };
    assert!(!be.fused_attention(&a));
    let (lq, lo, ll) = a.lens();
    let qkv = be.alloc(lq).unwrap();
    let (mut out, mut lse) = (be.alloc(lo).unwrap(), be.alloc(ll).unwrap());
    let err = be
        .attention_forward(&qkv, &mut out, &mut lse, &a)
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unsupported, "{err}");
    let mut d_qkv = be.alloc(lq).unwrap();
    let err = be
        .attention_backward(&qkv, &out, &lse, &out, &mut d_qkv, &a)
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unsupported, "{err}");
}

/// The adapter decides the GEMM kernel: the register kernel on CPU adapters (lavapipe), the
/// tiled one on GPUs; `MAE_WGPU_GEMM` overrides, unless the tile does not fit.
#[test]
fn the_gemm_kernel_follows_the_adapter_and_the_limits() {
    let ok = wgpu::Limits::default();
    let choose = |req, ty| GemmKernel::choose(req, ty, &ok);
    assert_eq!(choose(None, wgpu::DeviceType::Cpu), GemmKernel::Register);
    assert_eq!(
        choose(None, wgpu::DeviceType::DiscreteGpu),
        GemmKernel::Tiled
    );
    assert_eq!(
        choose(None, wgpu::DeviceType::IntegratedGpu),
        GemmKernel::Tiled
    );
    assert_eq!(
        choose(Some(GemmKernel::Tiled), wgpu::DeviceType::Cpu),
        GemmKernel::Tiled
    );
    assert_eq!(
        choose(Some(GemmKernel::Register), wgpu::DeviceType::DiscreteGpu),
        GemmKernel::Register
    );
    // WebGPU's default limits hold the tiled kernel's 8 KiB of workgroup memory, not the wide
    // one's 16.1 KiB.
    assert_eq!(
        choose(Some(GemmKernel::Wide), wgpu::DeviceType::DiscreteGpu),
        GemmKernel::Tiled
    );
    let roomy = wgpu::Limits {
        max_compute_workgroup_storage_size: 32768,
        ..wgpu::Limits::default()
    };
    assert_eq!(
        GemmKernel::choose(
            Some(GemmKernel::Wide),
            wgpu::DeviceType::DiscreteGpu,
            &roomy
        ),
        GemmKernel::Wide
    );
    assert_eq!(
        GemmKernel::choose(None, wgpu::DeviceType::DiscreteGpu, &roomy),
        GemmKernel::Fast
    );
    // The fast kernel's 16.5 KiB: on roomy limits itself, else the next smaller kernel.
    assert_eq!(
        GemmKernel::choose(
            Some(GemmKernel::Fast),
            wgpu::DeviceType::DiscreteGpu,
            &roomy
        ),
        GemmKernel::Fast
    );
    assert_eq!(
        GemmKernel::choose(Some(GemmKernel::Fast), wgpu::DeviceType::Cpu, &roomy),
        GemmKernel::Fast
    );
    let wide_only = wgpu::Limits {
        max_compute_workgroup_storage_size: 16 * 129 * 8,
        ..wgpu::Limits::default()
    };
    assert_eq!(
        GemmKernel::choose(
            Some(GemmKernel::Fast),
            wgpu::DeviceType::DiscreteGpu,
            &wide_only
        ),
        GemmKernel::Wide
    );
    assert_eq!(
        choose(Some(GemmKernel::Fast), wgpu::DeviceType::DiscreteGpu),
        GemmKernel::Tiled
    );
    let small = wgpu::Limits {
        max_compute_workgroup_storage_size: 4096,
        ..wgpu::Limits::default()
    };
    assert_eq!(
        GemmKernel::choose(
            Some(GemmKernel::Tiled),
            wgpu::DeviceType::DiscreteGpu,
            &small
        ),
        GemmKernel::Register
    );
    let Some(be) = be() else { return };
    let cpu = be.adapter_info().device_type == wgpu::DeviceType::Cpu;
    if std::env::var_os("MAE_WGPU_GEMM").is_none() {
        assert_eq!(be.gemm_kernel() == GemmKernel::Register, cpu, "{be:?}");
    }
    if std::env::var_os("MAE_WGPU_ATTENTION").is_none() {
        assert_eq!(be.attention_path(), AttentionPath::Composed, "{be:?}");
    }
    if std::env::var_os("MAE_WGPU_ROWS").is_none() {
        assert_eq!(be.row_kernel() == RowKernel::Invocation, cpu, "{be:?}");
    }
}

/// Attention is composed unless `MAE_WGPU_ATTENTION` asks for the fused kernels.
#[test]
fn the_attention_path_is_composed_unless_asked() {
    assert_eq!(AttentionPath::choose(None), AttentionPath::Composed);
    let fused = Some(AttentionPath::Fused);
    assert_eq!(AttentionPath::choose(fused), AttentionPath::Fused);
    let composed = Some(AttentionPath::Composed);
    assert_eq!(AttentionPath::choose(composed), AttentionPath::Composed);
}

/// GFLOP/s of each workgroup-memory GEMM kernel on the products of one `base224` training step
/// at batch 64 (ViT-B/16 encoder on 50 visible tokens per image, 512-wide decoder on 197): the
/// Linear layers' forward (`x W^T`), input gradient and weight gradient (split along k), and
/// attention's batched per-head products. For comparing the kernels on a GPU:
/// `cargo test --release -p mae-backend-wgpu timing_gemm -- --ignored --nocapture`
/// (`MAE_WGPU_GEMM` does not matter here). On CPU adapters m is cut by 50 to end in minutes.
#[test]
#[ignore = "a timing, not a check"]
fn timing_gemm_kernels() {
    let Some(be) = be() else { return };
    let cpu = be.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let (enc, dec) = if cpu { (64, 252) } else { (3200, 12608) };
    let heads = |items: usize, t: usize, hd: usize| {
        [
            Gemm::new(t, t, hd)
                .trans_b()
                .batched(items, t * hd, t * hd, t * t),
            Gemm::new(t, hd, t).batched(items, t * t, t * hd, t * hd),
            Gemm::new(t, hd, t)
                .trans_a()
                .batched(items, t * t, t * hd, t * hd),
        ]
    };
    let mut products = vec![
        ("enc qkv x W^T", Gemm::new(enc, 2304, 768).trans_b()),
        ("enc fc1 x W^T", Gemm::new(enc, 3072, 768).trans_b()),
        ("enc fc2 x W^T", Gemm::new(enc, 768, 3072).trans_b()),
        ("enc fc2 dX = dY W", Gemm::new(enc, 3072, 768)),
        ("enc fc1 dW = dY^T X", Gemm::new(3072, 768, enc).trans_a()),
        ("dec fc1 x W^T", Gemm::new(dec, 2048, 512).trans_b()),
        ("dec fc1 dX = dY W", Gemm::new(dec, 512, 2048)),
        ("dec fc1 dW = dY^T X", Gemm::new(2048, 512, dec).trans_a()),
    ];
    let (enc_items, dec_items) = if cpu { (12, 16) } else { (64 * 12, 64 * 16) };
    for (name, g) in ["enc scores", "enc att V", "enc att^T dO"]
        .into_iter()
        .zip(heads(enc_items, 50, 64))
    {
        products.push((name, g));
    }
    for (name, g) in ["dec scores", "dec att V", "dec att^T dO"]
        .into_iter()
        .zip(heads(dec_items, 197, 32))
    {
        products.push((name, g));
    }
    let mut kernels = vec![GemmKernel::Tiled];
    if gemm::wide_fits(&be.gpu.limits) {
        kernels.push(GemmKernel::Wide);
    }
    if gemm::fast_fits(&be.gpu.limits) {
        kernels.push(GemmKernel::Fast);
    }
    let wave = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
    let reps = if cpu { 1 } else { 10 };
    for (name, g) in products {
        let (la, lb, lc) = g.lens();
        let (a, b) = (
            be.upload(&wave(la, 0.731)).unwrap(),
            be.upload(&wave(lb, 0.377)).unwrap(),
        );
        let mut c = be.alloc(lc).unwrap();
        let flop = 2.0 * (g.m * g.n * g.k * g.batch) as f64;
        let mut line = format!(
            "{name:22} {:>5} x {:>5} x {:>5} x {:>4}:",
            g.m, g.n, g.k, g.batch
        );
        for &kernel in &kernels {
            gemm::gemm_with(be, kernel, &g, &a, &b, &mut c).unwrap();
            be.sync().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..reps {
                gemm::gemm_with(be, kernel, &g, &a, &b, &mut c).unwrap();
            }
            be.sync().unwrap();
            let s = start.elapsed().as_secs_f64() / f64::from(reps);
            line += &format!(
                "  {kernel:?} {:.3} ms {:.1} GFLOP/s",
                s * 1e3,
                flop / s / 1e9
            );
        }
        println!("{line}");
    }
}

/// Seconds per forward + backward of the fused kernels (at workgroup sizes 8 and 64) and of the
/// composed ops, at the attention shapes of the `tiny32` bench case (encoder: 17 tokens, 3 heads
/// of 64; decoder: 65 tokens, 4 heads of 32; batch 64). How the default path was chosen:
/// `cargo test --release -p mae-backend-wgpu timing -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check"]
fn timing_fused_and_composed_attention() {
    let Some(be) = be() else { return };
    for (tokens, heads, head_dim) in [(17, 3, 64), (65, 4, 32)] {
        let a = Attention {
            batch: 64,
            tokens,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let (lq, lo, ll) = a.lens();
        let wave =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
        let (qkv, d_out) = (
            be.upload(&wave(lq, 0.731)).unwrap(),
            be.upload(&wave(lo, 0.377)).unwrap(),
        );
        let (mut out, mut lse, mut d_qkv) = (
            be.alloc(lo).unwrap(),
            be.alloc(ll).unwrap(),
            be.alloc(lq).unwrap(),
        );
        let time = |f: &mut dyn FnMut()| {
            f();
            be.sync().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..3 {
                f();
            }
            be.sync().unwrap();
            start.elapsed().as_secs_f64() / 3.0
        };
        for wg in [8, 64] {
            let s = time(&mut || {
                attention::forward_with(be, wg, &qkv, &mut out, &mut lse, &a).unwrap();
            });
            println!(
                "{a:?}: fused forward, workgroups of {wg}: {:.1} ms",
                s * 1e3
            );
            let s = time(&mut || {
                attention::forward_with(be, wg, &qkv, &mut out, &mut lse, &a).unwrap();
                attention::backward_with(be, wg, &qkv, &out, &lse, &d_out, &mut d_qkv, &a).unwrap();
            });
            println!("{a:?}: fused, workgroups of {wg}: {:.1} ms", s * 1e3);
        }
        let s = time(&mut || {
            composed_attention(be, &qkv, &d_out, &a);
        });
        println!("{a:?}: composed: {:.1} ms", s * 1e3);
    }
}

// ---- row kernels (per_row.rs) -------------------------------------------------------------------

/// The row kernels run one workgroup per row on GPUs and one invocation per row on CPU adapters
/// unless `MAE_WGPU_ROWS` says otherwise.
#[test]
fn the_row_kernel_follows_the_adapter() {
    use wgpu::DeviceType::{Cpu, DiscreteGpu, IntegratedGpu};
    assert_eq!(RowKernel::choose(None, Cpu), RowKernel::Invocation);
    assert_eq!(RowKernel::choose(None, DiscreteGpu), RowKernel::Workgroup);
    assert_eq!(RowKernel::choose(None, IntegratedGpu), RowKernel::Workgroup);
    let group = Some(RowKernel::Workgroup);
    assert_eq!(RowKernel::choose(group, Cpu), RowKernel::Workgroup);
    let single = Some(RowKernel::Invocation);
    assert_eq!(
        RowKernel::choose(single, DiscreteGpu),
        RowKernel::Invocation
    );
}

/// Two backends of their own on the default adapter, one per row-kernel variant:
/// `(invocation, workgroup)`.
fn row_kernel_backends() -> Option<(WgpuBackend, WgpuBackend)> {
    be()?;
    let with = |k: RowKernel| {
        let mut be = WgpuBackend::new().unwrap();
        be.row_kernel = k;
        be
    };
    Some((with(RowKernel::Invocation), with(RowKernel::Workgroup)))
}

/// Values that are neither symmetric nor centred: a wave on an offset, so the LayerNorm mean
/// and its refinement matter.
fn row_values(n: usize, k: f64, offset: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (offset + 2.5 * (i as f64 * k).sin() + 0.5 * (i as f64 * k * 3.7).cos()) as f32)
        .collect()
}

/// Every `got[i]` within `ulps` roundings of `mag[i]`, the magnitude of the terms that make it.
fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], ulps: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let bound = ulps * f64::from(f32::EPSILON) * m + 1e-30;
        assert!(
            (f64::from(g) - w).abs() <= bound,
            "{what} at {i}: {g} vs {w} (bound {bound:e})"
        );
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The LayerNorm statistics `(mean, rstd)` of [`run_row_ops`]'s rows, from f64 rounded to f32:
/// the backward takes these rather than the forward's, so that its reference has the very same
/// inputs (rows of 3 values can be nearly constant, and then a rounding of the mean moves dx).
fn row_stats(rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let x = f64s(&row_values(rows * cols, 0.731, 3.0));
    x.chunks(cols.max(1))
        .take(rows)
        .map(|xs| {
            let m = xs.iter().sum::<f64>() / cols as f64;
            let ssd = xs.iter().map(|v| (v - m) * (v - m)).sum::<f64>();
            (m as f32, (1.0 / (ssd / cols as f64 + 1e-5).sqrt()) as f32)
        })
        .unzip()
}

/// Outputs of the row ops on one backend, all as host vectors, in a fixed order:
/// layernorm y, mean, rstd, dx, dgamma, dbeta; softmax y, dx; normalize_rows y.
fn run_row_ops(be: &WgpuBackend, rows: usize, cols: usize, scale: f32) -> Vec<Vec<f32>> {
    let n = rows * cols;
    let x = row_values(n, 0.731, 3.0);
    let dy = row_values(n, 0.417, -0.25);
    let gamma = row_values(cols, 1.3, 1.0);
    let beta = row_values(cols, 0.9, 0.0);
    let dx0 = row_values(n, 0.123, 0.5);
    let up = |v: &[f32]| be.upload(v).unwrap();
    let (xb, dyb, gb, bb) = (up(&x), up(&dy), up(&gamma), up(&beta));
    let (mut y, mut mean, mut rstd) = (up(&vec![f32::NAN; n]), up(&[0.0]), up(&[0.0]));
    if rows > 0 {
        mean = up(&vec![f32::NAN; rows]);
        rstd = up(&vec![f32::NAN; rows]);
    }
    be.layernorm_forward(
        &xb, &gb, &bb, &mut y, &mut mean, &mut rstd, rows, cols, 1e-5,
    )
    .unwrap();
    let (mut dx, mut dg, mut db) = (up(&dx0), up(&vec![0.25; cols]), up(&vec![-0.5; cols]));
    let (host_mean, host_rstd) = row_stats(rows, cols);
    if rows > 0 {
        let (mb, rb) = (up(&host_mean), up(&host_rstd));
        be.layernorm_backward(
            &dyb, &xb, &gb, &mb, &rb, &mut dx, &mut dg, &mut db, rows, cols,
        )
        .unwrap();
    }
    let mut sy = up(&vec![f32::NAN; n]);
    be.softmax_forward(&xb, &mut sy, rows, cols, scale).unwrap();
    let mut sdx = up(&dx0);
    be.softmax_backward(&sy, &dyb, &mut sdx, rows, cols, scale)
        .unwrap();
    let mut ny = up(&vec![f32::NAN; n]);
    if cols >= 2 {
        be.normalize_rows(&xb, &mut ny, rows, cols, 1e-6).unwrap();
    }
    [&y, &mean, &rstd, &dx, &dg, &db, &sy, &sdx, &ny]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

/// The f64 reference of [`run_row_ops`] (given the device's softmax output for the softmax
/// backward, as the op takes it): `(values, magnitudes)` per output, the magnitude of each
/// value being the size of the terms that make it, which bounds its rounding error.
// One index walks x, dy, gamma, beta and the outputs together, as the formulas read.
#[allow(clippy::needless_range_loop)]
fn row_ops_reference(
    rows: usize,
    cols: usize,
    scale: f32,
    softmax_y: &[f32],
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let n = rows * cols;
    let x = f64s(&row_values(n, 0.731, 3.0));
    let dy = f64s(&row_values(n, 0.417, -0.25));
    let g = f64s(&row_values(cols, 1.3, 1.0));
    let b = f64s(&row_values(cols, 0.9, 0.0));
    let dx0 = f64s(&row_values(n, 0.123, 0.5));
    let sy = f64s(softmax_y);
    let (stat_mean, stat_rstd) = row_stats(rows, cols);
    let s = f64::from(scale);
    let zeros = || (vec![0.0; n], vec![0.0; n]);
    let (mut y, mut dx, mut smy, mut smdx, mut ny) = (zeros(), zeros(), zeros(), zeros(), zeros());
    let (mut mean, mut rstd) = (
        (vec![0.0; rows], vec![0.0; rows]),
        (vec![0.0; rows], vec![0.0; rows]),
    );
    let (mut dg, mut db) = (
        (vec![0.25; cols], vec![0.25; cols]),
        (vec![-0.5; cols], vec![0.5; cols]),
    );
    for r in 0..rows {
        let row = r * cols..(r + 1) * cols;
        let xs = &x[row.clone()];
        let m = xs.iter().sum::<f64>() / cols as f64;
        let ssd = xs.iter().map(|v| (v - m) * (v - m)).sum::<f64>();
        let rs = 1.0 / (ssd / cols as f64 + 1e-5).sqrt();
        mean.0[r] = m;
        mean.1[r] = xs.iter().map(|v| v.abs()).sum::<f64>() / cols as f64;
        rstd.0[r] = rs;
        rstd.1[r] = rs;
        let (mut mdg, mut mdgx, mut adg, mut adgx) = (0.0, 0.0, 0.0, 0.0);
        for c in 0..cols {
            let i = r * cols + c;
            y.0[i] = (x[i] - m) * rs * g[c] + b[c];
            y.1[i] = (x[i].abs() + m.abs()) * rs * g[c].abs() + b[c].abs();
        }
        // The backward's statistics, as run_row_ops passes them.
        let (m, rs) = (f64::from(stat_mean[r]), f64::from(stat_rstd[r]));
        for c in 0..cols {
            let i = r * cols + c;
            let xhat = (x[i] - m) * rs;
            let d = dy[i] * g[c];
            mdg += d / cols as f64;
            mdgx += d * xhat / cols as f64;
            adg += d.abs() / cols as f64;
            adgx += (d * xhat).abs() / cols as f64;
            dg.0[c] += dy[i] * xhat;
            dg.1[c] += (dy[i] * xhat).abs();
            db.0[c] += dy[i];
            db.1[c] += dy[i].abs();
        }
        for c in 0..cols {
            let i = r * cols + c;
            let xhat = (x[i] - m) * rs;
            let d = dy[i] * g[c];
            dx.0[i] = dx0[i] + rs * (d - mdg - xhat * mdgx);
            dx.1[i] = dx0[i].abs() + rs * (d.abs() + adg + xhat.abs() * adgx);
        }
        let mx = xs.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(s * v));
        let total = xs.iter().map(|v| (s * v - mx).exp()).sum::<f64>();
        let dot = (0..cols)
            .map(|c| dy[r * cols + c] * sy[r * cols + c])
            .sum::<f64>();
        let adot = (0..cols)
            .map(|c| (dy[r * cols + c] * sy[r * cols + c]).abs())
            .sum::<f64>();
        let m = mean.0[r];
        let sd = (ssd / (cols as f64 - 1.0) + 1e-6).sqrt();
        for c in 0..cols {
            let i = r * cols + c;
            smy.0[i] = (s * x[i] - mx).exp() / total;
            // exp(s x - max) carries the rounding of its argument, about |s x| + |max|.
            smy.1[i] = smy.0[i] * (1.0 + (s * x[i]).abs() + mx.abs());
            smdx.0[i] = dx0[i] + s * sy[i] * (dy[i] - dot);
            smdx.1[i] = dx0[i].abs() + (s * sy[i]).abs() * (dy[i].abs() + adot);
            ny.0[i] = (x[i] - m) / sd;
            ny.1[i] = (x[i].abs() + m.abs()) / sd;
        }
    }
    vec![y, mean, rstd, dx, dg, db, smy, smdx, ny]
}

const ROW_OUTPUTS: [&str; 9] = [
    "layernorm y",
    "layernorm mean",
    "layernorm rstd",
    "layernorm dx",
    "layernorm dgamma",
    "layernorm dbeta",
    "softmax y",
    "softmax dx",
    "normalize_rows y",
];

/// Both row-kernel variants on rows of 1 to 1000 values (one value, fewer than a workgroup's
/// invocations, odd lengths past one and several strides of 64), against an f64 reference and
/// against each other, and each bitwise the same on a second run.
#[test]
fn both_row_kernels_match_the_f64_reference_each_other_and_themselves() {
    let Some((single, group)) = row_kernel_backends() else {
        return;
    };
    let cases = [
        (1, 1),
        (300, 1),
        (3, 31),
        (65, 50),
        (1, 64),
        (130, 197),
        (7, 768),
        (2, 1000),
        (0, 50),
    ];
    for (rows, cols) in cases {
        let scale = 0.125;
        let a = run_row_ops(&single, rows, cols, scale);
        let b = run_row_ops(&group, rows, cols, scale);
        let again = run_row_ops(&group, rows, cols, scale);
        let reference = row_ops_reference(rows, cols, scale, &b[6]);
        for (k, what) in ROW_OUTPUTS.iter().enumerate() {
            // normalize_rows needs 2 values a row; no rows have no statistics.
            if (k == 8 && cols < 2) || (rows == 0 && (k == 1 || k == 2)) {
                continue;
            }
            let what = format!("{what} ({rows} x {cols})");
            let (want, mag) = &reference[k];
            let (got, other) = (&b[k], f64s(&a[k]));
            // Against f64: a few roundings of each term (the tolerance of conformance's
            // REDUCTION class is far wider); against the other variant: about as close.
            assert_close(&format!("workgroup {what}"), got, want, mag, 32.0);
            assert_close(&format!("invocation {what}"), &a[k], want, mag, 32.0);
            assert_close(
                &format!("workgroup vs invocation {what}"),
                got,
                &other,
                mag,
                8.0,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(&again[k]), "repeat {what}");
        }
    }
}

/// More rows than one grid dimension holds (65535 workgroups): the workgroup kernels fold the
/// grid and still compute every row once.
#[test]
fn workgroup_row_kernels_cover_more_than_65535_rows() {
    let Some((single, group)) = row_kernel_backends() else {
        return;
    };
    let (rows, cols) = (65_535 + 70, 3);
    let a = run_row_ops(&single, rows, cols, 1.0);
    let b = run_row_ops(&group, rows, cols, 1.0);
    let reference = row_ops_reference(rows, cols, 1.0, &b[6]);
    // dgamma and dbeta (outputs 4 and 5) are two-pass column sums in chunks of 64 rows: no
    // loop walks all the rows, which on lavapipe would stop after 65535 iterations (llvmpipe's
    // loop limit; the one-invocation-per-column kernel that summed them before did).
    for (k, what) in ROW_OUTPUTS.iter().enumerate() {
        let (want, mag) = &reference[k];
        assert_close(&format!("workgroup {what}"), &b[k], want, mag, 32.0);
        assert_close(
            &format!("vs invocation {what}"),
            &b[k],
            &f64s(&a[k]),
            mag,
            8.0,
        );
    }
}

/// The masked MSE loss and its gradient with both variants of the per-row errors, against f64:
/// rows of one value to 768, fewer rows than one workgroup's invocations and more than 65,535
/// (the mask's sums once walked every row in one invocation, which llvmpipe stops after 65,535
/// iterations), and the forward bitwise the same on a second run.
#[test]
fn masked_mse_matches_f64_with_either_row_kernel() {
    let Some((single, group)) = row_kernel_backends() else {
        return;
    };
    for (rows, cols) in [(1, 1), (3, 768), (300, 7), (65_535 + 70, 3)] {
        let pred = row_values(rows * cols, 0.731, 0.5);
        let target = row_values(rows * cols, 0.417, -0.25);
        // Every third row masked out, so the sums of the mask and of the errors differ.
        let mask: Vec<f32> = (0..rows).map(|r| f32::from(r % 3 != 1)).collect();
        let (p64, t64) = (f64s(&pred), f64s(&target));
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for r in 0..rows {
            let sse: f64 = (0..cols)
                .map(|c| (p64[r * cols + c] - t64[r * cols + c]).powi(2))
                .sum();
            num += f64::from(mask[r]) * sse / cols as f64;
            den += f64::from(mask[r]);
        }
        let (want_loss, d_loss) = (num / den, 0.5f32);
        let coef = f64::from(d_loss) * 2.0 / (cols as f64 * den);
        let want_grad: Vec<f64> = (0..rows * cols)
            .map(|i| coef * f64::from(mask[i / cols]) * (p64[i] - t64[i]))
            .collect();
        let grad_mag: Vec<f64> = want_grad.iter().map(|g| g.abs()).collect();
        for (name, be) in [("invocation", &single), ("workgroup", &group)] {
            let up = |v: &[f32]| be.upload(v).unwrap();
            let (pb, tb, mb) = (up(&pred), up(&target), up(&mask));
            let mut loss = up(&[f32::NAN]);
            let mut runs = Vec::new();
            for _ in 0..2 {
                be.masked_mse_forward(&pb, &tb, &mb, &mut loss, rows, cols)
                    .unwrap();
                runs.push(down(be, &loss)[0]);
            }
            let what = format!("{name} loss ({rows} x {cols})");
            assert_close(&what, &runs[..1], &[want_loss], &[want_loss], 32.0);
            assert_eq!(runs[0].to_bits(), runs[1].to_bits(), "repeat {what}");
            let mut d_pred = up(&vec![0.0; rows * cols]);
            be.masked_mse_backward(&pb, &tb, &mb, &mut d_pred, rows, cols, d_loss)
                .unwrap();
            let what = format!("{name} d_pred ({rows} x {cols})");
            let got = down(be, &d_pred);
            assert_close(&what, &got, &want_grad, &grad_mag, 32.0);
        }
    }
}
