"""The report layer: statistics, verdicts, and tables/figures rendered from result records only.

The fixture records are written with ``report.write_records`` (the runner's own writer); the
rendered Markdown is compared with golden files under ``tests/golden/report/``. To rewrite them
after an intended change: ``CMKG_UPDATE_GOLDEN=1 pytest tests/test_report.py`` (then read them).
"""

import csv
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmkg import report
from cmkg.errors import DataError

GOLDEN = Path(__file__).parent / "golden" / "report"
THRESHOLDS = [float(t) for t in np.linspace(0.0, 50.0, 20)]


# ---------------------------------------------------------------- statistics


def test_paired_interval_by_hand():
    # diffs a - b = [1, 2, 4]: mean 7/3; squared deviations (-4/3)^2 + (-1/3)^2 + (5/3)^2 = 42/9,
    # sample variance 42/9 / 2 = 7/3, sd = sqrt(7/3) = 1.52753;
    # t_{0.975, 2} = 4.302652729911275, half width = t * sd / sqrt(3) = t * sqrt(7/9) = 3.794583,
    # so the interval is [7/3 - 3.794583, 7/3 + 3.794583] = [-1.461250, 6.127916]
    iv = report.paired_interval([3.0, 5.0, 9.0], [2.0, 3.0, 5.0])
    half = 4.302652729911275 * math.sqrt(7 / 9)
    assert iv["n"] == 3
    assert iv["mean"] == pytest.approx(7 / 3)
    assert iv["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert iv["lo"] == pytest.approx(7 / 3 - half) and iv["lo"] == pytest.approx(-1.461250, abs=1e-6)
    assert iv["hi"] == pytest.approx(7 / 3 + half) and iv["hi"] == pytest.approx(6.127916, abs=1e-6)
    # one pair: a mean, no spread, no interval; none: nothing
    assert report.paired_interval([2.0], [0.5]) == {
        "mean": 1.5, "sd": None, "lo": None, "hi": None, "n": 1}
    assert report.paired_interval([], [])["mean"] is None
    with pytest.raises(ValueError, match="different lengths"):
        report.paired_interval([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- fixture records


def _pck(epe: float) -> list[float]:
    # a made-up monotone curve: 0 at 0 mm, 1 from 2 * EPE on
    return [min(1.0, t / (2.0 * epe)) for t in THRESHOLDS]


def _cell(table, row, column, seed, *, stage, key, chain, walls, epe=None, auc=None,
          error=None, extra=None, version="abc1234"):
    done = error is None
    return {
        "table": table, "row": row, "column": column, "seed": seed,
        "status": "done" if done else "failed", "error": error,
        "stage": stage, "key": key, "config_fingerprint": f"fp-{key}",
        "artifacts": {**chain, stage: key},
        "epe_mm": epe, "auc_20_50": auc, "mean_pose_epe_mm": None if epe is None else epe + 1.0,
        "pck_thresholds_mm": THRESHOLDS if done else [], "pck": _pck(epe) if done else [],
        "per_joint_epe_mm": [epe] * 21 if done else [],
        "wall_s": walls.get(stage), "stage_walls": walls,
        "code_version": version, "device": "cpu", "preset": "cpu", "extra": extra or {},
    }


TABLE1 = {
    "table": "table1", "title": "Table 1: cross-modal distillation on the source",
    "caption": "EPE on the source test split.", "regenerates": "Table 1, Figure 4 (left, middle)",
    "columns": [{"name": "rgb", "title": "RGB", "metrics": ["epe_mm"]},
                {"name": "kd", "title": "KD", "metrics": ["epe_mm"]},
                {"name": "rgb_long", "title": "RGB, long", "metrics": ["epe_mm"]}],
    "rows": [{"label": "L_ACT only", "paper": {"rgb": {"epe_mm": 24.68}, "kd": {"epe_mm": 23.41}}},
             {"label": "L_ACT + L_ATT", "paper": {"rgb": {"epe_mm": 24.68},
                                                  "kd": {"epe_mm": 22.19}, "rgb_long": None}}],
    "comparisons": [
        {"a": ["L_ACT + L_ATT", "kd"], "b": ["L_ACT + L_ATT", "rgb"], "metric": "epe_mm",
         "paper_delta": -2.49},
        {"a": ["L_ACT + L_ATT", "kd"], "b": ["L_ACT only", "kd"], "metric": "epe_mm",
         "paper_delta": -1.22},
        {"a": ["L_ACT + L_ATT", "rgb_long"], "b": ["L_ACT + L_ATT", "kd"], "metric": "epe_mm",
         "paper_delta": None}],
    "notes": ["rgb_long: our control, the RGB student trained as long as the KD chain"],
    "lower_is_better": {"epe_mm": True, "auc_20_50": False},
    "seeds": [0, 1, 2], "preset": "cpu",
    "figures": {"figure4": {"pck_pair": {"row": "L_ACT + L_ATT", "columns": ["rgb", "kd"],
                                         "dataset": "source", "paper_delta_auc": 0.045}}},
}
TABLE2 = {
    "table": "table2", "title": "Table 2: regularizers on the target",
    "caption": "EPE and AUC on the target test split.",
    "regenerates": "Table 2, Figure 4 (right), Figure 5",
    "columns": [{"name": "target", "title": "target", "metrics": ["epe_mm", "auc_20_50"]}],
    "rows": [{"label": "none", "paper": {"target": {"epe_mm": 15.67, "auc_20_50": 0.915}}},
             {"label": "l2 σ=1e-5", "paper": {"target": {"epe_mm": 12.02, "auc_20_50": 0.964}}},
             {"label": "weighted l2", "paper": {"target": {"epe_mm": 8.18, "auc_20_50": 0.987}}}],
    "comparisons": [
        {"a": ["l2 σ=1e-5", "target"], "b": ["none", "target"], "metric": "epe_mm",
         "paper_delta": -3.65},
        {"a": ["weighted l2", "target"], "b": ["none", "target"], "metric": "epe_mm",
         "paper_delta": -7.49},
        {"a": ["weighted l2", "target"], "b": ["none", "target"], "metric": "auc_20_50",
         "paper_delta": 0.072}],
    "notes": [], "lower_is_better": {"epe_mm": True, "auc_20_50": False},
    "seeds": [0, 1], "preset": "cpu",
    "figures": {"figure4": {"pck_rows": {}},
                "figure5": {"parameters": {"without": "none", "with": ["weighted l2"]}}},
}
TABLE3 = {
    "table": "table3", "title": "Table 3: regularizers on other targets",
    "caption": "EPE per target.", "regenerates": "Table 3",
    "columns": [{"name": "none", "title": "w/o R", "metrics": ["epe_mm"]},
                {"name": "weighted_l2", "title": "R of Eq. (10)", "metrics": ["epe_mm"]}],
    "rows": [{"label": "freihand-g", "paper": {"none": {"epe_mm": 12.37},
                                               "weighted_l2": {"epe_mm": 12.27}}},
             {"label": "stb", "paper": {"none": {"epe_mm": 15.67},
                                        "weighted_l2": {"epe_mm": 8.18}}}],
    "comparisons": [{"a": ["stb", "weighted_l2"], "b": ["stb", "none"], "metric": "epe_mm",
                     "paper_delta": -7.49}],
    "notes": ["one seed: the comparison cannot be decided"],
    "lower_is_better": {"epe_mm": True}, "seeds": [0], "preset": "cpu",
}

# (row, column) -> EPE per seed, None: that seed failed
T1 = {("L_ACT only", "rgb"): [24.1, 24.6, 23.9], ("L_ACT only", "kd"): [23.5, 22.8, None],
      ("L_ACT only", "rgb_long"): [None, None, None],
      ("L_ACT + L_ATT", "rgb"): [24.0, 24.5, 23.8], ("L_ACT + L_ATT", "kd"): [22.9, 23.1, 22.6],
      ("L_ACT + L_ATT", "rgb_long"): [23.2, 23.6, 23.3]}
T2 = {"none": ([15.0, 15.2], [0.90, 0.91]), "l2 σ=1e-5": ([15.6, 15.9], [0.89, 0.88]),
      "weighted l2": ([12.1, 12.4], [0.95, 0.93])}
T3 = {("freihand-g", "none"): 12.9, ("freihand-g", "weighted_l2"): 12.8,
      ("stb", "none"): 15.1, ("stb", "weighted_l2"): 12.3}
HIST = {"edges": [-0.2, -0.1, 0.0, 0.1, 0.2], "counts": [3, 40, 45, 2]}
# stage walls (s): student 5, long student 9, teacher 10, kd 7, target 3 (table 3: 2), meta 4
TOTAL_WALL_S = (6 * 5.0 + 5 * 7.0 + 3 * 10.0 + 3 * 9.0  # table 1 (failed cells: no own wall)
                + 6 * 3.0 + 2 * 4.0  # table 2 (its teachers and kd students are table 1's)
                + 4 * 2.0)  # table 3


def _records() -> dict[str, list[dict]]:
    t1 = []
    for (row, column), epes in T1.items():
        for seed, epe in enumerate(epes):
            key = f"{column}/{row}/{seed}"
            if column == "kd":
                chain, walls = {"teacher": f"teacher/{seed}"}, {"teacher": 10.0, "kd": 7.0}
            else:
                chain, walls = {}, {"student": 9.0 if column == "rgb_long" else 5.0}
            error = None
            if epe is None:
                walls = {k: v for k, v in walls.items() if k == "teacher"}  # died in its stage
                error = ("CUDA out of memory | batch 32" if column == "rgb_long"
                         else "NumericalError: loss is NaN at iteration 12 (term att)")
            t1.append(_cell("table1", row, column, seed, epe=epe,
                            auc=None if epe is None else round(1.0 - epe / 50.0, 4),
                            stage="kd" if column == "kd" else "student", key=key, chain=chain,
                            walls=walls, error=error))
    t2 = []
    for row, (epes, aucs) in T2.items():
        for seed, (epe, auc) in enumerate(zip(epes, aucs)):
            chain = {"teacher": f"teacher/{seed}", "kd": f"kd/L_ACT + L_ATT/{seed}"}
            walls = {"teacher": 10.0, "kd": 7.0, "target": 3.0}
            extra = {"theta_hist": HIST}
            if row == "weighted l2":
                chain["meta"], walls["meta"] = f"meta/{seed}", 4.0
                extra.update(phi_hist=HIST, phi={"mean": 0.01, "std": 0.1,
                                                 "fraction_negative": 0.25})
            t2.append(_cell("table2", row, "target", seed, epe=epe, auc=auc, stage="target",
                            key=f"target/{row}/{seed}", chain=chain, walls=walls, extra=extra))
    t3 = [_cell("table3", row, column, 0, epe=epe, auc=0.9, stage="target",
                key=f"t3/{row}/{column}/0", chain={"teacher": "teacher/0"},
                walls={"teacher": 10.0, "target": 2.0}, version="abc1234-dirty")
          for (row, column), epe in T3.items()]
    return {"table1": t1, "table2": t2, "table3": t3}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    for spec, records in zip((TABLE1, TABLE2, TABLE3), _records().values()):
        report.write_records(folder / f"{spec['table']}.parquet", spec, records)
    return folder


# ---------------------------------------------------------------- rendering


def test_markdown_matches_golden_files(results, tmp_path):
    written = report.render_reports(results, tmp_path / "reports")
    assert {p.name for p in written} == {
        "table1.md", "table1.csv", "table1_comparisons.csv", "table2.md", "table2.csv",
        "table2_comparisons.csv", "table3.md", "table3.csv", "table3_comparisons.csv",
        "figure4.png", "figure5.png", "README.md"}
    for name in ("table1.md", "table2.md", "table3.md", "README.md"):
        got = (tmp_path / "reports" / name).read_text(encoding="utf-8")
        if os.environ.get("CMKG_UPDATE_GOLDEN") == "1":
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(got, encoding="utf-8")
        assert got == (GOLDEN / name).read_text(encoding="utf-8"), f"{name} differs from golden"


def test_verdicts_and_interval_in_the_tables(results, tmp_path):
    """The verdict rules themselves are tested in test_verdicts.py; here, that the tables and
    the index carry them."""
    report.render_reports(results, tmp_path)
    rows = list(csv.DictReader((tmp_path / "table2_comparisons.csv").open(encoding="utf-8")))
    # l2 - none EPE: diffs [0.6, 0.7] -> mean 0.65, sd 0.0707, t_{0.975,1} = 12.7062
    l2 = rows[0]
    assert float(l2["mean"]) == pytest.approx(0.65)
    assert float(l2["lo"]) == pytest.approx(0.65 - 12.706204736 * math.sqrt(0.005) / math.sqrt(2))
    # t = 0.65 / (0.0707 / sqrt 2) = 13 on 1 degree of freedom: p = 1 - 2 atan(13) / pi
    assert float(l2["p"]) == pytest.approx(1.0 - 2.0 * math.atan(13.0) / math.pi)
    assert float(l2["rel"]) == pytest.approx(0.65 / 15.1)  # none's mean over seeds 0, 1
    assert float(l2["paper_rel"]) == pytest.approx(-3.65 / 15.67)
    # +4.3 % [+0.1, +8.5] against the paper's -23.3 %: ours is far from the paper's effect
    assert l2["verdict"] == "smaller than the paper's" and l2["seeds"] == "0;1"
    assert [r["verdict"] for r in rows[1:]] == ["smaller than the paper's", "inconclusive"]
    (t3,) = csv.DictReader((tmp_path / "table3_comparisons.csv").open(encoding="utf-8"))
    assert t3["verdict"] == "inconclusive (n=1)" and t3["lo"] == "" and t3["p"] == ""
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert readme.splitlines()[2].startswith(
        "No method claim of the paper is reproduced in this run. Of 6 method claims of the "
        "paper tested here: 0 hold, 3 are refuted")


def test_failed_cells_are_shown_and_the_others_still_reported(results, tmp_path):
    report.render_reports(results, tmp_path)
    md = (tmp_path / "table1.md").read_text(encoding="utf-8")
    only = next(line for line in md.splitlines() if line.startswith("| L_ACT only |"))
    cells = [c.strip() for c in only.strip("|").split(" | ")]
    # row, then (paper, ours) for rgb, kd, rgb_long
    assert cells[1:] == ["24.68", "24.20 ± 0.36 (n=3)", "23.41", "23.15 ± 0.49 (n=2, 1 failed)",
                         "—", "failed"]
    assert "CUDA out of memory \\| batch 32" in md  # the reason, with its pipe escaped
    by_cell = {(r["row"], r["column"]): r
               for r in csv.DictReader((tmp_path / "table1.csv").open(encoding="utf-8"))}
    kd = by_cell[("L_ACT only", "kd")]
    assert (kd["n"], kd["failed"], kd["seeds"]) == ("2", "1", "0;1")
    assert float(kd["mean"]) == pytest.approx((23.5 + 22.8) / 2)
    assert float(kd["std"]) == pytest.approx(math.sqrt(2 * 0.35 ** 2))
    long = by_cell[("L_ACT only", "rgb_long")]
    assert (long["n"], long["failed"], long["mean"]) == ("0", "3", "")
    # the comparison over the failed seed pairs only the seeds both cells finished
    rows = list(csv.DictReader((tmp_path / "table1_comparisons.csv").open(encoding="utf-8")))
    assert rows[1]["seeds"] == "0;1" and rows[1]["n"] == "2"


def test_readme_counts_each_stage_run_once(results, tmp_path):
    report.render_reports(results, tmp_path)
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"Training time: {TOTAL_WALL_S:.1f} s (0:02:36) over 33 distinct stage runs" in readme
    assert "`abc1234` (24 cells), `abc1234-dirty` (4 cells)" in readme
    assert "[figure5.png](figure5.png)" in readme


def test_rendering_is_byte_for_byte_deterministic(results, tmp_path):
    a = report.render_reports(results, tmp_path / "a")
    b = report.render_reports(results, tmp_path / "b")
    texts = [p.name for p in a if p.suffix in (".md", ".csv")]
    assert len(texts) == 10 and [p.name for p in a] == [p.name for p in b]
    for name in texts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("figure4.png", "figure5.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_skipped_without_their_tables(results, tmp_path):
    (results / "table1.parquet").unlink()
    (results / "table2.parquet").unlink()
    written = report.render_reports(results, tmp_path / "r")
    assert {p.name for p in written} == {"table3.md", "table3.csv", "table3_comparisons.csv",
                                         "README.md"}
    assert "No figure" in (tmp_path / "r" / "README.md").read_text(encoding="utf-8")


def test_figures_are_what_the_specs_name(tmp_path):
    """A table draws the panels its spec's ``figures`` names, nothing else: records written
    without the entry give no figure."""
    folder = tmp_path / "results"
    recs = _records()
    report.write_records(folder / "table1.parquet", TABLE1, recs["table1"])
    report.write_records(folder / "table2.parquet",
                         {k: v for k, v in TABLE2.items() if k != "figures"}, recs["table2"])
    tables = report.load_records(folder)
    assert report.figure4(tables, tmp_path / "f4.png") == [
        "3D PCK of rgb vs kd (L_ACT + L_ATT)",
        "the per-seed AUC 20-50 gain of kd − rgb beside the paper's"]
    assert report.figure5(tables, tmp_path / "f5.png") == []
    assert not (tmp_path / "f5.png").exists()


@pytest.mark.parametrize("figures, expected", [
    ({"figure6": {}}, "spec.figures.figure6: unknown key (did you mean 'figure5'?)"),
    ({"figure4": {"pck_rows": {}, "pck_pairs": {}}}, "spec.figures.figure4.pck_pairs: unknown key"),
    ({"figure5": {"parameters": {"without": "nope", "with": ["weighted l2"]}}},
     "spec.figures.figure5.parameters.without: 'nope' is not a row label"),
    ({"figure5": {"parameters": {"without": "none", "with": "weighted l2"}}},
     "spec.figures.figure5.parameters.with: must be a non-empty list of row labels"),
    ({"figure4": {"pck_pair": {"row": "none", "columns": ["target", "target"],
                               "dataset": "target", "paper_delta_auc": 0.1}}},
     "spec.figures.figure4.pck_pair.columns: must be two columns of target"),
    ({"figure4": {"pck_pair": {"row": "none", "columns": ["target"]}}},
     "spec.figures.figure4.pck_pair.dataset: missing"),
])
def test_a_bad_figures_entry_is_a_data_error(tmp_path, figures, expected):
    spec = {**TABLE2, "figures": figures}
    report.write_records(tmp_path / "table2.parquet", spec, _records()["table2"])
    with pytest.raises(DataError) as e:
        report.load_records(tmp_path)
    assert "table2.parquet" in str(e.value) and expected in str(e.value)


def test_replace_spec_rewrites_the_rows_as_they_were(results):
    path = results / "table2.parquet"
    before = path.read_bytes()
    report.replace_spec(path, report.read_spec(path))
    assert path.read_bytes() == before  # the same spec: the same file
    rows = pq.read_table(path)
    report.replace_spec(path, {**TABLE2, "title": "another title"})
    assert report.read_spec(path)["title"] == "another title"
    assert pq.read_table(path).equals(rows)


def test_records_round_trip(results):
    spec, records = report.load_records(results)["table2"]
    assert spec == TABLE2
    assert {r["seed"] for r in records} == {0, 1}
    assert records[0]["extra"]["theta_hist"] == HIST  # JSON fields come back decoded
    assert records[0]["artifacts"]["kd"] == "kd/L_ACT + L_ATT/0"


def test_parameter_histograms_from_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    without = {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
               "fc.weight": torch.randn(4, 8, generator=gen), "fc.bias": torch.randn(4)}
    with_r = {k: 0.5 * v for k, v in without.items()}
    data = report.parameter_histograms(without, with_r, np.linspace(-1.0, 1.0, 1000),
                                       tmp_path / "fig5.png")
    n = 8 * 3 * 3 * 3 + 4 * 8  # conv and linear weights; the bias is not regularised
    # the shared range is the 99.9 % quantile of |theta|: at most a weight or two fall outside
    assert n - 2 <= sum(data["theta_counts"]["w/o R"]) <= n
    assert sum(data["theta_counts"]["with R"]) == n  # half the size: all inside
    assert len(data["theta_edges"]) == report.BINS + 1 and len(data["phi_counts"]) == report.BINS
    assert (tmp_path / "fig5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- bad input


def test_bad_results_raise_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        report.load_records(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no result records"):
        report.load_records(tmp_path / "empty")

    garbage = tmp_path / "g"
    garbage.mkdir()
    (garbage / "table1.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="table1.parquet: not a readable Parquet file"):
        report.load_records(garbage)

    plain = tmp_path / "p"
    plain.mkdir()
    pq.write_table(pa.table({"row": ["none"], "epe_mm": [1.0]}), plain / "table2.parquet")
    with pytest.raises(DataError, match=r"table2.parquet: no table spec .*cmkg.table"):
        report.load_records(plain)

    stray = tmp_path / "s"
    record = _records()["table3"][0]
    report.write_records(stray / "table3.parquet", TABLE3, [{**record, "row": "freihand-x"}])
    with pytest.raises(DataError, match="table3.parquet: cell 'freihand-x'/'none'"):
        report.load_records(stray)


def test_write_records_rejects_unknown_fields(tmp_path):
    record = _records()["table3"][0]
    with pytest.raises(ValueError, match=r"unknown fields \['epe'\]"):
        report.write_records(tmp_path / "t.parquet", TABLE3, [{**record, "epe": 1.0}])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_phi_is_summarised_order_free_over_seeds_never_correlated():
    """Per weighted row: the fraction of φ below 0 and φ's spread, lowest … highest over the
    seeds; no per-weight correlation between seeds (hidden units do not correspond)."""
    phis = [{"fraction_negative": 0.37, "std": 1e-8, "min": -2e-6, "max": 3e-6},
            {"fraction_negative": 0.374, "std": 2e-8, "min": -1e-6, "max": 1e-6}]
    records = [_cell("t", "weighted l2", "target", s, stage="target", key=f"k{s}",
                     chain={"target": f"k{s}"}, walls={"target": 1.0}, epe=40.0 + s,
                     auc=0.5, extra={"phi": phi}) for s, phi in enumerate(phis)]
    records.append(_cell("t", "none", "target", 0, stage="target", key="n0",
                         chain={"target": "n0"}, walls={"target": 1.0}, epe=41.0, auc=0.5))
    spec = {"table": "t", "title": "T", "columns": [{"name": "target", "metrics": ["epe_mm"]}],
            "rows": [{"label": "weighted l2", "paper": {}}, {"label": "none", "paper": {}}],
            "seeds": [0, 1], "preset": "cpu",
            "phi_correlation": [{"form": "weighted_l2", "seeds": [0, 1], "pearson": 0.01,
                                 "count": 9}]}  # as older records stored it: not shown
    md = report.table_markdown(spec, records)
    assert "## φ_META: order-free statistics" in md and "Pearson" not in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| weighted l2 | 2 |"))
    assert line.split(" | ")[2:4] == ["0.370 … 0.374", "1e-08 … 2e-08"]
    assert not any(ln.startswith("| none |") and "…" in ln for ln in md.splitlines())


def test_learning_curves_are_drawn_from_the_records_curves_only(tmp_path):
    """A table whose records carry curves gets {table}_curves.png, listed in the index; the
    curve of a cell is its own stage's; records without curves (written before) draw none."""
    from cmkg.ablation.results import curve
    from cmkg.report.curves import curves_of, learning_curves

    history = [{"epoch": 1, "train": {"loss": 2.0, "reg": 2.0}, "val": {"epe_mm": 30.0},
                "train_eval": {"epe_mm": 20.0}},
               {"epoch": 2, "train": {"loss": 1.0, "reg": 1.0}}]  # epoch 2 did not validate
    assert curve(history) == [
        {"epoch": 1, "loss": 2.0, "reg": 2.0, "train_epe_mm": 20.0, "val_epe_mm": 30.0},
        {"epoch": 2, "loss": 1.0, "reg": 1.0}]
    spec = {"table": "t", "title": "T", "columns": [{"name": "target", "metrics": ["epe_mm"]}],
            "rows": [{"label": "none", "paper": {}}, {"label": "l2", "paper": {}}],
            "seeds": [0, 1], "preset": "cpu"}
    records = [{**_cell("t", row, "target", s, stage="target", key=f"{row}{s}",
                        chain={"target": f"{row}{s}"}, walls={"target": 1.0}, epe=40.0, auc=0.5),
                "curves": {"target": curve(history), "student": curve(history[:1])}}
               for row in ("none", "l2") for s in (0, 1)]
    assert {row: len(c) for row, c in curves_of(spec, records)["target"].items()} == {
        "none": 2, "l2": 2}
    assert learning_curves(spec, records, tmp_path / "a.png") == ["target (2 rows)"]
    assert (tmp_path / "a.png").stat().st_size > 1000
    bare = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    assert learning_curves(spec, bare, tmp_path / "b.png") == [] and not (tmp_path / "b.png").exists()
    report.write_records(tmp_path / "results" / "t.parquet", spec, records)
    report.render_reports(tmp_path / "results", tmp_path / "out")
    assert (tmp_path / "out" / "t_curves.png").is_file()
    assert "t_curves.png" in (tmp_path / "out" / "README.md").read_text()
