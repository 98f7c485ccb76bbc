"""Cells: an ablation's rows x columns x seeds, each with its resolved config and its plan; the
union of their plans, the work it amounts to, and the choice of a ``choose`` row's value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmkg import config as config_mod
from cmkg import stages
from cmkg.ablation.spec import Ablation, Column, Row
from cmkg.config import Config
from cmkg.errors import ConfigError, UserError
from cmkg.yamlfile import read_mapping

WORK_FACTOR = {"meta": 3.0}  # an Algorithm 1 iteration costs about 3 plain steps (bench_meta)


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


def preset_of(base_config: str | None) -> str | None:
    """The preset a --config names, directly or by its file's ``preset:`` key."""
    if base_config in config_mod.PRESETS:
        return base_config
    if base_config and Path(base_config).is_file():
        return read_mapping(base_config).get("preset")
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


def _layers(ab: Ablation, preset: str | None, col: Column, row: Row) -> list[tuple[str, dict]]:
    """The config layers of a (row, column), each named by where it comes from: the file's
    ``set`` and ``scale``, the column's ``set``, the row's ``set`` and ``scale``."""
    where = ab.path
    layers = [(f"{where} set", config_mod.nest(ab.set))]
    if preset in ab.scale:
        layers.append((f"{where} scale.{preset}", config_mod.nest(ab.scale[preset]["set"])))
    layers.append((f"{where} columns.{col.name}.set", config_mod.nest(col.set)))
    layers.append((f"{where} row {row.label!r} set", config_mod.nest(row.set)))
    if preset in row.scale:
        layers.append((f"{where} row {row.label!r} scale.{preset}",
                       config_mod.nest(row.scale[preset]["set"])))
    return layers


def _extend(cfg: Config, col: Column) -> Config:
    """A column's ``extend_epochs``: its stage trains for its own epochs plus those stages'."""
    if not col.extend_epochs:
        return cfg
    extra = sum(getattr(cfg.epochs, s) for s in col.extend_epochs)
    epochs = dataclasses.replace(cfg.epochs, **{col.stage: getattr(cfg.epochs, col.stage) + extra})
    return dataclasses.replace(cfg, epochs=epochs)


def expand(ab: Ablation, base_config: str | None, overrides: list[str],
           seeds: int | None = None) -> list[Cell]:
    """Rows x columns x seeds, each with its resolved config and its plan. A row or column
    override that is not a config key fails here, naming the file and the row, before any
    training."""
    preset = preset_of(base_config)
    problems: list[str] = []
    cells: list[Cell] = []
    for row in ab.rows:
        for col in ab.columns.values():
            layers = _layers(ab, preset, col, row)
            for value in [None] if row.choose is None else row.choose["values"]:
                choice = [] if value is None else [
                    (f"{ab.path} row {row.label!r} choose",
                     config_mod.nest({row.choose["key"]: value}))]
                try:
                    cfg = _extend(config_mod.load(base_config, overrides, layers + choice), col)
                except ConfigError as e:
                    problems += [x for x in e.problems if x not in problems]
                    continue
                for seed in seeds_of(ab, seeds):
                    c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
                    cells.append(Cell(ab.table, row.label, col.name, seed, c,
                                      stages.plan(col.stage, c), value))
    if problems:
        raise ConfigError(ab.path, problems)
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
    size = stages.stage_datasets(node.stage, node.cfg)[0].size
    arch = node.spec["arch"]
    width = {"resnet10": 1.0, "resnet18": 2.0, "resnet50": 4.5}.get(arch, 1.0)
    return (train_samples(node) * node.spec["epochs"] * WORK_FACTOR.get(node.stage, 1.0)
            * width * (size / 64) ** 2)


def value_text(value) -> str:
    """A ``choose`` value as the notes and the dry run write it (``1e-05``, ``0.3``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def choose(ab: Ablation, cells: list[Cell], done: dict) -> tuple[list[Cell], list[str], dict]:
    """Resolve the rows with ``choose``: per column, the value whose cells have the lowest best
    validation EPE (``best_val_epe_mm``, the target's val split) averaged over the seeds, among
    the values that finished on every seed; test plays no part. Returns the cells to record (the
    plain ones and the chosen value's), a note per choice for the report, and
    {(row, column): {key, value, val_epe_mm: {value: mean}}}."""
    keep: set[int] = {id(c) for c in cells if c.candidate is None}
    found, chosen = [], {}
    for row in ab.rows:
        if row.choose is None:
            continue
        for col in ab.columns:
            group = [c for c in cells if c.row == row.label and c.column == col]
            picked, note = _choose_one(row, group, done)
            keep |= {id(c) for c in group if c.candidate == picked["value"]}
            found.append(note)
            if "val_epe_mm" in picked:
                chosen[(row.label, col)] = picked
    return [c for c in cells if id(c) in keep], found, chosen


def _choose_one(row: Row, group: list[Cell], done: dict) -> tuple[dict, str]:
    """The value chosen for one (row, column) and the note saying so. When no value finished
    on every seed, the first value's cells are kept (to record the failure)."""
    key, values = row.choose["key"], row.choose["values"]
    means = {}
    for v in values:
        cs = [c for c in group if c.candidate == v]
        if cs and all(c.node.id in done for c in cs):
            means[value_text(v)] = (v, float(np.mean(
                [done[c.node.id].metrics["best_val_epe_mm"] for c in cs])))
    if not means:
        return {"value": values[0]}, f"{row.label}: no value of {key} finished on every seed; " \
                                     "nothing chosen"
    best, _ = min(means.values(), key=lambda t: t[1])
    seeds = len({c.seed for c in group})
    missing = [value_text(v) for v in values if value_text(v) not in means]
    note = (f"{row.label}: {key} = {value_text(best)}, chosen on the validation split (mean best "
            f"val EPE over {seeds} seeds: "
            + ", ".join(f"{k} {m:.2f}" for k, (_, m) in means.items()) + " mm"
            + (f"; not finished: {', '.join(missing)}" if missing else "") + ")")
    return {"key": key, "value": best, "val_epe_mm": {k: m for k, (_, m) in means.items()}}, note
