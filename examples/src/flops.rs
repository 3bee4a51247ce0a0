//! Model FLOPs, counted as the PyTorch reference of `bench` counts them: 2 per multiply-add of
//! every GEMM and attention product of the forward pass; a training step is 3x its forward.

use mae::Config;

/// Forward FLOPs of one transformer stack on `tokens` tokens of width `dim`.
fn stack(tokens: f64, dim: f64, hidden: f64, depth: usize) -> f64 {
    let per_block = 2.0
        * (tokens * dim * 3.0 * dim      // qkv
            + 2.0 * tokens * tokens * dim // q k^T and att v, all heads
            + tokens * dim * dim          // proj
            + 2.0 * tokens * dim * hidden); // fc1, fc2
    per_block * depth as f64
}

/// Forward FLOPs of the encoder on one image with `keep` visible patches (the patch embedding
/// runs on every patch, as in the official code).
pub fn encoder_forward(cfg: &Config, keep: usize) -> f64 {
    let (l, d) = (cfg.num_patches() as f64, cfg.embed_dim as f64);
    2.0 * l * cfg.patch_dim() as f64 * d
        + stack(
            1.0 + keep as f64,
            d,
            cfg.mlp_hidden(cfg.embed_dim) as f64,
            cfg.depth,
        )
}

/// Forward FLOPs of the whole MAE on one image with `keep` visible patches.
pub fn mae_forward(cfg: &Config, keep: usize) -> f64 {
    let (t, d, dd) = (
        1.0 + cfg.num_patches() as f64,
        cfg.embed_dim as f64,
        cfg.decoder_embed_dim as f64,
    );
    encoder_forward(cfg, keep)
        + 2.0 * (1.0 + keep as f64) * d * dd
        + stack(
            t,
            dd,
            cfg.mlp_hidden(cfg.decoder_embed_dim) as f64,
            cfg.decoder_depth,
        )
        + 2.0 * t * dd * cfg.patch_dim() as f64
}

/// FLOPs of one training step (forward, backward) on one image.
pub fn mae_train(cfg: &Config, keep: usize) -> f64 {
    3.0 * mae_forward(cfg, keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b_encoder_is_about_17_gflops() {
        // ViT-B/16 on a whole 224 image is the well-known ~17.6 GFLOPs (2 per multiply-add).
        let cfg = Config::preset("mae_vit_base_patch16").unwrap();
        let f = encoder_forward(&cfg, 196) / 1e9;
        assert!((17.0..18.0).contains(&f), "{f}");
    }
}
