//! HuggingFace `ViTMAE` checkpoints: the same tensors under other names, with the fused qkv
//! projection stored as separate query, key and value matrices.
//!
//! `ViTMAEForPreTraining` saves encoder tensors under `vit.` and decoder tensors under
//! `decoder.`; a bare `ViTMAEModel` saves the encoder without the `vit.` prefix. Both load.
//! Note that HuggingFace configurations use LayerNorm eps 1e-12 where the official models use
//! 1e-6; pass the configuration you want (the presets use the official value).

use super::{WeightsError, WeightsFile};
use crate::config::Config;
use crate::params::{decoder_specs, encoder_specs, Encoder, MaeParams, TensorSpec};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Where an official tensor lives in a HuggingFace file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HfSource {
    /// One tensor, same shape.
    Direct(String),
    /// Rows of the fused qkv projection: query, key, value concatenated along dimension 0.
    Concat([String; 3]),
}

/// The HuggingFace name(s) of official tensor `name`; `encoder_prefix` is `"vit."` for a
/// pre-training checkpoint and `""` for a bare `ViTMAEModel`. `None` for names outside the MAE.
pub fn hf_source(name: &str, encoder_prefix: &str) -> Option<HfSource> {
    let direct = |s: String| Some(HfSource::Direct(s));
    let e = encoder_prefix;
    let fixed = match name {
        "cls_token" => format!("{e}embeddings.cls_token"),
        "pos_embed" => format!("{e}embeddings.position_embeddings"),
        "patch_embed.proj.weight" => format!("{e}embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias" => format!("{e}embeddings.patch_embeddings.projection.bias"),
        "norm.weight" => format!("{e}layernorm.weight"),
        "norm.bias" => format!("{e}layernorm.bias"),
        "mask_token" | "decoder_pos_embed" => format!("decoder.{name}"),
        _ => String::new(),
    };
    if !fixed.is_empty() {
        return direct(fixed);
    }
    for top in ["decoder_embed.", "decoder_norm.", "decoder_pred."] {
        if name.starts_with(top) {
            return direct(format!("decoder.{name}"));
        }
    }
    let (layer_prefix, rest) = if let Some(rest) = name.strip_prefix("blocks.") {
        (format!("{e}encoder.layer."), rest)
    } else if let Some(rest) = name.strip_prefix("decoder_blocks.") {
        (String::from("decoder.decoder_layers."), rest)
    } else {
        return None;
    };
    let (index, part) = rest.split_once('.')?;
    let layer = format!("{layer_prefix}{index}.");
    let sub = match part {
        "attn.qkv.weight" | "attn.qkv.bias" => {
            let kind = if part.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            let one = |which: &str| format!("{layer}attention.attention.{which}.{kind}");
            return Some(HfSource::Concat([one("query"), one("key"), one("value")]));
        }
        "norm1.weight" => "layernorm_before.weight",
        "norm1.bias" => "layernorm_before.bias",
        "attn.proj.weight" => "attention.output.dense.weight",
        "attn.proj.bias" => "attention.output.dense.bias",
        "norm2.weight" => "layernorm_after.weight",
        "norm2.bias" => "layernorm_after.bias",
        "mlp.fc1.weight" => "intermediate.dense.weight",
        "mlp.fc1.bias" => "intermediate.dense.bias",
        "mlp.fc2.weight" => "output.dense.weight",
        "mlp.fc2.bias" => "output.dense.bias",
        _ => return None,
    };
    direct(format!("{layer}{sub}"))
}

fn load(file: &WeightsFile<'_>, spec: &TensorSpec, prefix: &str) -> Result<Vec<f32>, WeightsError> {
    match hf_source(&spec.name, prefix) {
        Some(HfSource::Direct(name)) => file.tensor_as(
            "",
            &TensorSpec {
                name,
                ..spec.clone()
            },
        ),
        Some(HfSource::Concat(names)) => {
            // Each of q, k, v holds a third of the fused rows.
            let mut shape = spec.shape.clone();
            shape[0] /= 3;
            let mut out = Vec::with_capacity(spec.numel());
            for name in names {
                let part = TensorSpec {
                    name,
                    shape: shape.clone(),
                    role: spec.role,
                };
                out.extend(file.tensor_as("", &part)?);
            }
            Ok(out)
        }
        None => Err(WeightsError::Missing {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
        }),
    }
}

/// The encoder prefix this file uses: `vit.` or none.
fn encoder_prefix(file: &WeightsFile<'_>) -> &'static str {
    if file.contains("vit.embeddings.cls_token") {
        "vit."
    } else {
        ""
    }
}

/// The encoder of a HuggingFace `ViTMAEForPreTraining` or `ViTMAEModel` checkpoint.
pub fn load_hf_encoder(bytes: &[u8], cfg: &Config) -> Result<Encoder<Vec<f32>>, WeightsError> {
    let file = WeightsFile::parse(bytes)?;
    let prefix = encoder_prefix(&file);
    encoder_specs(cfg).try_map(|spec| load(&file, spec, prefix))
}

/// Every tensor of a HuggingFace `ViTMAEForPreTraining` checkpoint.
pub fn load_hf_mae(bytes: &[u8], cfg: &Config) -> Result<MaeParams<Vec<f32>>, WeightsError> {
    let file = WeightsFile::parse(bytes)?;
    let prefix = encoder_prefix(&file);
    Ok(MaeParams {
        encoder: encoder_specs(cfg).try_map(|spec| load(&file, spec, prefix))?,
        decoder: decoder_specs(cfg).try_map(|spec| load(&file, spec, prefix))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::init_params;
    use crate::weights::save_tensors;
    use alloc::vec;

    /// The names of the reference's table (mae-reference.md, section 9.3), written out.
    #[test]
    fn names_follow_the_conversion_table() {
        let d = |s: &str| Some(HfSource::Direct(s.into()));
        assert_eq!(
            hf_source("cls_token", "vit."),
            d("vit.embeddings.cls_token")
        );
        assert_eq!(
            hf_source("blocks.11.mlp.fc2.bias", "vit."),
            d("vit.encoder.layer.11.output.dense.bias")
        );
        assert_eq!(
            hf_source("decoder_blocks.0.norm1.weight", "vit."),
            d("decoder.decoder_layers.0.layernorm_before.weight")
        );
        assert_eq!(
            hf_source("decoder_pred.bias", "vit."),
            d("decoder.decoder_pred.bias")
        );
        assert_eq!(hf_source("norm.weight", ""), d("layernorm.weight"));
        assert_eq!(
            hf_source("blocks.2.attn.qkv.bias", ""),
            Some(HfSource::Concat([
                "encoder.layer.2.attention.attention.query.bias".into(),
                "encoder.layer.2.attention.attention.key.bias".into(),
                "encoder.layer.2.attention.attention.value.bias".into(),
            ]))
        );
        assert_eq!(hf_source("head.weight", "vit."), None);
    }

    #[test]
    fn a_split_checkpoint_loads_back_fused() {
        let cfg = Config {
            depth: 2,
            decoder_depth: 1,
            ..Config::preset("tiny32").unwrap()
        };
        let params = init_params(&cfg, 3);
        let specs = crate::params::mae_specs(&cfg);
        // Write the model under HuggingFace names, splitting every qkv into three tensors.
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (spec, t) in specs.tensors().zip(params.tensors()) {
            match hf_source(&spec.name, "vit.").unwrap() {
                HfSource::Direct(n) => named.push((n, spec.shape.clone(), t.clone())),
                HfSource::Concat(names) => {
                    let third = t.len() / 3;
                    let mut shape = spec.shape.clone();
                    shape[0] /= 3;
                    for (i, n) in names.into_iter().enumerate() {
                        named.push((n, shape.clone(), t[i * third..(i + 1) * third].to_vec()));
                    }
                }
            }
        }
        let bytes = save_tensors(
            &cfg,
            named
                .iter()
                .map(|(n, s, t)| (n.clone(), s.as_slice(), t.as_slice())),
            &[],
        )
        .unwrap();
        assert_eq!(load_hf_mae(&bytes, &cfg).unwrap(), params);
        assert_eq!(load_hf_encoder(&bytes, &cfg).unwrap(), params.encoder);
        // A missing third of a qkv is named.
        let pruned: Vec<_> = named
            .iter()
            .filter(|(n, _, _)| n != "vit.encoder.layer.1.attention.attention.key.weight")
            .map(|(n, s, t)| (n.clone(), s.as_slice(), t.as_slice()))
            .collect();
        let bytes = save_tensors(&cfg, pruned, &[]).unwrap();
        assert_eq!(
            load_hf_encoder(&bytes, &cfg),
            Err(WeightsError::Missing {
                name: "vit.encoder.layer.1.attention.attention.key.weight".into(),
                shape: vec![192, 192],
            })
        );
    }
}
