"""STB, the Stereo Hand Pose Tracking Benchmark (the paper's target set) -> RGB shards.

Layout read (Zhang et al., ICIP 2017)::

    ROOT/labels/<seq>_SK.mat          handPara (3, 21, N), mm, the SK depth camera's frame
    ROOT/images/<seq>/SK_color_<i>.png  640x480 RGB, i = 0 .. N-1

for the 12 sequences B1Counting, B1Random, ..., B6Random (N = 1500 each in the published set).

Conventions:
* Joints: ``handPara`` reordered with ``hand.STB_TO_OURS``, moved into the colour camera's frame
  with the published extrinsics, X_color = R^-1 (X_depth - t), R from the Rodrigues vector; then
  the palm centre (STB's joint 0) is replaced by the wrist, wrist = ringMCP + 2 (palm - ringMCP),
  the most common conversion in public STB loaders (others use another MCP or a factor of ~2.2).
  2D joints: projection with the SK colour intrinsics.
  Every joint is marked visible (STB has no visibility labels).
* Splits: the paper's: B1Counting and B1Random -> test; B2-B6 -> train, less a val set of
  round(val_fraction N) frames chosen by a permutation seeded with ``seed``. (Neighbouring frames
  look alike, so val is optimistic; it only selects the best epoch.) Ids: 10000 * the sequence's
  index in SEQUENCES + the frame number.
* No depth is stored (STB is the target set; the paper uses none of it) and the mask is all zeros.
* Only the SK colour images are read; the Bumblebee stereo pairs (BB_left/right) are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from cmkg import hand
from cmkg.data.convert import common
from cmkg.data.store import existing, read_manifest
from cmkg.errors import DataError

SEQUENCES = [f"B{b}{kind}" for b in range(1, 7) for kind in ("Counting", "Random")]
TEST_SEQUENCES = ("B1Counting", "B1Random")
ID_STRIDE = 10_000
IMAGE_SIZE = (480, 640)  # (H, W) of the SK colour images, for which COLOR_K holds
COLOR_K = np.array([[607.92271, 0.0, 314.78337], [0.0, 607.88192, 236.42484], [0.0, 0.0, 1.0]])
DEPTH_TO_COLOR_ROTVEC = np.array([0.00531, -0.01196, 0.00301])  # Rodrigues vector
DEPTH_TO_COLOR_T = np.array([-24.0381, -0.4563, -1.2326])  # mm
RING_MCP = 13  # in our order


def rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a Rodrigues (axis * angle) vector."""
    theta = float(np.linalg.norm(rotvec))
    if theta < 1e-12:
        return np.eye(3)
    kx, ky, kz = rotvec / theta
    k = np.array([[0.0, -kz, ky], [kz, 0.0, -kx], [-ky, kx, 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * k @ k


def depth_to_color(points: np.ndarray) -> np.ndarray:
    """SK depth-camera points (..., 3) mm -> colour-camera frame: R^-1 (X - t)."""
    return (points - DEPTH_TO_COLOR_T) @ rodrigues(DEPTH_TO_COLOR_ROTVEC)  # row form of R^T (X - t)


def palm_to_wrist(joints: np.ndarray) -> np.ndarray:
    """Our-order joints (..., 21, 3) whose joint 0 is STB's palm centre -> joint 0 the wrist."""
    out = joints.copy()
    ring = joints[..., RING_MCP, :]
    out[..., 0, :] = ring + 2.0 * (joints[..., 0, :] - ring)
    return out


def load_labels(path: Path) -> np.ndarray:
    """Joints (N, 21, 3) in mm, our order, colour camera frame, wrist at joint 0."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy's parser fails on bad bytes in many ways (IndexError, ...)
        raise DataError(f"{path}: not a readable MATLAB file ({e})") from None
    if "handPara" not in mat:
        raise DataError(f"{path}: no variable handPara (found: "
                        f"{', '.join(k for k in mat if not k.startswith('__'))})")
    para = common.checked_array(mat["handPara"], (3, 21, None), f"{path}: handPara")
    if para.shape[2] == 0:
        raise DataError(f"{path}: handPara holds no frames")
    theirs = para.transpose(2, 1, 0)  # (N, 21, 3), STB order
    return palm_to_wrist(depth_to_color(theirs[:, hand.STB_TO_OURS]))


def load_sample(path: Path, sample_id: int, joints: np.ndarray, size: int,
                margin: float) -> dict:
    rgb = common.read_image(path)
    if rgb.shape[:2] != IMAGE_SIZE:
        raise DataError(f"{path}: expected a {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} SK colour image, "
                        f"got {rgb.shape[1]}x{rgb.shape[0]}")
    crop = common.crop_sample(rgb, common.project(joints, COLOR_K), COLOR_K, size, margin)
    return {"id": sample_id, **crop, "joints3d": joints, "vis": np.ones(21, bool)}


def convert(root: str | Path, out: str | Path, size: int = 256, margin: float = 1.5,
            val_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Convert the STB folder ``root`` (paper split) into the dataset folder ``out``; returns
    its manifest. Reuses ``out`` if it holds this very conversion."""
    root, out = Path(root), Path(out)
    common.require([root, root / "labels", root / "images"], "folder")
    labels = {seq: root / "labels" / f"{seq}_SK.mat" for seq in SEQUENCES}
    common.require(labels.values())
    common.require([root / "images" / seq for seq in SEQUENCES], "folder")
    source = {"converter": "cmkg.data.convert.stb", "version": common.CONVERTER_VERSION,
              "dataset": "stb", "split": "paper", "size": size, "margin": margin,
              "val_fraction": val_fraction, "seed": seed, "input": common.input_identity(
                  root, list(labels.values()), [root / "images" / seq for seq in SEQUENCES])}
    if (done := existing(out, source)) is not None:
        return done

    joints, paths = {}, {}
    for k, seq in enumerate(SEQUENCES):
        seq_joints = load_labels(labels[seq])
        if len(seq_joints) > ID_STRIDE:
            raise DataError(f"{labels[seq]}: {len(seq_joints)} frames, more than {ID_STRIDE}")
        for frame, j in enumerate(seq_joints):
            joints[k * ID_STRIDE + frame] = j
            paths[k * ID_STRIDE + frame] = root / "images" / seq / f"SK_color_{frame}.png"
    common.require(paths.values())
    is_test = {i: SEQUENCES[i // ID_STRIDE] in TEST_SEQUENCES for i in joints}
    test = [i for i in joints if is_test[i]]
    train = common.carve([i for i in joints if not is_test[i]], seed, val=val_fraction)
    plan = {"train": list(train["train"]), "val": list(train["val"]), "test": test}

    def load(i):
        return load_sample(paths[int(i)], int(i), joints[int(i)], size, margin)

    common.write_dataset(out, source, size, False, plan, load, "stb", progress)
    return read_manifest(out)
