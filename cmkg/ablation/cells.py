"""Cells: an ablation's rows x columns x seeds, each with its resolved config and its plan; the
union of their plans, the work it amounts to, and the choice of a ``choose`` row's value.

Seeds: the report seeds are those a table's cells are reported on. With choice seeds
(``choice_seeds`` in the file, ``--choice-seeds``), a ``choose`` row also runs every value on
the choice seeds, and its one value is chosen on those alone (mean best val EPE), then reported
on the report seeds, which are other seeds (fresh-seed confirmation, docs/statistics.md).
Without them, the same seeds choose and report, as before."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmkg import config as config_mod
from cmkg import stages
from cmkg.ablation import tuned
from cmkg.ablation.spec import Ablation, Column, Row, at_preset
from cmkg.config import Config
from cmkg.diagnostics import INERT
from cmkg.errors import ConfigError, UserError
from cmkg.metrics import selection_val_epe
from cmkg.report.format import seed_text
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
    choosing: bool = False  # on a choice seed: takes part in the choice, is not reported

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
    """What this preset runs instead of the paper (the scale sections' notes) and the rows it
    leaves out (tuned at other presets, ``spec.at_preset``), for the report."""
    ab = at_preset(ab, preset)
    out = []
    if preset in ab.scale and ab.scale[preset]["note"]:
        out.append(ab.scale[preset]["note"])
    out += [f"{r.label}: {r.scale[preset]['note']}" for r in ab.rows
            if preset in r.scale and r.scale[preset]["note"]]
    return out + ab.left_out


def seeds_of(ab: Ablation, seeds: int | None, choice_seeds: int | None = None) -> list[int]:
    """The report seeds (``seed_plan``)."""
    return seed_plan(ab, seeds, choice_seeds)[0]


def seed_plan(ab: Ablation, seeds: int | None = None,
              choice_seeds: int | None = None) -> tuple[list[int], list[int] | None]:
    """(report seeds, choice seeds or None). ``seeds`` (``--seeds N``) overrides the file's
    ``seeds``, ``choice_seeds`` (``--choice-seeds K``: seeds 0..K-1; 0: none, the same seeds
    choose and report) its ``choice_seeds``. A count of report seeds takes the first seeds
    that are not choice seeds: ``choice_seeds: 5`` with ``seeds: 5`` chooses on 0-4 and reports
    on 5-9; without choice seeds, 0..N-1 as always."""
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if choice_seeds is not None and choice_seeds < 0:
        raise UserError(f"--choice-seeds must be >= 0, got {choice_seeds}")
    choice = ab.choice_seeds if choice_seeds is None else (choice_seeds or None)
    if isinstance(choice, int):
        choice = list(range(choice))
    n = ab.seeds if seeds is None else seeds
    if isinstance(n, list):
        both = sorted(set(n) & set(choice or []))
        if both:
            raise UserError(f"{ab.path}: seeds {n} and the choice seeds {choice} share {both}: "
                            "report seeds must be other seeds than those the choices are made on")
        return list(n), choice
    taken = set(choice or [])
    return [s for s in range(n + len(taken)) if s not in taken][:n], choice


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
    if row.tuned is not None:  # the sweep's best trial, over the row's own entries
        layers.append((f"{where} row {row.label!r} tuned ({row.tuned['path']})",
                       config_mod.nest(row.tuned["params"])))
    return layers


def _extend(cfg: Config, col: Column) -> Config:
    """A column's ``extend_epochs``: its stage trains for its own epochs plus those stages'."""
    if not col.extend_epochs:
        return cfg
    extra = sum(getattr(cfg.epochs, s) for s in col.extend_epochs)
    epochs = dataclasses.replace(cfg.epochs, **{col.stage: getattr(cfg.epochs, col.stage) + extra})
    return dataclasses.replace(cfg, epochs=epochs)


def expand(ab: Ablation, base_config: str | None, overrides: list[str],
           seeds: int | None = None, choice_seeds: int | None = None) -> list[Cell]:
    """Rows x columns x seeds, each with its resolved config and its plan; with choice seeds
    (``seed_plan``), a ``choose`` row's values also on the choice seeds (``Cell.choosing``).
    A row or column override that is not a config key, or a tuned row whose sweep chose on a
    report seed, fails here, naming the file and the row, before any training. The rows are
    those ``preset`` runs (``spec.at_preset``: rows tuned at other presets left out)."""
    preset = preset_of(base_config)
    ab = at_preset(ab, preset)
    report, choosing_seeds = seed_plan(ab, seeds, choice_seeds)
    problems: list[str] = []
    cells: list[Cell] = []
    for row in ab.rows:
        if row.tuned is not None:
            overlap = tuned.check_seeds(row.tuned, report, ab.path)
            if overlap:
                problems.append(overlap)
        runs = [(s, False) for s in report]
        if choosing_seeds is not None and row.choose is not None and leader(ab, row) is row:
            runs = [(s, True) for s in choosing_seeds] + runs
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
                for seed, choosing in runs:
                    c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
                    cells.append(Cell(ab.table, row.label, col.name, seed, c,
                                      stages.plan(col.stage, c), value, choosing))
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
    """Resolve the rows with ``choose``: per column, one value for the row, the one whose cells
    have the lowest validation EPE (``metrics.selection_val_epe``: the published weights', on the
    target's val split) averaged
    over the choosing seeds (the choice seeds where there are, else the report seeds), among the
    values that finished on every one of them; test plays no part. Returns the cells to record
    (the plain ones and the chosen value's, on the report seeds only), a note per choice and per
    tuned row for the report, and {(row, column): {key, value, val_epe_mm: {value: mean}}}."""
    keep: set[int] = {id(c) for c in cells if c.candidate is None and not c.choosing}
    found, chosen = [], {}
    report = seed_text({c.seed for c in cells if not c.choosing})
    leads = {(row.label, col): _choose_one(row, [c for c in cells if c.row == row.label
                                                 and c.column == col], done)
             for row in ab.rows if row.choose is not None and leader(ab, row) is row
             for col in ab.columns}
    for row in ab.rows:
        if row.tuned is not None:
            found.append(tuned.note(row.label, row.tuned, report))
        if row.choose is None:
            continue
        for col in ab.columns:
            group = [c for c in cells if c.row == row.label and c.column == col]
            picked, note = leads.get((row.label, col)) or _follow_one(
                row, leader(ab, row), group, leads[(leader(ab, row).label, col)][0], done)
            keep |= {id(c) for c in group if c.candidate == picked["value"] and not c.choosing}
            found.append(note)
            if "val_epe_mm" in picked:
                chosen[(row.label, col)] = picked
    return [c for c in cells if id(c) in keep], found, chosen


def leader(ab: Ablation, row: Row) -> Row:
    """The row whose choice ``row`` takes: itself, or the row its ``choose`` follows (``follow:
    label``, a control at the strength another row chose), which decides on its choosing seeds
    for both."""
    follow = (row.choose or {}).get("follow")
    return ab.row(follow) if follow else row


def chosen_later(ab: Ablation, cells: list[Cell]) -> set[tuple[str, str]]:
    """The (row, column)s whose value is chosen on choice seeds (their own or their leader's
    choosing cells): their report cells wait for the choice."""
    fresh = {(c.row, c.column) for c in cells if c.choosing}
    return {(r.label, col) for r in ab.rows if r.choose is not None for col in ab.columns
            if (leader(ab, r).label, col) in fresh}


def first_round(ab: Ablation, cells: list[Cell]) -> list[Cell]:
    """What the runner trains first: every cell but the report cells that wait for a choice
    (``chosen_later``); without choice seeds, every cell."""
    later = chosen_later(ab, cells)
    return [c for c in cells if c.choosing or (c.row, c.column) not in later]


def needed(ab: Ablation, cells: list[Cell], chosen: dict) -> list[Cell]:
    """The cells to train given the values ``chosen`` so far ({(row, column): value},
    ``decisions``): the first round, and the report cells waiting for a choice of the value
    chosen, or of every value while the choice is still open."""
    later = chosen_later(ab, cells)
    return [c for c in cells if c.choosing or (c.row, c.column) not in later
            or (c.row, c.column) not in chosen or chosen[(c.row, c.column)] == c.candidate]


def decisions(ab: Ablation, cells: list[Cell], done: dict,
              failed=()) -> dict[tuple[str, str], object]:
    """{(row, column): the chosen value} of the ``choose`` rows whose choosing cells have all
    finished (``done``) or failed (a node of theirs in ``failed``), and of the rows following
    them: the value says which of the row's report cells are needed. Rows still waiting for a
    choosing cell are left out."""
    out = {}
    for row in ab.rows:
        if row.choose is None or leader(ab, row) is not row:
            continue
        for col in ab.columns:
            group = [c for c in cells if c.row == row.label and c.column == col]
            voters = [c for c in group if c.choosing] or group
            if all(c.node.id in done or any(n.id in failed for n in c.nodes) for c in voters):
                out[(row.label, col)] = _choose_one(row, group, done)[0]["value"]
    for row in ab.rows:
        if row.choose is not None and leader(ab, row) is not row:
            for col in ab.columns:
                if (leader(ab, row).label, col) in out:
                    out[(row.label, col)] = out[(leader(ab, row).label, col)]
    return out


def record_choice(ab: Ablation, cell: Cell, cells: list[Cell], picked: dict | None) -> dict:
    """The new record columns of a cell: ``choice_seeds`` (the seeds whose validation metric
    chose the row's value: the choice seeds, or without them the report seeds themselves; a
    following row's are its leader's) and ``chosen`` (JSON: what was chosen, how, and the chains
    of the choosing cells, so that their artifacts stay named). Empty for a plain row."""
    if picked is None:
        return {"choice_seeds": [], "chosen": {}}
    row = leader(ab, ab.row(cell.row))
    group = [c for c in cells if c.row == row.label and c.column == cell.column]
    voters = [c for c in group if c.choosing] or group
    seeds = sorted({c.seed for c in voters})
    return {"choice_seeds": seeds, "chosen": {
        **picked, "by": "choose", "seeds": seeds, "metric": "val_epe_mm",
        **({"follows": row.label} if row.label != cell.row else {}),
        "artifacts": [{n.stage: n.key for n in c.nodes} for c in voters if c.choosing]}}


def tuned_choice(row: Row) -> dict:
    """The new record columns of a tuned row's cell (see ``record_choice``)."""
    t = row.tuned
    return {"choice_seeds": list(t["seeds"]), "chosen": {
        "by": "sweep", "sweep": t["sweep"], "file": t["file"], "metric": t["metric"],
        "params": t["params"], "seeds": list(t["seeds"]), "seeds_stated": t["seeds_stated"]}}


def _follow_one(row: Row, lead: Row, group: list[Cell], lead_pick: dict,
                done: dict) -> tuple[dict, str]:
    """A following row's value for one column: the one ``lead`` chose (``lead_pick``), never
    this row's own validation metric (shown beside it: its mean best val EPE per value over
    its report cells that finished, where it ran more than the chosen value)."""
    key = row.choose["key"]
    if "val_epe_mm" not in lead_pick:  # the leader chose nothing: keep its fallback's cells
        return {"value": lead_pick["value"]}, (f"{row.label}: follows {lead.label!r}, which "
                                               f"chose no value of {key}; nothing chosen")
    own = {}
    for v in row.choose["values"]:
        cs = [c for c in group if c.candidate == v and not c.choosing]
        if cs and all(c.node.id in done for c in cs):
            own[value_text(v)] = float(np.mean([selection_val_epe(done[c.node.id].metrics)
                                                for c in cs]))
    text = ("; this row's own mean best val EPE, not used: "
            + ", ".join(f"{k} {m:.2f}" for k, m in own.items()) + " mm") if len(own) > 1 else ""
    note = (f"{row.label}: {key} = {value_text(lead_pick['value'])}, the value {lead.label!r} "
            f"chose on val (matched to it){text}")
    return {**lead_pick, "follows": lead.label, "own_val_epe_mm": own}, note


def _edge_note(finished: list, best, d_median: float | None = None) -> str:
    """What the note adds when the chosen value is the smallest or the largest of 3 or more
    numeric values that finished: the grid does not bracket validation's optimum on that side,
    so a value beyond it may do better (widen the grid). Not so at the smallest value when its
    regularizer is already inert there (``d_median``, the choosing cells' mean median |D| after
    the last epoch, below ``diagnostics.INERT``): a weaker one changes nothing either."""
    numbers = [v for v in finished if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) < 3 or len(numbers) != len(finished) or best not in (min(numbers), max(numbers)):
        return ""
    side, beyond = ("smallest", "below") if best == min(numbers) else ("largest", "above")
    if side == "smallest" and d_median is not None and d_median < INERT:
        return (f"; the smallest value of the grid, where R is already inert (median |D| "
                f"{d_median:.2g} < {INERT:g}): a smaller value would change nothing either")
    return (f"; the {side} value of the grid: validation's optimum is not bracketed, a value "
            f"{beyond} it may do better (widen the grid)")


def _choose_one(row: Row, group: list[Cell], done: dict) -> tuple[dict, str]:
    """The value chosen for one (row, column) and the note saying so: by the choosing cells
    (those on choice seeds where there are, else every cell). When no value finished on every
    choosing seed, the first value's cells are kept (to record the failure)."""
    key, values = row.choose["key"], row.choose["values"]
    voters = [c for c in group if c.choosing]
    fresh = bool(voters)
    voters = voters or group
    means, tests = {}, {}
    for v in values:
        cs = [c for c in voters if c.candidate == v]
        if cs and all(c.node.id in done for c in cs):
            means[value_text(v)] = (v, float(np.mean(
                [selection_val_epe(done[c.node.id].metrics) for c in cs])))
            # recorded beside the choice, never used by it: does val rank the values as test?
            test = [done[c.node.id].metrics.get("test", {}).get("epe_mm") for c in cs]
            if None not in test:
                tests[value_text(v)] = float(np.mean(test))
    if not means:
        where = f" seed {seed_text({c.seed for c in voters})}" if fresh else " seed"
        return {"value": values[0]}, f"{row.label}: no value of {key} finished on every" \
                                     f"{where}; nothing chosen"
    best, _ = min(means.values(), key=lambda t: t[1])
    seeds = len({c.seed for c in voters})
    missing = [value_text(v) for v in values if value_text(v) not in means]
    vals = (", ".join(f"{k} {m:.2f}" for k, (_, m) in means.items()) + " mm"
            + (f"; not finished: {', '.join(missing)}" if missing else ""))
    if fresh:
        note = (f"{row.label}: {key} = {value_text(best)}, one value for the row, chosen on "
                f"seeds {seed_text({c.seed for c in voters})} (val; mean best val EPE: {vals}), "
                f"reported on seeds {seed_text({c.seed for c in group if not c.choosing})}")
    else:
        note = (f"{row.label}: {key} = {value_text(best)}, chosen on the validation split (mean "
                f"best val EPE over {seeds} seeds: {vals})")
    d = [done[c.node.id].metrics.get("prior_strength", {}).get("overall", {}).get("abs_d_median")
         for c in voters if c.candidate == best and c.node.id in done]
    note += _edge_note([v for v, _ in means.values()], best,
                       float(np.mean(d)) if d and None not in d else None)
    return {"key": key, "value": best, "val_epe_mm": {k: m for k, (_, m) in means.items()},
            "test_epe_mm": tests}, note
