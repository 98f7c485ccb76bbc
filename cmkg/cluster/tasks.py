"""Stages as Ray tasks: a task receives planned nodes and runs them, nothing is planned again.

``submit(nodes, ...)`` runs a plan (or one node of it) in one Ray task: each node is a cache hit
or trains in the task's own process on the CPUs (and GPU) the task holds, the in-process loop
with no Ray Train start-up; with ``workers`` >= 1 the task drives a Ray Train run of each node
instead (it then holds no CPU: the trainer's placement group holds the workers'). The ablation
runner submits one task per node with its upstream tasks' results as arguments, so Ray orders
them; a single stage with its missing inputs is one task.

A user error in a task is not retried (``retry_exceptions`` stays off; ``max_retries`` covers a
lost worker, and the rerun resumes from the stage's last checkpoint in the store): ``ray.get``
raises a ``RayTaskError`` whose ``cmkg.errors.unwrap_user_error`` is that error.
"""

from __future__ import annotations

import dataclasses

from cmkg import stages, tracking
from cmkg.cluster.connect import portable


def run_nodes(nodes: list[stages.Node], threads: int, workers: int, gpus_per_worker: float,
              *upstream: str, tracking_context: dict | None = None) -> str:
    """The task's body: run ``nodes`` in order (their inputs are cached or earlier in
    ``nodes``); return the last artifact's local path. ``upstream`` only orders the task after
    the tasks it needs; ``tracking_context`` is the command's parent run (``cmkg.tracking``)."""
    with tracking.using(tracking_context):
        return _run_nodes(nodes, threads, workers, gpus_per_worker)


def _run_nodes(nodes: list[stages.Node], threads: int, workers: int,
               gpus_per_worker: float) -> str:
    import torch

    def with_run(node: stages.Node, **entries) -> stages.Node:
        run = dataclasses.replace(node.cfg.run, **entries)
        return dataclasses.replace(node, cfg=dataclasses.replace(node.cfg, run=run))

    store = stages.Store.of(nodes[-1].cfg)
    if workers > 0:  # Ray Train's workers take run.threads, else an equal share of the cluster
        import functools

        from cmkg.cluster.train import train_ray

        step = functools.partial(train_ray, workers=workers, gpus_per_worker=gpus_per_worker)
        quiet = [with_run(n, progress="none") for n in nodes]
        return str(stages.run_plan(quiet, store, train=step).path)
    torch.set_num_threads(threads)  # the task's CPUs, not the node's
    quiet = [with_run(n, threads=threads, progress="none") for n in nodes]
    return str(stages.run_plan(quiet, store).path)


def submit(nodes: list[stages.Node], *upstream, cpus_per_worker: int = 1,
           gpus_per_worker: float = 0.0, workers: int = 0, max_retries: int = 1):
    """Submit ``nodes`` as one Ray task (after the tasks whose ObjectRefs are ``upstream``);
    returns the ObjectRef of the last node's artifact path. The store must be one every node
    of the cluster reaches (a shared folder or a URI)."""
    import ray

    if workers > 0:  # the task only drives the trainer; the placement group holds the workers
        options = {"num_cpus": 0, "max_retries": max_retries}
    else:
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker,
                   "max_retries": max_retries, "retry_exceptions": False}
    task = ray.remote(run_nodes).options(**options)
    return task.remote([portable(n) for n in nodes], cpus_per_worker, workers, gpus_per_worker,
                       *upstream, tracking_context=tracking.for_node(*(n.key for n in nodes)))
