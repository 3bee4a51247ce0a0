//! The model variants no golden file covers: fine-tuning (pooled head, drop path, learned
//! position table, partial training) and the pre-training ablations (encoder mask tokens, block
//! and grid sampling). Each tensor's gradient is checked against a central difference of the
//! loss along a random direction within that tensor, computed by the backend itself in f32, so
//! a missing or wrong gradient path shows on the tensor it feeds. Also: the encoder's embedding
//! of the visible patches alone against the official order, which embeds every patch.

use mae::backend::Backend;
use mae::embed::Pool;
use mae::finetune::{classifier, smoothed_targets, FinetuneOptions, Finetuner};
use mae::init::init_params;
use mae::masking::{sample_noise, MaskSampling};
use mae::model::encoder::{
    encoder_backward, encoder_forward, EncoderActs, EncoderScratch, EncoderShape,
};
use mae::rng::Rng;
use mae::train::{TrainOptions, Trainer};
use mae::Config;

fn tiny() -> Config {
    Config {
        img_size: 8,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 2.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
        encoder_mask_tokens: false,
    }
}

fn normals(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (scale * rng.normal()) as f32).collect()
}

/// Per tensor: `(L(p + v) - L(p - v)) / 2` against `<grad, v>` for `v ~ N(0, 1e-3)` in that
/// tensor only. `loss` evaluates the model at the given tensors.
fn check_directional(
    what: &str,
    params: &[Vec<f32>],
    names: &[String],
    grads: &[Vec<f32>],
    trained: &[bool],
    loss: &mut dyn FnMut(&[Vec<f32>]) -> f64,
) {
    let mut checked = 0;
    for (t, name) in names.iter().enumerate() {
        let v = normals(t as u64 + 1, params[t].len(), 1e-3);
        let analytic: f64 = grads[t]
            .iter()
            .zip(&v)
            .map(|(&g, &v)| g as f64 * v as f64)
            .sum();
        if !trained[t] {
            continue;
        }
        let mut shifted = params.to_vec();
        let at = |sign: f32, shifted: &mut Vec<Vec<f32>>| {
            for ((s, &p), &v) in shifted[t].iter_mut().zip(&params[t]).zip(&v) {
                *s = p + sign * v;
            }
        };
        at(1.0, &mut shifted);
        let up = loss(&shifted);
        at(-1.0, &mut shifted);
        let down = loss(&shifted);
        let numeric = (up - down) / 2.0;
        let err = (numeric - analytic).abs();
        assert!(
            err <= 2e-2 * analytic.abs() + 2e-6,
            "{what}: {name}: directional derivative {numeric:e} by differences, {analytic:e} \
             by the backward"
        );
        checked += 1;
    }
    assert!(checked > 10, "{what}: only {checked} tensors checked");
}

fn finetune_gradients<B: Backend>(b: &B, pool: Pool, opts: FinetuneOptions, what: &str) {
    let cfg = tiny();
    let (n, classes) = (opts.batch_size, opts.num_classes);
    let mut enc = init_params(&cfg, 1).encoder;
    // A trained-looking position table: the gradient check of the learned table needs it to
    // matter, and sin-cos values alone would do too.
    enc.pos_embed = normals(9, enc.pos_embed.len(), 0.5);
    let params = classifier(&cfg, enc, classes, pool, 0.3, 2);
    let imgs = normals(3, n * 3 * 8 * 8, 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % classes as u32).collect();
    let targets = smoothed_targets(&labels, classes, 0.1);
    // The same seed draws the same drop-path factors in every new finetuner's first forward.
    let mut ft = Finetuner::new(b, &cfg, &params, opts, 5).unwrap();
    ft.forward(b, &imgs, &targets).unwrap();
    ft.backward(b).unwrap();
    let grads: Vec<Vec<f32>> = ft.grads(b).unwrap().tensors().cloned().collect();
    let trained: Vec<bool> = ft.lr_scales().map(|(_, s)| s > 0.0).collect();
    let names: Vec<String> = ft.specs().tensors().map(|s| s.name.clone()).collect();
    let flat: Vec<Vec<f32>> = params.tensors().cloned().collect();
    let mut loss = |t: &[Vec<f32>]| {
        let mut p = params.clone();
        for (dst, src) in p.tensors_mut().zip(t) {
            dst.clone_from(src);
        }
        let mut ft = Finetuner::new(b, &cfg, &p, opts, 5).unwrap();
        ft.forward(b, &imgs, &targets).unwrap() as f64
    };
    check_directional(what, &flat, &names, &grads, &trained, &mut loss);
    // Tensors that do not train get no update.
    ft.update(b, 1e-2).unwrap();
    let after: Vec<Vec<f32>> = ft.params(b).unwrap().tensors().cloned().collect();
    for ((before, after), (name, trains)) in flat.iter().zip(&after).zip(names.iter().zip(&trained))
    {
        assert_eq!(before == after, !trains, "{what}: {name} trains: {trains}");
    }
}

fn check_finetune_mean_pool<B: Backend>(b: &B) {
    let opts = FinetuneOptions {
        drop_path: 0.5,
        ..FinetuneOptions::new(4, 3)
    };
    finetune_gradients(b, Pool::Mean, opts, "mean pooling, drop path 0.5");
}

fn check_finetune_cls_partial<B: Backend>(b: &B) {
    let opts = FinetuneOptions {
        pool: Pool::Cls,
        trainable_blocks: Some(1),
        ..FinetuneOptions::new(4, 3)
    };
    finetune_gradients(b, Pool::Cls, opts, "cls pooling, last block only");
}

fn check_finetune_step_lowers_loss<B: Backend>(b: &B) {
    let cfg = tiny();
    let params = classifier(&cfg, init_params(&cfg, 1).encoder, 3, Pool::Mean, 2e-5, 0);
    let opts = FinetuneOptions {
        drop_path: 0.0,
        ..FinetuneOptions::new(6, 3)
    };
    let mut ft = Finetuner::new(b, &cfg, &params, opts, 0).unwrap();
    let imgs = normals(4, 6 * 3 * 8 * 8, 1.0);
    let targets = smoothed_targets(&[0, 1, 2, 0, 1, 2], 3, 0.1);
    let first = ft.train_step(b, &imgs, &targets, 5e-3).unwrap();
    let mut last = first;
    for _ in 0..20 {
        last = ft.train_step(b, &imgs, &targets, 5e-3).unwrap();
    }
    assert!(
        last < 0.7 * first,
        "loss {first} -> {last} after 21 steps on one batch"
    );
}

fn check_layer_decay_rates<B: Backend>(b: &B) {
    let cfg = tiny();
    let params = classifier(&cfg, init_params(&cfg, 1).encoder, 3, Pool::Mean, 2e-5, 0);
    let ft = Finetuner::new(b, &cfg, &params, FinetuneOptions::new(2, 3), 0).unwrap();
    // depth 2: embedding 0.75^3, block 0 0.75^2, block 1 0.75, head and fc_norm 1; the
    // encoder's norm is unused with mean pooling and does not train.
    let expected = |name: &str| match name {
        "cls_token" | "pos_embed" => 0.421875,
        n if n.starts_with("patch_embed") => 0.421875,
        n if n.starts_with("blocks.0.") => 0.5625,
        n if n.starts_with("blocks.1.") => 0.75,
        n if n.starts_with("norm.") => 0.0,
        _ => 1.0,
    };
    let mut seen = 0;
    for (name, scale) in ft.lr_scales() {
        assert_eq!(scale, expected(name), "{name}");
        seen += 1;
    }
    assert_eq!(seen, params.tensors().count());
}

fn check_encoder_mask_tokens<B: Backend>(b: &B) {
    let cfg = Config {
        encoder_mask_tokens: true,
        ..tiny()
    };
    let n = 3;
    let params = init_params(&cfg, 1);
    let opts = TrainOptions::new(n);
    let imgs = normals(6, n * 3 * 8 * 8, 1.0);
    let mut noise = vec![0.0; n * cfg.num_patches()];
    let mut rng = Rng::new(7);
    sample_noise(MaskSampling::Random, 2, 0.75, &mut rng, &mut noise).unwrap();
    let mut t = Trainer::new(b, &cfg, &params, opts, 0).unwrap();
    t.forward_backward(b, &imgs, Some(&noise)).unwrap();
    // The encoder sees every patch, cls included.
    assert_eq!(t.latent(b).unwrap().len(), n * (1 + cfg.num_patches()) * 16);
    let grads = t.download(b, t.grads()).unwrap();
    assert!(grads.decoder.mask_token.iter().all(|&g| g == 0.0));
    let grads: Vec<Vec<f32>> = grads.tensors().cloned().collect();
    let specs = t.specs();
    let names: Vec<String> = specs.tensors().map(|s| s.name.clone()).collect();
    let trained: Vec<bool> = names
        .iter()
        .map(|n| !n.ends_with("pos_embed") && n != "mask_token")
        .collect();
    assert!(names.iter().any(|n| n == "encoder_mask_token"));
    let flat: Vec<Vec<f32>> = params.tensors().cloned().collect();
    let mut loss = |tensors: &[Vec<f32>]| {
        let mut p = params.clone();
        for (dst, src) in p.tensors_mut().zip(tensors) {
            dst.clone_from(src);
        }
        let mut t = Trainer::new(b, &cfg, &p, opts, 0).unwrap();
        t.forward(b, &imgs, Some(&noise)).unwrap() as f64
    };
    check_directional(
        "encoder mask tokens",
        &flat,
        &names,
        &grads,
        &trained,
        &mut loss,
    );
}

fn check_samplings_train<B: Backend>(b: &B) {
    let cfg = Config {
        img_size: 16,
        ..tiny()
    };
    for sampling in MaskSampling::ALL {
        let opts = TrainOptions {
            mask_sampling: sampling,
            ..TrainOptions::new(2)
        };
        let mut t = Trainer::new(b, &cfg, &init_params(&cfg, 0), opts, 3).unwrap();
        let imgs = normals(8, 2 * 3 * 16 * 16, 1.0);
        let loss = t.train_step(b, &imgs, None, 1e-3).unwrap();
        assert!(loss.is_finite(), "{sampling:?}");
        let removed: f32 = t.masking().mask.iter().sum();
        assert_eq!(
            removed,
            2.0 * 12.0,
            "{sampling:?} removes 12 of 16 patches per image"
        );
    }
}

/// The encoder embeds the visible patches alone (`EncoderShape::embeds_kept_only`). The official
/// order embeds every patch, adds the position table and then keeps the visible tokens; a
/// learned position table takes that order (and gets a gradient of its own), so the two shapes
/// must give the same encoder input, latent and embedding gradients, up to the order in which
/// a backend's GEMM sums.
fn check_kept_patch_embedding<B: Backend>(b: &B) {
    let cfg = Config {
        img_size: 16,
        ..tiny()
    };
    let (n, l, keep, d) = (3, cfg.num_patches(), 5, cfg.embed_dim);
    let kept_only = EncoderShape::new(&cfg, n, keep);
    let every = EncoderShape {
        learn_pos_embed: true,
        ..kept_only
    };
    assert!(kept_only.embeds_kept_only() && !every.embeds_kept_only());
    let params = init_params(&cfg, 2).encoder;
    let p = params.try_map(|t| b.upload(t)).unwrap();
    let imgs = b.upload(&normals(9, n * 3 * 16 * 16, 1.0)).unwrap();
    let d_latent = b.upload(&normals(10, n * (1 + keep) * d, 1.0)).unwrap();
    let mut rng = mae_conformance::oracle::Rng::new(11);
    let ids: Vec<u32> = (0..n)
        .flat_map(|_| rng.permutation(l)[..keep].to_vec())
        .collect();
    let run = |sh: &EncoderShape| -> Vec<(&str, Vec<f32>)> {
        let mut acts = EncoderActs::new(b, sh, true, cfg.depth).unwrap();
        b.write_idx(&mut acts.ids_keep, &ids).unwrap();
        let mut s = EncoderScratch::new(b, sh, true, false).unwrap();
        encoder_forward(b, &imgs, &p, &mut acts, &mut s, sh).unwrap();
        let mut g = params.try_map(|t| b.upload(&vec![0.0; t.len()])).unwrap();
        encoder_backward(b, &d_latent, &p, &mut g, &acts, &mut s, sh, &mut ()).unwrap();
        let down = |buf: &B::Buf| {
            let mut v = vec![0.0; b.len(buf)];
            b.download(buf, &mut v).unwrap();
            v
        };
        vec![
            ("x0", down(&acts.x0)),
            ("latent", down(&acts.norm.y)),
            ("patch_embed.weight grad", down(&g.patch_embed.weight)),
            ("patch_embed.bias grad", down(&g.patch_embed.bias)),
            ("cls_token grad", down(&g.cls_token)),
        ]
    };
    for ((what, got), (_, want)) in run(&kept_only).into_iter().zip(run(&every)) {
        let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            got.len() == want.len() && worst <= 1e-5 * scale,
            "{what}: kept-only embedding differs by {worst:e} (scale {scale:e})"
        );
    }
}

macro_rules! variant_tests {
    ($($backend:ident),*) => {$(
        mod $backend {
            use super::*;

            #[test]
            fn finetune_mean_pool_drop_path_gradients() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_finetune_mean_pool(b);
                }
            }
            #[test]
            fn finetune_cls_pool_partial_gradients() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_finetune_cls_partial(b);
                }
            }
            #[test]
            fn finetune_step_lowers_the_loss() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_finetune_step_lowers_loss(b);
                }
            }
            #[test]
            fn layer_decay_assigns_the_documented_rates() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_layer_decay_rates(b);
                }
            }
            #[test]
            fn encoder_mask_token_gradients() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_encoder_mask_tokens(b);
                }
            }
            #[test]
            fn embedding_the_kept_patches_equals_the_official_order() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_kept_patch_embedding(b);
                }
            }
            #[test]
            fn every_mask_sampling_trains() {
                if let Some(b) = mae_conformance::backends::$backend() {
                    check_samplings_train(b);
                }
            }
        }
    )*};
}

variant_tests!(cpu, wgpu, cuda);
