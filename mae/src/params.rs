//! The model's tensors, as structs that mirror the official module tree.
//!
//! One generic shape serves every per-tensor collection: device weights (`MaeParams<B::Buf>`),
//! their gradients and AdamW moments, host copies (`MaeParams<Vec<f32>>`) and the specs
//! (`MaeParams<TensorSpec>`: official name, shape, weight-decay group). Iteration order is the
//! same for all of them, so zipping collections pairs each tensor with its gradient and spec.

use crate::config::Config;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// How the optimizer treats a tensor (the official `add_weight_decay` grouping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trained with weight decay: weights of 2 or more dimensions, including cls and mask tokens.
    Decayed,
    /// Trained without weight decay: biases and 1-D tensors (LayerNorm).
    NotDecayed,
    /// Not trained: the sin-cos position tables.
    Fixed,
}

/// Name, shape and role of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Official state-dict name, e.g. `blocks.3.attn.qkv.weight`.
    pub name: String,
    /// Official shape, e.g. `[3 * D, D]`.
    pub shape: Vec<usize>,
    /// Optimizer group.
    pub role: Role,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>) -> TensorSpec {
        // timm's rule: no decay for 1-D tensors and anything named *.bias.
        let role = if shape.len() <= 1 || name.ends_with(".bias") {
            Role::NotDecayed
        } else {
            Role::Decayed
        };
        TensorSpec { name, shape, role }
    }
    fn fixed(name: String, shape: Vec<usize>) -> TensorSpec {
        TensorSpec {
            name,
            shape,
            role: Role::Fixed,
        }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A `Linear` (or the patch-embedding Conv2d seen as one): `y = x W^T + b`, `W` is `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear<T> {
    /// `[out, in]` (`[D, C, p, p]` for the patch embedding).
    pub weight: T,
    /// `[out]`.
    pub bias: T,
}

/// A LayerNorm's scale and shift.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm<T> {
    /// gamma, `[dim]`.
    pub weight: T,
    /// beta, `[dim]`.
    pub bias: T,
}

/// A pre-LN transformer block (timm `Block`): `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Clone, Debug, PartialEq)]
pub struct Block<T> {
    /// Before attention.
    pub norm1: Norm<T>,
    /// Fused query, key, value projection `[3 D, D]`.
    pub qkv: Linear<T>,
    /// Attention output projection.
    pub proj: Linear<T>,
    /// Before the MLP.
    pub norm2: Norm<T>,
    /// MLP expansion.
    pub fc1: Linear<T>,
    /// MLP contraction.
    pub fc2: Linear<T>,
}

/// The ViT encoder: what an embedding application needs, and what the paper's released
/// `mae_pretrain_vit_*` checkpoints hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoder<T> {
    /// `patch_embed.proj`.
    pub patch_embed: Linear<T>,
    /// `cls_token`, `[1, 1, D]`.
    pub cls_token: T,
    /// `pos_embed`, fixed sin-cos, `[1, 1 + L, D]`.
    pub pos_embed: T,
    /// `blocks.{i}`.
    pub blocks: Vec<Block<T>>,
    /// `norm`.
    pub norm: Norm<T>,
    /// `encoder_mask_token`, `[1, 1, D]`: only with [`Config::encoder_mask_tokens`].
    pub mask_token: Option<T>,
}

/// The MAE decoder, used in pre-training only.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoder<T> {
    /// `decoder_embed`, `[Dd, D]`.
    pub embed: Linear<T>,
    /// `mask_token`, `[1, 1, Dd]`.
    pub mask_token: T,
    /// `decoder_pos_embed`, fixed sin-cos, `[1, 1 + L, Dd]`.
    pub pos_embed: T,
    /// `decoder_blocks.{i}`.
    pub blocks: Vec<Block<T>>,
    /// `decoder_norm`.
    pub norm: Norm<T>,
    /// `decoder_pred`, `[p * p * C, Dd]`.
    pub pred: Linear<T>,
}

/// Every tensor of the pre-training model.
#[derive(Clone, Debug, PartialEq)]
pub struct MaeParams<T> {
    /// The encoder.
    pub encoder: Encoder<T>,
    /// The decoder.
    pub decoder: Decoder<T>,
}

impl<T> Linear<T> {
    /// Applies `f` to each tensor.
    pub fn try_map<U, E>(&self, f: &mut impl FnMut(&T) -> Result<U, E>) -> Result<Linear<U>, E> {
        Ok(Linear {
            weight: f(&self.weight)?,
            bias: f(&self.bias)?,
        })
    }
}

impl<T> Norm<T> {
    /// Applies `f` to each tensor.
    pub fn try_map<U, E>(&self, f: &mut impl FnMut(&T) -> Result<U, E>) -> Result<Norm<U>, E> {
        Ok(Norm {
            weight: f(&self.weight)?,
            bias: f(&self.bias)?,
        })
    }
}

impl<T> Block<T> {
    /// The 12 tensors in state-dict order.
    pub fn tensors(&self) -> [&T; 12] {
        [
            &self.norm1.weight,
            &self.norm1.bias,
            &self.qkv.weight,
            &self.qkv.bias,
            &self.proj.weight,
            &self.proj.bias,
            &self.norm2.weight,
            &self.norm2.bias,
            &self.fc1.weight,
            &self.fc1.bias,
            &self.fc2.weight,
            &self.fc2.bias,
        ]
    }
    /// The 12 tensors in state-dict order, mutably.
    pub fn tensors_mut(&mut self) -> [&mut T; 12] {
        [
            &mut self.norm1.weight,
            &mut self.norm1.bias,
            &mut self.qkv.weight,
            &mut self.qkv.bias,
            &mut self.proj.weight,
            &mut self.proj.bias,
            &mut self.norm2.weight,
            &mut self.norm2.bias,
            &mut self.fc1.weight,
            &mut self.fc1.bias,
            &mut self.fc2.weight,
            &mut self.fc2.bias,
        ]
    }
    /// Applies `f` to each tensor.
    pub fn try_map<U, E>(&self, f: &mut impl FnMut(&T) -> Result<U, E>) -> Result<Block<U>, E> {
        Ok(Block {
            norm1: self.norm1.try_map(f)?,
            qkv: self.qkv.try_map(f)?,
            proj: self.proj.try_map(f)?,
            norm2: self.norm2.try_map(f)?,
            fc1: self.fc1.try_map(f)?,
            fc2: self.fc2.try_map(f)?,
        })
    }
}

fn map_blocks<T, U, E>(
    blocks: &[Block<T>],
    f: &mut impl FnMut(&T) -> Result<U, E>,
) -> Result<Vec<Block<U>>, E> {
    blocks.iter().map(|b| b.try_map(f)).collect()
}

impl<T> Encoder<T> {
    /// Every tensor in the canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = &T> + '_ {
        [
            &self.patch_embed.weight,
            &self.patch_embed.bias,
            &self.cls_token,
            &self.pos_embed,
        ]
        .into_iter()
        .chain(self.blocks.iter().flat_map(|b| b.tensors()))
        .chain([&self.norm.weight, &self.norm.bias])
        .chain(self.mask_token.as_ref())
    }
    /// Every tensor in the canonical order, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        [
            &mut self.patch_embed.weight,
            &mut self.patch_embed.bias,
            &mut self.cls_token,
            &mut self.pos_embed,
        ]
        .into_iter()
        .chain(self.blocks.iter_mut().flat_map(|b| b.tensors_mut()))
        .chain([&mut self.norm.weight, &mut self.norm.bias])
        .chain(self.mask_token.as_mut())
    }
    /// Applies `f` to each tensor, in the canonical order.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<Encoder<U>, E> {
        let f = &mut f;
        Ok(Encoder {
            patch_embed: self.patch_embed.try_map(f)?,
            cls_token: f(&self.cls_token)?,
            pos_embed: f(&self.pos_embed)?,
            blocks: map_blocks(&self.blocks, f)?,
            norm: self.norm.try_map(f)?,
            mask_token: self.mask_token.as_ref().map(&mut *f).transpose()?,
        })
    }
}

impl<T> Decoder<T> {
    /// Every tensor in the canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = &T> + '_ {
        [
            &self.embed.weight,
            &self.embed.bias,
            &self.mask_token,
            &self.pos_embed,
        ]
        .into_iter()
        .chain(self.blocks.iter().flat_map(|b| b.tensors()))
        .chain([
            &self.norm.weight,
            &self.norm.bias,
            &self.pred.weight,
            &self.pred.bias,
        ])
    }
    /// Every tensor in the canonical order, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        [
            &mut self.embed.weight,
            &mut self.embed.bias,
            &mut self.mask_token,
            &mut self.pos_embed,
        ]
        .into_iter()
        .chain(self.blocks.iter_mut().flat_map(|b| b.tensors_mut()))
        .chain([
            &mut self.norm.weight,
            &mut self.norm.bias,
            &mut self.pred.weight,
            &mut self.pred.bias,
        ])
    }
    /// Applies `f` to each tensor, in the canonical order.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<Decoder<U>, E> {
        let f = &mut f;
        Ok(Decoder {
            embed: self.embed.try_map(f)?,
            mask_token: f(&self.mask_token)?,
            pos_embed: f(&self.pos_embed)?,
            blocks: map_blocks(&self.blocks, f)?,
            norm: self.norm.try_map(f)?,
            pred: self.pred.try_map(f)?,
        })
    }
}

impl<T> MaeParams<T> {
    /// Every tensor, encoder first, in the canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = &T> + '_ {
        self.encoder.tensors().chain(self.decoder.tensors())
    }
    /// Every tensor, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.encoder.tensors_mut().chain(self.decoder.tensors_mut())
    }
    /// Applies `f` to each tensor, in the canonical order.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<MaeParams<U>, E> {
        Ok(MaeParams {
            encoder: self.encoder.try_map(&mut f)?,
            decoder: self.decoder.try_map(&mut f)?,
        })
    }
}

/// The classification head of fine-tuning (timm `VisionTransformer`, as `models_vit.py` uses it).
#[derive(Clone, Debug, PartialEq)]
pub struct Head<T> {
    /// `fc_norm`: the LayerNorm after mean pooling (absent with cls-token pooling, which uses
    /// the encoder's `norm` instead).
    pub fc_norm: Option<Norm<T>>,
    /// `head`, `[classes, D]`.
    pub linear: Linear<T>,
}

impl<T> Head<T> {
    /// Every tensor in the canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = &T> + '_ {
        let norm = self.fc_norm.iter().flat_map(|n| [&n.weight, &n.bias]);
        norm.chain([&self.linear.weight, &self.linear.bias])
    }
    /// Every tensor in the canonical order, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        let norm = self
            .fc_norm
            .iter_mut()
            .flat_map(|n| [&mut n.weight, &mut n.bias]);
        norm.chain([&mut self.linear.weight, &mut self.linear.bias])
    }
    /// Applies `f` to each tensor, in the canonical order.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<Head<U>, E> {
        let f = &mut f;
        Ok(Head {
            fc_norm: self.fc_norm.as_ref().map(|n| n.try_map(f)).transpose()?,
            linear: self.linear.try_map(f)?,
        })
    }
}

/// Every tensor of an image classifier: the ViT encoder and its head.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierParams<T> {
    /// The encoder (its `mask_token` is always absent).
    pub encoder: Encoder<T>,
    /// The head.
    pub head: Head<T>,
}

impl<T> ClassifierParams<T> {
    /// Every tensor, encoder first, in the canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = &T> + '_ {
        self.encoder.tensors().chain(self.head.tensors())
    }
    /// Every tensor, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.encoder.tensors_mut().chain(self.head.tensors_mut())
    }
    /// Applies `f` to each tensor, in the canonical order.
    pub fn try_map<U, E>(
        &self,
        mut f: impl FnMut(&T) -> Result<U, E>,
    ) -> Result<ClassifierParams<U>, E> {
        Ok(ClassifierParams {
            encoder: self.encoder.try_map(&mut f)?,
            head: self.head.try_map(&mut f)?,
        })
    }
}

fn block_specs(prefix: &str, dim: usize, hidden: usize) -> Block<TensorSpec> {
    let t = |name: &str, shape: Vec<usize>| TensorSpec::new(format!("{prefix}.{name}"), shape);
    Block {
        norm1: Norm {
            weight: t("norm1.weight", vec![dim]),
            bias: t("norm1.bias", vec![dim]),
        },
        qkv: Linear {
            weight: t("attn.qkv.weight", vec![3 * dim, dim]),
            bias: t("attn.qkv.bias", vec![3 * dim]),
        },
        proj: Linear {
            weight: t("attn.proj.weight", vec![dim, dim]),
            bias: t("attn.proj.bias", vec![dim]),
        },
        norm2: Norm {
            weight: t("norm2.weight", vec![dim]),
            bias: t("norm2.bias", vec![dim]),
        },
        fc1: Linear {
            weight: t("mlp.fc1.weight", vec![hidden, dim]),
            bias: t("mlp.fc1.bias", vec![hidden]),
        },
        fc2: Linear {
            weight: t("mlp.fc2.weight", vec![dim, hidden]),
            bias: t("mlp.fc2.bias", vec![dim]),
        },
    }
}

/// Names, shapes and roles of the encoder's tensors for `cfg`.
pub fn encoder_specs(cfg: &Config) -> Encoder<TensorSpec> {
    let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
    let t = |name: &str, shape: Vec<usize>| TensorSpec::new(name.into(), shape);
    Encoder {
        patch_embed: Linear {
            weight: t("patch_embed.proj.weight", vec![d, c, p, p]),
            bias: t("patch_embed.proj.bias", vec![d]),
        },
        cls_token: t("cls_token", vec![1, 1, d]),
        pos_embed: TensorSpec::fixed("pos_embed".into(), vec![1, 1 + cfg.num_patches(), d]),
        blocks: (0..cfg.depth)
            .map(|i| block_specs(&format!("blocks.{i}"), d, cfg.mlp_hidden(d)))
            .collect(),
        norm: Norm {
            weight: t("norm.weight", vec![d]),
            bias: t("norm.bias", vec![d]),
        },
        mask_token: cfg
            .encoder_mask_tokens
            .then(|| t("encoder_mask_token", vec![1, 1, d])),
    }
}

/// Names, shapes and roles of the decoder's tensors for `cfg`.
pub fn decoder_specs(cfg: &Config) -> Decoder<TensorSpec> {
    let (d, dd) = (cfg.embed_dim, cfg.decoder_embed_dim);
    let t = |name: &str, shape: Vec<usize>| TensorSpec::new(name.into(), shape);
    Decoder {
        embed: Linear {
            weight: t("decoder_embed.weight", vec![dd, d]),
            bias: t("decoder_embed.bias", vec![dd]),
        },
        mask_token: t("mask_token", vec![1, 1, dd]),
        pos_embed: TensorSpec::fixed(
            "decoder_pos_embed".into(),
            vec![1, 1 + cfg.num_patches(), dd],
        ),
        blocks: (0..cfg.decoder_depth)
            .map(|i| block_specs(&format!("decoder_blocks.{i}"), dd, cfg.mlp_hidden(dd)))
            .collect(),
        norm: Norm {
            weight: t("decoder_norm.weight", vec![dd]),
            bias: t("decoder_norm.bias", vec![dd]),
        },
        pred: Linear {
            weight: t("decoder_pred.weight", vec![cfg.patch_dim(), dd]),
            bias: t("decoder_pred.bias", vec![cfg.patch_dim()]),
        },
    }
}

/// Names, shapes and roles of a classifier's tensors as fine-tuning trains them (the official
/// `param_groups_lrd`): the position table is learned, and neither it nor `cls_token` decays.
/// With mean pooling (`fc_norm`, the paper's fine-tuning), the encoder's `norm` is unused and
/// marked [`Role::Fixed`].
pub fn classifier_specs(
    cfg: &Config,
    num_classes: usize,
    mean_pool: bool,
) -> ClassifierParams<TensorSpec> {
    let d = cfg.embed_dim;
    let t = |name: &str, shape: Vec<usize>| TensorSpec::new(name.into(), shape);
    let mut encoder = encoder_specs(&Config {
        encoder_mask_tokens: false,
        ..cfg.clone()
    });
    for spec in [&mut encoder.pos_embed, &mut encoder.cls_token] {
        spec.role = Role::NotDecayed;
    }
    if mean_pool {
        encoder.norm.weight.role = Role::Fixed;
        encoder.norm.bias.role = Role::Fixed;
    }
    ClassifierParams {
        encoder,
        head: Head {
            fc_norm: mean_pool.then(|| Norm {
                weight: t("fc_norm.weight", vec![d]),
                bias: t("fc_norm.bias", vec![d]),
            }),
            linear: Linear {
                weight: t("head.weight", vec![num_classes, d]),
                bias: t("head.bias", vec![num_classes]),
            },
        },
    }
}

/// Names, shapes and roles of every tensor of the pre-training model for `cfg`.
///
/// ```
/// let cfg = mae::Config::preset("mae_vit_base_patch16").unwrap();
/// let specs = mae::params::mae_specs(&cfg);
/// let trainable: usize = specs
///     .tensors()
///     .filter(|s| s.role != mae::params::Role::Fixed)
///     .map(|s| s.numel())
///     .sum();
/// assert_eq!(trainable, 111_655_680); // the paper's ViT-B MAE
/// ```
pub fn mae_specs(cfg: &Config) -> MaeParams<TensorSpec> {
    MaeParams {
        encoder: encoder_specs(cfg),
        decoder: decoder_specs(cfg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        for (name, enc, dec) in [
            ("mae_vit_large_patch16", 303_099_904usize, 26_139_392usize),
            ("mae_vit_huge_patch14", 630_435_840, 26_178_124),
        ] {
            let cfg = Config::preset(name).unwrap();
            fn count<'a>(it: impl Iterator<Item = &'a TensorSpec>) -> usize {
                it.filter(|s| s.role != Role::Fixed)
                    .map(|s| s.numel())
                    .sum()
            }
            let specs = mae_specs(&cfg);
            assert_eq!(count(specs.encoder.tensors()), enc, "{name} encoder");
            assert_eq!(count(specs.decoder.tensors()), dec, "{name} decoder");
        }
    }

    #[test]
    fn decay_groups_follow_timm() {
        let specs = mae_specs(&Config::preset("tiny32").unwrap());
        let role = |n: &str| specs.tensors().find(|s| s.name == n).unwrap().role;
        assert_eq!(role("cls_token"), Role::Decayed);
        assert_eq!(role("mask_token"), Role::Decayed);
        assert_eq!(role("patch_embed.proj.weight"), Role::Decayed);
        assert_eq!(role("patch_embed.proj.bias"), Role::NotDecayed);
        assert_eq!(role("blocks.0.norm1.weight"), Role::NotDecayed);
        assert_eq!(role("pos_embed"), Role::Fixed);
        assert_eq!(role("decoder_pos_embed"), Role::Fixed);
    }

    #[test]
    fn iteration_orders_agree() {
        let specs = mae_specs(&Config::preset("tiny32").unwrap());
        let mapped = specs.try_map(|s| Ok::<_, ()>(s.name.clone())).unwrap();
        let a: Vec<String> = mapped.tensors().cloned().collect();
        let b: Vec<String> = specs.tensors().map(|s| s.name.clone()).collect();
        assert_eq!(a, b);
        let mut mapped = mapped;
        assert_eq!(mapped.tensors_mut().count(), a.len());
    }
}
