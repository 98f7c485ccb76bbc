"""The run index: which finished artifacts a store holds, and what they were trained with.

The README has users pass artifact folders (``--set regularizer.prior=runs/meta/<key>``);
``cmkg runs ls`` finds them. ``index`` reads every finished artifact of a store
(``{store}/{stage}/{key[:20]}/`` with its ``meta.json``; ``.partial`` folders, writer locks and
temporary ``.tmp-*`` folders are not artifacts), ``select`` filters by stage, seed and config
entries (``optim.lr=1e-3``), ``format_table`` prints one line per artifact with the config
entries that differ from its preset.

A remote store (``s3://...``) is listed from the URI itself, not from this machine's mirror
(which holds only what this machine trained or read); its paths are shown as
``scheme://bucket/prefix/{stage}/{key[:20]}``, without the credentials of the URI.

Reads JSON and YAML only: no torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from cmkg import config, storage
from cmkg.config import STAGES, Config
from cmkg.console import say
from cmkg.errors import UserError

# config entries that cannot change a result: where it ran and was stored, how it printed
NO_EFFECT = ("run.store", "run.cache", "run.threads", "run.progress", "run.loader_workers",
             "run.device", "data.root")


@dataclass
class Entry:
    """One finished artifact."""

    key: str  # the full sha256 key; its folder is key[:20]
    stage: str
    seed: int | None  # run.seed of its config
    path: str  # its folder, as a user passes it (local path or scheme://bucket/...)
    started: str  # local time, ISO 8601, as meta.json records it ("" if absent)
    duration_s: float | None
    test_epe_mm: float | None
    best_val_epe_mm: float | None
    preset: str | None  # the preset its config names; ``differs`` is relative to it
    config: dict  # the resolved config, flattened: {"optim.lr": 0.001, ...}
    differs: dict  # the entries of ``config`` that differ from the preset's (NO_EFFECT left out)

    @property
    def name(self) -> str:
        """The folder name: what ``inputs.teacher=runs/teacher/<name>`` takes."""
        return self.key[:20]


def index(store: str | Path) -> list[Entry]:
    """Every finished artifact of ``store`` (a local folder or a pyarrow URI), in folder order.

    A UserError when a local store folder does not exist. A folder whose files cannot be read
    is skipped with a warning on stderr."""
    if storage.is_uri(store):
        fs, base = storage.open_uri(str(store), "run.store")
        shown = f"{str(store).split('://', 1)[0]}://{base}"
    else:
        if not Path(store).is_dir():
            raise UserError(f"run.store={store}: no such folder (no artifacts trained there yet?)")
        fs, base, shown = pafs.LocalFileSystem(), Path(store).resolve().as_posix(), str(store)
    entries = []
    for stage in STAGES:
        found = fs.get_file_info(pafs.FileSelector(f"{base}/{stage}", allow_not_found=True))
        for info in sorted(found, key=lambda i: i.base_name):
            name = info.base_name
            if (info.type != pafs.FileType.Directory or name.startswith(".")
                    or name.endswith((".partial", ".lock"))):
                continue
            entry = _entry(fs, info.path, f"{shown}/{stage}/{name}")
            if entry is not None:
                entries.append(entry)
    return entries


def _read(fs: pafs.FileSystem, path: str, parse, default=None):
    try:
        return parse(storage.read_bytes(fs, path))
    except FileNotFoundError:
        return default


def _entry(fs: pafs.FileSystem, folder: str, shown: str) -> Entry | None:
    """The entry of one artifact folder; None when it is not a finished artifact."""
    try:
        meta = _read(fs, f"{folder}/{storage.COMMIT_FILE}", json.loads)
        if meta is None:  # no meta.json: not finished (or a remote upload under way)
            return None
        cfg = _read(fs, f"{folder}/config.yaml", yaml.safe_load) or {}
        metrics = _read(fs, f"{folder}/metrics.json", json.loads, {})
    except (OSError, ValueError, yaml.YAMLError) as e:
        say(f"runs: skipping {shown}: unreadable ({e})")
        return None
    flat = flatten(cfg)
    preset = cfg.get("preset")
    defaults = _defaults(preset)
    differs = {k: v for k, v in flat.items()
               if k not in NO_EFFECT and not (k in defaults and _same(v, defaults[k]))}
    return Entry(key=meta.get("key", shown.rsplit("/", 1)[-1]), stage=meta.get("stage", ""),
                 seed=flat.get("run.seed"), path=shown, started=meta.get("started", ""),
                 duration_s=meta.get("duration_s"),
                 test_epe_mm=(metrics.get("test") or {}).get("epe_mm"),
                 best_val_epe_mm=metrics.get("best_val_epe_mm"), preset=preset, config=flat,
                 differs=differs)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists and null stay values."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


@functools.cache
def _defaults(preset: str | None) -> dict:
    """The flattened resolved preset; the dataclass defaults for none (or an unknown one)."""
    if preset in config.PRESETS:
        return flatten(config.load(preset).to_dict())
    return flatten(Config().to_dict())


def _number(x):
    """A number written as text (YAML 1.1 reads ``1e-3`` as a string) as a float, else ``x``."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a, b) -> bool:
    """Equal with type sense: numbers by value (``1e-3`` == ``0.001`` == ``"1e-3"``, 2 == 2.0),
    lists and mappings item by item, anything else (strings, booleans, null) exactly."""
    if _is_number(a) and isinstance(b, str) or _is_number(b) and isinstance(a, str):
        a, b = _number(a), _number(b)
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _schema(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted config key, nested sections (``data.augment``) and their leaves."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        inner = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                 if dataclasses.is_dataclass(t)]
        if inner:
            out += _schema(inner[0], key + ".")
    return out


def _where(items: list[str], known: set[str]) -> list[tuple[str, object, str]]:
    """``["optim.lr=1e-3"]`` -> ``[("optim.lr", "1e-3" parsed as YAML, "1e-3")]``; a UserError
    naming every item that is malformed or whose key no config has."""
    conds, problems = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            problems.append(f"--where {item!r}: expected key=value")
            continue
        if key not in known:
            leaf = sorted(k for k in known if k.rsplit(".", 1)[-1] == key)
            near = leaf or difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {' or '.join(repr(k) for k in near)}?)" if near else ""
            problems.append(f"--where {key}: unknown config key{hint}")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        conds.append((key, value, raw))
    if problems:
        raise UserError("\n".join(problems))
    return conds


def _matches(flat: dict, key: str, value, raw: str) -> bool:
    if key in flat:
        actual = flat[key]
    else:  # a section (data.augment=null, data.source={...}) or an entry this config lacks
        sub = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
        if not sub:
            return False
        actual = config.nest(sub)
    if isinstance(actual, str):  # a string compares as the string typed
        return actual == (value if isinstance(value, str) else raw)
    return _same(actual, value)


def select(entries: list[Entry], stage: str | None = None, where: list[str] | None = None,
           seed: int | None = None) -> list[Entry]:
    """The entries of ``stage`` with ``run.seed == seed`` whose config has every ``key=value``
    of ``where`` (values read as YAML, compared with type sense: ``optim.lr=1e-3`` finds 0.001).
    A UserError for an unknown stage, or a ``where`` key that no config has (with the nearest
    keys)."""
    if stage is not None and stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    known = set(_schema()).union(*(e.config for e in entries))
    conds = _where(list(where or []), known)
    return [e for e in entries
            if (stage is None or e.stage == stage) and (seed is None or e.seed == seed)
            and all(_matches(e.config, k, v, raw) for k, v, raw in conds)]


def _show(value) -> str:
    """A config value as ``--set``/``--where`` take it: ``0.003``, ``null``, ``[0.8,0.1,0.1]``."""
    if isinstance(value, str) and value and " " not in value:
        return value
    return json.dumps(value, separators=(",", ":"))


def format_table(entries: list[Entry]) -> str:
    """One line per artifact, by stage order then start time: the folder name users pass
    (``key[:20]``), stage, seed, test EPE, start time, preset and the config entries that
    differ from it (run.seed left out: it has its column)."""
    if not entries:
        return "no finished artifacts match"
    order = sorted(entries, key=lambda e: (STAGES.index(e.stage) if e.stage in STAGES
                                           else len(STAGES), e.started, e.key))
    rows = [("KEY", "STAGE", "SEED", "TEST EPE mm", "STARTED", "PRESET", "DIFFERS FROM PRESET")]
    for e in order:
        rows.append((e.name, e.stage, "-" if e.seed is None else str(e.seed),
                     "-" if e.test_epe_mm is None else f"{e.test_epe_mm:.2f}",
                     e.started[:16].replace("T", " ") or "-", e.preset or "-",
                     " ".join(f"{k}={_show(v)}" for k, v in e.differs.items() if k != "run.seed")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    right = {2, 3}  # numbers
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)
