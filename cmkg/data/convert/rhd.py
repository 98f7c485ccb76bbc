"""RHD, the Rendered Hand Pose Dataset (the paper's paired source set) -> shards with depth.

Layout read (ROOT is the unpacked ``RHD_published_v2`` folder; Zimmermann & Brox, ICCV 2017)::

    ROOT/training/anno_training.pickle      {id: {xyz (42, 3) m, uv_vis (42, 3) px + flag,
    ROOT/evaluation/anno_evaluation.pickle         K (3, 3)}}, Python 2 pickle
    ROOT/{training,evaluation}/color/%05d.png   320x320 RGB
    ROOT/{training,evaluation}/depth/%05d.png   depth in metres = (R * 256 + G) / 65535 * 5
    ROOT/{training,evaluation}/mask/%05d.png    0 background, 1 person, 2-17 left hand,
                                                18-33 right hand

Conventions:
* One hand per image. RHD labels both hands (left = joints 0-20, right = 21-41); we keep the
  hand with more mask pixels, on a tie the one with more visible keypoints, then the left, and
  drop the other. Hands keep their side (no mirroring): RHD mixes left and right hands.
* Joints: ``xyz`` of that hand gathered into our order with ``hand.RHD_TO_OURS`` (+21 for the
  right hand), metres -> mm, camera frame; 2D joints and visibility from ``uv_vis``.
* Depth: the paired modality, decoded to mm (stored at 0.1 mm); mask: 1 on the kept hand's pixels.
* Splits: evaluation -> test; training -> train, less a val set of round(val_fraction N) samples
  chosen by a permutation seeded with ``seed``. Ids: the RHD sample id, plus EVAL_ID_OFFSET for
  evaluation samples so that ids are unique across splits.
* The annotation pickle is read by ``safepickle`` (containers, numbers, numpy arrays only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmkg import hand
from cmkg.data.convert import common, safepickle
from cmkg.data.store import existing, read_manifest
from cmkg.errors import DataError

PARTS = {"training": "train", "evaluation": "test"}  # RHD folder -> our split
EVAL_ID_OFFSET = 100_000
DEPTH_MAX_M = 5.0
LEFT_LABELS, RIGHT_LABELS = (2, 17), (18, 33)  # inclusive mask label ranges


def decode_depth(rgb: np.ndarray) -> np.ndarray:
    """Depth in mm (H, W) float32 from RHD's two-byte PNG (H, W, 3): R high byte, G low byte."""
    code = rgb[..., 0].astype(np.int32) * 256 + rgb[..., 1].astype(np.int32)
    return (code.astype(np.float64) * (DEPTH_MAX_M * 1000.0 / 65535.0)).astype(np.float32)


def choose_side(mask: np.ndarray, visible: np.ndarray) -> int:
    """0 (left) or 1 (right): more mask pixels, then more visible keypoints (``visible`` (42,)
    bool, RHD order), then left."""
    pixels = [np.count_nonzero((mask >= lo) & (mask <= hi)) for lo, hi in (LEFT_LABELS,
                                                                           RIGHT_LABELS)]
    if pixels[0] != pixels[1]:
        return int(pixels[1] > pixels[0])
    return int(visible[21:].sum() > visible[:21].sum())


def load_annotations(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """The annotation pickle, checked: int ids -> xyz (42, 3), uv_vis (42, 3), K (3, 3)."""
    anno = safepickle.load(path)
    if not isinstance(anno, dict) or not anno:
        raise DataError(f"{path}: expected a non-empty dict from sample id to annotations, got "
                        f"{type(anno).__name__}")
    shapes = {"xyz": (42, 3), "uv_vis": (42, 3), "K": (3, 3)}
    out = {}
    for key, entry in anno.items():
        if not isinstance(key, (int, np.integer)) or key < 0:
            raise DataError(f"{path}: sample id {key!r} is not a non-negative integer")
        if not isinstance(entry, dict) or set(shapes) - set(entry):
            raise DataError(f"{path}: sample {key}: expected a dict with keys "
                            f"{sorted(shapes)}, got {entry!r:.80}")
        out[int(key)] = {k: common.checked_array(entry[k], shp, f"{path}: sample {key} {k}")
                         for k, shp in shapes.items()}
    return out


def _image_paths(folder: Path, i: int) -> dict[str, Path]:
    return {kind: folder / kind / f"{i:05d}.png" for kind in ("color", "depth", "mask")}


def load_sample(folder: Path, i: int, anno: dict, size: int, margin: float,
                id_offset: int) -> dict:
    paths = _image_paths(folder, i)
    rgb = common.read_image(paths["color"])
    depth_png = common.read_image(paths["depth"], accept=("RGB", "RGBA"))  # (H, W, 3 or 4)
    mask = common.read_image(paths["mask"], accept=("L", "P"))  # labels 0-33
    for kind, img in (("depth", depth_png), ("mask", mask)):
        if img.shape[:2] != rgb.shape[:2]:
            raise DataError(f"{paths[kind]}: size {img.shape[1]}x{img.shape[0]} differs from "
                            f"the colour image's {rgb.shape[1]}x{rgb.shape[0]}")
    uv_vis = anno["uv_vis"]
    side = choose_side(mask, uv_vis[:, 2] > 0.5)
    pick = np.array(hand.RHD_TO_OURS) + 21 * side
    lo, hi = (LEFT_LABELS, RIGHT_LABELS)[side]
    hand_mask = ((mask >= lo) & (mask <= hi)).astype(np.uint8)
    crop = common.crop_sample(rgb, uv_vis[pick, :2], anno["K"], size, margin,
                              depth=decode_depth(depth_png), mask=hand_mask)
    return {"id": id_offset + i, **crop, "joints3d": anno["xyz"][pick] * 1000.0,
            "vis": uv_vis[pick, 2] > 0.5}


def convert(root: str | Path, out: str | Path, size: int = 256, margin: float = 1.5,
            val_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Convert the RHD folder ``root`` into the dataset folder ``out``; returns its manifest.
    Reuses ``out`` if it holds this very conversion."""
    root, out = Path(root), Path(out)
    common.require([root], "folder")
    pickles = {part: root / part / f"anno_{part}.pickle" for part in PARTS}
    common.require(pickles.values())
    common.require([root / part / kind for part in PARTS for kind in ("color", "depth", "mask")],
                   "folder")
    source = {"converter": "cmkg.data.convert.rhd", "version": common.CONVERTER_VERSION,
              "dataset": "rhd", "size": size, "margin": margin, "val_fraction": val_fraction,
              "seed": seed, "input": common.input_identity(
                  root, list(pickles.values()),
                  [root / p / k for p in PARTS for k in ("color", "depth", "mask")])}
    if (done := existing(out, source)) is not None:
        return done

    annos = {part: load_annotations(path) for part, path in pickles.items()}
    for part, anno in annos.items():  # every image present before any work is done
        common.require(p for i in anno for p in _image_paths(root / part, i).values())
    train = common.carve(sorted(annos["training"]), seed, val=val_fraction)
    plan = {"train": [("training", i) for i in train["train"]],
            "val": [("training", i) for i in train["val"]],
            "test": [("evaluation", i) for i in sorted(annos["evaluation"])]}
    offset = {"training": 0, "evaluation": EVAL_ID_OFFSET}

    def load(item):
        part, i = item
        return load_sample(root / part, int(i), annos[part][int(i)], size, margin, offset[part])

    common.write_dataset(out, source, size, True, plan, load, "rhd", progress)
    return read_manifest(out)
