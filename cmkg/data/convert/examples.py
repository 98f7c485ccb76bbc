"""Small datasets in the published RHD, STB and FreiHAND layouts, written from known synthetic
hands: for the converters' tests and benchmark, and to try ``cmkg data convert`` without a
download.

Each hand is rendered small by ``synth`` and re-imaged into the dataset's camera (a pure change
of intrinsics is an affine image warp) at the real image size, then written as the dataset
ships it: PNG/JPEG images, RHD's two-byte depth PNGs and Python 2 pickle, STB's .mat labels in
the depth camera's frame with the palm centre, FreiHAND's JSON files. Each writer returns the
ground truth it wrote.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from scipy.spatial.transform import Rotation

from cmkg import hand, synth
from cmkg.data.convert import common, rhd, stb

SRC_PX = 64  # synthetic hands are rendered at this size, then re-imaged at the dataset's
RHD_DEPTH_STEP_MM = 5000.0 / 65535  # one unit of RHD's two-byte depth


def _reimage(img: np.ndarray, K_src: np.ndarray, K_dst: np.ndarray, shape) -> np.ndarray:
    """``img`` taken with K_src as the camera K_dst sees it, (H, W) = ``shape``, nearest."""
    inv = np.linalg.inv(K_dst @ np.linalg.inv(K_src))  # dst pixel -> src pixel
    mode = "F" if img.dtype == np.float32 else None
    out = Image.fromarray(img, mode).transform(
        (shape[1], shape[0]), Image.Transform.AFFINE, tuple(inv[:2].reshape(-1)),
        Image.Resampling.NEAREST)
    return np.asarray(out)


def _png(path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's str opcodes, as RHD's Python 2 pickle holds array data."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def python2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # name numpy's module as numpy 1.x (and the real file) does
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_rhd(root: str | Path, n_train: int = 30, n_eval: int = 8) -> dict:
    """RHD layout; sample i keeps its rendered hand on the left (even i) or right (odd i); the
    other hand is a neighbour's hand with every keypoint visible but only a 30-pixel mask."""
    root, truth = Path(root), {}
    scale = np.diag([5.0, 5.0, 1.0])  # 64 px -> 320 px
    for part, n, seed in (("training", n_train, 10), ("evaluation", n_eval, 11)):
        r = synth.render_range("rhd-like", seed, SRC_PX, 0, n + 1)
        anno, t = {}, {"joints3d": [], "vis": [], "side": [], "K": [], "depth": [], "mask": []}
        for i in range(n):
            side, K = i % 2, scale @ r["K"][i].astype(np.float64)
            mine = r["joints3d"][i].astype(np.float64)
            other = r["joints3d"][i + 1].astype(np.float64) + [150.0, 0.0, 0.0]
            xyz, uv_vis = np.zeros((42, 3), np.float32), np.zeros((42, 3), np.float32)
            for s, joints, vis in ((side, mine, r["vis"][i]), (1 - side, other, np.ones(21))):
                slots = np.array(hand.RHD_TO_OURS) + 21 * s
                xyz[slots] = joints / 1000.0
                uv_vis[slots, :2] = common.project(joints, K)
                uv_vis[slots, 2] = vis
            anno[i] = {"xyz": xyz, "uv_vis": uv_vis, "K": K.astype(np.float32)}

            big = lambda a: np.repeat(np.repeat(a, 5, 0), 5, 1)  # noqa: E731, nearest x5
            code = np.clip(np.round(r["depth"][i] / RHD_DEPTH_STEP_MM), 0, 65535).astype(np.int64)
            depth_png = np.stack([code >> 8, code & 255, np.zeros_like(code)], -1).astype(np.uint8)
            lo = (rhd.LEFT_LABELS, rhd.RIGHT_LABELS)[side][0]
            labels = np.where(r["mask"][i] > 0, lo + np.arange(SRC_PX)[None] % 16, 1)
            mask = big(labels).astype(np.uint8)
            mask[:5, :6] = (rhd.LEFT_LABELS, rhd.RIGHT_LABELS)[1 - side][1]  # the other hand
            folder = root / part
            _png(folder / "color" / f"{i:05d}.png", big(r["rgb"][i]))
            _png(folder / "depth" / f"{i:05d}.png", big(depth_png))
            _png(folder / "mask" / f"{i:05d}.png", mask)
            for k, v in (("joints3d", mine), ("vis", r["vis"][i]), ("side", side), ("K", K),
                         ("depth", big(r["depth"][i])), ("mask", mask)):
                t[k].append(v)
        truth[part] = {k: np.array(v) for k, v in t.items()}
        pickle_path = root / part / f"anno_{part}.pickle"
        # training as Python 2 wrote it, evaluation as Python 3 protocol 2 writes it
        pickle_path.write_bytes(python2_pickle(anno) if part == "training"
                                else pickle.dumps(anno, protocol=2))
    return truth


def write_stb(root: str | Path, frames: int = 3) -> dict:
    """STB layout, ``frames`` per sequence; labels in the depth frame with the palm centre."""
    root = Path(root)
    r = synth.render_range("stb-like", 3, SRC_PX, 0, len(stb.SEQUENCES) * frames)
    R = Rotation.from_rotvec(stb.DEPTH_TO_COLOR_ROTVEC).as_matrix()  # independent of stb.py
    truth = {}
    for k, seq in enumerate(stb.SEQUENCES):
        idx = range(k * frames, (k + 1) * frames)
        ours = r["joints3d"][list(idx)].astype(np.float64)  # colour frame, wrist
        theirs = np.zeros_like(ours)
        theirs[:, hand.STB_TO_OURS] = ours
        ring = ours[:, 13]
        theirs[:, 0] = ring + (ours[:, 0] - ring) / 2  # the palm centre that gives this wrist
        in_depth = theirs @ R.T + stb.DEPTH_TO_COLOR_T  # X_depth = R X_color + t
        (root / "labels").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "labels" / f"{seq}_SK.mat",
                         {"handPara": in_depth.transpose(2, 1, 0)})
        for f, i in enumerate(idx):
            img = _reimage(r["rgb"][i], r["K"][i], stb.COLOR_K, (480, 640))
            _png(root / "images" / seq / f"SK_color_{f}.png", img)
            truth[k * stb.ID_STRIDE + f] = ours[f]
    return truth


def write_freihand(root: str | Path, n: int = 20) -> dict:
    """FreiHAND layout; version v of sample i recolours the background by rolling its channels."""
    root = Path(root)
    r = synth.render_range("freihand-g", 4, SRC_PX, 0, n)
    K = np.diag([3.5, 3.5, 1.0]) @ r["K"].astype(np.float64)  # 64 px -> 224 px
    (root / "training" / "rgb").mkdir(parents=True)
    (root / "training_xyz.json").write_text(json.dumps((r["joints3d"] / 1000.0).tolist()))
    (root / "training_K.json").write_text(json.dumps(K.tolist()))
    for i in range(n):
        rgb = _reimage(r["rgb"][i], r["K"][i], K[i], (224, 224))
        hand_px = _reimage(r["mask"][i], r["K"][i], K[i], (224, 224))[..., None] > 0
        for v in range(4):
            img = np.where(hand_px, rgb, np.roll(rgb, v, axis=-1))
            Image.fromarray(img).save(root / "training" / "rgb" / f"{i + n * v:08d}.jpg",
                                      quality=95)
    return {"joints3d": r["joints3d"].astype(np.float64), "K": K}
