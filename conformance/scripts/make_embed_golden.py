#!/usr/bin/env python3
"""Generate / check MAE encoder-only embedding golden files (format `mae-embed-golden-v1`, see
conformance/golden/README.md, section "Encoder-only embedding files").

Reuses the model of make_golden.py (official MaskedAutoencoderViT semantics, timm `Block`s,
float64). The encoder is run on ALL patches of whole, unmasked images, in spatial (row-major)
order:

    patch_embed -> + pos_embed[:, 1:] -> prepend (cls_token + pos_embed[:, :1]) -> blocks -> norm

and the file stores only the encoder tensors (the key set of the paper's released encoder-only
checkpoints, e.g. mae_pretrain_vit_base.pth): patch_embed.proj.weight/bias, cls_token, pos_embed,
blocks.{i}.*, norm.weight/bias. No decoder tensors, no noise.

Weights are initialised as the official code does, then every LayerNorm weight/bias and the cls
token get + 0.1 * randn (in float32, before widening to float64), so a test is sensitive to them
(fresh LayerNorms of 1/0 would hide e.g. swapped gamma/beta). pos_embed stays the fixed sin-cos table.

Before writing, the script verifies that
  * MAE forward_encoder with mask_ratio 0 and ascending noise (identity shuffle) equals the direct
    encoder above (max abs difference printed; mask all 0, ids_restore = identity), and
  * timm's VisionTransformer (class token, global_pool='', num_classes=0), loaded *strictly* with
    the encoder-only state dict, gives the same forward_features (max abs difference printed).

Usage:
  python make_embed_golden.py --out conformance/golden/embed             # all built-in cases
  python make_embed_golden.py --out DIR --case embed_mono                # one case
  python make_embed_golden.py --check conformance/golden/embed/embed_tiny.safetensors
"""
import argparse
import json
import os
import sys
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import timm
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import (CONFIG_KEYS, MAE, canonicalise_header, load_golden,  # noqa: E402
                         make_images, sincos_2d)

FORMAT = "mae-embed-golden-v1"
PERTURB = 0.1

# name: (config, batch, seed). Decoder fields are valid but unused: the files hold no decoder.
CASES = {
    "embed_tiny": (dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                        mlp_ratio=4.0, norm_pix_loss=False, in_chans=3, norm_eps=1e-6),
                   3, 505),
    "embed_mono": (dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                        mlp_ratio=4.0, norm_pix_loss=False, in_chans=1, norm_eps=1e-5),
                   2, 606),
}

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def is_encoder_param(name):
    return name.startswith(ENCODER_PREFIXES)


def encoder_params(model):
    return {n: p for n, p in model.named_parameters() if is_encoder_param(n)}


# ----------------------------------------------------------------------------- encoder paths
def encode_direct(model, imgs):
    """Encoder on every patch, row-major order; returns [N, 1+L, D]."""
    x = model.patch_embed(imgs)
    x = x + model.pos_embed[:, 1:, :]
    cls = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)


def encode_via_forward_encoder(model, imgs):
    """The MAE forward_encoder with mask_ratio 0 and ascending noise (identity shuffle)."""
    N, L = imgs.shape[0], model.patch_embed.num_patches
    noise = torch.arange(L, dtype=imgs.dtype).unsqueeze(0).expand(N, -1).contiguous()
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.0, noise)
    assert latent.shape[1] == 1 + L, latent.shape
    assert torch.all(mask == 0), "mask ratio 0 must keep every patch"
    assert torch.equal(ids_restore, torch.arange(L).unsqueeze(0).expand(N, -1)), "shuffle is not identity"
    return latent


def encode_timm(cfg, enc_state, imgs):
    """Second opinion: timm's VisionTransformer, loaded strictly with the encoder-only state dict
    (the same way models_vit.py loads the released encoder checkpoints)."""
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                            num_classes=0, global_pool="", embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                            num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=True,
                            class_token=True, norm_layer=partial(nn.LayerNorm, eps=cfg["norm_eps"]))
    vit = vit.double().eval()
    vit.load_state_dict({k: v.double() for k, v in enc_state.items()}, strict=True)
    return vit.forward_features(imgs)


def verify(model, cfg, imgs, enc_state, label):
    """Returns tokens (float64) after checking the three encoder paths agree."""
    with torch.no_grad():
        tokens = encode_direct(model, imgs)
        via_fe = encode_via_forward_encoder(model, imgs)
        via_timm = encode_timm(cfg, enc_state, imgs)
    d_fe = (tokens - via_fe).abs().max().item()
    d_timm = (tokens - via_timm).abs().max().item()
    print(f"{label}: max |direct - forward_encoder(mask 0, ascending noise)| = {d_fe:.3g}; "
          f"max |direct - timm VisionTransformer.forward_features| = {d_timm:.3g} "
          f"(max |tokens| = {tokens.abs().max().item():.3g})")
    assert d_fe <= 1e-12, d_fe
    assert d_timm <= 1e-12, d_timm
    return tokens


# ----------------------------------------------------------------------------- generate
def reference_string():
    return (f"conformance/scripts/make_embed_golden.py (official MAE models_mae.py encoder, all patches, "
            f"mask 0) + timm {timm.__version__}, torch {torch.__version__}, float64")


def build_model(cfg, seed):
    torch.manual_seed(seed)
    model = MAE(cfg)
    model.initialize_weights()  # float32 init, as the official code
    with torch.no_grad():       # perturb LayerNorms and cls token, still in float32
        for mname, m in model.named_modules():
            if isinstance(m, nn.LayerNorm) and is_encoder_param(mname + "."):
                m.weight.add_(PERTURB * torch.randn(m.weight.shape))
                m.bias.add_(PERTURB * torch.randn(m.bias.shape))
        model.cls_token.add_(PERTURB * torch.randn(model.cls_token.shape))
    return model.double()      # exact widening: stored F32 params are exactly what was used


def generate(case, out_dir):
    cfg, batch, seed = CASES[case]
    model = build_model(cfg, seed)
    rng = np.random.default_rng(seed)
    imgs = make_images(rng, batch, cfg["in_chans"], cfg["img_size"])
    imgs_t = torch.from_numpy(imgs).double()
    enc = encoder_params(model)
    tokens = verify(model, cfg, imgs_t, {n: p.detach() for n, p in enc.items()}, case)

    tensors = {f"param.{n}": p.detach().clone() for n, p in enc.items()}
    tensors["input.imgs"] = torch.from_numpy(imgs)
    tensors["expect.tokens"] = tokens
    tensors["expect.cls"] = tokens[:, 0, :]
    tensors["expect.mean"] = tokens[:, 1:, :].mean(dim=1)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}

    metadata = {
        "format": FORMAT,
        "config": json.dumps({k: cfg[k] for k in CONFIG_KEYS}),
        "case": case,
        "reference": reference_string(),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{case}.safetensors")
    save_file(tensors, path, metadata=metadata)
    canonicalise_header(path, list(metadata))
    L = model.patch_embed.num_patches
    print(f"{path}: L={L} tokens={tuple(tensors['expect.tokens'].shape)} "
          f"tensors={len(tensors)} bytes={os.path.getsize(path)}")
    return path


# ----------------------------------------------------------------------------- check
def check(path):
    """Rebuild the encoder from a file's config and params, recompute in float64 and compare."""
    md, t = load_golden(path)
    assert md["format"] == FORMAT, md.get("format")
    cfg = json.loads(md["config"])
    model = MAE(cfg).double()
    enc = encoder_params(model)
    file_params = sorted(k[len("param."):] for k in t if k.startswith("param."))
    assert file_params == sorted(enc), set(file_params) ^ set(enc)
    with torch.no_grad():
        for n, p in enc.items():
            p.copy_(t[f"param.{n}"].double())
    mine = torch.from_numpy(sincos_2d(cfg["embed_dim"], model.patch_embed.grid, True)).float()
    print(f"sincos pos_embed: max |ours(f32) - file| = {(mine - t['param.pos_embed'][0]).abs().max().item():.3g}")
    imgs = t["input.imgs"].double()
    tokens = verify(model, cfg, imgs, {n: t[f"param.{n}"] for n in enc}, os.path.basename(path))
    got = {"expect.tokens": tokens, "expect.cls": tokens[:, 0, :], "expect.mean": tokens[:, 1:, :].mean(dim=1)}
    assert sorted(got) == sorted(k for k in t if k.startswith("expect.")), sorted(t)
    for k, a in got.items():
        b = t[k]
        rel = ((a - b.double()).norm() / b.double().norm()).item()
        bits = int((a.to(torch.float32) != b).sum().item())
        print(f"  {k:14s} {tuple(b.shape)!s:14s} relL2(f64 vs file) {rel:.3e}  f32 values differ {bits}/{b.numel()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="conformance/golden/embed", help="output directory")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to generate (default: all)")
    ap.add_argument("--check", metavar="FILE", nargs="+", help="recompute existing embed golden file(s) and compare")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reduction order
    if args.check:
        for f in args.check:
            check(f)
        return
    for case in args.case or sorted(CASES):
        generate(case, args.out)


if __name__ == "__main__":
    sys.exit(main())
