"""Shard store: hand samples as Parquet shards with a JSON manifest.

A dataset is a folder::

    manifest.json            schema version, source (generator/converter config), key, splits,
                             per-shard sample counts and sha256, fingerprint
    train-00000.parquet ...  one row per sample, splits in separate shards
    val-00000.parquet, test-00000.parquet

Columns: ``id`` int64; ``rgb`` S*S*3 uint8 bytes (HWC); ``depth`` S*S uint16 bytes in units of
``depth_unit_mm`` (absent when the dataset has no depth); ``mask`` S*S uint8 bytes (1 = hand);
``joints3d`` 63 float32 (mm, camera frame, our joint order); ``joints2d`` 42 float32 (px);
``vis`` 21 uint8; ``K`` 9 float32.

The folder is written under a temporary name and renamed when complete, so a killed run never
leaves a readable half-dataset. ``key`` content-addresses the source config: asking for the same
dataset again reuses the folder. ``fingerprint`` hashes the shard checksums and identifies the
bytes a model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmkg import hand, synth
from cmkg.atomic import atomic_dir, sha256_file
from cmkg.errors import DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
DEPTH_UNIT_MM = 0.1  # uint16 depth: 0.1 mm steps up to 6.5 m


def config_key(config: dict) -> str:
    """Content address of a generator/converter config: sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _schema(size: int, with_depth: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.int64()),
        pa.field("rgb", pa.binary(size * size * 3)),
        *([pa.field("depth", pa.binary(size * size * 2))] if with_depth else []),
        pa.field("mask", pa.binary(size * size)),
        pa.field("joints3d", pa.list_(pa.float32(), 63)),
        pa.field("joints2d", pa.list_(pa.float32(), 42)),
        pa.field("vis", pa.list_(pa.uint8(), 21)),
        pa.field("K", pa.list_(pa.float32(), 9)),
    ]
    return pa.schema(fields)


def _fixed(values: np.ndarray, width: int, typ: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), typ), width)


def _binary(values: np.ndarray, size: int) -> pa.Array:
    flat = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat.tobytes())])


class DatasetWriter:
    """Writes samples split by split into a temporary folder; ``commit`` makes it visible.

    Used by the synthetic generator and the real-dataset converters alike::

        with DatasetWriter(out, source, size=64, with_depth=True) as w:
            w.add("train", batch)   # dict of arrays as returned by synth.render
    """

    def __init__(self, out: str | Path, source: dict, size: int, with_depth: bool,
                 shard_size: int = 1000):
        self.out, self.source, self.size = Path(out), source, size
        self.with_depth, self.shard_size = with_depth, shard_size
        self.schema = _schema(size, with_depth)
        self.splits: dict[str, dict] = {s: {"num": 0, "shards": []} for s in SPLITS}
        self._pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self._ctx = None

    def __enter__(self) -> DatasetWriter:
        self._ctx = atomic_dir(self.out)
        self.tmp = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        if exc[0] is None:
            try:
                for split in SPLITS:
                    self._flush(split, final=True)
                self._write_manifest()
            except BaseException:
                self._ctx.__exit__(*sys.exc_info())
                raise
        return self._ctx.__exit__(*exc)

    def add(self, split: str, batch: dict[str, np.ndarray], first_id: int = 0,
            ids: np.ndarray | None = None) -> None:
        """Append samples to ``split``; their ids are ``ids`` or first_id, first_id + 1, ..."""
        n = len(batch["joints3d"])
        s = self.size
        cols = {
            "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64) if ids is None
                           else np.asarray(ids, dtype=np.int64)),
            "rgb": _binary(batch["rgb"].astype(np.uint8), s),
        }
        if self.with_depth:
            depth = np.round(batch["depth"] / DEPTH_UNIT_MM)
            cols["depth"] = _binary(np.clip(depth, 0, 65535).astype("<u2"), s)
        cols.update(
            mask=_binary(batch["mask"].astype(np.uint8), s),
            joints3d=_fixed(batch["joints3d"].astype(np.float32), 63, pa.float32()),
            joints2d=_fixed(batch["joints2d"].astype(np.float32), 42, pa.float32()),
            vis=_fixed(batch["vis"].astype(np.uint8), 21, pa.uint8()),
            K=_fixed(batch["K"].astype(np.float32), 9, pa.float32()),
        )
        self._pending[split].append(pa.table(cols, schema=self.schema))
        self._flush(split)

    def _flush(self, split: str, final: bool = False) -> None:
        pending = self._pending[split]
        rows = sum(t.num_rows for t in pending)
        while rows >= self.shard_size or (final and rows > 0):
            table = pa.concat_tables(pending)
            take = min(self.shard_size, rows)
            shard, rest = table.slice(0, take), table.slice(take)
            name = f"{split}-{len(self.splits[split]['shards']):05d}.parquet"
            pq.write_table(shard, self.tmp / name, compression="zstd")
            self.splits[split]["shards"].append(
                {"file": name, "num": take, "sha256": sha256_file(self.tmp / name)})
            self.splits[split]["num"] += take
            pending[:] = [rest] if rest.num_rows else []
            rows -= take

    def _write_manifest(self) -> None:
        checksums = [sh["sha256"] for s in SPLITS for sh in self.splits[s]["shards"]]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "size": self.size,
            "depth_unit_mm": DEPTH_UNIT_MM,
            "modalities": ["rgb", "depth"] if self.with_depth else ["rgb"],
            "source": self.source,
            "key": config_key(self.source),
            "splits": self.splits,
            "num": sum(self.splits[s]["num"] for s in SPLITS),
            "fingerprint": hashlib.sha256("".join(checksums).encode()).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{root}: not a cmkg dataset (no manifest.json); create one with "
                        "`cmkg data synth` or `cmkg data convert`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt manifest ({e})") from None
    for key in ("schema_version", "size", "splits", "fingerprint", "modalities"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks the key {key!r}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {manifest['schema_version']}, this cmkg reads "
                        f"{SCHEMA_VERSION}; regenerate or reconvert the dataset")
    return manifest


def read_split(root: str | Path, split: str, columns: list[str], verify: bool = True) -> dict:
    """Columns of one split as numpy arrays: images (N, S, S[, 3]), joints (N, 21, 3), ..."""
    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{root}/manifest.json: no split {split!r}")
    if "depth" in columns and "depth" not in manifest["modalities"]:
        raise DataError(f"{root}: the dataset has no depth maps (modalities: "
                        f"{manifest['modalities']}); the teacher and kd stages need paired depth")
    s = manifest["size"]
    tables = []
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(f"{path}: checksum mismatch, the shard is corrupt; regenerate it")
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable shard ({e})") from None
    if not tables:
        raise DataError(f"{root}: split {split!r} is empty")
    table = pa.concat_tables(tables)
    shapes = {"rgb": (s, s, 3), "mask": (s, s), "joints3d": (21, 3), "joints2d": (21, 2),
              "vis": (21,), "K": (3, 3)}
    dtypes = {"rgb": np.uint8, "mask": np.uint8, "depth": np.dtype("<u2"), "vis": np.uint8}
    out = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        if name == "id":
            out[name] = col.to_numpy()
        elif pa.types.is_fixed_size_binary(col.type):
            buf = col.buffers()[1]
            width = col.type.byte_width
            arr = np.frombuffer(buf, dtypes[name], count=len(col) * width // np.dtype(
                dtypes[name]).itemsize, offset=col.offset * width)
            out[name] = arr.reshape(len(col), *shapes.get(name, (s, s)))
        else:
            out[name] = col.flatten().to_numpy().reshape(len(col), *shapes[name])
    if "depth" in out:
        out["depth"] = out["depth"].astype(np.float32) * manifest["depth_unit_mm"]
    if "vis" in out:
        out["vis"] = out["vis"].astype(bool)
    return out


def existing(out: Path, source: dict) -> dict | None:
    """The manifest at ``out`` if it holds the dataset ``source`` describes, None if ``out`` is
    free (absent or an empty folder); refuses an ``out`` holding anything else."""
    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        if manifest.get("key") == config_key(source):
            return manifest
        raise DataError(f"{out}: holds a different dataset ({manifest.get('source')}); "
                        "choose another --out or remove it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a cmkg dataset; choose another --out")
    return None


# ---------------------------------------------------------------------------------------------
# Synthetic datasets
# ---------------------------------------------------------------------------------------------

def synth_source(domain: str, num: int, size: int, seed: int,
                 split: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 knobs: dict | None = None) -> dict:
    """The generator config that content-addresses a synthetic dataset.

    A sequence domain (stb-like) is split by sequence, not by ``split``: its source records
    the sequences of each split and the frames per sequence instead of the fractions. The
    domain's ``knobs`` (``synth.variant``) are recorded only when some are set, so a named
    domain's address is what it was before knobs existed."""
    source = {"generator": "cmkg.synth", "version": synth.GENERATOR_VERSION, "domain": domain,
              "num": int(num), "size": int(size), "seed": int(seed)}
    if knobs:
        source["knobs"] = {k: knobs[k] for k in sorted(knobs)}
    seqs = synth.variant(domain, knobs).sequences if domain in synth.DOMAINS else None
    if seqs is None:
        return {**source, "split": [float(x) for x in split]}
    return {**source, "sequence_version": synth.SEQUENCE_VERSION,
            "frames_per_sequence": int(num) // len(seqs.names), "split_by": "sequence",
            "sequences": seqs.split()}


def split_counts(num: int, split: tuple[float, float, float]) -> dict[str, int]:
    val, test = round(num * split[1]), round(num * split[2])
    return {"train": num - val - test, "val": val, "test": test}


def _blocks(domain: str, num: int, split: tuple[float, float, float], knobs: dict | None = None):
    """What to render, in writing order: (split, stream start, stream stop, sample ids).

    i.i.d. domain: contiguous, disjoint ranges of the sample stream, train first, then val,
    then test, ids = stream indices. Sequence domain: every sequence of a split, whole, ids
    ``ID_STRIDE * sequence index + frame``."""
    seqs = synth.variant(domain, knobs).sequences
    if seqs is None:
        counts, first = split_counts(num, split), 0
        for name in SPLITS:
            for lo in range(first, first + counts[name], synth.BLOCK):
                hi = min(lo + synth.BLOCK, first + counts[name])
                yield name, lo, hi, np.arange(lo, hi)
            first += counts[name]
        return
    frames = num // len(seqs.names)
    for name, members in seqs.split().items():
        for seq in (seqs.names.index(m) for m in members):
            for lo in range(0, frames, synth.BLOCK):
                hi = min(lo + synth.BLOCK, frames)
                ids = synth.ID_STRIDE * seq + np.arange(lo, hi)
                yield name, seq * frames + lo, seq * frames + hi, ids


def synthesize(out: str | Path, domain: str, num: int, size: int, seed: int = 0,
               split: tuple[float, float, float] = (0.8, 0.1, 0.1), shard_size: int = 1000,
               progress: bool = True, knobs: dict | None = None) -> dict:
    """Render ``num`` paired samples of ``domain`` into the dataset folder ``out``.

    Reuses ``out`` when it already holds this exact config (returns its manifest); refuses to
    overwrite a different dataset. An i.i.d. domain is split into contiguous, disjoint ranges
    of the sample stream by the ``split`` fractions: train first, then val, then test. A
    sequence domain (stb-like) ignores ``split``: it renders ``num // S`` frames of each of its
    S sequences (the remainder ``num % S`` is dropped, so the dataset holds S * (num // S)
    samples) and splits by sequence, B1Counting and B1Random -> test, B6Random -> val, the
    rest -> train (``synth.Sequences``; the manifest's source lists them). ``knobs`` change
    the named domain's appearance, viewpoint or sequences (``synth.variant``)."""
    if domain not in synth.DOMAINS:
        raise DataError(f"unknown domain {domain!r}; choose one of {', '.join(synth.DOMAINS)}")
    try:
        seqs = synth.variant(domain, knobs).sequences
    except KeyError as e:
        raise DataError(e.args[0]) from None
    if seqs is not None and not 1 <= num // len(seqs.names) < synth.ID_STRIDE:
        raise DataError(f"{domain}: num={num} samples for {len(seqs.names)} sequences; it "
                        f"needs between 1 and {synth.ID_STRIDE - 1} frames per sequence")
    out = Path(out)
    source = synth_source(domain, num, size, seed, split, knobs)
    if (done := existing(out, source)) is not None:
        return done
    if out.exists():
        out.rmdir()
    start = time.perf_counter()
    try:
        _render_into(out, source, domain, seed, size, num, split, shard_size, progress, start,
                     knobs)
    except OSError:
        # another process (a second worker) published the same dataset first: use theirs
        if (out / "manifest.json").exists() and read_manifest(out).get("key") == config_key(source):
            return read_manifest(out)
        raise
    manifest = read_manifest(out)
    if progress:
        rate = manifest["num"] / (time.perf_counter() - start)
        print(f"\rsynth {domain}: {manifest['num']} samples at {size}px in {out} ({rate:.0f}/s)",
              file=sys.stderr, flush=True)
    return manifest


def _render_into(out: Path, source: dict, domain: str, seed: int, size: int, num: int,
                 split: tuple[float, float, float], shard_size: int, progress: bool,
                 start: float, knobs: dict | None = None) -> None:
    seqs = synth.variant(domain, knobs).sequences
    # the stream of a sequence domain depends on its length
    frames = None if seqs is None else num // len(seqs.names)
    blocks = list(_blocks(domain, num, split, knobs))
    total = sum(hi - lo for _, lo, hi, _ in blocks)
    done = 0
    with DatasetWriter(out, source, size, with_depth=True, shard_size=shard_size) as writer:
        for name, lo, hi, ids in blocks:
            writer.add(name, synth.render_range(domain, seed, size, lo, hi, frames, knobs),
                       ids=ids)
            done += hi - lo
            if progress and sys.stderr.isatty():
                rate = done / (time.perf_counter() - start)
                print(f"\rsynth {domain}: {done}/{total} samples ({rate:.0f}/s)", end="",
                      file=sys.stderr, flush=True)


def joint_targets(joints3d: np.ndarray) -> dict[str, np.ndarray]:
    """Network targets and evaluation terms from camera-frame joints (N, 21, 3) mm."""
    scale, root = hand.scale_and_root(joints3d)
    return {"target": hand.normalise(joints3d).astype(np.float32),
            "scale": scale.astype(np.float32), "root": root.astype(np.float32)}
