"""Every committed result record names the stage keys the plan computes today.

A stage key is the content address of a cached artifact: a change to the code that moves one
(a renamed spec entry, a reordered dict, a new default) silently orphans every artifact trained
before it and makes the committed records point at stages no rerun would find. The records in
``reports/results`` carry each cell's keys (``key`` and ``artifacts``); this test re-plans every
cell of the shipped ablation files at the records' preset and seeds (no rendering, no training:
a synthetic dataset's identity is its generator config) and asks for the same keys.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq

from cmkg import ablation

ROOT = Path(__file__).resolve().parent.parent


def test_committed_records_name_the_keys_the_plan_computes():
    checked = 0
    for path in sorted((ROOT / "reports" / "results").glob("table*.parquet")):
        records = pq.read_table(path).to_pylist()
        table = records[0]["table"]
        (preset,) = {r["preset"] for r in records}
        ab = ablation.load(ROOT / "ablations" / f"{table}.yaml")
        # the report seeds follow the choice seeds that chose the records' values (none where a
        # run chose on its report seeds, as the first cpu run did)
        report = sorted({r["seed"] for r in records})
        choice = sorted({s for r in records for s in (r.get("choice_seeds") or [])} - set(report))
        assert report == list(range(len(choice), len(choice) + len(report))), (path.name, report)
        cells = ablation.expand(ab, preset, [], seeds=len(report),
                                choice_seeds=len(choice))
        planned: dict[tuple, list[dict]] = {}
        for c in cells:
            planned.setdefault((c.row, c.column, c.seed), []).append(
                {n.stage: n.key for n in c.nodes})
        for r in records:
            options = planned.get((r["row"], r["column"], r["seed"]))
            assert options, f"{path.name}: no cell {r['row']!r}/{r['column']}/{r['seed']} today"
            assert json.loads(r["artifacts"]) in options, (
                f"{path.name}: {r['row']!r}/{r['column']}/seed {r['seed']}: the plan's keys moved")
            assert r["key"] == json.loads(r["artifacts"])[r["stage"]]
            checked += 1
    assert checked >= 100  # 3 tables' records: none skipped
