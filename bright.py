"""
BRIGHT (arXiv 2305.18601): images -> sigmoid-bounded key codes -> groups of multi-resolution
hash grids -> decoder. One file: building blocks, the config, the model, data, training and
the command line.

    python bright.py train [--data DIR] [--preset tiny|ffhq256|church256] [--out out]
    python bright.py eval | reconstruct | encode [--ckpt out/bright.pt] [--data DIR]
    python bright.py info [--preset ffhq256]
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hashgrid_triton import GridSpec, clamp_coords, grid_lookup, level_corners

DEFAULT_DATA = "data/shapes"
DEFAULT_OUT = "out"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fail(msg):
    """One clear line for the user instead of a traceback."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------- building blocks

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


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    image_size: int = 64
    z_size: int = 8                 # key codes are (C_z, z_size, z_size)
    z_channels: int = 8             # C_z
    c_key: int = 1                  # C_key: key channels per group; groups N_h = C_z / C_key
    levels: int = 8                 # L
    features: int = 2               # F
    log2_table_size: int = 14       # T = 2^t entries per level at most
    min_res: int = 8
    max_res: int = 32
    feat_size: int = 16             # H_d = W_d of the feature map f
    c_d: int = 64                   # C_d channels of f
    head_hidden: int = 32           # hidden width of each group's MLP
    enc_widths: tuple = (16, 32, 64, 128)   # one per encoder resolution (len = downsamplings + 1)
    dec_widths: tuple = (64, 48, 32)  # one per decoder resolution, feat_size up to image_size
    style_dim: int = 64
    # training
    batch_size: int = 16
    lr: float = 2e-3                # the paper: Adam lr 2e-3, betas (0, 0.99), eps 1e-15
    ema_decay: float = 0.998
    l1_weight: float = 0.0
    gan_weight: float = 0.0         # > 0 adds a patch-GAN term (off by default)
    max_iters: int = 3000
    eval_every: int = 500
    seed: int = 0

    def __post_init__(self):
        self.enc_widths, self.dec_widths = tuple(self.enc_widths), tuple(self.dec_widths)
        groups = self.z_channels // self.c_key
        if self.z_channels % self.c_key or self.c_d % groups:
            raise ValueError("z_channels must be a multiple of c_key, c_d of the group count")
        if self.image_size != self.z_size * 2 ** (len(self.enc_widths) - 1):
            raise ValueError("image_size must be z_size * 2^(len(enc_widths) - 1)")
        if self.image_size != self.feat_size * 2 ** (len(self.dec_widths) - 1):
            raise ValueError("image_size must be feat_size * 2^(len(dec_widths) - 1)")
        if self.feat_size % self.z_size:
            raise ValueError("feat_size must be a multiple of z_size (nearest tiling)")

    @property
    def groups(self):
        return self.z_channels // self.c_key

    @property
    def grid(self):
        return GridSpec(self.c_key + 2, self.levels, self.features, self.log2_table_size,
                        self.min_res, self.max_res)

    @property
    def noise_sigma(self):
        return 1 / (4 * self.max_res)   # key-code noise: a quarter of the finest cell


PRESETS = {
    # fits a 2-core CPU: 64^2 shapes, key codes 8x8x8, 8 groups of 3-D grids
    "tiny": {},
    # the paper's FFHQ model: key codes 16x16x16, 16 groups, L=16, F=4, res 16->64, T=2^18
    "ffhq256": dict(image_size=256, z_size=16, z_channels=16, levels=16, features=4,
                    log2_table_size=18, min_res=16, max_res=64, feat_size=64, c_d=512,
                    head_hidden=64, enc_widths=(32, 64, 128, 256, 256),
                    dec_widths=(512, 256, 128), style_dim=512, ema_decay=0.999,
                    max_iters=400_000, eval_every=5000),
    # the paper's LSUN-Church model: key codes 64x64x4, 4 groups; tables = 18,630,272 params
    "church256": dict(image_size=256, z_size=64, z_channels=4, levels=16, features=4,
                      log2_table_size=18, min_res=16, max_res=64, feat_size=64, c_d=512,
                      head_hidden=128, enc_widths=(32, 64, 128), dec_widths=(512, 256, 128),
                      style_dim=512, ema_decay=0.999, max_iters=400_000, eval_every=5000),
}


def make_config(preset="tiny", **overrides):
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        fail(f"unknown config field(s): {', '.join(sorted(unknown))}")
    try:
        return Config(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as e:
        fail(f"inconsistent config: {e}")


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
        enc += [ResBlock(w[-1], w[-1]), norm(w[-1]), nn.LeakyReLU(0.2), nn.Conv2d(w[-1], cfg.z_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        # 2. groups of multi-resolution hash tables, U(-1e-4, 1e-4) as in Instant-NGP
        self.tables = nn.Parameter(torch.empty(G, self.spec.num_entries, cfg.features).uniform_(-1e-4, 1e-4))
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
        """images (B, 3, H, W) in [-1, 1] -> key codes (B, C_z, H_z, W_z) in (0, 1)"""
        return torch.sigmoid(self.encoder(x))

    def queries(self, z):
        """key codes (B, C_z, H_z, W_z) -> grid coordinates (N = B*H_d*W_d, G, C_key + 2):
        per pixel and group, (x, y, key slice) with the codes tiled (nearest) to H_d x W_d"""
        cfg, B = self.cfg, z.shape[0]
        H, G, K = cfg.feat_size, cfg.groups, cfg.c_key
        z = z.repeat_interleave(H // cfg.z_size, 2).repeat_interleave(H // cfg.z_size, 3)  # tile (B, C_z, H_d, W_d)
        key = z.permute(0, 2, 3, 1).reshape(B * H * H, G, K)                  # (N, G, C_key)
        xy = self.xy.reshape(1, H * H, 1, 2).expand(B, -1, G, -1).reshape(B * H * H, G, 2)
        return torch.cat([xy.to(key.dtype), key], -1).float()                 # (N, G, C_key + 2)

    def features(self, z):
        """key codes (B, C_z, H_z, W_z) -> feature map f (B, C_d, H_d, W_d)"""
        B, H = z.shape[0], self.cfg.feat_size
        feats = grid_lookup(self.queries(z), self.tables, self.spec, self.backend)  # (N, G, L*F)
        feats = feats.reshape(B, H, H, -1).permute(0, 3, 1, 2)                 # (B, G*L*F, H_d, W_d)
        return self.head(feats.to(z.dtype))

    def decode(self, z):
        """key codes in [0, 1] -> images (B, 3, H, W) in [-1, 1]"""
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

    def forward(self, x, noise=True):
        z = self.encode(x)
        if noise:  # key-code noise: keeps the decoder robust to small code errors
            z = (z + torch.randn_like(z) * self.cfg.noise_sigma).clamp(0, 1)
        return self.decode(z), z


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
    if not os.path.isdir(root):
        fail(f"data folder {root!r} does not exist")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        fail(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}) found under {root!r}")
    return paths


def read_image(path, size):
    """-> uint8 (3, size, size): RGB (alpha composited on white), centre-cropped, resized."""
    with Image.open(path) as im:
        im.load()
        if min(im.size) < size // 4:
            raise ValueError(f"too small ({im.size[0]}x{im.size[1]} for {size}x{size})")
        if "A" in im.getbands() or im.mode == "P":
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def read_images(paths, size, what):
    good, bad = [], []
    for p in paths:
        try:
            good.append(read_image(p, size))
        except Exception as e:  # a corrupt file among good ones is skipped, not fatal
            bad.append(f"{p} ({str(e).splitlines()[0][:80]})")
    if bad:
        print(f"warning: skipped {len(bad)} unusable {what} file(s), e.g. {bad[0]}", file=sys.stderr)
    if not good:
        fail(f"none of the {len(paths)} {what} files could be read as an image")
    return torch.stack(good)


def load_dataset(root, size):
    """-> (train, val) uint8 tensors (N, 3, size, size). Uses root/train and root/val when
    present; otherwise a deterministic split: ~5% of files (by a hash of the name) are held out."""
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train, val = list_images(os.path.join(root, "train")), list_images(os.path.join(root, "val"))
    else:
        paths = list_images(root)
        held = [zlib.crc32(os.path.relpath(p, root).encode()) % 20 == 0 for p in paths]
        if not any(held) or all(held):  # tiny folders: hold out the last image
            held = [i == len(paths) - 1 for i in range(len(paths))] if len(paths) > 1 else [False]
        train = [p for p, h in zip(paths, held) if not h]
        val = [p for p, h in zip(paths, held) if h] or train[-1:]
    return read_images(train, size, "training"), read_images(val, size, "validation")


def to_float(x):
    """uint8 images -> float in [-1, 1]"""
    return x.float() / 127.5 - 1


def prepare_shapes(root=DEFAULT_DATA):
    """python bright.py train with no --data: build the procedural shapes set if missing."""
    spec = importlib.util.spec_from_file_location("shapes_prepare", os.path.join(root, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not mod.is_prepared(root):
        print(f"preparing the shapes dataset in {root} (once)")
        mod.prepare(root)


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
    rows = [t for i in range(0, len(orig), nrow) for t in (orig[i:i + nrow], recon[i:i + nrow])]
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
    of these key codes, per level (over all groups) and overall. Dense levels count their
    (res+1)^D vertices, hashed levels their T entries (alignment padding is never used)."""
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
        n = (spec.resolutions[l] + 1) ** spec.dim if spec.dense[l] else spec.sizes[l]
        per_level.append((u[:, :n].sum().item(), G * n))
    return ([a / b for a, b in per_level], sum(a for a, _ in per_level) / sum(b for _, b in per_level))


# ----------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path):
    """temp file + rename: an interrupt never leaves a half-written checkpoint"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path, kind, hint="train one first"):
    """torch.load(weights_only=True) of a dict whose "kind" must be `kind`, or one error line"""
    if not os.path.isfile(path):
        fail(f"{path!r} not found ({hint})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path!r} is not a readable checkpoint ({str(e).splitlines()[0][:100]})")
    got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if got != kind:
        fail(f"{path!r} is not a {kind} file (kind: {got})")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """-> (model with the EMA weights, in eval mode; Config; the raw checkpoint dict)"""
    ckpt = read_checkpoint(path, "bright")
    cfg = Config(**ckpt["config"])
    model = BRIGHT(cfg)
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


# ----------------------------------------------------------------------------- commands

def batches(x, bs, device):
    for i in range(0, len(x), bs):
        yield to_float(x[i:i + bs]).to(device)


@torch.no_grad()
def evaluate(model, val, device, bs=32):
    """EMA model on validation images -> per-image PSNR, SSIM, and the key codes (no noise)"""
    p, s, codes = [], [], []
    for x in batches(val, bs, device):
        z = model.encode(x)
        y = model.decode(z).clamp(-1, 1)
        p.append(psnr(y, x)); s.append(ssim(y, x)); codes.append(z.cpu())
    return torch.cat(p), torch.cat(s), torch.cat(codes)


@torch.no_grad()
def encode_images(model, images, device, bs=64):
    """uint8 images (N, 3, H, W) -> key codes (N, C_z, H_z, W_z) in (0, 1) on the CPU; no
    key-code noise (it only regularises the decoder during training)"""
    return torch.cat([model.encode(x).cpu() for x in batches(images, bs, device)])


def train(args):
    device = pick_device(args.device)
    out = args.out
    path = os.path.join(out, "bright.pt")
    ckpt = None
    if args.resume:
        ckpt = read_checkpoint(path, "bright")
        cfg = Config(**{**ckpt["config"], **({"max_iters": args.max_iters} if args.max_iters else {})})
        if args.preset and make_config(args.preset).grid != cfg.grid:
            fail(f"{path} was trained with another config than --preset {args.preset}; drop --preset to resume it")
    else:
        if os.path.exists(path):
            fail(f"{path} exists: pass --resume to continue it, or --out DIR for a new run")
        try:
            extra = json.loads(args.set or "{}")
        except json.JSONDecodeError as e:
            fail(f"--set is not valid JSON ({e})")
        cfg = make_config(args.preset or "tiny", max_iters=args.max_iters, batch_size=args.batch_size,
                          **extra,
                          l1_weight=args.l1_weight, gan_weight=args.gan_weight, seed=args.seed)
    data = args.data or DEFAULT_DATA
    if args.data is None:
        prepare_shapes(DEFAULT_DATA)
    train_x, val_x = load_dataset(data, cfg.image_size)
    print(f"data: {len(train_x)} training, {len(val_x)} validation images from {data} at {cfg.image_size}^2")

    torch.manual_seed(cfg.seed)
    model = BRIGHT(cfg).to(device)
    model.backend = args.backend
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-15)
    disc = PatchDiscriminator().to(device) if cfg.gan_weight > 0 else None
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99)) if disc else None
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"]); ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]); step = ckpt["step"]
        if disc:
            disc.load_state_dict(ckpt["disc"]); d_opt.load_state_dict(ckpt["disc_optimizer"])
        print(f"resuming {path} at step {step}")
    n_tab = model.tables.numel()
    print(f"model: {sum(p.numel() for p in model.parameters()) - n_tab:,} network + {n_tab:,} table parameters, "
          f"{cfg.groups} groups x {cfg.levels} levels, device {device}, lookup backend {args.backend}")

    def save():
        atomic_save({"kind": "bright", "config": asdict(cfg), "step": step, "model": model.state_dict(),
                     "ema": ema.state_dict(), "optimizer": opt.state_dict(), "data": data,
                     **({"disc": disc.state_dict(), "disc_optimizer": d_opt.state_dict()} if disc else {})}, path)

    stop = []  # Ctrl-C finishes the current step, saves, and exits (a second one aborts)
    import signal
    old_handler = signal.signal(signal.SIGINT, lambda *a: (stop.append(1), signal.signal(signal.SIGINT, old_handler)))
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.csv"), "a")
    if log.tell() == 0:
        log.write("iteration,loss,psnr,seconds\n")
    t0 = t_last = time.time(); s_last = step
    model.train()
    while step < cfg.max_iters and not stop:
        torch.manual_seed(cfg.seed + step)  # batch and key-code noise depend on the step alone: exact resume
        x = to_float(train_x[torch.randint(len(train_x), (cfg.batch_size,))]).to(device)
        y, _ = model(x)
        loss = F.mse_loss(y, x) + cfg.l1_weight * (y - x).abs().mean()
        if disc:
            loss = loss + cfg.gan_weight * F.softplus(-disc(y)).mean()  # non-saturating GAN loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if disc:
            d_loss = F.softplus(disc(y.detach())).mean() + F.softplus(-disc(x)).mean()
            d_opt.zero_grad(set_to_none=True); d_loss.backward(); d_opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            now = time.time()
            its = (step - s_last) / max(now - t_last, 1e-9)
            p = psnr(y.detach(), x).mean().item()
            eta = (cfg.max_iters - step) / max(its, 1e-9)
            print(f"iter {step:6d}/{cfg.max_iters} | loss {loss.item():.5f} | psnr {p:5.2f} dB | "
                  f"{its:5.2f} it/s | eta {eta / 60:5.1f} min", flush=True)
            log.write(f"{step},{loss.item():.6f},{p:.3f},{now - t0:.1f}\n"); log.flush()
            t_last, s_last = now, step
        if step % cfg.eval_every == 0 or step == cfg.max_iters or stop:
            p, s, _ = evaluate(ema, val_x[:256], device)
            with torch.no_grad():
                xv = to_float(val_x[:16]).to(device)
                pairs_grid(xv, ema.decode(ema.encode(xv)).clamp(-1, 1), os.path.join(out, "recon.png"))
            save()
            print(f"step {step}: val psnr {p.mean():.2f} dB, ssim {s.mean():.4f} (EMA) | "
                  f"saved {path} and {os.path.join(out, 'recon.png')} | {time.time() - t0:.0f} s", flush=True)
    log.close()
    signal.signal(signal.SIGINT, old_handler)
    if stop:
        print(f"interrupted at step {step}; checkpoint saved, --resume continues")


def load_for_command(args):
    device = pick_device(args.device)
    model, cfg, ckpt = load_checkpoint(args.ckpt, device)
    model.backend = args.backend
    data = args.data or ckpt.get("data") or DEFAULT_DATA
    train_x, val_x = load_dataset(data, cfg.image_size)
    return model, cfg, ckpt, device, train_x, val_x


def cmd_eval(args):
    model, cfg, ckpt, device, _, val_x = load_for_command(args)
    p, s, z = evaluate(model, val_x, device)
    per_level, overall = table_usage(model, z)
    r = {"checkpoint": args.ckpt, "step": ckpt["step"], "images": len(val_x),
         "psnr": p.mean().item(), "ssim": s.mean().item(),
         "key_codes": {"mean": z.mean().item(), "std": z.std().item(), "min": z.min().item(), "max": z.max().item()},
         "table_usage": {"overall": overall, "per_level": per_level}}
    if args.json:
        print(json.dumps(r, indent=2))
        return
    k = r["key_codes"]
    print(f"{args.ckpt} (step {r['step']}) on {r['images']} validation images")
    print(f"PSNR {r['psnr']:.2f} dB | SSIM {r['ssim']:.4f}")
    print(f"key codes: mean {k['mean']:.3f} std {k['std']:.3f} min {k['min']:.4f} max {k['max']:.4f}")
    print(f"table usage: {overall:.1%} overall; per level " + " ".join(f"{u:.0%}" for u in per_level))


def cmd_reconstruct(args):
    model, cfg, ckpt, device, _, val_x = load_for_command(args)
    x = to_float(val_x[:args.n]).to(device)
    with torch.no_grad():
        pairs_grid(x, model.decode(model.encode(x)).clamp(-1, 1), args.out)
    print(f"wrote {args.out}: {len(x)} validation images, each above its reconstruction")


def cmd_encode(args):
    model, cfg, ckpt, device, train_x, val_x = load_for_command(args)
    codes = [encode_images(model, d, device) for d in (train_x, val_x)]
    atomic_save({"kind": "bright-codes", "codes": codes[0], "val_codes": codes[1],
                 "bright_ckpt": args.ckpt, "config": asdict(cfg)}, args.out)
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
    return {"table_params": m.tables.numel(), "encoder_params": n([m.encoder]),
            "decoder_params": n([m.head, m.style, m.dec, m.to_rgb]),
            "decoder_gmacs": dec_macs / 1e9, "lookup_gmacs": lookup_macs / 1e9, "encoder_gmacs": enc_macs / 1e9}


def cmd_info(args):
    for name in ([args.preset] if args.preset else PRESETS):
        cfg, c = make_config(name), model_cost(make_config(name))
        spec = cfg.grid
        print(f"{name}: {cfg.image_size}^2 images, key codes {cfg.z_size}x{cfg.z_size}x{cfg.z_channels}, "
              f"{cfg.groups} groups of {spec.dim}-D grids, L={cfg.levels} F={cfg.features} "
              f"res {cfg.min_res}->{cfg.max_res} T=2^{cfg.log2_table_size} "
              f"({sum(spec.dense)} dense + {spec.levels - sum(spec.dense)} hashed levels)")
        print(f"  tables {c['table_params']:,} params | encoder {c['encoder_params']:,} | "
              f"decoder (heads + synthesis) {c['decoder_params']:,}")
        print(f"  per image: decoder {c['decoder_gmacs']:.2f} GMACs + lookup {c['lookup_gmacs']:.3f} GMACs = "
              f"{c['decoder_gmacs'] + c['lookup_gmacs']:.2f} GMACs (encoder {c['encoder_gmacs']:.2f})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=None, help=f"image folder (default: {DEFAULT_DATA})")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    common.add_argument("--backend", default="auto", choices=["auto", "torch", "reference", "triton"],
                        help="hash-grid lookup: triton on CUDA, torch on CPU by default")
    t = sub.add_parser("train", parents=[common], help="train BRIGHT")
    t.add_argument("--preset", default=None, choices=list(PRESETS))
    t.add_argument("--out", default=DEFAULT_OUT)
    t.add_argument("--max-iters", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--l1-weight", type=float)
    t.add_argument("--gan-weight", type=float, help="patch-GAN loss weight (default 0: off)")
    t.add_argument("--seed", type=int)
    t.add_argument("--set", help='other config fields as JSON, e.g. \'{"lr": 0.001}\'')
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--resume", action="store_true")
    for name, fn, help_ in [("eval", cmd_eval, "PSNR/SSIM, key-code statistics, table usage"),
                            ("reconstruct", cmd_reconstruct, "PNG of validation images and reconstructions"),
                            ("encode", cmd_encode, "key codes of every image, for diffusion.py")]:
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("--ckpt", default=os.path.join(DEFAULT_OUT, "bright.pt"))
        p.set_defaults(fn=fn)
        if name == "eval":
            p.add_argument("--json", action="store_true")
        if name == "reconstruct":
            p.add_argument("--out", default=os.path.join(DEFAULT_OUT, "reconstruct.png"))
            p.add_argument("--n", type=int, default=32)
        if name == "encode":
            p.add_argument("--out", default=os.path.join(DEFAULT_OUT, "codes.pt"))
    i = sub.add_parser("info", help="parameters and GMACs of the presets")
    i.add_argument("--preset", default=None, choices=list(PRESETS))
    t.set_defaults(fn=train); i.set_defaults(fn=cmd_info)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
