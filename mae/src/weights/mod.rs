//! Weights in safetensors under the official state-dict names (`blocks.3.attn.qkv.weight`, ...),
//! so checkpoints of the official code, timm and this project are interchangeable.
//!
//! Everything here works on bytes: reading and writing files is the caller's business (the
//! examples write checkpoints atomically). The model configuration travels in the metadata key
//! `config` as the JSON of [`Config`].

use crate::config::Config;
use crate::params::{decoder_specs, encoder_specs, Encoder, MaeParams, TensorSpec};
use alloc::borrow::Cow;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use safetensors::{Dtype, SafeTensors, View};

pub mod hf;

/// Metadata key holding the model configuration as JSON.
pub const CONFIG_KEY: &str = "config";

/// Why a weights file cannot be used.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsError {
    /// The bytes are not a safetensors file (bad header, offsets out of range, truncated...).
    NotSafetensors(String),
    /// A tensor the model needs is absent.
    Missing {
        /// Its name.
        name: String,
        /// The shape the configuration implies.
        shape: Vec<usize>,
    },
    /// A tensor has another shape than the configuration implies.
    WrongShape {
        /// Its name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor is not stored as a float type.
    WrongDtype {
        /// Its name.
        name: String,
        /// The dtype in the file.
        got: String,
    },
    /// A float tensor holds NaN or infinity.
    NonFinite {
        /// Its name.
        name: String,
    },
    /// The metadata is missing or malformed (no `config`, bad JSON, invalid configuration).
    Metadata(String),
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsError::NotSafetensors(msg) => write!(f, "not a safetensors file: {msg}"),
            WeightsError::Missing { name, shape } => {
                write!(f, "weights: tensor {name} (shape {shape:?}) is missing")
            }
            WeightsError::WrongShape {
                name,
                expected,
                got,
            } => write!(
                f,
                "weights: tensor {name} has shape {got:?}, the configuration needs {expected:?}"
            ),
            WeightsError::WrongDtype { name, got } => write!(
                f,
                "weights: tensor {name} has dtype {got}, expected a float type (F32, F16, BF16 or F64)"
            ),
            WeightsError::NonFinite { name } => {
                write!(f, "weights: tensor {name} contains NaN or infinity")
            }
            WeightsError::Metadata(msg) => write!(f, "weights metadata: {msg}"),
        }
    }
}

impl core::error::Error for WeightsError {}

/// A parsed safetensors file over borrowed bytes.
pub struct WeightsFile<'a> {
    tensors: SafeTensors<'a>,
    metadata: Vec<(String, String)>,
}

impl<'a> WeightsFile<'a> {
    /// Parses and validates the header (offsets, sizes, dtypes); tensor data is not copied.
    pub fn parse(bytes: &'a [u8]) -> Result<WeightsFile<'a>, WeightsError> {
        let not_st = |e: safetensors::SafeTensorError| WeightsError::NotSafetensors(e.to_string());
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_st)?;
        let metadata = header
            .metadata()
            .iter()
            .flat_map(|m| m.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let tensors = SafeTensors::deserialize(bytes).map_err(not_st)?;
        Ok(WeightsFile { tensors, metadata })
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The configuration stored under [`CONFIG_KEY`], validated.
    pub fn config(&self) -> Result<Config, WeightsError> {
        let json = self.metadata(CONFIG_KEY).ok_or_else(|| {
            WeightsError::Metadata(format!("no `{CONFIG_KEY}` entry: pass the configuration"))
        })?;
        Config::from_json(json).map_err(|e| WeightsError::Metadata(e.to_string()))
    }

    /// `cfg` when given, else the stored configuration.
    pub fn config_or(&self, cfg: Option<&Config>) -> Result<Config, WeightsError> {
        match cfg {
            Some(c) => Ok(c.clone()),
            None => self.config(),
        }
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok()
    }

    /// Tensor names in the file.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.names()
    }

    /// A float tensor converted to f32, with its shape.
    pub fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), WeightsError> {
        let view = self
            .tensors
            .tensor(name)
            .map_err(|_| WeightsError::Missing {
                name: name.into(),
                shape: Vec::new(),
            })?;
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            other => {
                return Err(WeightsError::WrongDtype {
                    name: name.into(),
                    got: format!("{other:?}"),
                })
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    /// A tensor that must have `spec`'s shape (ignoring leading or trailing dimensions of size
    /// 1 is not done: shapes must match exactly) and finite values.
    pub fn tensor_as(&self, prefix: &str, spec: &TensorSpec) -> Result<Vec<f32>, WeightsError> {
        let name = format!("{prefix}{}", spec.name);
        if !self.contains(&name) {
            return Err(WeightsError::Missing {
                name,
                shape: spec.shape.clone(),
            });
        }
        let (shape, values) = self.tensor(&name)?;
        if shape != spec.shape {
            return Err(WeightsError::WrongShape {
                name,
                expected: spec.shape.clone(),
                got: shape,
            });
        }
        if values.iter().any(|x| !x.is_finite()) {
            return Err(WeightsError::NonFinite { name });
        }
        Ok(values)
    }

    /// The encoder's tensors (`<prefix><official name>`); extra tensors (a decoder) are ignored.
    pub fn encoder(&self, cfg: &Config, prefix: &str) -> Result<Encoder<Vec<f32>>, WeightsError> {
        encoder_specs(cfg).try_map(|spec| self.tensor_as(prefix, spec))
    }

    /// Every tensor of the pre-training model.
    pub fn mae(&self, cfg: &Config, prefix: &str) -> Result<MaeParams<Vec<f32>>, WeightsError> {
        Ok(MaeParams {
            encoder: self.encoder(cfg, prefix)?,
            decoder: decoder_specs(cfg).try_map(|spec| self.tensor_as(prefix, spec))?,
        })
    }
}

/// Loads a full pre-training checkpoint; the configuration comes from the file's metadata unless
/// given (then the file's shapes must fit it).
///
/// ```
/// let cfg = mae::Config { depth: 1, decoder_depth: 1, ..mae::Config::preset("tiny32").unwrap() };
/// let params = mae::init::init_params(&cfg, 0);
/// let bytes = mae::weights::save_mae(&cfg, &params, &[]).unwrap();
/// let (cfg2, params2) = mae::weights::load_mae(&bytes, None).unwrap();
/// assert_eq!((cfg2, params2), (cfg, params));
/// assert!(mae::weights::load_mae(b"not a file", None).is_err());
/// ```
pub fn load_mae(
    bytes: &[u8],
    cfg: Option<&Config>,
) -> Result<(Config, MaeParams<Vec<f32>>), WeightsError> {
    let file = WeightsFile::parse(bytes)?;
    let cfg = file.config_or(cfg)?;
    let params = file.mae(&cfg, "")?;
    Ok((cfg, params))
}

/// Loads the encoder from a full or an encoder-only checkpoint (what the paper's released
/// `mae_pretrain_vit_*` files hold, once converted to safetensors).
pub fn load_encoder(
    bytes: &[u8],
    cfg: Option<&Config>,
) -> Result<(Config, Encoder<Vec<f32>>), WeightsError> {
    let file = WeightsFile::parse(bytes)?;
    let cfg = file.config_or(cfg)?;
    let params = file.encoder(&cfg, "")?;
    Ok((cfg, params))
}

/// Checks that host tensors have the element counts of their specs (tensors built in memory
/// rather than loaded, which [`WeightsFile`] checks itself).
pub fn check_lengths<'a>(
    specs: impl Iterator<Item = &'a TensorSpec>,
    tensors: impl Iterator<Item = &'a Vec<f32>>,
) -> Result<(), WeightsError> {
    for (s, t) in specs.zip(tensors) {
        if s.numel() != t.len() {
            return Err(WeightsError::WrongShape {
                name: s.name.clone(),
                expected: s.shape.clone(),
                got: alloc::vec![t.len()],
            });
        }
    }
    Ok(())
}

/// One f32 tensor to write.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Serializes named tensors (`(name, shape, values)`) with metadata; the configuration is added
/// under [`CONFIG_KEY`]. Shapes must match value counts.
pub fn save_tensors<'a>(
    cfg: &Config,
    tensors: impl IntoIterator<Item = (String, &'a [usize], &'a [f32])>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>, WeightsError> {
    let mut views = Vec::new();
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(WeightsError::WrongShape {
                name,
                expected: shape.to_vec(),
                got: alloc::vec![data.len()],
            });
        }
        views.push((name, F32View { shape, data }));
    }
    let info = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(CONFIG_KEY.to_string(), cfg.to_json())])
        .collect();
    safetensors::serialize(views, Some(info))
        .map_err(|e| WeightsError::NotSafetensors(e.to_string()))
}

/// Serializes a full pre-training model under the official names.
pub fn save_mae(
    cfg: &Config,
    params: &MaeParams<Vec<f32>>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>, WeightsError> {
    let specs = crate::params::mae_specs(cfg);
    save_tensors(
        cfg,
        specs
            .tensors()
            .zip(params.tensors())
            .map(|(s, t)| (s.name.clone(), s.shape.as_slice(), t.as_slice())),
        metadata,
    )
}

/// Serializes an encoder alone (an embedding checkpoint).
pub fn save_encoder(
    cfg: &Config,
    params: &Encoder<Vec<f32>>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>, WeightsError> {
    let specs = encoder_specs(cfg);
    save_tensors(
        cfg,
        specs
            .tensors()
            .zip(params.tensors())
            .map(|(s, t)| (s.name.clone(), s.shape.as_slice(), t.as_slice())),
        metadata,
    )
}

/// IEEE half to single precision, exact.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = frac * 2^-24.
            let v = frac as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::init_params;
    use alloc::vec;

    fn small() -> Config {
        Config {
            depth: 1,
            decoder_depth: 1,
            ..Config::preset("tiny32").unwrap()
        }
    }

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn encoder_only_file_loads_for_embedding_but_not_for_pretraining() {
        let cfg = small();
        let params = init_params(&cfg, 1);
        let bytes = save_encoder(&cfg, &params.encoder, &[]).unwrap();
        let (_, enc) = load_encoder(&bytes, None).unwrap();
        assert_eq!(enc, params.encoder);
        match load_mae(&bytes, None) {
            Err(WeightsError::Missing { name, .. }) => assert_eq!(name, "decoder_embed.weight"),
            other => panic!("expected a missing decoder tensor, got {other:?}"),
        }
    }

    #[test]
    fn bad_files_name_the_tensor() {
        let cfg = small();
        let params = init_params(&cfg, 1);
        let bytes = save_mae(&cfg, &params, &[]).unwrap();
        // Truncated.
        assert!(matches!(
            load_mae(&bytes[..bytes.len() - 3], None),
            Err(WeightsError::NotSafetensors(_))
        ));
        // Another configuration's shapes.
        let wider = Config {
            embed_dim: 96,
            ..cfg.clone()
        };
        match load_mae(&bytes, Some(&wider)) {
            Err(WeightsError::WrongShape {
                name,
                expected,
                got,
            }) => {
                assert_eq!(name, "patch_embed.proj.weight");
                assert_eq!((expected, got), (vec![96, 3, 4, 4], vec![192, 3, 4, 4]));
            }
            other => panic!("{other:?}"),
        }
        // An integer tensor where a float is expected.
        let ints = [1i64, 2, 3];
        let raw: Vec<u8> = ints.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::I64, vec![3], &raw).unwrap();
        let file = safetensors::serialize([("norm.bias", view)], None).unwrap();
        let parsed = WeightsFile::parse(&file).unwrap();
        let spec = TensorSpec {
            name: "norm.bias".into(),
            shape: vec![3],
            role: crate::params::Role::NotDecayed,
        };
        assert!(matches!(
            parsed.tensor_as("", &spec),
            Err(WeightsError::WrongDtype { .. })
        ));
        // No configuration in the metadata.
        assert!(matches!(parsed.config(), Err(WeightsError::Metadata(_))));
    }
}
