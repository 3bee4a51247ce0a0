//! Bad input gets a clear, typed error and changes nothing: configurations, weights files and
//! input shapes.

use mae::config::ConfigError;
use mae::embed::Embedder;
use mae::init::init_params;
use mae::train::{TrainOptions, Trainer};
use mae::weights::{load_encoder, load_mae, save_encoder, save_mae, WeightsError};
use mae::{Config, Error};
use mae_backend_cpu::CpuBackend;

fn small() -> Config {
    Config {
        img_size: 8,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 16,
        depth: 1,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 2.0,
        norm_pix_loss: false,
        norm_eps: 1e-6,
        encoder_mask_tokens: false,
    }
}

fn config_error(e: Error) -> ConfigError {
    match e {
        Error::Config(c) => c,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn bad_configurations_are_refused_before_anything_runs() {
    let b = CpuBackend::new();
    let ok = small();
    let params = init_params(&ok, 0);
    let bad = Config {
        num_heads: 3,
        ..ok.clone()
    };
    let e = config_error(
        Trainer::new(&b, &bad, &params, TrainOptions::new(1), 0)
            .err()
            .unwrap(),
    );
    assert_eq!(
        e,
        ConfigError::HeadsDoNotDivide {
            field: "embed_dim",
            dim: 16,
            heads: 3
        }
    );
    assert!(
        e.to_string()
            .contains("not divisible by its 3 attention heads"),
        "{e}"
    );

    let opts = |f: fn(&mut TrainOptions)| {
        let mut o = TrainOptions::new(2);
        f(&mut o);
        o
    };
    let cases: [(TrainOptions, ConfigError); 5] = [
        (opts(|o| o.mask_ratio = 1.0), ConfigError::MaskRatio(1.0)),
        (
            opts(|o| o.mask_ratio = 0.0),
            ConfigError::MaskRemovesNothing {
                mask_ratio: 0.0,
                num_patches: 4,
            },
        ),
        (opts(|o| o.batch_size = 0), ConfigError::EmptyBatch),
        (opts(|o| o.accum_steps = 0), ConfigError::EmptyBatch),
        (
            opts(|o| o.adamw.beta2 = 1.0),
            ConfigError::Hyper {
                name: "beta2",
                value: 1.0,
            },
        ),
    ];
    for (o, want) in cases {
        let got = config_error(Trainer::new(&b, &ok, &params, o, 0).err().unwrap());
        assert_eq!(got, want);
    }
    assert!(matches!(
        Config::preset("vit_tiny"),
        Err(ConfigError::UnknownPreset(_))
    ));
    let unknown_field = ok.to_json().replace("\"depth\"", "\"depht\"");
    assert!(matches!(
        Config::from_json(&unknown_field),
        Err(ConfigError::Json(_))
    ));
    let mut t = Trainer::new(&b, &ok, &params, TrainOptions::new(1), 0).unwrap();
    let e = config_error(t.update(&b, -1.0).err().unwrap());
    assert_eq!(
        e,
        ConfigError::Hyper {
            name: "lr",
            value: -1.0
        }
    );
}

fn weights_error<T: std::fmt::Debug>(r: Result<T, WeightsError>) -> WeightsError {
    r.expect_err("expected a weights error")
}

#[test]
fn bad_weight_files_name_what_is_wrong() {
    let cfg = small();
    let params = init_params(&cfg, 0);
    let good = save_mae(&cfg, &params, &[]).unwrap();

    for bytes in [
        &b""[..],
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
        &good[..good.len() / 2],
    ] {
        let e = weights_error(load_mae(bytes, None));
        assert!(matches!(e, WeightsError::NotSafetensors(_)), "{e:?}");
    }
    // An encoder-only checkpoint cannot pre-train: the first decoder tensor is named.
    let enc_only = save_encoder(&cfg, &params.encoder, &[]).unwrap();
    let e = weights_error(load_mae(&enc_only, None));
    assert_eq!(
        e.to_string(),
        "weights: tensor decoder_embed.weight (shape [8, 16]) is missing"
    );
    // ... but embeds.
    assert!(load_encoder(&enc_only, None).is_ok());
    // Another configuration's file.
    let other = Config {
        decoder_embed_dim: 12,
        decoder_num_heads: 3,
        ..cfg.clone()
    };
    let e = weights_error(load_mae(&good, Some(&other)));
    assert_eq!(
        e,
        WeightsError::WrongShape {
            name: "decoder_embed.weight".into(),
            expected: vec![12, 16],
            got: vec![8, 16],
        }
    );
    // Integers where floats belong.
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    let raw = vec![0u8; 8 * 16];
    tensors.push((
        "norm.bias".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![16], &raw).unwrap(),
    ));
    let ints = safetensors::serialize(tensors, None).unwrap();
    let f = mae::weights::WeightsFile::parse(&ints).unwrap();
    let spec = mae::params::encoder_specs(&cfg).norm.bias;
    let e = weights_error(f.tensor_as("", &spec));
    assert!(e.to_string().contains("norm.bias has dtype I64"), "{e}");
    // No configuration stored and none given.
    let e = weights_error(load_mae(&ints, None));
    assert!(matches!(e, WeightsError::Metadata(_)), "{e:?}");
    // NaN weights are refused, naming the tensor.
    let mut nan = params.clone();
    nan.encoder.blocks[0].qkv.weight[3] = f32::NAN;
    let e = weights_error(load_mae(&save_mae(&cfg, &nan, &[]).unwrap(), None));
    assert_eq!(
        e,
        WeightsError::NonFinite {
            name: "blocks.0.attn.qkv.weight".into()
        }
    );
}

#[test]
fn wrong_inputs_are_shape_errors_and_change_nothing() {
    let b = CpuBackend::new();
    let cfg = small();
    let params = init_params(&cfg, 0);
    let mut t = Trainer::new(&b, &cfg, &params, TrainOptions::new(2), 0).unwrap();
    let img_len = 2 * 3 * 8 * 8;
    match t.forward_backward(&b, &vec![0.0; img_len - 1], None) {
        Err(Error::Shape {
            what: "images",
            expected,
            ..
        }) => assert_eq!(expected, vec![2, 3, 8, 8]),
        other => panic!("{other:?}"),
    }
    let imgs = vec![0.5; img_len];
    assert!(matches!(
        t.forward_backward(&b, &imgs, Some(&[0.5; 7])),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        t.forward_backward(&b, &imgs, Some(&[f32::NAN; 8])),
        Err(Error::Input(_))
    ));
    assert!(matches!(t.backward(&b), Err(Error::Input(_))));
    // A NaN loss stops the step before any gradient or weight changes.
    let mut poisoned = imgs.clone();
    poisoned[5] = f32::NAN;
    match t.train_step(&b, &poisoned, None, 1e-3) {
        Err(Error::NonFiniteLoss { step: 0, loss }) => assert!(loss.is_nan()),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.pending(), 0);
    assert_eq!(t.download(&b, t.params()).unwrap(), params);
    assert!(t
        .download(&b, t.grads())
        .unwrap()
        .tensors()
        .all(|g| g.iter().all(|&x| x == 0.0)));
    // Host weights of the wrong size.
    let mut short = params.clone();
    short.decoder.pred.bias.pop();
    match Trainer::new(&b, &cfg, &short, TrainOptions::new(2), 0)
        .err()
        .unwrap()
    {
        Error::Weights(WeightsError::WrongShape { name, .. }) => {
            assert_eq!(name, "decoder_pred.bias")
        }
        other => panic!("{other:?}"),
    }
    // The embedding path checks its input too.
    let mut e = Embedder::new(&b, &cfg, &params.encoder, 1).unwrap();
    assert!(matches!(e.tokens(&b, &imgs), Err(Error::Shape { .. })));
    assert!(matches!(
        e.tokens(&b, &imgs[..100]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(e.tokens(&b, &[]), Err(Error::Shape { .. })));
}
