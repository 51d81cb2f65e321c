"""
A small procedural dataset for quick experiments without any download. By default: one
coloured shape (an ellipse, rectangle or triangle, axis-aligned, its rough radius 0.2-0.35 of
the image size) on a solid background: images a small DDPM learns to draw in CPU minutes.
--hard gives the harder set: one to three smaller shapes (radius 0.12-0.3), rotated at random,
on solid or linear-gradient backgrounds. Images are flat and smooth on purpose, so a small
autoencoder can learn to reconstruct them well within minutes.

    python data/shapes/prepare.py [--n-train 4000] [--n-val 200] [--size 64] [--seed 0] [--root DIR]
                                  [--hard] [--max-shapes 1] [--gradients] [--radius 0.2 0.35] [--rotate]

--hard makes --max-shapes 3 --gradients --radius 0.12 0.3 --rotate the defaults (a --max-shapes
or --radius given as well wins).

writes root/train/00000.png ... and root/val/00000.png ... (root defaults to this folder), and
in each split kinds.json: for every image, the kinds of its shapes in drawing order (labels,
e.g. to train a classifier that judges generated samples).
Image i of a split depends only on (seed, split, i), so train image 17 is the same
whatever --n-train is. Importable: prepare(...) and is_prepared(root, **settings).
"""
import argparse
import colorsys
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw at 4x and downsample: cheap antialiasing of every edge
MARKER = os.path.join("train", ".complete")  # inside train/, which is gitignored
PARTIAL = os.path.join("train", ".partial")  # from the start to the end (bright.PARTIAL): half-written


def random_colour(rng, sat, val):
    """An RGB tuple (0..255) with uniform hue and saturation/value drawn from the given ranges."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return (round(r * 255), round(g * 255), round(b * 255))


def background(rng, s, gradients=True):
    """An s x s RGB array: a solid colour or, if gradients, half the time a linear gradient
    between two colours"""
    # muted colours, so that the saturated shapes usually stand out against them
    c0 = np.array(random_colour(rng, (0.0, 0.6), (0.15, 0.95)), dtype=np.float32)
    if not gradients or rng.random() < 0.5:
        return np.broadcast_to(c0, (s, s, 3)).astype(np.uint8)
    c1 = np.array(random_colour(rng, (0.0, 0.6), (0.15, 0.95)), dtype=np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    xy = np.arange(s, dtype=np.float32)
    p = xy[None, :] * np.cos(theta) + xy[:, None] * np.sin(theta)  # position along the direction
    t = ((p - p.min()) / (p.max() - p.min()))[..., None]
    return (c0 * (1 - t) + c1 * t + 0.5).astype(np.uint8)


KINDS = ("ellipse", "rectangle", "triangle")


def shape_polygon(rng, s, radius=(0.12, 0.3), rotate=True):
    """(vertices, kind) of one random shape: vertices in pixels of an s x s canvas, kind an index
    into KINDS; radius: the range of its rough radius as a fraction of s; rotate=False keeps it
    axis-aligned (the same numbers are drawn)."""
    cx, cy = rng.uniform(0.15, 0.85, size=2) * s
    r = rng.uniform(*radius) * s  # rough radius
    angle = rng.uniform(0, 2 * np.pi)  # drawn even when unused, so every later draw stays the same
    if not rotate:
        angle = 0.0
    kind = rng.integers(3)
    if kind == 0:  # ellipse (a circle when the axes happen to be close)
        a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x, y = r * np.cos(a), r * rng.uniform(0.5, 1.0) * np.sin(a)
    elif kind == 1:  # rectangle
        w, h = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.4, 1.0)
        x, y = np.array([-w, w, w, -w]), np.array([-h, -h, h, h])
    else:  # triangle: corners roughly evenly spaced around the centre, so never degenerate
        a = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.4, 0.4, size=3)
        rr = r * rng.uniform(0.7, 1.0, size=3)
        x, y = rr * np.cos(a), rr * np.sin(a)
    # rotate, then move to the centre (the ellipse/rectangle are built axis-aligned)
    c, sn = np.cos(angle), np.sin(angle)
    return list(zip((cx + c * x - sn * y).tolist(), (cy + sn * x + c * y).tolist())), int(kind)


# the default set (make_image's and prepare's defaults) and the harder one (--hard)
SIMPLE = dict(max_shapes=1, gradients=False, radius=(0.2, 0.35), rotate=False)
HARD = dict(max_shapes=3, gradients=True, radius=(0.12, 0.3), rotate=True)


def make_image(seed, split, i, size, max_shapes=1, gradients=False, radius=(0.2, 0.35), rotate=False, kinds=None):
    """Image i of a split; its own generator makes it independent of how many are drawn.
    kinds: None, or a list to which the kind (a name from KINDS) of each shape is appended."""
    rng = np.random.default_rng([seed, split, i])
    s = size * SUPERSAMPLE
    img = Image.fromarray(background(rng, s, gradients))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, max_shapes + 1)):  # 1..max_shapes shapes, later ones on top
        vertices, kind = shape_polygon(rng, s, radius, rotate)
        draw.polygon(vertices, fill=random_colour(rng, (0.65, 1.0), (0.7, 1.0)))
        if kinds is not None:
            kinds.append(KINDS[kind])
    return img.resize((size, size), Image.LANCZOS)


def is_prepared(root=os.path.dirname(os.path.abspath(__file__)), **settings):
    """True once prepare() has finished (the marker is written last, so an interrupted run reads
    False) and, for each keyword given (n_train=..., max_shapes=..., ...), with that value."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    same = lambda k, v: done.get(k) == (list(v) if isinstance(v, tuple) else v)
    return os.path.isdir(os.path.join(root, "val")) and all(same(k, v) for k, v in settings.items())


def prepare(root=os.path.dirname(os.path.abspath(__file__)), n_train=4000, n_val=200, size=64,
            seed=0, max_shapes=1, gradients=False, radius=(0.2, 0.35), rotate=False, quiet=False):
    t0 = time.time()
    # drop the marker first and start from empty folders, so that a half-written run, or
    # images left over from an earlier larger one, can never pass for a complete dataset
    if os.path.exists(os.path.join(root, MARKER)):
        os.remove(os.path.join(root, MARKER))
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        d = os.path.join(root, split)
        os.makedirs(d)
        if split == "train":
            open(os.path.join(root, PARTIAL), "w").close()
        digits, kinds = max(5, len(str(n - 1))), []
        for i in range(n):
            kinds.append([])
            make_image(seed, split_id, i, size, max_shapes, gradients, radius, rotate, kinds[-1]).save(
                os.path.join(d, f"{i:0{digits}d}.png"))
        with open(os.path.join(d, "kinds.json"), "w") as f:
            json.dump(kinds, f)
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump(dict(n_train=n_train, n_val=n_val, size=size, seed=seed, max_shapes=max_shapes,
                       gradients=gradients, radius=list(radius), rotate=rotate), f)
    os.remove(os.path.join(root, PARTIAL))
    if not quiet:
        print(f"wrote {n_train} train + {n_val} val images of {size}x{size} to {root} "
              f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard", action="store_true",
                    help="the harder set: --max-shapes 3 --gradients --radius 0.12 0.3 --rotate by default")
    ap.add_argument("--max-shapes", type=int, default=1, help="1 to this many shapes per image")
    ap.add_argument("--gradients", action="store_true", help="half the backgrounds are linear gradients")
    ap.add_argument("--radius", type=float, nargs=2, default=(0.2, 0.35), metavar=("LO", "HI"),
                    help="range of a shape's rough radius, as a fraction of the image size")
    ap.add_argument("--rotate", action="store_true", help="rotate each shape by a random angle")
    ap.add_argument("--root", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output folder; its train/ and val/ are replaced")
    if ap.parse_known_args()[0].hard:
        ap.set_defaults(**HARD)
    a = ap.parse_args()
    for flag in ("n_train", "n_val", "max_shapes"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.size < 16:
        ap.error("--size must be at least 16")
    if not 0 < a.radius[0] <= a.radius[1] <= 0.5:
        ap.error("--radius LO HI needs 0 < LO <= HI <= 0.5")
    if a.seed < 0:  # numpy seeds are non-negative
        ap.error("--seed must be at least 0")
    try:  # a file in the way: one line now
        os.makedirs(a.root, exist_ok=True)
    except OSError as e:
        ap.error(f"--root {a.root}: cannot make that folder ({e.strerror})")
    try:
        prepare(a.root, a.n_train, a.n_val, a.size, a.seed, a.max_shapes, a.gradients, tuple(a.radius), a.rotate)
    except KeyboardInterrupt:  # one line, not a traceback (bright.py refuses the half-written set)
        sys.exit(f"interrupted: {a.root} is half-written; run this again")
