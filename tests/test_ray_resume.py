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
