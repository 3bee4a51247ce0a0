//! Properties of the whole training step that the golden files do not pin down: bitwise
//! repeatability, bitwise resume from a saved state, gradient accumulation, the embedding path
//! agreeing with the training encoder, and a loss that actually falls.

use mae::backend::{BResult, Backend};
use mae::embed::{Embedder, Pool};
use mae::init::init_params;
use mae::model::GradsReady;
use mae::rng::Rng;
use mae::train::{TrainOptions, Trainer};
use mae::Config;
use mae_conformance::backends::down;
use mae_conformance::golden::rel_l2;

fn small() -> Config {
    Config {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 24,
        decoder_depth: 1,
        decoder_num_heads: 3,
        mlp_ratio: 2.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
        encoder_mask_tokens: false,
    }
}

fn images(seed: u64, n: usize, cfg: &Config) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * cfg.in_chans * cfg.img_size * cfg.img_size)
        .map(|_| rng.normal() as f32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn run_steps<B: Backend>(
    b: &B,
    steps: u64,
    seed: u64,
) -> (Vec<f32>, mae::params::MaeParams<Vec<f32>>) {
    let cfg = small();
    let mut t = Trainer::new(
        b,
        &cfg,
        &init_params(&cfg, seed),
        TrainOptions::new(3),
        seed,
    )
    .unwrap();
    let losses = (0..steps)
        .map(|s| t.train_step(b, &images(s, 3, &cfg), None, 1e-3).unwrap())
        .collect();
    (losses, t.download(b, t.params()).unwrap())
}

fn repeatable<B: Backend>(b: &B) {
    let (l1, p1) = run_steps(b, 3, 9);
    let (l2, p2) = run_steps(b, 3, 9);
    assert_eq!(
        bits(&l1),
        bits(&l2),
        "losses differ between two identical runs"
    );
    for (x, y) in p1.tensors().zip(p2.tensors()) {
        assert_eq!(
            bits(x),
            bits(y),
            "weights differ between two identical runs"
        );
    }
    let (l3, _) = run_steps(b, 3, 10);
    assert_ne!(bits(&l1), bits(&l3), "another seed must give another run");
}

fn resume_is_bitwise<B: Backend>(b: &B) {
    let cfg = small();
    let opts = TrainOptions::new(2);
    let init = init_params(&cfg, 1);
    let mut whole = Trainer::new(b, &cfg, &init, opts, 5).unwrap();
    let mut first = Trainer::new(b, &cfg, &init, opts, 5).unwrap();
    for s in 0..4 {
        let imgs = images(100 + s, 2, &cfg);
        whole.train_step(b, &imgs, None, 2e-3).unwrap();
        if s < 2 {
            first.train_step(b, &imgs, None, 2e-3).unwrap();
        }
    }
    let state = first.state(b).unwrap();
    drop(first);
    let mut resumed = Trainer::from_state(b, &cfg, &state, opts).unwrap();
    assert_eq!(resumed.updates(), 2);
    for s in 2..4 {
        resumed
            .train_step(b, &images(100 + s, 2, &cfg), None, 2e-3)
            .unwrap();
    }
    let (a, c) = (whole.state(b).unwrap(), resumed.state(b).unwrap());
    assert_eq!(a.rng_state, c.rng_state);
    for (x, y) in a
        .params
        .tensors()
        .zip(c.params.tensors())
        .chain(a.v.tensors().zip(c.v.tensors()))
    {
        assert_eq!(
            bits(x),
            bits(y),
            "resumed run diverged from the uninterrupted one"
        );
    }
}

/// Two micro-batches of 2 with accumulation equal one batch of 4: every image removes the same
/// number of patches, so the big batch's loss is the mean of the two small ones.
fn accumulation_matches_big_batch<B: Backend>(b: &B) {
    let cfg = small();
    let init = init_params(&cfg, 2);
    let l = cfg.num_patches();
    let imgs = images(7, 4, &cfg);
    let mut noise = vec![0.0; 4 * l];
    Rng::new(3).fill_uniform(&mut noise);
    let img_len = cfg.in_chans * cfg.img_size * cfg.img_size;

    let mut big = Trainer::new(b, &cfg, &init, TrainOptions::new(4), 0).unwrap();
    big.forward_backward(b, &imgs, Some(&noise)).unwrap();
    let g_big = big.download(b, big.grads()).unwrap();

    let opts = TrainOptions {
        accum_steps: 2,
        ..TrainOptions::new(2)
    };
    let mut small_t = Trainer::new(b, &cfg, &init, opts, 0).unwrap();
    for half in 0..2 {
        let im = &imgs[half * 2 * img_len..(half + 1) * 2 * img_len];
        let nz = &noise[half * 2 * l..(half + 1) * 2 * l];
        small_t.forward_backward(b, im, Some(nz)).unwrap();
    }
    assert_eq!(small_t.pending(), 2);
    let g_acc = small_t.download(b, small_t.grads()).unwrap();
    for ((spec, x), y) in small_t
        .specs()
        .tensors()
        .zip(g_acc.tensors())
        .zip(g_big.tensors())
    {
        if spec.role == mae::params::Role::Fixed {
            continue;
        }
        let e = rel_l2(x, y);
        assert!(
            e < 1e-5,
            "{}: accumulated gradient differs by {e:.2e}",
            spec.name
        );
    }
    // An update consumes the accumulation and zeroes the gradients.
    small_t.update(b, 1e-3).unwrap();
    let zero = small_t.download(b, small_t.grads()).unwrap();
    assert!(zero.tensors().all(|t| t.iter().all(|&x| x == 0.0)));
}

/// Records what a backward hands over: each buffer's address, its contents at that moment, and
/// the number of hand-overs.
#[derive(Default)]
struct Handed {
    seen: Vec<(usize, Vec<f32>)>,
    calls: usize,
}

impl<B: Backend> GradsReady<B> for Handed {
    fn ready(&mut self, b: &B, grads: &mut [&mut B::Buf]) -> BResult<()> {
        for g in grads.iter() {
            let mut values = vec![0.0; b.len(g)];
            b.download(g, &mut values)?;
            self.seen.push((&**g as *const B::Buf as usize, values));
        }
        self.calls += 1;
        Ok(())
    }
}

/// The backward hands over every gradient exactly once, after its last write (what the
/// data-parallel averaging relies on to start during the backward): each tensor then holds
/// what it holds at the end, also when a second micro-batch accumulates onto the first, and
/// with the encoder's mask token. A block's gradients go over as soon as the block is done.
fn gradients_are_handed_over_once_when_final<B: Backend>(b: &B) {
    for encoder_mask_tokens in [false, true] {
        let cfg = Config {
            encoder_mask_tokens,
            ..small()
        };
        let opts = TrainOptions {
            accum_steps: 2,
            ..TrainOptions::new(2)
        };
        let mut t = Trainer::new(b, &cfg, &init_params(&cfg, 4), opts, 4).unwrap();
        for micro in 0..2 {
            let mut handed = Handed::default();
            let imgs = images(micro, 2, &cfg);
            t.forward_backward_reporting(b, &imgs, None, &mut handed)
                .unwrap();
            // The decoder's head and embedding, the encoder's norm and embedding, each block.
            assert_eq!(handed.calls, 4 + cfg.depth + cfg.decoder_depth);
            assert_eq!(handed.seen.len(), t.grads().tensors().count());
            for (spec, g) in t.specs().tensors().zip(t.grads().tensors()) {
                let addr = g as *const _ as usize;
                let got: Vec<&Vec<f32>> = handed
                    .seen
                    .iter()
                    .filter(|(a, _)| *a == addr)
                    .map(|(_, v)| v)
                    .collect();
                let name = &spec.name;
                assert_eq!(got.len(), 1, "{name} handed over {} times", got.len());
                assert_eq!(
                    bits(got[0]),
                    bits(&down(b, g)),
                    "{name} was handed over before its last write (micro-batch {micro}, \
                     encoder mask tokens {encoder_mask_tokens})"
                );
            }
        }
    }
}

/// Forty steps on one fixed batch must cut the loss well down.
fn loss_falls<B: Backend>(b: &B) {
    let cfg = small();
    let mut t = Trainer::new(b, &cfg, &init_params(&cfg, 4), TrainOptions::new(8), 4).unwrap();
    let imgs = images(42, 8, &cfg);
    let first = t.train_step(b, &imgs, None, 3e-3).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = t.train_step(b, &imgs, None, 3e-3).unwrap();
    }
    assert!(last < 0.8 * first, "loss did not fall: {first} -> {last}");
}

/// Cls pooling is row 0 of the tokens; mean pooling is the mean of the other rows.
fn pooling_matches_tokens<B: Backend>(b: &B) {
    let cfg = small();
    let enc = init_params(&cfg, 6).encoder;
    let mut e = Embedder::new(b, &cfg, &enc, 2).unwrap();
    let imgs = images(8, 2, &cfg);
    let tokens = e.tokens(b, &imgs).unwrap();
    let cls = e.pooled(b, &imgs, Pool::Cls).unwrap();
    let mean = e.pooled(b, &imgs, Pool::Mean).unwrap();
    let (t, d) = (1 + cfg.num_patches(), cfg.embed_dim);
    for n in 0..2 {
        let img = &tokens[n * t * d..(n + 1) * t * d];
        assert_eq!(&cls[n * d..(n + 1) * d], &img[..d]);
        for c in 0..d {
            let m = (1..t).map(|r| img[r * d + c] as f64).sum::<f64>() / (t - 1) as f64;
            assert!((mean[n * d + c] as f64 - m).abs() < 1e-5);
        }
    }
    // A short batch gives the same features for the images it has.
    let one = e.pooled(b, &imgs[..imgs.len() / 2], Pool::Cls).unwrap();
    assert_eq!(one, cls[..d]);
}

/// The extremes of masking: no visible patch (the encoder sees only cls) and a single removed
/// patch; batch size 1.
fn extreme_masking_runs<B: Backend>(b: &B) {
    let cfg = small(); // 16 patches
    for (ratio, keep) in [(0.99, 0), (0.0625, 15)] {
        let opts = TrainOptions {
            mask_ratio: ratio,
            ..TrainOptions::new(1)
        };
        let mut t = Trainer::new(b, &cfg, &init_params(&cfg, 1), opts, 1).unwrap();
        assert_eq!(t.masking().len_keep, keep);
        for s in 0..3 {
            let loss = t.train_step(b, &images(s, 1, &cfg), None, 1e-3).unwrap();
            assert!(loss.is_finite() && loss > 0.0, "ratio {ratio}: loss {loss}");
        }
        let g = t.download(b, t.params()).unwrap();
        assert!(g.tensors().all(|x| x.iter().all(|v| v.is_finite())));
    }
}

/// One module of tests per backend, named after its getter in `mae_conformance::backends`.
macro_rules! training_tests {
    ($($backend:ident),*) => {$(
        mod $backend {
            fn b() -> Option<&'static impl mae::backend::Backend> {
                mae_conformance::backends::$backend()
            }

            #[test]
            fn extreme_masking_runs() {
                if let Some(b) = b() {
                    super::extreme_masking_runs(b);
                }
            }
            #[test]
            fn repeatable() {
                if let Some(b) = b() {
                    super::repeatable(b);
                }
            }
            #[test]
            fn resume_is_bitwise() {
                if let Some(b) = b() {
                    super::resume_is_bitwise(b);
                }
            }
            #[test]
            fn accumulation_matches_big_batch() {
                if let Some(b) = b() {
                    super::accumulation_matches_big_batch(b);
                }
            }
            #[test]
            fn gradients_are_handed_over_once_when_final() {
                if let Some(b) = b() {
                    super::gradients_are_handed_over_once_when_final(b);
                }
            }
            #[test]
            fn loss_falls() {
                if let Some(b) = b() {
                    super::loss_falls(b);
                }
            }
            #[test]
            fn pooling_matches_tokens() {
                if let Some(b) = b() {
                    super::pooling_matches_tokens(b);
                }
            }
        }
    )*};
}

training_tests!(cpu, wgpu, cuda);
