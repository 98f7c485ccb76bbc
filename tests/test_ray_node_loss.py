"""Fault tolerance on a real multi-node Ray cluster on this machine (a head without CPUs and
1-CPU worker nodes), a node removed mid-run:

- Ray Train: the node running the training worker is removed; Ray Train restarts the worker on
  the other node from the last checkpoint and the stage completes, repeating at most the one
  epoch that was in flight (counted from the epoch lines in the workers' Ray logs).
- The ablation runner (``cmkg ablate`` / ``cmkg reproduce --address``: one Ray task per stage):
  the only worker node is removed while a stage trains and a fresh node joins; the run
  completes, the stages finished before the loss are not trained again, and the report is the
  one an undisturbed run of the same ablation writes."""

import collections
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import yaml

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



# a seconds-long ablation: three target rows, one of them on a prior learned by a meta stage
# (teacher, student, meta, three targets: six stages, upstream results passed between tasks)
ROWS = [{"label": "none", "set": {"regularizer.form": "none"}},
        {"label": "l2", "set": {"regularizer.form": "l2", "regularizer.sigma": 1e-3}},
        {"label": "weighted l2", "set": {"regularizer.form": "weighted_l2"}}]
TINY = ["data.source.num=200", "data.target.num=160", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32", "epochs.teacher=1", "epochs.student=1",
        "epochs.kd=1", "epochs.meta=1", "epochs.target=2"]
TRAINING = re.compile(r"^(\w+): training .* -> (\S+)$")


def _trained(session_dir) -> collections.Counter:
    """How many times each artifact folder began training, from the stage runner's line in
    the Ray workers' logs (every node of a local cluster writes under the one session)."""
    return collections.Counter(m.group(2) for f in Path(session_dir, "logs").glob("worker-*.err")
                               for line in f.read_text(errors="replace").splitlines()
                               if (m := TRAINING.match(line)))


def _published(store) -> dict:
    """Artifact folder -> its meta.json, of the published artifacts (not ``.partial`` ones)."""
    return {p.parent: p.read_text() for p in store.glob("*/*/meta.json")
            if not p.parent.name.endswith(".partial")}


def test_losing_a_node_during_an_ablation_trains_nothing_twice_and_reports_the_same(
        tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    import cmkg.cluster.ablate
    from cmkg import cli
    from cmkg.cluster import tasks
    from cmkg.cluster.connect import portable

    table = tmp_path / "table2.yaml"
    table.write_text(yaml.safe_dump({
        "table": "table2", "title": "node loss", "seeds": 1, "baseline_row": "none",
        "columns": {"target": {"stage": "target"}}, "rows": ROWS}, sort_keys=False))

    def ablate(store, rep, *extra):
        return cli.main(["ablate", str(table), "--config", "smoke", "--store", str(store),
                         "--report", str(rep), "--set", f"data.root={tmp_path / 'data'}",
                         *sum((["--set", s] for s in TINY), []), *extra])

    saved = os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    first = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    store, rep = tmp_path / "runs", tmp_path / "rep"
    session = cluster.head_node.get_session_dir_path()
    try:
        out = {}

        def run():
            try:
                out["rc"] = ablate(store, rep, "--address", cluster.address)
            except BaseException as e:  # noqa: BLE001 - reported below
                out["err"] = e

        thread = threading.Thread(target=run)
        thread.start()
        # the loss: once a stage is published and another is training on the node
        deadline, finished, in_flight = time.time() + 400, {}, set()
        while time.time() < deadline and thread.is_alive():
            finished = _published(store)
            in_flight = {f for f in _trained(session) if Path(f) not in finished}
            if finished and in_flight:
                break
            time.sleep(0.2)
        assert finished and in_flight, (out, capsys.readouterr().err[-3000:])
        cluster.remove_node(first)
        cluster.add_node(num_cpus=1)  # a fresh node: the lost task runs again there
        thread.join(timeout=300)
        assert not thread.is_alive() and out.get("rc") == 0, (out, capsys.readouterr().err[-3000:])
        trained = _trained(session)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved

    after = _published(store)
    assert len(after) == 6 and len(finished) < 6
    assert all(after[k] == v for k, v in finished.items())  # published once, never rewritten
    assert all(trained[str(k)] == 1 for k in finished), trained  # and trained once
    assert set(trained) == {str(k) for k in after}
    assert 1 <= sum(trained.values()) - len(after) <= len(in_flight), trained  # the lost one again

    # the same ablation undisturbed, each stage through the task's own body in this process
    def in_process(nodes, on_done, **_):
        for node in nodes:
            on_done(node, tasks.run_nodes([portable(node)], 1, 0, 0.0), None)

    monkeypatch.setattr(cmkg.cluster.ablate, "execute", in_process)
    assert ablate(tmp_path / "calm", tmp_path / "calm_rep") == 0
    assert (rep / "table2.md").read_text() == (tmp_path / "calm_rep" / "table2.md").read_text()
