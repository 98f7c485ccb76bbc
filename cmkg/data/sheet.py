"""Contact sheets of a dataset folder: ``cmkg data show``.

One tile per sample, three panels side by side and a caption under them::

    +-----------+-----------+-----------+
    |    RGB    |   depth   | RGB + 2D  |   PANEL px high, each panel PANEL px wide
    |           |           |  joints   |
    +-----------+-----------+-----------+
      stb-like | test | id 10003           CAPTION px: domain, split, sample id,
      sequence B1Random, frame 3           and the sequence where the data has them

The depth panel shows what the teacher sees, ``(d - z_root) / 150 mm`` clipped to [-1, 1]
(``cmkg.data.dataset``); a dataset without depth gets a grey panel saying so. The joints are
the 21 camera-frame joints projected with the sample's ``K`` (what ``joints2d`` stores), bones
coloured by finger, a hollow marker where the joint is not visible. Tiles fill rows of
``COLUMNS`` (fewer when there are fewer samples), ``GAP`` px of background between them and
around the sheet, so the PNG is exactly ``sheet_size(n)`` pixels.

The samples are spread evenly over the chosen split (or over train, val and test in turn), and
only their shards' rows are decoded; shard checksums are not verified (training does that).
Matplotlib draws with the Agg canvas, never pyplot's global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmkg import hand, synth
from cmkg.atomic import atomic_path
from cmkg.data.dataset import DEPTH_RANGE_MM
from cmkg.data.store import SPLITS, read_manifest
from cmkg.errors import DataError, UserError

PANEL = 128  # px: each of a tile's three panels is PANEL x PANEL
CAPTION = 30  # px under the panels: two lines of 8 pt text at DPI
GAP = 6  # px of background between tiles and around the sheet
COLUMNS = 4  # tiles per row
DPI = 100
BACKGROUND = (1.0, 1.0, 1.0)
FINGER_COLOURS = ("#e41a1c", "#ff7f00", "#4daf4a", "#377eb8", "#984ea3")  # thumb .. little


@dataclass
class Sheet:
    """What ``contact_sheet`` drew."""

    out: Path
    size: tuple[int, int]  # (width, height) px of the PNG
    splits: list[str]  # per tile
    ids: list[int]  # per tile, the samples' ``id``
    captions: list[str]  # per tile, the caption's text (its lines joined by "\n")


def grid(n: int, columns: int = COLUMNS) -> tuple[int, int]:
    """(rows, columns) of the tiles of ``n`` samples."""
    cols = max(1, min(n, columns))
    return math.ceil(n / cols), cols


def tile_size(panel: int = PANEL) -> tuple[int, int]:
    """(width, height) px of one tile: three panels and the caption band."""
    return 3 * panel, panel + CAPTION


def sheet_size(n: int, panel: int = PANEL, columns: int = COLUMNS) -> tuple[int, int]:
    """(width, height) px of the sheet of ``n`` tiles."""
    rows, cols = grid(n, columns)
    w, h = tile_size(panel)
    return cols * w + (cols + 1) * GAP, rows * h + (rows + 1) * GAP


def tile_origin(i: int, panel: int = PANEL, columns: int = COLUMNS) -> tuple[int, int]:
    """(x, y) px of the top-left corner of tile ``i`` (row-major), from the sheet's top-left."""
    cols = max(1, columns)
    w, h = tile_size(panel)
    return GAP + (i % cols) * (w + GAP), GAP + (i // cols) * (h + GAP)


# ---------------------------------------------------------------------------------------------
# Reading the samples
# ---------------------------------------------------------------------------------------------

def _check(root: str | Path, split: str | None, n: int) -> dict:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"--n {n}: the number of samples must be >= 1")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DATASET {root}: no such folder")
    if not (root / "manifest.json").is_file():
        raise UserError(f"DATASET {root}: not a dataset folder (no manifest.json); make one "
                        "with `cmkg data synth` or `cmkg data convert`")
    try:
        manifest = read_manifest(root)
    except DataError as e:
        raise UserError(f"DATASET {root}: {e}") from None
    present = [s for s in SPLITS if manifest["splits"].get(s, {}).get("num", 0) > 0]
    if split is not None:
        if split not in manifest["splits"]:
            raise UserError(f"--split {split}: unknown split; this dataset has "
                            f"{', '.join(manifest['splits'])}")
        if split not in present:
            raise UserError(f"--split {split}: the split is empty in {root}")
    elif not present:
        raise UserError(f"DATASET {root}: holds no samples")
    return manifest


def _pick(manifest: dict, split: str | None, n: int) -> list[tuple[str, int]]:
    """(split, row within the split) of ``n`` samples spread evenly over the split, or over
    the non-empty splits in train, val, test order (all of them when there are fewer)."""
    splits = [split] if split else [s for s in SPLITS if s in manifest["splits"]]
    pool = [(s, i) for s in splits for i in range(manifest["splits"][s]["num"])]
    take = min(n, len(pool))
    at = np.linspace(0, len(pool) - 1, take).round().astype(int) if take > 1 else [0]
    return [pool[i] for i in at]


def _decode_rows(root: Path, manifest: dict, split: str, rows: list[int]) -> dict:
    """The columns of ``rows`` of one split, reading only the shards that hold them."""
    s = manifest["size"]
    depth = "depth" in manifest["modalities"]
    columns = ["id", "rgb", *(["depth"] if depth else []), "joints3d", "vis", "K"]
    out: dict[str, list] = {c: [] for c in columns}
    first = 0
    wanted = sorted(rows)
    for shard in manifest["splits"][split]["shards"]:
        mine = [r - first for r in wanted if first <= r < first + shard["num"]]
        first += shard["num"]
        if not mine:
            continue
        path = root / shard["file"]
        try:
            table = pq.read_table(path, columns=columns).take(pa.array(mine))
        except (pa.ArrowException, OSError, IndexError) as e:
            raise DataError(f"{path}: unreadable shard ({e})") from None
        for r in table.to_pylist():
            out["id"].append(int(r["id"]))
            out["rgb"].append(np.frombuffer(r["rgb"], np.uint8).reshape(s, s, 3))
            if depth:
                out["depth"].append(np.frombuffer(r["depth"], "<u2").reshape(s, s)
                                    .astype(np.float32) * manifest["depth_unit_mm"])
            out["joints3d"].append(np.asarray(r["joints3d"], np.float64).reshape(21, 3))
            out["vis"].append(np.asarray(r["vis"], bool))
            out["K"].append(np.asarray(r["K"], np.float64).reshape(3, 3))
    order = np.argsort(np.argsort(rows))  # back to the order asked
    return {c: [v[i] for i in order] for c, v in out.items()}


def _sequences(source: dict) -> tuple[tuple[str, ...], int] | None:
    """(sequence names, id stride) of a dataset whose ids encode a sequence, else None."""
    domain = synth.DOMAINS.get(source.get("domain", ""))
    if source.get("split_by") == "sequence" and domain is not None and domain.sequences:
        return domain.sequences.names, synth.ID_STRIDE
    if source.get("dataset") == "stb":
        from cmkg.data.convert import stb

        return tuple(stb.SEQUENCES), stb.ID_STRIDE
    return None


def caption(domain: str, split: str, sample_id: int, sequences) -> str:
    """The two caption lines of a tile: domain, split and id; the sequence and frame where the
    dataset has sequences (the second line is empty otherwise)."""
    second = ""
    if sequences is not None:
        names, stride = sequences
        k, frame = divmod(int(sample_id), stride)
        if 0 <= k < len(names):
            second = f"sequence {names[k]}, frame {frame}"
    return f"{domain} | {split} | id {sample_id}\n{second}".rstrip()


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def project(joints3d: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(21, 2) pixel coordinates of camera-frame joints (mm) under the intrinsics ``K``."""
    uvw = joints3d @ K.T
    return uvw[:, :2] / uvw[:, 2:]


def contact_sheet(root: str | Path, out: str | Path, split: str | None = None, n: int = 32,
                  panel: int = PANEL, columns: int = COLUMNS) -> Sheet:
    """Draw ``n`` samples of the dataset folder ``root`` (of ``split``, or of every split) into
    the PNG ``out``, written atomically. A UserError naming the argument for a folder that is
    not a dataset, an unknown or empty split, or ``n < 1``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    manifest = _check(root, split, n)
    root = Path(root)
    source = manifest.get("source") or {}
    domain = str(source.get("domain") or source.get("dataset") or root.name)
    sequences = _sequences(source)
    picked = _pick(manifest, split, n)
    samples: list[tuple[str, dict]] = []
    for s in dict.fromkeys(sp for sp, _ in picked):
        rows = [r for sp, r in picked if sp == s]
        data = _decode_rows(root, manifest, s, rows)
        samples += [(s, {c: v[i] for c, v in data.items()}) for i in range(len(rows))]

    width, height = sheet_size(len(samples), panel, columns)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    size = manifest["size"]
    captions = []
    for i, (s, sample) in enumerate(samples):
        x, y = tile_origin(i, panel, columns)
        axes = [fig.add_axes(((x + k * panel) / width, 1 - (y + panel) / height,
                              panel / width, panel / height)) for k in range(3)]
        _draw_tile(axes, sample, size, panel)
        text = caption(domain, s, sample["id"], sequences)
        captions.append(text)
        fig.text((x + 1.5 * panel) / width, 1 - (y + panel + 3) / height, text, ha="center",
                 va="top", fontsize=8, linespacing=1.1)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor=BACKGROUND)
    return Sheet(out, (width, height), [s for s, _ in samples],
                 [smp["id"] for _, smp in samples], captions)


def _draw_tile(axes, sample: dict, size: int, panel: int) -> None:
    interp = "nearest" if panel >= size else "antialiased"
    rgb_ax, depth_ax, joints_ax = axes
    for ax in axes:
        ax.set_axis_off()
    rgb_ax.imshow(sample["rgb"], interpolation=interp)
    if "depth" in sample:
        rel = (sample["depth"] - sample["joints3d"][hand.ROOT, 2]) / DEPTH_RANGE_MM
        depth_ax.imshow(np.clip(rel, -1, 1), cmap="viridis", vmin=-1, vmax=1,
                        interpolation=interp)
    else:
        depth_ax.imshow(np.full((size, size), 0.85), cmap="gray", vmin=0, vmax=1)
        depth_ax.text(size / 2, size / 2, "no depth", ha="center", va="center", fontsize=8)
    joints_ax.imshow(sample["rgb"], interpolation=interp)
    uv = project(sample["joints3d"], sample["K"]) - 0.5  # pixel i's centre is at i in imshow
    vis = sample["vis"]
    scale = panel / 128
    for j in range(1, hand.NUM_JOINTS):
        p = hand.PARENTS[j]
        joints_ax.plot(uv[[p, j], 0], uv[[p, j], 1], color=FINGER_COLOURS[(j - 1) // 4],
                       linewidth=1.2 * scale, solid_capstyle="round")
    colours = np.array(["black"] + [FINGER_COLOURS[(j - 1) // 4]
                                    for j in range(1, hand.NUM_JOINTS)])
    size_pt = 9 * scale**2
    if vis.any():
        joints_ax.scatter(uv[vis, 0], uv[vis, 1], s=size_pt, c=list(colours[vis]),
                          edgecolors="white", linewidths=0.4 * scale, zorder=3)
    if (~vis).any():  # a hollow ring where the joint is occluded or outside the image
        joints_ax.scatter(uv[~vis, 0], uv[~vis, 1], s=size_pt, facecolors="none",
                          edgecolors=list(colours[~vis]), linewidths=0.8 * scale, zorder=3)
    for ax in axes:
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
