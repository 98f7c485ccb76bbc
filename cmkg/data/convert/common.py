"""What the real-dataset converters share: reading files, the hand crop, splits, streaming.

Crop. A square box around the 21 2D joints: centred on their bounding box, side = ``margin``
times its larger extent (at least MIN_SIDE px, at most MAX_SIDE_FACTOR times the image's larger
side), corners on whole pixels. Every joint counts, visible or not: the network regresses
occluded joints too, and a hand partly outside the image is padded rather than cut. Outside the
image is zeros. The box is resized to ``size`` px: RGB bilinear (antialiased by Pillow when
shrinking), depth and mask nearest. Pixel coordinates are continuous (pixel i covers [i, i+1),
as in the synthetic renderer), so with s = size / side a point moves to u' = (u - x0) s and

    K' = [[fx s, 0, (cx - x0) s], [0, fy s, (cy - y0) s], [0, 0, 1]].

The datasets' K and 2D labels are used as published; where a dataset counts pixel centres at
integers (OpenCV), its crops sit half a source pixel (s / 2 crop px) off, which is not corrected.

Splits. ``carve`` draws val (and test) samples from a pool with a permutation seeded by ``seed``:
the same pool, fractions and seed give the same split on any machine.

Streaming. ``write_dataset`` loads CHUNK samples at a time on a few threads (Pillow releases
the GIL while decoding) and appends them to a DatasetWriter, so memory is bounded by a chunk
plus one pending shard whatever the dataset's size. The output appears by one rename when
complete; any error inside leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cmkg.atomic import sha256_file
from cmkg.data.store import DatasetWriter
from cmkg.errors import DataError

CONVERTER_VERSION = 1  # bump when a converter's output changes for the same input
CHUNK = 64  # samples decoded and appended at a time
MIN_SIDE = 16  # px, smallest crop box
MAX_SIDE_FACTOR = 3  # the crop box is at most this many times the image's larger side
SHARD_BYTES = 64 << 20  # target shard size: bounds the writer's pending rows
WORKERS = min(4, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Reading files (every failure names the file)
# ---------------------------------------------------------------------------------------------

def require(paths: Iterable[Path], what: str = "file") -> None:
    """Raise a DataError naming the first of ``paths`` that is missing."""
    for p in paths:
        if not (p.is_dir() if what == "folder" else p.is_file()):
            raise DataError(f"{p}: {what} not found")


def read_image(path: Path, mode: str = "RGB",
               accept: tuple[str, ...] | None = None) -> np.ndarray:
    """The fully decoded image (H, W[, C]): converted to ``mode``, or, with ``accept``, as
    stored, its mode being one of those (an encoding such as RHD's two-byte depth or a mask's
    palette indices must not be converted)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here
            if accept is None:
                return np.asarray(im if im.mode == mode else im.convert(mode))
            if im.mode not in accept:
                raise DataError(f"{path}: expected a {' or '.join(accept)} image, got mode "
                                f"{im.mode}")
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def checked_array(value, shape: tuple, where: str) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (None entries match any length)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise DataError(f"{where}: expected numbers of shape {shape}, got a ragged or "
                        "non-numeric value") from None
    if arr.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, arr.shape)):
        raise DataError(f"{where}: expected shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains NaN or Inf")
    return arr


def input_identity(root: Path, annotations: list[Path], image_dirs: list[Path]) -> dict:
    """What identifies a converter's input: the root, annotation checksums, image counts/bytes."""
    def stats(folder: Path) -> dict:
        n = size = 0
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_file():
                    n, size = n + 1, size + e.stat().st_size
        return {"files": n, "bytes": size}

    return {"root": str(root.resolve()),
            "annotations": {p.relative_to(root).as_posix(): sha256_file(p) for p in annotations},
            "images": {d.relative_to(root).as_posix(): stats(d) for d in image_dirs}}


# ---------------------------------------------------------------------------------------------
# Geometry: projection and the hand crop
# ---------------------------------------------------------------------------------------------

def project(joints: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel coordinates (21, 2) of camera-frame points (21, 3) under intrinsics K (3, 3)."""
    p = joints @ K.T
    return p[:, :2] / p[:, 2:]


def crop_box(uv: np.ndarray, margin: float, shape: tuple[int, int]) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop around the 2D joints ``uv`` (21, 2) in an image of
    ``shape`` (H, W)."""
    lo, hi = uv.min(0), uv.max(0)
    side = int(np.ceil(margin * float((hi - lo).max())))
    side = int(np.clip(side, MIN_SIDE, MAX_SIDE_FACTOR * max(shape)))
    x0, y0 = np.round((lo + hi) / 2 - side / 2).astype(int)
    return int(x0), int(y0), side


def crop_nearest(img: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Nearest-neighbour crop-and-resize: output pixel i samples source pixel
    floor(x0 + (i + 0.5) side / size), zeros outside the image."""
    x0, y0, side = box
    src = np.floor((np.arange(size) + 0.5) * (side / size)).astype(np.int64)
    ys, xs = y0 + src, x0 + src
    in_y, in_x = (ys >= 0) & (ys < img.shape[0]), (xs >= 0) & (xs < img.shape[1])
    out = np.zeros((size, size, *img.shape[2:]), img.dtype)
    out[np.ix_(in_y, in_x)] = img[np.ix_(ys[in_y], xs[in_x])]
    return out


def crop_rgb(img: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    x0, y0, side = box
    im = Image.fromarray(img).crop((x0, y0, x0 + side, y0 + side))  # pads with zeros
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def crop_camera(K: np.ndarray, uv: np.ndarray, box: tuple[int, int, int],
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """K' and u' = (u - x0) s of the crop (continuous pixel coordinates)."""
    x0, y0, side = box
    s = size / side
    to_crop = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s], [0.0, 0.0, 1.0]])
    return to_crop @ K, (uv - np.array([x0, y0])) * s


def crop_sample(rgb: np.ndarray, uv: np.ndarray, K: np.ndarray, size: int, margin: float,
                depth: np.ndarray | None = None, mask: np.ndarray | None = None) -> dict:
    """rgb, mask (zeros where none is given), depth (if given), joints2d and K of the crop."""
    box = crop_box(uv, margin, rgb.shape[:2])
    K_crop, uv_crop = crop_camera(K, uv, box, size)
    out = {"rgb": crop_rgb(rgb, box, size), "joints2d": uv_crop, "K": K_crop,
           "mask": (crop_nearest(mask, box, size) if mask is not None
                    else np.zeros((size, size), np.uint8))}
    if depth is not None:
        out["depth"] = crop_nearest(depth, box, size)
    return out


# ---------------------------------------------------------------------------------------------
# Splits and streaming into the shard store
# ---------------------------------------------------------------------------------------------

def carve(ids, seed: int, **fractions: float) -> dict[str, np.ndarray]:
    """Split ``ids`` into disjoint sorted parts: for each named fraction f, round(f N) ids (at
    least one if f > 0) taken in the order of a permutation seeded with ``seed``; the rest is
    "train"."""
    ids = np.asarray(ids)
    order = ids[np.random.default_rng(seed).permutation(len(ids))]
    parts, start = {}, 0
    for name, f in fractions.items():
        n = max(1, round(f * len(ids))) if f > 0 else 0
        parts[name] = np.sort(order[start:start + n])
        start += n
    parts["train"] = np.sort(order[start:])
    if len(parts["train"]) == 0:
        raise DataError(f"{len(ids)} samples leave none for training after carving "
                        f"{', '.join(f'{k} {v}' for k, v in fractions.items())}")
    return parts


def write_dataset(out: Path, source: dict, size: int, with_depth: bool,
                  plan: dict[str, list], load: Callable[[object], dict], name: str,
                  progress: bool) -> None:
    """Stream the samples of ``plan`` (split -> items) through ``load`` (item -> sample dict
    with ``id``, ``rgb``, ``mask``, ``joints3d``, ``joints2d``, ``vis``, ``K`` and, with
    depth, ``depth`` in mm) into a new dataset folder ``out``."""
    total = sum(len(items) for items in plan.values())
    per_sample = size * size * (3 + 1 + (2 if with_depth else 0))
    shard_size = int(np.clip(SHARD_BYTES // per_sample, CHUNK, 1000))
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"convert {name}", unit="img", file=sys.stderr,
               disable=None if progress else True)  # None: only on a terminal
    with DatasetWriter(out, source, size, with_depth, shard_size) as writer, \
            ThreadPoolExecutor(WORKERS) as pool, bar:
        for split, items in plan.items():
            for lo in range(0, len(items), CHUNK):
                samples = list(pool.map(load, items[lo:lo + CHUNK]))
                batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
                writer.add(split, batch, ids=batch.pop("id"))
                bar.update(len(samples))
    if progress:
        rate = total / max(time.perf_counter() - start, 1e-9)
        print(f"convert {name}: {total} samples at {size}px in {out} ({rate:.0f}/s)",
              file=sys.stderr, flush=True)
