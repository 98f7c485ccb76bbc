"""The ablation runner's Ray layer: one Ray task per stage the store lacks.

``cmkg.ablation`` decides what to train (the union of the cells' plans, deduplicated by key);
this module only executes it. Each planned node becomes a task (``cmkg.cluster.tasks``) with
its upstream tasks' results as arguments, so Ray runs upstream before downstream and as many at
once as the cluster fits. A node whose upstream failed is not run (Ray hands it the upstream's
error), so a failure marks exactly the cells that need it; the others finish. Deterministic user
errors are not retried; a lost node is (``max_retries``), and the rerun resumes from the
stage's last checkpoint in the store.
"""

from __future__ import annotations

from collections.abc import Callable

from cmkg import stages
from cmkg.cluster import tasks
from cmkg.cluster.connect import init_ray


def reason(exc: BaseException) -> str:
    """One line saying why a task failed: the original exception, not Ray's wrapping."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def execute(nodes: list[stages.Node], on_done: Callable, *, address: str | None = None,
            cpus_per_worker: int = 1, gpus_per_worker: float = 0.0, workers: int = 0,
            max_retries: int = 2) -> None:
    """Run ``nodes`` (upstream first) as Ray tasks; ``on_done(node, path, error)`` as each
    finishes, in completion order. ``workers`` >= 1 trains each stage under Ray Train with that
    many data-parallel workers (``gpus_per_worker`` each) instead of in the task."""
    import ray

    init_ray(address, log_to_driver=False)
    refs: dict[tuple[str, str], ray.ObjectRef] = {}
    for node in nodes:
        deps = [refs[(d, k)] for d, k in node.inputs.items() if (d, k) in refs]
        refs[node.id] = tasks.submit([node], *deps, cpus_per_worker=cpus_per_worker,
                                     gpus_per_worker=gpus_per_worker, workers=workers,
                                     max_retries=max_retries)
    pending = {refs[node.id]: node for node in nodes}
    while pending:
        # with a timeout: a blocking ray.wait does not return to Python, so a Ctrl-C (SIGINT)
        # would wait for the next stage to finish before it stops the run
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if not ready:
            continue
        ref = ready[0]
        node = pending.pop(ref)
        try:
            path, error = ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - the cell is marked failed, others go on
            path, error = None, reason(e)
        on_done(node, path, error)
