"""Planted knowledge: extra input channels of the RGB networks (``data.planted``), a positive
control of the prior that is off by default (docs/benchmark.md, "Planted knowledge").

Each of the ``channels`` extra channels is a constant map per image, so a dataset holds one
value per image and channel (``values``), and ``prepare_batch`` expands them beside the RGB
channels. The values are

- independent N(0, 1) noise on every split of the source and on the target's val and test
  splits: nothing to learn there, and a network trained on the source has reason to ignore them;
- on the target's train split only, a shortcut: ``cue`` x u + sqrt(1 - cue^2) x noise, u a fixed
  random projection of the image's regression target, standardised over the split. A student
  trained on that split alone can read part of the pose from them, and pays at test time, where
  they are noise of the same marginal.

So knowledge that transfers from source to target exists by construction, and a diagonal prior
can carry it: large phi on the first convolution's weights of the extra channels. Every draw is
a function of ``seed``, the dataset's fingerprint and the split, never of a run's seed.
"""

from __future__ import annotations

import zlib

import numpy as np

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
PROJECTION_STREAM = 7  # the projections' own stream of ``seed`` (the noise's are per dataset)


def projections(seed: int, channels: int, dim: int) -> np.ndarray:
    """The fixed (channels, dim) Gaussian projections of the flattened regression target."""
    return np.random.default_rng([seed, PROJECTION_STREAM]).standard_normal((channels, dim))


def values(seed: int, channels: int, cue: float, fingerprint: str, split: str,
           target: np.ndarray, shortcut: bool) -> np.ndarray:
    """(N, channels) float32 channel values of one split of one dataset; ``target`` (N, 21, 3).
    ``shortcut`` (the target's train split) mixes in the pose projections with weight ``cue``."""
    n = len(target)
    rng = np.random.default_rng([seed, zlib.crc32(fingerprint.encode()), SPLIT_CODES[split]])
    noise = rng.standard_normal((n, channels))
    if not shortcut or cue == 0:
        return noise.astype(np.float32)
    u = target.reshape(n, -1).astype(np.float64) @ projections(seed, channels,
                                                                target[0].size).T
    u = (u - u.mean(0)) / np.maximum(u.std(0), 1e-12)
    return (cue * u + np.sqrt(1.0 - cue ** 2) * noise).astype(np.float32)
