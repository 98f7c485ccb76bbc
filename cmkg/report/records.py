"""Result records: one Parquet file per table, its cells as rows and its spec as metadata.

The ablation runner writes ``RESULTS_DIR/{table}.parquet`` (``write_records``): one row per cell
(table, row, column, seed) in ``SCHEMA``, and the table's spec (title, columns and their metrics,
rows with the paper's numbers, comparisons, notes, seeds, preset, the figures it draws) as JSON
under the schema metadata key ``cmkg.table``. ``load_records`` reads a folder of them back,
checking every file against its spec; nothing else feeds the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cmkg.atomic import atomic_path
from cmkg.errors import DataError
from cmkg.report.figures import check_figures
from cmkg.report.stats import KINDS

SPEC_KEY = b"cmkg.table"  # schema metadata key of the table spec (JSON)

# metric column -> (label, decimals); a table may report only these
METRICS = {"epe_mm": ("EPE (mm)", 2), "auc_20_50": ("AUC 20-50", 3),
           "mean_pose_epe_mm": ("mean pose EPE (mm)", 2)}
JSON_FIELDS = ("artifacts", "stage_walls", "extra", "curves", "chosen")  # JSON objects as strings
# columns added after records were committed: a file without them reads them as empty
OPTIONAL = ("curves", "choice_seeds", "chosen")
LIST_FIELDS = ("pck_thresholds_mm", "pck", "per_joint_epe_mm")  # empty for a failed cell
REQUIRED = ("table", "row", "column", "seed", "status")
STATUSES = ("done", "failed")

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
    # JSON {stage: [{epoch, loss, reg, ..., train_epe_mm, val_epe_mm}]} of the cell's chain
    ("curves", pa.string()),
    # the seeds whose validation metric chose the row's value (a choose row: its choice seeds,
    # or the report seeds themselves; a tuned row: its sweep's); empty for a plain row
    ("choice_seeds", pa.list_(pa.int64())),
    # JSON: what was chosen and how ({by: choose, key, value, val_epe_mm, seeds, artifacts} or
    # {by: sweep, sweep, file, metric, params, seeds}); {} for a plain row
    ("chosen", pa.string()),
])


def failed_record(cell: dict, error: str, code_version: str) -> dict:
    """The record of a cell that did not finish: its identity fields (``cell``), why, and
    every measurement empty."""
    return {**cell, "status": "failed", "error": error, "epe_mm": None, "auc_20_50": None,
            "mean_pose_epe_mm": None, "pck_thresholds_mm": [], "pck": [],
            "per_joint_epe_mm": [], "wall_s": None, "stage_walls": "{}",
            "code_version": code_version, "device": "", "extra": "{}", "curves": "{}"}


# ---------------------------------------------------------------- writing

def write_records(path: str | Path, spec: dict, records: list[dict]) -> Path:
    """Write one table's cells (``SCHEMA``) and its spec (schema metadata) atomically.

    JSON fields (artifacts, stage_walls, extra) may be given as dicts; missing optional fields
    are null, missing lists empty. An unknown field or a record of another table is an error."""
    rows = [_normalise(r, spec) for r in records]
    return _write_table(path, pa.Table.from_pylist(rows, schema=SCHEMA), spec)


def _write_table(path: str | Path, table: pa.Table, spec: dict) -> Path:
    table = table.replace_schema_metadata({SPEC_KEY: json.dumps(spec, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def replace_spec(path: str | Path, spec: dict) -> Path:
    """Rewrite a records file with another spec and the same rows, read and written as they
    are (no normalisation): the column chunks come out byte for byte as they were, and so does
    the whole file when the spec is the same."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    schema = _schema_of(table)
    if table.column_names != schema.names:
        raise DataError(f"{path}: columns {table.column_names}, expected {SCHEMA.names}")
    # Parquet reads a list's values back as "element"; SCHEMA's (what was written) are "item"
    return _write_table(path, table.cast(schema), spec)


def _schema_of(table: pa.Table) -> pa.Schema:
    """SCHEMA without the optional columns a file written before them lacks."""
    return pa.schema([f for f in SCHEMA if f.name in table.column_names
                      or f.name not in OPTIONAL])


def _normalise(record: dict, spec: dict) -> dict:
    unknown = sorted(set(record) - set(SCHEMA.names))
    missing = [k for k in REQUIRED if record.get(k) is None]
    if unknown or missing:
        raise ValueError(f"result record {record.get('row')!r}/{record.get('column')!r}: "
                         f"unknown fields {unknown}, missing fields {missing}")
    if record["status"] not in STATUSES:
        raise ValueError(f"result record status {record['status']!r}: expected done or failed")
    if record["table"] != spec.get("table"):
        raise ValueError(f"result record of {record['table']!r} in the file of {spec.get('table')!r}")
    out = {name: record.get(name) for name in SCHEMA.names}
    for name in (*LIST_FIELDS, "choice_seeds"):
        out[name] = list(out[name] or [])
    for name in JSON_FIELDS:
        if isinstance(out[name], dict):
            out[name] = json.dumps(out[name], sort_keys=True)
    return out


# ---------------------------------------------------------------- reading

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
        spec, records = read_records(path)
        name = spec["table"]
        if name in seen:
            raise DataError(f"{path}: table {name!r} is also in {seen[name].name}")
        seen[name] = path
        tables[name] = (spec, records)
    return dict(sorted(tables.items()))


def read_spec(path: str | Path) -> dict:
    """The spec stored in a records file (its footer only; the rows are not read)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return _decode_spec(path, meta)


def _decode_spec(path, meta: dict) -> dict:
    if SPEC_KEY not in meta:
        raise DataError(f"{path}: no table spec (schema metadata {SPEC_KEY.decode()!r}); "
                        "result files are written by cmkg.report.write_records")
    try:
        return json.loads(meta[SPEC_KEY])
    except ValueError as e:
        raise DataError(f"{path}: table spec is not JSON ({e})") from None


def read_records(path: Path) -> tuple[dict, list[dict]]:
    """(spec, records) of one file, each cell checked against the spec."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    spec = _decode_spec(path, table.schema.metadata or {})
    problems = spec_problems(spec)
    missing = [n for n in SCHEMA.names if n not in table.column_names and n not in OPTIONAL]
    if missing:
        problems.append(f"missing columns {missing}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    rows = {r["label"] for r in spec["rows"]}
    columns = {c["name"] for c in spec["columns"]}
    records, cells = [], set()
    for r in table.select(_schema_of(table).names).to_pylist():
        where = f"{path}: cell {r['row']!r}/{r['column']!r} seed {r['seed']}"
        if r["table"] != spec["table"] or r["row"] not in rows or r["column"] not in columns:
            raise DataError(f"{where} of table {r['table']!r} is not in the spec of "
                            f"{spec['table']!r}")
        if (r["row"], r["column"], r["seed"]) in cells:
            raise DataError(f"{where} appears twice")
        if r["status"] not in STATUSES:
            raise DataError(f"{where}: status {r['status']!r}, expected done or failed")
        cells.add((r["row"], r["column"], r["seed"]))
        for name in JSON_FIELDS:
            try:
                r[name] = json.loads(r[name]) if r.get(name) else {}
            except ValueError:
                raise DataError(f"{where}: field {name} is not JSON") from None
        for name in LIST_FIELDS:
            r[name] = r[name] or []
        r["choice_seeds"] = r.get("choice_seeds") or []
        records.append(r)
    return spec, records


# ---------------------------------------------------------------- the spec

def spec_problems(spec) -> list[str]:
    """What is wrong with a stored spec (empty when nothing): the fields the report reads."""
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
        elif comp.get("kind", KINDS[0]) not in KINDS:  # no kind: records before kinds
            problems.append(f"spec.comparisons[{i}].kind: expected one of {list(KINDS)}")
    check_figures(spec.get("figures"), [r["label"] for r in rows],
                  [c["name"] for c in columns], "spec.figures", problems)
    return problems
