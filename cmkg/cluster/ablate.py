"""The ablation runner's Ray layer: one Ray task per stage the store lacks.

``cmkg.ablation`` decides what to train (the union of the cells' plans, deduplicated by key);
this module only executes it. Each node becomes a task that trains in-process on the CPUs (and
GPU) it holds — the ``stage_task`` path, no Ray Train start-up — with its upstream tasks'
results as arguments, so Ray runs upstream before downstream and as many at once as the cluster
fits (``--workers N``: each stage under Ray Train instead, driven from its task). A node whose
upstream failed is not run (Ray hands it the upstream's error), so a failure
marks exactly the cells that need it; the others finish. Deterministic user errors are not
retried (``retry_exceptions`` stays off); a lost node is (``max_retries``), and the rerun
resumes from the stage's last checkpoint in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from cmkg import stages
from cmkg.cluster.train import absolute_paths, init_ray
from cmkg.config import from_dict


def _node_task(stage: str, config: dict, threads: int, workers: int, gpus: float,
               *upstream: str) -> str:
    """Train one stage in this worker process (its inputs are in the store by now), or, for
    ``workers`` > 1, drive a Ray Train run of it from here (the task then holds no CPU: the
    trainer's placement group holds the workers')."""
    import torch

    cfg = from_dict(config)
    if workers > 1:
        from cmkg.cluster.train import run_stage_ray

        cfg = replace(cfg, run=replace(cfg.run, progress="none"))
        return str(run_stage_ray(stage, cfg, workers=workers, gpus_per_worker=gpus).path)
    cfg = replace(cfg, run=replace(cfg.run, threads=threads, progress="none"))
    torch.set_num_threads(threads)
    return str(stages.run_stage(stage, cfg).path)


def reason(exc: BaseException) -> str:
    """One line saying why a task failed: the original exception, not Ray's wrapping."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def execute(nodes: list[stages.Node], on_done: Callable, *, address: str | None = None,
            cpus: int = 1, gpus: float = 0.0, workers: int = 1, max_retries: int = 2) -> None:
    """Run ``nodes`` (upstream first) as Ray tasks; ``on_done(node, path, error)`` as each
    finishes, in completion order. ``workers`` > 1 trains each stage under Ray Train with that
    many data-parallel workers (``gpus`` each) instead of in the task."""
    import ray

    init_ray(address, log_to_driver=False)
    if workers > 1:  # the task only drives the trainer; the placement group holds the workers
        task = ray.remote(_node_task).options(num_cpus=0, max_retries=max_retries)
    else:
        task = ray.remote(_node_task).options(num_cpus=cpus, num_gpus=gpus,
                                              max_retries=max_retries, retry_exceptions=False)
    refs: dict[tuple[str, str], ray.ObjectRef] = {}
    for node in nodes:
        deps = [refs[(d, k)] for d, k in node.inputs.items() if (d, k) in refs]
        refs[node.id] = task.remote(node.stage, absolute_paths(node.cfg).to_dict(), cpus,
                                    workers, gpus, *deps)
    pending = {refs[node.id]: node for node in nodes}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        node = pending.pop(ref)
        try:
            path, error = ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - the cell is marked failed, others go on
            path, error = None, reason(e)
        on_done(node, path, error)
