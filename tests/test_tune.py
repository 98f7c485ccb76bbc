"""Sweeps: search-space files, Optuna's define-by-run sampling, a trial's config, the sweep
modules' import graph, and `cmkg tune` end to end on a Ray started by the test (Ray Tune
trials, Optuna study in SQLite, resume, best.yaml)."""

import ast
import copy
import json
import shlex
import sqlite3
from pathlib import Path

import optuna
import pytest
import yaml

from cmkg import cli
from cmkg.cluster.spaces import apply_params, load_space, trial_config
from cmkg.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "tune_spaces"


def _space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_load():
    for path in sorted(SPACES.glob("*.yaml")):
        space = load_space(path, "smoke")
        assert space.params and space.stage in ("kd", "target"), path


def test_bad_space_names_file_and_keys(tmp_path):
    path = _space(tmp_path, """
stage: target
trails: 3
params:
  meta.betta: {float: [1.0e-5, 1.0e-1], log: true}
  optim.lr: {float: [0.1, 0.01]}
  regularizer.sigma: {float: [1.0e-6, 1.0e-2], when: {regularizer.form: [l2]}}
  regularizer.form: {choice: [l2, nonsense]}
""")
    with pytest.raises(ConfigError) as e:
        load_space(path, "smoke")
    text = str(e.value)
    assert str(path) in text
    for key in ("trails: unknown key", "params.optim.lr.float", "params.regularizer.sigma.when"):
        assert key in text, key
    # the ranges were fine in a second file; then each value is tried against the config
    path = _space(tmp_path, """
stage: target
params:
  meta.betta: {float: [1.0e-5, 1.0e-1], log: true}
  regularizer.form: {choice: [l2, nonsense]}
""")
    with pytest.raises(ConfigError) as e:
        load_space(path, "smoke")
    assert "params.meta.betta" in str(e.value) and "params.regularizer.form='nonsense'" in str(e.value)


def test_renamed_and_misspelt_keys_say_what_to_write(tmp_path):
    path = _space(tmp_path, """
stage: target
cpus_per_trial: 2
gpus_per_trial: 1
concurency: 2
params:
  optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
""")
    with pytest.raises(ConfigError) as e:
        load_space(path, "smoke")
    text = str(e.value)
    assert "cpus_per_trial: renamed; write cpus_per_worker" in text
    assert "gpus_per_trial: renamed; write gpus_per_worker" in text
    assert "concurency: unknown key (did you mean 'concurrency'?)" in text


def test_command_line_resources_override_the_space_and_do_not_name_the_sweep(tmp_path):
    space = load_space(SPACES / "smoke.yaml", "smoke")
    assert (space.cpus_per_worker, space.gpus_per_worker, space.cli) == (1, 0.0, {})
    space = load_space(SPACES / "smoke.yaml", "smoke", cpus_per_worker=2, gpus_per_worker=0.5)
    assert (space.cpus_per_worker, space.gpus_per_worker, space.cli) == (2, 0.5, {})
    space = load_space(SPACES / "smoke.yaml", "smoke", trials=5)
    assert space.trials == 5 and space.cli == {"trials": 5}  # a budget names a sweep of its own
    with pytest.raises(ConfigError) as e:
        load_space(SPACES / "smoke.yaml", "smoke", cpus_per_worker=-1, gpus_per_worker=-1)
    assert "cpus_per_worker (--cpus-per-worker): must be an integer >= 0" in str(e.value)
    assert "gpus_per_worker (--gpus-per-worker): must be a number >= 0" in str(e.value)


def test_trial_config_sets_the_sampled_keys_on_the_base_dict(monkeypatch):
    from cmkg import config

    base = config.load("smoke").to_dict()
    kept = copy.deepcopy(base)
    built = []
    from_dict = config.from_dict
    monkeypatch.setattr(config, "from_dict", lambda d, s="": built.append(s) or from_dict(d, s))
    cfg = trial_config(base, {"optim.lr": 3e-3, "distill.losses": ["act"],
                              "data.augment.num": 100,
                              "data.augment.size": base["data"]["source"]["size"]}, "space.yaml")
    assert built == ["space.yaml"] and base == kept  # one from_dict; the base is not touched
    assert cfg.optim.lr == 3e-3 and cfg.distill.losses == ["act"] and cfg.data.augment.num == 100
    with pytest.raises(ConfigError, match="optim.lr.x: lr is not a config section"):
        apply_params(base, {"optim.lr.x": 1}, "space.yaml")


def test_a_trial_builds_its_config_once_and_a_stopped_one_drops_its_checkpoint(
        monkeypatch, tmp_path, capsys):
    """The trial function without Ray: its config is the base dict with the sampled (decoded)
    parameters, its threads and no progress bar, built by one from_dict; when Tune stops it
    inside an epoch report, the stage's partial folder goes and the stop goes on."""
    from types import SimpleNamespace

    from ray import tune

    from cmkg import config, stages
    from cmkg.cluster import tune as sweep

    base = config.load("smoke", [f"run.store={tmp_path / 'runs'}"]).to_dict()
    kept = copy.deepcopy(base)
    built, seen, reports = [], [], []
    from_dict = config.from_dict
    monkeypatch.setattr(config, "from_dict", lambda d, s="": built.append(s) or from_dict(d, s))
    monkeypatch.setattr(stages, "plan", lambda stage, cfg: [SimpleNamespace(key="k" * 40)])
    store = stages.Store.of(config.from_dict(base))
    store.partial("target", "k" * 40).mkdir(parents=True)

    def run_stage(stage, cfg, on_epoch):
        seen.append(cfg)
        on_epoch(1, {"epoch": 1, "val": {"epe_mm": 9.0, "auc_20_50": 0.5}})

    def report(metrics):
        reports.append(metrics)
        raise SystemExit(0)  # what Ray's session does in a trial Tune stops

    monkeypatch.setattr(stages, "run_stage", run_stage)
    monkeypatch.setattr(tune, "report", report)
    built.clear()
    with pytest.raises(SystemExit):
        sweep._trial({"optim": {"lr": 3e-3}, "distill": {"losses": '["act"]'}}, base=base,
                     stage="target", threads=1, source="space.yaml",
                     decode={"distill.losses": {'["act"]': ["act"]}})
    (cfg,) = seen
    assert built == ["space.yaml"] and base == kept
    assert (cfg.optim.lr, cfg.distill.losses, cfg.run.threads, cfg.run.progress) == (
        3e-3, ["act"], 1, "none")
    assert reports == [{"val_epe_mm": 9.0, "val_auc_20_50": 0.5, "epoch": 1}]
    assert not store.partial("target", "k" * 40).exists()
    assert "the sweep stopped this trial after epoch 1; removed its checkpoint" in (
        capsys.readouterr().err)


def _cluster_imports() -> dict[str, set[str]]:
    """cmkg.cluster module -> the cmkg.cluster modules it imports (anywhere in it)."""
    folder = ROOT / "cmkg" / "cluster"
    mods = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for m in mods:
        names = []
        for node in ast.walk(ast.parse((folder / f"{m}.py").read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        graph[m] = {n.split(".")[2] for n in names
                    if n.startswith("cmkg.cluster.") and n.split(".")[2] in mods} - {m}
    return graph


def test_the_space_format_and_the_results_need_neither_ray_nor_its_adapter():
    """(No import cycle anywhere in cmkg: tests/test_layout.py.)"""
    graph = _cluster_imports()
    assert not graph["spaces"] and graph["tune_results"] == {"spaces"}


CONDITIONAL = """stage: target
params:
  regularizer.form: {choice: [none, l2, weighted_l2, weighted_l1]}
  regularizer.sigma: {float: [1.0e-6, 3.0], log: true, when: {regularizer.form: [l2]}}
  regularizer.phi_param: {choice: [free, softplus], when: {regularizer.form: [weighted_l2, weighted_l1]}}
  regularizer.phi_init: {float: [1.0e-7, 1.0e-3], log: true, when: {regularizer.phi_param: [softplus]}}
  meta.beta: {float: [1.0e-9, 1.0e+8], log: true, when: {regularizer.form: [weighted_l2, weighted_l1]}}
  meta.inner_steps: {int: [1, 3], when: {regularizer.form: [weighted_l2, weighted_l1]}}
"""


def test_define_by_run_samples_conditional_parameters(tmp_path):
    space = load_space(_space(tmp_path, CONDITIONAL), "smoke")
    beta = next(q for q in space.params if q.name == "meta.beta")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        space.define_by_run(trial)
        p = trial.params
        seen.add(p["regularizer.form"])
        learned = p["regularizer.form"].startswith("weighted")
        assert ("meta.beta" in p) == learned and ("meta.inner_steps" in p) == learned
        assert ("regularizer.sigma" in p) == (p["regularizer.form"] == "l2")
        assert ("regularizer.phi_init" in p) == (p.get("regularizer.phi_param") == "softplus")
        if learned:
            assert beta.low <= p["meta.beta"] <= beta.high and p["meta.inner_steps"] in (1, 2, 3)
        study.tell(trial, 0.0)
    assert seen == {"none", "l2", "weighted_l2", "weighted_l1"}
    # a when over two earlier parameters holds only where both do (prior.yaml: beta for Adam
    # on free phi)
    prior = load_space(SPACES / "prior.yaml", "smoke")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        prior.define_by_run(trial)
        p = trial.params
        assert ("meta.beta" in p) == (p["meta.phi_optimizer"] == "adam"
                                      and p["regularizer.phi_param"] == "free")
        study.tell(trial, 0.0)
    # list-valued choices travel through Optuna as JSON and come back as lists
    distill = load_space(SPACES / "distill.yaml", "smoke")
    trial = optuna.create_study().ask()
    distill.define_by_run(trial)
    assert trial.params["distill.losses"] in ('["act"]', '["att"]', '["act", "att"]')
    assert distill.decoders()["distill.losses"][trial.params["distill.losses"]] in (
        ["act"], ["att"], ["act", "att"])


def _tiny(tmp_path) -> list[str]:
    return ["--config", "smoke", "--set", "data.source.num=240", "--set", "data.target.num=120",
            "--set", "optim.batch_size=16", "--set", "epochs.target=2",
            "--set", f"data.root={tmp_path / 'data'}"]


@pytest.mark.ray
def test_tune_runs_resumes_and_best_retrains(local_ray, tmp_path, capsys):
    args = [*_tiny(tmp_path), "--store", str(tmp_path / "runs")]
    space = str(SPACES / "smoke.yaml")
    assert cli.main(["tune", space, *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    exp = next((tmp_path / "runs" / "_tune").glob("smoke-*"))
    best = yaml.safe_load((exp / "best.yaml").read_text())
    assert best == summary and best["trials_finished"] == 3
    with sqlite3.connect(exp.parent / "optuna.db") as db:
        states = [s for (s,) in db.execute("select state from trials")]
        params = db.execute("select trial_id, param_name from trial_params").fetchall()
    assert states == ["COMPLETE"] * 3
    forms = {t for t, name in params if name == "regularizer.form"}
    sigmas = {t for t, name in params if name == "regularizer.sigma"}
    assert len(forms) == 3 and sigmas < forms  # sigma only where form is l2 (conditional)
    # the best is the minimum of what the trials reported
    import csv

    rows = list(csv.DictReader((exp / "trials.csv").open()))
    assert best["best"]["metrics"]["val_epe_mm"] == pytest.approx(
        min(float(r["val_epe_mm"]) for r in rows))
    # the same command again refuses (exit 2); with --resume it finds the finished sweep
    assert cli.main(["tune", space, *args]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["tune", space, *args, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["trials_finished"] == 3
    with sqlite3.connect(exp.parent / "optuna.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 3
    # best.yaml's command retrains nothing: it names the best trial's artifact exactly, once
    # this machine's store and data root are added (best.yaml names no folder of its machine)
    retrain = shlex.split(best["retrain"])
    assert retrain[:3] == ["cmkg", "train", "target"]
    assert str(tmp_path) not in best["retrain"] and str(tmp_path) not in str(best["overrides"])
    assert cli.main([*retrain[1:], "--store", str(tmp_path / "runs"),
                     "--set", f"data.root={tmp_path / 'data'}"]) == 0
    assert best["best"]["metrics"]["artifact"] in capsys.readouterr().out


@pytest.mark.ray
def test_tune_with_a_store_on_s3(local_ray, tmp_path, s3_uri, capsys):
    """Trials publish into the S3 store and Ray Tune keeps its experiment there; the study and
    the summary files live in this machine's mirror of the store."""
    import pyarrow.fs as pafs

    from cmkg import storage

    uri = s3_uri("runs")
    mirror = tmp_path / "mirror"
    args = [*_tiny(tmp_path), "--store", uri, "--set", f"run.cache={mirror}"]
    assert cli.main(["tune", str(SPACES / "smoke.yaml"), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials_finished"] == 3 and summary["best"]["metrics"]["artifact"].startswith(
        "s3://")
    exp = next((mirror / "_tune").glob("smoke-*"))
    assert (exp.parent / "optuna.db").is_file() and (exp / "best.yaml").is_file()
    fs, base = storage.open_uri(uri)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File]
    assert any(p.startswith(f"{base}/_tune/{exp.name}/") for p in files)  # Ray Tune's state
    assert sum(p.startswith(f"{base}/target/") and p.endswith("/meta.json") for p in files) >= 1
