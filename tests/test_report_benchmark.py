"""The benchmark's properties in the report (cmkg.report.benchmark), on hand-made records whose
answers are known."""

import math

import pytest

from cmkg.report import benchmark

SPEC = {"table": "t", "title": "T",
        "rows": [{"label": "none"}, {"label": "null"}, {"label": "grid"}],
        "columns": [{"name": "target"}],
        "benchmark": {"ratios": {"none": ["none", "target"]},
                      "floor": {"baseline": ["none", "target"], "inert": ["null", "target"]},
                      "agreement": ["grid", "target"]}}


def _rec(row, seed, epe, chosen=None):
    return {"table": "t", "row": row, "column": "target", "seed": seed, "status": "done",
            "epe_mm": epe, "mean_pose_epe_mm": 50.0, "chosen": chosen or {}}


def _records(diffs, val, test):
    none = [20.0, 22.0, 21.0, 23.0, 19.0]
    out = [_rec("none", s, e) for s, e in enumerate(none)]
    out += [_rec("null", s, e + d) for s, (e, d) in enumerate(zip(none, diffs))]
    chosen = {"key": "regularizer.sigma", "seeds": [0, 1, 2], "val_epe_mm": val,
              "test_epe_mm": test}
    out += [_rec("grid", s, 20.0, chosen) for s in range(5)]
    return out


def test_ratio_floor_and_agreement():
    val = {"1e-05": 30.0, "0.001": 29.0, "0.01": 27.0, "0.1": 28.0}
    test = {"1e-05": 25.0, "0.001": 24.0, "0.01": 22.0, "0.1": 23.5}
    p = benchmark.properties(SPEC, _records([0.1, -0.1, 0.2, 0.0, -0.2], val, test))
    assert p["ratios"]["none"]["ratio"] == pytest.approx(21.0 / 50.0)
    f = p["floor"]
    assert f["n"] == 5 and f["mean"] == pytest.approx(0.0)
    assert f["sd"] == pytest.approx(math.sqrt(0.1 / 4))  # sum of squares 0.1 over n - 1
    a = p["agreement"]
    assert a["rho"] == pytest.approx(1.0) and a["best_val"] == a["best_test"] == "0.01"
    # validation that ranks the grid backwards
    backwards = {k: -v for k, v in test.items()}
    a = benchmark.properties(SPEC, _records([0.0] * 5, val, backwards))["agreement"]
    assert a["rho"] == pytest.approx(-1.0) and a["best_test"] == "1e-05"
    lines = benchmark.lines(SPEC, _records([0.1, -0.1, 0.2, 0.0, -0.2], val, test))
    assert any("noise floor: paired SD 0.16 mm over 5 seeds" in x for x in lines)
    assert any("Spearman 1.00" in x for x in lines)


def test_nothing_declared_or_recorded_nothing_shown():
    spec = {k: v for k, v in SPEC.items() if k != "benchmark"}
    assert benchmark.properties(spec, _records([0.0] * 5, {}, {})) == {}
    assert benchmark.section({"t": (spec, [])}) == []
    # records from before test EPEs were stored with a choice: no agreement line
    p = benchmark.properties(SPEC, _records([0.0] * 5, {"a": 1.0, "b": 2.0, "c": 3.0}, {}))
    assert "agreement" not in p and "floor" in p
