"""Sweeps over several seeds, enqueued points, the store's shared Optuna storage and the summary
copied for a report: `seeds: k` scores a trial by the mean of its seeds' validation metric and
shares each seed's upstream stages between trials, `enqueue:` points are the first trials, in
order (a bad one is refused before any trial, naming `enqueue[i].key`), every sweep of a store is
one study in `{store}/_tune/optuna.db` with its metric named, and `cmkg report tune --report`
writes the summary (best.yaml's `set`, the trials as README.md, CSV and Parquet, plots) into a
report folder."""

import json
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from cmkg import cli
from cmkg.cluster.spaces import load_space
from cmkg.config import ConfigError

SEEDS_SPACE = """stage: target
metric: val_epe_mm
trials: 3
concurrency: 1
cpus_per_worker: 1
sampler: random
seed: 0
seeds: 2
set: [regularizer.form=weighted_l2, epochs.teacher=1, epochs.student=1, epochs.meta=1,
      epochs.target=1]
params:
  regularizer.sign: {choice: [learned, positive]}
  regularizer.strength: {float: [1.0, 1.0e+6], log: true}
enqueue:
  - {regularizer.sign: learned, regularizer.strength: 1.0e+3}
  - {regularizer.sign: learned, regularizer.strength: 10.0}
"""
AUC_SPACE = """stage: target
metric: val_auc_20_50
trials: 1
cpus_per_worker: 1
sampler: random
set: [regularizer.form=none, epochs.target=1]
params:
  optim.lr: {choice: [1.0e-3]}
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the synthetic sets, rendered once per module


def _tiny(data_root, store) -> list[str]:
    return ["--config", "smoke", "--set", "data.source.num=240", "--set", "data.target.num=120",
            "--set", "optim.batch_size=16", "--set", "data.source.size=32",
            "--set", "data.target.size=32", "--set", f"data.root={data_root}",
            "--store", str(store)]


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_seeds_and_enqueue_are_read_and_checked(tmp_path):
    space = load_space(_write(tmp_path, "s.yaml", SEEDS_SPACE), "smoke")
    assert space.seeds == [0, 1]
    assert space.fixed_points() == [{"regularizer.sign": "learned", "regularizer.strength": 1000.0},
                                    {"regularizer.sign": "learned", "regularizer.strength": 10.0}]
    listed = SEEDS_SPACE.replace("seeds: 2", "seeds: [3, 5]")
    assert load_space(_write(tmp_path, "l.yaml", listed), "smoke").seeds == [3, 5]
    assert load_space(_write(tmp_path, "n.yaml", AUC_SPACE), "smoke").seeds is None
    bad = SEEDS_SPACE.replace("seeds: 2", "seeds: 0").replace(
        "params:", "params:\n  run.seed: {int: [0, 3]}")
    with pytest.raises(ConfigError) as e:
        load_space(_write(tmp_path, "b.yaml", bad), "smoke")
    assert "seeds: expected a number of seeds >= 1" in str(e.value)
    bad = SEEDS_SPACE.replace("params:", "params:\n  run.seed: {int: [0, 3]}")
    with pytest.raises(ConfigError, match="params.run.seed: the space's seeds: sets run.seed"):
        load_space(_write(tmp_path, "b.yaml", bad), "smoke")


def test_a_bad_enqueue_point_exits_2_naming_file_and_key(tmp_path, capsys):
    bad = SEEDS_SPACE.replace(
        "  - {regularizer.sign: learned, regularizer.strength: 10.0}",
        "  - {regularizer.sign: learned, regularizer.strenght: 10.0}\n"
        "  - {regularizer.sign: negative}\n"
        "  - {regularizer.strength: 1.0e+7}")
    path = _write(tmp_path, "bad.yaml", bad)
    assert cli.main(["tune", path, "--config", "smoke", "--store", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert path in err
    assert "enqueue[1].regularizer.strenght: not a parameter of this space" in err
    assert "enqueue[2].regularizer.sign: 'negative' is not one of ['learned', 'positive']" in err
    assert "enqueue[3].regularizer.strength: 10000000.0 is outside [1, 1e+06]" in err
    assert not (tmp_path / "runs" / "_tune").exists()  # refused before any trial or study
    # a value the config refuses, found with the point's other values
    bad = SEEDS_SPACE.replace("regularizer.strength: {float: [1.0, 1.0e+6], log: true}",
                              "optim.lr: {float: [-1.0, 1.0]}").replace(
        "regularizer.strength: 1.0e+3", "optim.lr: -0.5").replace(
        "regularizer.strength: 10.0", "optim.lr: 0.1")
    path = _write(tmp_path, "bad2.yaml", bad)
    assert cli.main(["tune", path, "--config", "smoke"]) == 2
    assert "enqueue[0].optim.lr: must be > 0" in capsys.readouterr().err


@pytest.mark.ray
def test_seeds_enqueue_shared_storage_and_report(local_ray, data_root, tmp_path, capsys):
    store = tmp_path / "runs"
    space = _write(tmp_path, "seeds.yaml", SEEDS_SPACE)
    assert cli.main(["tune", space, *_tiny(data_root, store)]) == 0
    summary = json.loads(capsys.readouterr().out)
    sweep = next((store / "_tune").glob("seeds-*"))
    shared = store / "_tune" / "optuna.db"
    assert shared.is_file() and not (sweep / "optuna.db").exists()
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{shared}")
    trials = sorted(study.trials, key=lambda t: t.datetime_start)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    # the enqueued points are the first trials, in order
    assert [trials[0].params, trials[1].params] == [
        {"regularizer.sign": "learned", "regularizer.strength": 1000.0},
        {"regularizer.sign": "learned", "regularizer.strength": 10.0}]
    # a trial's value is the mean of its two seeds' best validation EPE, read from the stages
    for t in trials:
        per_seed = t.user_attrs["per_seed"]
        assert sorted(per_seed) == ["0", "1"]
        vals = []
        for seed, m in per_seed.items():
            folder = Path(m["artifact"])
            assert yaml.safe_load((folder / "config.yaml").read_text())["run"]["seed"] == int(seed)
            assert yaml.safe_load((folder / "config.yaml").read_text())["regularizer"]["sign"] == (
                t.params["regularizer.sign"])
            vals.append(json.loads((folder / "metrics.json").read_text())["best_val_epe_mm"])
            assert m["val_epe_mm"] == vals[-1]
        assert t.value == pytest.approx(sum(vals) / 2)
    # each seed's teacher, student and meta stage trained once, by the first trial: the later
    # trials took them from the store (cache hits)
    second_started = trials[1].datetime_start.timestamp()
    for stage in ("teacher", "student", "meta"):
        published = sorted((store / stage).glob("*/meta.json"))
        assert len(published) == 2, stage  # one per seed
        assert all(p.stat().st_mtime < second_started for p in published), stage
    assert len(list((store / "target").glob("*/meta.json"))) == len(
        {(t.params["regularizer.sign"], t.params["regularizer.strength"]) for t in trials}) * 2
    # best.yaml: what a table row applies (set), and the sweep, metric, value and seeds that chose
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best == summary
    assert best["sweep"] == sweep.name and best["metric"] == "val_epe_mm"
    assert best["seeds"] == [0, 1] and best["value"] == pytest.approx(study.best_value)
    assert best["set"] == {"regularizer.form": "weighted_l2", "epochs.teacher": 1,
                           "epochs.student": 1, "epochs.meta": 1, "epochs.target": 1,
                           **study.best_params}
    assert [s["seed"] for s in best["best"]["per_seed"]] == [0, 1]
    assert best["best"]["number"] == study.best_trial.number
    # trials.parquet keeps each seed's values
    rows = pq.read_table(sweep / "trials.parquet").to_pylist()
    for r in rows:
        assert r["val_epe_mm"] == pytest.approx((r["val_epe_mm_seed0"] + r["val_epe_mm_seed1"]) / 2)

    # a second sweep in the same store: a second study in the same database, its metric named
    auc = _write(tmp_path, "auc.yaml", AUC_SPACE)
    assert cli.main(["tune", auc, *_tiny(data_root, store)]) == 0
    capsys.readouterr()
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{shared}")}
    other = next((store / "_tune").glob("auc-*")).name
    assert names == {sweep.name, other}
    assert optuna.load_study(study_name=sweep.name,
                             storage=f"sqlite:///{shared}").metric_names == ["val_epe_mm"]
    assert optuna.load_study(study_name=other,
                             storage=f"sqlite:///{shared}").metric_names == ["val_auc_20_50"]

    # the summary copied for a report: artifacts named as the store names them
    out = tmp_path / "reports" / "sweeps" / "seeds"
    assert cli.main(["report", "tune", str(sweep), "--report", str(out)]) == 0
    capsys.readouterr()
    for name in ("best.yaml", "README.md", "trials.csv", "trials.parquet",
                 "optimization_history.png"):
        assert (out / name).is_file(), name
    copied = yaml.safe_load((out / "best.yaml").read_text())
    assert copied["set"] == best["set"] and copied["best"]["metrics"]["artifact"].startswith(
        "target/")
    assert all(r["artifact"].startswith("target/")
               for r in pq.read_table(out / "trials.parquet").to_pylist())
    assert str(tmp_path) not in (out / "trials.csv").read_text()
    assert f"Sweep {sweep.name}" in (out / "README.md").read_text()
