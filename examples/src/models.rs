//! Model choice for the programs: `--model NAME` is `demo`, a preset of [`Config::preset`], or
//! a JSON file with the fields of [`Config`] (unknown fields are refused).

use mae::Config;
use std::path::Path;

/// The `demo` model: small enough to learn visibly in minutes on two CPU cores (img 32, patch
/// 4, 4 blocks of width 96, decoder 2 blocks of 64, norm-pix loss).
pub fn demo() -> Config {
    Config {
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 96,
        depth: 4,
        num_heads: 3,
        decoder_embed_dim: 64,
        decoder_depth: 2,
        decoder_num_heads: 4,
        mlp_ratio: 4.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
        encoder_mask_tokens: false,
    }
}

/// Resolves `--model`: `demo`, a preset name, or a path to a `.json` configuration.
///
/// ```
/// use mae_examples::models::resolve;
/// assert_eq!(resolve("demo").unwrap().embed_dim, 96);
/// assert_eq!(resolve("mae_vit_base_patch16").unwrap().embed_dim, 768);
/// assert!(resolve("vit_tiny").unwrap_err().contains("unknown model preset"));
/// ```
pub fn resolve(name: &str) -> Result<Config, String> {
    if name == "demo" {
        return Ok(demo());
    }
    if name.ends_with(".json") {
        let path = Path::new(name);
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read model configuration {}: {e}", path.display()))?;
        return Config::from_json(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    Config::preset(name).map_err(|e| format!("{e} (or give `demo` or a .json configuration)"))
}
