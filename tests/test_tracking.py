"""Experiment tracking (``run.tracking``, cmkg/tracking.py): a real MLflow server receives a
stage and a two-trial sweep, nested under their commands' runs, and gives them back through
MLflow's client; TensorBoard's own event reader finds a stage's per-epoch scalars; a dead
server costs one warning line and no stage; tracking enters no stage key."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cmkg import cli, config, stages, tracking
from cmkg.ablation.results import fingerprint
from cmkg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path) -> list[str]:
    """A few seconds per stage: 32 px, 120 source / 100 target samples, 2 epochs."""
    return ["--config", "smoke", "--set", "data.source.num=120", "--set", "data.target.num=100",
            "--set", "data.source.size=32", "--set", "data.target.size=32",
            "--set", "optim.batch_size=16", "--set", "epochs.teacher=2",
            "--set", "epochs.target=2", "--set", "run.progress=none",
            "--set", f"data.root={tmp_path / 'data'}", "--store", str(tmp_path / "runs")]


@pytest.fixture(autouse=True)
def _fresh_tracking(monkeypatch):
    """Each test starts with tracking as a fresh process has it: not yet failed (a failure
    turns tracking off for the rest of the process), no trackers made, no context."""
    monkeypatch.setattr(tracking, "_off", [])
    monkeypatch.setattr(tracking, "_trackers", {})
    monkeypatch.setattr(tracking, "_context", None)
    monkeypatch.delenv(tracking.ENV, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (a free port, SQLite backend) in a process group of its
    own; yields its URL once it answers, then stops the group."""
    pytest.importorskip("mlflow")
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _runs(client) -> list:
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert exp is not None
    return client.search_runs([exp.experiment_id], max_results=1000)


def _steps(client, run, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))


@pytest.mark.ray
def test_mlflow_server_holds_a_stage_and_a_sweep_nested_under_their_commands(
        local_ray, tmp_path, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    on = ["--set", "run.tracking.backend=mlflow", "--set", f"run.tracking.uri={mlflow_server}"]
    assert cli.main(["train", "teacher", *_tiny(tmp_path), *on]) == 0
    assert cli.main(["tune", str(ROOT / "tune_spaces" / "smoke.yaml"), *_tiny(tmp_path), *on,
                     "--trials", "2"]) == 0
    err = capsys.readouterr().err
    assert "cmkg: warning: tracking failed" not in err, err

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = _runs(client)
    by_name = {r.info.run_name: r for r in runs}
    parent = lambda r: r.data.tags.get("mlflow.parentRunId")  # noqa: E731

    # cmkg train: its command's run, the teacher's run under it
    train = by_name["cmkg train teacher"]
    (teacher,) = [r for r in runs if r.data.tags.get("stage") == "teacher"]
    assert parent(teacher) == train.info.run_id and parent(train) is None
    assert teacher.info.status == train.info.status == "FINISHED"
    art = stages.Store(tmp_path / "runs").get("teacher", teacher.data.tags["key"])
    assert art is not None  # the tagged key is the published artifact's
    assert teacher.data.tags["seed"] == "0" and teacher.data.tags["artifact"] == str(art.path)
    assert teacher.data.params["optim.batch_size"] == "16"
    assert teacher.data.params["data.source.num"] == "120"
    m = art.metrics
    history = _steps(client, teacher, "val/epe_mm")
    assert history == [(h["epoch"], pytest.approx(h["val"]["epe_mm"])) for h in m["history"]]
    assert [s for s, _ in _steps(client, teacher, "train/loss")] == [1, 2]
    assert teacher.data.metrics["test/epe_mm"] == pytest.approx(m["test"]["epe_mm"])

    # cmkg tune: the sweep's run, two trials under it, each trial's target stage under it
    (sweep,) = [r for r in runs if r.info.run_name.startswith("cmkg tune smoke")]
    name = sweep.data.tags["sweep"]
    assert name.startswith("smoke-")
    trials = [r for r in runs if parent(r) == sweep.info.run_id]
    assert len(trials) == 2 and {r.data.tags["sweep"] for r in trials} == {name}
    assert len({r.data.tags["trial"] for r in trials}) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.params["regularizer.form"] in ("none", "l2")
        assert "val_epe_mm" in trial.data.metrics
        (stage,) = [r for r in runs if parent(r) == trial.info.run_id]
        tags = stage.data.tags
        assert (tags["stage"], tags["sweep"], tags["trial"]) == (
            "target", name, trial.data.tags["trial"])
        assert stage.data.params["regularizer.form"] == trial.data.params["regularizer.form"]
        assert [s for s, _ in _steps(client, stage, "val/epe_mm")] == [1, 2]
        assert [s for s, _ in _steps(client, stage, "train/loss")] == [1, 2]
        assert stage.data.metrics["test/epe_mm"] > 0


def test_tensorboard_event_files_hold_each_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.main(["train", "teacher", *_tiny(tmp_path),
                     "--set", "run.tracking.backend=tensorboard"]) == 0
    (folder,) = (tmp_path / "runs" / "tensorboard").iterdir()
    (art,) = [a for a in (tmp_path / "runs" / "teacher").iterdir() if a.is_dir()]
    metrics = json.loads((art / "metrics.json").read_text())
    assert folder.name == f"teacher-{art.name[:12]}"
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ("train/loss", "train/reg", "val/epe_mm", "train_eval/epe_mm", "test/epe_mm"):
        assert name in scalars, (name, scalars)
    val = [(e.step, e.value) for e in events.Scalars("val/epe_mm")]
    assert val == [(h["epoch"], pytest.approx(h["val"]["epe_mm"], rel=1e-6))
                   for h in metrics["history"]]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as text


def test_a_dead_server_costs_one_warning_and_no_stage(tmp_path, capsys):
    pytest.importorskip("mlflow")
    port = _free_port()  # closed again: nothing listens there
    assert cli.main(["train", "teacher", *_tiny(tmp_path), "--set", "epochs.teacher=1",
                     "--set", "run.tracking.backend=mlflow",
                     "--set", f"run.tracking.uri=http://127.0.0.1:{port}"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "cmkg: warning: tracking failed" in warnings[0], err
    assert f"127.0.0.1:{port}" in warnings[0]
    (art,) = [a for a in (tmp_path / "runs" / "teacher").iterdir() if a.is_dir()]
    assert (art / "meta.json").is_file() and (art / "model.pt").is_file()


def test_tracking_enters_no_key_and_no_fingerprint(tmp_path):
    base = ["data.source.num=120", "data.target.num=100", f"data.root={tmp_path}",
            "regularizer.form=weighted_l2"]
    off = config.load("smoke", base)
    for extra in (["run.tracking.backend=mlflow", "run.tracking.uri=http://host:5000"],
                  ["run.tracking.backend=tensorboard", f"run.tracking.uri={tmp_path / 'tb'}"]):
        on = config.load("smoke", base + extra)
        assert on.run.tracking != off.run.tracking
        for stage in stages.STAGES:
            assert [n.key for n in stages.plan(stage, on)] == [
                n.key for n in stages.plan(stage, off)], stage
        assert fingerprint(on) == fingerprint(off)


def test_bad_tracking_entries_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        config.load("smoke", ["run.tracking.backend=wandb", "run.tracking.uri=''"])
    text = str(e.value)
    assert "run.tracking.backend: must be one of none, mlflow, tensorboard, got 'wandb'" in text
    assert "run.tracking.uri" in text
    with pytest.raises(ConfigError) as e:
        config.load("smoke", ["run.tracking.backnd=mlflow"])
    assert "run.tracking.backnd" in str(e.value)
    assert cli.main(["train", "teacher", "--store", str(tmp_path),
                     "--set", "run.tracking.backend=wandb"]) == 2
    assert "run.tracking.backend" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_each_uri_form_of_the_docs(tmp_path, capsys):
    """A folder (a path or file://) becomes a SQLite database inside it, which MLflow opens (it
    refuses a file store); a server or database URI passes through; a scheme the backend cannot
    use is exit 2 naming run.tracking.uri, before anything trains."""
    folder = tmp_path / "tracked"
    for given in (str(folder), f"file://{folder}"):
        assert tracking.resolve_uri("mlflow", given, tmp_path) == f"sqlite:///{folder / 'mlflow.db'}"
    for server in ("http://host:5000", "https://h/x", "postgresql://u@h/db",
                   f"sqlite:///{tmp_path / 'x.db'}", "databricks://profile"):
        assert tracking.resolve_uri("mlflow", server, tmp_path) == server
    assert tracking.resolve_uri("tensorboard", f"file://{folder}", tmp_path) == str(folder)
    assert tracking.resolve_uri("mlflow", None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the folder form works end to end: MLflow writes its runs into folder/mlflow.db
    cfg = config.load("smoke", ["run.tracking.backend=mlflow", f"run.tracking.uri={folder}"])
    with tracking.command(cfg, tmp_path / "store", "cmkg train", {}) as run:
        assert run is not None and run.id
    assert (folder / "mlflow.db").stat().st_size > 0
    assert "tracking failed" not in capsys.readouterr().err
    for backend, bad in (("mlflow", "s4://bucket/x"), ("tensorboard", "http://host:6006")):
        sets = [f"run.tracking.backend={backend}", f"run.tracking.uri={bad}"]
        with pytest.raises(ConfigError, match="run.tracking.uri"):
            config.load("smoke", sets)
        store = tmp_path / f"never-{backend}"
        assert cli.main(["train", "teacher", "--store", str(store),
                         *sum((["--set", x] for x in sets), [])]) == 2
        assert "run.tracking.uri" in capsys.readouterr().err and not store.exists()


def test_a_missing_package_says_which_extra(monkeypatch):
    monkeypatch.setattr(tracking, "missing_package", lambda backend: backend)
    with pytest.raises(ConfigError) as e:
        config.load("smoke", ["run.tracking.backend=tensorboard"])
    assert "run.tracking.backend: tensorboard needs the tensorboard package" in str(e.value)
    assert "pip install -e '.[tracking]'" in str(e.value)


def test_the_context_carries_parent_and_cell_tags_to_a_worker(monkeypatch, tmp_path):
    """What the ablation runner and its Ray tasks do, without Ray: the command's parent run,
    the tables and rows of the cells a stage serves (annotate_cells, for_node), through JSON as
    across processes, onto the stage's run; a failure in the command's process turns the
    workers' tracking off without a second warning."""
    from types import SimpleNamespace

    started = []

    class Recording(tracking.Tracker):
        def start_run(self, name, tags, parent=None, folder=None):
            started.append((name, tags, parent))
            return f"run{len(started)}"

    monkeypatch.setattr(tracking, "tracker", lambda *a, **k: Recording())
    cfg = config.load("smoke", ["run.tracking.backend=mlflow", "run.tracking.uri=http://h:1"])
    teacher, target = (SimpleNamespace(stage=s, key=k * 64, cfg=cfg)
                       for s, k in (("teacher", "a"), ("target", "b")))
    cells = [SimpleNamespace(table="table2", row="ours", nodes=[teacher, target]),
             SimpleNamespace(table="table1", row="depth", nodes=[teacher])]
    with tracking.command(cfg, tmp_path, "cmkg reproduce", {"preset": "smoke"}):
        tracking.annotate_cells(cells)
        shipped = json.loads(json.dumps(tracking.for_node(target.key)))
        shipped_teacher = json.loads(json.dumps(tracking.for_node(teacher.key)))
    assert tracking.current() is None  # the command's context is gone with it
    with tracking.using(shipped):
        tracking.StageRun(target, tmp_path)
    with tracking.using(shipped_teacher):
        tracking.StageRun(teacher, tmp_path)
    (_, parent_tags, _), (name, tags, parent), (_, t_tags, t_parent) = started
    assert parent_tags == {"command": "cmkg reproduce", "preset": "smoke"}
    assert name == f"target {'b' * 12}" and parent == "run1" == t_parent
    assert {k: tags[k] for k in ("command", "table", "row", "stage", "key", "seed")} == {
        "command": "cmkg reproduce", "table": "table2", "row": "ours", "stage": "target",
        "key": "b" * 64, "seed": "0"}
    assert (t_tags["table"], "row" in t_tags) == ("table1,table2", True)
    assert t_tags["row"] == "depth"
    # the command's process found the tracker down: its workers do not try again
    started.clear()
    with tracking.using({**shipped, "off": True}):
        tracking.StageRun(target, tmp_path)
    assert started == []
