"""Fresh-seed confirmation (choice seeds apart from report seeds), tuned rows from a sweep's
best.yaml, and the datasets' contact sheets in the report's index. Training is faked: the
executor publishes made-up metrics whose validation EPE is chosen so that the choice seeds, the
report seeds and each single seed would each pick another value."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cmkg import ablation, cli, report, stages
from cmkg.data import synthesize
from cmkg.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = [1.0e-5, 1.0e-2]
# best val EPE per (sigma, seed). Choice seeds 0-1: 1e-2 has the lower mean (11 < 11.5), though
# seed 0 alone prefers 1e-5; the report seeds 2-3 prefer 1e-5, and so does the mean over all four
VAL = {(1.0e-5, 0): 9.0, (1.0e-5, 1): 14.0, (1.0e-5, 2): 5.0, (1.0e-5, 3): 5.0,
       (1.0e-2, 0): 10.0, (1.0e-2, 1): 12.0, (1.0e-2, 2): 30.0, (1.0e-2, 3): 30.0}


def _table(tmp_path, extra_rows=(), **top):
    data = {"table": "table2", "title": "tiny", "seeds": 2, "baseline_row": "none",
            "columns": {"target": {"stage": "target", "metrics": ["epe_mm", "auc_20_50"]}},
            "rows": [{"label": "none", "set": {"regularizer.form": "none"}},
                     {"label": "l2 chosen", "set": {"regularizer.form": "l2"},
                      "choose": {"key": "regularizer.sigma", "values": SIGMAS}},
                     *extra_rows], **top}
    path = tmp_path / "table2.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _best_yaml(tmp_path, **top):
    """A sweep summary as ``cmkg tune`` writes it (cmkg.cluster.tune_results.summarise)."""
    path = tmp_path / "_tune" / "prior-abc123" / "best.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({
        "space": "tune_spaces/prior.yaml", "stage": "target", "metric": "val_epe_mm",
        "mode": "min", "trials_finished": 3, "trials_pruned": 0, "trials_failed": 0,
        "best": {"params": {"regularizer.sigma": 0.3},
                 "metrics": {"val_epe_mm": 20.0, "artifact": "runs/target/x"}},
        "retrain": "cmkg train target --config smoke --set regularizer.sigma=0.3", **top}))
    return path


class _Art:
    """A finished stage as the runner reads it: metrics, meta, the network."""

    def __init__(self, node):
        cfg = node.cfg
        val = VAL.get((cfg.regularizer.sigma, cfg.run.seed), 20.0) \
            if cfg.regularizer.form == "l2" else 20.0
        pck = [min(1.0, t / 40.0) for t in range(0, 50, 5)]
        self.metrics = {"best_val_epe_mm": val, "mean_pose_test": {"epe_mm": 50.0},
                        "test": {"epe_mm": val + 1.0, "auc_20_50": 0.5,
                                 "pck_thresholds_mm": list(range(0, 50, 5)), "pck": pck}}
        self.meta = {"duration_s": 1.0, "code_version": "test", "device": "cpu"}

    def load_model(self):
        return torch.nn.Linear(2, 2)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """An executor that 'trains' every node at once (made-up metrics), the calls it got, and
    tiny real datasets for the contact sheets."""
    arts, calls, sets = {}, [], {}

    def execute(nodes, on_done, **kwargs):
        calls.append([n for n in nodes])
        for n in nodes:
            arts[str(n.id)] = _Art(n)
            on_done(n, str(n.id), None)

    def ensure_dataset(spec, cfg):
        if spec.domain not in sets:
            sets[spec.domain] = tmp_path / "sets" / spec.domain
            synthesize(sets[spec.domain], spec.domain, 24, 32, progress=False)
        return sets[spec.domain]

    monkeypatch.setattr(stages, "open_artifact", lambda path: arts[path])
    monkeypatch.setattr(stages, "ensure_dataset", ensure_dataset)
    return execute, calls


SETS = ["epochs.target=1", "data.target.num=160", "data.target.size=32"]


def _sets(tmp_path):
    return [f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}", *SETS]


# ---------------------------------------------------------------- seeds


def test_seed_plan(tmp_path):
    ab = ablation.load(_table(tmp_path, seeds=5))
    assert ablation.seed_plan(ab) == ([0, 1, 2, 3, 4], None)  # as before: no choice seeds
    assert ablation.seed_plan(ab, seeds=3) == ([0, 1, 2], None)
    assert ablation.seed_plan(ab, choice_seeds=5) == ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4])
    ab = ablation.load(_table(tmp_path, seeds=5, choice_seeds=5))
    assert ablation.seed_plan(ab) == ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4])
    assert ablation.seed_plan(ab, seeds=2, choice_seeds=3) == ([3, 4], [0, 1, 2])
    assert ablation.seed_plan(ab, choice_seeds=0) == ([0, 1, 2, 3, 4], None)  # turned off
    ab = ablation.load(_table(tmp_path, seeds=[7, 9], choice_seeds=[0, 2]))
    assert ablation.seed_plan(ab) == ([7, 9], [0, 2])
    with pytest.raises(UserError, match=r"share \[0\]"):
        ablation.seed_plan(ablation.load(_table(tmp_path, seeds=[0, 9])), choice_seeds=1)
    path = _table(tmp_path, seeds=[1, 2], choice_seeds=[0, 1])
    with pytest.raises(ConfigError, match=r"seeds: \[1\] are also choice_seeds") as e:
        ablation.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="choice_seeds: must be an integer >= 1 or a list"):
        ablation.load(_table(tmp_path, choice_seeds=[1, 1]))


def test_expand_runs_a_choice_on_the_choice_seeds_only(tmp_path):
    ab = ablation.load(_table(tmp_path, choice_seeds=2))
    cells = ablation.expand(ab, "smoke", _sets(tmp_path))
    by = {(c.row, c.candidate, c.seed, c.choosing) for c in cells}
    assert {(r, s) for r, _, s, ch in by if not ch} == {
        (r, s) for r in ("none", "l2 chosen") for s in (2, 3)}
    assert {(v, s) for r, v, s, ch in by if ch} == {(v, s) for v in SIGMAS for s in (0, 1)}
    assert all(not c.choosing for c in cells if c.row == "none")
    # without choice seeds: the same cells as before this existed (values x report seeds)
    plain = ablation.expand(ablation.load(_table(tmp_path)), "smoke", _sets(tmp_path))
    assert not any(c.choosing for c in plain)
    assert sorted((c.row, str(c.candidate), c.seed) for c in plain) == sorted(
        (r, str(v), s) for r, vs in (("none", [None]), ("l2 chosen", SIGMAS)) for v in vs
        for s in (0, 1))


# ---------------------------------------------------------------- the runner


def test_choice_on_choice_seeds_reported_on_report_seeds(tmp_path, fake, capsys):
    execute, calls = fake
    rep = tmp_path / "rep"
    path = _table(tmp_path, choice_seeds=2)
    assert ablation.run([str(path)], "smoke", _sets(tmp_path), report_dir=rep,
                        execute=execute) == 0
    # two rounds: first the plain rows and every value on the choice seeds, then only the
    # chosen value on the report seeds
    first, second = ({(n.cfg.regularizer.form, n.cfg.regularizer.sigma, n.cfg.run.seed)
                      for n in nodes if n.stage == "target"} for nodes in calls)
    assert {s for f, _, s in first if f == "none"} == {2, 3}
    assert {(sig, s) for f, sig, s in first if f == "l2"} == {(v, s) for v in SIGMAS
                                                             for s in (0, 1)}
    assert {(f, sig, s) for f, sig, s in second} == {("l2", 1.0e-2, 2), ("l2", 1.0e-2, 3)}
    spec, recs = report.load_records(rep / "results")["table2"]
    assert spec["seeds"] == [2, 3] and spec["choice_seeds"] == [0, 1]
    assert sorted((r["row"], r["seed"]) for r in recs) == [
        ("l2 chosen", 2), ("l2 chosen", 3), ("none", 2), ("none", 3)]
    chosen = [r for r in recs if r["row"] == "l2 chosen"]
    # the value is 1e-2 (mean val over seeds 0-1), though the report seeds would pick 1e-5
    assert {r["epe_mm"] for r in chosen} == {31.0}
    for r in chosen:
        assert r["choice_seeds"] == [0, 1]
        assert r["chosen"]["value"] == 1.0e-2 and r["chosen"]["seeds"] == [0, 1]
        assert r["chosen"]["val_epe_mm"] == {"1e-05": 11.5, "0.01": 11.0}
        assert len(r["chosen"]["artifacts"]) == 4  # the choosing cells' chains stay named
    none = [r for r in recs if r["row"] == "none"]
    assert all(r["choice_seeds"] == [] and r["chosen"] == {} for r in none)
    md = (rep / "table2.md").read_text()
    assert ("l2 chosen: regularizer.sigma = 0.01, one value for the row, chosen on seeds 0-1 "
            "(val; mean best val EPE: 1e-05 11.50, 0.01 11.00 mm), reported on seeds 2-3") in md
    assert "seeds 2, 3 (report seeds; the `choose` rows' values were chosen" in md


def test_without_choice_seeds_the_same_seeds_choose_and_report(tmp_path, fake):
    execute, calls = fake
    rep = tmp_path / "rep"
    assert ablation.run([str(_table(tmp_path, seeds=4))], "smoke", _sets(tmp_path),
                        report_dir=rep, execute=execute) == 0
    assert len(calls) == 1  # one round, every value on every seed, as before
    spec, recs = report.load_records(rep / "results")["table2"]
    assert spec["seeds"] == [0, 1, 2, 3] and "choice_seeds" not in spec
    chosen = [r for r in recs if r["row"] == "l2 chosen"]
    # the mean over all four seeds picks 1e-5 (8.25 < 20.5)
    assert [r["chosen"]["value"] for r in chosen] == [1.0e-5] * 4
    assert chosen[0]["choice_seeds"] == [0, 1, 2, 3]
    extra = dict(chosen[0]["extra"]["chosen"])
    # test EPE per value is recorded beside the choice (for the val/test agreement), not used
    assert set(extra.pop("test_epe_mm")) == {"1e-05", "0.01"}
    assert extra == {"key": "regularizer.sigma", "value": 1.0e-5,
                     "val_epe_mm": {"1e-05": 8.25, "0.01": 20.5}}
    assert spec["notes"] == ["l2 chosen: regularizer.sigma = 1e-05, chosen on the validation "
                             "split (mean best val EPE over 4 seeds: 1e-05 8.25, 0.01 20.50 mm)"]


def test_dry_run_and_cli_flag(tmp_path, capsys):
    path = _table(tmp_path)
    args = ["ablate", str(path), "--config", "smoke", "--dry-run", "--report",
            str(tmp_path / "rep"), "--choice-seeds", "2", "--seeds", "1",
            *sum((["--set", s] for s in _sets(tmp_path)), [])]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "x 1 seeds (2; choices on seeds 0-1)" in out
    assert out.count("chooses") == 4 and out.count("if chosen") == 2
    # both values are listed on the report seed, but only the chosen one will train
    assert "to train: target 7;" in out
    assert ("of which trained once the choices are made (one value per choose row, column and "
            "report seed): target 6;") in out
    assert cli.main(args[:-2 * len(_sets(tmp_path))] + ["--choice-seeds", "-1"]) == 2


# ---------------------------------------------------------------- tuned rows


def test_tuned_row_applies_best_yaml_and_refuses_its_seeds(tmp_path, fake, capsys):
    best = _best_yaml(tmp_path, seeds=[0, 1])
    tuned = {"label": "l2 tuned", "set": {"regularizer.form": "l2"}, "tuned": str(best)}
    path = _table(tmp_path, [tuned])
    # the report seeds 0-1 are the sweep's: refused before anything runs, naming file and key
    rc = cli.main(["ablate", str(path), "--config", "smoke", "--report", str(tmp_path / "rep"),
                   *sum((["--set", s] for s in _sets(tmp_path)), [])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("cmkg: error:") == 1 and "Traceback" not in err
    assert str(path) in err and "rows[2].tuned" in err and str(best) in err
    assert "overlap them at [0, 1]" in err
    assert not (tmp_path / "runs").exists()

    execute, _ = fake
    rep = tmp_path / "rep"
    assert ablation.run([str(path)], "smoke", _sets(tmp_path), choice_seeds=2,
                        report_dir=rep, execute=execute) == 0
    cells = ablation.expand(ablation.load(path), "smoke", _sets(tmp_path), choice_seeds=2)
    assert {c.cfg.regularizer.sigma for c in cells if c.row == "l2 tuned"} == {0.3}
    spec, recs = report.load_records(rep / "results")["table2"]
    rec = next(r for r in recs if r["row"] == "l2 tuned")
    assert rec["choice_seeds"] == [0, 1]
    assert rec["chosen"]["by"] == "sweep" and rec["chosen"]["sweep"] == "prior-abc123"
    assert rec["chosen"]["params"] == {"regularizer.sigma": 0.3}
    assert any(n.startswith("l2 tuned: regularizer.sigma = 0.3, tuned by the sweep "
                            "prior-abc123 (val_epe_mm on seeds 0, 1;") and
               n.endswith("reported on seeds 2-3") for n in spec["notes"])


def test_tuned_row_without_seeds_and_missing_file(tmp_path, capsys):
    # a best.yaml naming no seeds ran its trials at run.seed: its retrain command's, else 0
    best = _best_yaml(tmp_path)
    row = {"label": "l2 tuned", "tuned": "_tune/prior-abc123/best.yaml"}  # from the file's folder
    ab = ablation.load(_table(tmp_path, [row]))
    assert ab.row("l2 tuned").tuned["seeds"] == [0]
    assert ab.row("l2 tuned").tuned["path"] == str(best)
    with pytest.raises(ConfigError, match=r"its trials' run.seed|run.seed of its trials"):
        ablation.expand(ab, "smoke", _sets(tmp_path))  # report seeds 0-1
    assert [c.seed for c in ablation.expand(ab, "smoke", _sets(tmp_path), choice_seeds=1)
            if c.row == "l2 tuned"] == [1, 2]
    best.write_text(best.read_text().replace("regularizer.sigma=0.3",
                                             "run.seed=4 --set regularizer.sigma=0.3"))
    assert ablation.load(_table(tmp_path, [row])).row("l2 tuned").tuned["seeds"] == [4]
    # a missing file: one message naming the ablation file, the key and the path
    path = _table(tmp_path, [{"label": "l2 tuned", "tuned": "nowhere/best.yaml"}])
    rc = cli.main(["ablate", str(path), "--config", "smoke", "--dry-run",
                   "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("cmkg: error:") == 1 and "Traceback" not in err
    assert str(path) in err and "rows[2].tuned" in err and "nowhere/best.yaml: no such file" in err
    with pytest.raises(ConfigError, match="choose and tuned exclude each other"):
        ablation.load(_table(tmp_path, [{**row, "choose": {"key": "regularizer.sigma",
                                                           "values": [1, 2]}}]))


# ---------------------------------------------------------------- records and sheets


def test_old_records_load_without_the_new_columns(tmp_path):
    # records written before fresh-seed confirmation have no choice_seeds / chosen columns
    table = pq.read_table(ROOT / "reports" / "results" / "table2.parquet")
    assert {"choice_seeds", "chosen"} <= set(table.column_names)
    pq.write_table(table.drop_columns(["choice_seeds", "chosen"]), tmp_path / "table2.parquet")
    _, recs = report.load_records(tmp_path)["table2"]
    assert len(recs) == table.num_rows
    assert all(r["choice_seeds"] == [] and r["chosen"] == {} for r in recs)


def test_index_links_the_sheets_present_and_renders_without_them(tmp_path, fake):
    execute, _ = fake
    rep = tmp_path / "rep"
    ablation.run([str(_table(tmp_path))], "smoke", _sets(tmp_path), report_dir=rep,
                 execute=execute)
    sheet = rep / "data" / "stb-like.png"
    assert sheet.is_file()
    readme = (rep / "README.md").read_text()
    assert "## Data" in readme
    assert "- [stb-like](data/stb-like.png): target, the test split; read by table2" in readme
    sheet.unlink()
    assert cli.main(["report", "--report", str(rep)]) == 0
    readme = (rep / "README.md").read_text()
    assert "## Data" not in readme and "data/stb-like.png" not in readme


def test_tuned_row_reads_the_summary_with_set_and_seeds(tmp_path):
    """The summary as sweeps over several seeds write it: the whole config diff under ``set``
    (the space's fixed entries and the trial's parameters), the sweep's name and seeds."""
    best = _best_yaml(tmp_path, sweep="prior-cpu", seeds=[0, 1, 2], value=20.0,
                      set={"regularizer.form": "l2", "regularizer.sigma": 0.1})
    ab = ablation.load(_table(tmp_path, [{"label": "l2 tuned", "tuned": str(best)}]))
    t = ab.row("l2 tuned").tuned
    assert (t["sweep"], t["seeds"], t["seeds_stated"]) == ("prior-cpu", [0, 1, 2], True)
    cells = ablation.expand(ab, "smoke", _sets(tmp_path), seeds=2, choice_seeds=3)
    got = {(c.seed, c.cfg.regularizer.form, c.cfg.regularizer.sigma) for c in cells
           if c.row == "l2 tuned"}
    assert got == {(3, "l2", 0.1), (4, "l2", 0.1)}
    with pytest.raises(ConfigError, match=r"overlap them at \[2\]"):
        ablation.expand(ab, "smoke", _sets(tmp_path), seeds=2, choice_seeds=2)


def test_a_choice_at_the_grids_end_says_the_optimum_is_not_bracketed():
    from cmkg.ablation.cells import _edge_note
    grid = [1.0e4, 1.0e5, 1.0e6]
    assert "largest value of the grid" in _edge_note(grid, 1.0e6)
    assert "above it may do better" in _edge_note(grid, 1.0e6)
    assert "smallest value of the grid" in _edge_note(grid, 1.0e4)
    assert _edge_note(grid, 1.0e5) == ""  # bracketed: worse on both sides
    assert _edge_note([1.0e-5, 1.0e-2], 1.0e-2) == ""  # two values bracket nothing to say
    assert _edge_note(["learned", "positive", "none"], "none") == ""  # not an ordered grid
    # at the smallest value, a regularizer already inert there (median |D| < 0.01) needs no
    # smaller one: the note says so instead
    assert "already inert (median |D| 0.003 < 0.01)" in _edge_note(grid, 1.0e4, 3.0e-3)
    assert "smallest value of the grid: validation's optimum is not bracketed" in \
        _edge_note(grid, 1.0e4, 0.5)
    assert "above it may do better" in _edge_note(grid, 1.0e6, 1.0e-4)  # the top end: as before


def test_one_validation_figure_for_choose_rows_and_sweeps():
    """A `choose` row and a sweep's trial rank by the same number: the published weights'
    validation EPE (metrics.selection_val_epe), here the last epoch's as under optim.keep: final,
    not the best epoch's (epoch 2 has the lower val EPE but its weights were not kept)."""
    from types import SimpleNamespace

    from cmkg.cluster.tune import _final_metrics
    from cmkg.metrics import selection_val_epe

    history = [{"epoch": e, "val": {"epe_mm": v, "auc_20_50": a}}
               for e, v, a in ((1, 30.0, 0.5), (2, 25.0, 0.7), (3, 27.0, 0.6))]
    metrics = {"best_val_epe_mm": 27.0, "best_epoch": 3, "history": history,
               "test": {"epe_mm": 26.0, "auc_20_50": 0.65}}
    art = SimpleNamespace(metrics=metrics, stage="target", key="k")
    store = SimpleNamespace(describe=lambda stage, key: f"runs/{stage}/{key}")
    trial = _final_metrics(art, store, 3)
    assert trial["val_epe_mm"] == selection_val_epe(metrics) == 27.0
    assert trial["val_auc_20_50"] == 0.6  # the kept epoch's AUC, not the best epoch's
