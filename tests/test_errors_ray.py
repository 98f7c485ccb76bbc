"""Bad input under Ray gives what it gives in-process: one ``cmkg: error:`` line naming the file
or key, exit status 2, no traceback, nothing half-written, and no retries (Ray Train's
FailureConfig and a Ray task's max_retries are for crashes and lost nodes, not for errors that
would repeat). A crash stays a crash: its traceback and status 1."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cmkg import cli, stages
from cmkg.errors import ConfigError, DataError, NumericalError, UserError, unwrap_user_error

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    """A 64-sample dataset whose train shard lost its second half."""
    out = tmp_path_factory.mktemp("bad") / "src"
    assert cli.main(["data", "synth", "--domain", "rhd-like", "--num", "64", "--size", "32",
                     "--out", str(out)]) == 0
    shard = out / "train-00000.parquet"
    os.truncate(shard, shard.stat().st_size // 2)
    return out


def _one_error_line(err: str) -> str:
    # not ours, and not about the error: Ray Train's PlacementGroupCleaner actor polls the state
    # API, which has no dashboard to ask here; while another Ray runs on the machine it dies of
    # "Found multiple active Ray instances" with a traceback of its own. Under load the Train
    # controller may also log a GetTimeoutError of its own while it tears the worker group
    # down. Neither comes from our code; the workers' lines and the driver's are still checked.
    err = "\n".join(ln for ln in err.splitlines()
                    if "(PlacementGroupCleaner pid=" not in ln and "(TrainController pid=" not in ln)
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_unwrap_user_error_finds_the_error_behind_rays_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    data, num = DataError("d/train-00000.parquet: corrupt"), NumericalError("teacher: loss")
    assert isinstance(num, UserError) and isinstance(num, RuntimeError)
    # rank 0 died of the collateral damage, rank 1 of the bad input: the user error wins
    assert unwrap_user_error(WorkerGroupError("x", {0: RuntimeError("gloo"), 1: data})) is data
    assert unwrap_user_error(ControllerError(num)) is num
    task = RayTaskError("run_nodes", "Traceback ...", data).as_instanceof_cause()
    assert isinstance(task, DataError) and str(task) != str(data)  # its message: a traceback
    assert unwrap_user_error(task) is data
    assert unwrap_user_error(data) is data
    for crash in (RuntimeError("bug"), WorkerGroupError("x", {0: RuntimeError("bug")}),
                  RayTaskError("f", "tb", KeyError("k")).as_instanceof_cause()):
        assert unwrap_user_error(crash) is None
    # every user error survives the trip from a worker (pickle), class and message
    for e in (ConfigError("a.yaml", ["optim.lr: must be > 0"]), data, num):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)


def test_cli_a_crash_in_a_ray_task_keeps_its_traceback(tmp_path, monkeypatch):
    from ray.exceptions import RayTaskError

    def crash(*a, **k):
        raise RayTaskError("run_nodes", "tb", ZeroDivisionError("bug")).as_instanceof_cause()

    monkeypatch.setattr(stages, "run_stage", crash)
    with pytest.raises(ZeroDivisionError):  # not swallowed into a one-line message
        cli.main(["train", "teacher", "--store", str(tmp_path / "runs")])


def test_truncated_shard_under_ray_train_stops_on_the_driver(truncated, tmp_path, capsys):
    """The driver checks the shards before Ray Train starts: the in-process message, at once."""
    with pytest.raises(DataError) as in_process:
        stages.run_stage("teacher", _cfg(truncated, tmp_path / "ref"))
    assert "train-00000.parquet: checksum mismatch" in str(in_process.value)
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert cli.main(["train", "teacher", "--workers", "1", "--store", str(runs),
                     "--set", f"data.source.path={truncated}",
                     "--set", f"data.root={tmp_path / 'data'}", "--set", "run.threads=1"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"cmkg: error: {in_process.value}"
    assert not (runs / "_ray").exists()  # no Ray Train run was started


def test_diverging_loss_in_a_ray_train_worker_is_one_line_and_not_retried(tmp_path):
    """NumericalError in the worker: no retry (FailureConfig allows 3), one line, status 2, and
    no Ray Train checkpoints of the diverged key left to resume. The CLI in a process of its own
    (its own local Ray, the workers' logs forwarded to its stderr as a user sees them)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DEDUP_LOGS"] = "0"  # count every attempt's lines
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "cmkg", "train", "teacher", "--workers", "1", "--store", str(runs),
         "--set", f"data.root={tmp_path / 'data'}", "--set", "data.source.num=64",
         "--set", "optim.batch_size=16", "--set", "epochs.teacher=1",
         "--set", "run.threads=1", "--set", "run.progress=none", "--set", "optim.lr=1e8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert re.fullmatch(r"cmkg: error: teacher: loss L_REG became (nan|inf) in epoch 1, "
                        r"steps? [-\d]+ \(optim.lr=1e\+08 is probably too high; lower optim.lr\)",
                        line), line
    assert proc.stderr.count("Started training worker group") == 1, proc.stderr[-3000:]
    assert not list(runs.glob("_ray/teacher-*")) and not list(runs.glob("teacher/*/meta.json"))


def test_user_error_in_a_ray_task_is_not_retried(local_ray, truncated, tmp_path):
    """A stage task (max_retries=1) on the truncated shard: ray.get raises a RayTaskError; its
    cause is the DataError with the in-process message; the task ran once (Ray retries
    application errors only with retry_exceptions, which stays off)."""
    from ray.exceptions import RayTaskError

    from cmkg.cluster import tasks

    cfg = _cfg(truncated, tmp_path)
    with pytest.raises(DataError) as in_process:
        stages.run_stage("teacher", cfg)
    with pytest.raises(RayTaskError) as remote:
        local_ray.get(tasks.submit(stages.plan("teacher", cfg)))
    err = unwrap_user_error(remote.value)
    assert type(err) is DataError and str(err) == str(in_process.value)
    # Ray marks each task execution in its worker's log: one execution, no retry
    session = Path(local_ray._private.worker.global_worker.node.get_session_dir_path())
    runs = sum(f.read_text().count(":task_name:run_nodes")
               for f in session.glob("logs/worker-*.out"))
    assert runs == 1


def _cfg(data: Path, tmp: Path):
    from cmkg import config

    return config.load("smoke", [f"data.source.path={data}", f"data.root={tmp / 'data'}",
                                 f"run.store={tmp / 'runs'}", "run.progress=none",
                                 "run.threads=1"])
