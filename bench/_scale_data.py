"""A large data set of real photos for the scale benchmarks (issue 20): n images made from the 6000 cat and dog
photos of ``shared/data/pets`` (train + val) and ``shared/data/pets-extra`` by a random crop (area 0.5-1, aspect
3/4-4/3), a horizontal flip (half of them) and colour shifts (brightness, contrast, saturation each x0.8-1.2),
stored as JPEG (quality 90) with the shorter side ``size`` px, in ``OUT/{train,val}/{cat,dog}/NNNNNN.jpg``
(80/20 split).

Image k depends only on (seed, k): its source photo, split, crop, flip and shifts come from a generator seeded
with both, and Pillow's JPEG encoder is deterministic, so the first 30 000 images of a 100 000-image set are
the 30 000-image set, byte for byte. ``--link-from`` exploits that: files another set already holds are
hard-linked, not made again. Each source photo appears about n/6000 times, so the set holds near-duplicates
(crops of one photo that perceptual hashing still matches) within and across splits, as scraped data does.

Resumable and idempotent: a file that exists is skipped (files are written to a temporary name and renamed,
so an interrupted build leaves no half-written JPEG). Runs on every core.

    .venv/bin/python bench/_scale_data.py --n 100000 --out bench-work/scale/100000
    .venv/bin/python bench/_scale_data.py --n 30000 --out bench-work/scale/30000 --link-from bench-work/scale/100000
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = (REPO.parent / "shared/data/pets", REPO.parent / "shared/data/pets-extra")
CLASSES = ("cat", "dog")
VAL_SHARE = 0.2
QUALITY = 90


@functools.lru_cache(maxsize=1)
def sources() -> list[tuple[Path, str]]:
    """Every source photo with its class, in a fixed order (sorted paths)."""
    out = []
    for root in SOURCES:
        for cls in CLASSES:
            out += [(p, cls) for p in sorted(root.rglob(f"{cls}/*.jpg"))]
    if not out:
        raise SystemExit(f"no source photos under {', '.join(map(str, SOURCES))}")
    return out


def relpath(k: int, seed: int, srcs: list[tuple[Path, str]]) -> Path:
    """Where image k goes (split and class), drawn from (seed, k) alone."""
    rng = np.random.default_rng([seed, k])
    _, cls = srcs[int(rng.integers(len(srcs)))]
    split = "val" if rng.random() < VAL_SHARE else "train"
    return Path(split) / cls / f"{k:06d}.jpg"


def make(k: int, seed: int, size: int, srcs: list[tuple[Path, str]]) -> bytes:
    """Image k's JPEG bytes. Draws continue the generator ``relpath`` used, so path and content agree."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([seed, k])
    src, _ = srcs[int(rng.integers(len(srcs)))]
    rng.random()  # the split's draw
    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    for _ in range(10):  # torchvision's RandomResizedCrop: area share and log-uniform aspect, retried to fit
        area = w * h * rng.uniform(0.5, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    scale = size / min(cw, ch)
    img = img.resize((max(size, round(cw * scale)), max(size, round(ch * scale))), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.8, 1.2)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def _write(dst: Path, data: bytes) -> None:
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.rename(dst)


def _build_range(start: int, stop: int, out_dir: str, seed: int, size: int, link_from: str | None) -> tuple[int, int]:
    """Make images start..stop-1 that are missing; returns (made, linked)."""
    srcs = sources()
    made = linked = 0
    for k in range(start, stop):
        rel = relpath(k, seed, srcs)
        dst = Path(out_dir) / rel
        if dst.exists():
            continue
        if link_from and (Path(link_from) / rel).exists():
            try:
                os.link(Path(link_from) / rel, dst)
                linked += 1
                continue
            except OSError:
                pass  # another file system: make it instead
        _write(dst, make(k, seed, size, srcs))
        made += 1
    return made, linked


def build(n: int, out_dir: str | Path, seed: int = 0, size: int = 128, link_from: str | Path | None = None,
          workers: int | None = None, progress: bool = True) -> Path:
    """Build (or complete) the n-image set in ``out_dir``; returns it. ``link_from``: a set built with the same
    seed and size whose files are hard-linked instead of made again."""
    out = Path(out_dir)
    for split in ("train", "val"):
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*.tmp*"):  # left by a build that was killed mid-write
        stale.unlink()
    workers = workers or os.cpu_count() or 1
    step = 1000
    made = linked = 0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(_build_range, a, min(a + step, n), str(out), seed, size,
                            str(link_from) if link_from else None) for a in range(0, n, step)]
        for i, job in enumerate(jobs, 1):  # in order: done jobs are a prefix, which is what the progress says
            m, li = job.result()
            made, linked = made + m, linked + li
            if progress and (i % 10 == 0 or i == len(jobs)):
                el = time.perf_counter() - t0
                print(f"\r{out}: {min(i * step, n)}/{n} ({made} made, {linked} linked, {el:.0f} s)",
                      end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="number of images")
    ap.add_argument("--out", type=Path, required=True, help="folder to build into (completed if partly built)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="shorter side in pixels (default 128)")
    ap.add_argument("--link-from", type=Path, help="a larger set of the same seed and size: hard-link its files")
    ap.add_argument("--workers", type=int, help="processes (default: every core)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    out = build(a.n, a.out, a.seed, a.size, a.link_from, a.workers)
    files = sum(1 for _ in out.rglob("*.jpg"))
    mb = sum(p.stat().st_size for p in out.rglob("*.jpg")) / 1e6
    print(f"{out}: {files} images, {mb:.0f} MB, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
