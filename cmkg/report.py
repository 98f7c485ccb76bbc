"""Reports: the paper's tables and figures, regenerated from stored result records only.

The ablation runner writes one Parquet file per table, ``RESULTS_DIR/{table}.parquet``
(``write_records``): one row per cell (table, row, column, seed) in ``SCHEMA``, and the table's
spec (title, columns and their metrics, rows with the paper's numbers, comparisons, notes, seeds,
preset) as JSON under the schema metadata key ``cmkg.table``. ``render_reports`` turns those files,
and nothing else, into ``reports/``: ``{table}.md`` and ``{table}.csv`` (and
``{table}_comparisons.csv``), ``figure4.png``, ``figure5.png`` and a ``README.md`` index.

Statistics. A cell shows mean ± sample standard deviation over the seeds whose cell finished.
A comparison of cell a with cell b is the paired difference d_s = a_s - b_s over the seeds s
where both finished, with the 95 % Student-t interval

    mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)

and a verdict: "same direction as the paper" (the interval excludes 0 and has the sign of the
paper's delta), "opposite to the paper" (excludes 0, other sign) or "inconclusive".

Fig. 5 can also be drawn from finished stage folders (``fig5_from_artifacts``, the CLI's
``cmkg figure params``): the histogram of the target network's parameters trained without a
regularizer and with R of Eq. (10), and beside them the histogram of the learned phi.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmkg.atomic import atomic_path
from cmkg.errors import DataError

BINS = 101
SPEC_KEY = b"cmkg.table"  # schema metadata key of the table spec (JSON)

# metric column -> (label, decimals); a table may report only these
METRICS = {"epe_mm": ("EPE (mm)", 2), "auc_20_50": ("AUC 20-50", 3),
           "mean_pose_epe_mm": ("mean pose EPE (mm)", 2)}
JSON_FIELDS = ("artifacts", "stage_walls", "extra")  # JSON objects stored as strings
LIST_FIELDS = ("pck_thresholds_mm", "pck", "per_joint_epe_mm")  # empty for a failed cell
REQUIRED = ("table", "row", "column", "seed", "status")

SCHEMA = pa.schema([
    ("table", pa.string()), ("row", pa.string()), ("column", pa.string()), ("seed", pa.int64()),
    ("status", pa.string()),  # "done" | "failed"
    ("error", pa.string()),  # a failed cell's one-line reason
    ("stage", pa.string()), ("key", pa.string()), ("config_fingerprint", pa.string()),
    ("artifacts", pa.string()),  # JSON {stage: artifact key} of the cell's chain
    ("epe_mm", pa.float64()), ("auc_20_50", pa.float64()), ("mean_pose_epe_mm", pa.float64()),
    ("pck_thresholds_mm", pa.list_(pa.float64())),  # 20 thresholds, 0..50 mm
    ("pck", pa.list_(pa.float64())),  # 3D PCK at those thresholds
    ("per_joint_epe_mm", pa.list_(pa.float64())),  # (21,)
    ("wall_s", pa.float64()),  # training time of the cell's own stage, 0 if shared or cached
    ("stage_walls", pa.string()),  # JSON {stage: seconds} of the whole chain
    ("code_version", pa.string()), ("device", pa.string()), ("preset", pa.string()),
    ("extra", pa.string()),  # JSON: theta_hist, phi_hist {edges, counts}, phi {mean, std, ...}
])

SAME, OPPOSITE, INCONCLUSIVE = "same direction as the paper", "opposite to the paper", "inconclusive"

# The figures name the cells they draw (their tables are generic).
FIG4_TABLE, FIG4_ROW, FIG4_COLUMNS = "table1", "L_ACT + L_ATT", ("rgb", "kd")
FIG4_PAPER_DELTA_AUC = 0.045  # tables.yaml figure4_middle.delta_auc.this_paper (RHD, kd - rgb)
PCK_TABLE = "table2"  # Fig. 4 (right): PCK curves of every row
FIG5_TABLE, FIG5_WITHOUT = "table2", "none"
# the row whose theta and phi Fig. 5 shows: the first of these with a histogram (the calibrated
# prior where it was run: the paper-beta phi leaves theta as without R, PRIOR-SCALE.md)
FIG5_WITH = ("weighted l2 (calibrated)", "weighted l2 (paper β)", "weighted l2")


# ---------------------------------------------------------------- result records (Parquet)

def write_records(path: str | Path, spec: dict, records: list[dict]) -> Path:
    """Write one table's cells (``SCHEMA``) and its spec (schema metadata) atomically.

    JSON fields (artifacts, stage_walls, extra) may be given as dicts; missing optional fields
    are null, missing lists empty. An unknown field or a record of another table is an error."""
    rows = [_normalise(r, spec) for r in records]
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
        {SPEC_KEY: json.dumps(spec, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _normalise(record: dict, spec: dict) -> dict:
    unknown = sorted(set(record) - set(SCHEMA.names))
    missing = [k for k in REQUIRED if record.get(k) is None]
    if unknown or missing:
        raise ValueError(f"result record {record.get('row')!r}/{record.get('column')!r}: "
                         f"unknown fields {unknown}, missing fields {missing}")
    if record["status"] not in ("done", "failed"):
        raise ValueError(f"result record status {record['status']!r}: expected done or failed")
    if record["table"] != spec.get("table"):
        raise ValueError(f"result record of {record['table']!r} in the file of {spec.get('table')!r}")
    out = {name: record.get(name) for name in SCHEMA.names}
    for name in LIST_FIELDS:
        out[name] = list(out[name] or [])
    for name in JSON_FIELDS:
        if isinstance(out[name], dict):
            out[name] = json.dumps(out[name], sort_keys=True)
    return out


def load_records(results_dir: str | Path) -> dict[str, tuple[dict, list[dict]]]:
    """``{table: (spec, records)}`` from ``results_dir/*.parquet``, sorted by table name.

    Records are dicts of ``SCHEMA``'s fields, with the JSON fields decoded (``{}`` when null).
    Raises ``DataError`` naming the folder when it holds no results, or the file when one is
    unreadable, lacks the spec, or holds a cell its spec does not name."""
    folder = Path(results_dir)
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no result records (*.parquet) found")
    tables: dict[str, tuple[dict, list[dict]]] = {}
    seen: dict[str, Path] = {}
    for path in files:
        spec, records = _read_records(path)
        name = spec["table"]
        if name in seen:
            raise DataError(f"{path}: table {name!r} is also in {seen[name].name}")
        seen[name] = path
        tables[name] = (spec, records)
    return dict(sorted(tables.items()))


def _read_records(path: Path) -> tuple[dict, list[dict]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    meta = table.schema.metadata or {}
    if SPEC_KEY not in meta:
        raise DataError(f"{path}: no table spec (schema metadata {SPEC_KEY.decode()!r}); "
                        "result files are written by cmkg.report.write_records")
    try:
        spec = json.loads(meta[SPEC_KEY])
    except ValueError as e:
        raise DataError(f"{path}: table spec is not JSON ({e})") from None
    problems = _spec_problems(spec)
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        problems.append(f"missing columns {missing}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    rows = {r["label"] for r in spec["rows"]}
    columns = {c["name"] for c in spec["columns"]}
    records, cells = [], set()
    for r in table.select(SCHEMA.names).to_pylist():
        where = f"{path}: cell {r['row']!r}/{r['column']!r} seed {r['seed']}"
        if r["table"] != spec["table"] or r["row"] not in rows or r["column"] not in columns:
            raise DataError(f"{where} of table {r['table']!r} is not in the spec of "
                            f"{spec['table']!r}")
        if (r["row"], r["column"], r["seed"]) in cells:
            raise DataError(f"{where} appears twice")
        if r["status"] not in ("done", "failed"):
            raise DataError(f"{where}: status {r['status']!r}, expected done or failed")
        cells.add((r["row"], r["column"], r["seed"]))
        for name in JSON_FIELDS:
            try:
                r[name] = json.loads(r[name]) if r[name] else {}
            except ValueError:
                raise DataError(f"{where}: field {name} is not JSON") from None
        for name in LIST_FIELDS:
            r[name] = r[name] or []
        records.append(r)
    return spec, records


def _spec_problems(spec) -> list[str]:
    if not isinstance(spec, dict):
        return ["table spec is not a JSON object"]
    problems = []
    if not isinstance(spec.get("table"), str):
        problems.append("spec.table: expected a string")
    columns, rows = spec.get("columns"), spec.get("rows")
    if not isinstance(columns, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in columns):
        problems.append("spec.columns: expected a list of {name, metrics}")
        columns = []
    for c in columns:
        bad = [m for m in c.get("metrics", []) if m not in METRICS]
        if bad or not c.get("metrics"):
            problems.append(f"spec.columns[{c['name']}].metrics: expected some of {list(METRICS)}")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("label"), str) for r in rows):
        problems.append("spec.rows: expected a list of {label, paper}")
        rows = []
    cells = {(r["label"], c["name"]) for r in rows for c in columns}
    for i, comp in enumerate(spec.get("comparisons") or []):
        ends = [comp.get(k) for k in ("a", "b")] if isinstance(comp, dict) else [None]
        if not all(isinstance(e, list) and tuple(e) in cells for e in ends) \
                or comp.get("metric") not in METRICS:
            problems.append(f"spec.comparisons[{i}]: expected a and b [row, column] of the "
                            f"spec and a metric of {list(METRICS)}")
    return problems


# ---------------------------------------------------------------- statistics

def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a - b, their sample sd and the 95 % Student-t interval.

    ``lo``/``hi`` (and ``sd`` for n < 2) are None when there are fewer than two pairs."""
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    out = {"mean": statistics.fmean(d) if d else None, "lo": None, "hi": None, "n": n,
           "sd": None}
    if n >= 2:
        sd = statistics.stdev(d)
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def verdict(interval: dict, paper_delta: float | None = None) -> str:
    """What a paired interval says about the paper's delta (a - b, same sign convention).

    Without a paper delta (None, or 0: no direction to compare) it says "lower"/"higher"."""
    if interval["n"] < 2:
        return f"{INCONCLUSIVE} (n={interval['n']})"
    lo, hi = interval["lo"], interval["hi"]
    if lo <= 0.0 <= hi:
        return INCONCLUSIVE
    if not paper_delta:
        return "higher" if lo > 0 else "lower"
    return SAME if (lo > 0) == (paper_delta > 0) else OPPOSITE


# ---------------------------------------------------------------- tables

def _cells(spec: dict, records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records per (row, column) of the spec, by seed."""
    cells: dict[tuple[str, str], list[dict]] = {
        (r["label"], c["name"]): [] for r in spec["rows"] for c in spec["columns"]}
    for r in sorted(records, key=lambda r: r["seed"]):
        cells[(r["row"], r["column"])].append(r)
    return cells


def _values(cell: list[dict], metric: str) -> dict[int, float]:
    """{seed: value} of the finished seeds of a cell that report ``metric``."""
    return {r["seed"]: r[metric] for r in cell if r["status"] == "done" and r[metric] is not None}


def _summary(cell: list[dict], metric: str) -> dict:
    values = _values(cell, metric)
    v = list(values.values())
    return {"mean": statistics.fmean(v) if v else None,
            "std": statistics.stdev(v) if len(v) >= 2 else None, "n": len(v),
            "failed": sum(r["status"] == "failed" for r in cell), "runs": len(cell),
            "seeds": sorted(values)}


def _paper(spec: dict, row: str, column: str, metric: str) -> float | None:
    for r in spec["rows"]:
        if r["label"] == row:
            return ((r.get("paper") or {}).get(column) or {}).get(metric)
    return None


def _fmt(x: float | None, metric: str, signed: bool = False) -> str:
    if x is None:
        return "—"
    return format(x, f"{'+' if signed else ''}.{METRICS[metric][1]}f")


def _fmt_ours(s: dict, metric: str) -> str:
    if s["runs"] == 0:
        return "not run"
    if s["n"] == 0:
        return "failed" if s["failed"] == s["runs"] else "—"
    value = _fmt(s["mean"], metric) + (f" ± {_fmt(s['std'], metric)}" if s["n"] >= 2 else "")
    failed = f", {s['failed']} failed" if s["failed"] else ""
    return f"{value} (n={s['n']}{failed})"


def _comparisons(spec: dict, cells: dict) -> list[dict]:
    out = []
    for comp in spec.get("comparisons") or []:
        a, b = _values(cells[tuple(comp["a"])], comp["metric"]), \
            _values(cells[tuple(comp["b"])], comp["metric"])
        seeds = sorted(set(a) & set(b))
        interval = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
        out.append({"table": spec["table"], "a": comp["a"], "b": comp["b"],
                    "metric": comp["metric"], "paper_delta": comp.get("paper_delta"),
                    "seeds": seeds, **interval,
                    "verdict": verdict(interval, comp.get("paper_delta"))})
    return out


def _comparison_label(c: dict) -> str:
    (ar, ac), (br, bc) = c["a"], c["b"]
    if ac == bc:
        return f"{ar} − {br} ({ac})"
    if ar == br:
        return f"{ac} − {bc} ({ar})"
    return f"{ar} / {ac} − {br} / {bc}"


def _fmt_interval(c: dict) -> str:
    if c["lo"] is None:
        return "—"
    return f"[{_fmt(c['lo'], c['metric'], True)}, {_fmt(c['hi'], c['metric'], True)}]"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_md(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _seeds(seeds) -> str:
    return ", ".join(str(s) for s in seeds) if seeds else "—"


def _mean_pose_line(spec: dict, cells: dict) -> str:
    """The reference every EPE should beat: predicting the training set's mean pose for every
    test image, per column (one value, or one per row where the rows' test sets differ)."""
    parts = []
    for c in spec["columns"]:
        per_row = {}
        for r in spec["rows"]:
            vals = [x["mean_pose_epe_mm"] for x in cells[(r["label"], c["name"])]
                    if x["status"] == "done" and x.get("mean_pose_epe_mm") is not None]
            if vals:
                per_row[r["label"]] = float(np.mean(vals))
        if not per_row:
            continue
        values = list(per_row.values())
        if max(values) - min(values) < 0.005:
            parts.append(f"{c.get('title') or c['name']} {values[0]:.2f}")
        else:
            parts.append(f"{c.get('title') or c['name']}: " + ", ".join(
                f"{label} {v:.2f}" for label, v in per_row.items()))
    if not parts:
        return ""
    return ("Mean-pose baseline, EPE (mm) of predicting the training set's mean pose for every "
            "test image: " + "; ".join(parts) + ".\n")


def table_markdown(spec: dict, records: list[dict]) -> str:
    """One table as Markdown: the paper's numbers beside ours, comparisons, failures, notes."""
    cells = _cells(spec, records)
    pairs = [(c, m) for c in spec["columns"] for m in c["metrics"]]
    header = ["row"]
    for c, m in pairs:
        title = f"{c.get('title') or c['name']}: {METRICS[m][0]}"
        header += [f"{title}, paper", f"{title}, ours"]
    body = []
    for r in spec["rows"]:
        line = [r["label"]]
        for c, m in pairs:
            line += [_fmt(_paper(spec, r["label"], c["name"], m), m),
                     _fmt_ours(_summary(cells[(r["label"], c["name"])], m), m)]
        body.append(line)
    out = [f"# {spec.get('title') or spec['table']}\n"]
    if spec.get("caption"):
        out.append(f"{spec['caption']}\n")
    if spec.get("regenerates"):
        out.append(f"Regenerates: {spec['regenerates']}.\n")
    out.append(f"Preset `{spec.get('preset', '—')}`; seeds {_seeds(spec.get('seeds'))}.\n")
    out.append("Ours: mean ± sample standard deviation over the seeds whose cell finished "
               "(n of them; failed seeds are counted apart). \"not run\": no record.\n")
    out.append(_md_table(header, body, right=set(range(1, len(header)))))
    baseline = _mean_pose_line(spec, cells)
    if baseline:
        out.append(baseline)

    comparisons = _comparisons(spec, cells)
    if comparisons:
        better = spec.get("lower_is_better") or {}
        used = sorted({c["metric"] for c in comparisons}, key=list(METRICS).index)
        sense = "; ".join(f"{METRICS[m][0]}: {'lower' if better[m] else 'higher'} is better"
                          for m in used if m in better)
        out.append("## Comparisons\n")
        out.append("Paired difference a − b over the seeds where both cells finished, with its "
                   "95 % Student-t interval (n − 1 degrees of freedom). The verdict compares the "
                   "interval with 0 and its sign with the paper's delta."
                   + (f" {sense}." if sense else "") + "\n")
        out.append(_md_table(
            ["a − b", "metric", "ours", "95 % interval", "n", "paper", "verdict"],
            [[_comparison_label(c), METRICS[c["metric"]][0],
              _fmt(c["mean"], c["metric"], True), _fmt_interval(c), str(c["n"]),
              _fmt(c["paper_delta"], c["metric"], True), c["verdict"]] for c in comparisons],
            right={2, 4, 5}))

    failed = [r for cell in cells.values() for r in cell if r["status"] == "failed"]
    if failed:
        out.append("## Failed cells\n")
        out.append(_md_table(["row", "column", "seed", "stage", "error"],
                             [[r["row"], r["column"], str(r["seed"]), r["stage"] or "—",
                               r["error"] or "—"] for r in failed], right={2}))
    if spec.get("phi_correlation"):
        out.append("## φ_META across seeds\n")
        out.append("Pearson correlation of the learned φ (one value per regularised weight) "
                   "between meta stages of different seeds: knowledge shared by the seeds shows "
                   "as a correlation well above 0, noise as about 0.\n")
        out.append(_md_table(["form", "seeds", "correlation", "weights"],
                             [[c["form"], f"{c['seeds'][0]} vs {c['seeds'][1]}",
                               "— (φ constant)" if c["pearson"] is None
                               else f"{c['pearson']:+.3f}", str(c["count"])]
                              for c in spec["phi_correlation"]], right={2, 3}))
    strength = _strength_rows(spec, records)
    if strength:
        out.append("## The regularizer's strength\n")
        out.append("Per row, over the n seeds whose stage logged it (mean): D, the e-folds "
                   "R decays (D > 0) or grows "
                   "(D < 0) a weight over the target run with Adam's own gradient scale "
                   "(PRIOR-SCALE.md; |D| << 0.1: R does nothing), its median over the "
                   "regularised weights and the fraction with |D| > 0.1, after the last epoch; "
                   "||∇R|| / ||∇L_REG|| on the regularised weights; for a calibrated prior, the "
                   "factor applied to φ_META and the β of Algorithm 1 it amounts to.\n")
        out.append(_md_table(["row", "n", "median abs D", "abs D > 0.1", "D < 0", "grad ratio",
                              "φ scale", "β equivalent"], strength,
                             right={1, 2, 3, 4, 5, 6, 7}))
    if spec.get("notes"):
        out.append("## Notes\n")
        out.append("".join(f"- {n}\n" for n in spec["notes"]))
    return "\n".join(out)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _strength_rows(spec: dict, records: list[dict]) -> list[list[str]]:
    """The D table's rows from the records' ``extra.prior_strength`` / ``extra.calibration``."""
    out = []
    for r in spec["rows"]:
        found = [x["extra"] for x in records if x["row"] == r["label"] and x["status"] == "done"
                 and "prior_strength" in x["extra"]]
        if not found:
            continue
        overall = [f["prior_strength"]["overall"] for f in found]
        cal = [f["calibration"] for f in found if "calibration" in f]
        out.append([r["label"], str(len(found)), _g(_mean([o["abs_d_median"] for o in overall])),
                    _g(_mean([o.get("frac_abs_d_gt_0.1") for o in overall])),
                    _g(_mean([o["frac_d_negative"] for o in overall])),
                    _g(_mean([o.get("grad_ratio") for o in overall])),
                    _g(_mean([c["scale"] for c in cal])) if cal else "—",
                    _g(_mean([c.get("beta_equivalent") for c in cal])) if cal else "—"])
    return out


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if x is None else x for x in row] for row in rows])
    return buf.getvalue()


def table_csv(spec: dict, records: list[dict]) -> str:
    """One line per (row, column, metric): the paper's number and ours at full precision."""
    cells = _cells(spec, records)
    rows = []
    for r in spec["rows"]:
        for c in spec["columns"]:
            for m in c["metrics"]:
                s = _summary(cells[(r["label"], c["name"])], m)
                rows.append([spec["table"], r["label"], c["name"], m,
                             _paper(spec, r["label"], c["name"], m), s["mean"], s["std"], s["n"],
                             s["failed"], ";".join(str(x) for x in s["seeds"])])
    return _csv(["table", "row", "column", "metric", "paper", "mean", "std", "n", "failed",
                 "seeds"], rows)


def comparisons_csv(spec: dict, records: list[dict]) -> str:
    rows = [[c["table"], *c["a"], *c["b"], c["metric"], c["n"], c["mean"], c["sd"], c["lo"],
             c["hi"], c["paper_delta"], c["verdict"], ";".join(str(s) for s in c["seeds"])]
            for c in _comparisons(spec, _cells(spec, records))]
    return _csv(["table", "a_row", "a_column", "b_row", "b_column", "metric", "n", "mean", "sd",
                 "lo", "hi", "paper_delta", "verdict", "seeds"], rows)


# ---------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return Path(out)


def _mean_pck(cell: list[dict], where: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(thresholds, mean PCK over the finished seeds, n) of a cell; None if none finished."""
    done = [r for r in cell if r["status"] == "done" and r["pck"]]
    if not done:
        return None
    x = done[0]["pck_thresholds_mm"]
    if any(r["pck_thresholds_mm"] != x or len(r["pck"]) != len(x) for r in done):
        raise DataError(f"{where}: PCK curves of different thresholds across seeds")
    return np.asarray(x), np.mean([r["pck"] for r in done], axis=0), len(done)


def figure4(tables: dict[str, tuple[dict, list[dict]]], out: str | Path) -> list[str]:
    """Fig. 4: PCK of rgb vs kd (Table 1), the per-seed AUC gain of kd, PCK of Table 2's rows.

    Panels whose table (or cells) are missing are left out. Returns what the drawn panels show;
    empty (and no file) when none is left."""
    panels: list[tuple[str, Callable]] = []
    if FIG4_TABLE in tables:
        spec, records = tables[FIG4_TABLE]
        cells = _cells(spec, records)
        if all((FIG4_ROW, c) in cells for c in FIG4_COLUMNS):
            rgb, kd = (cells[(FIG4_ROW, c)] for c in FIG4_COLUMNS)
            paper = spec.get("figure4_paper_delta_auc")
            paper = FIG4_PAPER_DELTA_AUC if paper is None else paper

            def left(ax):
                for name, cell in zip(FIG4_COLUMNS, (rgb, kd)):
                    curve = _mean_pck(cell, f"{FIG4_TABLE} {FIG4_ROW}/{name}")
                    if curve is not None:
                        ax.plot(curve[0], curve[1], label=f"{name} (n={curve[2]})")
                _pck_axes(ax, f"{FIG4_ROW}: 3D PCK on the source")

            def middle(ax):
                a, b = _values(kd, "auc_20_50"), _values(rgb, "auc_20_50")
                seeds = sorted(set(a) & set(b))
                d = [a[s] - b[s] for s in seeds]
                iv = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
                ax.scatter(np.linspace(-0.15, 0.15, len(d)) if len(d) > 1 else [0.0] * len(d), d,
                           color="tab:blue", zorder=3, label="per seed")
                if iv["n"]:
                    err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]],
                                                         [iv["hi"] - iv["mean"]]]
                    ax.errorbar([0.0], [iv["mean"]], yerr=err, fmt="_", color="black",
                                markersize=30, capsize=6, label="mean, 95 % interval")
                    ax.annotate(f"{iv['mean']:+.3f}", (0.25, iv["mean"]), va="center",
                                fontsize=8)
                ax.bar([1.0], [paper], width=0.5, color="tab:gray", label="paper")
                ax.annotate(f"{paper:+.3f}", (1.0, paper), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=8)
                ax.axhline(0.0, color="black", linewidth=0.6)
                ax.set_xticks([0.0, 1.0], [f"ours (n={iv['n']})", "paper"])
                ax.set_xlim(-0.6, 1.6)
                ax.set_title(f"ΔAUC 20-50, {FIG4_COLUMNS[1]} − {FIG4_COLUMNS[0]} (source)",
                             fontsize=9)
                ax.legend(fontsize=7)

            panels += [(f"3D PCK of {' vs '.join(FIG4_COLUMNS)} ({FIG4_ROW})", left),
                       (f"the per-seed AUC 20-50 gain of {' − '.join(reversed(FIG4_COLUMNS))} "
                        "beside the paper's", middle)]
    if PCK_TABLE in tables:
        spec, records = tables[PCK_TABLE]
        cells = _cells(spec, records)

        def right(ax):
            one = len(spec["columns"]) == 1
            for (row, column), cell in cells.items():
                curve = _mean_pck(cell, f"{PCK_TABLE} {row}/{column}")
                if curve is not None:
                    name = row if one else f"{row} / {column}"
                    ax.plot(curve[0], curve[1], label=f"{name} (n={curve[2]})")
            _pck_axes(ax, f"{spec.get('title') or PCK_TABLE}: 3D PCK")

        panels.append((f"3D PCK of every row of {PCK_TABLE}", right))
    if not panels:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (_, draw) in zip(axes[0], panels):
        draw(ax)
    fig.tight_layout()
    _save(fig, out)
    return [caption for caption, _ in panels]


def _pck_axes(ax, title: str) -> None:
    ax.set_xlabel("error threshold (mm)")
    ax.set_ylabel("3D PCK")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")


def _first_extra(spec: dict, records: list[dict], row: str, key: str) -> tuple[int, dict] | None:
    """(seed, extra) of the first seed (the spec's order) whose finished cell in ``row`` holds
    ``extra[key]``; the columns are tried in the spec's order."""
    order = {s: i for i, s in enumerate(spec.get("seeds") or [])}
    columns = [c["name"] for c in spec["columns"]]
    found = [r for r in records if r["row"] == row and r["status"] == "done" and key in r["extra"]]
    found.sort(key=lambda r: (order.get(r["seed"], len(order)), r["seed"],
                              columns.index(r["column"])))
    return (found[0]["seed"], found[0]["extra"]) if found else None


def figure5(tables: dict[str, tuple[dict, list[dict]]], out: str | Path) -> list[str]:
    """Fig. 5 from the records: theta without R, theta with R, and phi (Table 2's first seed).

    Returns the drawn panels' titles; empty (and no file) when no record holds a histogram."""
    if FIG5_TABLE not in tables:
        return []
    spec, records = tables[FIG5_TABLE]
    panels = []
    with_row = next((r for r in FIG5_WITH if _first_extra(spec, records, r, "phi_hist")),
                    FIG5_WITH[-1])
    for row, label, color in ((FIG5_WITHOUT, "w/o R", "tab:blue"),
                              (with_row, "with R", "tab:orange")):
        hit = _first_extra(spec, records, row, "theta_hist")
        if hit is not None:
            h = hit[1]["theta_hist"]
            panels.append({"title": f"theta, {label} ({row}, seed {hit[0]})", "edges": h["edges"],
                           "counts": h["counts"], "color": color, "xlabel": "parameter value"})
    hit = _first_extra(spec, records, with_row, "phi_hist")
    if hit is not None:
        stats = hit[1].get("phi") or {}
        title = f"learned phi ({with_row}, seed {hit[0]})"
        if "fraction_negative" in stats:
            title += f"\n{stats['fraction_negative']:.1%} negative"
        panels.append({"title": title, "edges": hit[1]["phi_hist"]["edges"],
                       "counts": hit[1]["phi_hist"]["counts"], "color": "tab:green",
                       "xlabel": "phi"})
    if panels:
        _draw_histograms(panels, out)
    return [p["title"].replace("\n", ", ") for p in panels]


def _draw_histograms(panels: list[dict], out: str | Path) -> Path:
    """One log-scale histogram per panel, from precomputed ``edges`` and ``counts``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if "bars" in p:  # {label: value} on a log axis (the prior's D per layer)
            names, values = list(p["bars"]), [max(v, 1e-12) for v in p["bars"].values()]
            ax.barh(range(len(names)), values, color=p["color"])
            ax.set_yticks(range(len(names)), names, fontsize=5)
            ax.set_xscale("log")
            ax.axvline(0.1, color="grey", lw=0.8, ls="--")
            ax.set_title(p["title"], fontsize=9)
            ax.set_xlabel(p["xlabel"])
            continue
        edges = np.asarray(p["edges"], float)
        ax.hist(edges[:-1], bins=edges, weights=np.asarray(p["counts"], float), color=p["color"])
        ax.set_title(p["title"], fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel(p["xlabel"])
    fig.tight_layout()
    return _save(fig, out)


def histogram(values: np.ndarray, lim: float | None = None) -> dict:
    """``{edges, counts}`` of ``values`` over [-lim, lim] in ``BINS`` bins; lim defaults to the
    99.9 % quantile of |values| (what a record's ``extra`` theta_hist / phi_hist holds)."""
    values = np.asarray(values, float)
    if lim is None:
        lim = float(np.quantile(np.abs(values), 0.999)) or 1.0
    edges = np.linspace(-lim, lim, BINS + 1)
    return {"edges": edges.tolist(), "counts": np.histogram(values, edges)[0].tolist()}


def flat_weights(state: dict, names: list[str] | None = None) -> np.ndarray:
    """All regularised weights (conv and linear ``*.weight`` by default) as one float64 vector."""
    keys = names if names is not None else [
        k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    return np.concatenate([state[k].detach().double().flatten().cpu().numpy() for k in keys])


def parameter_histograms(without: dict, with_prior: dict, phi: np.ndarray | None,
                         out: str | Path, *, labels=("w/o R", "with R"),
                         strength: dict | None = None, phi_title: str = "learned phi") -> dict:
    """Write Fig. 5 from two state dicts (and phi) as a PNG; return the histograms it drew.

    ``strength``: the with-R run's ``prior_strength`` diagnostics (``cmkg.diagnostics``) after
    its last epoch; adds a panel of the median |D| per regularised layer."""
    a, b = flat_weights(without), flat_weights(with_prior)
    lim = float(np.quantile(np.abs(np.concatenate([a, b])), 0.999))
    ha, hb = histogram(a, lim), histogram(b, lim)
    data = {"theta_edges": ha["edges"],
            "theta_counts": {labels[0]: ha["counts"], labels[1]: hb["counts"]}}
    panels = [{"title": f"theta, {label}", **h, "color": color, "xlabel": "parameter value"}
              for label, h, color in zip(labels, (ha, hb), ("tab:blue", "tab:orange"))]
    if phi is not None:
        hp = histogram(phi)
        data["phi_edges"], data["phi_counts"] = hp["edges"], hp["counts"]
        panels.append({"title": phi_title, **hp, "color": "tab:green", "xlabel": "phi"})
    if strength and strength.get("layers"):
        data["abs_d_median"] = {n: v["abs_d_median"] for n, v in strength["layers"].items()}
        overall = strength["overall"]["abs_d_median"]
        panels.append({"title": f"prior strength, with R: median |D| per layer\n(all: "
                                f"{overall:.3g}; dashed: 0.1)", "bars": data["abs_d_median"],
                       "color": "tab:purple", "xlabel": "median |D| over the run"})
    _draw_histograms(panels, out)
    return data


def fig5_from_artifacts(without_dir: str | Path, with_dir: str | Path,
                        prior_dir: str | Path | None, out: str | Path) -> dict:
    """Fig. 5 from two target-stage folders (form none, and weighted) and a meta-stage folder."""
    import torch

    from cmkg.stages import open_artifact

    without = open_artifact(without_dir).load_model().state_dict()
    art = open_artifact(with_dir)
    with_prior = art.load_model().state_dict()
    history = art.metrics.get("history") or [{}]
    strength = history[-1].get("diagnostics", {}).get("prior_strength")
    phi, title = None, "learned phi"
    if prior_dir is not None:
        reg = open_artifact(prior_dir).load_phi()
        phi = torch.cat([p.flatten() for p in reg.phi()]).double().numpy()
        scale = art.metrics.get("calibration", {}).get("scale")
        if scale is not None:  # the phi the run used (before its per-weight cap)
            phi, title = phi * scale, f"phi, calibrated (phi_META x {scale:.3g})"
    return parameter_histograms(without, with_prior, phi, out, strength=strength,
                                phi_title=title)


# ---------------------------------------------------------------- the reports folder

def _stage_runs(records: list[dict]) -> dict[tuple[str, str], float]:
    """Seconds per distinct (stage, artifact key): a stage shared by many cells counts once
    (the largest time any record gives it; a cached stage reports 0 in its cell's wall_s)."""
    runs: dict[tuple[str, str], float] = {}
    for r in records:
        walls = r["stage_walls"]
        for stage, key in sorted(r["artifacts"].items()):
            seconds = walls.get(stage)
            runs[(stage, key)] = max(runs.get((stage, key), 0.0), float(seconds or 0.0))
        if r["stage"] and r["key"]:
            own = r["wall_s"] or 0.0
            runs[(r["stage"], r["key"])] = max(runs.get((r["stage"], r["key"]), 0.0), own)
    return runs


def _counted(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v or "unknown"] = counts.get(v or "unknown", 0) + 1
    return ", ".join(f"`{v}` ({n} cells)" for v, n in sorted(counts.items())) or "—"


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def readme_markdown(tables: dict[str, tuple[dict, list[dict]]], files: dict[str, list[str]],
                    figures: dict[str, str]) -> str:
    """The index: run facts, links, and a summary written from the comparisons' verdicts."""
    everything = [r for _, records in tables.values() for r in records]
    specs = [spec for spec, _ in tables.values()]
    presets = sorted({s.get("preset") for s in specs if s.get("preset")}
                     | {r["preset"] for r in everything if r["preset"]})
    seeds = sorted({s for spec in specs for s in spec.get("seeds") or []}
                   | {r["seed"] for r in everything})
    failed = sum(r["status"] == "failed" for r in everything)
    runs = _stage_runs(everything)
    total = sum(runs.values())
    out = ["# Reports: Knowledge as Priors (CVPR 2020), regenerated from result records\n",
           "Written by `cmkg.report.render_reports` from the stored result records only; "
           "do not edit by hand.\n",
           f"- Preset: {', '.join(f'`{p}`' for p in presets) or '—'}\n"
           f"- Seeds: {_seeds(seeds)}\n"
           f"- Cells: {len(everything) - failed} done, {failed} failed\n"
           f"- Code versions: {_counted(r['code_version'] for r in everything)}\n"
           f"- Devices: {_counted(r['device'] for r in everything)}\n"
           f"- Training time: {total:.1f} s ({_hms(total)}) over {len(runs)} distinct stage runs "
           "(a stage shared by several cells counted once)\n"]
    data = [f"- {spec['table']}: {spec['data']}\n" for spec in specs if spec.get("data")]
    if data:
        out.append("Data:\n\n" + "".join(data))
    by_stage: dict[str, list[float]] = {}
    for (stage, _), seconds in sorted(runs.items()):
        by_stage.setdefault(stage, []).append(seconds)
    if by_stage:
        out.append(_md_table(["stage", "runs", "seconds"],
                             [[s, str(len(v)), f"{sum(v):.1f}"] for s, v in by_stage.items()],
                             right={1, 2}))
    out.append("## Tables\n")
    rows = []
    for name, (spec, records) in tables.items():
        bad = sum(r["status"] == "failed" for r in records)
        links = " · ".join(f"[{f}]({f})" for f in files[name])
        rows.append([spec.get("title") or name, spec.get("regenerates") or "—", links,
                     f"{len(records) - bad} done, {bad} failed"])
    out.append(_md_table(["table", "regenerates", "files", "cells"], rows))
    out.append("## Figures\n")
    out.append("".join(f"- [{f}]({f}): {what}\n" for f, what in figures.items())
               or "No figure: the tables they draw from are missing.\n")

    comparisons = [c for spec, records in tables.values()
                   for c in _comparisons(spec, _cells(spec, records))]
    groups = {"Reproduced (same direction as the paper)": [], "Contradicted (opposite to the paper)": [],
              "Inconclusive (the interval contains 0, or fewer than 2 paired seeds)": [],
              "No paper delta to compare": []}
    names = list(groups)
    for c in comparisons:
        v = c["verdict"]
        group = names[0] if v == SAME else names[1] if v == OPPOSITE else \
            names[2] if v.startswith(INCONCLUSIVE) else names[3]
        iv = "" if c["lo"] is None else f" {_fmt_interval(c)}"
        paper = "" if c["paper_delta"] is None else \
            f"; paper {_fmt(c['paper_delta'], c['metric'], True)}"
        groups[group].append(
            f"- [{c['table']}]({c['table']}.md) {_comparison_label(c)}, "
            f"{METRICS[c['metric']][0]}: ours {_fmt(c['mean'], c['metric'], True)}{iv} "
            f"(n={c['n']}){paper} → {v}\n")
    out.append("## What this run says about the paper's claims\n")
    counts = [len(groups[n]) for n in names]
    out.append(f"Of {len(comparisons)} comparisons (paired a − b over seeds, 95 % Student-t "
               f"interval): {_n(counts[0], 'reproduces', 'reproduce')} the paper's direction, "
               f"{_n(counts[1], 'contradicts', 'contradict')} it, "
               f"{_n(counts[2], 'is', 'are')} inconclusive, "
               f"{_n(counts[3], 'has', 'have')} no paper delta.\n")
    tested = sum(1 for c in comparisons if c["n"] >= 2)
    if tested:
        out.append(f"Read these with the number of comparisons in mind: if no effect were real, "
                   f"about 5 % of the {tested} intervals with n ≥ 2, i.e. "
                   f"{0.05 * tested:.1f}, would still exclude 0 by chance, and comparisons that "
                   f"share a cell are not independent. A verdict is evidence when it is large "
                   f"against its interval and agrees with its neighbours, not on its own.\n")
    for name in names:
        if groups[name]:
            out.append(f"### {name}\n")
            out.append("".join(groups[name]))
    notes = [(spec.get("title") or spec["table"], spec["notes"]) for spec in specs
             if spec.get("notes")]
    if notes:
        out.append("## Notes\n")
        for title, lines in notes:
            out.append(f"### {title}\n\n" + "".join(f"- {n}\n" for n in lines))
    return "\n".join(out)


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))  # bytes: no locale encoding, no newline translation
    return path


def render_reports(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``out_dir``'s tables, figures and README from ``results_dir/*.parquet``; return the
    paths written. The same records give the same bytes (the PNGs aside)."""
    tables = load_records(results_dir)
    out_dir = Path(out_dir)
    written: list[Path] = []
    files: dict[str, list[str]] = {}
    for name, (spec, records) in tables.items():
        files[name] = [f"{name}.md", f"{name}.csv"]
        written.append(_write(out_dir / f"{name}.md", table_markdown(spec, records)))
        written.append(_write(out_dir / f"{name}.csv", table_csv(spec, records)))
        if spec.get("comparisons"):
            files[name].append(f"{name}_comparisons.csv")
            written.append(_write(out_dir / f"{name}_comparisons.csv",
                                  comparisons_csv(spec, records)))
    figures = {}
    for name, draw in (("figure4.png", figure4), ("figure5.png", figure5)):
        panels = draw(tables, out_dir / name)
        if panels:
            figures[name] = "; ".join(panels)
            written.append(out_dir / name)
    written.append(_write(out_dir / "README.md", readme_markdown(tables, files, figures)))
    return written
