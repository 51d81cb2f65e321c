"""
BRIGHT (arXiv 2305.18601): images -> sigmoid-bounded key codes -> groups of multi-resolution
hash grids -> decoder. One file: building blocks, the config, the model, data, training and
the command line.

    python bright.py train [--data DIR] [--preset tiny|ffhq256|church256] [--out out]
    python bright.py eval | reconstruct | encode [--ckpt out/bright.pt] [--data DIR]
    python bright.py info [--preset ffhq256]
    python bright.py compare out out_vq      # runs side by side (e.g. BRIGHT vs --bottleneck vq)
    torchrun --standalone --nproc_per_node=K bright.py train ...    # DDP
"""
import argparse
import colorsys
import contextlib
import copy
import importlib.util
import json
import math
import os
import signal
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

from hashgrid_triton import GridSpec, clamp_coords, grid_lookup, level_corners, triton_problem, triton_unfit

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes")  # from any folder
BUILTIN_DATA = "data/shapes"  # how files record DEFAULT_DATA: the built-in set of the copy that reads them
DEFAULT_OUT = "out"
LOG_COLUMNS = ("iteration", "loss", "psnr", "seconds")  # log.csv
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# a data/*/prepare.py writes this at its start and removes it at its end: a half-written folder
PARTIAL = os.path.join("train", ".partial")


def fail(msg):
    """One clear line for the user instead of a traceback."""
    raise SystemExit(f"error: {msg}")


def first_line(e, n=160):
    """an exception's first non-empty line (or its type), cut to n characters, for fail()"""
    line = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    return line if len(line) <= n else line[:n - 3] + "..."


# ----------------------------------------------------------------------------- building blocks

def fp32(t):
    """a region that stays float32 under autocast (a no-op off cpu/cuda, e.g. on meta tensors)"""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cpu", "cuda") else contextlib.nullcontext()


def norm(c):
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


class ResBlock(nn.Module):
    """VQGAN-style residual block: GroupNorm, LeakyReLU, 3x3 conv, twice."""
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(norm(cin), nn.LeakyReLU(0.2), nn.Conv2d(cin, cout, 3, padding=1),
                                  norm(cout), nn.LeakyReLU(0.2), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class ModConv(nn.Module):
    """StyleGAN2 modulated conv, written as scale-conv-scale (same maths as modulating the
    weight per sample, but one ordinary conv for the whole batch):
    y = demod * conv(x * s), s = affine(style) + 1, demod_o = 1 / sqrt(sum_ik (w_oik s_i)^2).
    Weights are stored N(0, 1) and scaled at run time (StyleGAN2's equalized learning rate),
    which is what lets the paper's single Adam lr of 2e-3 train the decoder stably."""
    def __init__(self, cin, cout, k, style_dim, demod=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.affine = nn.Linear(style_dim, cin)
        nn.init.zeros_(self.affine.weight); nn.init.zeros_(self.affine.bias)
        self.demod, self.pad, self.gain = demod, k // 2, 1 / math.sqrt(cin * k * k)

    def forward(self, x, style):
        s = self.affine(style) + 1                                   # (B, C_in)
        w = self.weight * self.gain
        y = F.conv2d(x * s[:, :, None, None], w, padding=self.pad)
        if self.demod:
            w2 = w.square().sum((2, 3))                              # (C_out, C_in)
            y = y * torch.rsqrt(s.square() @ w2.t() + 1e-8)[:, :, None, None]
        return y + self.bias[:, None, None]


class VectorQuantizer(nn.Module):
    """The baseline BRIGHT is compared with (`--bottleneck vq`): plain VQ-VAE (van den Oord et
    al. 2017). Each encoder vector snaps to the nearest of K codebook entries; the gradient
    passes straight through; a commitment loss ||z - sg(e)||^2 keeps the encoder near its
    entries; the codebook is not trained by the optimizer but moved to an EMA of the vectors
    assigned to it (VQ-VAE appendix A.1), once per optimizer step (ema_step). An entry nobody
    picks is dead, as in the paper's VQ baselines: it stays put while its EMA count decays,
    then collapses towards 0 once the count nears the smoothing eps (after ~ln(1/eps) /
    (1 - decay) steps: ~1150 at decay 0.99); `restart` re-seeds such entries from the batch."""
    def __init__(self, K, dim, decay=0.99, restart=False):
        super().__init__()
        self.K, self.decay, self.restart = K, decay, restart
        e = torch.empty(K, dim).uniform_(-1 / K, 1 / K)     # VQGAN's init: near 0, every direction
        self.register_buffer("codebook", e)                 # (K, dim)
        # as if each entry had been assigned once, to itself: a fresh entry starts where it is
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", e.clone())
        self.pending = None  # (counts, sums, last vectors) of the training passes since the last ema_step

    def assign(self, v):
        """vectors (M, dim) -> index of the nearest entry (M,)"""
        d = v.square().sum(1, keepdim=True) - 2 * v @ self.codebook.t() + self.codebook.square().sum(1)
        return d.argmin(1)

    def forward(self, z):
        """z (B, dim, H, W) -> (quantized z with a straight-through gradient, indices (B, H, W),
        commitment loss). In training mode, also the assignment counts for ema_step, which the
        training loop calls after each optimizer step."""
        B, C, H, W = z.shape
        v = z.permute(0, 2, 3, 1).reshape(-1, C).float()   # (M = B*H*W, dim)
        idx = self.assign(v.detach())
        q = self.codebook[idx]
        if self.training:  # one EMA step per optimizer step, whatever the micro-batches
            onehot = F.one_hot(idx, self.K).type_as(v)                      # (M, K)
            counts, sums = onehot.sum(0), onehot.t() @ v.detach()           # (K,), (K, dim)
            if self.pending is not None:
                counts, sums = counts + self.pending[0], sums + self.pending[1]
            self.pending = (counts, sums, v.detach())
        commit = F.mse_loss(v, q.detach())
        q = v + (q - v).detach()                           # straight-through: dq/dz = identity
        return q.reshape(B, H, W, C).permute(0, 3, 1, 2).to(z.dtype), idx.reshape(B, H, W), commit

    @torch.no_grad()
    def ema_step(self, eps=1e-5):
        """move the codebook to the EMA of the vectors assigned since the last call (the
        micro-batches of one optimizer step, on every rank)"""
        if self.pending is None:
            return
        (counts, sums, v), self.pending = self.pending, None
        if dist.is_initialized():  # every rank applies the same update: its buffers stay equal
            dist.all_reduce(counts); dist.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + eps) / (n + self.K * eps) * n   # Laplace smoothing
        self.codebook.copy_(self.embed_sum / size[:, None])
        if self.restart:  # optional: re-seed entries that are (nearly) never picked
            dead = self.cluster_size < 1e-3
            if dead.any():
                pick = v[torch.randint(len(v), (int(dead.sum()),), device=v.device)]
                self.codebook[dead] = pick; self.embed_sum[dead] = pick; self.cluster_size[dead] = 1


# ----------------------------------------------------------------------------- config

def check_fields(cfg, positive="", non_negative="", fraction=""):
    """a config dataclass's field types, then the ranges of the fields named, as a ValueError
    naming the field (make_config makes it one error line): --set '{"lr": "0.001"}' or an
    ema_decay of 5 stops here, not with a traceback deep in training or not at all. An int
    passes for a float; a bool passes for no number."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        ok, what = {int: (number(v) and isinstance(v, int), "an integer"), float: (number(v), "a number"),
                    bool: (isinstance(v, bool), "true or false"), str: (isinstance(v, str), "a string"),
                    tuple: (isinstance(v, (list, tuple)) and all(number(x) and isinstance(x, int) and x > 0 for x in v),
                            "a list of positive integers")}[f.type]
        if not ok:
            raise ValueError(f"{f.name} must be {what}, got {v!r}")
    for names, ok, what in [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fraction, lambda v: 0 <= v < 1, "in [0, 1)")]:
        for name in names.split():
            if not ok(getattr(cfg, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(cfg, name)!r}")


@dataclass
class Config:
    image_size: int = 64
    z_size: int = 16                # key codes are (C_z, z_size, z_size)
    z_channels: int = 4             # C_z
    c_key: int = 1                  # C_key: key channels per group; groups N_h = C_z / C_key
    levels: int = 8                 # L
    features: int = 2               # F
    log2_table_size: int = 14       # T = 2^t entries per level at most
    min_res: int = 8
    max_res: int = 32
    # vertex placement: False puts vertex c of a level at c / res (x = 0 and 1 are vertices);
    # True is Instant-NGP's and torch-ngp's pos = x * (N_l - 1) + 0.5, levels staggered by
    # half a cell: the grid BRIGHT used, so the paper's presets take it (hashgrid_triton.py).
    # False by default: a checkpoint whose config lacks the field was trained with c / res
    staggered: bool = False
    feat_size: int = 16             # H_d = W_d of the feature map f
    c_d: int = 64                   # C_d channels of f
    head_hidden: int = 32           # hidden width of each group's MLP
    enc_widths: tuple = (16, 32, 64)  # one per encoder resolution (len = downsamplings + 1)
    dec_widths: tuple = (64, 48, 32)  # one per decoder resolution, feat_size up to image_size
    style_dim: int = 64
    # the bottleneck: "hash" (BRIGHT) or "vq" (the baseline: C_z-wide encoder vectors snapped
    # to a codebook of K entries, then a 1x1 conv to the G*L*F channels the lookup would give)
    bottleneck: str = "hash"
    codebook_size: int = 1024       # K
    commitment: float = 0.25        # beta
    codebook_decay: float = 0.99
    codebook_restart: bool = False  # off: plain VQ, as the paper's baselines
    # training
    grad_accum: int = 1             # batch_size is the global batch of one optimizer step
    batch_size: int = 16
    lr: float = 2e-3                # the paper: Adam lr 2e-3, betas (0, 0.99), eps 1e-15
    lr_final: float = 1.0           # cosine decay to lr * lr_final at max_iters (1: constant lr)
    ema_decay: float = 0.998
    l1_weight: float = 0.0
    gan_weight: float = 0.0         # > 0 adds a patch-GAN term (off by default)
    gan_start: int = 0              # the GAN term from this iteration on: reconstruction first (VQGAN's disc_start)
    max_iters: int = 3000
    eval_every: int = 500
    seed: int = 0

    def __post_init__(self):
        check_fields(self, positive="z_size z_channels c_key feat_size c_d head_hidden style_dim codebook_size "
                                    "batch_size grad_accum lr eval_every",
                     non_negative="commitment lr_final l1_weight gan_weight gan_start max_iters",
                     fraction="ema_decay codebook_decay")
        self.enc_widths, self.dec_widths = tuple(self.enc_widths), tuple(self.dec_widths)
        if not 0 <= self.seed < 2 ** 31:
            raise ValueError("seed must be in 0..2^31-1")
        if self.image_size < 11:
            raise ValueError("image_size must be at least 11 (SSIM's 11x11 window)")
        self.grid  # GridSpec checks its dimension (C_key + 2), resolutions and table size
        groups = self.z_channels // self.c_key
        if self.z_channels % self.c_key or self.c_d % groups:
            raise ValueError("z_channels must be a multiple of c_key, c_d of the group count")
        if self.image_size != self.z_size * 2 ** (len(self.enc_widths) - 1):
            raise ValueError("image_size must be z_size * 2^(len(enc_widths) - 1)")
        if self.image_size != self.feat_size * 2 ** (len(self.dec_widths) - 1):
            raise ValueError("image_size must be feat_size * 2^(len(dec_widths) - 1)")
        if self.feat_size % self.z_size:
            raise ValueError("feat_size must be a multiple of z_size (nearest tiling)")
        if self.bottleneck not in ("hash", "vq"):
            raise ValueError(f"bottleneck must be 'hash' or 'vq', not {self.bottleneck!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")

    @property
    def groups(self):
        return self.z_channels // self.c_key

    @property
    def grid(self):
        return GridSpec(self.c_key + 2, self.levels, self.features, self.log2_table_size,
                        self.min_res, self.max_res, self.staggered)

    @property
    def noise_sigma(self):
        # key-code noise σ = 1/256 at the finest resolution 64, a quarter of the finest cell
        # (the method is described as "half a cell, 1/256": the number is the one kept)
        return 1 / (4 * self.max_res)


PRESETS = {
    # fits a 2-core CPU: 64^2 shapes, key codes 16x16x4 (the Config defaults), 4 groups of 3-D
    # grids; batch 8, a decaying lr and a shorter EMA: ~30 dB in 8 minutes on the default shapes
    "tiny": dict(batch_size=8, max_iters=4400, lr_final=0.1, ema_decay=0.995),
    # the paper's FFHQ model: key codes 16x16x16, 16 groups, L=16, F=4, res 16->64, T=2^18,
    # torch-ngp's staggered vertices; tables = 74,521,088 params with these grid settings (the
    # paper's table: 42.9M, per-group sizes not given)
    "ffhq256": dict(image_size=256, z_size=16, z_channels=16, levels=16, features=4,
                    log2_table_size=18, min_res=16, max_res=64, staggered=True, feat_size=64, c_d=512,
                    head_hidden=64, enc_widths=(32, 64, 128, 256, 256),
                    dec_widths=(512, 256, 128), style_dim=512, ema_decay=0.999,
                    max_iters=400_000, eval_every=5000),
    # the paper's LSUN-Church model: key codes 64x64x4, 4 groups; tables = 18,630,272 params,
    # the v3 paper's figure (the project page's table says 11.4M)
    "church256": dict(image_size=256, z_size=64, z_channels=4, levels=16, features=4,
                      log2_table_size=18, min_res=16, max_res=64, staggered=True, feat_size=64, c_d=512,
                      head_hidden=128, enc_widths=(32, 64, 128), dec_widths=(512, 256, 128),
                      style_dim=512, ema_decay=0.999, max_iters=400_000, eval_every=5000),
}


def parse_set(texts):
    """--set '{"lr": 0.001}', as often as wanted (a later field wins): other config fields as
    JSON objects, -> one dict"""
    extra = {}
    for text in texts or ():
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"--set is not valid JSON ({e})")
        if not isinstance(obj, dict):
            fail(f"--set takes a JSON object of config fields, e.g. '{{\"lr\": 0.001}}', not {text}")
        extra.update(obj)
    return extra


def preset_config(cls, presets, preset, overrides, why=""):
    """cls(**presets[preset], **overrides) with the overrides that are None left out, or one
    error line (an unknown preset or field, or a config its __post_init__ rejects: why + reason).
    The config dataclasses of bright.py and diffusion.py are both built through it."""
    if preset not in presets:
        fail(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        fail(f"unknown config field(s): {', '.join(sorted(unknown))}")
    try:
        return cls(**{**presets[preset], **{k: v for k, v in overrides.items() if v is not None}})
    except (ValueError, TypeError) as e:  # TypeError: a value of the wrong type, e.g. "enc_widths": 3
        fail(f"{why}{e}")


def make_config(preset="tiny", **overrides):
    return preset_config(Config, PRESETS, preset, overrides, "bad config: ")


# ----------------------------------------------------------------------------- the model

class BRIGHT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.spec, self.backend = cfg, cfg.grid, "auto"
        G, LF, w = cfg.groups, cfg.levels * cfg.features, cfg.enc_widths
        # 1. encoder: conv, (ResBlock, stride-2 conv) per downsampling, then 1x1 conv -> C_z
        enc = [nn.Conv2d(3, w[0], 3, padding=1)]
        for a, b in zip(w[:-1], w[1:]):
            enc += [ResBlock(a, a), nn.Conv2d(a, b, 3, stride=2, padding=1)]
        enc += [ResBlock(w[-1], w[-1]), norm(w[-1]), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc)
        self.to_key = nn.Conv2d(w[-1], cfg.z_channels, 1)
        if cfg.bottleneck == "hash":
            # 2. groups of multi-resolution hash tables, U(-1e-4, 1e-4) as in Instant-NGP
            self.tables = nn.Parameter(torch.empty(G, self.spec.num_entries, cfg.features).uniform_(-1e-4, 1e-4))
        else:
            # 2'. the VQ baseline: a codebook, and a 1x1 conv standing in for the lookup
            self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.z_channels, cfg.codebook_decay,
                                             cfg.codebook_restart)
            self.unembed = nn.Conv2d(cfg.z_channels, G * LF, 1)
        # 3. per-group MLP, L*F -> C_d/G, as grouped 1x1 convs (one weight per group)
        self.head = nn.Sequential(nn.Conv2d(G * LF, G * cfg.head_hidden, 1, groups=G), nn.LeakyReLU(0.2),
                                  nn.Conv2d(G * cfg.head_hidden, cfg.c_d, 1, groups=G))
        self.style = nn.Sequential(nn.Linear(cfg.c_d, cfg.style_dim), nn.LeakyReLU(0.2),
                                   nn.Linear(cfg.style_dim, cfg.style_dim))
        # 4. decoder: two modulated 3x3 convs per resolution, x2 nearest upsampling between
        d = (cfg.c_d,) + cfg.dec_widths
        self.dec = nn.ModuleList(ModConv(d[i] if j == 0 else d[i + 1], d[i + 1], 3, cfg.style_dim)
                                 for i in range(len(cfg.dec_widths)) for j in range(2))
        self.to_rgb = ModConv(d[-1], 3, 1, cfg.style_dim, demod=False)
        # pixel centres of the feature map, the (x, y) part of every query
        H = cfg.feat_size
        c = (torch.arange(H) + 0.5) / H
        self.register_buffer("xy", torch.stack(torch.meshgrid(c, c, indexing="xy"), -1), persistent=False)

    def encode(self, x):
        """images (B, 3, H, W) in [-1, 1] -> key codes (B, C_z, H_z, W_z) in (0, 1)
        (exactly 1 in fp32 for a logit above ~17, exactly 0 only below ~-104; the slope is ~0 there)
        (vq: the unquantized encoder vectors, unbounded)"""
        h = self.encoder(x)
        # the key codes are computed in fp32 even under bf16 autocast: bf16 keeps 8 bits of
        # mantissa, a step of 2^-8 near 1 = a quarter of a finest-level cell at max_res 64
        with fp32(x):
            z = self.to_key(h.float())
        return torch.sigmoid(z) if self.cfg.bottleneck == "hash" else z

    def tile(self, z):
        """(B, C, H_z, W_z) -> (B, C, H_d, W_d), each code repeated (nearest) over its pixels"""
        r = self.cfg.feat_size // self.cfg.z_size
        return z.repeat_interleave(r, 2).repeat_interleave(r, 3)

    def queries(self, z):
        """key codes (B, C_z, H_z, W_z) -> grid coordinates (N = B*H_d*W_d, G, C_key + 2):
        per pixel and group, (x, y, key slice) with the codes tiled (nearest) to H_d x W_d"""
        cfg, B = self.cfg, z.shape[0]
        H, G, K = cfg.feat_size, cfg.groups, cfg.c_key
        z = self.tile(z)                                                       # (B, C_z, H_d, W_d)
        key = z.permute(0, 2, 3, 1).reshape(B * H * H, G, K)                  # (N, G, C_key)
        xy = self.xy.reshape(1, H * H, 1, 2).expand(B, -1, G, -1).reshape(B * H * H, G, 2)
        return torch.cat([xy.to(key.dtype), key], -1).float()                 # (N, G, C_key + 2)

    def features(self, z):
        """key codes (B, C_z, H_z, W_z) -> feature map f (B, C_d, H_d, W_d)
        (vq: quantized vectors -> 1x1 conv -> tiled; the head and decoder are the same)"""
        B, H = z.shape[0], self.cfg.feat_size
        if self.cfg.bottleneck == "vq":
            return self.head(self.tile(self.unembed(z)))                       # via (B, G*L*F, H_d, W_d)
        # the lookup stays in fp32 under autocast: the coordinates need the bits (see encode),
        # the tables are fp32 parameters, and the table gradient is summed by scatter-adds,
        # which in bf16 would round at every one of the many small contributions to an entry
        with fp32(z):
            feats = grid_lookup(self.queries(z), self.tables, self.spec, self.backend)  # (N, G, L*F)
        feats = feats.reshape(B, H, H, -1).permute(0, 3, 1, 2)                 # (B, G*L*F, H_d, W_d)
        return self.head(feats)

    def decode(self, z):
        """key codes in [0, 1] -> images (B, 3, H, W) in [-1, 1] (vq: encoder vectors, quantized here)"""
        if self.cfg.bottleneck == "vq":
            return self.synthesize(self.features(self.quantizer(z)[0]))
        if not z.is_meta and z.numel() and (z.min() < 0 or z.max() > 1 or z.isnan().any()):
            raise ValueError(f"key codes must lie in [0, 1], got [{z.min():.3g}, {z.max():.3g}]; clip them first")
        return self.synthesize(self.features(z))

    def synthesize(self, f):
        """feature map f (B, C_d, H_d, W_d) -> images (B, 3, H, W), modulated by pooled f"""
        s = self.style(f.mean((2, 3)))                                          # (B, style_dim)
        x = f
        for i, conv in enumerate(self.dec):
            if i and i % 2 == 0:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.leaky_relu(conv(x, s), 0.2)
        return self.to_rgb(x, s)

    def forward(self, x, noise=None):
        """training pass: images -> (reconstruction, key codes, auxiliary loss). noise: None, or
        standard-normal (B, C_z, H_z, W_z) for the key-code noise (drawn by the caller, so that a
        batch split over processes or micro-batches gets the same noise as the whole batch)"""
        z = self.encode(x)
        if self.cfg.bottleneck == "vq":
            q, _, commit = self.quantizer(z)
            return self.synthesize(self.features(q)), z, self.cfg.commitment * commit
        if noise is not None:  # key-code noise: keeps the decoder robust to small code errors
            z = (z + noise * self.cfg.noise_sigma).clamp(0, 1)
        return self.decode(z), z, z.new_zeros(())


class PatchDiscriminator(nn.Module):
    """Optional adversarial term: a small PatchGAN, one logit per patch."""
    def __init__(self, w=64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(w, 2 * w, 4, 2, 1), norm(2 * w), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * w, 4 * w, 4, 2, 1), norm(4 * w), nn.LeakyReLU(0.2),
                                 nn.Conv2d(4 * w, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- data

def list_images(root):
    """every image file under root, sorted; symlinked folders are followed, each real folder
    once (a link back up the tree would otherwise repeat the images until the path is too long).
    A run's folder inside (one holding a checkpoint) is left out: its PNGs are outputs, not data."""
    if not os.path.isdir(root):
        fail(f"data folder {root!r} " + ("is a file, not a folder" if os.path.exists(root) else "does not exist")
             + (" (python bright.py train makes it)" if root == DEFAULT_DATA else ""))
    paths, seen = [], set()
    for d, dirs, fs in os.walk(root, followlinks=True):
        dirs.sort()  # a fixed walk order: which of two links to one folder is kept never varies
        if os.path.realpath(d) in seen:
            dirs.clear()
            continue
        seen.add(os.path.realpath(d))
        if d != root and {"bright.pt", "ddpm.pt"} & set(fs):
            print(f"note: left out {d}, a run's folder (it holds a checkpoint)", file=sys.stderr)
            dirs.clear()
            continue
        paths += [os.path.join(d, f) for f in fs if f.lower().endswith(IMAGE_EXTS)]
    paths.sort()
    if not paths:  # data/ffhq before its prepare.py has run, say
        prepare = os.path.join(root, "prepare.py")
        fail(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}) found under {root!r}"
             + (f": run python {prepare} first (-h for its arguments)" if os.path.isfile(prepare) else ""))
    return paths


def to_rgb(im):
    """any PIL image -> RGB: EXIF orientation applied, transparency (alpha or a transparent
    colour) composited on white, 16-bit grey scaled to 8 bits (convert() would clip it at 255)"""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block: the pixels are fine, take them as stored
        pass
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        im = Image.fromarray((np.asarray(im) / 257).round().clip(0, 255).astype(np.uint8))
    if "A" in im.getbands() or im.mode == "P" or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def read_image(path, size):
    """-> uint8 (3, size, size): RGB (see to_rgb), centre-cropped, resized."""
    with Image.open(path) as im:
        im.load()
        if min(im.size) < size // 4:
            raise ValueError(f"too small ({im.size[0]}x{im.size[1]} for {size}x{size})")
        im = to_rgb(im)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def read_images(paths, size, what):
    """-> (the paths that read as images, uint8 (n, 3, size, size) of them in that order); the
    others are skipped with a warning (a corrupt file among good ones is not fatal). The images
    go straight into one tensor: a list of them stacked at the end would hold the dataset twice
    (FFHQ at 256^2: 13.6 GB, once)."""
    x = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    good, bad = [], []
    for p in paths:
        try:
            x[len(good)] = read_image(p, size)
            good.append(p)
        except Exception as e:
            bad.append(f"{p} ({first_line(e, 80)})")
    if bad:
        print(f"warning: skipped {len(bad)} unusable {what} file(s), e.g. {bad[0]}", file=sys.stderr)
    if not good:
        fail(f"none of the {len(paths)} {what} files could be read as an image")
    return good, x[:len(good)]


def load_dataset(root, size, train=True):
    """-> (train, val) uint8 tensors (N, 3, size, size); train is None with train=False (eval
    reads no more than it scores). Uses root/train and root/val when present; otherwise a
    deterministic split of the files that read as images: ~5% (by a hash of the name) held out.
    Every process of a DDP run holds its own copy of the training images (the batches are drawn
    from all of them): FFHQ at 256^2 takes 13.6 GB of memory per process."""
    if os.path.exists(os.path.join(root, PARTIAL)):  # not the few images it has: say so
        fail(f"data folder {root!r} is half-written: the prepare.py that writes it stopped before "
             f"the end (its {PARTIAL} is there); run it again")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        val = read_images(list_images(os.path.join(root, "val")), size, "validation")[1]
        return (read_images(list_images(os.path.join(root, "train")), size, "training")[1] if train else None), val
    paths = list_images(root)
    held = {p for p in paths if zlib.crc32(os.fsencode(os.path.relpath(p, root))) % 20 == 0}
    # read the kept files, then the held-out ones, into one tensor: train and val are two views
    # of it, each in the folder's order; only files that read are split (so never held out)
    good, x = read_images([p for p in paths if p not in held] + [p for p in paths if p in held], size, "image")
    n = len(good) - sum(p in held for p in good)  # training images: x[:n]
    if n in (0, len(good)):  # none or all of the readable ones held out (tiny folders): hold out the last
        n = max(len(good) - 1, 1)
    if len(good) == 1:  # validation numbers are then training numbers: say so
        print(f"note: one image in {root}: it is the training and the validation image", file=sys.stderr)
    return (x[:n] if train else None), (x[n:] if len(good) > 1 else x)


def to_float(x):
    """uint8 images -> float in [-1, 1]"""
    return x.float() / 127.5 - 1


def shapes_module(root=DEFAULT_DATA):
    """data/shapes/prepare.py as a module (a script in a data folder, not a package)"""
    if not os.path.isfile(os.path.join(root, "prepare.py")):
        fail(f"{os.path.join(root, 'prepare.py')} not found (it makes the built-in data): pass --data")
    spec = importlib.util.spec_from_file_location("shapes_prepare", os.path.join(root, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare_shapes(root=DEFAULT_DATA):
    """python bright.py train with no --data: build the procedural shapes set if missing."""
    mod = shapes_module(root)
    if not mod.is_prepared(root):
        print(f"preparing the shapes dataset in {root} (once)")
        mod.prepare(root)
    elif not mod.is_prepared(root, **mod.SIMPLE):
        print(f"note: {root} holds a shapes set made with other settings than the default "
              f"({os.path.join(root, mod.MARKER)}); training on it as it is "
              f"(python {os.path.join(root, 'prepare.py')} rebuilds the default)")


def save_grid(images, path, nrow=8):
    """images (N, 3, H, W) float in [0, 1] -> one PNG, nrow images per row"""
    x = (images.detach().float().clamp(0, 1) * 255).round().byte().cpu()
    N, _, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.full((3, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = x[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def pairs_grid(orig, recon, path, nrow=8):
    """rows of originals, each above its reconstructions (all in [-1, 1])"""
    nrow = min(nrow, len(orig))
    pad = lambda t: torch.cat([t, t.new_ones(nrow - len(t), *t.shape[1:])])  # a short last row: white
    rows = [pad(t) for i in range(0, len(orig), nrow) for t in (orig[i:i + nrow], recon[i:i + nrow])]
    save_grid((torch.cat(rows) + 1) / 2, path, nrow)


# ----------------------------------------------------------------------------- metrics

def psnr(a, b):
    """images in [-1, 1] -> PSNR (dB) of the [0, 1] images, per image (B,)"""
    mse = ((a - b) / 2).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(a, b):
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of [0, 1] images, per image"""
    a, b = (a + 1) / 2, (b + 1) / 2
    g = torch.exp(-(torch.arange(11, device=a.device) - 5.0) ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    blur = lambda x: F.conv2d(x, win, groups=3)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def table_usage(model, codes):
    """Fraction of table entries that receive a non-zero interpolation weight from the queries
    of these key codes, per level (over all groups) and overall. Dense levels count the
    vertices a query can reach, hashed levels their T entries (alignment padding is never used)."""
    spec, G = model.spec, model.cfg.groups
    used = [torch.zeros(G, n, dtype=torch.bool) for n in spec.sizes]
    for z in codes.split(16):
        x = clamp_coords(model.queries(z.to(model.xy.device))).cpu()        # (N, G, D)
        for l in range(spec.levels):
            idx, w = level_corners(x, spec, l)                              # (N, G, 2^D) each
            for g in range(G):
                used[l][g, idx[:, g][w[:, g] > 0]] = True
    per_level = []
    for l, u in enumerate(used):
        n = (spec.reach(l) + 1) ** spec.dim if spec.dense[l] else spec.sizes[l]
        per_level.append((u.sum().item(), G * n))  # only reachable entries are ever marked
    return ([a / b for a, b in per_level], sum(a for a, _ in per_level) / sum(b for _, b in per_level))


def codebook_usage(idx, K):
    """VQ indices -> (fraction of the K entries chosen at least once, perplexity exp(H(p)) of
    the entries' frequencies: K when all are used equally, 1 when one entry takes everything)"""
    p = torch.bincount(idx.flatten(), minlength=K).double() / idx.numel()
    return (p > 0).double().mean().item(), torch.exp(-(p * p.clamp_min(1e-30).log()).sum()).item()


def quantize_codes(z, bits):
    """key codes in [0, 1] -> the nearest of 2^bits evenly spaced values (0 and 1 included)"""
    n = 2 ** bits - 1
    return torch.round(z * n) / n


def lpips_metric(device):
    """-> (fn(a, b) -> per-image LPIPS of [-1, 1] images, None), or (None, why it is skipped).
    Optional: needs the `lpips` package and torchvision's AlexNet weights already in the torch
    hub cache (nothing is downloaded)."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not (os.path.isdir(hub) and any(f.startswith("alexnet") for f in os.listdir(hub))):
        return None, f"torchvision's AlexNet weights are not in {hub}"
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    return (lambda a, b: net(a, b).flatten()), None


# ----------------------------------------------------------------------------- checkpoints

MADE = []  # the folders check_out_folder made, deepest first: cli() removes those still empty at the end


def check_out_folder(folder, what="--out", files=()):
    """an output folder, made now, and the names of the files a command writes there: a file in
    the folder's way, or a folder by one of those names, is one line before the work, not a
    traceback at the end of a run (or at its first checkpoint)"""
    new, p = [], os.path.abspath(folder or ".")
    while not os.path.lexists(p):
        new.append(p); p = os.path.dirname(p)
    try:
        os.makedirs(folder or ".", exist_ok=True)
        MADE.extend(new)
    except OSError as e:
        fail(f"{what} {folder!r}: cannot make that folder ({e.strerror}: {e.filename})")
    for name in files:
        if os.path.isdir(os.path.join(folder or ".", name)):
            fail(f"{what} {folder!r} holds a folder named {name}, where the command writes its {name}: "
                 f"move it, or choose another {what}")


def check_out_not_data(out, data):
    """--out the image folder itself: the run's PNGs would be read as images on --resume (the
    held-out one perhaps its own recon.png), where a run folder inside the data is left out"""
    if os.path.realpath(out or ".") == os.path.realpath(data):
        fail(f"--out {out!r} is the data folder, where the run's PNGs would join the images: choose another --out")


def check_out_file(path, what="--out"):
    """an output file name: not a folder, in a folder that can be made, a name that can be written"""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        fail(f"{what} {path!r} is a folder: name a file in it")
    check_out_folder(os.path.dirname(path), what)
    try:  # too long a name, no permission, /proc: found now, not when the result is ready
        open(tmp_name(path), "wb").close()  # the longer of the two names written (atomic_save)
        os.remove(tmp_name(path))
    except OSError as e:
        fail(f"{what} {path!r} cannot be written ({e.strerror})")


# image files that keep an RGB grid as it is (.jpg and .webp: lossy); pillow writes others as
# 1-bit, grey, palette or a fixed icon size without a word
IMAGE_OUTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_image_out(path):
    """an image file name, checked before the work rather than after it"""
    if os.path.splitext(path)[1].lower() not in IMAGE_OUTS:
        fail(f"--out {path!r} needs an image file extension: {' '.join(IMAGE_OUTS)}")
    check_out_file(path)


def check_overwrite(path, kind):
    """outputs such as key codes replace only a file of their own kind: never a checkpoint"""
    check_out_file(path)
    if os.path.exists(path):
        try:
            old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            got = old.get("kind") if isinstance(old, dict) else None
        except Exception:
            got = None
        if got != kind:
            fail(f"{path!r} exists and is not a {kind} file" + (f" but a {got} one" if got else "")
                 + ": choose another --out")


def check_backend(backend, device, spec=None):
    """--backend triton where Triton cannot run (the device, or `spec`'s grid): one line now,
    not a traceback at the first lookup. ("auto" takes the torch path for such a grid.)"""
    if backend == "triton" and (why := triton_problem(device) or (spec and triton_unfit(spec))):
        fail(why)


def require_key_codes(bottleneck, path):
    """diffusion works on key codes, which a VQ model has none of"""
    if bottleneck != "hash":
        fail(f"{path} is a VQ model: its encoder vectors are not key codes in [0, 1] for diffusion.py")


def tmp_name(path):
    return f"{path}.tmp{os.getpid()}"


def atomic_save(obj, path):
    """temp file + rename: an interrupt never leaves a half-written checkpoint (and fsync
    before the rename, so that neither does a power cut: the new name points to written data)"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # interrupted: the old file stays, the partial one goes
        if os.path.exists(tmp):
            os.remove(tmp)


def open_log(path, step, columns=LOG_COLUMNS):
    """log.csv for appending, holding only its rows up to `step`: a run killed (SIGKILL, OOM)
    after its last checkpoint logged steps that --resume trains again, and a fresh run starts
    over, so their rows would repeat and the curves in `compare` would go back in time"""
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isfile(path):
        with open(path, errors="replace") as f:  # (re-saved in another encoding: the rows still readable)
            # a line cut short by the kill has no newline: dropped too
            rows = [l for l in f.readlines()[1:]
                    if l.endswith("\n") and (n := l.split(",")[0]).isdigit() and int(n) <= step]
    with open(f"{path}.tmp", "w") as f:  # temp file + rename, like the checkpoint
        f.write(",".join(columns) + "\n" + "".join(rows))
    os.replace(f"{path}.tmp", path)
    return open(path, "a")


def read_checkpoint(path, kind, hint="train one first"):
    """torch.load(weights_only=True) of a dict whose "kind" must be `kind`, or one error line"""
    if os.path.isdir(path):
        fail(f"{path!r} is a folder: name the checkpoint file in it")
    if not os.path.isfile(path):
        fail(f"{path!r} not found ({hint})")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if zipped else None
    except Exception as e:
        fail(f"{path!r} is not a readable checkpoint ({first_line(e)})")
    if not zipped:
        fail(f"{path!r} is not a checkpoint (not a file torch.save wrote)")
    got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if got != kind:
        fail(f"{path!r} is not a {kind} file (kind: {got})")
    return ckpt


def data_record(data):
    """how a file records its image folder: absolute (a command may run from another folder),
    except the built-in data, recorded as BUILTIN_DATA (a moved or other copy has its own)"""
    return BUILTIN_DATA if os.path.realpath(data) == os.path.realpath(DEFAULT_DATA) else os.path.abspath(data)


def from_record(p):
    """the inverse of data_record: BUILTIN_DATA is this copy's DEFAULT_DATA"""
    return DEFAULT_DATA if p == BUILTIN_DATA else p


def recorded(ckpt, key, path, flag):
    """a path that checkpoint `path` records, or None. Gone since (moved, another machine): one
    line that names the flag to pass instead. The built-in data: DEFAULT_DATA, which train makes."""
    p = from_record((ckpt or {}).get(key))
    if p and p != DEFAULT_DATA and not os.path.exists(p):
        fail(f"{p!r}, which {path} records as its {key}, is gone: pass {flag}")
    return p


def load_checkpoint(path, device="cpu"):
    """-> (model with the EMA weights, in eval mode; Config; the raw checkpoint dict)"""
    ckpt = read_checkpoint(path, "bright")
    cfg = config_from(Config, ckpt, path)
    model = BRIGHT(cfg)
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


def config_from(cls, ckpt, path):
    """cls(**ckpt["config"]), or one error line when the stored config does not build (a
    checkpoint written by another version of the code)"""
    try:
        return cls(**ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{path!r} has a config this code's {cls.__name__} cannot build ({first_line(e)})")


def resume_config(cls, ckpt, path, asked, preset_cfg=None):
    """--resume continues the checkpoint's config. asked {field: value}: the flags and --set
    fields given, and with --preset, every field of the config it describes (preset_cfg).
    max_iters and grad_accum may change; any other field must repeat the stored value (the
    run's own command plus --resume works), one that asks for another is an error rather than
    silently ignored."""
    cfg = config_from(cls, ckpt, path)
    unknown = set(asked) - {f.name for f in fields(cls)}
    if unknown:
        fail(f"unknown config field(s): {', '.join(sorted(unknown))}")
    change = {k: asked[k] for k in ("max_iters", "grad_accum") if k in asked}
    want = {**(asdict(preset_cfg) if preset_cfg else {}), **asked}
    clash = [f"{k} {v}, it has {getattr(cfg, k)}" for k, v in want.items() if k not in ("max_iters", "grad_accum")
             and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k)]
    if clash:
        more = f"; {len(clash) - 4} more" if len(clash) > 4 else ""
        fail(f"{path} was trained with other settings (asked: {'; '.join(clash[:4])}{more}); a resumed run keeps "
             f"its checkpoint's config (only --max-iters and --grad-accum may change)")
    try:
        return replace(cfg, **change)
    except ValueError as e:
        fail(f"bad config: {e}")


def load_weights(module, state, path):
    """load_state_dict, or one error line when the weights do not fit the module (a checkpoint
    written by another version of the model)"""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        fail(f"{path!r} does not fit this code's {type(module).__name__} ({' '.join(str(e).split())[:160]})")


def fingerprint(state):
    """state dict -> crc32 of every tensor's bytes, as 8 hex digits: tells one set of weights
    from another (e.g. which BRIGHT model made a file of key codes) without storing them"""
    crc = 0
    for k, v in sorted(state.items()):
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):  # e.g. the VQ codebook, already an EMA
            e.copy_(b)


def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def peak_memory(device):
    """' | 12.3 GiB peak' of CUDA memory allocated so far by tensors, for the training log"""
    return f" | {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB peak" if device.type == "cuda" else ""


# ----------------------------------------------------------------------------- commands

def batches(x, bs, device):
    for i in range(0, len(x), bs):
        yield to_float(x[i:i + bs]).to(device)


@torch.no_grad()
def evaluate(model, val, device, bs=32, bits=None, lpips=None):
    """EMA model on validation images -> per-image PSNR, SSIM, and the key codes (no noise);
    bits: quantize the key codes first; lpips: also that metric (then a 4th output)"""
    p, s, codes, lp = [], [], [], []
    for x in batches(val, bs, device):
        z = model.encode(x)
        y = model.decode(z if bits is None else quantize_codes(z, bits)).clamp(-1, 1)
        p.append(psnr(y, x)); s.append(ssim(y, x)); codes.append(z.cpu())
        if lpips:
            lp.append(lpips(y, x).cpu())
    out = torch.cat(p).cpu(), torch.cat(s).cpu(), torch.cat(codes)
    return out + (torch.cat(lp),) if lpips else out


def usage(model, codes):
    """hash: table usage (per level, overall); vq: codebook usage (used fraction, perplexity)"""
    if model.cfg.bottleneck == "hash":
        per_level, overall = table_usage(model, codes)
        return {"table_usage": {"overall": overall, "per_level": per_level}}
    v = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    used, ppl = codebook_usage(model.quantizer.assign(v.to(model.quantizer.codebook.device)), model.cfg.codebook_size)
    return {"codebook_usage": {"used": used, "perplexity": ppl, "size": model.cfg.codebook_size}}


def code_bits(cfg, bits=None):
    """bits of one image's code: VQ log2(K) per position; key codes `bits` per channel"""
    if cfg.bottleneck == "vq":
        return cfg.z_size ** 2 * math.log2(cfg.codebook_size)
    return cfg.z_size ** 2 * cfg.z_channels * bits


@torch.no_grad()
def encode_images(model, images, device, bs=64):
    """uint8 images (N, 3, H, W) -> key codes (N, C_z, H_z, W_z) in (0, 1) on the CPU; no
    key-code noise (it only regularises the decoder during training)"""
    return torch.cat([model.encode(x).cpu() for x in batches(images, bs, device)])


def setup_distributed(device_name="auto"):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group (NCCL on CUDA,
    gloo on CPU) and take this process's GPU. A plain `python bright.py train` is rank 0 of 1.
    -> (rank, world_size, device)"""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def ddp_wrap(module, device, world):
    """DistributedDataParallel around module when there is more than one process, else module"""
    if module is None or world == 1:
        return module
    # Under --compile the 1x1 to_rgb conv's weight gradient (C_out, C_in, 1, 1) comes back with
    # strides (C_in, 1, C_in, C_in): the same bytes as DDP's bucket view (C_in, 1, 1, 1), which it
    # copies every gradient into anyway. Its warning that the strides differ is noise for these
    # models (none uses channels_last, the case the warning is for).
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    return nn.parallel.DistributedDataParallel(module, [device.index] if device.type == "cuda" else None)


def sync_grads(module, last):
    """around a micro-batch's backward: DDP all-reduces the gradients on the last one only"""
    ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    return module.no_sync() if ddp and not last else contextlib.nullcontext()


def catch_stop():
    """Ctrl-C (or the SIGTERM torchrun sends) appends to a list instead of killing: the loop
    finishes its step, saves and exits; a second signal acts as usual. -> (list, restore())"""
    stop, handlers = [], {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda n, f: (stop.append(1), signal.signal(n, handlers[n])))
    return stop, lambda: [signal.signal(sig, h) for sig, h in handlers.items()]


def step_seed(seed, step):
    """the seed of a training step's random draws, equal to step for seed 0. torch's CPU
    generator keeps only the low 32 bits of a seed, so the pair is folded into 32 bits: seed
    times 2^32 / golden ratio, plus step. Within a run every step differs; seed + step would
    replay seed 0 one step later, and seed * 2^32 + step seed 0 exactly. Seeds below 1000 meet
    only 1.9M or more steps apart."""
    return (seed * 0x9E3779B9 + step) % 2 ** 32


def check_run_flags(args, start, max_iters, path):
    """one error line for a run that would do nothing, or log never"""
    if args.log_every < 1:
        fail(f"--log-every must be at least 1, got {args.log_every}")
    if start >= max_iters:
        fail(f"nothing to train: {path} is at step {start}, --max-iters is {max_iters}" if start
             else f"--max-iters must be at least 1, got {max_iters}")


def learning_rate(cfg, step):
    """cosine decay from cfg.lr at step 0 to cfg.lr * lr_final at max_iters (lr_final 1: constant)"""
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * (1 + math.cos(math.pi * step / cfg.max_iters)) / 2)


def step_stats(stats, stop, world):
    """stats (k,) tensor of this rank's step means -> (the means over all ranks..., stop?):
    one small all-reduce that also makes every rank take the same decision to stop"""
    stats = torch.cat([stats, torch.tensor([float(bool(stop))], device=stats.device)])
    if world > 1:
        dist.all_reduce(stats)  # SUM: gloo has no AVG
        stats[:-1] /= world
    return stats[:-1].tolist() + [stats[-1].item() > 0]


def check_diverged(step, loss, path, restore, modules=()):
    """a non-finite loss (every step) or weight (of `modules`: before each save, on every rank)
    ends the run with one line: the checkpoint keeps its last good step instead of NaNs"""
    what = ("loss" if not math.isfinite(loss) else
            "weights" if any(not p.isfinite().all() for m in modules for p in m.parameters()) else None)
    if what:
        restore()
        kept = f"{path} keeps its last save" if os.path.exists(path) else "nothing was saved"
        fail(f"training diverged at step {step} ({what} not finite): {kept}; a lower lr may help")


def autocast(device, dtype):
    """bf16 autocast for the convolutions and MLPs on CUDA; the key codes and the lookup opt
    out of it (BRIGHT.encode, BRIGHT.features). The CPU trains in float32."""
    if dtype == "bfloat16" and device.type != "cuda":
        fail("--dtype bfloat16 is for CUDA; on the CPU training runs in float32")
    return torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16")


def train(args, on_step=None):
    """Single process, or DDP under torchrun. One optimizer step sees cfg.batch_size images
    whatever the number of processes and micro-batches: the step's batch and key-code noise
    are drawn from a seed that depends only on the step, identically on every rank, and rank r
    takes its share of it, micro-batch by micro-batch (a per-rank shard, equivalent to a
    DistributedSampler with replacement). So the run is reproducible, and `--resume` continues
    it with any world size. on_step(step, model, loss): called after every step (tests)."""
    rank, world, device = setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 logs, writes grids and checkpoints
    out = args.out
    path = os.path.join(out, "bright.pt")
    ckpt = None
    flags = dict(max_iters=args.max_iters, batch_size=args.batch_size, bottleneck=args.bottleneck, seed=args.seed,
                 grad_accum=args.grad_accum, l1_weight=args.l1_weight, gan_weight=args.gan_weight)
    asked = {**parse_set(args.set), **{k: v for k, v in flags.items() if v is not None}}  # flags win over --set
    if args.resume:
        ckpt = read_checkpoint(path, "bright")
        cfg = resume_config(Config, ckpt, path, asked, args.preset and make_config(args.preset, **asked))
    else:
        if os.path.exists(path):
            fail(f"{path} exists: pass --resume to continue it, or --out DIR for a new run")
        cfg = make_config(args.preset or "tiny", **asked)
    check_out_folder(out, files=("log.csv", "recon.png"))
    if cfg.batch_size % (world * cfg.grad_accum):
        fail(f"batch size {cfg.batch_size} must be a multiple of processes ({world}) x grad-accum ({cfg.grad_accum})")
    check_run_flags(args, ckpt["step"] if ckpt else 0, cfg.max_iters, path)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    amp = autocast(device, args.dtype)
    check_backend(args.backend, device, cfg.grid)
    data = args.data or recorded(ckpt, "data", path, "--data") or DEFAULT_DATA  # a resumed run: its own data
    was = from_record((ckpt or {}).get("data")) or args.data
    if ckpt and args.data and os.path.realpath(args.data) != os.path.realpath(was):
        say(f"note: {path} was trained on {ckpt['data']} so far; it goes on with {args.data}")
    if not args.preset and not ckpt and data_record(data) != BUILTIN_DATA:  # `train --data data/ffhq`, before reading it
        say(f"note: no --preset, so the tiny one ({cfg.image_size}^2, a laptop's model); "
            "--preset ffhq256 or church256 trains the paper's models at 256^2")
    check_out_not_data(out, data)
    if data_record(data) == BUILTIN_DATA and rank == 0:
        prepare_shapes(DEFAULT_DATA)
    if world > 1:
        dist.barrier()
    train_x, val_x = load_dataset(data, cfg.image_size)
    say(f"data: {len(train_x)} training, {len(val_x)} validation images from {data} at {cfg.image_size}^2")

    torch.manual_seed(cfg.seed)
    model = BRIGHT(cfg).to(device)
    model.backend = args.backend
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # the validation below: on a CPU the interpreted kernels would take many minutes for its 200
    # images, the torch lookup gives the same numbers to float rounding
    ema.backend = "torch" if args.backend == "triton" and device.type != "cuda" else args.backend
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-15)
    disc = PatchDiscriminator().to(device) if cfg.gan_weight > 0 else None
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99)) if disc else None
    step = 0
    if ckpt:
        load_weights(model, ckpt["model"], path); load_weights(ema, ckpt["ema"], path)
        opt.load_state_dict(ckpt["optimizer"]); step = ckpt["step"]
        if disc:
            load_weights(disc, ckpt["disc"], path); d_opt.load_state_dict(ckpt["disc_optimizer"])
        say(f"resuming {path} at step {step}")
    n_tab = model.tables.numel() if cfg.bottleneck == "hash" else 0
    say(f"model: {sum(p.numel() for p in model.parameters()) - n_tab:,} network + {n_tab:,} table parameters, "
        + (f"{cfg.groups} groups x {cfg.levels} levels" if n_tab else f"VQ codebook {cfg.codebook_size} x {cfg.z_channels}")
        + f", device {device}, lookup backend {args.backend}, {world} process(es) x {cfg.grad_accum} "
        f"micro-batch(es) of {micro}, {args.dtype}")
    if args.compile:  # the dense parts only; the lookup is a custom autograd Function
        model.encoder.compile(); model.head.compile(); model.synthesize = torch.compile(model.synthesize)
    # DDP all-reduces every gradient, the hash tables' included: dense in memory although each
    # step touches a fraction of the entries. For ffhq256 that is 74.5M floats (298 MB) per step;
    # see BENCHMARKS.md for what it costs: small against a step's compute on NVLink or one node,
    # worth a look on slow inter-node links.
    ddp, ddisc = ddp_wrap(model, device, world), ddp_wrap(disc, device, world)

    def save():
        atomic_save({"kind": "bright", "config": asdict(cfg), "step": step, "seconds": time.time() - t0,
                     "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "data": data_record(data),
                     **({"disc": disc.state_dict(), "disc_optimizer": d_opt.state_dict()} if disc else {})}, path)

    stop, restore = catch_stop()
    log = None
    if rank == 0:
        log = open_log(os.path.join(out, "log.csv"), step)  # (open_log makes the folder)
    t_last, s_last = time.time(), step
    t0 = t_last - (ckpt or {}).get("seconds", 0)  # training time so far, across resumes (log.csv)
    model.train()
    shares = torch.arange(cfg.batch_size).view(world, cfg.grad_accum, micro)[rank]  # (accum, micro) of this rank
    while step < cfg.max_iters:
        torch.manual_seed(step_seed(cfg.seed, step))  # batch and key-code noise depend on the step alone: exact resume
        idx = torch.randint(len(train_x), (cfg.batch_size,))
        noise = torch.randn(cfg.batch_size, cfg.z_channels, cfg.z_size, cfg.z_size)
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(3, device=device)  # loss, psnr, D loss: means over this rank's share of the batch
        fakes, gan = [], disc is not None and step >= cfg.gan_start
        for k, sel in enumerate(shares):
            x = to_float(train_x[idx[sel]]).to(device)
            with sync_grads(ddp, last=k == cfg.grad_accum - 1):
                with amp:
                    y, _, aux = ddp(x, None if cfg.bottleneck == "vq" else noise[sel].to(device))
                    y = y.float()
                    loss = F.mse_loss(y, x) + cfg.l1_weight * (y - x).abs().mean() + aux
                    if gan:  # non-saturating GAN loss; through the unwrapped D, whose grads are reset below
                        loss = loss + cfg.gan_weight * F.softplus(-disc(y)).mean()
                (loss / cfg.grad_accum).backward()
            stats[0] += loss.detach() / cfg.grad_accum
            stats[1] += psnr(y.detach(), x).mean() / cfg.grad_accum
            if gan:
                fakes.append((y.detach(), x))
        opt.step()
        if cfg.bottleneck == "vq":
            model.quantizer.ema_step()
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if gan:
            d_opt.zero_grad(set_to_none=True)
            for k, (y, x) in enumerate(fakes):
                with sync_grads(ddisc, last=k == len(fakes) - 1):
                    with amp:
                        logits = ddisc(torch.cat([y, x])).float()
                        d_loss = F.softplus(logits[:len(x)]).mean() + F.softplus(-logits[len(x):]).mean()
                    (d_loss / cfg.grad_accum).backward()
                stats[2] += d_loss.detach().float() / cfg.grad_accum
            d_opt.step()
        step += 1
        loss_v, psnr_v, d_loss_v, stopping = step_stats(stats, stop, world)
        saving = step % cfg.eval_every == 0 or step == cfg.max_iters or stopping
        # (the discriminator's loss and weights too: a save would keep them)
        check_diverged(step, loss_v + d_loss_v, path, restore, [m for m in (model, disc) if m is not None and saving])
        if on_step:
            on_step(step, model, loss_v)
        if step % args.log_every == 0 or step in (1, cfg.max_iters) or stopping:
            now = time.time()
            its = (step - s_last) / max(now - t_last, 1e-9)
            eta = (cfg.max_iters - step) / max(its, 1e-9)
            # with the GAN term: the discriminator's loss too (near 0: D wins, 2 log 2 = 1.39: a draw)
            say(f"iter {step:6d}/{cfg.max_iters} | loss {loss_v:.5f} | psnr {psnr_v:5.2f} dB | "
                + (f"D loss {d_loss_v:.4f} | " if gan else "")
                + f"{its:5.2f} it/s | eta {eta / 60:5.1f} min{peak_memory(device)}", flush=True)
            if log:
                log.write(f"{step},{loss_v:.6f},{psnr_v:.3f},{now - t0:.1f}\n"); log.flush()
            t_last, s_last = now, step
        if rank == 0 and saving:
            save()  # first: a second Ctrl-C during the validation below (long on a CPU) loses nothing
            p, s, _ = evaluate(ema, val_x[:256], device)
            with torch.no_grad():
                xv = to_float(val_x[:16]).to(device)
                pairs_grid(xv, ema.decode(ema.encode(xv)).clamp(-1, 1), os.path.join(out, "recon.png"))
            say(f"step {step}: val psnr {p.mean():.2f} dB, ssim {s.mean():.4f} (EMA) | "
                f"saved {path} and {os.path.join(out, 'recon.png')} | {time.time() - t0:.0f} s", flush=True)
        if stopping:
            break
    if log:
        log.close()
    restore()
    if step < cfg.max_iters:
        say(f"interrupted at step {step}; checkpoint saved, --resume continues")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if step < cfg.max_iters:  # exit status 130, as for Ctrl-C: `train && next command` stops here
        sys.exit(130)
    return model


def out_beside(args, name):
    """--out by default: `name` in the folder of --ckpt (out/ for the default checkpoint)"""
    return args.out or os.path.join(os.path.dirname(args.ckpt) or ".", name)


def load_for_command(args, train=False):
    """the checkpoint's model on the device, and its data: the validation images, and with
    train=True the training images too, for key codes: a VQ model is refused before reading them"""
    device = pick_device(args.device)
    check_backend(args.backend, device)
    model, cfg, ckpt = load_checkpoint(args.ckpt, device)
    check_backend(args.backend, device, cfg.grid)
    model.backend = args.backend
    if train:
        require_key_codes(cfg.bottleneck, args.ckpt)
    data = args.data or recorded(ckpt, "data", args.ckpt, "--data") or DEFAULT_DATA
    train_x, val_x = load_dataset(data, cfg.image_size, train)
    return model, cfg, ckpt, device, data, train_x, val_x


def cmd_eval(args):
    try:  # the flags before the data: a typo is one line at once, not after reading the images
        bits = sorted({int(b) for b in args.quantize_bits.split(",")}) if args.quantize_bits else []
    except ValueError:
        bits = [0]
    if any(not 1 <= b <= 24 for b in bits):
        fail(f"--quantize-bits takes a comma-separated list of bit counts in 1..24, not {args.quantize_bits!r}")
    model, cfg, ckpt, device, _, _, val_x = load_for_command(args)
    if bits and cfg.bottleneck != "hash":
        fail("--quantize-bits quantizes key codes: it needs a hash-bottleneck checkpoint")
    lp, lp_why = lpips_metric(device) if args.lpips else (None, None)
    p, s, z, *l = evaluate(model, val_x, device, lpips=lp)
    r = {"checkpoint": args.ckpt, "step": ckpt["step"], "bottleneck": cfg.bottleneck, "images": len(val_x),
         "psnr": p.mean().item(), "ssim": s.mean().item(),
         "key_codes": {"mean": z.mean().item(), "std": z.std().item(), "min": z.min().item(), "max": z.max().item()},
         **usage(model, z)}
    if args.lpips:
        r["lpips"] = l[0].mean().item() if lp else f"skipped: {lp_why}"
    if cfg.bottleneck == "vq":
        r["code_bits_per_image"] = code_bits(cfg)
    r["quantized"] = []
    for b in bits:
        pb, sb, _ = evaluate(model, val_x, device, bits=b)
        r["quantized"].append({"bits": b, "psnr": pb.mean().item(), "ssim": sb.mean().item(),
                               "code_bits_per_image": code_bits(cfg, b)})
    if args.json:
        print(json.dumps(r, indent=2))
        return
    k = r["key_codes"]
    print(f"{args.ckpt} (step {r['step']}, {cfg.bottleneck} bottleneck) on {r['images']} validation images")
    print(f"PSNR {r['psnr']:.2f} dB | SSIM {r['ssim']:.4f}" + (f" | LPIPS {r['lpips']:.4f}" if lp else ""))
    if args.lpips and not lp:
        print(f"LPIPS skipped: {lp_why}")
    print(f"{'key codes' if cfg.bottleneck == 'hash' else 'encoder vectors'}: mean {k['mean']:.3f} "
          f"std {k['std']:.3f} min {k['min']:.4f} max {k['max']:.4f}")
    if cfg.bottleneck == "hash":
        u = r["table_usage"]
        print(f"table usage: {u['overall']:.1%} overall; per level " + " ".join(f"{x:.0%}" for x in u["per_level"]))
    else:
        u = r["codebook_usage"]
        print(f"codebook usage: {u['used']:.1%} of {u['size']} entries, perplexity {u['perplexity']:.1f} | "
              f"{r['code_bits_per_image']:.0f} bits per image")
    for q in r["quantized"]:
        print(f"key codes at {q['bits']:2d} bits: PSNR {q['psnr']:.2f} dB | SSIM {q['ssim']:.4f} | "
              f"{q['code_bits_per_image']:.0f} bits per image")


def cmd_reconstruct(args):
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    args.out = out_beside(args, "reconstruct.png")
    check_image_out(args.out)
    model, cfg, ckpt, device, _, _, val_x = load_for_command(args)
    x = to_float(val_x[:args.n]).to(device)
    with torch.no_grad():
        pairs_grid(x, model.decode(model.encode(x)).clamp(-1, 1), args.out)
    print(f"wrote {args.out}: {len(x)} validation images, each above its reconstruction")


def cmd_encode(args):
    args.out = out_beside(args, "codes.pt")
    check_overwrite(args.out, "bright-codes")
    model, cfg, ckpt, device, data, train_x, val_x = load_for_command(args, train=True)
    codes = [encode_images(model, d, device) for d in (train_x, val_x)]
    # where they come from, for diffusion.py: the model that decodes them, the images (neighbors)
    atomic_save({"kind": "bright-codes", "codes": codes[0], "val_codes": codes[1],
                 "bright_ckpt": os.path.abspath(args.ckpt), "data": data_record(data),
                 "bright_fingerprint": fingerprint(ckpt["ema"]), "config": asdict(cfg)}, args.out)
    print(f"wrote {args.out}: key codes {tuple(codes[0].shape)} train, {tuple(codes[1].shape)} val")


def model_cost(cfg):
    """-> parameter counts and multiply-accumulates per image (FLOPs / 2, the paper's unit)"""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = BRIGHT(cfg)
        H, G = cfg.feat_size, cfg.groups
        feats = torch.empty(1, G * cfg.levels * cfg.features, H, H)
        with FlopCounterMode(display=False) as fc:
            m.synthesize(m.head(feats))
        dec_macs = fc.get_total_flops() / 2
        with FlopCounterMode(display=False) as fc:
            m.encode(torch.empty(1, 3, cfg.image_size, cfg.image_size))
        enc_macs = fc.get_total_flops() / 2
    # lookup: per query and level, 2^D corner weights times F features (one MAC each)
    lookup_macs = H * H * G * cfg.levels * 2 ** (cfg.c_key + 2) * cfg.features
    n = lambda mods: sum(p.numel() for mod in mods for p in mod.parameters())
    return {"table_params": m.tables.numel(), "encoder_params": n([m.encoder, m.to_key]),
            "decoder_params": n([m.head, m.style, m.dec, m.to_rgb]),
            "decoder_gmacs": dec_macs / 1e9, "lookup_gmacs": lookup_macs / 1e9, "encoder_gmacs": enc_macs / 1e9}


def cmd_info(args):
    for name in ([args.preset] if args.preset else PRESETS):
        cfg, c = make_config(name), model_cost(make_config(name))
        spec = cfg.grid
        print(f"{name}: {cfg.image_size}^2 images, key codes {cfg.z_size}x{cfg.z_size}x{cfg.z_channels}, "
              f"{cfg.groups} groups of {spec.dim}-D grids, L={cfg.levels} F={cfg.features} "
              f"res {cfg.min_res}->{cfg.max_res} T=2^{cfg.log2_table_size} "
              f"({sum(spec.dense)} dense + {spec.levels - sum(spec.dense)} hashed levels"
              f"{', staggered' if spec.staggered else ''})")
        print(f"  tables {c['table_params']:,} params | encoder {c['encoder_params']:,} | "
              f"decoder (heads + synthesis) {c['decoder_params']:,}")
        print(f"  per image: decoder {c['decoder_gmacs']:.2f} GMACs + lookup {c['lookup_gmacs']:.3f} GMACs = "
              f"{c['decoder_gmacs'] + c['lookup_gmacs']:.2f} GMACs (encoder {c['encoder_gmacs']:.2f})")


def read_log(run, name="log.csv", columns=LOG_COLUMNS):
    """run folder -> columns of its log (BRIGHT's: iteration, loss, psnr, seconds)"""
    path = os.path.join(run, name)
    if not os.path.isfile(path):
        fail(f"{path!r} not found")
    rows = []
    for line in open(path, errors="replace").read().split()[1:]:
        try:  # a line cut short, edited by hand, or a diverged step (inf, nan): left out of the curves
            r = [float(v) for v in line.split(",")]
        except ValueError:
            continue
        if len(r) == len(columns) and all(map(math.isfinite, r)):
            rows.append(r)
    return {k: [r[i] for r in rows] for i, k in enumerate(columns)}


def plot_curves(series, path, xlabel, ylabel, size=(720, 420)):
    """series {name: (xs, ys)} -> a line chart PNG, drawn with pillow"""
    from PIL import ImageDraw
    W, H = size
    l, r, t, b = 60, 20, 20, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1]]
    x0, x1, y0, y1 = min(xs), max(xs), math.floor(min(ys)), math.ceil(max(ys))
    X = lambda x: l + (x - x0) / max(x1 - x0, 1e-9) * (W - l - r)
    Y = lambda y: H - b - (y - y0) / max(y1 - y0, 1e-9) * (H - t - b)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for i in range(6):
        yv, xv = y0 + (y1 - y0) * i / 5, x0 + (x1 - x0) * i / 5
        d.line([l, Y(yv), W - r, Y(yv)], fill=(225, 225, 225))
        d.text((l - 8, Y(yv)), f"{yv:.1f}", fill="black", anchor="rm")
        xl = f"{xv:.0f}"  # iterations are whole: each label where its number is, once (a short run)
        if i == 0 or xl != f"{x0 + (x1 - x0) * (i - 1) / 5:.0f}":
            d.text((X(float(xl)), H - b + 8), xl, fill="black", anchor="mt")
    d.text(((l + W - r) / 2, H - 18), xlabel, fill="black", anchor="mm")
    d.text((8, t), ylabel, fill="black", anchor="lt")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for i in range(len(colors), len(series)):  # more runs: hues a golden-ratio turn apart, none repeated
        colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i * 0.618034 % 1, 0.8, 0.75)))
    for i, (name, (sx, sy)) in enumerate(series.items()):
        d.line([(X(x), Y(y)) for x, y in zip(sx, sy)], fill=colors[i], width=2)
        d.text((l + 12, t + 10 + 16 * i), name, fill=colors[i], anchor="lt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)


def cmd_compare(args):
    """runs side by side: a markdown table, PSNR-vs-iteration curves, reconstructions"""
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    check_out_folder(args.out, files=("curves.png", "recon.png"))
    device = pick_device(args.device)
    check_backend(args.backend, device)
    args.runs = [os.path.normpath(run) for run in args.runs]  # u40/ is u40: one run, named once
    logs = [read_log(run) for run in args.runs]  # every run's files before the work
    for p in (os.path.join(run, "bright.pt") for run in args.runs):
        if not os.path.isfile(p):
            fail(f"{p!r} not found")
    rows, curves, recons = [], {}, []
    for i, (run, log) in enumerate(zip(args.runs, logs)):  # one model in memory at a time
        model, cfg, ckpt = load_checkpoint(os.path.join(run, "bright.pt"), device)
        check_backend(args.backend, device, cfg.grid)
        model.backend = args.backend
        if i == 0:  # every run on the same validation images: --data, or the first run's
            data = args.data or recorded(ckpt, "data", os.path.join(run, "bright.pt"), "--data") or DEFAULT_DATA
            _, val_x = load_dataset(data, cfg.image_size, train=False)
            x = to_float(val_x[:args.n])
        elif cfg.image_size != val_x.shape[-1]:
            fail(f"compare needs runs of one image size: {run} is {cfg.image_size}^2, "
                 f"{args.runs[0]} {val_x.shape[-1]}^2")
        p, s, z = evaluate(model, val_x, device)
        u = usage(model, z)
        u = (f"{u['table_usage']['overall']:.1%} of table entries" if "table_usage" in u else
             f"{u['codebook_usage']['used']:.1%} of codebook (perplexity {u['codebook_usage']['perplexity']:.0f})")
        n_code = model.tables.numel() if cfg.bottleneck == "hash" else model.quantizer.codebook.numel()
        n_net = sum(p.numel() for p in model.parameters()) - (n_code if cfg.bottleneck == "hash" else 0)
        bits = f"{cfg.z_channels} x 32 (float)" if cfg.bottleneck == "hash" else f"{math.log2(cfg.codebook_size):.0f}"
        rows.append(f"| {run} | {cfg.bottleneck} | {ckpt['step']} | {p.mean():.2f} | {s.mean():.4f} | {u} | "
                    f"{n_net:,} + {n_code:,} | {cfg.z_size}x{cfg.z_size}, {bits} bits each | "
                    f"{ckpt['seconds'] if 'seconds' in ckpt else (log['seconds'] or [math.nan])[-1]:.0f} |")
        k = max(1, len(log["psnr"]) // 40)  # training-batch PSNR, smoothed over ~1/40 of the run
        if log["psnr"]:  # (a log without rows: no curve)
            sm = np.convolve(log["psnr"], np.ones(k) / k, mode="valid")
            curves[f"{run} ({cfg.bottleneck})" + (f" #{i + 1}" if args.runs.index(run) < i else "")] = (
                log["iteration"][k - 1:], sm.tolist())
        with torch.no_grad():
            recons.append(model.decode(model.encode(x.to(device))).clamp(-1, 1).cpu())
    print("| run | bottleneck | iterations | PSNR (dB) | SSIM | usage | parameters (network + table/codebook) "
          "| code per image | training time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    wrote = [os.path.join(args.out, "recon.png")]
    save_grid((torch.cat([x] + recons) + 1) / 2, wrote[0], nrow=len(x))
    if curves:  # (no run logged a usable row: no chart)
        wrote.insert(0, os.path.join(args.out, "curves.png"))
        plot_curves(curves, wrote[0], "iteration", "training PSNR (dB)")
    print(f"wrote {' and '.join(wrote)} (recon.png rows: originals, then {', '.join(args.runs)})")


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=None, help=f"image folder (default: the checkpoint's own, else "
                        f"{BUILTIN_DATA} beside bright.py)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    common.add_argument("--backend", default="auto", choices=["auto", "torch", "reference", "triton"],
                        help="hash-grid lookup: triton on CUDA, torch on CPU by default")
    t = sub.add_parser("train", parents=[common], help="train BRIGHT (under torchrun: DDP)",
                       description="With --resume, a flag not given takes the checkpoint's value.")
    t.add_argument("--preset", default=None, choices=list(PRESETS))
    t.add_argument("--bottleneck", choices=["hash", "vq"], help="hash (BRIGHT, default) or vq (the baseline)")
    t.add_argument("--out", default=DEFAULT_OUT, help="folder for bright.pt, recon.png, log.csv (default: %(default)s)")
    t.add_argument("--max-iters", type=int, help="optimizer steps in all (default: the preset's, or the resumed run's)")
    t.add_argument("--batch-size", type=int, help="images per optimizer step, over all processes (default: the preset's)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1, or the resumed run's)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast on CUDA (the lookup stays float32)")
    t.add_argument("--compile", action="store_true", help="torch.compile the encoder, heads and decoder")
    t.add_argument("--l1-weight", type=float, help="L1 loss weight beside the MSE (default 0)")
    t.add_argument("--gan-weight", type=float, help="patch-GAN loss weight (default 0: off)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--set", action="append", help='other config fields as JSON, e.g. \'{"lr": 0.001}\' (repeatable)')
    t.add_argument("--log-every", type=int, default=25, help="steps between log lines (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue --out's bright.pt with its config (only --max-iters and --grad-accum may change) "
                        "and data (unless --data)")
    for name, fn, help_ in [("eval", cmd_eval, "PSNR/SSIM, key-code statistics, table or codebook usage"),
                            ("reconstruct", cmd_reconstruct, "PNG of validation images and reconstructions"),
                            ("encode", cmd_encode, "key codes of every image, for diffusion.py")]:
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("--ckpt", default=os.path.join(DEFAULT_OUT, "bright.pt"), help="BRIGHT checkpoint (default: %(default)s)")
        p.set_defaults(fn=fn)
        if name == "eval":
            p.add_argument("--json", action="store_true")
            p.add_argument("--quantize-bits", help="also evaluate with key codes quantized to b bits, e.g. 2,4,6,8")
            p.add_argument("--lpips", action="store_true", help="also LPIPS, if the lpips package is installed")
        if name == "reconstruct":
            p.add_argument("--out", help="PNG to write (default: reconstruct.png beside --ckpt)")
            p.add_argument("--n", type=int, default=32, help="validation images (default: %(default)s)")
        if name == "encode":
            p.add_argument("--out", help="key codes file to write (default: codes.pt beside --ckpt)")
    c = sub.add_parser("compare", parents=[common], help="runs side by side: table, curves, reconstructions")
    c.add_argument("runs", nargs="+", help="training output folders (each with bright.pt and log.csv)")
    c.add_argument("--out", default="compare", help="folder for curves.png and recon.png (default: %(default)s)")
    c.add_argument("--n", type=int, default=8, help="validation images shown (default: %(default)s)")
    i = sub.add_parser("info", help="parameters and GMACs of the presets")
    i.add_argument("--preset", default=None, choices=list(PRESETS))
    t.set_defaults(fn=train); i.set_defaults(fn=cmd_info); c.set_defaults(fn=cmd_compare)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    args.fn(args)


def cli(main):
    """the entry point of a script: Ctrl-C outside a training loop (which saves and stops on its
    own) ends the command with one line, not a traceback from wherever it was; an output folder
    it made and left empty (an error came first: a mistyped --data, say) is removed again"""
    # a file name that is not valid in the locale's encoding (Python holds it with surrogates)
    # prints escaped, as stderr already does, rather than stopping the command half-way
    if sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for d in MADE:  # deepest first; rmdir takes only an empty folder
            with contextlib.suppress(OSError):
                os.rmdir(d)


if __name__ == "__main__":
    cli(main)
