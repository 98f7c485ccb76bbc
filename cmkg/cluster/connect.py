"""Joining a Ray cluster, and what work must carry to run on any of its nodes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cmkg.config import Config
from cmkg.errors import UserError
from cmkg.stages import Artifact, Node
from cmkg.storage import is_uri


def init_ray(address: str | None, num_cpus: int | None = None,
             log_to_driver: bool = True) -> None:
    """Join ``address`` (``auto``, ``ray://...``, ``host:port``) or start a local Ray.
    ``log_to_driver=False`` keeps the workers' output in Ray's log files (the ablation runner
    prints its own progress lines instead)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=log_to_driver)


def preflight(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Fail in one message when the workers cannot fit the cluster (instead of pending forever)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(n["Resources"].get("CPU", 0) for n in nodes)
    total_gpu = sum(n["Resources"].get("GPU", 0) for n in nodes)
    per_node = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
    fits = sum(int(min(c // cpus_per_worker if cpus_per_worker else workers,
                       g // gpus_per_worker if gpus_per_worker else workers)) for c, g in per_node)
    if fits < workers:
        raise UserError(
            f"--workers {workers} with {cpus_per_worker:g} CPU and {gpus_per_worker:g} GPU each "
            f"cannot fit this Ray cluster ({len(nodes)} node(s), {total_cpu:g} CPUs, "
            f"{total_gpu:g} GPUs in all; at most {fits} such workers fit). Lower --workers, "
            "--gpus-per-worker or run.threads, or add nodes.")


def _absolute(p: str | None) -> str | None:
    return p if p is None or is_uri(p) else str(Path(p).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with every path made absolute (URIs stay): Ray workers run in folders of
    their own. No path is in a stage key, so keys do not change."""
    r = dataclasses.replace
    data = cfg.data
    specs = {k: r(getattr(data, k), path=_absolute(getattr(data, k).path))
             for k in ("source", "target")}
    if data.augment is not None:
        specs["augment"] = r(data.augment, path=_absolute(data.augment.path))
    return r(cfg, data=r(data, root=_absolute(data.root), **specs),
             run=r(cfg.run, store=_absolute(cfg.run.store), cache=_absolute(cfg.run.cache)),
             inputs=r(cfg.inputs, teacher=_absolute(cfg.inputs.teacher),
                      student=_absolute(cfg.inputs.student)),
             regularizer=r(cfg.regularizer, prior=_absolute(cfg.regularizer.prior)))


def portable(node: Node) -> Node:
    """A planned node that runs the same on any node of the cluster: absolute paths in its
    config and its explicit inputs (its key and spec are unchanged)."""
    given = {d: Artifact(a.stage, a.key, a.path.expanduser().resolve())
             for d, a in node.given.items()}
    return dataclasses.replace(node, cfg=absolute_paths(node.cfg), given=given)
