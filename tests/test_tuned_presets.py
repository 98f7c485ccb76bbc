"""Tuned rows that belong to one preset (``tuned: {cpu: PATH/best.yaml}``): a tuned row at the
presets the mapping names, left out of the table (cells, records, comparisons, benchmark and
figure entries) at any other, with a note; the mapping's keys and files checked at load. The
ablation file, the sweep summaries and the faked executor are test_fresh_seeds'."""

import pytest
import yaml

from cmkg import ablation, cli, report
from cmkg.errors import ConfigError
from tests.test_fresh_seeds import _best_yaml, _sets, _table, fake  # noqa: F401 (fixture)

TUNED = "l2 tuned"
EXTRA = {  # every entry of the file that can name a row, each naming the tuned one
    "compare": [{"a": [TUNED, "target"], "b": ["l2 chosen", "target"]},
                {"a": ["l2 chosen", "target"], "b": ["none", "target"]}],
    "benchmark": {"ratios": {"tuned": [TUNED, "target"], "plain": ["none", "target"]},
                  "floor": {"baseline": ["none", "target"], "inert": [TUNED, "target"]}},
    "figures": {"figure4": {"pck_rows": {}},
                "figure5": {"parameters": {"without": "none", "with": [TUNED, "l2 chosen"]}}},
}


def _tuned_table(tmp_path, tuned):
    """test_fresh_seeds' table (none, a choose row; baseline_row none) with a tuned row whose
    ``tuned`` is ``tuned``, and the entries of ``EXTRA``."""
    row = {"label": TUNED, "set": {"regularizer.form": "l2"}, "tuned": tuned}
    return _table(tmp_path, [row], **EXTRA)


def _cpu_best(tmp_path):
    """A cpu sweep's summary: chosen on seeds 0-2, sigma 0.3 (the smoke demo reports on 0)."""
    return _best_yaml(tmp_path / "cpu", seeds=[0, 1, 2])


def _names(ab_or_spec) -> set:
    """Every row label the comparisons, benchmark and figure entries name."""
    get = ab_or_spec.get if isinstance(ab_or_spec, dict) else lambda k: getattr(ab_or_spec, k)
    found = {c[s][0] for c in get("comparisons") for s in ("a", "b")}
    bench = get("benchmark") or {}
    found |= {ref[0] for ref in (bench.get("ratios") or {}).values()}
    found |= {ref[0] for ref in (bench.get("floor") or {}).values()}
    for panels in (get("figures") or {}).values():
        for entry in panels.values():
            for v in entry.values():
                found |= set(v) if isinstance(v, list) else {v}
    return found


def test_the_named_preset_runs_the_row_with_the_sweeps_params(tmp_path):
    best = _cpu_best(tmp_path)
    ab = ablation.load(_tuned_table(tmp_path, {"cpu": str(best)}))
    assert ab.row(TUNED).tuned is None and set(ab.row(TUNED).tuned_at) == {"cpu"}
    at = ablation.at_preset(ab, "cpu")
    assert at.row(TUNED).tuned["path"] == str(best) and at.left_out == []
    assert (at.comparisons, at.benchmark, at.figures) == (ab.comparisons, ab.benchmark,
                                                          ab.figures)
    assert ablation.at_preset(at, "cpu") is at
    with pytest.raises(ValueError, match="resolved at preset 'cpu'"):
        ablation.at_preset(at, "smoke")
    cells = ablation.expand(ab, "cpu", _sets(tmp_path), seeds=2, choice_seeds=3)
    got = {(c.seed, c.cfg.regularizer.form, c.cfg.regularizer.sigma) for c in cells
           if c.row == TUNED}
    assert got == {(3, "l2", 0.3), (4, "l2", 0.3)}
    # the sweep's seeds are still refused as report seeds at its own preset
    with pytest.raises(ConfigError, match=r"rows\[2\]\.tuned\.cpu: .* overlap them at \[0, 1\]"):
        ablation.expand(ab, "cpu", _sets(tmp_path), seeds=2)
    # a --config file is its preset's: preset cpu keeps the row
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "cpu"}))
    assert {c.seed for c in ablation.expand(ab, str(cfg), _sets(tmp_path), seeds=1,
                                            choice_seeds=3) if c.row == TUNED} == {3}


def test_another_preset_leaves_the_row_and_its_entries_out(tmp_path):
    best = _cpu_best(tmp_path)
    ab = ablation.load(_tuned_table(tmp_path, {"cpu": str(best)}))
    assert TUNED in _names(ab)
    smoke = ablation.at_preset(ab, "smoke")
    assert [r.label for r in smoke.rows] == ["none", "l2 chosen"]
    assert TUNED not in _names(smoke)
    # what does not name the row stays
    assert {(c["a"][0], c["b"][0]) for c in smoke.comparisons} == {("l2 chosen", "none")}
    assert smoke.benchmark == {"ratios": {"plain": ["none", "target"]}}  # floor needs both
    assert smoke.figures == {"figure4": {"pck_rows": {}}, "figure5": {
        "parameters": {"without": "none", "with": ["l2 chosen"]}}}
    assert smoke.left_out == [f"{TUNED}: tuned at the cpu preset only ({best}); left out at "
                              "smoke"]
    assert ablation.notes(ab, "smoke")[-1] == smoke.left_out[0]
    # no cells, and the report seeds 0-1, the sweep's own, are no reason to stop
    cells = ablation.expand(ab, "smoke", _sets(tmp_path))
    assert cells and TUNED not in {c.row for c in cells}
    # a --config file naming another preset, or none, leaves it out too
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "smoke"}))
    assert TUNED not in {c.row for c in ablation.expand(ab, str(cfg), _sets(tmp_path))}
    assert ablation.at_preset(ab, None).left_out == [
        f"{TUNED}: tuned at the cpu preset only ({best}); left out at custom (a config naming "
        "no preset)"]
    # two presets named: the note names both and their files
    paper = _best_yaml(tmp_path / "paper", seeds=[0, 1, 2])
    both = ablation.load(_tuned_table(tmp_path, {"cpu": str(best), "paper": str(paper)}))
    assert ablation.at_preset(both, "paper").row(TUNED).tuned["path"] == str(paper)
    assert ablation.at_preset(both, "smoke").left_out == [
        f"{TUNED}: tuned at the cpu and paper presets only (cpu: {best}; paper: {paper}); "
        "left out at smoke"]
    # a table left without rows is an error, not an empty table
    only = tmp_path / "only.yaml"
    only.write_text(yaml.safe_dump({"table": "t", "columns": {"target": {"stage": "target"}},
                                    "rows": [{"label": TUNED, "tuned": {"cpu": str(best)}}]}))
    with pytest.raises(ConfigError, match=r"every row is tuned at other presets .* than smoke"):
        ablation.expand(ablation.load(only), "smoke", _sets(tmp_path))


def test_the_run_and_the_dry_run_at_another_preset(tmp_path, fake, capsys):  # noqa: F811
    execute, calls = fake
    best = _cpu_best(tmp_path)
    path = _tuned_table(tmp_path, {"cpu": str(best)})
    sets = sum((["--set", s] for s in _sets(tmp_path)), [])
    assert cli.main(["ablate", str(path), "--config", "smoke", "--dry-run", "--report",
                     str(tmp_path / "rep"), *sets]) == 0
    out = capsys.readouterr().out
    assert "2 rows x 1 columns" in out and TUNED not in out
    rep = tmp_path / "rep"
    assert ablation.run([str(path)], "smoke", _sets(tmp_path), report_dir=rep,
                        execute=execute) == 0
    assert {(n.cfg.regularizer.form, n.cfg.regularizer.sigma) for nodes in calls
            for n in nodes if n.stage == "target"} == {("none", 1.0e-5), ("l2", 1.0e-5),
                                                       ("l2", 1.0e-2)}
    spec, recs = report.load_records(rep / "results")["table2"]
    assert {r["row"] for r in recs} == {"none", "l2 chosen"}
    assert [r["label"] for r in spec["rows"]] == ["none", "l2 chosen"]
    assert TUNED not in _names(spec)
    note = f"{TUNED}: tuned at the cpu preset only ({best}); left out at smoke"
    assert note in spec["notes"]
    md = (rep / "table2.md").read_text()
    assert note in md and f"| {TUNED}" not in md


def test_bad_mappings_stop_the_dry_run_naming_the_key(tmp_path, capsys):
    best = _cpu_best(tmp_path)
    rep = tmp_path / "rep"

    def dry(tuned) -> str:
        path = _tuned_table(tmp_path, tuned)
        rc = cli.main(["ablate", str(path), "--config", "smoke", "--dry-run", "--report",
                       str(rep), *sum((["--set", s] for s in _sets(tmp_path)), [])])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("cmkg: error:") == 1 and "Traceback" not in err
        assert str(path) in err
        return err

    err = dry({"cpuu": str(best)})
    assert "rows[2].tuned.cpuu: not a preset (did you mean 'cpu'?)" in err
    assert "smoke, cpu, paper" in err
    # a missing file is an error whichever preset runs (smoke here, the file is cpu's)
    err = dry({"cpu": "nowhere/best.yaml", "paper": str(best)})
    assert "rows[2].tuned.cpu: " in err and "nowhere/best.yaml: no such file" in err
    assert "rows[2].tuned.paper" not in err
    err = dry({"cpu": 3})
    assert "rows[2].tuned.cpu: must be the path of a sweep's best.yaml" in err
    assert "rows[2].tuned: an empty mapping" in dry({})
    assert not rep.exists() and not (tmp_path / "runs").exists()
