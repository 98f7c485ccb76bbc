"""Fault tolerance on a real multi-node Ray cluster on this machine: a head without CPUs and two
1-CPU worker nodes; the node running the training worker is removed mid-run; Ray Train restarts
the worker on the other node from the last checkpoint and the stage completes, repeating at most
the one epoch that was in flight (counted from the epoch lines in the workers' Ray logs)."""

import collections
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
EPOCHS = 8


def test_losing_the_workers_node_resumes_from_the_last_checkpoint(tmp_path, registered_epoch):
    ray = pytest.importorskip("ray")
    from ray._private.state import available_resources_per_node
    from ray.cluster_utils import Cluster

    from cmkg import config
    from cmkg.cluster.train import run_stage_ray

    saved = os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = config.load("smoke", [
            # epochs of ~3 s: Ray Train's controller registers reported checkpoints on its
            # health-check poll (every 2 s), so an epoch finished less than one poll before the
            # node died can be lost as well as the one in flight; epochs longer than the poll
            # bound the loss to one epoch
            "data.source.num=720", "optim.batch_size=16", f"epochs.teacher={EPOCHS}",
            f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}",
            "run.progress=lines"])
        out = {}

        def train():
            try:
                out["art"] = run_stage_ray("teacher", cfg, workers=1, max_failures=3)
            except Exception as e:  # noqa: BLE001 - reported below
                out["err"] = e

        thread = threading.Thread(target=train)
        thread.start()
        deadline = time.time() + 240
        while time.time() < deadline and "err" not in out and \
                registered_epoch(tmp_path / "runs") < 2:
            time.sleep(0.5)
        assert "err" not in out, out.get("err")
        free = available_resources_per_node()
        busy = [n for n in nodes if free.get(n.node_id, {}).get("CPU", 0) < 1]
        assert len(busy) == 1  # the training worker holds that node's only CPU
        cluster.remove_node(busy[0])
        thread.join(timeout=400)
        assert not thread.is_alive() and "err" not in out, out.get("err")
        metrics = json.loads((out["art"].path / "metrics.json").read_text())
        assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
        assert all(h["train"]["loss"] == h["train"]["loss"] for h in metrics["history"])  # no NaN
        assert 0 < metrics["test"]["epe_mm"] < 1e4
        # each trained epoch prints one line; Ray Train logs it once, as JSON with its node, in
        # the session's train logs (the removed node's file stays: all nodes run on this machine)
        logs = Path(cluster.head_node.get_session_dir_path(), "logs", "train")
        lines = [json.loads(row) for f in logs.glob("ray-train-app-worker-*.log")
                 for row in f.read_text().splitlines() if row.startswith("{")]
        epochs = [(int(m.group(1)), r["node_id"]) for r in lines
                  if (m := re.match(rf"teacher\s+epoch\s+(\d+)/{EPOCHS}\s+loss", r["message"]))]
        done = collections.Counter(e for e, _ in epochs)
        assert set(done) >= set(range(3, EPOCHS + 1)), done  # found: the count below means something
        assert sum(n - 1 for n in done.values()) <= 1, f"epochs trained more than once: {done}"
        assert len({node for _, node in epochs}) == 2  # the run moved to the other node
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved

