"""An interrupted sweep continues with --resume: the finished trials stay, the interrupted one is
rerun, the Optuna study ends with exactly the requested trials. A module of its own: the CLI
runs in a subprocess that starts its own local Ray."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray


def _states(db) -> list[str]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db) as con:
            return [s for (s,) in con.execute("select state from trials order by trial_id")]
    except sqlite3.Error:  # being created
        return []


def test_an_interrupted_sweep_resumes(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("stage: target\ntrials: 4\ncpus_per_worker: 1\nsampler: random\nseed: 3\n"
                     "params:\n"
                     "  regularizer.form: {choice: [none, l2]}\n"
                     "  regularizer.sigma: {float: [1.0e-6, 1.0e-2], log: true, "
                     "when: {regularizer.form: [l2]}}\n")
    cmd = [sys.executable, "-m", "cmkg", "tune", str(space), "--config", "smoke",
           "--store", str(tmp_path / "runs"), "--set", f"data.root={tmp_path / 'data'}",
           "--set", "data.target.num=240", "--set", "optim.batch_size=16",
           "--set", "epochs.target=6"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    db = None
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        found = list((tmp_path / "runs" / "_tune").glob("optuna.db"))  # the store's one
        db = found[0] if found else None
        if db and _states(db).count("COMPLETE") >= 1 and len(_states(db)) >= 2:
            break  # one trial done, the next one running
        time.sleep(0.3)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    before = _states(db)
    assert 1 <= before.count("COMPLETE") < 4, before

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to start over
    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _states(db)
    assert after == ["COMPLETE"] * 4, after  # the requested trials, none lost or doubled
