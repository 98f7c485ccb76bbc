"""Rerunning an interrupted Ray Train command resumes from its checkpoint. A module of its own:
no Ray may be running in this process while the CLI starts its local one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray


def test_an_interrupted_ray_run_resumes_when_rerun(tmp_path, registered_epoch):
    """Interrupt `cmkg train --workers 1` after two checkpoints; the same command resumes."""
    cmd = [sys.executable, "-m", "cmkg", "train", "teacher", "--config", "smoke", "--workers", "1",
           "--store", str(tmp_path / "runs"), "--set", f"data.root={tmp_path / 'data'}",
           "--set", "data.source.num=240", "--set", "optim.batch_size=16",
           "--set", "epochs.teacher=25", "--set", "run.progress=lines"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if registered_epoch(tmp_path / "runs") >= 2:  # Ray Train has recorded 2 checkpoints
            break
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[1][-2000:]
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert not list((tmp_path / "runs").glob("teacher/*/meta.json"))  # nothing published
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    epochs = [int(line.split("epoch")[1].split("/")[0]) for line in second.stderr.splitlines()
              if "teacher  epoch" in line]
    assert epochs and min(epochs) >= 2  # picked up from a checkpoint, not from epoch 1
    art = list((tmp_path / "runs").glob("teacher/*/metrics.json"))
    assert len(art) == 1
    history = json.loads(art[0].read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 26))


def test_ctrl_c_stops_an_ablation_at_once_and_the_rerun_resumes(tmp_path):
    """SIGINT to the `cmkg ablate` driver while a stage trains in a Ray task: the driver stops
    within seconds (exit 130, one line), not when the stage ends; nothing is published and the
    stage's lock is free; the same command resumes the stage from its last epoch."""
    import yaml

    ab = tmp_path / "table2.yaml"
    ab.write_text(yaml.safe_dump({
        "table": "table2", "title": "tiny", "seeds": 1, "baseline_row": "none",
        "columns": {"target": {"stage": "target", "metrics": ["epe_mm"]}},
        "rows": [{"label": "none", "set": {"regularizer.form": "none"}}]}))
    store = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cmkg", "ablate", str(ab), "--config", "smoke", "--store",
           str(store), "--report", str(tmp_path / "rep"), "--set", f"data.root={tmp_path / 'data'}",
           "--set", "data.target.num=160", "--set", "optim.batch_size=16",
           "--set", "epochs.target=12", "--set", "run.threads=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    checkpoint = store / "target"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if list(checkpoint.glob("*.partial/checkpoint.pt")):  # an epoch is done
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-2000:]
    sent = time.time()
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert time.time() - sent < 20, "the driver waited for the stage to end"
    assert first.returncode == 130 and "rerun the same command to resume" in err, err[-2000:]
    assert not list(store.glob("target/*/meta.json"))  # nothing published
    import fcntl

    (lock,) = checkpoint.glob("*.lock")
    with open(lock, "a+") as f:  # the stage's lock is not held by a leftover process
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(f, fcntl.LOCK_UN)
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    (metrics,) = store.glob("target/*/metrics.json")
    assert [h["epoch"] for h in json.loads(metrics.read_text())["history"]] == list(range(1, 13))
