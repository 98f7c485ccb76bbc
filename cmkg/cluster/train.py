"""Stages under Ray Train: ``TorchTrainer`` with N data-parallel workers, checkpoints through
``ray.train.report``, resume through ``ray.train.get_checkpoint`` and a stable run name.

The worker loop is the project's own code (``stages.build_stage``, ``train.fit``,
``stages.publish``) with three Ray calls marked ``# ray``: DDP via ``prepare_model`` for the
teacher, student, kd and target stages (the meta stage keeps the bare module and averages its
gradients by hand, see ``cmkg.parallel``), ``prepare_data_loader`` for the distributed sampler,
and ``report`` for the per-epoch checkpoint. Rank 0 publishes the artifact into the store, which
on a cluster must be one every node reaches: a shared folder (NFS/EFS) or a URI (``s3://...``);
Ray's checkpoints go to ``{store}/_ray`` on the same filesystem.

Ray Train's fixed cost (worker actors, placement group, process group: about 20 s a stage on
2 cores) is worth paying only for several workers. ``run_stage_auto`` is the entry point for
code that already runs inside Ray (a Tune trial, a Ray task): one worker trains in that process,
on the resources it already holds; several start a ``TorchTrainer``. ``stage_task`` runs a
stage as a Ray task that way (what the ablation runner schedules).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch

from cmkg import stages
from cmkg.config import Config, from_dict
from cmkg.errors import UserError
from cmkg.stages import Artifact, Store
from cmkg.storage import is_uri

CKPT = "checkpoint.pt"


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``, ``ray://...``, ``host:port``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True)


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


def _worker_loop(config: dict) -> None:
    import ray.train  # ray
    import ray.train.torch  # ray

    cfg = from_dict(config["cfg"])
    stage, key, spec = config["stage"], config["key"], config["spec"]
    upstream = {d: stages.open_artifact(p) for d, p in config["upstream"].items()}
    ctx = ray.train.get_context()  # ray
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device()  # ray
    wrap = None if stage == "meta" else ray.train.torch.prepare_model  # ray: DDP
    run = stages.build_stage(stage, cfg, spec, upstream, device, wrap=wrap)
    if stage == "meta":
        from cmkg.parallel import broadcast_module

        broadcast_module(run.trainable)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    train_loader, val_loader, test_loader = stages.make_loaders(run, cfg, device, gen)
    train_loader = ray.train.torch.prepare_data_loader(train_loader)  # ray: distributed sampler

    state = stages.FitState()
    checkpoint = ray.train.get_checkpoint()  # ray: resume after a failure or a rerun
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            blob = torch.load(Path(d) / CKPT, map_location=device, weights_only=False)
        state = stages.restore(run, blob, key, gen) or state

    def report(st: stages.FitState) -> None:
        if stage == "meta":
            stages.check_phi(run.regularizer, stage, st.epoch)
        metrics = {"epoch": st.epoch, **st.history[-1]["train"],
                   **{f"val_{k}": v for k, v in st.history[-1].get("val", {}).items()}}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(stages.checkpoint_blob(run, key, st, gen), Path(d) / CKPT)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)  # ray: every worker reports each epoch

    import time

    started = time.time()
    state = stages.fit_stage(run, cfg, spec, train_loader, val_loader, device, state, report)
    if rank == 0:
        stages.publish(run, cfg, key, spec, upstream, state, test_loader, Store.of(cfg),
                       device, started)


def absolute_paths(cfg: Config) -> Config:
    """The config with every path made absolute (URIs stay): Ray workers run in folders of
    their own."""
    from dataclasses import replace

    def ab(p):
        return p if p is None or is_uri(p) else str(Path(p).expanduser().resolve())

    data = cfg.data
    specs = {k: replace(getattr(data, k), path=ab(getattr(data, k).path))
             for k in ("source", "target")}
    if data.augment is not None:
        specs["augment"] = replace(data.augment, path=ab(data.augment.path))
    return replace(cfg, data=replace(data, root=ab(data.root), **specs),
                   run=replace(cfg.run, store=ab(cfg.run.store), cache=ab(cfg.run.cache)),
                   inputs=replace(cfg.inputs, teacher=ab(cfg.inputs.teacher),
                                  student=ab(cfg.inputs.student)),
                   regularizer=replace(cfg.regularizer, prior=ab(cfg.regularizer.prior)))


def run_stage_ray(stage: str, cfg: Config, *, workers: int, gpus_per_worker: float = 0.0,
                  address: str | None = None, max_failures: int = 3) -> Artifact:
    """Run ``stage`` (and missing upstream stages, each the same way) under Ray Train."""
    cfg = absolute_paths(cfg)
    store = Store.of(cfg)
    done: dict[tuple[str, str], Artifact] = {}
    train = functools.partial(_train_ray, workers=workers, gpus_per_worker=gpus_per_worker,
                              address=address, max_failures=max_failures)
    for node in stages.plan(stage, cfg):
        done[node.id] = stages.run_node(node, store, stages.upstream_of(node, done), train)
    return done[node.id]


def _train_ray(stage: str, cfg: Config, key: str, spec: dict, upstream: dict[str, Artifact],
               store: Store, *, workers: int, gpus_per_worker: float, address: str | None,
               max_failures: int) -> Artifact:
    """One stage under a ``TorchTrainer`` (the driver holds the key's writer lock)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for spec_ in stages.stage_datasets(stage, cfg):  # render once here, not in every worker
        stages.ensure_dataset(spec_, cfg)
    init_ray(address)
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    # the worker's CPU share, no more than one node holds
    threads = cfg.run.threads or max(1, int(min(cpus // workers, biggest)))
    preflight(workers, threads, gpus_per_worker)
    storage_path, storage_fs = store.ray_storage()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "key": key, "spec": spec,
                           "upstream": {d: str(a.path) for d, a in upstream.items()},
                           "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": threads,
                                                           "GPU": gpus_per_worker}),
        # a stable name per stage key: rerunning the same command resumes from the latest
        # checkpoint that Ray Train keeps there (ray.train.get_checkpoint in the workers)
        run_config=RunConfig(name=f"{stage}-{key[:20]}", storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    stages._say(f"{stage}: Ray Train, {workers} worker(s) x {threads} CPU"
                f"{f' + {gpus_per_worker:g} GPU' if gpus_per_worker else ''} -> "
                f"{store.describe(stage, key)}")
    trainer.fit()
    art = store.get(stage, key)
    if art is None:
        raise RuntimeError(f"{stage}: Ray Train finished but {store.describe(stage, key)} is "
                           "missing; is run.store on storage every node reaches?")
    return art


def run_stage_auto(stage: str, cfg: Config, *, workers: int = 1, gpus_per_worker: float = 0.0,
                   address: str | None = None, max_failures: int = 3) -> Artifact:
    """One worker: train in this process (inside the caller's Ray task or Tune trial, which
    already holds its CPUs and GPU), no Ray Train start-up. Several: a ``TorchTrainer``."""
    if workers <= 1:
        return stages.run_stage(stage, cfg)
    return run_stage_ray(stage, cfg, workers=workers, gpus_per_worker=gpus_per_worker,
                         address=address, max_failures=max_failures)


def _stage_in_task(stage: str, config: dict, threads: int) -> str:
    from dataclasses import replace

    cfg = from_dict(config)
    cfg = replace(cfg, run=replace(cfg.run, threads=threads))  # the task's CPUs, not the node's
    return str(stages.run_stage(stage, cfg).path)


def stage_task(stage: str, cfg: Config, cpus: int = 1, gpus: float = 0.0):
    """Submit ``stage`` (and its missing inputs) as a Ray task that trains in-process with
    ``cpus`` threads; returns the ObjectRef of the artifact's local path. The store must be one
    every node reaches (a shared folder or a URI)."""
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(_stage_in_task)
    return task.remote(stage, absolute_paths(cfg).to_dict(), cpus)
