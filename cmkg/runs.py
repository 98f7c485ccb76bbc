"""The run index: which finished artifacts a store holds, and what they were trained with.

The README has users pass artifact folders (``--set regularizer.prior=runs/meta/<key>``);
``cmkg runs ls`` finds them. ``index`` reads every finished artifact of a store
(``{store}/{stage}/{key[:20]}/`` with its ``meta.json``; ``.partial`` folders, writer locks,
temporary ``.tmp-*`` folders and corrupt artifacts set aside as ``.corrupt-*`` are not artifacts), ``select`` filters by stage, seed and config
entries (``optim.lr=1e-3``), ``format_table`` prints one line per artifact with the config
entries that differ from its preset.

A remote store (``s3://...``) is listed from the URI itself, not from this machine's mirror
(which holds only what this machine trained or read); its paths are shown as
``scheme://bucket/prefix/{stage}/{key[:20]}``, without the credentials of the URI.

``cmkg runs show`` prints one artifact (``find`` takes a unique key prefix): its lineage (the
``inputs`` of meta.json, recursively), the entries that differ from its preset, its metrics,
and what references it; ``cmkg runs diff`` two side by side (``diff_rows``). The references
(``reference_files``, ``references``) are the result records (Parquet, ``artifacts`` column)
and the φ diagnostics' records (``phi.json``: each seed's meta variants and their student)
under ``{store}/reports/*/results/``, ``{store}/_results/*/`` and any ``--report DIR``, and the
sweeps' ``{store}/_tune/*/best.yaml``. ``cmkg runs gc`` removes, in a local store, the finished
artifacts none of them names, directly or as an input of one that is named (``referenced``),
and leftover ``.partial`` folders, never one whose writer lock a live process holds.

Reads JSON, YAML and the records' Parquet: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from cmkg import config, storage
from cmkg.config import STAGES, Config
from cmkg.console import say
from cmkg.errors import UserError
from cmkg.yamlfile import assignment

# config entries that cannot change a result: where it ran and was stored, how it printed
NO_EFFECT = ("run.store", "run.cache", "run.threads", "run.progress", "run.loader_workers",
             "run.device", "data.root", "run.tracking.backend", "run.tracking.uri")


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
    test_auc_20_50: float | None = None
    best_epoch: int | None = None
    mean_pose_epe_mm: float | None = None  # predicting the training set's mean pose, on test
    mean_pose_auc_20_50: float | None = None
    inputs: dict = dataclasses.field(default_factory=dict)  # input stage -> its key, stage order
    input_paths: dict = dataclasses.field(default_factory=dict)  # upstream stage -> its folder
    code_version: str = ""

    @property
    def name(self) -> str:
        """The folder name: what ``inputs.teacher=runs/teacher/<name>`` takes."""
        return self.key[:20]


def index(store: str | Path, missing_ok: bool = False) -> list[Entry]:
    """Every finished artifact of ``store`` (a local folder or a pyarrow URI), in folder order.

    A UserError when a local store folder does not exist, unless ``missing_ok`` (``cmkg runs
    ls``: a store nothing was trained into yet is empty, not an error). A folder whose files
    cannot be read is skipped with a warning on stderr."""
    if storage.is_uri(store):
        fs, base = storage.open_uri(str(store), "run.store")
        shown = f"{str(store).split('://', 1)[0]}://{base}"
    else:
        if missing_ok and not Path(store).exists():
            return []
        if not Path(store).is_dir():
            raise UserError(f"run.store={store}: no such folder (no artifacts trained there yet?)")
        fs, base, shown = pafs.LocalFileSystem(), Path(store).resolve().as_posix(), str(store)
    entries = []
    for stage in STAGES:
        found = fs.get_file_info(pafs.FileSelector(f"{base}/{stage}", allow_not_found=True))
        for info in sorted(found, key=lambda i: i.base_name):
            name = info.base_name
            if (info.type != pafs.FileType.Directory or name.startswith(".")
                    or name.endswith((".partial", ".lock")) or ".corrupt-" in name):
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
    test, base = metrics.get("test") or {}, metrics.get("mean_pose_test") or {}
    inputs = {d: i for d, i in sorted((meta.get("inputs") or {}).items(), key=_stage_order)
              if isinstance(i, dict)}  # meta.json's keys are sorted: stage order instead
    return Entry(key=meta.get("key", shown.rsplit("/", 1)[-1]), stage=meta.get("stage", ""),
                 seed=flat.get("run.seed"), path=shown, started=meta.get("started", ""),
                 duration_s=meta.get("duration_s"), test_epe_mm=test.get("epe_mm"),
                 best_val_epe_mm=metrics.get("best_val_epe_mm"), preset=preset, config=flat,
                 differs=differs, test_auc_20_50=test.get("auc_20_50"),
                 best_epoch=metrics.get("best_epoch"), mean_pose_epe_mm=base.get("epe_mm"),
                 mean_pose_auc_20_50=base.get("auc_20_50"),
                 inputs={d: i.get("key", "") for d, i in inputs.items()},
                 input_paths={d: i.get("path", "") for d, i in inputs.items()},
                 code_version=meta.get("code_version", ""))


def _stage_order(item: tuple[str, object]) -> tuple[int, str]:
    return (STAGES.index(item[0]) if item[0] in STAGES else len(STAGES), item[0])


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
        parsed = assignment(item, "--where", problems)
        if parsed is None:
            continue
        key, value, raw = parsed
        if key not in known:
            leaf = sorted(k for k in known if k.rsplit(".", 1)[-1] == key)
            near = leaf or difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {' or '.join(repr(k) for k in near)}?)" if near else ""
            problems.append(f"--where {key}: unknown config key{hint}")
            continue
        conds.append((key, value, raw.strip()))
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


# ---------------------------------------------------------------------------------------------
# cmkg runs show / diff: one artifact, two side by side
# ---------------------------------------------------------------------------------------------

def find(entries: list[Entry], query: str) -> Entry:
    """The entry whose key starts with ``query`` (a folder name, a prefix of a key, or a path
    ending in one: ``runs/kd/<name>``). A UserError listing the candidates when several match
    or none does."""
    q = str(query).rstrip("/").rsplit("/", 1)[-1].strip().lower()
    if not q:
        raise UserError(f"KEY {query!r}: empty; give a key or a prefix of one (cmkg runs ls)")
    hits = [e for e in entries if e.key.lower().startswith(q) or e.name.lower().startswith(q)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UserError(f"KEY {query}: {len(hits)} artifacts match; give more of the key:\n"
                        + _candidates(hits))
    if not entries:
        raise UserError(f"KEY {query}: the store holds no finished artifacts")
    best = max(_common_prefix(e.key, q) for e in entries)
    near = [e for e in entries if _common_prefix(e.key, q) == best]
    raise UserError(f"KEY {query}: no artifact key starts with {q!r}; the nearest "
                    f"({best} character{'' if best == 1 else 's'} in common):\n" + _candidates(near))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _candidates(entries: list[Entry], limit: int = 10) -> str:
    lines = [f"  {e.name}  {e.stage:<7}  seed {'-' if e.seed is None else e.seed}  {e.path}"
             for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    return "\n".join(lines)


def _by_id(entries: list[Entry]) -> dict[tuple[str, str], Entry]:
    return {(e.stage, e.name): e for e in entries}


def _upstream(entry: Entry) -> list[tuple[str, str]]:
    """(stage, folder name) of the artifact's direct inputs, in meta.json's order."""
    return [(d, k[:20]) for d, k in entry.inputs.items() if k]


def lineage(entry: Entry, entries: list[Entry]) -> list[str]:
    """The artifact and its inputs (meta.json's ``inputs``), recursively, as a tree."""
    by_id = _by_id(entries)

    def label(e: Entry) -> str:
        epe = "-" if e.test_epe_mm is None else f"{e.test_epe_mm:.2f}"
        return f"{e.stage} {e.name}  seed {'-' if e.seed is None else e.seed}  test EPE {epe}"

    lines = [label(entry)]

    def walk(e: Entry, indent: str) -> None:
        ups = list(e.inputs.items())
        for i, (dep, key) in enumerate(ups):
            last = i == len(ups) - 1
            branch, more = ("└── ", "    ") if last else ("├── ", "│   ")
            up = by_id.get((dep, key[:20]))
            if up is None:
                where = e.input_paths.get(dep) or "?"
                lines.append(f"{indent}{branch}{dep} {key[:20]}  (not in this store: {where})")
                continue
            lines.append(indent + branch + label(up))
            walk(up, indent + more)

    walk(entry, "")
    return lines


@dataclass(frozen=True)
class Reference:
    """One place that names an artifact: a result record, a phi record or a sweep's best.yaml."""

    source: str  # the file
    stage: str
    name: str  # key[:20]
    what: str  # the cell ("table1 'L_REG' / 'kd' seed 0") or the sweep's best trial


def reference_files(root: Path, report_dirs: list[str] | tuple = ()) -> list[Path]:
    """The files that can name artifacts of the local store folder ``root``: result records
    (``reports/*/results/*.parquet``, ``_results/*/*.parquet``, ``DIR/results/*.parquet`` of
    every ``--report DIR``), the φ diagnostics' records (``phi.json`` in the same folders) and
    sweep summaries (``_tune/*/best.yaml``)."""
    root = Path(root)
    globs = [(root / "reports", "*/results/*.parquet"), (root / "_results", "*/*.parquet"),
             (root / "reports", "*/results/phi.json"), (root / "_results", "*/phi.json"),
             (root / "_tune", "*/best.yaml")]
    for d in report_dirs:
        if not Path(d).is_dir():
            raise UserError(f"--report {d}: no such folder")
        globs += [(Path(d) / "results", "*.parquet"), (Path(d), "*.parquet"),
                  (Path(d) / "results", "phi.json"), (Path(d), "phi.json")]
    seen: dict[Path, Path] = {}
    for base, pattern in globs:
        for p in sorted(base.glob(pattern)) if base.is_dir() else []:
            if not p.name.startswith(".") and p.is_file():
                seen.setdefault(p.resolve(), p)
    return list(seen.values())


def references(files: list[Path]) -> tuple[list[Reference], list[str]]:
    """(every artifact the files name, the problems: files that could not be read)."""
    refs, problems = [], []
    for path in files:
        try:
            refs += (_best_refs(path) if path.suffix == ".yaml" else _phi_refs(path)
                     if path.suffix == ".json" else _record_refs(path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException,
                yaml.YAMLError) as e:
            problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
    return refs, problems


def _record_refs(path: Path) -> list[Reference]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if "artifacts" not in names:
        raise ValueError("no artifacts column: not a result record file")
    cols = [c for c in ("table", "row", "column", "seed", "stage", "key", "artifacts", "chosen")
            if c in names]
    out = []
    for r in pq.read_table(path, columns=cols).to_pylist():
        what = f"{r.get('table')} {r.get('row')!r} / {r.get('column')!r} seed {r.get('seed')}"
        chain = json.loads(r["artifacts"]) if r.get("artifacts") else {}
        if not isinstance(chain, dict):
            raise ValueError(f"cell {what}: artifacts is not a JSON object")
        named = {(s, str(k)[:20]) for s, k in chain.items() if k}
        # a choice made on choice seeds names the chains of the cells that chose
        chosen = json.loads(r["chosen"]) if r.get("chosen") else {}
        for voter in (chosen.get("artifacts") or []) if isinstance(chosen, dict) else []:
            named |= {(s, str(k)[:20]) for s, k in voter.items() if k}
        if r.get("stage") and r.get("key"):
            named.add((r["stage"], r["key"][:20]))
        out += [Reference(str(path), s, n, what) for s, n in sorted(named)]
    return out


def _phi_refs(path: Path) -> list[Reference]:
    """The artifacts of a ``phi.json`` (``cmkg.report.phi.artifacts``): per measured seed, the
    meta stages of the variants and the student they start from."""
    from cmkg.report.phi import KIND, artifacts

    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError(f"not a phi record file (kind {KIND!r})")
    return [Reference(str(path), stage, key[:20], f"phi diagnostics seed {seed}, {name}")
            for seed, name, stage, key in artifacts(doc)]


def _best_refs(path: Path) -> list[Reference]:
    summary = yaml.safe_load(path.read_text()) or {}
    best = summary.get("best") if isinstance(summary, dict) else None
    best = best or {}
    artifacts = [(best.get("metrics") or {}).get("artifact")]
    # a sweep over several seeds: the best trial's artifact of every seed
    seeds = best.get("per_seed") or {}
    seeds = seeds.values() if isinstance(seeds, dict) else seeds
    artifacts += [p.get("artifact") for p in seeds if isinstance(p, dict)]
    out, seen = [], set()
    for artifact in artifacts:
        if not artifact:  # a sweep where no trial finished
            continue
        stage, name = str(artifact).rstrip("/").split("/")[-2:]
        if (stage, name[:20]) not in seen:
            seen.add((stage, name[:20]))
            out.append(Reference(str(path), stage, name[:20],
                                 f"best trial of sweep {path.parent.name}"))
    return out


def referenced(entries: list[Entry], refs: list[Reference]) -> dict[tuple[str, str], str]:
    """``{(stage, name): why}`` of every artifact a reference names, and of their inputs,
    recursively (an input of a kept artifact is kept: its lineage must stay whole)."""
    by_id = _by_id(entries)
    out: dict[tuple[str, str], str] = {}
    for r in refs:
        out.setdefault((r.stage, r.name), f"named by {r.source}")
    todo = list(out)
    while todo:
        node = todo.pop()
        e = by_id.get(node)
        for up in _upstream(e) if e else []:
            if up not in out:
                out[up] = f"upstream of {node[0]}/{node[1]}"
                todo.append(up)
    return out


def local_root(store: str | Path, cache: str | None = None) -> Path:
    """The local folder holding a store's reports, records and sweeps: the store itself, or
    for a URI its local mirror (``run.cache``, default ``~/.cache/cmkg/store/<hash>``, as
    ``cmkg.stages.Store``)."""
    if storage.is_uri(store):
        return Path(cache or Path("~/.cache/cmkg/store") / storage.short_hash(str(store))
                    ).expanduser()
    return Path(store)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_show(entry: Entry, entries: list[Entry], refs: list[Reference],
                problems: list[str] = ()) -> str:
    """``cmkg runs show``: identity, lineage, config entries that differ from the preset,
    metrics, and which records and sweeps name it (directly or through what it feeds)."""
    took = "" if entry.duration_s is None else f" ({entry.duration_s:.1f} s)"
    out = [f"{entry.stage} {entry.name}  {entry.path}",
           f"  key      {entry.key}",
           f"  seed     {'-' if entry.seed is None else entry.seed}    preset {entry.preset or '-'}",
           f"  started  {entry.started.replace('T', ' ') or '-'}{took}",
           f"  code     {entry.code_version or '-'}", "", "lineage"]
    out += ["  " + line for line in lineage(entry, entries)]
    against = f"preset {entry.preset}" if entry.preset else "the defaults"
    out += ["", f"config (differs from {against})"]
    width = max([len(k) for k in entry.differs] + [0])
    out += [f"  {k:<{width}}  {_show(v)}" for k, v in entry.differs.items()] or ["  (nothing)"]
    best_at = "" if entry.best_epoch is None else f" at epoch {entry.best_epoch}"
    out += ["", "metrics",
            f"  test EPE          {_num(entry.test_epe_mm, '.2f')} mm",
            f"  test AUC 20-50    {_num(entry.test_auc_20_50, '.3f')}",
            f"  best val EPE      {_num(entry.best_val_epe_mm, '.2f')} mm{best_at}",
            f"  mean pose (test)  {_num(entry.mean_pose_epe_mm, '.2f')} mm, AUC 20-50 "
            f"{_num(entry.mean_pose_auc_20_50, '.3f')}"]
    out += ["", "referenced by"]
    me = (entry.stage, entry.name)
    direct: dict[str, list[str]] = {}
    for r in refs:
        if (r.stage, r.name) == me:
            direct.setdefault(r.source, []).append(r.what)
    for source, cells in direct.items():
        shown = ", ".join(cells[:3]) + (f", ... ({len(cells)} in all)" if len(cells) > 3 else "")
        out.append(f"  {source}: {shown}")
    keep = referenced(entries, refs)
    downstream = sorted({f"{s}/{n}" for s, n in keep if (s, n) != me
                         and me in _ancestors((s, n), _by_id(entries))
                         and any((r.stage, r.name) == (s, n) for r in refs)})
    if downstream:
        out.append(f"  upstream of {', '.join(downstream)}, which records or sweeps name")
    if not direct and not downstream:
        out.append("  nothing: `cmkg runs gc` would remove it")
    out += [f"  (skipped {p})" for p in problems]
    return "\n".join(out)


def _ancestors(node: tuple[str, str], by_id: dict) -> set[tuple[str, str]]:
    seen, todo = set(), [node]
    while todo:
        e = by_id.get(todo.pop())
        for up in _upstream(e) if e else []:
            if up not in seen:
                seen.add(up)
                todo.append(up)
    return seen


HEADLINE = (("test EPE mm", "test_epe_mm", ".2f"), ("test AUC 20-50", "test_auc_20_50", ".3f"),
            ("best val EPE mm", "best_val_epe_mm", ".2f"))
OTHER_METRICS = (("best epoch", "best_epoch", "d"), ("mean pose EPE mm", "mean_pose_epe_mm", ".2f"),
                 ("mean pose AUC 20-50", "mean_pose_auc_20_50", ".3f"))


def diff_rows(a: Entry, b: Entry) -> list[tuple[str, str, str, str]]:
    """(entry, a, b, b - a) for what differs between two artifacts: stage, preset, inputs,
    config entries (NO_EFFECT left out), code version and metrics, and the headline metrics
    (test EPE and AUC, best validation EPE) always."""
    rows = []

    def add(label, x, y, delta=""):
        rows.append((label, x, y, delta))

    if a.stage != b.stage:
        add("stage", a.stage, b.stage)
    if a.preset != b.preset:
        add("preset", a.preset or "-", b.preset or "-")
    for dep in dict.fromkeys([*a.inputs, *b.inputs]):
        x, y = a.inputs.get(dep, "")[:20], b.inputs.get(dep, "")[:20]
        if x != y:
            add(f"input {dep}", x or "-", y or "-")
    missing = object()
    for k in dict.fromkeys([*a.config, *b.config]):
        if k in NO_EFFECT:
            continue
        x, y = a.config.get(k, missing), b.config.get(k, missing)
        if x is missing or y is missing or not _same(x, y):
            add(k, "(absent)" if x is missing else _show(x), "(absent)" if y is missing else _show(y))
    if a.code_version != b.code_version:
        add("code version", a.code_version or "-", b.code_version or "-")
    for i, (label, attr, fmt) in enumerate(HEADLINE + OTHER_METRICS):
        x, y = getattr(a, attr), getattr(b, attr)
        if i >= len(HEADLINE) and x == y:
            continue
        delta = "" if x is None or y is None else format(y - x, "+" + fmt)
        add(label, _num(x, fmt), _num(y, fmt), delta)
    return rows


def format_diff(a: Entry, b: Entry) -> str:
    """``cmkg runs diff``: the two artifacts' differing entries side by side."""
    head = ("", f"{a.stage} {a.name}", f"{b.stage} {b.name}", "B - A")
    rows = [head, *diff_rows(a, b)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# cmkg runs gc: remove what nothing references
# ---------------------------------------------------------------------------------------------

@dataclass
class Removal:
    path: Path
    stage: str
    size: int  # bytes
    why: str


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, f)).st_size
    return total


def human(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


@contextlib.contextmanager
def _unless_locked(folder: Path):
    """Hold the writer lock of ``folder`` (``{name}.lock`` beside it, as
    ``cmkg.stages.artifacts.writer_lock``) for the block; yields the owner's note instead of
    True when a live process holds it (the kernel drops a dead owner's lock). No lock file:
    nobody has trained there, the block runs."""
    lock = folder.with_name(folder.name.removesuffix(".partial") + ".lock")
    if not lock.is_file():
        yield True
        return
    with open(lock, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            yield f.read().strip() or "another process"
            return
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def live_writers(root: Path) -> dict[tuple[str, str], str]:
    """``{(stage, name): owner}`` of every writer lock a live process holds in the store."""
    out = {}
    for stage in STAGES:
        for lock in sorted((root / stage).glob("*.lock")) if (root / stage).is_dir() else []:
            folder = lock.with_suffix("")
            with _unless_locked(folder) as free:
                if free is not True:
                    out[(stage, folder.name)] = free
    return out


def gc(store: str | Path, report_dirs: list[str] | tuple = (), dry_run: bool = False,
       echo=print) -> list[Removal]:
    """Remove the artifacts of a local store that nothing references, and leftover
    ``.partial`` folders; return what was removed (or, with ``dry_run``, would be).

    Kept: every artifact a result record, a phi record (``phi.json``: ``reference_files``) or a
    sweep's ``best.yaml`` names, and their inputs recursively; a ``.partial`` (or an artifact)
    whose writer lock a live process holds; while any writer runs, every artifact of the stages
    before its own (its inputs are not known until it publishes). A folder is renamed to a hidden name, then
    deleted, so no reader sees half an artifact. A record file that cannot be read stops gc
    before anything is removed."""
    if storage.is_uri(store):
        raise UserError(f"--store {store}: cmkg runs gc works on local stores only; remove "
                        "a remote store's artifacts with its own tools")
    root = Path(store)
    entries = index(root)  # a UserError when the folder does not exist
    files = reference_files(root, report_dirs)
    refs, problems = references(files)
    if problems:
        raise UserError("cmkg runs gc: cannot tell what these files reference, so nothing is "
                        "removed:\n" + "\n".join(f"  {p}" for p in problems))
    keep = referenced(entries, refs)
    live = live_writers(root)
    for stage, name in live:
        before = STAGES[:STAGES.index(stage)] if stage in STAGES else ()
        for e in entries:
            if e.stage in before:
                keep.setdefault((e.stage, e.name), f"a live writer trains {stage}/{name}")
    unkept = [e for e in entries if (e.stage, e.name) not in keep]
    if unkept and len(unkept) == len(entries) and not dry_run:
        raise UserError(f"cmkg runs gc: no result record or best.yaml ({len(files)} file(s) "
                        f"under {root}) names an artifact of this store, so all "
                        f"{len(entries)} would be removed; if the records live elsewhere pass "
                        "--report DIR, and see --dry-run")
    todo = [(root / e.stage / e.name, e.stage, "unreferenced") for e in unkept]
    for stage in STAGES:
        for p in sorted((root / stage).glob("*.partial")) if (root / stage).is_dir() else []:
            if p.is_dir():
                todo.append((p, stage, "leftover partial"))
    done, verb = [], "would remove" if dry_run else "removed"
    for path, stage, why in todo:
        with _unless_locked(path) as free:
            if free is not True:
                echo(f"kept     {stage}/{path.name}  (a live writer holds its lock: {free})")
                continue
            r = Removal(path, stage, _size(path), why)
            if not dry_run:
                hidden = path.with_name(f".tmp-gc-{path.name}-{os.getpid()}")
                os.rename(path, hidden)
                shutil.rmtree(hidden)
            done.append(r)
            echo(f"{verb:<12} {stage}/{path.name:<28} {human(r.size):>9}  {why}")
    kept = [e for e in entries if (e.stage, e.name) in keep]
    named = sum(1 for e in kept if keep[(e.stage, e.name)].startswith("named"))
    echo(f"{verb} {len(done)} folder(s), {human(sum(r.size for r in done))}; kept "
         f"{len(kept)} of {len(entries)} artifacts: {named} named by records or best.yaml "
         f"({len(files)} file(s) read), {len(kept) - named} upstream of them"
         f"{' or of a live writer' if live else ''}")
    return done
