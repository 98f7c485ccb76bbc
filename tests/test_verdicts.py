"""Verdicts that mean what they say: comparison kinds, duplicates counted once, relative effects,
Holm's adjustment, "no effect claimed", "smaller than the paper's", sanity checks apart, and the
index's computed first line — on hand-made records (``report.write_records``, the runner's own
writer), with every expected number computed by hand here, not by the code under test."""

import csv
import math
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cmkg import ablation, report
from cmkg.ablation.migrate import refresh_spec
from cmkg.errors import ConfigError, DataError
from cmkg.report import stats

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- hand-made tables
# t1 (3 seeds): rows r1, r2 share their rgb and depth cells (the same stage keys, as Table 1's
# first two rows do); kd differs. kd − rgb is a method claim, depth − rgb a sanity check.
# t3 (5 seeds): a Table 2 alike, every row against none. t2 (3 seeds): its cells are t3's at
# seeds 0-2 (as Table 3's stb row is Table 2's), and it sorts before t3.

RGB = [80.0, 82.0, 81.0]
DEPTH = [40.0, 41.0, 40.5]
KD = {"r1": [r + d for r, d in zip(RGB, [1.0, -1.0, 2.0])],
      "r2": [r + d for r, d in zip(RGB, [-3.0, -3.5, -2.5])]}
NONE = [44.0, 45.0, 43.0, 46.0, 44.0]
DIFFS = {"l2": [-1.0, -2.0, -3.0, -2.0, -2.0],  # -2 mm: the paper's -0.67 mm at its 15.67
         "wl2": [-0.5, 0.5, -1.0, 0.8, 0.2],  # about 0 %: the paper's -47.8 %
         "tiny": [1.0, 1.2, 0.9, 1.1, 1.0]}  # clearly > 0, but the paper's delta is 0.4 %
T3 = {"none": NONE, **{row: [n + d for n, d in zip(NONE, diffs)] for row, diffs in DIFFS.items()}}
PAPER_T3 = {"none": 15.67, "l2": 15.0, "wl2": 8.18, "tiny": 15.60}


def _rec(table, row, column, seed, epe, key, stage="target"):
    return {"table": table, "row": row, "column": column, "seed": seed, "status": "done",
            "stage": stage, "key": key, "epe_mm": epe, "auc_20_50": None, "preset": "cpu",
            "artifacts": {stage: key}, "stage_walls": {stage: 1.0}, "wall_s": 1.0,
            "code_version": "abc", "device": "cpu"}


def _spec(table, columns, rows, comparisons, seeds):
    return {"table": table, "title": table, "columns": [
        {"name": c, "title": c, "metrics": ["epe_mm"]} for c in columns],
        "rows": [{"label": label, "paper": {c: {"epe_mm": v} for c, v in paper.items()}}
                 for label, paper in rows.items()],
        "comparisons": comparisons, "notes": [], "seeds": seeds, "preset": "cpu",
        "lower_is_better": {"epe_mm": True}}


def _cmp(a, b, kind, paper_delta):
    return {"a": list(a), "b": list(b), "metric": "epe_mm", "kind": kind,
            "paper_delta": paper_delta}


def _t1():
    paper = {"r1": {"rgb": 24.68, "depth": 13.60, "kd": 23.41},
             "r2": {"rgb": 24.68, "depth": 13.60, "kd": 22.19}}
    comparisons = []
    for row in ("r1", "r2"):
        comparisons.append(_cmp((row, "kd"), (row, "rgb"), "method",
                                round(paper[row]["kd"] - 24.68, 6)))
    for row in ("r1", "r2"):
        comparisons.append(_cmp((row, "depth"), (row, "rgb"), "sanity", round(13.60 - 24.68, 6)))
    records = []
    for row in ("r1", "r2"):
        for s in range(3):
            # rgb and depth: r2's cells are r1's (the same keys)
            records += [_rec("t1", row, "rgb", s, RGB[s], f"student/{s}", "student"),
                        _rec("t1", row, "depth", s, DEPTH[s], f"teacher/{s}", "teacher"),
                        _rec("t1", row, "kd", s, KD[row][s], f"kd/{row}/{s}", "kd")]
    return _spec("t1", ["rgb", "depth", "kd"], paper, comparisons, [0, 1, 2]), records


def _t3(paper_l2=PAPER_T3["l2"]):
    paper = {**PAPER_T3, "l2": paper_l2}
    comparisons = [_cmp((row, "target"), ("none", "target"), "method",
                        round(paper[row] - paper["none"], 6)) for row in ("l2", "wl2", "tiny")]
    records = [_rec("t3", row, "target", s, v[s], f"target/{row}/{s}")
               for row, v in T3.items() for s in range(5)]
    return _spec("t3", ["target"], {r: {"target": v} for r, v in paper.items()}, comparisons,
                 [0, 1, 2, 3, 4]), records


def _t2():
    comparisons = [_cmp(("stb", "wl2"), ("stb", "none"), "method", round(8.18 - 15.67, 6))]
    records = [_rec("t2", "stb", col, s, T3[row][s], f"target/{row}/{s}")
               for col, row in (("none", "none"), ("wl2", "wl2")) for s in range(3)]
    return _spec("t2", ["none", "wl2"], {"stb": {"none": 15.67, "wl2": 8.18}}, comparisons,
                 [0, 1, 2]), records


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    for spec, records in (_t1(), _t2(), _t3()):
        report.write_records(folder / f"{spec['table']}.parquet", spec, records)
    return folder


def _by(evaluated):
    """{(table, a row, a column, b row): comparison}."""
    return {(c["table"], *c["a"], c["b"][0]): c
            for cs in evaluated["tables"].values() for c in cs}


# ---------------------------------------------------------------- by hand


def _p_df2(t):  # two-sided p of Student's t with 2 degrees of freedom, in closed form
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def _p_df4(t):  # ... with 4: 1 - (3s - s^3) / 2, s = |t| / sqrt(4 + t^2)
    s = abs(t) / math.sqrt(4.0 + t * t)
    return 1.0 - (3.0 * s - s ** 3) / 2.0


def _t(diffs, null=0.0):
    return (statistics.fmean(diffs) - null) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))


def _diffs(a, b):
    return [x - y for x, y in zip(a, b)]



def _same_records(a, b) -> bool:
    """The same rows and the same schema metadata (the spec): what a Parquet file holds, not its
    bytes, whose footer names the pyarrow version that wrote it."""
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    return ta.equals(tb) and ta.schema.metadata == tb.schema.metadata

def test_t_test_against_closed_forms():
    d = [1.0, -1.0, 2.0]
    iv = report.paired_interval(d, [0.0] * 3)
    assert report.t_test(iv) == pytest.approx(_p_df2(_t(d)), rel=1e-9)
    assert report.t_test(iv, null=-4.0) == pytest.approx(_p_df2(_t(d, -4.0)), rel=1e-9)
    d5 = DIFFS["l2"]
    iv5 = report.paired_interval(d5, [0.0] * 5)
    assert report.t_test(iv5) == pytest.approx(_p_df4(_t(d5)), rel=1e-9)
    assert report.t_test(report.paired_interval([1.0], [0.0])) is None  # one pair: no test
    flat = report.paired_interval([2.0, 2.0], [1.0, 1.0])  # no spread: 0, or 1 at the null
    assert report.t_test(flat) == 0.0 and report.t_test(flat, null=1.0) == 1.0


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, but
    # never below the one before it: 0.06); back in the given order
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert report.holm([]) == []


def test_verdict_rules():
    v = report.verdict
    assert v(1, -2.0, -3.65, None) == "inconclusive (n=1)"
    # the paper's delta below 2 % of its baseline: no effect claimed, whatever ours does
    assert v(3, 1.2, -0.01, 0.001, no_effect=True) == "no effect claimed"
    assert v(3, -2.0, None, 0.01) == "lower" and v(3, 2.0, None, 0.01) == "higher"
    assert v(3, 2.0, None, 0.2) == "inconclusive"
    assert v(3, 2.0, -3.65, 0.01) == "opposite to the paper"
    assert v(3, -2.0, -3.65, 0.01, p_paper=0.5, paper_null=-2.5) == "same direction as the paper"
    # ours differs from the paper's effect on the side of 0: smaller, with or without a sign
    assert v(3, -0.2, -3.65, 0.6, p_paper=0.001, paper_null=-10.0) == "smaller than the paper's"
    assert v(3, 0.3, -3.65, 0.6, p_paper=0.001, paper_null=-10.0) == "smaller than the paper's"
    assert v(3, -3.0, -3.65, 0.01, p_paper=0.001, paper_null=-10.0) == "smaller than the paper's"
    # beyond the paper's effect is not smaller
    assert v(3, -20.0, -3.65, 0.001, p_paper=0.01, paper_null=-10.0) == \
        "same direction as the paper"
    assert v(3, -0.2, -3.65, 0.6, p_paper=0.2, paper_null=-10.0) == "inconclusive"
    assert v(3, -2.0, -3.65, 0.05) == "inconclusive"  # p < 0.05 strictly


def test_no_effect_threshold():
    assert stats.no_effect_claimed(12.27 - 12.28, 12.28)  # freihand-g: -0.01 mm of 12.28
    assert not stats.no_effect_claimed(-0.47, 14.49)  # 3.2 %
    assert not stats.no_effect_claimed(0.2, 10.0)  # exactly 2 %: an effect is claimed
    assert not stats.no_effect_claimed(None, 10.0) and not stats.no_effect_claimed(-1.0, None)


# ---------------------------------------------------------------- evaluate


def test_duplicates_are_counted_once_where_they_have_most_seeds(results):
    ev = report.evaluate(report.load_records(results))
    by = _by(ev)
    # t1: r2's depth − rgb has r1's cells; its kd − rgb does not (kd differs)
    twin, first = by[("t1", "r2", "depth", "r2")], by[("t1", "r1", "depth", "r1")]
    assert twin["same_as"] is first and twin["verdict"] == stats.REUSED
    assert first["same_as"] is None and by[("t1", "r2", "kd", "r2")]["same_as"] is None
    # t2 sorts first, but t3 holds the same cells at more seeds: counted in t3
    reused, source = by[("t2", "stb", "wl2", "stb")], by[("t3", "wl2", "target", "none")]
    assert reused["same_as"] is source and source["same_as"] is None
    assert (reused["n"], source["n"]) == (3, 5)
    # the families: distinct method comparisons only (t1 kd − rgb x2; t3 l2, wl2, tiny), and
    # those with a claimed effect (tiny's paper delta is 0.4 % of its baseline)
    assert (ev["method"], ev["sized"]) == (5, 4)
    assert reused["p_holm"] is None and first["p_holm"] is None  # reused; sanity


def test_relative_effects_and_holm_by_hand(results):
    by = _by(report.evaluate(report.load_records(results)))
    wl2 = by[("t3", "wl2", "target", "none")]
    base = statistics.fmean(NONE)
    iv = report.paired_interval(T3["wl2"], NONE)
    assert wl2["baseline"] == pytest.approx(base)
    assert wl2["rel"] == pytest.approx(statistics.fmean(DIFFS["wl2"]) / base)
    assert (wl2["rel_lo"], wl2["rel_hi"]) == pytest.approx((iv["lo"] / base, iv["hi"] / base))
    assert wl2["paper_rel"] == pytest.approx((8.18 - 15.67) / 15.67)
    assert wl2["paper_baseline"] == 15.67

    # raw p of a − b = 0, in closed form, for the five distinct method comparisons
    raw = {"r1": _p_df2(_t(_diffs(KD["r1"], RGB))),
           "r2": _p_df2(_t(_diffs(KD["r2"], RGB))),
           **{row: _p_df4(_t(DIFFS[row])) for row in ("l2", "wl2", "tiny")}}
    where = {"r1": ("t1", "r1", "kd", "r1"), "r2": ("t1", "r2", "kd", "r2"),
             **{row: ("t3", row, "target", "none") for row in ("l2", "wl2", "tiny")}}
    for name, p in raw.items():
        assert by[where[name]]["p"] == pytest.approx(p, rel=1e-9), name
    # Holm by hand: the i-th smallest of m = 5 times (5 - i + 1), never below the one before
    order = sorted(raw, key=raw.get)
    assert order == ["tiny", "l2", "r2", "r1", "wl2"]
    expected, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (5 - i) * raw[name]))
        expected[name] = running
    assert expected["tiny"] == pytest.approx(5 * raw["tiny"])
    assert expected["l2"] == pytest.approx(4 * raw["l2"])
    assert expected["r2"] == pytest.approx(3 * raw["r2"])
    for name in raw:
        assert by[where[name]]["p_holm"] == pytest.approx(expected[name], rel=1e-9), name

    # a − b = the paper's relative effect times our baseline: l2's null is close to ours
    l2 = by[("t3", "l2", "target", "none")]
    null = (15.0 - 15.67) / 15.67 * base
    assert l2["paper_null"] == pytest.approx(null)
    assert l2["p_paper"] == pytest.approx(_p_df4(_t(DIFFS["l2"], null)), rel=1e-9)


def test_the_verdicts_of_the_hand_made_tables(results):
    by = _by(report.evaluate(report.load_records(results)))
    verdicts = {k: c["verdict"] for k, c in by.items()}
    assert verdicts == {
        ("t1", "r1", "kd", "r1"): "inconclusive",
        # -3 mm of 81 differs from 0, but is far below the paper's -10 %
        ("t1", "r2", "kd", "r2"): "smaller than the paper's",
        ("t1", "r1", "depth", "r1"): "same direction as the paper",
        ("t1", "r2", "depth", "r2"): stats.REUSED,
        ("t2", "stb", "wl2", "stb"): stats.REUSED,
        ("t3", "l2", "target", "none"): "same direction as the paper",
        # about 0 % against the paper's -47.8 %: the interval excludes the paper's effect
        ("t3", "wl2", "target", "none"): "smaller than the paper's",
        # +1 mm, clearly > 0, against a paper delta of -0.07 mm of 15.67: no effect claimed
        ("t3", "tiny", "target", "none"): "no effect claimed",
    }
    tiny = by[("t3", "tiny", "target", "none")]
    assert tiny["p_holm"] < 0.05 and tiny["p_paper_holm"] is None
    # the sanity check reads its raw p (it is in no Holm family)
    depth = by[("t1", "r1", "depth", "r1")]
    assert depth["kind"] == "sanity" and depth["p_holm"] is None and depth["p"] < 0.05


# ---------------------------------------------------------------- rendering


def test_tables_list_sanity_checks_apart_and_note_reuse(results, tmp_path):
    report.render_reports(results, tmp_path)
    t1 = (tmp_path / "t1.md").read_text(encoding="utf-8")
    method = t1.index("### Claims of the method")
    sanity = t1.index("### Sanity checks of the data")
    assert method < sanity
    assert "depth − rgb" not in t1[method:sanity] and "kd − rgb" not in t1[sanity:]
    assert "same cells as depth − rgb (r1) (n=3): counted there" in t1
    assert "r2 / rgb is r1 / rgb at seeds 0, 1, 2: the same stage keys" in t1
    assert "across the 5 distinct method comparisons" in t1  # the notes say what Holm ran on
    t2 = (tmp_path / "t2.md").read_text(encoding="utf-8")
    assert ("stb / none is t3's none / target at seeds 0, 1, 2 (of its 0, 1, 2, 3, 4): the "
            "same stage keys, reused from t3, not a new measurement") in t2
    assert "same cells as t3 wl2 − none (target) (n=5): counted there, smaller than the " \
           "paper's" in t2
    rows = list(csv.DictReader((tmp_path / "t3_comparisons.csv").open(encoding="utf-8")))
    wl2 = next(r for r in rows if r["a_row"] == "wl2")
    assert (wl2["kind"], wl2["verdict"]) == ("method", "smaller than the paper's")
    assert float(wl2["paper_rel"]) == pytest.approx((8.18 - 15.67) / 15.67)
    (reused,) = csv.DictReader((tmp_path / "t2_comparisons.csv").open(encoding="utf-8"))
    assert reused["same_as"] == "t3 wl2 − none (target)" and reused["p_holm"] == ""


def test_the_index_opens_with_the_computed_claims(results, tmp_path):
    report.render_reports(results, tmp_path)
    lines = (tmp_path / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# Reports")
    # claims: t1 r1 (cannot tell), t1 r2 and t3 wl2 (smaller: refuted; r2 differs from 0 in
    # the paper's direction), t3 l2 (holds); tiny: no effect claimed; t2's: counted in t3
    assert lines[2] == (
        "Of 4 method claims of the paper tested here: 1 holds, 2 are refuted (all smaller "
        "than the paper's; 1 of them in the paper's direction), 1 this benchmark cannot tell; "
        "sanity checks of the data: 1, same direction as the paper.")
    text = "\n".join(lines)
    assert "### Hold: same direction as the paper (1)" in text
    assert "### Sanity checks of the data (not claims of the method) (1)" in text
    assert "### Shown twice: the same cells as a comparison above (not a new confirmation) (2)" \
        in text
    assert "### No effect claimed by the paper (1)" in text


def test_the_first_line_says_when_no_claim_is_reproduced(tmp_path):
    folder = tmp_path / "results"
    # the paper's l2 at 12.02: a -23 % claim; ours is -4.5 %, so no claim holds
    for spec, records in (_t1(), _t2(), _t3(paper_l2=12.02)):
        report.write_records(folder / f"{spec['table']}.parquet", spec, records)
    report.render_reports(folder, tmp_path / "r")
    first = (tmp_path / "r" / "README.md").read_text(encoding="utf-8").splitlines()[2]
    # l2's p of a − b = the paper's effect joins the smallest: Holm multiplies r1's by 1 now
    assert first == (
        "No method claim of the paper is reproduced in this run. Of 4 method claims of the "
        "paper tested here: 0 hold, 4 are refuted (all smaller than the paper's; 2 of them in "
        "the paper's direction), 0 this benchmark cannot tell; sanity checks of the data: 1, "
        "same direction as the paper.")


# ---------------------------------------------------------------- ablation files and specs

GOOD = {"table": "tableX", "columns": {"a": {"stage": "target"}, "b": {"stage": "target"}},
        "rows": [{"label": "none", "set": {"regularizer.form": "none"}},
                 {"label": "l2", "set": {"regularizer.form": "l2"}}]}


def _write(tmp_path, data):
    path = tmp_path / "tableX.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_kinds_in_ablation_files(tmp_path):
    ab = ablation.load(_write(tmp_path, {
        **GOOD, "baseline_row": {"row": "none", "kind": "method"},
        "compare_columns": [{"columns": ["a", "b"], "kind": "sanity"}, ["b", "a"]],
        "compare": [{"a": ["l2", "a"], "b": ["none", "b"], "kind": "sanity"}]}))
    kinds = [(tuple(c["a"]), tuple(c["b"]), c["kind"]) for c in ab.comparisons]
    assert kinds == [(("l2", "a"), ("none", "a"), "method"), (("l2", "b"), ("none", "b"), "method"),
                     (("none", "a"), ("none", "b"), "sanity"), (("l2", "a"), ("l2", "b"), "sanity"),
                     (("none", "b"), ("none", "a"), "method"), (("l2", "b"), ("l2", "a"), "method"),
                     (("l2", "a"), ("none", "b"), "sanity")]
    assert [c["kind"] for c in ablation.table_spec(ab, "cpu", [0])["comparisons"]] == \
        [k for *_, k in kinds]
    # the bare forms are still read, as method
    bare = ablation.load(_write(tmp_path, {**GOOD, "baseline_row": "none"}))
    assert {c["kind"] for c in bare.comparisons} == {"method"}


@pytest.mark.parametrize("change, expected", [
    ({"baseline_row": {"row": "none", "kind": "sanity check"}},
     "baseline_row.kind: must be one of method, sanity, got 'sanity check'"),
    ({"baseline_row": {"row": "none", "knd": "method"}},
     "baseline_row.knd: unknown key (did you mean 'kind'?)"),
    ({"compare_columns": [{"columns": ["a", "b"], "kind": "Method"}]},
     "compare_columns[0].kind: must be one of method, sanity, got 'Method'"),
    ({"compare_columns": [{"cols": ["a", "b"]}]}, "compare_columns[0].cols: unknown key"),
    ({"compare": [{"a": ["l2", "a"], "b": ["none", "a"], "kind": None}]},
     "compare[0].kind: must be one of method, sanity, got None"),
    ({"compare": [{"a": ["l2", "a"], "b": ["none", "a"], "kinds": "method"}]},
     "compare[0].kinds: unknown key (did you mean 'kind'?)"),
])
def test_a_bad_kind_is_a_problem_naming_file_and_key(tmp_path, change, expected):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(ConfigError) as e:
        ablation.load(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_the_shipped_files_give_every_comparison_a_kind():
    t1 = ablation.load(ROOT / "ablations" / "table1.yaml")
    sanity = {(tuple(c["a"]), tuple(c["b"])) for c in t1.comparisons if c["kind"] == "sanity"}
    assert sanity == {((r.label, "depth"), (r.label, "rgb")) for r in t1.rows}
    for name in ("table2.yaml", "table3.yaml"):
        ab = ablation.load(ROOT / "ablations" / name)
        assert {c["kind"] for c in ab.comparisons} == {"method"}, name


def test_refresh_spec_gives_the_committed_records_their_kinds(tmp_path):
    """The committed table1 records with their spec as it was before kinds: the migration gives
    back the committed file byte for byte, rows untouched."""
    committed = ROOT / "reports" / "results" / "table1.parquet"
    old = tmp_path / "table1.parquet"
    old.write_bytes(committed.read_bytes())
    spec = report.read_spec(old)
    assert {c["kind"] for c in spec["comparisons"]} == {"method", "sanity"}
    report.replace_spec(old, {**spec, "comparisons": [
        {k: v for k, v in c.items() if k != "kind"} for c in spec["comparisons"]]})
    assert not _same_records(old, committed)
    assert refresh_spec(old) == spec
    assert _same_records(old, committed)
    assert pq.read_table(old).equals(pq.read_table(committed))
    # a stored comparison the file does not have gets no kind: an error, the file untouched
    report.replace_spec(old, {**spec, "comparisons": [
        *spec["comparisons"], {"a": ["L_ACT only", "rgb"], "b": ["L_ACT only", "kd"],
                               "metric": "epe_mm", "paper_delta": None}]})
    before = old.read_bytes()
    with pytest.raises(ValueError, match=r"is not in the ablation file .*table1.yaml"):
        refresh_spec(old)
    assert old.read_bytes() == before


def test_a_stored_spec_with_an_unknown_kind_is_a_data_error(tmp_path):
    spec, records = _t3()
    spec["comparisons"][0]["kind"] = "anecdote"
    report.write_records(tmp_path / "t3.parquet", spec, records)
    with pytest.raises(DataError, match=r"t3.parquet: spec.comparisons\[0\].kind"):
        report.load_records(tmp_path)


def test_power_of_the_paired_t_test_against_known_values():
    from cmkg.report.stats import paired_power, seeds_for_power

    # Cohen's d = 1 with 10 pairs at alpha 0.05: power 0.803 (noncentral t, standard tables)
    assert paired_power(10, 1.0, 1.0) == pytest.approx(0.803, abs=1e-3)
    assert seeds_for_power(1.0, 1.0) == 10
    # more comparisons (a stricter Holm first step) or more noise never need fewer seeds
    counts = [seeds_for_power(0.6, 1.0, comparisons=m) for m in (1, 12, 74)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert seeds_for_power(0.96, 1.0) > seeds_for_power(0.2, 1.0)
    # a large effect at a small SD: the far tail scipy returns as nan counts as 0, not nan
    assert paired_power(3, 0.2, 1.295) == pytest.approx(1.0, abs=0.05)
