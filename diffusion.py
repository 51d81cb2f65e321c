"""
Latent diffusion over BRIGHT key codes: a DDPM whose data are the key codes z (C_z, H_z, W_z)
that a trained BRIGHT encoder gives the training images; samples are decoded back to images by
the BRIGHT decoder. One file: the schedule and samplers, building blocks, the config, the UNet,
the commands and the command line.

    python diffusion.py train [--bright-ckpt out/bright.pt] [--data DIR | --codes codes.pt] [--out out]
    python diffusion.py sample [--ckpt out/ddpm.pt] [--n 64] [--steps 50] [--sampler ddim|ddpm]
    python diffusion.py neighbors [--ckpt out/ddpm.pt] [--n 16]

Equation numbers: DDPM = Ho, Jain & Abbeel 2020 (arXiv 2006.11239); DDIM = Song, Meng & Ermon
2021 (arXiv 2010.02502); the cosine schedule is Nichol & Dhariwal 2021 (arXiv 2102.09672);
min-SNR-gamma weighting is Hang et al. 2023 (arXiv 2303.09556).
"""
import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bright import (DEFAULT_DATA, DEFAULT_OUT, atomic_save, autocast, catch_stop, check_diverged, check_fields,
                    check_image_out, check_out_folder, check_out_not_data, check_overwrite, check_run_flags, cli,
                    config_from, data_record, from_record, ddp_wrap, ema_update, encode_images, fail, fingerprint,
                    load_checkpoint, load_dataset, load_weights, open_log, out_beside, parse_set, peak_memory,
                    pick_device, preset_config, read_checkpoint, recorded, require_key_codes, resume_config, save_grid,
                    setup_distributed, step_seed, step_stats, sync_grads)

DEFAULT_BRIGHT = os.path.join(DEFAULT_OUT, "bright.pt")
LOG_COLUMNS = ("iteration", "loss", "seconds")  # ddpm_log.csv, beside ddpm.pt (and BRIGHT's log.csv)


# ----------------------------------------------------------------------------- schedule and samplers

def cosine_alpha_bar(T, s=0.008):
    """-> alpha_bar (T+1,) float64 with alpha_bar[0] = 1, so that index t is the paper's t = 1..T.
    Nichol & Dhariwal eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2);
    and, as the text after it says, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped to 0.999
    (else beta_T = 1), alpha_bar rebuilt."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - beta, 0)])


class Diffusion:
    """The fixed part: the schedule and the processes built on it. A plain object, not an
    nn.Module, so its constants are neither EMA-averaged nor saved: they follow from T."""

    def __init__(self, T=1000, device="cpu"):
        self.T = T
        a = self.abar64 = cosine_alpha_bar(T)                   # (T+1,) float64, for the samplers
        # float32 tables for training batches, computed in float64: 1 - abar_1 ~ 4e-5 would keep
        # only ~3 digits if taken in float32
        self.sqrt_a, self.sqrt_1ma = a.sqrt().float().to(device), (1 - a).sqrt().float().to(device)
        self.snr = (a / (1 - a)).float().to(device)            # signal-to-noise ratio (inf at t = 0)

    def q_sample(self, x0, t, eps):
        """DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.  x0, eps (B, C, H, W), t (B,)"""
        return self.sqrt_a[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1ma[t].view(-1, 1, 1, 1) * eps

    def loss(self, model, x0, gamma=5.0, t=None, eps=None):
        """DDPM eq. 14, the 'simple' loss (t ~ U{1..T}, eps ~ N(0, I), MSE of the predicted eps),
        each sample weighted by min-SNR-gamma: w_t = min(SNR_t, gamma) / SNR_t. It caps the weight
        of the nearly clean, easy steps, which would otherwise dominate the gradient."""
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        err = (model(self.q_sample(x0, t, eps), t) - eps).square().mean((1, 2, 3))  # (B,)
        return (self.snr[t].clamp(max=gamma) / self.snr[t] * err).mean()

    def predict(self, model, x, t):
        """-> (x0_hat clipped to [-1, 1], the predicted eps). x0_hat is eq. 4 solved for x_0 (DDIM
        eq. 9). eps stays the model's: recomputing it from the clipped x0_hat would carry what the
        clipping removed into x_s, and early, noisy steps would then push samples to the bounds
        (measured in BENCHMARKS.md, "DDIM and clipping")."""
        a = self.abar64[t].item()
        eps = model(x, torch.full((len(x),), t, device=x.device))
        return ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1), eps

    @torch.no_grad()
    def ddpm_sample(self, model, shape, device, generator=None):
        """Ancestral sampling over all T steps (DDPM Algorithm 2) through the posterior
        q(x_{t-1} | x_t, x0_hat) of eq. 6-7, so that x0_hat can be clipped:
        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; no noise on the last step.
        The mean takes the clipped x0_hat, as DDPM's own code does, so it is not ddim_sample at
        eta = 1 and steps = T (which keeps the model's eps) once the clipping acts; unclipped, the
        two are the same sampler."""
        x = torch.randn(shape, device=device, generator=generator)         # x_T ~ N(0, I)
        for t in range(self.T, 0, -1):
            a, a_prev = self.abar64[t].item(), self.abar64[t - 1].item()
            beta = 1 - a / a_prev
            x0, _ = self.predict(model, x, t)
            x = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
            if t > 1:
                x = x + math.sqrt((1 - a_prev) / (1 - a) * beta) * torch.randn(shape, device=device, generator=generator)
        return x

    def ddim_timesteps(self, steps):
        """`steps` timesteps from T down to 1, evenly spaced: both ends included, so sampling
        starts from pure noise at t = T and its last step lands on x_0"""
        if not 1 <= steps <= self.T:
            fail(f"--steps must be in 1..{self.T}, got {steps}")
        return torch.linspace(self.T, 1, steps).round().long().unique_consecutive().tolist()

    @staticmethod
    def ddim_sigma(a, a_s, eta):
        """DDIM eq. 16: the noise of a step from abar_t = a to abar_s = a_s; at eta = 1 and s = t - 1
        it is DDPM's posterior standard deviation sqrt(beta~_t)"""
        return eta * math.sqrt((1 - a_s) / (1 - a) * (1 - a / a_s))

    @torch.no_grad()
    def ddim_sample(self, model, shape, device, steps=50, eta=0.0, generator=None):
        """DDIM eq. 12 from t to the next timestep s of the sub-sequence (s = 0 last):
        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z, and eq. 16:
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
        eta = 0: deterministic given x_T; eta = 1: as much noise as DDPM's ancestral step."""
        x = torch.randn(shape, device=device, generator=generator)
        ts = self.ddim_timesteps(steps)
        for t, s in zip(ts, ts[1:] + [0]):
            a, a_s = self.abar64[t].item(), self.abar64[s].item()
            x0, eps = self.predict(model, x, t)
            sigma = self.ddim_sigma(a, a_s, eta)
            x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(shape, device=device, generator=generator)
        return x


# ----------------------------------------------------------------------------- building blocks

def norm(c):
    """GroupNorm: 32 groups from width 128 up as in DDPM, but at least 4 channels a group (32
    groups at width 32 would normalise every channel on its own)"""
    g = min(32, c // 4)
    return nn.GroupNorm(g if g and c % g == 0 else 1, c)


def timestep_embedding(t, dim):
    """t (B,) -> (B, dim): the Transformer's sinusoidal position encoding, used for t by DDPM"""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]                                 # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], 1)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; the output projection starts
    at zero so that a fresh block is the identity"""

    def __init__(self, c, head_dim=32):
        super().__init__()
        self.heads = max(h for h in range(1, max(1, c // head_dim) + 1) if c % h == 0)  # heads split c evenly
        self.norm, self.qkv, self.out = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight); nn.init.zeros_(self.out.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                           # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)                         # (B, heads, HW, C/heads)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    """DDPM's residual block: GroupNorm, SiLU, 3x3 conv, + the projected time embedding,
    GroupNorm, SiLU, dropout, 3x3 conv (zero-init), then self-attention where asked"""

    def __init__(self, cin, cout, tdim, dropout=0.0, attn=False):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight); nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attn else nn.Identity()

    def forward(self, x, temb):                                             # x (B, cin, H, W), temb (B, tdim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)                                  # (B, cout, H, W)


def downsample(c):
    return nn.Conv2d(c, c, 3, stride=2, padding=1)


def upsample(c):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))


# ----------------------------------------------------------------------------- config

@dataclass
class DiffusionConfig:
    z_channels: int = 4            # C_z and H_z = W_z of the key codes (train sets them from the codes)
    z_size: int = 16
    width: int = 32                # UNet channels at the first resolution
    mults: tuple = (1, 2, 2)       # channels = width * mult per resolution, each half the last
    num_res_blocks: int = 1        # per resolution on the way down (one more on the way up)
    attn_lowest: int = 1           # self-attention at this many of the lowest resolutions
    dropout: float = 0.0
    timesteps: int = 1000          # T
    min_snr_gamma: float = 5.0
    # training
    batch_size: int = 32           # the global batch of one optimizer step
    grad_accum: int = 1
    lr: float = 1e-3               # linear warm-up, then cosine decay to lr / 10 at max_iters
    warmup: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_iters: int = 6000
    save_every: int = 1000
    seed: int = 0

    def __post_init__(self):
        check_fields(self, positive="z_channels z_size width num_res_blocks timesteps min_snr_gamma batch_size "
                                    "grad_accum lr grad_clip save_every",
                     non_negative="warmup max_iters", fraction="dropout ema_decay")
        self.mults = tuple(self.mults)
        if not self.mults:  # (check_fields checks the entries)
            raise ValueError("mults must list at least one resolution, got []")
        if self.z_size % 2 ** (len(self.mults) - 1):
            raise ValueError(f"key codes of size {self.z_size} cannot be halved {len(self.mults) - 1} times "
                             f"(UNet mults {self.mults}): H_z must be a multiple of {2 ** (len(self.mults) - 1)}")
        if not 0 <= self.attn_lowest <= len(self.mults):
            raise ValueError(f"attn_lowest must be in 0..{len(self.mults)}")
        if not 0 <= self.seed < 2 ** 31:
            raise ValueError("seed must be in 0..2^31-1")
        if self.width < 2 or self.width % 2:
            raise ValueError(f"width must be even (the sinusoidal time embedding), got {self.width}")
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")


PRESETS = {
    # 16x16x4 key codes of the shapes data (BRIGHT's tiny preset), on 2 CPU cores in ~10 minutes:
    # width 32 over three resolutions (16, 8, 4), attention at 4x4
    "tiny": {},
    # BRIGHT's diffusion model, for 16x16x16 key codes on a GPU (or church256's 64x64x4: train
    # takes C_z and H_z from the codes): width 128, mults (1, 2, 2, 4), attention at the two
    # lowest resolutions, lr 1e-4
    "bright16": dict(z_channels=16, z_size=16, width=128, mults=(1, 2, 2, 4), num_res_blocks=2, attn_lowest=2,
                     dropout=0.1, batch_size=128, lr=1e-4, warmup=1000, ema_decay=0.9999, max_iters=300_000,
                     save_every=5000),
}


def make_config(preset="tiny", **overrides):
    return preset_config(DiffusionConfig, PRESETS, preset, overrides)


# ----------------------------------------------------------------------------- the model

class UNet(nn.Module):
    """eps_theta(x_t, t): noisy codes (B, C_z, H_z, W_z) and t (B,) in 1..T -> predicted noise,
    same shape. The DDPM UNet: the resolution halves len(mults) - 1 times; every activation on
    the way down is concatenated back in on the way up."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        w, L, tdim = cfg.width, len(cfg.mults), 4 * cfg.width
        attn = lambda level: level >= L - cfg.attn_lowest
        self.width = w
        self.time = nn.Sequential(nn.Linear(w, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(cfg.z_channels, w, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [w], w
        for i, m in enumerate(cfg.mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(c, w * m, tdim, cfg.dropout, attn(i)))
                c = w * m
                skips.append(c)
            if i < L - 1:
                self.down.append(downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, tdim, cfg.dropout, attn=True), ResBlock(c, c, tdim, cfg.dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w * m, tdim, cfg.dropout, attn(i)))
                c = w * m
            if i > 0:
                self.up.append(upsample(c))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight); nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.width))                 # (B, 4 width)
        h = self.inp(x)                                                     # (B, width, H_z, W_z)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:                                              # (B, width * mults[-1], H_z / 2^(L-1), ..)
            h = layer(h, temb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), temb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)                                                  # (B, C_z, H_z, W_z)


# ----------------------------------------------------------------------------- files

def check_codes(z, what, cfg=None):
    """z must be key codes (N, C_z, H_z, H_z) in [0, 1], N > 0, of the shape the UNet was built for"""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        fail(f"{what}: expected key codes (N, C_z, H_z, W_z), got {getattr(z, 'shape', type(z).__name__)}")
    if len(z) == 0:
        fail(f"{what} holds no key codes")
    if z.shape[2] != z.shape[3]:
        fail(f"{what}: key codes must be square, got {z.shape[2]}x{z.shape[3]}")
    if z.isnan().any() or z.min() < 0 or z.max() > 1:
        fail(f"{what}: key codes must lie in [0, 1], got [{z.min():.3g}, {z.max():.3g}]")
    if cfg and tuple(z.shape[1:]) != (cfg.z_channels, cfg.z_size, cfg.z_size):
        fail(f"{what}: key codes are {tuple(z.shape[1:])} (C_z, H_z, W_z) but the diffusion model "
             f"expects {(cfg.z_channels, cfg.z_size, cfg.z_size)}")


def load_bright(path, device, cfg=None):
    """-> (BRIGHT autoencoder with its EMA weights, its Config, raw checkpoint); checked against cfg"""
    model, bcfg, bckpt = load_checkpoint(path, device)
    require_key_codes(bcfg.bottleneck, path)
    if cfg and (bcfg.z_channels, bcfg.z_size) != (cfg.z_channels, cfg.z_size):
        fail(f"{path!r} makes {bcfg.z_channels}x{bcfg.z_size}x{bcfg.z_size} key codes, but the diffusion model "
             f"was trained on {cfg.z_channels}x{cfg.z_size}x{cfg.z_size}")
    return model, bcfg, bckpt


def load_ddpm(path, device):
    """-> (the EMA UNet in eval mode, its config, the raw checkpoint)"""
    ckpt = read_checkpoint(path, "ddpm", "train one first: python diffusion.py train")
    cfg = config_from(DiffusionConfig, ckpt, path)
    model = UNet(cfg)
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


@torch.no_grad()
def decode_all(bright, codes, device, bs=64):
    """key codes in [0, 1] -> images (N, 3, H, W) in [0, 1], by the decoder, without key-code noise"""
    return torch.cat([(bright.decode(codes[i:i + bs].to(device)).clamp(-1, 1).cpu() + 1) / 2
                      for i in range(0, len(codes), bs)])


# ----------------------------------------------------------------------------- commands

def learning_rate(cfg, step):
    """linear warm-up over cfg.warmup steps, then cosine decay from cfg.lr to cfg.lr / 10 at
    max_iters (the smaller of the two)"""
    return cfg.lr * min((step + 1) / max(cfg.warmup, 1), 0.55 + 0.45 * math.cos(math.pi * step / cfg.max_iters))


def train(args, on_step=None):
    """Single process, or DDP under torchrun, as bright.train: each step's batch, t and noise
    are drawn from the step's seed on every rank and rank r trains on its share, so any world
    size and --grad-accum give the same steps (with dropout, those of the same number of
    micro-batch slots, processes x --grad-accum: each slot has its own mask seed).
    on_step(step, model, loss) after every step."""
    rank, world, device = setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.data and args.codes:
        fail("pass --data or --codes, not both")
    amp = autocast(device, args.dtype)  # here: refuses bfloat16 on the CPU before any encoding
    path = os.path.join(args.out, "ddpm.pt")
    ckpt = read_checkpoint(path, "ddpm", "nothing to resume") if args.resume else None
    if not ckpt and os.path.exists(path):
        fail(f"{path} exists: pass --resume to continue it, or --out DIR for a new run")
    check_out_folder(args.out, files=("ddpm_log.csv",))
    flags = dict(max_iters=args.max_iters, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                 seed=args.seed)
    asked = {**parse_set(args.set), **{k: v for k, v in flags.items() if v is not None}}  # flags win over --set
    if ckpt:  # its config first: a flag it refuses costs no encoding of a whole dataset
        stored = config_from(DiffusionConfig, ckpt, path)
        cfg = resume_config(DiffusionConfig, ckpt, path, asked, args.preset and make_config(
            args.preset, **{**asked, "z_channels": stored.z_channels, "z_size": stored.z_size}))
        check_run_flags(args, ckpt["step"], cfg.max_iters, path)
    # 1. the key codes of the training images, from a codes file or encoded here; a resumed run
    # takes its checkpoint's codes file unless told otherwise, and checks the codes are the same
    codes_path = args.codes or (recorded(ckpt, "codes", path, "--codes, or --data and --bright-ckpt")
                                if not (args.data or args.bright_ckpt) else None)
    if codes_path:
        d = read_checkpoint(codes_path, "bright-codes", "write one with: python bright.py encode")
        codes, bright_cfg, data = d.get("codes"), d.get("config"), from_record(d.get("data"))  # data: their images
        bright_path, bright_fp = d.get("bright_ckpt"), d.get("bright_fingerprint")
        check_codes(codes, codes_path)
        if args.bright_ckpt:  # it will decode these codes at sampling time: the model that made them
            b = read_checkpoint(args.bright_ckpt, "bright")
            require_key_codes(b["config"].get("bottleneck"), args.bright_ckpt)
            fp = fingerprint(b["ema"])
            if bright_fp not in (None, fp):
                fail(f"{codes_path} holds key codes of another BRIGHT model than {args.bright_ckpt}")
            bright_path, bright_cfg, bright_fp = args.bright_ckpt, b["config"], fp
    else:
        bright_path = args.bright_ckpt or (recorded(ckpt, "bright_ckpt", path, "--bright-ckpt") if ckpt
                                           else DEFAULT_BRIGHT)
        bright, bcfg, bckpt = load_bright(bright_path, device, cfg if ckpt else None)
    # the codes (or the model that will make them) fix C_z and H_z: asking for others is a
    # mistake, and a new run's config is checked here, before a whole dataset is encoded
    C, H = codes.shape[1:3] if codes_path else (bcfg.z_channels, bcfg.z_size)
    for k, v in (("z_channels", C), ("z_size", H)):
        if asked.get(k, v) != v:
            fail(f"--set {k} {asked[k]}: the key codes have {k} {v} ({C}x{H}x{H})")
    if not ckpt:
        cfg = make_config(args.preset or "tiny", **{**asked, "z_channels": C, "z_size": H})
        check_run_flags(args, 0, cfg.max_iters, path)
        tiny = DiffusionConfig.z_channels * DiffusionConfig.z_size ** 2  # the tiny preset is the defaults
        if not args.preset and C * H * H > tiny:  # ffhq256's, church256's key codes
            say(f"note: no --preset, so the tiny UNet (width {cfg.width}) for these {C}x{H}x{H} key codes; "
                "--preset bright16 is the paper's")
    if cfg.batch_size % (world * cfg.grad_accum):
        fail(f"batch size {cfg.batch_size} must be a multiple of processes ({world}) x grad-accum ({cfg.grad_accum})")
    if not codes_path:
        data = (args.data or recorded(ckpt, "data", path, "--data")
                or recorded(bckpt, "data", bright_path, "--data") or DEFAULT_DATA)
        check_out_not_data(args.out, data)
        images, _ = load_dataset(data, bcfg.image_size)
        t0 = time.time()
        codes, bright_cfg, bright_fp = encode_images(bright, images, device), bckpt["config"], fingerprint(bckpt["ema"])
        say(f"encoded {len(images)} training images of {data} with {bright_path} in {time.time() - t0:.1f} s")
        del bright, images
    N = len(codes)
    if ckpt:
        check_codes(codes, "the training codes", cfg)
        if None not in (ckpt.get("bright_fingerprint"), bright_fp) and ckpt["bright_fingerprint"] != bright_fp:
            fail(f"{path} was trained on the key codes of another BRIGHT model than {bright_path}")
        bright_fp = bright_fp or ckpt.get("bright_fingerprint")  # a codes file without one: the run's stays
        # the same images encoded by the same weights again differ by float rounding (~1e-6, on
        # other hardware or thread counts); other images by ~0.1
        probe = ckpt.get("codes_probe")
        if probe is not None and (N != ckpt["codes_count"]
                                  or not torch.allclose(codes[:len(probe)].float(), probe.float(), atol=1e-3)):
            fail(f"the training key codes ({codes_path or data}) are not those {path} was trained on; "
                 f"resume with the same --codes, or --data and --bright-ckpt")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    say(f"key codes: {N} x {C}x{H}x{H}, mean {codes.mean():.3f}, std {codes.std():.3f}")
    # [0, 1] -> [-1, 1], the data range DDPM assumes. No scale factor, unlike latent diffusion on
    # a KL autoencoder's unbounded latents: the sigmoid already bounds the key codes.
    x_all = (codes.float() * 2 - 1).to(device)  # (N, C_z, H_z, W_z), float32 whatever the file holds

    # 2. the UNet, its EMA copy and the optimiser; the schedule stays outside them (Diffusion)
    torch.manual_seed(cfg.seed)
    diffusion = Diffusion(cfg.timesteps, device)
    model = UNet(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    if ckpt:
        load_weights(model, ckpt["model"], path); load_weights(ema, ckpt["ema"], path)
        opt.load_state_dict(ckpt["optimizer"]); step = ckpt["step"]
        say(f"resuming {path} at step {step}")
    say(f"UNet: {sum(p.numel() for p in model.parameters()):,} parameters, width {cfg.width}, "
        f"mults {cfg.mults}, device {device}, {world} process(es) x {cfg.grad_accum} micro-batch(es) "
        f"of {micro}, {args.dtype}")
    if args.compile:
        model.compile()
    ddp = ddp_wrap(model, device, world)

    def save():
        atomic_save({"kind": "ddpm", "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "seconds": time.time() - t0, "config": asdict(cfg),
                     "bright_ckpt": bright_path and os.path.abspath(bright_path), "bright_config": bright_cfg,
                     "bright_fingerprint": bright_fp, "data": data and data_record(data),
                     "codes": codes_path and os.path.abspath(codes_path), "codes_count": N,
                     "codes_probe": codes[:8].clone()}, path)

    stop, restore = catch_stop()
    log = open_log(os.path.join(args.out, "ddpm_log.csv"), step, LOG_COLUMNS) if rank == 0 else None
    t_last = time.time()
    t0 = t_last - (ckpt or {}).get("seconds", 0)  # training time so far, across resumes
    s_last, losses = step, []
    model.train()
    shares = torch.arange(cfg.batch_size).view(world, cfg.grad_accum, micro)[rank]  # (accum, micro) of this rank
    while step < cfg.max_iters:
        torch.manual_seed(step_seed(cfg.seed, step))  # batch, t and noise depend on the step alone: exact resume
        # no flips: the encoder is not flip-equivariant, a flipped code is not the flipped image's code
        idx = torch.randint(N, (cfg.batch_size,))
        t = torch.randint(1, cfg.timesteps + 1, (cfg.batch_size,))          # DDPM Algorithm 1: t ~ U{1..T}
        eps = torch.randn(cfg.batch_size, C, H, H)                           # eps ~ N(0, I)
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, step)
        # dropout masks: one seed per micro-batch slot of the step (rank x micro-batch), drawn alike
        # on every rank, so that the ranks' masks are independent and a resumed run redraws them
        mask_seeds = torch.randint(2 ** 62, (world, cfg.grad_accum))[rank]
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(1, device=device)
        for k, sel in enumerate(shares):
            torch.manual_seed(int(mask_seeds[k]))
            with sync_grads(ddp, last=k == cfg.grad_accum - 1):
                with amp:
                    l = diffusion.loss(ddp, x_all[idx[sel].to(device)], cfg.min_snr_gamma,  # (micro, C_z, H_z, W_z)
                                       t[sel].to(device), eps[sel].to(device))
                (l / cfg.grad_accum).backward()
            loss += l.detach().float() / cfg.grad_accum
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # EMA with a warm-up: early on the average forgets the random initialisation quickly
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        loss_v, stopping = step_stats(loss, stop, world)
        saving = step % cfg.save_every == 0 or step == cfg.max_iters or stopping
        check_diverged(step, loss_v, path, restore, [model] if saving else [])
        losses.append(loss_v)
        if on_step:
            on_step(step, model, loss_v)
        if step % args.log_every == 0 or step == cfg.max_iters or stopping:
            now, mean = time.time(), sum(losses) / len(losses)  # the loss is noisy: its mean since the last line
            its = (step - s_last) / max(now - t_last, 1e-9)
            say(f"iter {step:6d}/{cfg.max_iters} | loss {mean:.4f} | {its:6.2f} it/s | "
                f"eta {(cfg.max_iters - step) / max(its, 1e-9) / 60:5.1f} min{peak_memory(device)}", flush=True)
            if log:
                log.write(f"{step},{mean:.6f},{now - t0:.1f}\n"); log.flush()
            t_last, s_last, losses = now, step, []
        if rank == 0 and saving:
            save()
        if stopping:
            break
    if log:
        log.close()
    restore()
    done = step == cfg.max_iters
    say(f"{'done' if done else 'interrupted'}: step {step}, {time.time() - t0:.0f} s of training in all; "
        f"saved {path}{'' if done else '; --resume continues'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not done:  # exit status 130, as for Ctrl-C
        sys.exit(130)
    return model



def ddim_steps(cfg, steps=None):
    """DDIM's number of steps: 50 unless asked, and never more than the model's T"""
    return min(50, cfg.timesteps) if steps is None else steps


def generate(model, cfg, n, device, sampler="ddim", steps=None, eta=0.0, seed=0, bs=256):
    """-> n key codes (n, C_z, H_z, W_z) in [0, 1], sampled in batches of bs"""
    diffusion, g, out = Diffusion(cfg.timesteps, device), torch.Generator(device).manual_seed(seed), []
    steps = ddim_steps(cfg, steps)
    for i in range(0, n, bs):
        shape = (min(bs, n - i), cfg.z_channels, cfg.z_size, cfg.z_size)
        x = (diffusion.ddpm_sample(model, shape, device, g) if sampler == "ddpm"
             else diffusion.ddim_sample(model, shape, device, steps, eta, g))
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())                       # [-1, 1] -> key codes in [0, 1]
    return torch.cat(out)


def load_for_sampling(args):
    device = pick_device(args.device)
    model, cfg, ckpt = load_ddpm(args.ckpt, device)
    if args.steps is not None and not 1 <= args.steps <= cfg.timesteps:  # before the work, not at its end
        fail(f"--steps must be in 1..{cfg.timesteps} (the model's T), got {args.steps}")
    path = args.bright_ckpt or recorded(ckpt, "bright_ckpt", args.ckpt, "--bright-ckpt")
    if not path:
        fail(f"{args.ckpt!r} does not say which BRIGHT checkpoint decodes its key codes: pass --bright-ckpt")
    bright, _, bckpt = load_bright(path, device, cfg)
    old, new = ckpt.get("bright_config") or {}, bckpt["config"]
    # fields that bright.py added since are no change, nor those a resumed run may change
    if any(new[k] != v for k, v in old.items() if k in new and k not in ("max_iters", "grad_accum")):
        print(f"warning: {path} has another config than the BRIGHT model the diffusion model was trained for")
    elif ckpt.get("bright_fingerprint") not in (None, fingerprint(bckpt["ema"])):
        print(f"warning: {path} has other weights than the BRIGHT model whose key codes {args.ckpt} was trained "
              f"on (retrained?); its samples may not decode as they should")
    return device, model, cfg, ckpt, bright, bckpt


def check_sampler_flags(args):
    """--steps and --eta belong to DDIM; DDPM's ancestral sampler always takes all T steps"""
    if getattr(args, "sampler", "ddim") == "ddpm":
        if args.steps is not None or args.eta is not None:
            fail("--steps and --eta are DDIM's: --sampler ddpm takes all T steps with its own noise")
    else:  # --steps: checked against the model's T once it is loaded (load_for_sampling)
        args.eta = 0.0 if getattr(args, "eta", None) is None else args.eta
        if not 0 <= args.eta <= 1:
            fail(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: as much noise as DDPM), got {args.eta}")
    if not 0 <= args.seed < 2 ** 32:  # torch's CPU generator reads a seed's low 32 bits: 2^32 would be 0
        fail(f"--seed must be in 0..2^32-1, got {args.seed}")


def cmd_sample(args):
    if args.n < 1:
        fail("--n must be at least 1")
    args.out = out_beside(args, "samples.png")
    check_image_out(args.out)
    if args.save_codes:
        check_overwrite(os.path.splitext(args.out)[0] + ".pt", "ddpm-samples")
    check_sampler_flags(args)
    device, model, cfg, ckpt, bright, _ = load_for_sampling(args)
    t0 = time.time()
    codes = generate(model, cfg, args.n, device, args.sampler, args.steps, args.eta, args.seed)
    t1 = time.time()
    save_grid(decode_all(bright, codes, device), args.out, nrow=math.ceil(math.sqrt(args.n)))
    how = (f"DDPM, {cfg.timesteps} steps" if args.sampler == "ddpm"
           else f"DDIM, {ddim_steps(cfg, args.steps)} steps, eta {args.eta}")
    print(f"sampled {args.n} key codes ({how}) in {t1 - t0:.1f} s, decoded in {time.time() - t1:.1f} s; wrote {args.out}")
    if args.save_codes:
        p = os.path.splitext(args.out)[0] + ".pt"
        atomic_save({"kind": "ddpm-samples", "codes": codes, "ddpm_ckpt": os.path.abspath(args.ckpt)}, p)
        print(f"wrote {p}: key codes {tuple(codes.shape)} in [0, 1]")


def nearest(queries, bank, k, as_float, chunk=1024):
    """queries (Q, D), bank (N, ...) -> RMS distances (Q, k) and indices (Q, k) of the k nearest
    bank rows; as_float turns one chunk of the bank into floats, so a large uint8 image set never
    sits in memory as floats (only the (Q, N) distances do)"""
    d = torch.cat([torch.cdist(queries, as_float(bank[i:i + chunk]).flatten(1))
                   for i in range(0, len(bank), chunk)], 1)                 # (Q, N)
    d, idx = d.topk(min(k, d.shape[1]), 1, largest=False)
    return d / math.sqrt(queries.shape[1]), idx


def cmd_neighbors(args):
    for flag in ("n", "k", "n_stats"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    check_sampler_flags(args)
    args.out = out_beside(args, "neighbors.png")
    check_image_out(args.out)
    device, model, cfg, ckpt, bright, bckpt = load_for_sampling(args)
    # the images whose key codes the DDPM learnt (or, for a codes file without the record, the
    # BRIGHT model's training images)
    data = (args.data or recorded(ckpt, "data", args.ckpt, "--data")
            or recorded(bckpt, "data", args.bright_ckpt or ckpt["bright_ckpt"], "--data") or DEFAULT_DATA)
    train_x, val_x = load_dataset(data, bright.cfg.image_size)
    args.k = min(args.k, len(train_x))  # a small training set: all of it, and the grid rows stay aligned
    t0, n = time.time(), max(args.n, args.n_stats)
    train_z = encode_images(bright, train_x, device)                        # (N, C_z, H_z, W_z)
    codes = generate(model, cfg, n, device, "ddim", args.steps, 0.0, args.seed)
    samples = decode_all(bright, codes, device)                             # (n, 3, H, W) in [0, 1]
    # held-out real images go through the autoencoder too, so that in pixels both sets carry the
    # decoder's own reconstruction error when compared with the (real) training images
    val_z = encode_images(bright, val_x[:args.n_stats], device)
    val_rec = decode_all(bright, val_z, device)
    pix = lambda u8: u8.float() / 255
    dz, iz = nearest(codes.flatten(1), train_z, args.k, lambda z: z)
    dp, ip = nearest(samples.flatten(1), train_x, args.k, pix)
    dz_val, _ = nearest(val_z.flatten(1), train_z, 1, lambda z: z)
    dp_val, _ = nearest(val_rec.flatten(1), train_x, 1, pix)
    # one row a sample: the sample, its k nearest training images by key code, a blank, its k by pixels
    blank = torch.ones_like(samples[:1])
    rows = [torch.cat([samples[r:r + 1], pix(train_x[iz[r]]), blank, pix(train_x[ip[r]])]) for r in range(args.n)]
    save_grid(torch.cat(rows), args.out, nrow=2 * args.k + 2)
    print(f"wrote {args.out}: {args.n} samples (first column), their {args.k} nearest of {len(train_x)} training "
          f"images by key-code distance, then by pixel distance ({time.time() - t0:.0f} s)")
    print(f"mean RMS distance to the nearest training image, {n} samples vs {len(val_z)} held-out images:")
    close = False
    for name, s, v in [("key codes", dz[:, 0].mean(), dz_val.mean()), ("pixels", dp[:, 0].mean(), dp_val.mean())]:
        print(f"  {name:9s}: samples {s:.4f} | held-out {v:.4f} | ratio {s / v:.2f}")
        close |= bool(s < 0.5 * v)
    print("samples sit much closer to the training set than held-out real images do (ratio < 0.5): a sign of "
          "memorisation" if close else "no sign of memorisation: samples are not much closer to the training set "
          "than held-out images")


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    common.add_argument("--bright-ckpt", help=f"BRIGHT checkpoint (train: the codes file's, the resumed run's, or "
                        f"{DEFAULT_BRIGHT}; sample, neighbors: the DDPM's own)")
    t = sub.add_parser("train", parents=[common], help="train the diffusion model on key codes",
                       description="With --resume, a flag not given takes the checkpoint's value.")
    t.add_argument("--data", help="image folder to encode (default: the resumed run's, else the one BRIGHT was "
                   "trained on)")
    t.add_argument("--codes", help="key codes written by: python bright.py encode")
    t.add_argument("--preset", choices=list(PRESETS), help="default: tiny")
    t.add_argument("--out", default=DEFAULT_OUT, help="folder for ddpm.pt and ddpm_log.csv (default: %(default)s)")
    for flag, typ in [("--max-iters", int), ("--batch-size", int), ("--grad-accum", int), ("--lr", float),
                      ("--seed", int)]:
        t.add_argument(flag, type=typ, help="default: the preset's, or the resumed run's")
    t.add_argument("--set", action="append",
                   help='other config fields as JSON, e.g. \'{"width": 48, "mults": [1, 2]}\' (repeatable)')
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast on CUDA")
    t.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    t.add_argument("--log-every", type=int, default=100, help="steps between log lines (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue --out's ddpm.pt with its config (only --max-iters and --grad-accum may change)")
    t.set_defaults(fn=train)
    s = sub.add_parser("sample", parents=[common], help="sample key codes, decode them, write a PNG grid")
    s.add_argument("--n", type=int, default=64, help="samples (default: %(default)s)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"],
                   help="ddim (default; --steps, --eta) or ddpm (ancestral, all T steps)")
    s.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default), 1 as much as DDPM's")
    s.add_argument("--out", help="PNG to write (default: samples.png beside --ckpt)")
    s.add_argument("--save-codes", action="store_true", help="also write the sampled key codes (.pt beside the PNG)")
    s.set_defaults(fn=cmd_sample)
    nb = sub.add_parser("neighbors", parents=[common], help="samples beside their nearest training images")
    nb.add_argument("--n", type=int, default=16, help="samples shown, one a row (default: %(default)s)")
    nb.add_argument("--k", type=int, default=4, help="neighbours shown for each distance (default: %(default)s)")
    nb.add_argument("--n-stats", type=int, default=128,
                    help="held-out images for the distance means, and samples (at least --n) (default: %(default)s)")
    nb.add_argument("--data", help="training images (default: those the model was trained on)")
    nb.add_argument("--out", help="PNG to write (default: neighbors.png beside --ckpt)")
    nb.set_defaults(fn=cmd_neighbors)
    for p in (s, nb):
        p.add_argument("--ckpt", default=os.path.join(DEFAULT_OUT, "ddpm.pt"), help="DDPM checkpoint (default: %(default)s)")
        p.add_argument("--steps", type=int, help="DDIM steps (default 50, or T if the model has fewer)")
        p.add_argument("--seed", type=int, default=0, help="of the starting noise (default: %(default)s)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    cli(main)
