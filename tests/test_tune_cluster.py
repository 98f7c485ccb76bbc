"""Concurrent sweep trials on a real multi-node Ray cluster on this machine: a head without CPUs
and two 1-CPU worker nodes; `concurrency: 2`, `cpus_per_worker: 1`. Both trials need the same
missing upstream stages (teacher, student, meta: the target stage's weighted-l2 prior); the
stage writer lock (``stages.run_node``) lets one trial train each of them while the other waits
and takes the cache hit, so each shared stage is trained exactly once, and both trials finish.
The store is one local folder, which every node of a local cluster shares."""

import collections
import json
import os
import re
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from cmkg import config, stages

pytestmark = pytest.mark.ray

SPACE = """stage: target
metric: val_epe_mm
trials: 2
concurrency: 2
cpus_per_worker: 1
sampler: random
seed: 0             # samples 3 target epochs, then 2: two target keys over one prior
set: [regularizer.form=weighted_l2, epochs.teacher=1, epochs.student=1, epochs.meta=1]
params:
  epochs.target: {choice: [2, 3]}   # enters the target's key only
"""
TINY = ["data.source.num=240", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32"]


def test_two_concurrent_trials_on_two_nodes_share_upstream_stages(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from cmkg.cluster.ray_compat import free_resources_per_node
    from cmkg.cluster.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    store = tmp_path / "runs"
    overrides = [*TINY, f"data.root={tmp_path / 'data'}", f"run.store={store}",
                 "run.progress=none"]
    cfg = config.load("smoke", overrides)
    for spec in (cfg.data.source, cfg.data.target):  # rendered here, not by two trials at once
        stages.ensure_dataset(spec, cfg)

    saved = os.environ.pop("RAY_ADDRESS", None)
    small = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": 0})
    workers = [cluster.add_node(**small) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    busy_at_once, stop = [], threading.Event()

    def watch():  # both worker nodes with their one CPU taken at the same moment
        while not stop.is_set():
            free = free_resources_per_node()
            if all(free.get(n.node_id, {}).get("CPU", 0) < 1 for n in workers):
                busy_at_once.append(time.time())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        t0 = time.monotonic()
        summary = run_tune(str(space), "smoke", overrides, address=cluster.address)
        wall = time.monotonic() - t0
        stop.set()

        assert summary["trials_finished"] == 2 and summary["trials_failed"] == 0
        exp = next((store / "_tune").glob("space-*"))
        study = optuna.load_study(study_name=exp.name,
                                  storage=f"sqlite:///{exp.parent / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        assert {t.params["epochs.target"] for t in study.trials} == {2, 3}

        # one artifact per shared stage, one per trial for the target; both targets read the
        # same prior, which read the same teacher and student
        def published(stage):
            return sorted(p.parent for p in (store / stage).glob("*/meta.json"))

        for stage in ("teacher", "student", "meta"):
            assert len(published(stage)) == 1, stage
        targets = published("target")
        assert len(targets) == 2
        metas = [json.loads((p / "meta.json").read_text()) for p in targets]
        assert {m["inputs"]["meta"]["path"] for m in metas} == {str(published("meta")[0])}
        meta = json.loads((published("meta")[0] / "meta.json").read_text())
        assert meta["inputs"]["teacher"]["path"] == str(published("teacher")[0])

        # trained once, counted from the trials' own lines in the cluster's worker logs: one
        # "training" line per shared stage (either trial may train it), and the other trial's
        # single look at it is a cache hit (found published, or published while it waited on
        # the writer lock: "... is training KEY; waiting for it", then "finished by another
        # process")
        logs = Path(cluster.head_node.get_session_dir_path(), "logs")
        text = "\n".join(f.read_text(errors="replace") for f in logs.glob("worker-*.err"))
        trained = collections.Counter(re.findall(r"^(\w+): training resnet10", text, re.M))
        assert trained == {"teacher": 1, "student": 1, "meta": 1, "target": 2}, trained
        hits = collections.Counter(re.findall(
            r"^(\w+): (?:cached|finished by another process, cached) ", text, re.M))
        assert hits == {"teacher": 1, "student": 1, "meta": 1}, hits

        # at the same time on different nodes: both 1-CPU worker nodes were held together
        # (a trial holds one CPU; no node has two), and the trials' lifetimes overlap
        assert busy_at_once, "the two trials never held both worker nodes at once"
        frame = pd.read_csv(exp / "trials.csv")
        spans = sorted((row.timestamp - row.time_total_s, row.timestamp)
                       for row in frame.itertuples())
        assert len(spans) == 2 and spans[1][0] < spans[0][1] + 1  # whole-second timestamps
        print(f"sweep wall {wall:.1f}s; both nodes busy for ~{len(busy_at_once) * 0.2:.1f}s")
    finally:
        stop.set()
        watcher.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
