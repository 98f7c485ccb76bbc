"""Stages under Ray Train: ``TorchTrainer`` with N data-parallel workers, checkpoints through
``ray.train.report``, resume through ``ray.train.get_checkpoint`` and a stable run name.

Each worker runs the project's own training loop, ``stages.train_node``, unchanged; what Ray
supplies is passed in and marked ``# ray``: the device, DDP via ``prepare_model`` for the
teacher, student, kd and target stages (the meta stage keeps the bare module and averages its
gradients by hand, see ``cmkg.parallel``), ``prepare_data_loader`` for the distributed sampler,
and ``RayCheckpoints`` (``report`` with the per-epoch checkpoint, ``get_checkpoint`` to resume).
The planned node travels to the workers as it is: nothing is planned again there. Rank 0
publishes the artifact into the store, which on a cluster must be one every node reaches: a
shared folder (NFS/EFS) or a URI (``s3://...``); Ray's checkpoints go to ``{store}/_ray`` on the
same filesystem.

Ray Train's fixed cost (worker actors, placement group, process group: about 20 s a stage on
2 cores) is worth paying only for several workers; one worker trains in-process
(``stages.run_stage``, or a Ray task: ``cmkg.cluster.tasks``).

Bad input fails here as it does in-process: one message, no retries. The driver checks the
datasets before Ray Train starts (``check_datasets``); a user error raised in a worker (one the
driver cannot foresee, e.g. a loss that diverges) ends the run at once (``_stop_on_user_error``)
and ``train_ray`` raises it as itself. Crashes and lost nodes keep Ray's retries and tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from cmkg import stages, tracking
from cmkg.cluster.connect import absolute_paths, init_ray, portable, preflight
from cmkg.config import Config
from cmkg.console import say
from cmkg.errors import NumericalError, UserError, unwrap_user_error
from cmkg.stages import Artifact, Node, Store

CKPT = "checkpoint.pt"


class RayCheckpoints:
    """A worker's checkpoints: every rank reports each epoch's metrics, rank 0 with the
    checkpoint; a restarted run resumes from the latest one Ray Train registered."""

    def __init__(self, rank: int):
        self.rank = rank

    def load(self, device: torch.device) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # ray: resume after a failure or a rerun
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / CKPT, map_location=device, weights_only=False)

    def save(self, blob, state) -> None:
        import ray.train

        record = state.history[-1]
        metrics = {"epoch": state.epoch, **record["train"],
                   **{f"val_{k}": v for k, v in record.get("val", {}).items()}}
        with tempfile.TemporaryDirectory() as d:
            if self.rank == 0:
                torch.save(blob(), Path(d) / CKPT)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)  # ray: every worker reports each epoch

    def discard(self) -> None:
        """Nothing here: the driver removes the run's folder (``train_ray``)."""


def _worker_main(config: dict) -> None:
    """Each Ray Train worker's function: ``train_node`` with Ray's device, DDP, sampler and
    checkpoints. A user error (bad data, a loss that diverged) is raised as itself, for the
    driver to report in one line and not retry (see ``_stop_on_user_error``), and its traceback
    is kept off the console."""
    import ray.train  # ray
    import ray.train.torch  # ray

    node: Node = config["node"]
    try:
        upstream = {d: stages.open_artifact(p) for d, p in config["upstream"].items()}
        rank = ray.train.get_context().get_world_rank()  # ray
        torch.set_num_threads(max(1, int(config["threads"])))
        with tracking.using(config.get("tracking")):  # the command's parent run, if tracked
            stages.train_node(node, upstream, Store.of(node.cfg),
                              device=ray.train.torch.get_device(),  # ray
                              checkpoints=RayCheckpoints(rank),
                              wrap=ray.train.torch.prepare_model,  # ray: DDP (not for meta)
                              prepare_loader=ray.train.torch.prepare_data_loader,  # ray: sampler
                              publishes=rank == 0)
    except UserError as e:
        name = f"{type(e).__module__}.{type(e).__qualname__}: "
        _quiet_console(lambda r: r.getMessage().startswith("Error in training function")
                       and name in r.getMessage())
        raise


def _quiet_console(drop) -> None:
    """Keep the log records ``drop(record)`` selects off the console of this process (and so off
    the driver's terminal); Ray Train's log files under ``{session}/logs/train`` keep them."""
    import logging

    for handler in logging.getLogger("ray.train").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.addFilter(lambda record: not drop(record))


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


def check_datasets(stage: str, cfg: Config) -> list[Path]:
    """On the driver, before any worker starts, what every worker would fail on alike: each
    dataset the stage reads has a valid manifest and the modalities the stage needs, and its
    shards are there, match their sha256 and open (``read_split``: the in-process path's checks
    and messages). Renders a synthetic dataset (mirrors a remote one) on first use; returns the
    local folders."""
    from cmkg.data import read_manifest, read_split

    roots = [stages.ensure_dataset(s, cfg) for s in stages.stage_datasets(stage, cfg)]
    need = stages.DEFS[stage].reads
    for i, root in enumerate(roots):
        # a modality the manifest lacks makes read_split raise its error before reading a shard
        lacking = [m for m in need if m not in read_manifest(root)["modalities"]]
        for split in ("train", "val", "test") if i == 0 else ("train",):  # roots[0]: eval set
            read_split(root, split, ["id", *lacking])
    return roots


def run_stage_ray(stage: str, cfg: Config, *, workers: int, gpus_per_worker: float = 0.0,
                  address: str | None = None, max_failures: int = 3) -> Artifact:
    """Run ``stage`` (and missing upstream stages, each the same way) under Ray Train."""
    cfg = absolute_paths(cfg)
    train = functools.partial(train_ray, workers=workers, gpus_per_worker=gpus_per_worker,
                              address=address, max_failures=max_failures)
    return stages.run_plan(stages.plan(stage, cfg), Store.of(cfg), train=train)


def _run_name(stage: str, key: str) -> str:
    """The Ray Train run of a stage key, stable: ``{store}/_ray/{name}`` holds its checkpoints."""
    return f"{stage}-{key[:20]}"


def _threads(cfg: Config, workers: int) -> int:
    """A worker's CPUs: ``run.threads``, else an equal share of the cluster, no more than one
    node holds."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return cfg.run.threads or max(1, int(min(cpus // workers, biggest)))


def train_ray(node: Node, upstream: dict[str, Artifact], store: Store, *, workers: int,
              gpus_per_worker: float = 0.0, address: str | None = None,
              max_failures: int = 3) -> Artifact:
    """One node under a ``TorchTrainer`` (the driver holds the key's writer lock)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    node = portable(node)
    stage, key = node.stage, node.key
    check_datasets(stage, node.cfg)  # renders a synthetic set once here, not in every worker
    init_ray(address)
    threads = _threads(node.cfg, workers)
    preflight(workers, threads, gpus_per_worker)
    storage_path, storage_fs = store.ray_storage()
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"node": node, "threads": threads, "tracking": tracking.for_node(key),
                           "upstream": {d: str(a.path.resolve()) for d, a in upstream.items()}},
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
    say(f"{stage}: Ray Train, {workers} worker(s) x {threads} CPU"
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
