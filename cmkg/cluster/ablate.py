"""The ablation runner's Ray layer: one Ray task per stage the store lacks.

``cmkg.ablation`` decides what to train (the union of the cells' plans, deduplicated by key);
this module only executes it. Each node becomes a task that trains in-process on the CPUs (and
GPU) it holds — the ``stage_task`` path, no Ray Train start-up — with its upstream tasks'
results as arguments, so Ray runs upstream before downstream and as many at once as the cluster
fits. A node whose upstream failed is not run (Ray hands it the upstream's error), so a failure
marks exactly the cells that need it; the others finish. Deterministic user errors are not
retried (``retry_exceptions`` stays off); a lost node is (``max_retries``), and the rerun
resumes from the stage's last checkpoint in the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from cmkg import stages
from cmkg.cluster.train import absolute_paths, init_ray
from cmkg.config import from_dict


def _node_task(stage: str, config: dict, threads: int, *upstream: str) -> str:
    """Train one stage in this worker process (its inputs are in the store by now)."""
    import torch

    cfg = from_dict(config)
    cfg = replace(cfg, run=replace(cfg.run, threads=threads, progress="none"))
    torch.set_num_threads(threads)
    return str(stages.run_stage(stage, cfg).path)


def reason(exc: BaseException) -> str:
    """One line saying why a task failed: the original exception, not Ray's wrapping."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def execute(nodes: list[stages.Node], on_done: Callable, *, address: str | None = None,
            cpus: int = 1, gpus: float = 0.0, max_retries: int = 2) -> None:
    """Run ``nodes`` (upstream first) as Ray tasks; ``on_done(node, path, error)`` as each
    finishes, in completion order."""
    import ray

    init_ray(address, log_to_driver=False)
    task = ray.remote(_node_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)
    refs: dict[tuple[str, str], ray.ObjectRef] = {}
    for node in nodes:
        deps = [refs[(d, k)] for d, k in node.inputs.items() if (d, k) in refs]
        refs[node.id] = task.remote(node.stage, absolute_paths(node.cfg).to_dict(), cpus, *deps)
    pending = {refs[node.id]: node for node in nodes}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        for ref in ready:
            node = pending.pop(ref)
            try:
                path, error = ray.get(ref), None
            except Exception as e:  # noqa: BLE001 - the cell is marked failed, others go on
                path, error = None, reason(e)
            on_done(node, path, error)
        if not ready:
            time.sleep(0.1)
