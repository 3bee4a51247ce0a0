#!/usr/bin/env python3
"""PyTorch reference for `bench`: the official MAE (facebookresearch/mae models_mae.py, timm
`Block`s) in eager mode, timed on the cases of DESIGN.md with the same recipe (mask ratio 0.75,
norm-pix loss, AdamW) and the same FLOP counting rule as `bench`.

Prints one JSON line per case with the fields of `bench`: case, backend ("torch"), batch,
train_img_s, embed_img_s, train_gflop_s, embed_gflop_s, plus train_peak_rss_mb (the process's
peak resident set size, VmHWM, read right after the training phase) on the CPU, or
train_peak_gpu_mb (torch.cuda.max_memory_allocated) on a GPU.

  python bench/torch_reference.py --case base224 [--seconds 10] [--batch N] [--threads 2]
  python bench/torch_reference.py --case base224 --device cuda --amp bf16 --batch 256,128,64

On the GPU everything (images, masking noise, loss) stays on the device, as in the official
training loop; --amp bf16 runs the forward under torch.autocast(dtype=torch.bfloat16) (no loss
scaler, as bf16 needs none). A comma list after --batch tries each batch in turn and keeps the
first that fits in memory (the issue's "largest of 64, 128, 256 that fits": list them largest
first). --case also takes the paper's model names (mae_vit_large_patch16, ...).

Threads: --threads, else MAE_CPU_THREADS, else MATMUL_NUM_THREADS, else 2.
"""
import argparse
import json
import os
import sys
import time
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

CASES = {
    # name: (img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, batch)
    "tiny32": (32, 4, 192, 12, 3, 128, 4, 4, 64),
    "small64": (64, 8, 384, 12, 6, 256, 4, 8, 32),
    "base224": (224, 16, 768, 12, 12, 512, 8, 16, 8),
    "mae_vit_base_patch16": (224, 16, 768, 12, 12, 512, 8, 16, 8),
    "mae_vit_large_patch16": (224, 16, 1024, 24, 16, 512, 8, 16, 8),
    "mae_vit_huge_patch14": (224, 14, 1280, 32, 16, 512, 8, 16, 8),
}


class MAE(nn.Module):
    """models_mae.MaskedAutoencoderViT, reduced to what a training step and the embedding need
    (initialization does not change the speed; weights are xavier-uniform as there)."""

    def __init__(self, img, p, D, depth, H, Dd, ddepth, Hd, C=3, mlp_ratio=4.0):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.p, self.C = p, C
        self.L = (img // p) ** 2
        self.patch_embed = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.L + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(D, H, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(D)
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.L + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(Dd, Hd, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(ddepth)])
        self.decoder_norm = norm(Dd)
        self.decoder_pred = nn.Linear(Dd, p * p * C, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):
        p = self.p
        N, C, H, W = imgs.shape
        h = w = H // p
        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * w, p * p * C)

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask)


def stack_flops(tokens, dim, hidden, depth):
    return depth * 2.0 * (tokens * dim * 3 * dim + 2 * tokens * tokens * dim
                          + tokens * dim * dim + 2 * tokens * dim * hidden)


def flops(case):
    """examples/src/flops.rs: 2 per multiply-add of the forward's GEMMs; training = 3x."""
    img, p, D, depth, H, Dd, ddepth, Hd, _ = CASES[case]
    L, pd = (img // p) ** 2, p * p * 3
    keep = int(L * (1 - 0.75))
    enc = lambda k: 2.0 * L * pd * D + stack_flops(1 + k, D, 4 * D, depth)
    fwd = enc(keep) + 2.0 * (1 + keep) * D * Dd + stack_flops(1 + L, Dd, 4 * Dd, ddepth) \
        + 2.0 * (1 + L) * Dd * pd
    return 3.0 * fwd, enc(L)


def rate(seconds, f, sync=lambda: None):
    # Two warm-up calls, as `bench` makes (the CPU backend packs its weight panels on the second).
    f()
    f()
    sync()
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        f()
        calls += 1
    sync()
    return calls / (time.perf_counter() - start)


def peak_rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(a, batch, device, threads):
    """One case at one batch: the JSON fields of `bench`."""
    torch.manual_seed(0)
    img, p, D, depth, H, Dd, ddepth, Hd, _ = CASES[a.case]
    model = MAE(img, p, D, depth, H, Dd, ddepth, Hd).to(device)
    imgs = torch.randn(batch, 3, img, img, device=device)
    # The official recipe: AdamW(betas=(0.9, 0.95)), weight decay 0.05 on weights only.
    decay = [q for n, q in model.named_parameters() if q.requires_grad and q.ndim > 1
             and not n.endswith("token")]
    no_decay = [q for n, q in model.named_parameters() if q.requires_grad and (q.ndim <= 1
                or n.endswith("token"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    gpu = device.type == "cuda"
    amp = a.amp == "bf16"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def step():
        with autocast():
            loss = model(imgs, 0.75)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        # The training loop reads the loss every step (to stop on NaN), as `bench` does.
        loss.item()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    train = rate(a.seconds, step, sync) * batch
    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
    model.eval()

    def embed():
        with torch.no_grad(), autocast():
            latent, _, _ = model.forward_encoder(imgs, 0.0)
            latent[:, 0].contiguous()

    emb = rate(a.seconds, embed, sync) * batch
    f_train, f_embed = flops(a.case)
    out = {
        "case": a.case, "backend": "torch", "device": device.type, "amp": a.amp,
        "batch": batch, "threads": threads, "torch": torch.__version__,
        "train_img_s": round(train, 3), "embed_img_s": round(emb, 3),
        "train_gflop_s": round(train * f_train / 1e9, 2),
        "embed_gflop_s": round(emb * f_embed / 1e9, 2),
    }
    if gpu:
        out["gpu"] = torch.cuda.get_device_name(device)
        out["train_peak_gpu_mb"] = round(gpu_peak, 1)
    else:
        out["train_peak_rss_mb"] = round(peak, 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", help="a batch size, or a comma list tried in turn until one fits")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    a = ap.parse_args()
    threads = a.threads or int(os.environ.get("MAE_CPU_THREADS")
                               or os.environ.get("MATMUL_NUM_THREADS") or 2)
    torch.set_num_threads(threads)
    device = torch.device(a.device)
    batches = [int(b) for b in a.batch.split(",")] if a.batch else [CASES[a.case][-1]]
    for i, batch in enumerate(batches):
        try:
            print(json.dumps(measure(a, batch, device, threads)), flush=True)
            return
        except torch.cuda.OutOfMemoryError:
            if i + 1 == len(batches):
                raise
            print(f"batch {batch} does not fit, trying {batches[i + 1]}", file=sys.stderr)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
