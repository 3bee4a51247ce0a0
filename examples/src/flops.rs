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

/// Forward FLOPs of the encoder on one image with `keep` visible patches, the patch embedding
/// counted on every patch as the official code runs it (mae embeds the visible patches alone,
/// so in training it executes slightly fewer: 0.6 % less for ViT-B/16).
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

    /// toolchain.md's PyTorch table gives GFLOP/s and img/s per case; their ratio is the
    /// per-image count of the same rule, which ours must reproduce.
    #[test]
    fn counts_match_the_reference_table() {
        for (case, train, embed) in [
            ("tiny32", 112.0 / 125.0, 110.0 / 150.0),
            ("small64", 133.0 / 37.5, 150.0 / 52.8),
            ("base224", 139.0 / 2.35, 151.0 / 4.29),
        ] {
            let cfg = Config::preset(case).unwrap();
            let keep = mae::masking::keep_count(cfg.num_patches(), 0.75);
            let ours_train = mae_train(&cfg, keep) / 1e9;
            let ours_embed = encoder_forward(&cfg, cfg.num_patches()) / 1e9;
            // The table's figures have two or three significant digits.
            assert!(
                (ours_train / train - 1.0).abs() < 0.03,
                "{case} train {ours_train} vs {train}"
            );
            assert!(
                (ours_embed / embed - 1.0).abs() < 0.03,
                "{case} embed {ours_embed} vs {embed}"
            );
        }
    }
}
