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

Bad input fails here as it does in-process: one message, no retries. The driver checks the
datasets before Ray Train starts (``check_datasets``); a user error raised in a worker (one the
driver cannot foresee, e.g. a loss that diverges) ends the run at once (``_stop_on_user_error``)
and ``run_stage_ray`` raises it as itself; a Ray task raises it wrapped in a ``RayTaskError``,
which ``unwrap_user_error`` undoes. Crashes and lost nodes keep Ray's retries and tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cmkg import stages
from cmkg.config import Config, from_dict
from cmkg.errors import NumericalError, UserError, unwrap_user_error  # the last: see stage_task
from cmkg.stages import Artifact, Store
from cmkg.storage import is_uri

CKPT = "checkpoint.pt"


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


def _quiet_console(drop) -> None:
    """Keep the log records ``drop(record)`` selects off the console of this process (and so off
    the driver's terminal); Ray Train's log files under ``{session}/logs/train`` keep them."""
    import logging

    for handler in logging.getLogger("ray.train").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.addFilter(lambda record: not drop(record))


def _worker_main(config: dict) -> None:
    """Each Ray Train worker's function: ``_worker_loop``, with a user error (bad data, a loss
    that diverged) raised as itself, for the driver to report in one line and not retry (see
    ``_stop_on_user_error``), and its traceback kept off the console."""
    try:
        _worker_loop(config)
    except UserError as e:
        name = f"{type(e).__module__}.{type(e).__qualname__}: "
        _quiet_console(lambda r: r.getMessage().startswith("Error in training function")
                       and name in r.getMessage())
        raise


def _stop_on_user_error():
    """A Ray Train callback, run in the controller, that ends the run when a worker raised a
    user error (:class:`UserError`, :class:`NumericalError` included): it raises the error as a
    ``ray.train.ControllerError``, which Ray Train's failure policy does not retry (it retries
    worker-group failures up to ``FailureConfig.max_failures``, controller errors only when
    starting the workers failed). Anything else (a crash, a lost node) is left to the retries.
    The class is made here so that cloudpickle ships it by value: the controller imports
    ``cmkg.errors`` only, not torch and the stages."""
    from ray.train import ControllerError, UserCallback

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            import logging

            from cmkg.errors import unwrap_user_error

            found = (unwrap_user_error(worker_exceptions[r]) for r in sorted(worker_exceptions))
            err = next((e for e in found if e is not None), None)
            if err is None:
                return
            # as _quiet_console (not called: that would import this module, torch included):
            # the failure policy logs its decision on this error with a traceback
            for handler in logging.getLogger("ray.train").handlers:
                if type(handler).__name__ != "SessionFileHandler":
                    handler.addFilter(lambda r: not (
                        r.exc_info and unwrap_user_error(r.exc_info[1]) is not None))
            raise ControllerError(err)

    return StopOnUserError()


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


def check_datasets(stage: str, cfg: Config) -> list[Path]:
    """On the driver, before any worker starts, what every worker would fail on alike: each
    dataset the stage reads has a valid manifest and the modalities the stage needs, and its
    shards are there, match their sha256 and open (``read_split``: the in-process path's checks
    and messages). Renders a synthetic dataset (mirrors a remote one) on first use; returns the
    local folders."""
    from cmkg.data import read_manifest, read_split

    roots = [stages.ensure_dataset(s, cfg) for s in stages.stage_datasets(stage, cfg)]
    need = ("rgb", "depth") if stage in ("kd", "meta") else (stages.MODALITY[stage],)
    for i, root in enumerate(roots):
        # a modality the manifest lacks makes read_split raise its error before reading a shard
        lacking = [m for m in need if m not in read_manifest(root)["modalities"]]
        for split in ("train", "val", "test") if i == 0 else ("train",):  # roots[0]: eval set
            read_split(root, split, ["id", *lacking])
    return roots


def _run_name(stage: str, key: str) -> str:
    """The Ray Train run of a stage key, stable: ``{store}/_ray/{name}`` holds its checkpoints."""
    return f"{stage}-{key[:20]}"


def _train_ray(stage: str, cfg: Config, key: str, spec: dict, upstream: dict[str, Artifact],
               store: Store, *, workers: int, gpus_per_worker: float, address: str | None,
               max_failures: int) -> Artifact:
    """One stage under a ``TorchTrainer`` (the driver holds the key's writer lock)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    check_datasets(stage, cfg)  # renders a synthetic set once here, not in every worker
    init_ray(address)
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    # the worker's CPU share, no more than one node holds
    threads = cfg.run.threads or max(1, int(min(cpus // workers, biggest)))
    preflight(workers, threads, gpus_per_worker)
    storage_path, storage_fs = store.ray_storage()
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "key": key, "spec": spec,
                           "upstream": {d: str(a.path) for d, a in upstream.items()},
                           "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": threads,
                                                           "GPU": gpus_per_worker}),
        # a stable name per stage key: rerunning the same command resumes from the latest
        # checkpoint that Ray Train keeps there (ray.train.get_checkpoint in the workers)
        run_config=RunConfig(name=_run_name(stage, key), storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[_stop_on_user_error()]),  # a user error: no retries
    )
    stages._say(f"{stage}: Ray Train, {workers} worker(s) x {threads} CPU"
                f"{f' + {gpus_per_worker:g} GPU' if gpus_per_worker else ''} -> "
                f"{store.describe(stage, key)}")
    try:
        trainer.fit()
    except TrainingFailedError as e:
        err = unwrap_user_error(e)  # the worker's own error, class and message
        if err is None:
            raise
        if isinstance(err, NumericalError):  # a diverged run is nothing to resume
            where = f"{storage_path}/{_run_name(stage, key)}"
            with contextlib.suppress(OSError):
                if storage_fs is None:
                    shutil.rmtree(where)
                else:
                    storage_fs.delete_dir(where)
        raise err from None
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
    every node reaches (a shared folder or a URI). A user error in the task is not retried
    (``max_retries`` covers a lost worker; ``retry_exceptions`` stays off): ``ray.get`` raises
    a ``RayTaskError`` whose ``unwrap_user_error`` is that error, class and message."""
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1,
                      retry_exceptions=False)(_stage_in_task)
    return task.remote(stage, absolute_paths(cfg).to_dict(), cpus)
