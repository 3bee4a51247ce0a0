//! Model configuration: the shape of an MAE, its presets, and validation.

use alloc::string::String;
use core::fmt;
use serde::{Deserialize, Serialize};

/// The architecture of a Masked Autoencoder: a ViT encoder that sees only the visible patches and
/// a light ViT decoder that reconstructs the removed ones.
///
/// Field names are those of the official `MaskedAutoencoderViT` constructor, so the JSON form of a
/// `Config` is the `config` metadata of the golden files and of this project's checkpoints.
///
/// ```
/// let cfg = mae::Config::preset("mae_vit_base_patch16").unwrap();
/// assert_eq!(cfg.num_patches(), 196);
/// assert!(cfg.validate().is_ok());
/// let bad = mae::Config { embed_dim: 770, ..cfg };
/// assert!(bad.validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Side of the square input image, in pixels.
    pub img_size: usize,
    /// Side of a square patch, in pixels.
    pub patch_size: usize,
    /// Input channels (3 for RGB, 1 for gray; any C >= 1).
    pub in_chans: usize,
    /// Encoder width D.
    pub embed_dim: usize,
    /// Number of encoder blocks.
    pub depth: usize,
    /// Encoder attention heads.
    pub num_heads: usize,
    /// Decoder width.
    pub decoder_embed_dim: usize,
    /// Number of decoder blocks.
    pub decoder_depth: usize,
    /// Decoder attention heads.
    pub decoder_num_heads: usize,
    /// MLP hidden width as a multiple of the block width (timm: `int(dim * mlp_ratio)`).
    pub mlp_ratio: f64,
    /// Reconstruct per-patch normalized pixels (the paper's best setting).
    pub norm_pix_loss: bool,
    /// LayerNorm epsilon (1e-6 in every official model).
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// The ablation of Table 1c: the encoder sees every patch, a learned mask token (named
    /// `encoder_mask_token`) standing in for each removed one, and the decoder gets no mask
    /// tokens of its own. Off in every official model, and then absent from the JSON.
    #[serde(default, skip_serializing_if = "is_false")]
    pub encoder_mask_tokens: bool,
}

fn default_eps() -> f64 {
    1e-6
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Names accepted by [`Config::preset`].
pub const PRESETS: &[&str] = &[
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "tiny32",
    "small64",
    "base224",
];

impl Config {
    /// A named configuration: the paper's three models (`mae_vit_base_patch16`,
    /// `mae_vit_large_patch16`, `mae_vit_huge_patch14`, each with the 512-d 8-block decoder and
    /// LayerNorm eps 1e-6) and the three benchmark cases of DESIGN.md (`tiny32`, `small64`,
    /// `base224`, all with norm-pix loss).
    pub fn preset(name: &str) -> Result<Config, ConfigError> {
        let paper = |patch, dim, depth, heads| Config {
            img_size: 224,
            patch_size: patch,
            in_chans: 3,
            embed_dim: dim,
            depth,
            num_heads: heads,
            decoder_embed_dim: 512,
            decoder_depth: 8,
            decoder_num_heads: 16,
            mlp_ratio: 4.0,
            norm_pix_loss: false,
            norm_eps: 1e-6,
            encoder_mask_tokens: false,
        };
        let cfg = match name {
            "mae_vit_base_patch16" => paper(16, 768, 12, 12),
            "mae_vit_large_patch16" => paper(16, 1024, 24, 16),
            "mae_vit_huge_patch14" => paper(14, 1280, 32, 16),
            "base224" => Config {
                norm_pix_loss: true,
                ..paper(16, 768, 12, 12)
            },
            "tiny32" => Config {
                img_size: 32,
                patch_size: 4,
                embed_dim: 192,
                depth: 12,
                num_heads: 3,
                decoder_embed_dim: 128,
                decoder_depth: 4,
                decoder_num_heads: 4,
                norm_pix_loss: true,
                ..paper(16, 768, 12, 12)
            },
            "small64" => Config {
                img_size: 64,
                patch_size: 8,
                embed_dim: 384,
                depth: 12,
                num_heads: 6,
                decoder_embed_dim: 256,
                decoder_depth: 4,
                decoder_num_heads: 8,
                norm_pix_loss: true,
                ..paper(16, 768, 12, 12)
            },
            other => return Err(ConfigError::UnknownPreset(other.into())),
        };
        Ok(cfg)
    }

    /// Checks every constraint the model relies on; every other method assumes it passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sizes = [
            ("img_size", self.img_size),
            ("patch_size", self.patch_size),
            ("in_chans", self.in_chans),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("decoder_embed_dim", self.decoder_embed_dim),
            ("decoder_depth", self.decoder_depth),
            ("decoder_num_heads", self.decoder_num_heads),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        if self.img_size % self.patch_size != 0 {
            return Err(ConfigError::ImageNotDivisible {
                img_size: self.img_size,
                patch_size: self.patch_size,
            });
        }
        for (field, dim, heads) in [
            ("embed_dim", self.embed_dim, self.num_heads),
            (
                "decoder_embed_dim",
                self.decoder_embed_dim,
                self.decoder_num_heads,
            ),
        ] {
            if dim % heads != 0 {
                return Err(ConfigError::HeadsDoNotDivide { field, dim, heads });
            }
            if dim % 4 != 0 {
                return Err(ConfigError::SinCosDim { field, dim });
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0)
            || self.mlp_hidden(self.embed_dim) == 0
            || self.mlp_hidden(self.decoder_embed_dim) == 0
        {
            return Err(ConfigError::MlpRatio(self.mlp_ratio));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ConfigError::NormEps(self.norm_eps));
        }
        // Keep every tensor addressable with u32 element counts (GPU APIs), computed without
        // overflow so absurd sizes are an error rather than a wrap-around.
        let grid = self.img_size / self.patch_size;
        let widest = self
            .embed_dim
            .max(self.decoder_embed_dim)
            .max(self.mlp_hidden(self.embed_dim))
            .max(self.mlp_hidden(self.decoder_embed_dim));
        let biggest = grid
            .checked_mul(grid)
            .and_then(|l| l.checked_add(1))
            .and_then(|t| t.checked_mul(widest))
            .and_then(|x| x.checked_mul(4));
        let patch_dim = self
            .patch_size
            .checked_mul(self.patch_size)
            .and_then(|x| x.checked_mul(self.in_chans));
        let limit = u32::MAX as usize;
        if biggest.is_none_or(|x| x > limit) || patch_dim.is_none_or(|x| x > limit) {
            return Err(ConfigError::TooLarge);
        }
        if self.norm_pix_loss && self.patch_dim() < 2 {
            return Err(ConfigError::NormPixNeedsTwoValues);
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// L, the number of patches of one image.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Values in one patch, `p * p * C` (the width of the decoder's prediction).
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    /// Hidden width of the MLP of a block of width `dim`.
    pub fn mlp_hidden(&self, dim: usize) -> usize {
        // timm computes int(dim * mlp_ratio) in f64.
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// How `batch` images of this model become patches, in `order`.
    pub fn patchify(
        &self,
        batch: usize,
        order: crate::backend::PatchOrder,
    ) -> crate::backend::Patchify {
        crate::backend::Patchify {
            batch,
            channels: self.in_chans,
            height: self.img_size,
            width: self.img_size,
            patch: self.patch_size,
            order,
        }
    }

    /// The configuration as the JSON object stored in checkpoint metadata.
    pub fn to_json(&self) -> String {
        // Serializing plain numbers and booleans cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and validates the JSON object written by [`Config::to_json`] (or a golden file).
    pub fn from_json(json: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(alloc::format!("{e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Why a configuration (or a training setting) cannot be used.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigError {
    /// A size that must be at least 1 is 0.
    Zero(&'static str),
    /// The image is not a whole number of patches.
    ImageNotDivisible { img_size: usize, patch_size: usize },
    /// Attention heads must split the width evenly.
    HeadsDoNotDivide {
        field: &'static str,
        dim: usize,
        heads: usize,
    },
    /// The 2-D sin-cos table splits the width into four equal parts.
    SinCosDim { field: &'static str, dim: usize },
    /// `mlp_ratio` must be finite, positive, and give a hidden width of at least 1.
    MlpRatio(f64),
    /// LayerNorm epsilon must be finite and positive.
    NormEps(f64),
    /// Per-patch normalization uses the unbiased variance, which needs two values per patch.
    NormPixNeedsTwoValues,
    /// The model's buffers would exceed 2^32 elements.
    TooLarge,
    /// The mask ratio must lie in [0, 1).
    MaskRatio(f64),
    /// The mask ratio removes no patch of this image size, so there is nothing to reconstruct.
    MaskRemovesNothing { mask_ratio: f64, num_patches: usize },
    /// A grid sampling keeps one patch per square cell, which this ratio and grid do not allow.
    GridMask { mask_ratio: f64, num_patches: usize },
    /// Not `random`, `block` or `grid`.
    MaskSampling(String),
    /// A batch size of 0, or gradient accumulation of 0 steps.
    EmptyBatch,
    /// A hyper-parameter outside its domain (negative learning rate, beta outside [0, 1), ...).
    Hyper { name: &'static str, value: f64 },
    /// Not one of [`PRESETS`].
    UnknownPreset(String),
    /// Malformed configuration JSON.
    Json(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero(field) => write!(f, "config: {field} must be at least 1"),
            ConfigError::ImageNotDivisible {
                img_size,
                patch_size,
            } => write!(
                f,
                "config: img_size {img_size} is not divisible by patch_size {patch_size}"
            ),
            ConfigError::HeadsDoNotDivide { field, dim, heads } => write!(
                f,
                "config: {field} {dim} is not divisible by its {heads} attention heads"
            ),
            ConfigError::SinCosDim { field, dim } => write!(
                f,
                "config: {field} {dim} must be divisible by 4 for the 2-D sin-cos position table"
            ),
            ConfigError::MlpRatio(r) => write!(
                f,
                "config: mlp_ratio {r} must be finite, positive and give a hidden width >= 1"
            ),
            ConfigError::NormEps(e) => {
                write!(f, "config: norm_eps {e} must be finite and positive")
            }
            ConfigError::NormPixNeedsTwoValues => write!(
                f,
                "config: norm_pix_loss needs at least 2 values per patch (patch_size^2 * in_chans)"
            ),
            ConfigError::TooLarge => write!(f, "config: model buffers would exceed 2^32 elements"),
            ConfigError::MaskRatio(r) => write!(f, "mask ratio {r} is outside [0, 1)"),
            ConfigError::MaskRemovesNothing {
                mask_ratio,
                num_patches,
            } => write!(
                f,
                "mask ratio {mask_ratio} removes none of the {num_patches} patches: nothing to reconstruct"
            ),
            ConfigError::GridMask {
                mask_ratio,
                num_patches,
            } => write!(
                f,
                "grid masking keeps one patch per square cell: mask ratio {mask_ratio} on \
                 {num_patches} patches is not 1 - 1/s^2 for a cell side s dividing the grid \
                 (0.75 is)"
            ),
            ConfigError::MaskSampling(name) => write!(
                f,
                "unknown mask sampling `{name}` (random, block or grid)"
            ),
            ConfigError::EmptyBatch => write!(f, "batch size and accumulation steps must be >= 1"),
            ConfigError::Hyper { name, value } => {
                write!(f, "hyper-parameter {name} = {value} is outside its domain")
            }
            ConfigError::UnknownPreset(name) => write!(
                f,
                "unknown model preset {name:?}; known: {}",
                PRESETS.join(", ")
            ),
            ConfigError::Json(msg) => write!(f, "config JSON: {msg}"),
        }
    }
}

impl core::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_match_the_paper() {
        for name in PRESETS {
            let cfg = Config::preset(name).unwrap();
            cfg.validate().unwrap();
            assert_eq!(Config::from_json(&cfg.to_json()).unwrap(), cfg);
        }
        let h = Config::preset("mae_vit_huge_patch14").unwrap();
        assert_eq!((h.num_patches(), h.patch_dim()), (256, 588));
    }

    #[test]
    fn every_constraint_has_its_error() {
        let ok = Config::preset("tiny32").unwrap();
        let cases: [(Config, ConfigError); 8] = [
            (
                Config {
                    depth: 0,
                    ..ok.clone()
                },
                ConfigError::Zero("depth"),
            ),
            (
                Config {
                    img_size: 30,
                    ..ok.clone()
                },
                ConfigError::ImageNotDivisible {
                    img_size: 30,
                    patch_size: 4,
                },
            ),
            (
                Config {
                    num_heads: 5,
                    ..ok.clone()
                },
                ConfigError::HeadsDoNotDivide {
                    field: "embed_dim",
                    dim: 192,
                    heads: 5,
                },
            ),
            (
                Config {
                    decoder_embed_dim: 130,
                    decoder_num_heads: 2,
                    ..ok.clone()
                },
                ConfigError::SinCosDim {
                    field: "decoder_embed_dim",
                    dim: 130,
                },
            ),
            (
                Config {
                    mlp_ratio: f64::NAN,
                    ..ok.clone()
                },
                ConfigError::MlpRatio(f64::NAN),
            ),
            (
                Config {
                    norm_eps: 0.0,
                    ..ok.clone()
                },
                ConfigError::NormEps(0.0),
            ),
            (
                Config {
                    patch_size: 1,
                    in_chans: 1,
                    ..ok.clone()
                },
                ConfigError::NormPixNeedsTwoValues,
            ),
            (
                Config {
                    img_size: 1 << 20,
                    patch_size: 1,
                    ..ok.clone()
                },
                ConfigError::TooLarge,
            ),
        ];
        for (cfg, want) in cases {
            let got = cfg.validate().unwrap_err();
            // NaN != NaN: compare the message instead.
            assert_eq!(alloc::format!("{got}"), alloc::format!("{want}"));
        }
        assert!(matches!(
            Config::preset("vit_gigantic"),
            Err(ConfigError::UnknownPreset(_))
        ));
        assert!(matches!(
            Config::from_json("{\"img_size\": 32}"),
            Err(ConfigError::Json(_))
        ));
    }
}
