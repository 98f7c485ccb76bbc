"""The ablation file: its loader (strict: every problem at once, each named with its key, before
any training), what it loads into (``Ablation``, ``Column``, ``Row``) and the table as one preset
runs it (``at_preset``: rows tuned at other presets left out)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cmkg import config as config_mod
from cmkg import stages
from cmkg.ablation.tuned import left_out_note, read_tuned
from cmkg.errors import ConfigError
from cmkg.report.figures import check_figures, without_rows
from cmkg.report.stats import KINDS
from cmkg.yamlfile import is_int, is_number, mapping, number, read_mapping, unknown_keys

FILE_KEYS = ("table", "title", "caption", "regenerates", "seeds", "set", "scale", "columns",
             "rows", "baseline_row", "compare_columns", "compare", "figures", "choice_seeds",
             "benchmark")
COLUMN_KEYS = ("stage", "title", "metrics", "set", "extend_epochs")
ROW_KEYS = ("label", "set", "scale", "paper", "choose", "tuned")
METRICS = ("epe_mm", "auc_20_50")


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
    # {key: dotted config key, values: [...]}: chosen on val; with follow: label, the value that
    # row chose (its key and values)
    choose: dict | None = None
    # a sweep's best.yaml (``tuned.read_best``): {where, path, params, sweep, metric, seeds, ...}
    tuned: dict | None = None
    # ``tuned: {preset: PATH}``: preset -> its best.yaml read; ``at_preset`` makes the running
    # preset's the row's ``tuned``, or leaves the row out where the preset is not named
    tuned_at: dict = field(default_factory=dict)


@dataclass
class Ablation:
    path: str
    table: str
    title: str
    caption: str
    regenerates: str
    seeds: int | list[int]  # report seeds: how many (0.. or after the choice seeds), or which
    set: dict
    scale: dict
    columns: dict[str, Column]
    rows: list[Row]
    comparisons: list[dict]
    figures: dict = field(default_factory=dict)  # cmkg.report.figures.FIGURES entries
    choice_seeds: int | list[int] | None = None  # seeds the choices are made on (None: the report's)
    # the cells that describe the benchmark rather than the method (cmkg.report.benchmark)
    benchmark: dict = field(default_factory=dict)
    # set by ``at_preset``: the rows resolved for ``preset``; a note per row it left out
    resolved: bool = False
    preset: str | None = None
    left_out: list[str] = field(default_factory=list)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


def load(path: str | Path) -> Ablation:
    """Read and check an ablation file (structure only; ``expand`` checks every override
    against the config)."""
    path = Path(path)
    data = read_mapping(path)  # missing file, bad YAML, not a mapping: one message
    p: list[str] = []
    unknown_keys(data, FILE_KEYS, "", p)
    for k in ("table", "columns", "rows"):
        if k not in data:
            p.append(f"{k}: missing")
    seeds = _seeds(data.get("seeds", 3), "seeds", p) or 1
    choice_seeds = _seeds(data.get("choice_seeds"), "choice_seeds", p)
    if isinstance(seeds, list) and isinstance(choice_seeds, list) and set(seeds) & set(choice_seeds):
        p.append(f"seeds: {sorted(set(seeds) & set(choice_seeds))} are also choice_seeds (report "
                 "seeds must be other seeds than those the choices are made on)")
    columns = _columns(data.get("columns"), p)
    rows = _rows(data.get("rows"), columns, p, path.parent)
    _follows(rows, p)
    comparisons = _comparisons(data, columns, rows, p)
    figures = check_figures(data.get("figures"), [r.label for r in rows], list(columns),
                            "figures", p)
    base, scale = mapping(data.get("set"), "set", p), _scale(data.get("scale"), "scale", p)
    bench = _benchmark(data.get("benchmark"), rows, columns, p)
    if p:
        raise ConfigError(str(path), p)
    return Ablation(str(path), str(data["table"]), str(data.get("title", data["table"])),
                    str(data.get("caption", "")), str(data.get("regenerates", "")), seeds,
                    base, scale, columns, rows, comparisons, figures, choice_seeds, bench)


def at_preset(ab: Ablation, preset: str | None) -> Ablation:
    """The table as ``preset`` runs it (None: a config naming no preset). A row with ``tuned:
    {preset: PATH}`` is a tuned row at a preset its mapping names (that preset's best.yaml) and
    is left out at any other: its cells, its comparisons (``compare``, ``baseline_row``), the
    ``benchmark`` entries and figure panels naming it (``figures.without_rows``), with a note
    per row (``left_out``). The runner calls this once it knows the preset, so that plans, dry
    runs, records, the stored spec and the report see the same rows; ``cells.expand`` calls it
    too. Called again at the same preset it returns ``ab``; at another it raises ValueError."""
    if ab.resolved:
        if ab.preset != preset:
            raise ValueError(f"{ab.path}: resolved at preset {ab.preset!r}, not {preset!r}")
        return ab
    rows, gone, notes = [], set(), []
    for r in ab.rows:
        if not r.tuned_at:
            rows.append(r)
        elif preset in r.tuned_at:
            rows.append(dataclasses.replace(r, tuned=r.tuned_at[preset]))
        else:
            gone.add(r.label)
            notes.append(left_out_note(r.label, r.tuned_at, preset))
    if not rows:
        at = preset or "a config naming no preset"
        raise ConfigError(ab.path, [f"rows: every row is tuned at other presets (tuned: "
                                    f"{{preset: PATH}}) than {at}: nothing to run"])

    def kept(ref) -> bool:
        return ref is not None and ref[0] not in gone

    bench = {}
    ratios = {k: v for k, v in (ab.benchmark.get("ratios") or {}).items() if kept(v)}
    if ratios:
        bench["ratios"] = ratios
    if "floor" in ab.benchmark and all(kept(v) for v in ab.benchmark["floor"].values()):
        bench["floor"] = ab.benchmark["floor"]
    if "agreement" in ab.benchmark and kept(ab.benchmark["agreement"]):
        bench["agreement"] = ab.benchmark["agreement"]
    return dataclasses.replace(
        ab, rows=rows, resolved=True, preset=preset, left_out=notes,
        comparisons=[c for c in ab.comparisons if c["a"][0] not in gone
                     and c["b"][0] not in gone],
        figures=without_rows(ab.figures, gone) if gone else ab.figures,
        benchmark=bench if gone else ab.benchmark)


def _benchmark(value, rows: list[Row], columns: dict[str, Column], p: list[str]) -> dict:
    """``benchmark: {ratios: {name: [row, column]}, floor: {baseline: [row, column], inert:
    [row, column]}, agreement: [row, column]}`` (``inert``: a row that changes nothing): each a cell of the table."""
    out = {}
    bench = mapping(value, "benchmark", p)
    unknown_keys(bench, ("ratios", "floor", "agreement"), "benchmark", p)
    labels = {r.label: r for r in rows}

    def cell(ref, key: str, choose: bool = False) -> list | None:
        if not (isinstance(ref, list) and len(ref) == 2 and ref[0] in labels
                and ref[1] in columns):
            p.append(f"{key}: must be [row label, column name] of this table, got {ref!r}")
            return None
        if choose and labels[ref[0]].choose is None:
            p.append(f"{key}: row {ref[0]!r} has no choose (agreement is over its values)")
        return [str(ref[0]), str(ref[1])]

    if "ratios" in bench:
        out["ratios"] = {str(k): cell(v, f"benchmark.ratios.{k}")
                         for k, v in mapping(bench["ratios"], "benchmark.ratios", p).items()}
    if "floor" in bench:
        f = mapping(bench["floor"], "benchmark.floor", p)
        unknown_keys(f, ("baseline", "inert"), "benchmark.floor", p)
        out["floor"] = {k: cell(f.get(k), f"benchmark.floor.{k}") for k in ("baseline", "inert")}
    if "agreement" in bench:
        out["agreement"] = cell(bench["agreement"], "benchmark.agreement", choose=True)
    return out


def _seeds(value, key: str, problems: list[str]) -> int | list[int] | None:
    """``seeds`` / ``choice_seeds``: a count n >= 1, or a list of distinct seeds >= 0."""
    if value is None or is_int(value, 1):
        return value
    if isinstance(value, list) and value and all(is_int(v, 0) for v in value) \
            and len(set(value)) == len(value):
        return list(value)
    problems.append(f"{key}: must be an integer >= 1 or a list of different integers >= 0, "
                    f"got {value!r}")
    return None


def _scale(value, key: str, problems: list[str]) -> dict:
    """``scale: {preset: {set, note}}``: what a preset runs instead, and says so."""
    out = {}
    for preset, entry in mapping(value, key, problems).items():
        where = f"{key}.{preset}"
        if preset not in config_mod.PRESETS:
            problems.append(f"{where}: not a preset ({', '.join(config_mod.PRESETS)})")
            continue
        entry = mapping(entry, where, problems)
        unknown_keys(entry, ("set", "note"), where, problems)
        out[preset] = {"set": mapping(entry.get("set"), f"{where}.set", problems),
                       "note": str(entry["note"]) if entry.get("note") else None}
    return out


def _columns(value, p: list[str]) -> dict[str, Column]:
    columns: dict[str, Column] = {}
    for name, c in mapping(value, "columns", p).items():
        key = f"columns.{name}"
        c = mapping(c, key, p)
        unknown_keys(c, COLUMN_KEYS, key, p)
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
                                    mapping(c.get("set"), f"{key}.set", p), ext)
    return columns


def _rows(value, columns: dict[str, Column], p: list[str], folder: Path) -> list[Row]:
    rows: list[Row] = []
    if not isinstance(value, list) or not value:
        p.append("rows: must be a non-empty list")
        value = []
    for i, r in enumerate(value):
        key = f"rows[{i}]"
        r = mapping(r, key, p)
        unknown_keys(r, ROW_KEYS, key, p)
        label = r.get("label")
        if not isinstance(label, str) or not label:
            p.append(f"{key}.label: missing")
            continue
        if any(x.label == label for x in rows):
            p.append(f"{key}.label: {label!r} appears twice")
        tuned, tuned_at = None, {}
        if r.get("tuned") is not None:
            tuned, tuned_at = read_tuned(r["tuned"], folder, f"{key}.tuned",
                                         config_mod.PRESETS, p)
            if r.get("choose") is not None:
                p.append(f"{key}: choose and tuned exclude each other (a tuned row's value was "
                         "chosen by its sweep)")
        rows.append(Row(label, mapping(r.get("set"), f"{key}.set", p),
                        _scale(r.get("scale"), f"{key}.scale", p),
                        _paper(r.get("paper"), columns, f"{key}.paper", p),
                        _choose(r.get("choose"), f"{key}.choose", p), tuned, tuned_at))
    return rows


def _paper(value, columns: dict[str, Column], key: str, p: list[str]) -> dict:
    """A row's ``paper: {column: value | {metric: value}}`` (a bare value: the column's first
    metric)."""
    paper = {}
    for col, vals in mapping(value, key, p).items():
        if col not in columns:
            p.append(f"{key}.{col}: not a column ({', '.join(columns)})")
            continue
        if is_number(vals):
            vals = {columns[col].metrics[0]: vals}
        vals = mapping(vals, f"{key}.{col}", p)
        bad = [m for m in vals if m not in columns[col].metrics]
        if bad:
            p.append(f"{key}.{col}.{bad[0]}: not a metric of the column")
        paper[col] = {}
        for m, v in vals.items():
            if m in bad:
                continue
            if not is_number(number(v)):
                p.append(f"{key}.{col}.{m}: must be a number, got {v!r}")
                continue
            paper[col][m] = float(number(v))
    return paper


def _choose(value, key: str, problems: list[str]) -> dict | None:
    """A row's ``choose: {key: dotted.config.key, values: [v1, v2, ...]}`` (>= 2 values), or
    ``choose: {follow: label}``: the value the named row chooses (``_follows``)."""
    if value is None:
        return None
    value = mapping(value, key, problems)
    unknown_keys(value, ("key", "values", "follow"), key, problems)
    if "follow" in value:  # completed from the named row once every row is read
        if not isinstance(value["follow"], str) or not value["follow"]:
            problems.append(f"{key}.follow: must be the label of another row")
            return None
        return {k: value[k] for k in ("follow", "key", "values") if k in value}
    ok = True
    if not isinstance(value.get("key"), str) or not value["key"]:
        problems.append(f"{key}.key: missing (a dotted config key, e.g. regularizer.sigma)")
        ok = False
    values = value.get("values")
    if not isinstance(values, list) or len(values) < 2 or len(set(map(repr, values))) < len(values):
        problems.append(f"{key}.values: must be a list of at least 2 different values")
        ok = False
    return {"key": value["key"], "values": list(values)} if ok else None


def _follows(rows: list[Row], p: list[str]) -> None:
    """Complete the rows whose ``choose`` follows another row (a control at the strength the
    learned row chose on val): the named row must choose a value itself; the follower takes
    its key and values (any it states must be the same), and the runner gives it, per column,
    the value that row chose (``cells.choose``, ``cells.decisions``)."""
    labels = {r.label: r for r in rows}
    for r in rows:
        follow = (r.choose or {}).get("follow")
        if follow is None:
            continue
        where = f"row {r.label!r}: choose.follow"
        lead = labels.get(follow)
        if lead is None or lead is r:
            p.append(f"{where}: {follow!r} is not another row's label")
        elif lead.choose is None or "follow" in lead.choose:
            p.append(f"{where}: row {follow!r} has no choose of its own (key and values) to follow")
        else:
            for k in ("key", "values"):
                if k in r.choose and r.choose[k] != lead.choose[k]:
                    p.append(f"{where}: choose.{k} must be row {follow!r}'s ({lead.choose[k]!r}) "
                             "or left out")
            r.choose = {"key": lead.choose["key"], "values": list(lead.choose["values"]),
                        "follow": follow}


def _kind(entry: dict, where: str, p: list[str]) -> str:
    """A comparison's ``kind``: ``method`` (a claim of the paper's method; the default) or
    ``sanity`` (a property of the data, e.g. the depth teacher against the RGB student)."""
    kind = entry.get("kind", KINDS[0])
    if kind not in KINDS:
        p.append(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        return KINDS[0]
    return kind


def _comparisons(data: dict, columns: dict[str, Column], rows: list[Row],
                 p: list[str]) -> list[dict]:
    """Every paired comparison as {a: [row, col], b: [row, col], metric, paper_delta, kind}.

    ``baseline_row: row`` or ``{row: row, kind: ...}``; ``compare_columns`` entries
    ``[column, column]`` or ``{columns: [column, column], kind: ...}``; ``compare`` entries
    ``{a: [row, column], b: [row, column], kind: ...}``. ``kind`` is ``method`` or ``sanity``
    (``cmkg.report.stats.KINDS``; ``method`` when omitted)."""
    labels = [r.label for r in rows]
    pairs: list[tuple[tuple[str, str], tuple[str, str], str]] = []
    base = data.get("baseline_row")
    if base is not None:
        kind = KINDS[0]
        if isinstance(base, dict):
            unknown_keys(base, ("row", "kind"), "baseline_row", p)
            kind, base = _kind(base, "baseline_row", p), base.get("row")
        if base not in labels:
            p.append(f"baseline_row: {base!r} is not a row label")
        else:
            pairs += [((r, c), (base, c), kind) for r in labels if r != base for c in columns]
    for i, pair in enumerate(data.get("compare_columns") or []):
        where, kind = f"compare_columns[{i}]", KINDS[0]
        if isinstance(pair, dict):
            unknown_keys(pair, ("columns", "kind"), where, p)
            kind, pair = _kind(pair, where, p), pair.get("columns")
        if (not isinstance(pair, list) or len(pair) != 2
                or any(c not in columns for c in pair)):
            p.append(f"{where}: must be [column, column] or {{columns: [column, column], "
                     f"kind: ...}} of {', '.join(columns)}")
            continue
        pairs += [((r, pair[0]), (r, pair[1]), kind) for r in labels]
    for i, cmp in enumerate(data.get("compare") or []):
        where = f"compare[{i}]"
        cmp = mapping(cmp, where, p)
        unknown_keys(cmp, ("a", "b", "kind"), where, p)
        kind = _kind(cmp, where, p)
        ok = all(isinstance(cmp.get(s), list) and len(cmp[s]) == 2 and cmp[s][0] in labels
                 and cmp[s][1] in columns for s in ("a", "b"))
        if not ok:
            p.append(f"{where}: must be {{a: [row, column], b: [row, column], kind: ...}}")
            continue
        pairs.append((tuple(cmp["a"]), tuple(cmp["b"]), kind))
    out = []
    for a, b, kind in pairs:
        for metric in columns[a[1]].metrics:
            if metric not in columns[b[1]].metrics:
                continue
            pa = next(r for r in rows if r.label == a[0]).paper.get(a[1], {}).get(metric)
            pb = next(r for r in rows if r.label == b[0]).paper.get(b[1], {}).get(metric)
            delta = None if pa is None or pb is None else round(pa - pb, 6)
            out.append({"a": list(a), "b": list(b), "metric": metric, "paper_delta": delta,
                        "kind": kind})
    return out
