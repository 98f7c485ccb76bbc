"""Hyperparameter sweeps: Ray Tune runs the trials, Optuna proposes them.

The search space is a YAML file (``tune_spaces/*.yaml``, format and checks in
:mod:`cmkg.cluster.spaces`). The study lives in a database: SQLite under the store by default,
any SQLAlchemy URL (PostgreSQL) with ``--storage``. A trial is a function that resolves its
config and runs the stage in-process inside the trial (``stages.run_stage``: the trial already
holds its CPUs/GPU, so no Ray Train start-up); stages shared by trials (the teacher, a student,
a phi) are cache hits in the artifact store after the first trial that needs them. Results go
to ``{store}/_tune/{name}``: Ray Tune's experiment (``--resume`` continues it), ``optuna.db``
and the summary files of :mod:`cmkg.cluster.tune_results` (``trials.csv``,
``trials.parquet``, ``best.yaml``, the plots). ``cmkg report tune DIR [--storage URL]``
rebuilds ``trials.parquet`` and the plots from the study alone; ``optuna-dashboard
sqlite:///DIR/optuna.db`` browses it (``pip install optuna-dashboard``; the study is named after
DIR).

Early stopping. Every trial reports after each validated epoch (``val_epe_mm``,
``val_auc_20_50``, ``epoch``: that epoch's validation; the last epoch is reported once, with
the kept weights' best validation and their test metrics, after the stage published). A space
may stop the weak trials early with ``scheduler:``: Ray Tune's ASHA over epochs, or an Optuna
pruner, which ``ray_compat.PruningSearch`` sets on the study and the ``ray_compat.OptunaPruning``
scheduler applies (Ray's ``OptunaSearch`` always runs a ``NopPruner``). Either way a stopped
trial reaches Optuna as PRUNED (with its last epoch's value), an errored one as FAIL, and only a
trial whose stage published is COMPLETE and can be the best. A stopped trial's stage is never
published: when Tune stops it inside its epoch report, the trial removes the stage's
``{key}.partial/`` under the stage's writer lock, so a later trial that samples the same config
trains it from scratch, is judged at every rung like any other, and ends as an uninterrupted
run would. (A trial that the time budget ends mid-epoch may leave its checkpoint; a later run
of that config resumes it, printing ``resuming ... after epoch N/E``, and ends exactly as an
uninterrupted run.)

Budgets: ``trials`` and ``time_budget_s`` (seconds of Tune's wall time) in the space file, or
``--trials N`` / ``--time-budget S`` on the command line, which win (and name a sweep of their
own). At the budget's end Tune stops the running trials, which become PRUNED
(:func:`settle`), and the summary is written as usual; with no finished trial ``cmkg tune``
exits with status 2 after writing it. Resources: each trial is a worker holding
``cpus_per_worker`` CPUs (0: every CPU of the biggest node; also its torch threads) and
``gpus_per_worker`` GPUs, from the space file or ``run_tune``'s keyword arguments
(``--cpus-per-worker`` / ``--gpus-per-worker``), which win and do not rename the sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune import Callback

from cmkg import config as config_mod
from cmkg import tracking
from cmkg.cluster import ray_compat
from cmkg.cluster.spaces import Param, Space, load_space, make_pruner, trial_config, trial_params
from cmkg.cluster.tune_results import (
    PLOTS,
    REPORTED,
    finished,
    record_attrs,
    report_tune,
    summarise,
    write_results,
)
from cmkg.config import Config
from cmkg.console import duration
from cmkg.errors import UserError
from cmkg.metrics import selection_val_epe

# names callers imported from here before the split into spaces / tune_results / ray_compat;
# Space and Param also resolve the searcher state that sweeps started then pickled
__all__ = ["PLOTS", "REPORTED", "Param", "Progress", "Space", "experiment_name", "finished",
           "load_space", "report_tune", "run_tune", "settle", "summarise", "trial_config",
           "trial_params", "write_results"]


# -- progress ---------------------------------------------------------------------------------

def describe_params(params: dict) -> str:
    """``regularizer.form=l2 sigma=3.1e-05``: a key's section is named once in a row."""
    out, section = [], None
    for name, value in params.items():
        head, _, leaf = name.rpartition(".")
        shown = leaf if head and head == section else name
        section = head
        out.append(f"{shown}={value:.3g}" if isinstance(value, float) else f"{shown}={value}")
    return " ".join(out)


class Progress(Callback):
    """One line on stderr per finished trial: its state (PRUNED with the epoch it stopped at),
    its metric, the best so far, its parameters, its wall time and the sweep's ETA."""

    def __init__(self, *, total: int, metric: str, mode: str, decode: dict[str, dict],
                 budget_s: float | None = None):
        self.total, self.metric, self.mode, self.decode = total, metric, mode, decode
        self.budget_s = budget_s
        self.start, self.done, self.done_before = time.monotonic(), 0, 0
        self.best: tuple[float, int] | None = None  # (value, finished-trial count)

    def setup(self, **info):  # also when a sweep resumes: its ETA counts from now
        self.start, self.done_before = time.monotonic(), self.done

    def _count(self, state: str, value) -> None:
        self.done += 1
        if state == "COMPLETE" and value is not None:
            better = self.best is None or (value < self.best[0] if self.mode == "min"
                                           else value > self.best[0])
            if better:
                self.best = (value, self.done)

    def _eta(self) -> float:
        elapsed = time.monotonic() - self.start
        left = elapsed / max(self.done - self.done_before, 1) * (self.total - self.done)
        if self.budget_s:
            left = min(left, max(self.budget_s - elapsed, 0.0))
        return left

    def line(self, state: str, result: dict, config: dict, note: str = "") -> str:
        value = result.get(self.metric)
        self._count(state, value)
        parts = [f"trial {self.done}/{self.total} {state}"]
        if state == "PRUNED":
            epoch = result.get("epoch")
            parts.append(f"at epoch {epoch}" if epoch else "before its first epoch")
        if note:
            parts.append(f"({note})")
        if value is not None:
            parts.append(f"{self.metric} {value:.2f}")
        if self.best is not None:
            parts.append(f"(best {self.best[0]:.2f}, trial {self.best[1]})")
        parts.append(describe_params(trial_params(config, self.decode)))
        wall = result.get("time_total_s")
        if wall is not None:
            parts.append(f" {duration(wall)}")
        if self.done < self.total and not note:  # a note ends the sweep (the time budget)
            parts.append(f" ETA {duration(self._eta())}")
        return " ".join(parts)

    def say(self, *args, **kwargs) -> None:
        print(self.line(*args, **kwargs), file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self.say("COMPLETE" if finished(result) else "PRUNED", result, trial.config)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say("FAIL", trial.last_result or {}, trial.config)


# -- one trial --------------------------------------------------------------------------------

def _drop_partial(store, stage: str, key: str, epoch: int) -> None:
    """The checkpoint of a trial Tune stopped: removed (under the stage's writer lock), so no
    later run takes a judged-and-stopped run for one to continue."""
    store.drop_partial(stage, key)
    print(f"{stage}: the sweep stopped this trial after epoch {epoch}; removed its checkpoint "
          f"{store.partial(stage, key)} (the stage stays unpublished)", file=sys.stderr,
          flush=True)


def _trial(params: dict, *, base: dict, stage: str, threads: int, source: str,
           decode: dict[str, dict], seeds: list[int] | None = None,
           tracking_context: dict | None = None) -> None:
    """One trial: its config (the base config's dict with the sampled parameters, its CPUs as
    torch threads, no progress bar; one ``from_dict`` per seed), the stage run in this process
    (it already holds its CPUs/GPU: no Ray Train start-up) once per seed of the space's
    ``seeds`` (or once, at the base config's ``run.seed``), then the final metrics: each the
    mean over the seeds, the seeds' own values beside them (``per_seed``). Only the first seed's
    validated epochs are reported while it trains (what ASHA and the pruners judge); a trial
    stopped there never trains the other seeds. (Tune's ``Tuner.restore`` checks the
    trainable's name: keep it.)"""
    from cmkg import stages

    sampled = {**trial_params(params, decode), "run.threads": threads, "run.progress": "none"}
    runs = []
    # run.tracking: the trial is a run under the sweep's, its stages' runs under it
    with tracking.trial(tracking_context, lambda: tune.get_context().get_trial_id(),
                        trial_params(params, decode)) as tracked:
        for i, seed in enumerate(seeds or [None]):
            cfg = trial_config(base, sampled if seed is None else {**sampled, "run.seed": seed},
                               source)
            on_epoch = _epoch_reporter(cfg, stage) if i == 0 else None
            art = stages.run_stage(stage, cfg, on_epoch=on_epoch)
            runs.append((cfg.run.seed, _final_metrics(art, stages.Store.of(cfg),
                                                      getattr(cfg.epochs, stage))))
        per_seed = dict(runs)
        mean = {k: float(sum(m[k] for m in per_seed.values()) / len(per_seed)) for k in REPORTED}
        tracked.metrics(mean)
    first = per_seed[runs[0][0]]
    tune.report({**mean, "epoch": first["epoch"], "artifact": first["artifact"],
                 "per_seed": json.dumps({str(s): m for s, m in per_seed.items()})})


def _epoch_reporter(cfg, stage: str):
    """The ``on_epoch`` callback of a trial's (first) stage run: every validated epoch but the
    last to Tune; when Tune stops the trial there, the stage's checkpoint is dropped."""
    from cmkg import stages

    store, key = stages.Store.of(cfg), stages.plan(stage, cfg)[-1].key
    epochs = getattr(cfg.epochs, stage)

    def on_epoch(epoch: int, record: dict) -> None:
        if "val" not in record or epoch >= epochs:  # the last one is reported after publishing
            return
        try:
            tune.report({"val_epe_mm": record["val"]["epe_mm"],
                         "val_auc_20_50": record["val"]["auc_20_50"], "epoch": epoch})
        except ray_compat.TRIAL_STOPPED:  # Tune stopped it here (ASHA, the pruner, the budget)
            _drop_partial(store, stage, key, epoch)
            raise

    return on_epoch


def _final_metrics(art, store, epochs: int) -> dict:
    """A published stage's figures as a trial reports them: the kept weights' best validation
    EPE and that epoch's AUC, the test metrics, the last epoch, the artifact."""
    m = art.metrics
    # the epoch whose weights the stage keeps (optim.keep: best validation EPE, or the last)
    # gives the validation AUC; with keep: average, the average recorded in the last epoch
    kept = [h.get("average", h) for h in m["history"]
            if h.get("epoch") == m.get("best_epoch") and "val" in h.get("average", h)]
    best = kept[0] if kept else min(m["history"], key=lambda h: h.get("val", {}).get(
        "epe_mm", float("inf")))
    return {"val_epe_mm": selection_val_epe(m),  # the figure every chooser ranks by
            "val_auc_20_50": best.get("val", {}).get("auc_20_50", float("nan")),
            "test_epe_mm": m["test"]["epe_mm"], "test_auc_20_50": m["test"]["auc_20_50"],
            "epoch": m["history"][-1]["epoch"] if m["history"] else epochs,
            "artifact": store.describe(art.stage, art.key)}


# -- the sweep --------------------------------------------------------------------------------

def experiment_name(space: Space, base: Config | dict) -> str:
    """Stable per (space file content, base config, command-line budgets): rerunning the same
    command finds it."""
    data = base.to_dict() if isinstance(base, Config) else base
    text = Path(space.path).read_text() + json.dumps(data, sort_keys=True)
    if space.cli:
        text += json.dumps(space.cli, sort_keys=True)
    return f"{Path(space.path).stem}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass
class SweepPaths:
    local: Path  # results on this machine (the store's mirror if the store is remote)
    ray_root: str  # where Ray Tune keeps its experiments, on ``ray_fs``
    ray_fs: object | None  # the store's pyarrow filesystem, None for a local store
    experiment: str  # Ray Tune's experiment of this sweep

    @classmethod
    def of(cls, store, name: str) -> SweepPaths:
        local = Path(store.root) / "_tune" / name
        if store.remote:
            return cls(local, f"{store.base}/_tune", store.fs, f"{store.base}/_tune/{name}")
        return cls(local, str(local.parent), None, str(local))


def make_scheduler(space: Space, search):
    """Ray Tune's ASHA over epochs, the scheduler that applies the study's pruner, or None."""
    if space.scheduler is None:
        return None
    if "asha" in space.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", **space.scheduler["asha"])
    return ray_compat.OptunaPruning(search)


def _worker_cpus(space: Space) -> int:
    """CPUs per trial: the space's, or every CPU of the biggest node; more than the biggest
    node has is refused (trials would wait forever)."""
    import ray

    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")),
                  default=1)
    cpus = space.cpus_per_worker or int(biggest)
    if cpus > biggest:
        raise UserError(f"{space.path}: cpus_per_worker={cpus} but the largest Ray node has "
                        f"{biggest:g} CPUs; trials would wait forever")
    return cpus


def study_storage(paths: SweepPaths, storage: str | None) -> str:
    """The Optuna storage URL of a sweep: ``storage`` (``--storage``), else the store's one
    SQLite database ``{store}/_tune/optuna.db`` that every sweep of the store shares (one study
    per sweep, named after it), except for a sweep started before that, which keeps the
    ``optuna.db`` in its own folder."""
    if storage:
        return storage
    own = paths.local / "optuna.db"
    return f"sqlite:///{own if own.is_file() else paths.local.parent / 'optuna.db'}"


def _open_study(space: Space, name: str, url: str, *, new: bool):
    """The sweep's Optuna study (created or loaded) and its storage; its metric's name
    (``set_metric_names``: what optuna-dashboard and the plots label the value with) and the
    user attributes `cmkg report tune` reads. A ``new`` sweep's ``enqueue`` points go into the
    study first, in order (``enqueue_trial``, skipping any the study already holds), so the
    first trials Tune asks for are those."""
    import warnings

    import optuna

    rdb = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=rdb, load_if_exists=True,
                                direction="minimize" if space.mode == "min" else "maximize")
    with warnings.catch_warnings():  # set_metric_names is marked experimental (Optuna 3.2-5)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([space.metric])
    attrs = {"metric": space.metric, "stage": space.stage, "space": space.path,
             "seeds": space.seeds}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    if new:
        for point in space.fixed_points():
            study.enqueue_trial(point, skip_if_exists=True)
    return study, rdb


def _new_tuner(trainable, space: Space, search, name: str, paths: SweepPaths, progress):
    from ray.tune.search import ConcurrencyLimiter

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(search, max_concurrent=space.concurrency),
            scheduler=make_scheduler(space, search), num_samples=space.trials,
            time_budget_s=space.time_budget_s, reuse_actors=True,
            metric=space.metric, mode=space.mode),
        run_config=tune.RunConfig(name=name, storage_path=paths.ray_root,
                                  storage_filesystem=paths.ray_fs, callbacks=[progress],
                                  failure_config=tune.FailureConfig(max_failures=1)))


def run_tune(space_path: str, base_config: str | None, overrides: list[str], *,
             resume: bool = False, storage: str | None = None, address: str | None = None,
             trials: int | None = None, time_budget_s: float | None = None,
             cpus_per_worker: int | None = None, gpus_per_worker: float | None = None) -> dict:
    """Run (or, with ``resume``, continue) the sweep; returns the best trial's summary.
    ``trials``, ``time_budget_s``, ``cpus_per_worker`` and ``gpus_per_worker`` override the
    space file's."""
    import optuna

    from cmkg.cluster.connect import absolute_paths, init_ray
    from cmkg.stages import Store

    space = load_space(space_path, base_config, overrides, trials=trials,
                       time_budget_s=time_budget_s, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker)
    base_cfg = absolute_paths(config_mod.load(base_config, list(overrides) + space.set))
    base = base_cfg.to_dict()  # how the trials get it: each applies its parameters to it
    name = experiment_name(space, base)
    tracking.tag_command(sweep=name)  # run.tracking: on the command's run and its trials'
    paths = SweepPaths.of(Store.of(base_cfg), name)
    restorable = tune.Tuner.can_restore(paths.experiment, storage_filesystem=paths.ray_fs)
    if restorable and not resume:
        raise UserError(f"sweep {name} already exists at {paths.experiment}; pass --resume to "
                        "continue it (or change the space or config for a new one)")

    init_ray(address)
    cpus = _worker_cpus(space)
    paths.local.mkdir(parents=True, exist_ok=True)
    url = study_storage(paths, storage)
    study, rdb = _open_study(space, name, url, new=not restorable)
    sampler = (optuna.samplers.TPESampler(seed=space.seed) if space.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=space.seed))
    search = ray_compat.PruningSearch(space=space.define_by_run, metric=space.metric,
                                      mode=space.mode, sampler=sampler, study_name=name,
                                      storage=rdb, pruner=make_pruner(space))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, stage=space.stage, threads=cpus,
                             source=space.path, decode=space.decoders(), seeds=space.seeds,
                             tracking_context=tracking.current()),
        {"cpu": cpus, "gpu": space.gpus_per_worker})
    progress = Progress(total=space.trials, metric=space.metric, mode=space.mode,
                        decode=space.decoders(), budget_s=space.time_budget_s)
    stopping = f"; scheduler {json.dumps(space.scheduler)}" if space.scheduler else ""
    budget = f"; time budget {space.time_budget_s:g}s" if space.time_budget_s else ""
    seeds = (f"; each the mean over seeds {', '.join(map(str, space.seeds))}"
             if space.seeds and len(space.seeds) > 1 else "")
    queued = f"; {len(space.enqueue)} enqueued point(s) first" if space.enqueue else ""
    print(f"sweep {name}: {space.trials} trials of {space.stage}{seeds}, {space.concurrency} at "
          f"a time x {cpus} CPU{stopping}{budget}{queued}; study {name} in {url}; results "
          f"{paths.experiment}", file=sys.stderr, flush=True)
    if restorable:
        tuner = tune.Tuner.restore(paths.experiment, trainable, resume_errored=True,
                                   storage_filesystem=paths.ray_fs)
    else:
        tuner = _new_tuner(trainable, space, search, name, paths, progress)
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout is the summary
        results = tuner.fit()
    budget_hit = bool(space.time_budget_s) and time.monotonic() - started >= space.time_budget_s
    if budget_hit:
        settle(study, results, progress)
    return summarise(results, space, base_config, list(overrides), paths.local,
                     study, budget_hit=budget_hit)


def settle(study, results, progress) -> None:
    """Trials the time budget stopped: Tune stops them without telling the searcher, so their
    Optuna trials are still RUNNING. They become PRUNED (FAIL if they errored) with the last
    metrics Tune holds for them, and get their progress line."""
    from optuna.trial import TrialState

    by_id = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    trials = study.get_trials(deepcopy=False)
    progress.done = max(progress.done, sum(t.state.is_finished() for t in trials))
    for frozen in trials:
        if frozen.state != TrialState.RUNNING:
            continue
        r = by_id.get(frozen.user_attrs.get("tune_trial_id"))
        result = dict(r.metrics) if r is not None else {}
        trial = ray_compat.running_trial(study, frozen)
        if result:
            record_attrs(trial, result)
        value, epoch = result.get(progress.metric), result.get("epoch")
        if r is not None and r.error is not None:
            state, value = TrialState.FAIL, None
        elif finished(result):
            state = TrialState.COMPLETE
        else:  # stopped: Optuna keeps the last epoch's value
            state = TrialState.PRUNED
            if value is not None and epoch is not None and epoch not in frozen.intermediate_values:
                trial.report(value, int(epoch))
            value = None
        study.tell(frozen.number, value, state=state)
        # a trial stopped before it wrote a result has no config in Tune's results
        config = (r.config or {}) if r is not None else {}
        progress.say(state.name, result, config, note="time budget")
