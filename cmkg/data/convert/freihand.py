"""FreiHAND's training set -> four RGB datasets ``freihand-g``, ``-h``, ``-s``, ``-a``.

Layout read (ROOT is the unpacked ``FreiHAND_pub_v2`` folder; Zimmermann et al., ICCV 2019)::

    ROOT/training_xyz.json      N lists of 21x3, metres, camera frame, FreiHAND order (= ours)
    ROOT/training_K.json        N lists of 3x3
    ROOT/training/rgb/%08d.jpg  224x224; sample id i in version v is image i + N v,
                                v = 0 green screen (g), 1 harmonized (h), 2 sample (s),
                                3 auto-colorized (a)

N is the length of training_xyz.json (32,560 in the published set).

Conventions:
* The versions are separate datasets (the paper's targets G, H, S, A) sharing the annotations:
  joints in mm, 2D joints by projection with K, every joint visible (FreiHAND has no visibility
  labels), no depth, mask all zeros (the green-screen masks under training/mask are not read).
* Splits: FreiHAND publishes test labels only for its evaluation set, which we do not read; the
  training set is split by unique sample id into val and test (round(fraction N) each, chosen
  by a permutation seeded with ``seed``) and train. The split is a function of N, the fractions
  and the seed only, so all four versions share it: no version sees another's test pose in
  training. Ids: the unique sample id (the same in every version).
* ``--out DIR`` receives ``DIR/freihand-<v>`` per requested version; the versions of one command
  are written to a staging folder and moved into DIR when all are complete, so an error leaves
  DIR as it was. A version already in DIR from the same conversion is reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cmkg.data.convert import common
from cmkg.data.store import existing, read_manifest
from cmkg.errors import DataError

VERSIONS = {"g": 0, "h": 1, "s": 2, "a": 3}


def load_annotations(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Joints (N, 21, 3) in mm and intrinsics (N, 3, 3), checked."""
    xyz_path, k_path = root / "training_xyz.json", root / "training_K.json"
    xyz = common.checked_array(common.read_json(xyz_path), (None, 21, 3), str(xyz_path))
    K = common.checked_array(common.read_json(k_path), (None, 3, 3), str(k_path))
    if len(xyz) == 0 or len(K) != len(xyz):
        raise DataError(f"{k_path}: {len(K)} cameras for {len(xyz)} samples in {xyz_path}")
    return xyz * 1000.0, K


def image_path(root: Path, i: int, version: str, n: int) -> Path:
    return root / "training" / "rgb" / f"{i + n * VERSIONS[version]:08d}.jpg"


def load_sample(path: Path, i: int, joints: np.ndarray, K: np.ndarray, size: int,
                margin: float) -> dict:
    crop = common.crop_sample(common.read_image(path), common.project(joints, K), K, size, margin)
    return {"id": i, **crop, "joints3d": joints, "vis": np.ones(21, bool)}


def convert(root: str | Path, out: str | Path, versions: str | list[str] = "ghsa",
            size: int = 256, margin: float = 1.5, val_fraction: float = 0.1,
            test_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Convert the FreiHAND folder ``root`` into ``out/freihand-<v>`` for each requested
    version; returns {version: manifest}."""
    root, out = Path(root), Path(out)
    versions = list(dict.fromkeys(versions))  # "ghsa" or ["g", "h"], order kept, no repeats
    bad = [v for v in versions if v not in VERSIONS]
    if bad or not versions:
        raise DataError(f"FreiHAND versions {bad or versions}: choose among "
                        f"{', '.join(VERSIONS)}")
    common.require([root, root / "training" / "rgb"], "folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    annotations = [root / "training_xyz.json", root / "training_K.json"]
    common.require(annotations)
    identity = common.input_identity(root, annotations, [root / "training" / "rgb"])
    sources = {v: {"converter": "cmkg.data.convert.freihand", "version": common.CONVERTER_VERSION,
                   "dataset": f"freihand-{v}", "size": size, "margin": margin,
                   "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                   "input": identity} for v in versions}
    done = {v: existing(out / f"freihand-{v}", sources[v]) for v in versions}
    todo = [v for v in versions if done[v] is None]
    if not todo:
        return done

    joints, K = load_annotations(root)
    n = len(joints)
    common.require(image_path(root, i, v, n) for v in todo for i in range(n))
    split = common.carve(np.arange(n), seed, val=val_fraction, test=test_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        plan = {s: list(split[s]) for s in ("train", "val", "test")}
        for v in todo:
            def load(i, v=v):
                i = int(i)
                return load_sample(image_path(root, i, v, n), i, joints[i], K[i], size, margin)

            common.write_dataset(staging / f"freihand-{v}", sources[v], size, False, plan, load,
                                 f"freihand-{v}", progress)
        out.mkdir(parents=True, exist_ok=True)
        for v in todo:
            os.rename(staging / f"freihand-{v}", out / f"freihand-{v}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {v: done[v] or read_manifest(out / f"freihand-{v}") for v in versions}
