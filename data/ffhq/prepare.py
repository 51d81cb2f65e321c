"""
Turns a downloaded copy of FFHQ into square RGB PNGs at the training resolution.

    python data/ffhq/prepare.py --src /path/to/images1024x1024[.zip] [--size 256]
        [--n-val 1000] [--limit N] [--workers K] [--root DIR]

--src is a folder (searched recursively) or a .zip of images: the official
images1024x1024 from https://github.com/NVlabs/ffhq-dataset, or a 256x256 / 512x512
mirror (Kaggle, Hugging Face). Each image is centre-cropped to a square, resized with
LANCZOS and written as root/train/00000.png ... and root/val/00000.png ... (root defaults
to this folder). Files are sorted by name (numbers compared as numbers), and the last
--n-val become the validation set: for the full dataset and the default 1000, images
69000-69999, which lie inside FFHQ's own validation range 60000-69999 (--n-val 10000 gives
exactly that split). --limit N keeps only the first N training images, for quick
experiments; the validation set stays the same, so validation numbers stay comparable.
Unreadable files are skipped with a warning. Importable: prepare(...) and is_prepared(root).
"""
import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import zipfile

from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bright import PARTIAL, to_rgb  # noqa: E402  (the repository root, two folders up)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MARKER = os.path.join("train", ".complete")  # inside train/, which is gitignored


def natural_key(name):
    """'img2.png' sorts before 'img10.png'; zero-padded FFHQ names sort the same either way."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_images(src):
    """Sorted image names under src: paths relative to the folder, or members of the zip."""
    if os.path.isdir(src):
        names = [os.path.relpath(os.path.join(d, f), src)
                 for d, _, files in os.walk(src) for f in files]
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        sys.exit(f"error: --src {src} is neither a folder nor a .zip file")
    # skip macOS resource forks (__MACOSX/, ._name) and other hidden files, which zips often carry
    names = [n for n in names if n.lower().endswith(EXTENSIONS)
             and not any(p.startswith((".", "__MACOSX")) for p in re.split(r"[/\\]", n))]
    return sorted(names, key=natural_key)


_zip = None  # one open handle per worker process; ZipFile objects don't survive pickling


def _init_worker(src):
    global _zip
    # Ctrl-C reaches the whole process group; let only the parent handle it (it then
    # terminates the pool), rather than every worker printing a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _zip = zipfile.ZipFile(src) if zipfile.is_zipfile(src) else None


def convert(task):
    """Reads one image, writes it square at `size`; returns None or the reason it failed."""
    src, name, out, size = task
    try:
        f = _zip.open(name) if _zip is not None else open(os.path.join(src, name), "rb")
        with f, Image.open(f) as img:
            # the training loader's conversion (EXIF orientation, transparency on white, 16-bit
            # grey), so that prepared images read back as the originals would
            img = ImageOps.fit(to_rgb(img), (size, size), Image.LANCZOS)  # centre crop + resize
        img.save(out, compress_level=1)  # ~4x faster than the default 6, for ~15% more disk
    except Exception as e:  # a corrupt or truncated file raises any of several types
        return f"{type(e).__name__}: {e}"
    return None


def is_prepared(root=os.path.dirname(os.path.abspath(__file__))):
    """True once prepare() has finished; the marker is written last, so an interrupted run reads False."""
    return os.path.isfile(os.path.join(root, MARKER)) and os.path.isdir(os.path.join(root, "val"))


def prepare(src, root=os.path.dirname(os.path.abspath(__file__)), size=256, n_val=1000, limit=None,
            workers=None, quiet=False):
    if not os.path.exists(src):
        sys.exit(f"error: --src {src} does not exist")
    # root/train and root/val are emptied, then written: neither may hold the source, or lie in it
    inside = lambda a, b: a == b or a.startswith(b + os.sep)
    s = os.path.realpath(src)
    for split in ("train", "val"):
        d = os.path.realpath(os.path.join(root, split))
        if inside(s, d) or (os.path.isdir(src) and inside(d, s)):
            sys.exit(f"error: --src {src} and the output folder {os.path.join(root, split)} overlap (it is emptied, "
                     f"then written): point --src at a folder of source images only")
    try:
        names = list_images(src)
    except zipfile.BadZipFile as e:
        sys.exit(f"error: cannot read {src}: {e}")
    if not names:
        sys.exit(f"error: no images ({', '.join(EXTENSIONS)}) found in {src}")
    if n_val >= len(names):
        sys.exit(f"error: only {len(names)} images in {src}, not enough for --n-val {n_val} plus training")
    n_train = len(names) - n_val
    splits = {"train": names[:n_train if limit is None else min(limit, n_train)],
              "val": names[n_train:]}

    # drop the marker first and start from empty folders, so that a half-written run, or
    # images left over from an earlier larger one, can never pass for a complete dataset
    if os.path.exists(os.path.join(root, MARKER)):
        os.remove(os.path.join(root, MARKER))
    tasks = []
    for split, split_names in splits.items():
        d = os.path.join(root, split)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        # output i is source i of the split: a skipped file leaves a gap, not a shifted numbering
        tasks += [(src, n, os.path.join(d, f"{i:05d}.png"), size) for i, n in enumerate(split_names)]
    open(os.path.join(root, PARTIAL), "w").close()  # until the end: bright.py refuses a half-written set

    t0, done, failed = time.time(), 0, {"train": 0, "val": 0}
    workers = workers or os.cpu_count() or 1
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(src,)) as pool:
        for (_, name, out, _), err in zip(tasks, pool.imap(convert, tasks, chunksize=8)):
            done += 1
            if err is not None:
                failed[os.path.basename(os.path.dirname(out))] += 1
                print(f"warning: skipped {name} ({err})", file=sys.stderr)
            if not quiet and done % 2000 == 0:
                print(f"{done}/{len(tasks)} images, {done / (time.time() - t0):.0f} images/s")
    n_failed = sum(failed.values())
    if n_failed == len(tasks):
        sys.exit(f"error: none of the {len(tasks)} images in {src} could be read")

    with open(os.path.join(root, MARKER), "w") as f:
        json.dump(dict(src=os.path.abspath(src), size=size, n_val=n_val, limit=limit), f)
    os.remove(os.path.join(root, PARTIAL))
    if not quiet:
        print(f"wrote {len(splits['train']) - failed['train']} train + "
              f"{len(splits['val']) - failed['val']} val images of {size}x{size} to {root} "
              f"in {time.time() - t0:.1f}s" + (f"; skipped {n_failed} unreadable" if n_failed else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder or .zip of FFHQ images")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-val", type=int, default=1000, help="the last N images (by name) are validation")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N training images")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--root", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output folder; its train/ and val/ are replaced")
    a = ap.parse_args()
    for flag in ("size", "n_val", "limit", "workers"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:  # a file in the way: one line now
        os.makedirs(a.root, exist_ok=True)
    except OSError as e:
        ap.error(f"--root {a.root}: cannot make that folder ({e.strerror})")
    try:
        prepare(a.src, a.root, a.size, a.n_val, a.limit, a.workers)
    except KeyboardInterrupt:  # one line, not a traceback (bright.py refuses the half-written set)
        sys.exit(f"interrupted: {a.root} is half-written; run this again")
