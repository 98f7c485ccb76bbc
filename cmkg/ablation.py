"""Ablation files -> cells -> one deduplicated stage plan -> result records. No Ray here.

An ablation file (``ablations/table*.yaml``) describes one of the paper's tables::

    table: table2
    title: "Table 2: regularizers on the target"
    seeds: 3                       # default of --seeds
    set: {}                        # overrides of the base config for every cell
    scale:                         # per preset: overrides and a note the report prints
      cpu: {set: {epochs.target: 10}, note: "target trained for 10 epochs"}
    columns:                       # what is measured: one stage's test metrics per cell
      target: {stage: target, title: "EPE / AUC", metrics: [epe_mm, auc_20_50], set: {}}
    rows:
      - {label: none, set: {regularizer.form: none}, paper: {target: {epe_mm: 15.67}}}
      - label: "l2 (σ chosen on val)"   # one cell per value and seed; the report keeps the
        set: {regularizer.form: l2}     # value with the lowest mean best val EPE (``choose``)
        choose: {key: regularizer.sigma, values: [1.0e-3, 1.0e-2, 1.0e-1]}
    baseline_row: none             # paired deltas of every row against this one, per column
    compare_columns: [[kd, rgb]]   # paired deltas between columns, in every row
    compare: [{a: [row, column], b: [row, column]}]   # any other pair of cells

A *cell* is (row, column, seed): the base config, then the file's ``set`` and ``scale``, the
column's ``set``, the row's ``set`` and ``scale``, the command's ``--set`` and finally
``run.seed`` = the seed — one seed reseeds the whole chain (data order and the initialisation
of teacher, student, meta and target), so a seed's phi_META meets a target network initialised
like the student it was learned on. A column's ``extend_epochs: [kd]`` trains its stage for its
own epochs plus those stages' (Table 1's control: an RGB student trained as long as student + kd).

A row with ``choose`` is a selection done the honest way: every value runs (a cell per value,
column and seed, the value layered after the row's ``set``), and per column the value whose cells
reach the lowest best validation EPE, averaged over the seeds, becomes the row; test metrics play
no part in the choice, and the report notes the value chosen and every value's val EPE.

Every cell's ``stages.plan`` is unioned by (stage, key): Table 2's seven rows share one teacher,
one student and one phi per weighted form per seed. What the store lacks is trained (by the Ray
layer, ``cmkg.cluster.ablate``); each finished cell becomes a *result record* (``record``):
metrics, artifact keys, wall times, code version, device — the only input of ``cmkg report``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cmkg import config as config_mod
from cmkg import stages
from cmkg.config import Config, ConfigError
from cmkg.errors import UserError

FILE_KEYS = ("table", "title", "caption", "regenerates", "seeds", "set", "scale", "columns",
             "rows", "baseline_row", "compare_columns", "compare", "figure4_paper_delta_auc")
COLUMN_KEYS = ("stage", "title", "metrics", "set", "extend_epochs")
ROW_KEYS = ("label", "set", "scale", "paper", "choose")
METRICS = ("epe_mm", "auc_20_50")
LOWER_IS_BETTER = {"epe_mm": True, "auc_20_50": False}
WORK_FACTOR = {"meta": 3.0}  # an Algorithm 1 iteration costs about 3 plain steps (bench_meta)


@dataclass
class Column:
    name: str
    stage: str
    title: str
    metrics: list[str]
    set: dict = field(default_factory=dict)
    extend_epochs: list[str] = field(default_factory=list)


@dataclass
class Row:
    label: str
    set: dict = field(default_factory=dict)
    scale: dict = field(default_factory=dict)  # preset -> {set, note}
    paper: dict = field(default_factory=dict)  # column -> {metric: value}
    choose: dict | None = None  # {key: dotted config key, values: [...]}: chosen on val


@dataclass
class Ablation:
    path: str
    table: str
    title: str
    caption: str
    regenerates: str
    seeds: int
    set: dict
    scale: dict
    columns: dict[str, Column]
    rows: list[Row]
    comparisons: list[dict]
    extra: dict = field(default_factory=dict)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


@dataclass
class Cell:
    table: str
    row: str
    column: str
    seed: int
    cfg: Config
    nodes: list[stages.Node]
    candidate: object = None  # the row's ``choose`` value this cell runs (None: not a choice)

    @property
    def node(self) -> stages.Node:
        """The node whose test metrics the cell reports (the last of its plan)."""
        return self.nodes[-1]

    @property
    def id(self) -> tuple[str, str, str, int]:
        return self.table, self.row, self.column, self.seed


# ---------------------------------------------------------------------------------------------
# Loading (strict: every problem at once, each named with its key, before any training)
# ---------------------------------------------------------------------------------------------

def _mapping(value, key: str, problems: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, got {value!r}")
        return {}
    return value


def _unknown(data: dict, known: tuple[str, ...], key: str, problems: list[str]) -> None:
    for k in data:
        if k not in known:
            problems.append(f"{key}{'.' if key else ''}{k}: unknown key; known keys: "
                            f"{', '.join(known)}")


def _scale(value, key: str, problems: list[str]) -> dict:
    out = {}
    for preset, entry in _mapping(value, key, problems).items():
        where = f"{key}.{preset}"
        if preset not in config_mod.PRESETS:
            problems.append(f"{where}: not a preset ({', '.join(config_mod.PRESETS)})")
            continue
        entry = _mapping(entry, where, problems)
        _unknown(entry, ("set", "note"), where, problems)
        out[preset] = {"set": _mapping(entry.get("set"), f"{where}.set", problems),
                       "note": str(entry["note"]) if entry.get("note") else None}
    return out


def load(path: str | Path) -> Ablation:
    """Read and check an ablation file (structure only; ``expand`` checks every override
    against the config)."""
    path = Path(path)
    data = config_mod._read_yaml(path)  # missing file, bad YAML, not a mapping: one message
    p: list[str] = []
    _unknown(data, FILE_KEYS, "", p)
    for k in ("table", "columns", "rows"):
        if k not in data:
            p.append(f"{k}: missing")
    seeds = data.get("seeds", 3)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        p.append(f"seeds: must be an integer >= 1, got {seeds!r}")
        seeds = 1
    columns: dict[str, Column] = {}
    for name, c in _mapping(data.get("columns"), "columns", p).items():
        key = f"columns.{name}"
        c = _mapping(c, key, p)
        _unknown(c, COLUMN_KEYS, key, p)
        stage = c.get("stage")
        if stage not in stages.STAGES:
            p.append(f"{key}.stage: must be one of {', '.join(stages.STAGES)}, got {stage!r}")
        metrics = c.get("metrics", ["epe_mm"])
        if not isinstance(metrics, list) or not metrics or any(m not in METRICS for m in metrics):
            p.append(f"{key}.metrics: must be a non-empty list among {', '.join(METRICS)}")
            metrics = ["epe_mm"]
        ext = c.get("extend_epochs", [])
        if not isinstance(ext, list) or any(e not in stages.STAGES for e in ext):
            p.append(f"{key}.extend_epochs: must be a list of stages, got {ext!r}")
            ext = []
        columns[str(name)] = Column(str(name), stage, str(c.get("title", name)), metrics,
                                    _mapping(c.get("set"), f"{key}.set", p), ext)
    rows: list[Row] = []
    raw_rows = data.get("rows") or []
    if not isinstance(raw_rows, list) or not raw_rows:
        p.append("rows: must be a non-empty list")
        raw_rows = []
    for i, r in enumerate(raw_rows):
        key = f"rows[{i}]"
        r = _mapping(r, key, p)
        _unknown(r, ROW_KEYS, key, p)
        label = r.get("label")
        if not isinstance(label, str) or not label:
            p.append(f"{key}.label: missing")
            continue
        if any(x.label == label for x in rows):
            p.append(f"{key}.label: {label!r} appears twice")
        paper = {}
        for col, vals in _mapping(r.get("paper"), f"{key}.paper", p).items():
            if col not in columns:
                p.append(f"{key}.paper.{col}: not a column ({', '.join(columns)})")
                continue
            if isinstance(vals, (int, float)) and not isinstance(vals, bool):
                vals = {columns[col].metrics[0]: vals}
            vals = _mapping(vals, f"{key}.paper.{col}", p)
            bad = [m for m in vals if m not in columns[col].metrics]
            if bad:
                p.append(f"{key}.paper.{col}.{bad[0]}: not a metric of the column")
            paper[col] = {m: float(v) for m, v in vals.items()
                          if m not in bad and isinstance(v, (int, float))}
        rows.append(Row(label, _mapping(r.get("set"), f"{key}.set", p),
                        _scale(r.get("scale"), f"{key}.scale", p), paper,
                        _choose(r.get("choose"), f"{key}.choose", p)))
    comparisons = _comparisons(data, columns, rows, p)
    base, scale = _mapping(data.get("set"), "set", p), _scale(data.get("scale"), "scale", p)
    if p:
        raise ConfigError(str(path), p)
    extra = {k: data[k] for k in ("figure4_paper_delta_auc",) if k in data}
    return Ablation(str(path), str(data["table"]), str(data.get("title", data["table"])),
                    str(data.get("caption", "")), str(data.get("regenerates", "")), seeds,
                    base, scale, columns, rows, comparisons, extra)


def _choose(value, key: str, problems: list[str]) -> dict | None:
    """A row's ``choose: {key: dotted.config.key, values: [v1, v2, ...]}`` (>= 2 values)."""
    if value is None:
        return None
    value = _mapping(value, key, problems)
    _unknown(value, ("key", "values"), key, problems)
    ok = True
    if not isinstance(value.get("key"), str) or not value["key"]:
        problems.append(f"{key}.key: missing (a dotted config key, e.g. regularizer.sigma)")
        ok = False
    values = value.get("values")
    if not isinstance(values, list) or len(values) < 2 or len(set(map(repr, values))) < len(values):
        problems.append(f"{key}.values: must be a list of at least 2 different values")
        ok = False
    return {"key": value["key"], "values": list(values)} if ok else None


def _comparisons(data: dict, columns: dict[str, Column], rows: list[Row],
                 p: list[str]) -> list[dict]:
    """Every paired comparison as {a: [row, col], b: [row, col], metric, paper_delta}."""
    labels = [r.label for r in rows]
    pairs: list[tuple[tuple[str, str], tuple[str, str]]] = []
    base = data.get("baseline_row")
    if base is not None:
        if base not in labels:
            p.append(f"baseline_row: {base!r} is not a row label")
        else:
            pairs += [((r, c), (base, c)) for r in labels if r != base for c in columns]
    for i, pair in enumerate(data.get("compare_columns") or []):
        if (not isinstance(pair, list) or len(pair) != 2
                or any(c not in columns for c in pair)):
            p.append(f"compare_columns[{i}]: must be [column, column] of {', '.join(columns)}")
            continue
        pairs += [((r, pair[0]), (r, pair[1])) for r in labels]
    for i, cmp in enumerate(data.get("compare") or []):
        cmp = _mapping(cmp, f"compare[{i}]", p)
        ok = all(isinstance(cmp.get(s), list) and len(cmp[s]) == 2 and cmp[s][0] in labels
                 and cmp[s][1] in columns for s in ("a", "b"))
        if not ok or set(cmp) != {"a", "b"}:
            p.append(f"compare[{i}]: must be {{a: [row, column], b: [row, column]}}")
            continue
        pairs.append((tuple(cmp["a"]), tuple(cmp["b"])))
    out = []
    for a, b in pairs:
        for metric in columns[a[1]].metrics:
            if metric not in columns[b[1]].metrics:
                continue
            pa = next(r for r in rows if r.label == a[0]).paper.get(a[1], {}).get(metric)
            pb = next(r for r in rows if r.label == b[0]).paper.get(b[1], {}).get(metric)
            delta = None if pa is None or pb is None else round(pa - pb, 6)
            out.append({"a": list(a), "b": list(b), "metric": metric, "paper_delta": delta})
    return out


# ---------------------------------------------------------------------------------------------
# Cells and the plan
# ---------------------------------------------------------------------------------------------

def preset_of(base_config: str | None) -> str | None:
    """The preset a --config names, directly or by its file's ``preset:`` key."""
    if base_config in config_mod.PRESETS:
        return base_config
    if base_config and Path(base_config).is_file():
        data = yaml.safe_load(Path(base_config).read_text()) or {}
        return data.get("preset") if isinstance(data, dict) else None
    return None


def notes(ab: Ablation, preset: str | None) -> list[str]:
    """What this preset runs instead of the paper (the scale sections' notes), for the report."""
    out = []
    if preset in ab.scale and ab.scale[preset]["note"]:
        out.append(ab.scale[preset]["note"])
    out += [f"{r.label}: {r.scale[preset]['note']}" for r in ab.rows
            if preset in r.scale and r.scale[preset]["note"]]
    return out


def seeds_of(ab: Ablation, seeds: int | None) -> list[int]:
    n = ab.seeds if seeds is None else seeds
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}")
    return list(range(n))


def expand(ab: Ablation, base_config: str | None, overrides: list[str],
           seeds: int | None = None) -> list[Cell]:
    """Rows x columns x seeds, each with its resolved config and its plan. A row or column
    override that is not a config key fails here, naming the file and the row, before any
    training."""
    preset = preset_of(base_config)
    where = ab.path
    problems: list[str] = []
    cells: list[Cell] = []
    for row in ab.rows:
        for col in ab.columns.values():
            layers = [(f"{where} set", config_mod.nest(ab.set))]
            if preset in ab.scale:
                layers.append((f"{where} scale.{preset}", config_mod.nest(ab.scale[preset]["set"])))
            layers.append((f"{where} columns.{col.name}.set", config_mod.nest(col.set)))
            layers.append((f"{where} row {row.label!r} set", config_mod.nest(row.set)))
            if preset in row.scale:
                layers.append((f"{where} row {row.label!r} scale.{preset}",
                               config_mod.nest(row.scale[preset]["set"])))
            choices = [None] if row.choose is None else row.choose["values"]
            for value in choices:
                extra_layer = [] if value is None else [
                    (f"{where} row {row.label!r} choose", config_mod.nest({row.choose["key"]: value}))]
                try:
                    cfg = config_mod.load(base_config, overrides, layers + extra_layer)
                except ConfigError as e:
                    problems += [x for x in e.problems if x not in problems]
                    continue
                if col.extend_epochs:
                    extra = sum(getattr(cfg.epochs, s) for s in col.extend_epochs)
                    epochs = dataclasses.replace(
                        cfg.epochs, **{col.stage: getattr(cfg.epochs, col.stage) + extra})
                    cfg = dataclasses.replace(cfg, epochs=epochs)
                for seed in seeds_of(ab, seeds):
                    c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
                    cells.append(Cell(ab.table, row.label, col.name, seed, c,
                                      stages.plan(col.stage, c), value))
    if problems:
        raise ConfigError(where, problems)
    return cells


def union(cells: list[Cell]) -> list[stages.Node]:
    """The unique nodes of all cells' plans, upstream before downstream."""
    seen: dict[tuple[str, str], stages.Node] = {}
    for cell in cells:
        for node in cell.nodes:
            seen.setdefault(node.id, node)
    return list(seen.values())


def train_samples(node: stages.Node) -> int:
    """Training samples a node's stage reads per epoch (for the work estimate)."""
    from cmkg.data.store import read_manifest, split_counts

    total = 0
    for spec in stages.stage_datasets(node.stage, node.cfg):
        if spec.path is not None and not str(spec.path).startswith(("s3:", "gs:", "hdfs:")):
            total += read_manifest(spec.path)["splits"]["train"]["num"]
        else:
            total += split_counts(spec.num, tuple(node.cfg.data.split))["train"]
    return total


def work(node: stages.Node) -> float:
    """Estimated cost of a node in sample-epochs (x3 for Algorithm 1), scaled by pixel count."""
    size = (node.cfg.data.target if node.stage == "target" else node.cfg.data.source).size
    arch = node.spec["arch"]
    width = {"resnet10": 1.0, "resnet18": 2.0, "resnet50": 4.5}.get(arch, 1.0)
    return (train_samples(node) * node.spec["epochs"] * WORK_FACTOR.get(node.stage, 1.0)
            * width * (size / 64) ** 2)


# ---------------------------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------------------------

_PHI_CACHE: dict[str, np.ndarray] = {}  # artifact path -> phi; the last few meta stages


def _phi_values(art: stages.Artifact) -> np.ndarray:
    """phi_META of a meta stage as one float64 vector, read once although every weighted
    target cell of every table and the seed correlation use it."""
    key = str(art.path)
    if key not in _PHI_CACHE:
        if len(_PHI_CACHE) >= 8:
            _PHI_CACHE.pop(next(iter(_PHI_CACHE)))
        _PHI_CACHE[key] = np.concatenate([p.detach().flatten().double().numpy()
                                          for p in art.load_phi().phi()])
    return _PHI_CACHE[key]


def _extra(cell: Cell, art: stages.Artifact, done: dict) -> dict:
    """Fig. 5's data for target cells: a histogram of the network's weights, and of phi."""
    if cell.node.stage != "target":
        return {}
    from cmkg.report import flat_weights, histogram

    out = {"theta_hist": histogram(flat_weights(art.load_model().state_dict()))}
    for k in ("prior_strength", "calibration"):  # D after the last epoch; the calibrated scale
        if k in art.metrics:
            out[k] = art.metrics[k]
    meta_key = cell.node.inputs.get("meta")
    if meta_key and ("meta", meta_key) in done:
        prior = done[("meta", meta_key)]
        scale = out.get("calibration", {}).get("scale", 1.0)  # the calibrated phi, before its cap
        out["phi_hist"] = histogram(scale * _phi_values(prior))
        out["phi"] = prior.metrics.get("phi", {})
    return out


def phi_correlation(cells: list[Cell], done: dict) -> list[dict]:
    """Pearson correlation of phi_META between seeds, per weighted form and parametrisation
    (is phi knowledge shared by the seeds, or noise?), from the meta stages the table's target
    cells used."""
    metas: dict[str, dict[int, tuple[str, str]]] = {}
    for c in cells:
        for n in c.nodes:
            if n.stage == "meta" and n.id in done:
                r = n.cfg.regularizer
                form = r.form if r.phi_param == "free" else f"{r.form} ({r.phi_param})"
                metas.setdefault(form, {})[c.seed] = n.id
    out = []
    for form, by_seed in sorted(metas.items()):
        seeds = sorted(by_seed)
        phis = {s: _phi_values(done[by_seed[s]]) for s in seeds}
        for i, a in enumerate(seeds):
            for b in seeds[i + 1:]:
                # a constant phi (softplus learned from phi_init barely moves in float32) has
                # no correlation: None, shown as such
                r = (None if np.ptp(phis[a]) == 0 or np.ptp(phis[b]) == 0
                     else round(float(np.corrcoef(phis[a], phis[b])[0, 1]), 6))
                out.append({"form": form, "seeds": [a, b], "pearson": r,
                            "count": int(phis[a].size)})
    return out


def fingerprint(cfg: Config) -> str:
    """sha256 of the resolved config without the fields that cannot change a result."""
    d = cfg.to_dict()
    for k in ("store", "cache", "threads", "progress", "loader_workers", "device"):
        d["run"].pop(k, None)
    d["data"].pop("root", None)
    return config_mod.digest(d)


def record(cell: Cell, done: dict, failed: dict[tuple[str, str], str], preset: str | None) -> dict:
    """One result record: the cell's metrics from its artifact, or why it failed."""
    base = {"table": cell.table, "row": cell.row, "column": cell.column, "seed": cell.seed,
            "stage": cell.node.stage, "key": cell.node.key,
            "config_fingerprint": fingerprint(cell.cfg),
            "artifacts": json.dumps({n.stage: n.key for n in cell.nodes}, sort_keys=True),
            "preset": preset or "custom"}
    missing = [n for n in cell.nodes if n.id not in done]
    if missing:
        why = next((failed[n.id] for n in cell.nodes if n.id in failed),
                   f"{missing[0].stage} did not run")
        return {**base, "status": "failed", "error": why, "epe_mm": None, "auc_20_50": None,
                "mean_pose_epe_mm": None, "pck_thresholds_mm": [], "pck": [],
                "per_joint_epe_mm": [], "wall_s": None, "stage_walls": "{}",
                "code_version": stages.code_version(), "device": "", "extra": "{}"}
    art = done[cell.node.id]
    metrics, meta = art.metrics, art.meta
    test = metrics["test"]
    walls = {n.stage: round(float(done[n.id].meta.get("duration_s", 0.0)), 3)
             for n in cell.nodes}
    return {**base, "status": "done", "error": None, "epe_mm": test["epe_mm"],
            "auc_20_50": test["auc_20_50"],
            "mean_pose_epe_mm": metrics.get("mean_pose_test", {}).get("epe_mm"),
            "pck_thresholds_mm": test["pck_thresholds_mm"], "pck": test["pck"],
            "per_joint_epe_mm": test.get("per_joint_epe_mm", []),
            "wall_s": round(float(meta.get("duration_s", 0.0)), 3),
            "stage_walls": json.dumps(walls, sort_keys=True),
            "code_version": meta.get("code_version", ""), "device": meta.get("device", ""),
            "extra": json.dumps(_extra(cell, art, done), sort_keys=True)}


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def choose(ab: Ablation, cells: list[Cell], done: dict) -> tuple[list[Cell], list[str], dict]:
    """Resolve the rows with ``choose``: per column, the value whose cells have the lowest best
    validation EPE (``best_val_epe_mm``, the target's val split) averaged over the seeds, among
    the values that finished on every seed; test plays no part. Returns the cells to record (the
    plain ones and the chosen value's), a note per choice for the report, and
    {(row, column): {key, value, val_epe_mm: {value: mean}}}."""
    keep: set[int] = {id(c) for c in cells if c.candidate is None}
    notes, chosen = [], {}
    for row in ab.rows:
        if row.choose is None:
            continue
        key, values = row.choose["key"], row.choose["values"]
        for col in ab.columns:
            group = [c for c in cells if c.row == row.label and c.column == col]
            means = {}
            for v in values:
                cs = [c for c in group if c.candidate == v]
                if cs and all(c.node.id in done for c in cs):
                    means[_fmt(v)] = (v, float(np.mean(
                        [done[c.node.id].metrics["best_val_epe_mm"] for c in cs])))
            if not means:  # nothing to choose from: the first value's cells record the failure
                keep |= {id(c) for c in group if c.candidate == values[0]}
                notes.append(f"{row.label}: no value of {key} finished on every seed; "
                             f"nothing chosen")
                continue
            best, _ = min(means.values(), key=lambda t: t[1])
            keep |= {id(c) for c in group if c.candidate == best}
            chosen[(row.label, col)] = {"key": key, "value": best,
                                        "val_epe_mm": {k: m for k, (_, m) in means.items()}}
            seeds = len({c.seed for c in group})
            missing = [_fmt(v) for v in values if _fmt(v) not in means]
            notes.append(
                f"{row.label}: {key} = {_fmt(best)}, chosen on the validation split (mean best "
                f"val EPE over {seeds} seeds: "
                + ", ".join(f"{k} {m:.2f}" for k, (_, m) in means.items()) + " mm"
                + (f"; not finished: {', '.join(missing)}" if missing else "") + ")")
    return [c for c in cells if id(c) in keep], notes, chosen


def table_spec(ab: Ablation, preset: str | None, seeds: list[int]) -> dict:
    """The table's description stored beside its records (what ``cmkg report`` renders)."""
    return {"table": ab.table, "title": ab.title, "caption": ab.caption,
            "regenerates": ab.regenerates, "source": Path(ab.path).name,
            "columns": [{"name": c.name, "title": c.title, "metrics": c.metrics, "stage": c.stage}
                        for c in ab.columns.values()],
            "rows": [{"label": r.label, "paper": r.paper} for r in ab.rows],
            "comparisons": ab.comparisons, "notes": notes(ab, preset),
            "lower_is_better": LOWER_IS_BETTER, "seeds": seeds, "preset": preset or "custom",
            **ab.extra}


# ---------------------------------------------------------------------------------------------
# Summaries for the command line
# ---------------------------------------------------------------------------------------------

def status_line(cells: list[Cell], nodes: list[stages.Node], cached: set) -> str:
    """ "12 cells: 9 done, 3 to run; 21 stages: 17 cached, 4 to train" """
    done = sum(all(n.id in cached for n in c.nodes) for c in cells)
    n_cached = sum(n.id in cached for n in nodes)
    return (f"{len(cells)} cells: {done} done, {len(cells) - done} to run; "
            f"{len(nodes)} stages: {n_cached} cached, {len(nodes) - n_cached} to train")


def dry_run(abs_cells: list[tuple[Ablation, list[Cell]]], store: stages.Store) -> str:
    """The cells, the unique stages they need, which are cached and which would be trained,
    and the estimated work; trains nothing."""
    lines = []
    all_cells = [c for _, cells in abs_cells for c in cells]
    nodes = union(all_cells)
    found = {n.id: store.get(n.stage, n.key) for n in nodes}
    cached = {i for i, art in found.items() if art is not None}
    for ab, cells in abs_cells:
        lines.append(f"{ab.table} ({ab.path}): {len(ab.rows)} rows x {len(ab.columns)} columns "
                     f"x {len({c.seed for c in cells})} seeds")
        for c in cells:
            mark = "done" if all(n.id in cached for n in c.nodes) else "to run"
            row = c.row if c.candidate is None else f"{c.row} [{_fmt(c.candidate)}]"
            lines.append(f"  {row!r:28s} {c.column:12s} seed {c.seed}  "
                         f"{c.node.stage} {c.node.key[:12]}  {mark}")
    lines.append("stages:")
    by_kind: dict[str, list[float]] = {}
    rates = []
    for n in nodes:
        w = work(n)
        state = "cached" if n.id in cached else "to train"
        lines.append(f"  {n.stage:8s} {n.key[:12]}  {n.spec['arch']:9s} "
                     f"{n.spec['epochs']:4d} epochs  {state}")
        if n.id in cached:
            dur = found[n.id].meta.get("duration_s")
            if dur:
                rates.append(dur / w)
        else:
            by_kind.setdefault(n.stage, []).append(w)
    total = sum(sum(v) for v in by_kind.values())
    kinds = ", ".join(f"{k} {len(v)}" for k, v in by_kind.items()) or "nothing"
    lines.append(status_line(all_cells, nodes, cached))
    if total:
        est = (f"about {format_duration(total * float(np.median(rates)))} of training, summed over "
               f"stages, at the rate of the {len(rates)} cached stage(s)" if rates
               else "no finished stage in the store to estimate a rate from")
        lines.append(f"to train: {kinds}; {total / 1e6:.2f} M sample-epochs (64 px resnet10 "
                     f"equivalents), {est}")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


# ---------------------------------------------------------------------------------------------
# The runner (the Ray layer executes; this decides what and writes the records)
# ---------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(paths: list[str], base_config: str | None, overrides: list[str], *,
        seeds: int | None = None, dry: bool = False, report_dir: str | Path = "reports",
        execute=None) -> int:
    """Load the ablation files, expand and plan every cell, train what the store lacks with
    ``execute(nodes, on_done)`` (``cmkg.cluster.ablate.execute``), write one record per cell
    and render the report. Returns the exit status: 1 if any cell failed."""
    from cmkg import report

    abls = [load(p) for p in paths]
    names = [a.table for a in abls]
    if len(set(names)) != len(names):
        raise UserError(f"two ablation files define the same table: {names}")
    cells_of = [(a, expand(a, base_config, overrides, seeds)) for a in abls]
    cells = [c for _, cs in cells_of for c in cs]
    store = stages.Store.of(cells[0].cfg)
    if dry:
        print(dry_run(cells_of, store))
        return 0
    nodes = union(cells)
    done: dict[tuple[str, str], stages.Artifact] = {}
    for n in nodes:
        art = store.get(n.stage, n.key)
        if art is not None:
            done[n.id] = art
    _say(status_line(cells, nodes, set(done)))
    # seed by seed (stable, so upstream stays first): an interrupted run has whole seeds
    todo = sorted((n for n in nodes if n.id not in done), key=lambda n: n.cfg.run.seed)
    failed: dict[tuple[str, str], str] = {}
    started = time.time()
    if todo:
        for spec in {json.dumps(dataclasses.asdict(s), sort_keys=True): (s, n.cfg)
                     for n in todo for s in stages.stage_datasets(n.stage, n.cfg)}.values():
            stages.ensure_dataset(*spec)  # render once here, not in every task
        total = sum(work(n) for n in todo)
        finished = {"work": 0.0, "count": 0}

        def on_done(node: stages.Node, path: str | None, error: str | None) -> None:
            finished["count"] += 1
            finished["work"] += work(node)
            elapsed = time.time() - started
            eta = elapsed / finished["work"] * (total - finished["work"])
            if error is None:
                done[node.id] = store.get(node.stage, node.key) or stages.open_artifact(path)
                epe = done[node.id].metrics["test"]["epe_mm"]
                what = f"EPE {epe:.2f} mm, {done[node.id].meta.get('duration_s', 0):.0f}s"
            else:
                failed[node.id] = error
                what = f"FAILED: {error}"
            _say(f"[{finished['count']}/{len(todo)}] {node.stage} {node.key[:10]} seed "
                 f"{node.cfg.run.seed}: {what}; elapsed {format_duration(elapsed)}, "
                 f"ETA {format_duration(eta)}")

        execute(todo, on_done)
    wall = time.time() - started
    out = Path(report_dir)
    results = out / "results"
    preset = preset_of(base_config)
    for ab, cs in cells_of:
        picked, choice_notes, chosen = choose(ab, cs, done)
        recs = []
        for c in picked:
            rec = record(c, done, failed, preset)
            if (c.row, c.column) in chosen:
                rec["extra"] = json.dumps({**json.loads(rec["extra"]),
                                           "chosen": chosen[(c.row, c.column)]}, sort_keys=True)
            recs.append(rec)
        spec = table_spec(ab, preset, sorted({c.seed for c in cs}))
        spec["notes"] = spec["notes"] + choice_notes
        if (corr := phi_correlation(cs, done)):
            spec["phi_correlation"] = corr
        report.write_records(store.root / "_results" / (preset or "custom") / f"{ab.table}.parquet",
                             spec, recs)
        report.write_records(results / f"{ab.table}.parquet", spec, recs)
    written = report.render_reports(results, out)
    for ab, _ in cells_of:
        md = out / f"{ab.table}.md"
        if md.is_file():
            print(md.read_text())
    n_failed = sum(1 for c in cells if any(n.id in failed or n.id not in done for n in c.nodes))
    kinds: dict[str, list[float]] = {}
    for n in todo:
        if n.id in done:
            kinds.setdefault(n.stage, []).append(float(done[n.id].meta.get("duration_s", 0)))
    breakdown = ", ".join(f"{k} {len(v)} x {format_duration(sum(v) / len(v))}"
                          for k, v in kinds.items()) or "none"
    trained = sum(sum(v) for v in kinds.values())
    _say(f"{len(cells)} cells ({n_failed} failed), {len(nodes)} unique stages "
         f"({len(nodes) - len(todo)} cached, {len(todo)} trained); wall {format_duration(wall)}, "
         f"stage training {format_duration(trained)} (trained: {breakdown}); report: "
         f"{', '.join(str(p) for p in written[:3])}{' ...' if len(written) > 3 else ''}")
    return 1 if n_failed else 0
