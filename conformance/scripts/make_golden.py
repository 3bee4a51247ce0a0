#!/usr/bin/env python3
"""Generate / check MAE golden files (format `mae-golden-v1`, see conformance/golden/README.md).

The model below follows the semantics of the official MaskedAutoencoderViT
(facebookresearch/mae, models_mae.py) with timm `Block`s; it is written from the
specification in shared/reference/mae-reference.md, generalised to any number of
input channels, any square image / patch size and any depth / head count.
Everything is computed in float64; tensors are stored as F32 (losses F64,
ids_restore I64).

Usage:
  python make_golden.py --out conformance/golden            # all built-in cases
  python make_golden.py --out DIR --case normpix_p8         # one case
  python make_golden.py --check shared/golden/tiny.safetensors
  python make_golden.py --hf-check conformance/golden/*.safetensors   # needs transformers
"""
import argparse
import json
import os
import struct
import sys
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import timm
from timm.models.vision_transformer import Block
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "mae-golden-v1"
CONFIG_KEYS = ["img_size", "patch_size", "embed_dim", "depth", "num_heads",
               "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
               "mlp_ratio", "norm_pix_loss", "in_chans", "norm_eps"]

# name: (config, mask_ratio, batch, seed)
CASES = {
    "normpix_p8": (dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                        mlp_ratio=4.0, norm_pix_loss=True, in_chans=3, norm_eps=1e-6),
                   0.75, 3, 101),
    "mono_r90": (dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2,
                      decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3,
                      mlp_ratio=4.0, norm_pix_loss=True, in_chans=1, norm_eps=1e-6),
                 0.9, 2, 202),
    "odd_r50": (dict(img_size=24, patch_size=4, embed_dim=40, depth=1, num_heads=5,
                     decoder_embed_dim=36, decoder_depth=3, decoder_num_heads=6,
                     mlp_ratio=2.0, norm_pix_loss=False, in_chans=3, norm_eps=1e-5),
                0.5, 4, 303),
    "rgba_r60": (dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=6,
                      decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2,
                      mlp_ratio=4.0, norm_pix_loss=True, in_chans=4, norm_eps=1e-6),
                 0.6, 2, 404),
}
OPTIM = {"lr": 0.001, "weight_decay": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-08, "name": "AdamW"}


# ----------------------------------------------------------------------------- sin-cos tables
def sincos_1d(dim, pos):
    """dim/2 sines then dim/2 cosines of pos * 10000^(-k/(dim/2)), float64."""
    assert dim % 2 == 0
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid_size, cls_token):
    """[cls zeros row +] grid_size^2 rows; first dim/2 channels encode the column index,
    the last dim/2 the row index; rows in row-major token order."""
    assert dim % 4 == 0
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


# ----------------------------------------------------------------------------- model
class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D], tokens row-major


class MAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        D, Dd = cfg["embed_dim"], cfg["decoder_embed_dim"]
        p, C = cfg["patch_size"], cfg["in_chans"]
        assert cfg["img_size"] % p == 0
        assert D % 4 == 0 and Dd % 4 == 0 and D % cfg["num_heads"] == 0 and Dd % cfg["decoder_num_heads"] == 0
        norm_layer = partial(nn.LayerNorm, eps=cfg["norm_eps"])
        # registration order = official module order
        self.patch_embed = PatchEmbed(cfg["img_size"], p, C, D)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(D, cfg["num_heads"], cfg["mlp_ratio"], qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg["depth"])])
        self.norm = norm_layer(D)
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, cfg["decoder_num_heads"], cfg["mlp_ratio"], qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg["decoder_depth"])])
        self.decoder_norm = norm_layer(Dd)
        self.decoder_pred = nn.Linear(Dd, p * p * C, bias=True)
        self.norm_pix_loss = cfg["norm_pix_loss"]

    def initialize_weights(self):
        g = self.patch_embed.grid
        # fixed tables: computed in float64, stored (like the official code) as float32 values
        self.pos_embed.data.copy_(torch.from_numpy(
            sincos_2d(self.pos_embed.shape[-1], g, True)).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(torch.from_numpy(
            sincos_2d(self.decoder_pos_embed.shape[-1], g, True)).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # conv bias keeps PyTorch's default init
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # fused qkv as one [3D, D] matrix
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0)

    # [N,C,H,W] -> [N, L, p*p*C], HWC order inside a patch (channel fastest)
    def patchify(self, imgs):
        p = self.cfg["patch_size"]
        N, C, H, W = imgs.shape
        assert H == W and H % p == 0
        h = w = H // p
        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * w, p * p * C)

    @staticmethod
    def random_masking(x, mask_ratio, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: smallest noise kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones([N, L], dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order; 1 = removed
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        N, T, Dd = x.shape
        L = ids_restore.shape[1]
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(N, L + 1 - T, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        x = torch.cat([x[:, :1, :], tokens], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio, noise):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, latent, pred, mask, ids_restore


def param_groups(model, weight_decay):
    decay, no_decay, decay_names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
            decay_names.append(name)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}], sorted(decay_names)


# ----------------------------------------------------------------------------- inputs
def make_images(rng, n, c, size):
    """Smooth structured images: random plane waves + gaussian blobs + a little noise,
    standardised per image to roughly zero mean / unit variance."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    imgs = np.zeros([n, c, size, size])
    for i in range(n):
        for ch in range(c):
            img = np.zeros([size, size])
            for _ in range(3):
                fy, fx = rng.uniform(-3, 3, size=2) * 2 * np.pi / size
                img += rng.uniform(0.3, 1.0) * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
            for _ in range(2):
                cy, cx = rng.uniform(0, size, size=2)
                s = rng.uniform(size / 10, size / 4)
                img += rng.uniform(-1.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            img += 0.1 * rng.standard_normal([size, size])
            imgs[i, ch] = img
        imgs[i] = (imgs[i] - imgs[i].mean()) / imgs[i].std()
    return imgs.astype(np.float32)


def make_noise(rng, n, L):
    while True:
        noise = rng.uniform(0, 1, size=[n, L]).astype(np.float32)
        if all(len(np.unique(r)) == L for r in noise):  # no ties: argsort order is unambiguous
            return noise


# ----------------------------------------------------------------------------- run
def run_two_steps(model, imgs, noises, mask_ratio, optim):
    """model: float64; imgs/noises: float64 tensors. Returns dict of expect.* float64/int64 tensors."""
    groups, _ = param_groups(model, optim["weight_decay"])
    opt = torch.optim.AdamW(groups, lr=optim["lr"], betas=(optim["beta1"], optim["beta2"]),
                            eps=optim["eps"], weight_decay=optim["weight_decay"])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for s, noise in enumerate(noises, start=1):
        opt.zero_grad(set_to_none=True)
        loss, latent, pred, mask, ids_restore = model(imgs, mask_ratio, noise)
        loss.backward()
        out[f"expect.{s}.loss"] = loss.detach().reshape(1).clone()
        out[f"expect.{s}.latent"] = latent.detach().clone()
        out[f"expect.{s}.pred"] = pred.detach().clone()
        out[f"expect.{s}.mask"] = mask.detach().clone()
        out[f"expect.{s}.ids_restore"] = ids_restore.detach().clone()
        for n, p in trainable:
            out[f"expect.{s}.grad.{n}"] = p.grad.detach().clone()
        opt.step()
        for n, p in trainable:
            out[f"expect.{s}.param.{n}"] = p.detach().clone()
    return out


def to_storage(name, t):
    if name.endswith(".loss"):
        return t.to(torch.float64).contiguous()
    if name.endswith(".ids_restore"):
        return t.to(torch.int64).contiguous()
    return t.to(torch.float32).contiguous()


def reference_string():
    return (f"conformance/scripts/make_golden.py (official MAE models_mae.py semantics) + "
            f"timm {timm.__version__}, torch {torch.__version__}, float64")


def generate(case, out_dir):
    cfg, mask_ratio, batch, seed = CASES[case]
    torch.manual_seed(seed)
    model = MAE(cfg)
    model.initialize_weights()  # float32 init, as the official code
    model = model.double()      # exact widening: the stored F32 params are exactly what was used
    rng = np.random.default_rng(seed)
    L = model.patch_embed.num_patches
    imgs = make_images(rng, batch, cfg["in_chans"], cfg["img_size"])
    noise1, noise2 = make_noise(rng, batch, L), make_noise(rng, batch, L)

    tensors = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors["input.imgs"] = torch.from_numpy(imgs)
    tensors["input.noise.1"] = torch.from_numpy(noise1)
    tensors["input.noise.2"] = torch.from_numpy(noise2)
    noises = [torch.from_numpy(noise1).double(), torch.from_numpy(noise2).double()]
    tensors.update(run_two_steps(model, torch.from_numpy(imgs).double(), noises, mask_ratio, OPTIM))
    tensors = {k: to_storage(k, v) for k, v in tensors.items()}

    _, wd_names = param_groups(model, OPTIM["weight_decay"])
    metadata = {
        "format": FORMAT,
        "config": json.dumps({k: cfg[k] for k in CONFIG_KEYS}),
        "mask_ratio": str(mask_ratio),
        "optimizer": json.dumps(OPTIM),
        "weight_decay_params": json.dumps(wd_names),
        "case": case,
        "reference": reference_string(),
    }
    path = os.path.join(out_dir, f"{case}.safetensors")
    save_file(tensors, path, metadata=metadata)
    canonicalise_header(path, list(metadata))
    l1, l2 = tensors["expect.1.loss"].item(), tensors["expect.2.loss"].item()
    keep = int(L * (1 - mask_ratio))
    print(f"{path}: L={L} keep={keep} loss1={l1:.12g} loss2={l2:.12g} "
          f"tensors={len(tensors)} bytes={os.path.getsize(path)}")
    return path


def canonicalise_header(path, meta_order):
    """safetensors writes `__metadata__` in hash order; rewrite it in a fixed order (same bytes
    otherwise) so that regenerating a file is byte-for-byte reproducible."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        md = hdr.pop("__metadata__")
        assert sorted(md) == sorted(meta_order)
        raw = json.dumps({"__metadata__": {k: md[k] for k in meta_order}, **hdr},
                         separators=(",", ":")).encode()
        assert len(raw) <= n, (len(raw), n)
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


# ----------------------------------------------------------------------------- check
def load_golden(path):
    with safe_open(path, framework="pt") as f:
        md = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return md, t


def check(path):
    md, t = load_golden(path)
    assert md["format"] == FORMAT, md.get("format")
    cfg = json.loads(md["config"])
    optim = json.loads(md["optimizer"])
    mask_ratio = float(md["mask_ratio"])
    model = MAE(cfg).double()
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(t[f"param.{n}"].double())
    extra = sorted(k for k in t if k.startswith("param.") and k[6:] not in names)
    assert not extra, extra
    # our own sin-cos tables vs the file's
    g = model.patch_embed.grid
    for n in ("pos_embed", "decoder_pos_embed"):
        mine = torch.from_numpy(sincos_2d(t[f"param.{n}"].shape[-1], g, True)).float()
        print(f"sincos {n}: max |ours(f32) - file| = {(mine - t['param.' + n][0]).abs().max().item():.3g}")
    _, wd_names = param_groups(model, optim["weight_decay"])
    print("weight_decay_params match:", wd_names == json.loads(md["weight_decay_params"]))

    noises = [t["input.noise.1"].double(), t["input.noise.2"].double()]
    got = run_two_steps(model, t["input.imgs"].double(), noises, mask_ratio, optim)
    expect_keys = sorted(k for k in t if k.startswith("expect."))
    assert sorted(got) == expect_keys, set(got) ^ set(expect_keys)

    worst = {}
    print(f"{'tensor':58s} {'relL2(f64 vs file)':>18s} {'maxrel':>10s} {'f32 bits differ':>15s}")
    for k in expect_keys:
        a, b = got[k], t[k]
        if k.endswith(".ids_restore"):
            ok = torch.equal(a, b)
            print(f"{k:58s} {'exact' if ok else 'DIFFER':>18s}")
            worst["ids_restore"] = max(worst.get("ids_restore", 0.0), 0.0 if ok else 1.0)
            continue
        bd = b.double()
        rel = ((a - bd).norm() / bd.norm().clamp_min(1e-300)).item()
        maxrel = ((a - bd).abs().max() / bd.abs().max().clamp_min(1e-300)).item()
        bits = int((a.to(b.dtype) != b).sum().item()) if b.dtype == torch.float32 else int((a != b).sum().item())
        print(f"{k:58s} {rel:18.3e} {maxrel:10.3e} {bits:8d}/{b.numel()}")
        kind = k.split(".")[2]
        worst[kind] = max(worst.get(kind, 0.0), rel)
        if kind == "param":
            # README rule: compare the update (after - before) on elements whose gradient is
            # above 1e-3 x that tensor's gradient RMS
            s = int(k.split(".")[1])
            pname = k[len(f"expect.{s}.param."):]
            before = t[f"param.{pname}"] if s == 1 else t[f"expect.{s - 1}.param.{pname}"]
            gexp = t[f"expect.{s}.grad.{pname}"].double()
            sel = gexp.abs() > 1e-3 * gexp.pow(2).mean().sqrt()
            if sel.any():
                du_got = (a - before.double())[sel]
                du_exp = (bd - before.double())[sel]
                urel = ((du_got - du_exp).norm() / du_exp.norm()).item()
                worst["update(masked)"] = max(worst.get("update(masked)", 0.0), urel)
    print("\nworst relative L2 error per kind (our float64 vs the file's stored values):")
    for k, v in worst.items():
        print(f"  {k:16s} {v:.3e}")
    return worst


# ----------------------------------------------------------------------------- independent cross-check
def hf_check(path):
    """Optional second opinion from a separately written implementation: HuggingFace
    `ViTMAEForPreTraining` (needs `pip install transformers`; written against transformers 5.x
    key names, with a fallback for 4.x). Runs step 1's forward/backward in float64 from the
    file's params/inputs/noise and compares loss, pred, mask, ids_restore and a few gradients.
    HF's eager attention casts softmax to float32; that cast is disabled here to stay in float64."""
    import transformers.models.vit_mae.modeling_vit_mae as hfm
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    softmax = torch.nn.functional.softmax
    hfm.nn.functional.softmax = lambda x, dim=-1, dtype=None, **kw: softmax(x, dim=dim)
    md, t = load_golden(path)
    cfg = json.loads(md["config"])
    hc = ViTMAEConfig(
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu",
        layer_norm_eps=cfg["norm_eps"], image_size=cfg["img_size"], patch_size=cfg["patch_size"],
        num_channels=cfg["in_chans"], qkv_bias=True, decoder_hidden_size=cfg["decoder_embed_dim"],
        decoder_num_hidden_layers=cfg["decoder_depth"], decoder_num_attention_heads=cfg["decoder_num_heads"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]),
        mask_ratio=float(md["mask_ratio"]), norm_pix_loss=cfg["norm_pix_loss"], attn_implementation="eager")
    model = ViTMAEForPreTraining(hc).double().train()
    new_names = any(".layers.0.attention.q_proj." in k for k in model.state_dict())
    P = lambda n: t["param." + n].double()
    sd = {"vit.embeddings.cls_token": P("cls_token"),
          "vit.embeddings.position_embeddings": P("pos_embed"),
          "vit.embeddings.patch_embeddings.projection.weight": P("patch_embed.proj.weight"),
          "vit.embeddings.patch_embeddings.projection.bias": P("patch_embed.proj.bias"),
          "vit.layernorm.weight": P("norm.weight"), "vit.layernorm.bias": P("norm.bias"),
          "decoder.mask_token": P("mask_token"), "decoder.decoder_pos_embed": P("decoder_pos_embed")}
    for a in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for b in ("weight", "bias"):
            sd[f"decoder.{a}.{b}"] = P(f"{a}.{b}")
    if new_names:
        sub = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        qkv = ["attention.q_proj", "attention.k_proj", "attention.v_proj"]
        enc = "vit.layers.{}."
    else:
        sub = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        qkv = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
        enc = "vit.encoder.layer.{}."
    for src, dst, n, D in (("blocks.{}.", enc, cfg["depth"], cfg["embed_dim"]),
                           ("decoder_blocks.{}.", "decoder.decoder_layers.{}.", cfg["decoder_depth"],
                            cfg["decoder_embed_dim"])):
        for i in range(n):
            s_, d_ = src.format(i), dst.format(i)
            for a, b in sub.items():
                for w in ("weight", "bias"):
                    sd[f"{d_}{b}.{w}"] = P(f"{s_}{a}.{w}")
            for w in ("weight", "bias"):
                full = P(f"{s_}attn.qkv.{w}")
                for j, b in enumerate(qkv):  # fused rows are [q; k; v]
                    sd[f"{d_}{b}.{w}"] = full[j * D:(j + 1) * D]
    model.load_state_dict(sd, strict=True)
    out = model(pixel_values=t["input.imgs"].double(), noise=t["input.noise.1"].double())
    out.loss.backward()
    params = dict(model.named_parameters())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    le = t["expect.1.loss"].item()
    print(f"{os.path.basename(path)}: HF loss {out.loss.item()!r} vs file {le!r} "
          f"(rel {abs(out.loss.item() - le) / le:.2e}); mask equal {torch.equal(out.mask.float(), t['expect.1.mask'])}, "
          f"ids_restore equal {torch.equal(out.ids_restore, t['expect.1.ids_restore'])}")
    print(f"  relL2 vs file (F32 storage floor ~3e-8): pred {rel(out.logits, t['expect.1.pred'].double()):.2e}"
          f", grad patch_embed {rel(params['vit.embeddings.patch_embeddings.projection.weight'].grad, t['expect.1.grad.patch_embed.proj.weight'].double()):.2e}"
          f", grad cls_token {rel(params['vit.embeddings.cls_token'].grad, t['expect.1.grad.cls_token'].double()):.2e}"
          f", grad mask_token {rel(params['decoder.mask_token'].grad, t['expect.1.grad.mask_token'].double()):.2e}"
          f", grad decoder_pred.weight {rel(params['decoder.decoder_pred.weight'].grad, t['expect.1.grad.decoder_pred.weight'].double()):.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="conformance/golden", help="output directory")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to generate (default: all)")
    ap.add_argument("--check", metavar="FILE", help="recompute an existing golden file and compare")
    ap.add_argument("--hf-check", metavar="FILE", nargs="+",
                    help="compare step 1 of golden file(s) with HuggingFace ViTMAE (needs transformers)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reduction order
    if args.check:
        check(args.check)
        return
    if args.hf_check:
        for f in args.hf_check:
            hf_check(f)
        return
    os.makedirs(args.out, exist_ok=True)
    for case in args.case or sorted(CASES):
        generate(case, args.out)


if __name__ == "__main__":
    sys.exit(main())
