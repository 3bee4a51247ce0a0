//! Initialization exactly as the official `initialize_weights` does it, from a seed.
//!
//! Bit-identical numbers to PyTorch would need PyTorch's generator; what matters, and what is
//! reproduced, is each tensor's distribution: xavier-uniform linears (the fused qkv as one
//! `[3D, D]` matrix), the patch-embedding weight xavier-uniform on its flattened `[D, C p p]` form
//! and its bias left at PyTorch's Conv2d default `U(+-1/sqrt(C p p))`, cls and mask tokens
//! `N(0, 0.02)`, LayerNorm 1 and 0, linear biases 0, and the fixed sin-cos tables.

use crate::config::Config;
use crate::params::{mae_specs, MaeParams, TensorSpec};
use crate::pos_embed::sincos_2d;
use crate::rng::Rng;
use alloc::vec;
use alloc::vec::Vec;

/// Host tensors of a freshly initialized model. Each tensor draws from its own sub-stream of
/// `seed`, so the same seed gives the same model on every machine.
///
/// ```
/// let cfg = mae::Config::preset("tiny32").unwrap();
/// let p = mae::init::init_params(&cfg, 0);
/// assert_eq!(p.encoder.blocks[0].qkv.weight.len(), 3 * 192 * 192);
/// assert!(p.encoder.blocks[0].norm1.weight.iter().all(|&x| x == 1.0));
/// ```
pub fn init_params(cfg: &Config, seed: u64) -> MaeParams<Vec<f32>> {
    let root = Rng::new(seed);
    let mut stream = 0;
    let result: Result<_, core::convert::Infallible> = mae_specs(cfg).try_map(|spec| {
        stream += 1;
        Ok(init_tensor(cfg, spec, &mut root.fork(stream)))
    });
    match result {
        Ok(params) => params,
        Err(never) => match never {},
    }
}

fn init_tensor(cfg: &Config, spec: &TensorSpec, rng: &mut Rng) -> Vec<f32> {
    let n = spec.numel();
    let uniform = |rng: &mut Rng, bound: f64| -> Vec<f32> {
        (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
    };
    match spec.name.as_str() {
        "pos_embed" => sincos_2d(cfg.embed_dim, cfg.grid_size()),
        "decoder_pos_embed" => sincos_2d(cfg.decoder_embed_dim, cfg.grid_size()),
        "cls_token" | "mask_token" | "encoder_mask_token" => {
            (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
        }
        "patch_embed.proj.bias" => {
            let fan_in = (cfg.patch_dim()) as f64;
            uniform(rng, 1.0 / libm::sqrt(fan_in))
        }
        name if name.ends_with(".bias") => vec![0.0; n],
        // The remaining 1-D tensors are LayerNorm scales.
        _ if spec.shape.len() == 1 => vec![1.0; n],
        _ => {
            // Linear [out, in], or the conv weight seen as [D, C p p].
            let fan_out = spec.shape[0] as f64;
            let fan_in = (n / spec.shape[0]) as f64;
            uniform(rng, libm::sqrt(6.0 / (fan_in + fan_out)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(x: &[f32]) -> (f64, f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let max = x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
        (mean, libm::sqrt(var), max)
    }

    #[test]
    fn distributions_follow_the_official_init() {
        let cfg = Config::preset("mae_vit_base_patch16").unwrap();
        let cfg = Config {
            depth: 1,
            decoder_depth: 1,
            ..cfg
        };
        let p = init_params(&cfg, 3);
        // Fused qkv: one [3D, D] matrix, bound sqrt(6 / 4D).
        let bound = libm::sqrt(6.0 / (4.0 * 768.0));
        let (mean, std, max) = stats(&p.encoder.blocks[0].qkv.weight);
        assert!(mean.abs() < 1e-3 && max <= bound && max > 0.99 * bound);
        assert!((std - bound / libm::sqrt(3.0)).abs() < 1e-3);
        // Patch embedding: fan_in 3 * 16 * 16, fan_out 768.
        let (_, _, max) = stats(&p.encoder.patch_embed.weight);
        let bound = libm::sqrt(6.0 / (768.0 + 768.0));
        assert!(max <= bound && max > 0.99 * bound);
        let (_, _, max) = stats(&p.encoder.patch_embed.bias);
        assert!(max <= 1.0 / libm::sqrt(768.0) && max > 0.9 / libm::sqrt(768.0));
        let (mean, std, _) = stats(&p.encoder.cls_token);
        assert!(mean.abs() < 0.005 && (std - 0.02).abs() < 0.003);
        assert!(p.encoder.blocks[0].qkv.bias.iter().all(|&x| x == 0.0));
        assert!(p.decoder.norm.weight.iter().all(|&x| x == 1.0));
        assert_eq!(p.decoder.pos_embed, sincos_2d(512, 14));
        // Same seed, same model; another seed, another model.
        assert_eq!(init_params(&cfg, 3), p);
        assert_ne!(init_params(&cfg, 4).encoder.cls_token, p.encoder.cls_token);
    }
}
