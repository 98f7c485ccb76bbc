"""Sweeps at cluster scale: per-epoch reports, early stopping (Ray Tune's ASHA, Optuna's median
pruner) with stopped trials PRUNED in the study and their stage unpublished, budgets (--trials,
--time-budget), trials.parquet and plots rebuilt from the study alone (`cmkg report tune`), and
bad scheduler / budget entries refused before any trial."""

import re
import shutil
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cmkg import cli, config, stages
from cmkg.cluster.spaces import trial_config
from cmkg.cluster.tune_results import PLOTS, write_results

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"
LR_SPACE = """stage: target
trials: 5
cpus_per_worker: 1
sampler: random
seed: 11            # lr 1e-3 first, then 1e-2 (diverges in epoch 1)
set: [regularizer.form=none, epochs.target=3]
params:
  optim.lr: {choice: [1.0e-3, 1.0e-2]}
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the synthetic sets, rendered once per module


def _tiny(data_root, out) -> list[str]:
    return ["--config", "smoke", "--set", "data.source.num=240", "--set", "data.target.num=120",
            "--set", "optim.batch_size=16", "--set", f"data.root={data_root}", "--store", str(out)]


def _study(out: Path) -> tuple[Path, optuna.Study]:
    """The sweep folder under store ``out`` and its study, opened as a user would."""
    exp = next((out / "_tune").glob("*-*"))
    return exp, optuna.load_study(study_name=exp.name,
                                  storage=f"sqlite:///{exp.parent / 'optuna.db'}")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("extra", [[], ["optim.schedule=cosine", "optim.keep=final"]],
                         ids=["constant-best_val", "cosine-final"])
def test_on_epoch_reports_the_requested_stage_and_a_stopped_stage_resumes_exactly(
        tmp_path, capsys, extra):
    """A callback that stops kd after epoch 1 (as Tune does inside its report) leaves kd
    unpublished; rerun, kd resumes from its checkpoint (the learning-rate schedule's position
    included) and ends as an uninterrupted run."""
    def kd_cfg(store):
        return config.load("smoke", [
            "data.source.num=240", "data.target.num=120", "optim.batch_size=16",
            "data.source.size=32", "data.target.size=32", "epochs.teacher=1", "epochs.student=1",
            "epochs.kd=2", "run.progress=none", "run.threads=1", f"data.root={tmp_path / 'data'}",
            f"run.store={tmp_path / store}", *extra])

    seen = []

    def stop_after_one(epoch, record):
        seen.append(epoch)
        assert set(record["val"]) == {"epe_mm", "auc_20_50"} and record["epoch"] == epoch
        raise _Stop

    cfg = kd_cfg("a")
    with pytest.raises(_Stop):
        stages.run_stage("kd", cfg, on_epoch=stop_after_one)
    assert seen == [1]  # kd's first epoch only: not the teacher's or the student's
    store, key = stages.Store.of(cfg), stages.plan("kd", cfg)[-1].key
    final, partial = store.final("kd", key), store.partial("kd", key)
    assert not (final / "meta.json").exists() and (partial / "checkpoint.pt").is_file()
    # an uninterrupted kd over the same teacher and student, in a second store
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("*.partial"))
    whole = stages.run_stage("kd", kd_cfg("b"))
    capsys.readouterr()
    resumed = stages.run_stage("kd", cfg, on_epoch=lambda epoch, record: seen.append(epoch))
    assert "kd: resuming" in capsys.readouterr().err and seen == [1, 2]
    a, b = (torch.load(x.path / "model.pt")["state_dict"] for x in (resumed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val"] for h in resumed.metrics["history"]] == [
        h["val"] for h in whole.metrics["history"]]


@pytest.mark.ray
def test_asha_stops_diverging_trials_pruned_and_unpublished(local_ray, data_root, tmp_path,
                                                            capsys):
    """lr 1e-2 diverges: ASHA stops those trials at a rung; the study has them PRUNED, their
    stage has no artifact (nor a checkpoint to resume); the finished trial's artifact exists.
    trials.parquet and the plots are written, and `cmkg report tune` rebuilds them."""
    out = tmp_path / "runs"
    assert cli.main(["tune", str(SPACES / "smoke_asha.yaml"), *_tiny(data_root, out)]) == 0
    err = capsys.readouterr().err
    exp, study = _study(out)
    trials = study.get_trials()
    assert [t.params["optim.lr"] for t in trials] == [1e-3, 1e-2, 1e-2, 1e-2]  # seed 11
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert trials[0].user_attrs["epochs"] == 3
    for t in trials[1:]:  # stopped at a rung (epoch 1 or 2), with that epoch's value
        assert t.user_attrs["epochs"] in (1, 2) and "artifact" not in t.user_attrs
        assert t.value == t.intermediate_values[t.user_attrs["epochs"]] > trials[0].value
    assert re.search(r"trial 2/4 PRUNED at epoch 1 val_epe_mm [\d.]+ \(best [\d.]+, trial 1\) "
                     r"optim.lr=0.01", err), err[-3000:]
    assert re.search(r"trial 1/4 COMPLETE val_epe_mm [\d.]+ .*optim.lr=0.001", err)
    base = config.load("smoke", ["data.source.num=240", "data.target.num=120",
                                 "optim.batch_size=16", f"data.root={data_root}",
                                 f"run.store={out}", "epochs.target=3",
                                 "regularizer.form=none"])
    store = stages.Store.of(base)
    for t in trials:
        key = stages.plan("target", trial_config(base, t.params, "test"))[-1].key
        final, partial = store.final("target", key), store.partial("target", key)
        assert (final / "meta.json").is_file() == (t.state.name == "COMPLETE")
        assert not partial.exists()  # a stopped trial leaves nothing to resume
    assert Path(trials[0].user_attrs["artifact"], "meta.json").is_file()
    best = yaml.safe_load((exp / "best.yaml").read_text())
    assert best["trials_finished"] == 1 and best["trials_pruned"] == 3
    assert best["best"]["params"] == {"optim.lr": 1e-3}
    # the results people read, and `cmkg report tune` rebuilding them from the study alone
    table = pq.read_table(exp / "trials.parquet").to_pylist()
    assert [(r["number"], r["state"], r["params_optim.lr"]) for r in table] == [
        (t.number, t.state.name, t.params["optim.lr"]) for t in trials]
    assert table[0]["test_epe_mm"] > 0 and table[0]["artifact"] and table[0]["epochs"] == 3
    assert table[1]["test_epe_mm"] is None and table[1]["val_epe_mm"] == trials[1].value
    assert all(r["wall_s"] > 0 for r in table)
    pngs = {p.stem for p in exp.glob("*.png")}
    assert pngs == set(PLOTS) - {"param_importances"}  # one parameter: no importances
    for name in ["trials.parquet", *(f"{p}.png" for p in pngs)]:
        (exp / name).unlink()
    assert cli.main(["report", "tune", str(exp)]) == 0
    assert {p.stem for p in exp.glob("*.png")} == pngs
    assert pq.read_table(exp / "trials.parquet").to_pylist() == table


@pytest.mark.ray
def test_median_pruner_and_budgets_end_a_sweep_with_its_summary(local_ray, data_root, tmp_path,
                                                               capsys):
    """Optuna's median pruner (through the study's pruner) prunes the diverging trial; --trials 2
    beats the file's 5; a time budget stops the sweep, whose trials all end COMPLETE or PRUNED,
    and the summary is still written."""
    space = tmp_path / "lr.yaml"
    space.write_text(LR_SPACE + "scheduler: {optuna_pruner: {median: {n_startup_trials: 1}}}\n")
    out = tmp_path / "runs"
    assert cli.main(["tune", str(space), *_tiny(data_root, out), "--trials", "2"]) == 0
    err = capsys.readouterr().err
    exp, study = _study(out)
    assert [(t.params["optim.lr"], t.state.name) for t in study.trials] == [
        (1e-3, "COMPLETE"), (1e-2, "PRUNED")]
    assert study.trials[1].user_attrs["epochs"] == 1 and "trial 2/2 PRUNED at epoch 1" in err
    best = yaml.safe_load((exp / "best.yaml").read_text())
    assert best["trials_finished"] == 1 and best["trials_pruned"] == 1
    assert len(pq.read_table(exp / "trials.parquet")) == 2
    # a time budget far below 5 trials' worth: the sweep stops, its trials settled and summarised
    out = tmp_path / "budget"
    code = cli.main(["tune", str(space), *_tiny(data_root, out), "--time-budget", "4"])
    err = capsys.readouterr().err
    exp, study = _study(out)
    states = [t.state.name for t in study.trials]
    assert len(states) < 5 and set(states) <= {"COMPLETE", "PRUNED"}, states
    assert code == (0 if "COMPLETE" in states else 2)
    if code == 2:
        assert "no trial finished within the time budget" in err
    for name in ("best.yaml", "trials.csv", "trials.parquet"):
        assert (exp / name).is_file(), name
    assert yaml.safe_load((exp / "best.yaml").read_text())["trials_pruned"] == states.count(
        "PRUNED")


@pytest.mark.parametrize("entry, key", [
    ("scheduler: {asha: {grace_period: 3, max_t: 3, reduction_factor: 1}}",
     "scheduler.asha.reduction_factor: must be a number > 1"),
    ("scheduler: {asha: {grace_period: 4, max_t: 3}}", "scheduler.asha.grace_period: 4 is above"),
    ("scheduler: {asha: {grace_period: 1.5}}", "scheduler.asha.grace_period: must be an integer"),
    ("scheduler: {asha: {max_t: 2}}", "scheduler.asha.max_t: 2 is below epochs.target=3"),
    ("scheduler: {hyperband: {}}", "scheduler: expected {asha"),
    ("scheduler: {optuna_pruner: {median: {n_warmup_steps: -1}}}",
     "scheduler.optuna_pruner.median.n_warmup_steps: must be an integer >= 0"),
    ("time_budget_s: 0", "time_budget_s: must be a number of seconds > 0"),
    ("--trials 0", "trials (--trials): must be an integer >= 1, got 0"),
    ("--time-budget -5", "time_budget_s (--time-budget): must be a number of seconds > 0"),
])
def test_bad_scheduler_or_budget_exits_2_before_any_trial(tmp_path, capsys, entry, key):
    space = tmp_path / "lr.yaml"
    flags = entry.split() if entry.startswith("--") else []
    space.write_text(LR_SPACE + ("" if flags else entry + "\n"))
    out = tmp_path / "runs"
    assert cli.main(["tune", str(space), *_tiny(tmp_path / "data", out), *flags]) == 2
    err = capsys.readouterr().err
    assert f"invalid config ({space})" in err and key in err, err
    assert not out.exists()  # nothing ran: no Ray, no study, no data


def test_trials_table_and_plots_from_a_study(tmp_path):
    """The table and plots come from the study alone: recorded metrics where the sweep left
    them, else the study's own data; importances once two trials finished over two parameters;
    a plot the study cannot have yet is removed rather than left stale."""
    study = optuna.create_study(study_name="s")
    study.set_user_attr("metric", "val_epe_mm")
    for i, (lr, cap) in enumerate([(1e-3, 3), (1e-2, "auto"), (3e-3, 10)]):
        study.enqueue_trial({"optim.lr": lr, "regularizer.d_cap": cap})
        trial = study.ask()
        trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("regularizer.d_cap", [3, 10, "auto"])
        trial.report(50.0 - i, 1)
        if i == 1:  # stopped at epoch 1, nothing recorded: the study's own data fill in
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        trial.set_user_attr("metrics", {"val_epe_mm": 40.0 - i, "test_epe_mm": 41.0 - i})
        trial.set_user_attr("epochs", 3)
        trial.set_user_attr("artifact", f"runs/target/{i}")
        study.tell(trial, 40.0 - i)
    (tmp_path / "param_importances.png").write_bytes(b"stale")
    written = write_results(study, tmp_path)
    assert {p.name for p in written} == {"trials.parquet", "README.md",
                                         *(f"{p}.png" for p in PLOTS)}
    assert all(p.stat().st_size > 1000 for p in written if p.suffix != ".md")
    assert "| 1 | PRUNED |" in (tmp_path / "README.md").read_text()
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [(r["state"], r["epochs"], r["val_epe_mm"], r["test_epe_mm"]) for r in rows] == [
        ("COMPLETE", 3, 40.0, 41.0), ("PRUNED", 1, 49.0, None), ("COMPLETE", 3, 38.0, 39.0)]
    assert [r["params_regularizer.d_cap"] for r in rows] == ["3", "auto", "10"]  # one type
    assert rows[1]["value"] == 49.0 and rows[1]["artifact"] is None
    # one finished trial fewer: no importances, and the old PNG goes
    study2 = optuna.create_study(study_name="s2")
    for t in study.trials[:2]:
        study2.add_trial(t)
    assert "param_importances" not in {p.stem for p in write_results(study2, tmp_path)}
    assert not (tmp_path / "param_importances.png").exists()
