//! The embedding path (encoder on whole, unmasked images) against PyTorch: the files in
//! `conformance/golden/embed` hold an encoder-only checkpoint (what the paper's released
//! `mae_pretrain_vit_*` files hold), images, and timm's tokens, cls and mean features.

use mae::backend::Backend;
use mae::embed::{Embedder, Pool};
use mae::weights::WeightsFile;
use mae::Config;
use mae_conformance::backends;
use mae_conformance::golden::rel_l2;
use std::path::Path;

/// golden/README.md: PyTorch float32 lands within 3.4e-7 of these files.
const TOL: f64 = 1e-5;

fn check_file<B: Backend>(b: &B, path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let f = WeightsFile::parse(&bytes).unwrap();
    assert_eq!(f.metadata("format"), Some("mae-embed-golden-v1"));
    let cfg: Config = f.config().unwrap();
    let encoder = f.encoder(&cfg, "param.").unwrap();
    let (shape, imgs) = f.tensor("input.imgs").unwrap();
    let mut embedder = Embedder::new(b, &cfg, &encoder, shape[0]).unwrap();
    let expect = |name: &str| f.tensor(name).unwrap().1;
    let tokens = embedder.tokens(b, &imgs).unwrap();
    let cls = embedder.pooled(b, &imgs, Pool::Cls).unwrap();
    let mean = embedder.pooled(b, &imgs, Pool::Mean).unwrap();
    for (name, got, want) in [
        ("tokens", &tokens, expect("expect.tokens")),
        ("cls", &cls, expect("expect.cls")),
        ("mean", &mean, expect("expect.mean")),
    ] {
        let e = rel_l2(got, &want);
        eprintln!("{} {name} on {}: {e:.2e}", path.display(), b.name());
        assert!(
            e <= TOL,
            "{} {name}: relative error {e:.3e} > {TOL:e}",
            path.display()
        );
    }
}

fn check_all<B: Backend>(b: &B) {
    let dir = mae_conformance::dir().join("golden/embed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "embedding golden files missing from {}",
        dir.display()
    );
    for f in files {
        check_file(b, &f);
    }
}

/// One test per backend, named after its getter in `mae_conformance::backends`.
macro_rules! embed_tests {
    ($($backend:ident),*) => {$(
        #[test]
        fn $backend() {
            if let Some(b) = backends::$backend() {
                check_all(b);
            }
        }
    )*};
}

embed_tests!(cpu, wgpu, cuda);
