"""A torch Dataset over one split of one or more shard folders, held in memory as uint8/uint16.

Batches are built whole by ``__getitems__`` (vectorised numpy indexing, one tensor per field),
so the DataLoader's per-sample overhead disappears; pass ``collate_fn=identity_collate``.

A batch is a dict::

    rgb     (B, S, S, 3) uint8; ``prepare_batch`` moves it to the device and normalises it there
            to (B, 3, S, S) float32, (x / 255 - 0.5) / 0.25 (a quarter of the traffic of floats)
    depth   (B, 1, S, S) float32, (d - z_root) / DEPTH_RANGE_MM clipped to [-1, 1]: the root
            depth is given at test time by the protocol, so the teacher may use it
    target  (B, 21, 3)   root-relative, scale-normalised joints (the regression target)
    joints  (B, 21, 3)   root-relative joints in mm (for evaluation)
    scale   (B,)         middle MCP-PIP length, mm
    vis     (B, 21)      bool
    planted (B, k)       float32, only with ``planted`` set (``data.planted``, a positive
            control): ``prepare_batch`` appends them to the RGB channels as constant maps
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmkg.data import planted as planted_mod
from cmkg.data.store import joint_targets, read_manifest, read_split
from cmkg.errors import DataError

DEPTH_RANGE_MM = 150.0


def identity_collate(batch):
    return batch


def prepare_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; uint8 RGB (B, S, S, 3) becomes normalised (B, 3, S, S) there,
    followed by the planted channels (B, k) as constant maps where the batch has them."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "rgb" in out and out["rgb"].dtype == torch.uint8:
        rgb = out["rgb"].permute(0, 3, 1, 2).float().contiguous()  # NCHW, as the convs expect
        out["rgb"] = (rgb / 255.0 - 0.5) / 0.25
        if "planted" in out:
            b, k = out["planted"].shape
            extra = out["planted"][:, :, None, None].expand(b, k, *rgb.shape[2:])
            out["rgb"] = torch.cat([out["rgb"], extra], 1).contiguous()
    return out


class HandDataset(torch.utils.data.Dataset):
    def __init__(self, roots: str | Path | list, split: str, modalities: tuple[str, ...] = ("rgb",),
                 verify: bool = True, planted=None, shortcut: float = 0.0):
        """``planted`` (a ``config.PlantedConfig`` that is on) adds its channel values to the
        RGB batches; ``shortcut`` > 0 makes them carry the pose with that correlation (the
        target's train split: ``planted.cue``; the source's: ``planted.source_cue``)."""
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        self.roots, self.split, self.modalities = [str(r) for r in roots], split, modalities
        manifests = [read_manifest(r) for r in roots]
        sizes = {m["size"] for m in manifests}
        if len(sizes) != 1:
            raise DataError(f"datasets {self.roots} have different image sizes {sorted(sizes)}")
        self.size = sizes.pop()
        self.fingerprints = [m["fingerprint"] for m in manifests]
        columns = [*modalities, "joints3d", "vis"]
        parts = [read_split(r, split, columns, verify=verify) for r in roots]
        data = {k: np.concatenate([p[k] for p in parts]) for k in columns}
        self.images = {m: data[m] for m in modalities}
        joints = data["joints3d"].astype(np.float64)
        t = joint_targets(joints)
        self.target, self.scale, self.root_z = t["target"], t["scale"], t["root"][:, 2]
        self.joints = (joints - t["root"][:, None]).astype(np.float32)
        self.vis = data["vis"]
        self.planted = None
        if planted is not None and planted.channels > 0 and "rgb" in modalities:
            n = [len(p["vis"]) for p in parts]
            cuts = np.cumsum([0, *n])
            self.planted = np.concatenate([
                planted_mod.values(planted.seed, planted.channels, float(shortcut), fp, split,
                                   self.target[a:b], shortcut > 0)
                for fp, a, b in zip(self.fingerprints, cuts[:-1], cuts[1:])])

    def __len__(self) -> int:
        return len(self.target)

    def __getitems__(self, idx) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx)
        batch = {}
        if "rgb" in self.images:
            batch["rgb"] = torch.from_numpy(self.images["rgb"][idx])
        if "depth" in self.images:
            d = torch.from_numpy(self.images["depth"][idx] - self.root_z[idx, None, None])
            batch["depth"] = (d / DEPTH_RANGE_MM).clamp_(-1.0, 1.0).unsqueeze(1)
        batch["target"] = torch.from_numpy(self.target[idx])
        batch["joints"] = torch.from_numpy(self.joints[idx])
        batch["scale"] = torch.from_numpy(self.scale[idx])
        batch["vis"] = torch.from_numpy(self.vis[idx])
        if self.planted is not None:
            batch["planted"] = torch.from_numpy(self.planted[idx])
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
