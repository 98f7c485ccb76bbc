"""Hyperparameter sweeps: Ray Tune runs the trials, Optuna proposes them.

A *search space* is a YAML file (``tune_spaces/*.yaml``)::

    stage: target              # the stage each trial runs (its missing inputs first)
    metric: val_epe_mm         # val_epe_mm (min) or val_auc_20_50 (max): validation, never test
    trials: 24
    concurrency: 1             # trials at once; each holds cpus_per_trial (+ gpus_per_trial)
    cpus_per_trial: 2
    sampler: tpe               # tpe | random
    seed: 0
    set: [run.eval_every=1]    # fixed overrides for every trial
    time_budget_s: 3600        # optional: stop the sweep after this many seconds
    scheduler: {asha: {grace_period: 1, reduction_factor: 2}}   # optional: early stopping
    params:                    # dotted config keys, sampled in this order
      regularizer.form: {choice: [l2, weighted_l2]}
      regularizer.sigma: {float: [1.0e-6, 1.0e-3], log: true, when: {regularizer.form: [l2]}}
      meta.inner_steps: {int: [1, 3], when: {regularizer.form: [weighted_l2]}}

Optuna samples define-by-run, so ``when`` makes a parameter exist only for some values of an
earlier one. The study lives in a database: SQLite under the store by default, any SQLAlchemy
URL (PostgreSQL) with ``--storage``. A trial is a function that resolves its config and runs the
stage in-process inside the trial (``stages.run_stage``: the trial already holds its CPUs/GPU,
so no Ray Train start-up); stages shared by trials (the teacher, a student, a phi) are cache hits
in the artifact store after the first trial that needs them. Results go to
``{store}/_tune/{name}``: Ray Tune's experiment (``--resume`` continues it), ``optuna.db``,
``trials.csv`` (Ray Tune's table), ``trials.parquet`` (one row per Optuna trial: number, state,
``params_*``, the last value of every reported metric, epochs run, wall time, artifact),
``best.yaml`` (the best trial's parameters, metrics and the command that retrains it) and the
PNG plots of ``optuna.visualization.matplotlib`` (optimization history, parallel coordinates,
slices, and parameter importances once two trials finished over two parameters).
``cmkg report tune DIR [--storage URL]`` rebuilds ``trials.parquet`` and the plots from the
study alone; ``optuna-dashboard sqlite:///DIR/optuna.db`` browses it (``pip install
optuna-dashboard``; the study is named after DIR).

Early stopping. Every trial reports after each validated epoch (``val_epe_mm``,
``val_auc_20_50``, ``epoch``: that epoch's validation; the last epoch is reported once, with
the kept weights' best validation and their test metrics, after the stage published). A space
may stop the weak trials early with ``scheduler:``, one of::

    scheduler: {asha: {grace_period: 1, reduction_factor: 2, max_t: 8}}   # Ray Tune's ASHA
    scheduler: {optuna_pruner: {median: {n_startup_trials: 5, n_warmup_steps: 1}}}
    scheduler: {optuna_pruner: {successive_halving: {min_resource: 1, reduction_factor: 3}}}

ASHA counts in epochs (``time_attr: epoch``); ``max_t`` defaults to the stage's epochs and may
not be below them (every trial would stop unpublished). Ray's ``OptunaSearch`` always runs a
``NopPruner``; an ``optuna_pruner`` is set on the study by ``tune_hooks.PruningSearch`` and
applied by the ``tune_hooks.OptunaPruning`` scheduler, which reports each epoch to the study
and stops the trial when the pruner says so. Either way a stopped trial reaches Optuna as PRUNED
(with its last epoch's value), an errored one as FAIL, and only a trial whose stage published
is COMPLETE and can be the best. A stopped trial's stage is never
published: when Tune stops it inside its epoch report, the trial removes the stage's
``{key}.partial/`` under the stage's writer lock, so a later trial that samples the same config
trains it from scratch, is judged at every rung like any other, and ends as an uninterrupted
run would. (A trial that the time budget ends mid-epoch may leave its checkpoint; a later run
of that config resumes it, printing ``resuming ... after epoch N/E``, and ends exactly as an
uninterrupted run.)

Budgets: ``trials`` and ``time_budget_s`` (seconds of Tune's wall time) in the space file, or
``--trials N`` / ``--time-budget S`` on the command line, which win (and name a sweep of their
own). At the budget's end Tune stops the running trials, which become PRUNED, and the summary is
written as usual; with no finished trial ``cmkg tune`` exits with status 2 after writing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmkg import config as config_mod
from cmkg.atomic import atomic_path, write_text, write_yaml
from cmkg.config import Config, ConfigError
from cmkg.errors import UserError

METRICS = {"val_epe_mm": "min", "val_auc_20_50": "max"}
KINDS = ("float", "int", "choice")
SPACE_KEYS = ("stage", "metric", "trials", "concurrency", "cpus_per_trial", "gpus_per_trial",
              "sampler", "seed", "set", "params", "scheduler", "time_budget_s")
# scheduler kind -> its entries and their defaults (None: the stage's epochs)
ASHA = {"grace_period": 1, "reduction_factor": 2, "max_t": None}
PRUNERS = {"median": {"n_startup_trials": 5, "n_warmup_steps": 0, "interval_steps": 1,
                      "n_min_trials": 1},
           "successive_halving": {"min_resource": "auto", "reduction_factor": 4,
                                  "min_early_stopping_rate": 0, "bootstrap_count": 0}}
REPORTED = ("val_epe_mm", "val_auc_20_50", "test_epe_mm", "test_auc_20_50")  # trials report these
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")


def finished(result: dict | None) -> bool:
    """Whether a trial's result is its final one: only the report after the stage published
    carries test metrics."""
    return bool(result) and "test_epe_mm" in result


@dataclass
class Param:
    name: str  # dotted config key
    kind: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)  # earlier param -> allowed values

    def active(self, sampled: dict) -> bool:
        return all(k in sampled and sampled[k] in v for k, v in self.when.items())

    def suggest(self, trial):
        """The sampled value (Optuna sees lists and mappings among the choices as JSON)."""
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.name,
                                                         [self.encode(c) for c in self.choices]))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    @staticmethod
    def encode(choice):
        return json.dumps(choice) if isinstance(choice, (list, dict)) else choice

    def decode(self, value):
        return next((c for c in self.choices if self.encode(c) == value), value)

    def examples(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


@dataclass
class Space:
    path: str
    stage: str
    params: list[Param]
    metric: str = "val_epe_mm"
    trials: int = 16
    concurrency: int = 1
    cpus_per_trial: int = 0  # 0: every CPU of the biggest node
    gpus_per_trial: float = 0.0
    sampler: str = "tpe"
    seed: int = 0
    set: list[str] = field(default_factory=list)
    scheduler: dict | None = None  # {"asha": {...}} or {"optuna_pruner": {kind: {...}}}, filled in
    time_budget_s: float | None = None
    cli: dict = field(default_factory=dict)  # budgets given on the command line (name the sweep)

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def decoders(self) -> dict[str, dict]:
        """param -> {JSON as Optuna stores it: the choice} for list/mapping choices."""
        return {p.name: {p.encode(c): c for c in p.choices} for p in self.params
                if p.kind == "choice" and any(isinstance(c, (list, dict)) for c in p.choices)}

    def define_by_run(self, trial) -> None:
        """Optuna's define-by-run space: parameters in file order, each only when its ``when``
        holds for the values sampled before it."""
        sampled: dict = {}
        for p in self.params:
            if p.active(sampled):
                sampled[p.name] = p.suggest(trial)


def _number(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _parse_param(name: str, spec, problems: list[str], earlier: list[str]) -> Param | None:
    where = f"params.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping like {{float: [low, high]}}")
        return None
    kinds = [k for k in KINDS if k in spec]
    extra = set(spec) - set(KINDS) - {"log", "when"}
    if len(kinds) != 1 or extra:
        problems.append(f"{where}: give exactly one of {', '.join(KINDS)} (plus log, when); "
                        f"got {sorted(spec)}")
        return None
    kind, value = kinds[0], spec[kinds[0]]
    p = Param(name, kind, log=bool(spec.get("log", False)))
    if kind == "choice":
        if not isinstance(value, list) or not value:
            problems.append(f"{where}.choice: expected a non-empty list")
            return None
        p.choices = value
    else:
        if isinstance(value, list):  # PyYAML reads 1.0e4 (no exponent sign) as a string
            value = [_number(v) for v in value]
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                and value[0] < value[1]):
            problems.append(f"{where}.{kind}: expected [low, high] numbers with low < high, "
                            f"got {value!r}")
            return None
        if p.log and value[0] <= 0:
            problems.append(f"{where}: log scale needs low > 0, got {value[0]}")
            return None
        p.low, p.high = value
    when = spec.get("when", {})
    if not isinstance(when, dict) or not all(isinstance(v, list) for v in when.values()):
        problems.append(f"{where}.when: expected {{earlier.param: [values]}}")
        return None
    for key in when:
        if key not in earlier:
            problems.append(f"{where}.when: {key!r} is not a parameter listed before {name}")
    p.when = when
    return p


def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _entries(where: str, spec, defaults: dict, problems: list[str]) -> dict | None:
    """``spec`` (a mapping or null) over ``defaults``; unknown entries are problems."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping of {', '.join(defaults)}, got {spec!r}")
        return None
    problems += [f"{where}.{k}: unknown entry (allowed: {', '.join(defaults)})"
                 for k in spec if k not in defaults]
    return {**defaults, **{k: _number(v) for k, v in spec.items() if k in defaults}}


def _parse_scheduler(spec, problems: list[str]) -> dict | None:
    """``scheduler:`` checked and filled with its defaults (ASHA's ``max_t`` stays None until
    the stage's epochs are known)."""
    kinds = ("asha", "optuna_pruner")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
        problems.append(f"scheduler: expected {{asha: {{...}}}} or {{optuna_pruner: {{median | "
                        f"successive_halving: {{...}}}}}}, got {spec!r}")
        return None
    kind, body = next(iter(spec.items()))
    if kind == "asha":
        asha = _entries("scheduler.asha", body, ASHA, problems)
        if asha is None:
            return None
        for key in ("grace_period", "max_t"):
            if asha[key] is not None and not _is_int(asha[key], 1):
                problems.append(f"scheduler.asha.{key}: must be an integer >= 1 (epochs), "
                                f"got {asha[key]!r}")
        rf = asha["reduction_factor"]
        if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
            problems.append(f"scheduler.asha.reduction_factor: must be a number > 1, got {rf!r}")
        if (_is_int(asha["grace_period"], 1) and _is_int(asha["max_t"], 1)
                and asha["grace_period"] > asha["max_t"]):
            problems.append(f"scheduler.asha.grace_period: {asha['grace_period']} is above "
                            f"max_t={asha['max_t']}")
        return {"asha": asha}
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in PRUNERS:
        problems.append(f"scheduler.optuna_pruner: expected one of {', '.join(PRUNERS)} with its "
                        f"entries, e.g. {{median: {{n_warmup_steps: 1}}}}, got {body!r}")
        return None
    name, entries = next(iter(body.items()))
    where = f"scheduler.optuna_pruner.{name}"
    pruner = _entries(where, entries, PRUNERS[name], problems)
    if pruner is None:
        return None
    lows = {"interval_steps": 1, "n_min_trials": 1, "reduction_factor": 2, "min_resource": 1}
    for key, value in pruner.items():
        if not (_is_int(value, lows.get(key, 0)) or (key == "min_resource" and value == "auto")):
            problems.append(f"{where}.{key}: must be an integer >= {lows.get(key, 0)}"
                            f"{' or auto' if key == 'min_resource' else ''}, got {value!r}")
    return {"optuna_pruner": {name: pruner}}


def load_space(path: str | Path, base_config: str | None = None,
               overrides: list[str] | None = None, *, trials: int | None = None,
               time_budget_s: float | None = None) -> Space:
    """Read and check a search-space file: every problem at once, naming the file and key;
    each parameter is tried at its bounds/choices against the config it will override.
    ``trials`` and ``time_budget_s`` (``--trials``, ``--time-budget``) override the file's."""
    path = Path(path)
    data = config_mod._read_yaml(path)
    problems = [f"{k}: unknown key (allowed: {', '.join(SPACE_KEYS)})"
                for k in data if k not in SPACE_KEYS]
    from cmkg.stages import STAGES

    stage = data.get("stage")
    if stage not in STAGES:
        problems.append(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    metric = data.get("metric", "val_epe_mm")
    if metric not in METRICS:
        problems.append(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    cli = {k: v for k, v in (("trials", trials), ("time_budget_s", time_budget_s))
           if v is not None}
    flags = {"trials": " (--trials)", "time_budget_s": " (--time-budget)"}
    for key, lo in (("trials", 1), ("concurrency", 1), ("cpus_per_trial", 0), ("seed", 0)):
        v = cli.get(key, data.get(key, getattr(Space, key)))
        if not _is_int(v, lo):
            problems.append(f"{key}{flags.get(key, '') if key in cli else ''}: must be an "
                            f"integer >= {lo}, got {v!r}")
    budget = _number(cli.get("time_budget_s", data.get("time_budget_s")))
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                               or not budget > 0):
        where = "time_budget_s" + (flags["time_budget_s"] if "time_budget_s" in cli else "")
        problems.append(f"{where}: must be a number of seconds > 0, got {budget!r}")
    scheduler = (_parse_scheduler(data["scheduler"], problems)
                 if data.get("scheduler") is not None else None)
    gpus = data.get("gpus_per_trial", 0.0)
    if not isinstance(gpus, (int, float)) or gpus < 0:
        problems.append(f"gpus_per_trial: must be a number >= 0, got {gpus!r}")
    if data.get("sampler", "tpe") not in ("tpe", "random"):
        problems.append(f"sampler: must be tpe or random, got {data.get('sampler')!r}")
    fixed = data.get("set", [])
    if not isinstance(fixed, list) or not all(isinstance(s, str) for s in fixed):
        problems.append("set: expected a list of key=value strings")
        fixed = []
    raw = data.get("params")
    params: list[Param] = []
    if not isinstance(raw, dict) or not raw:
        problems.append("params: expected a non-empty mapping of config keys to distributions")
        raw = {}
    for name, spec in raw.items():
        p = _parse_param(str(name), spec, problems, [q.name for q in params])
        if p is not None:
            params.append(p)
    if problems:
        raise ConfigError(str(path), problems)
    space = Space(path=str(path), stage=stage, params=params, metric=metric,
                  trials=cli.get("trials", data.get("trials", Space.trials)),
                  concurrency=data.get("concurrency", Space.concurrency),
                  cpus_per_trial=data.get("cpus_per_trial", Space.cpus_per_trial),
                  gpus_per_trial=float(gpus), sampler=data.get("sampler", "tpe"),
                  seed=data.get("seed", 0), set=fixed, scheduler=scheduler,
                  time_budget_s=None if budget is None else float(budget), cli=cli)
    base = config_mod.load(base_config, list(overrides or []) + fixed)
    asha = (scheduler or {}).get("asha")
    if asha is not None:  # epochs are known now: a trial stopped at max_t never publishes
        epochs = getattr(base.epochs, stage)
        if asha["max_t"] is None:
            asha["max_t"] = epochs
            if asha["grace_period"] > epochs:
                problems.append(f"scheduler.asha.grace_period: {asha['grace_period']} is above "
                                f"max_t={epochs} (epochs.{stage})")
        elif asha["max_t"] < epochs:
            problems.append(f"scheduler.asha.max_t: {asha['max_t']} is below epochs.{stage}="
                            f"{epochs}: every trial would be stopped before its stage finishes")
    for p in params:  # a misspelt key or an out-of-range bound fails here, not in trial 7
        for value in p.examples():
            try:
                trial_config(base, {p.name: value}, str(path))
            except ConfigError as e:  # only this key's problems: others may be joint
                problems += [f"params.{p.name}={value!r}: {m}" for m in e.problems
                             if m.split(":", 1)[0] == p.name]
    if problems:
        raise ConfigError(str(path), problems)
    return space


def trial_config(base: Config, params: dict, source: str) -> Config:
    """``base`` with the sampled parameters (dotted keys) applied, values kept exact."""
    data = base.to_dict()
    for name, value in params.items():
        node = data
        *parents, leaf = name.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:  # an optional section (data.augment) the trial switches on
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(source, [f"{name}: {part} is not a config section"])
            node = child
        node[leaf] = value
    return config_mod.from_dict(data, source)


def _flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _decoded(params: dict, decode: dict[str, dict]) -> dict:
    """Sampled values with list/mapping choices turned back from Optuna's JSON."""
    return {k: decode.get(k, {}).get(v, v) if isinstance(v, str) else v
            for k, v in params.items()}


def trial_params(config: dict, decode: dict[str, dict]) -> dict:
    """A Tune trial's config as the dotted parameters it sampled, choices decoded."""
    return _decoded(_flatten(config), decode)


def make_pruner(space: Space):
    """The Optuna pruner of an ``optuna_pruner`` space, else None."""
    import optuna

    pruner = (space.scheduler or {}).get("optuna_pruner")
    if pruner is None:
        return None
    kinds = {"median": optuna.pruners.MedianPruner,
             "successive_halving": optuna.pruners.SuccessiveHalvingPruner}
    (kind, entries), = pruner.items()
    return kinds[kind](**entries)


def make_scheduler(space: Space, search):
    """Ray Tune's ASHA over epochs, the scheduler that applies the study's pruner, or None."""
    if space.scheduler is None:
        return None
    if "asha" in space.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", **space.scheduler["asha"])
    from cmkg.cluster.tune_hooks import OptunaPruning

    return OptunaPruning(search)


def _drop_partial(store, stage: str, key: str, epoch: int) -> None:
    """The checkpoint of a trial Tune stopped: removed (under the stage's writer lock), so no
    later run takes a judged-and-stopped run for one to continue."""
    from cmkg import storage

    partial = store.final(stage, key).with_name(store.final(stage, key).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if store.remote and storage.exists(store.fs, f"{store.location(stage, key)}.partial"):
        store.fs.delete_dir(f"{store.location(stage, key)}.partial")
    print(f"{stage}: the sweep stopped this trial after epoch {epoch}; removed its checkpoint "
          f"{partial} (the stage stays unpublished)", file=sys.stderr, flush=True)


def _trial(params: dict, *, base: dict, stage: str, threads: int, source: str,
           decode: dict[str, dict]) -> None:
    """One trial: resolve the config, run the stage in this process (it already holds its
    CPUs/GPU: no Ray Train start-up), report every validated epoch, then the final metrics."""
    from ray import tune

    from cmkg import stages

    cfg = trial_config(config_mod.from_dict(base, source), trial_params(params, decode), source)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=threads,
                                                           progress="none"))
    store, key = stages.Store.of(cfg), stages.plan(stage, cfg)[-1].key
    epochs = getattr(cfg.epochs, stage)

    def on_epoch(epoch: int, record: dict) -> None:
        if "val" not in record or epoch >= epochs:  # the last one is reported after publishing
            return
        try:
            tune.report({"val_epe_mm": record["val"]["epe_mm"],
                         "val_auc_20_50": record["val"]["auc_20_50"], "epoch": epoch})
        except SystemExit:  # Tune stopped the trial here (ASHA, the pruner, the time budget)
            _drop_partial(store, stage, key, epoch)
            raise

    art = stages.run_stage(stage, cfg, on_epoch=on_epoch)
    m = art.metrics
    # the epoch whose weights the stage keeps (best validation EPE) gives the validation AUC
    best = min(m["history"], key=lambda h: h.get("val", {}).get("epe_mm", float("inf")))
    tune.report({"val_epe_mm": m["best_val_epe_mm"],
                 "val_auc_20_50": best.get("val", {}).get("auc_20_50", float("nan")),
                 "test_epe_mm": m["test"]["epe_mm"], "test_auc_20_50": m["test"]["auc_20_50"],
                 "epoch": m["history"][-1]["epoch"] if m["history"] else epochs,
                 "artifact": store.describe(stage, art.key)})


def experiment_name(space: Space, base: Config) -> str:
    """Stable per (space file content, base config, command-line budgets): rerunning the same
    command finds it."""
    text = Path(space.path).read_text() + json.dumps(base.to_dict(), sort_keys=True)
    if space.cli:
        text += json.dumps(space.cli, sort_keys=True)
    return f"{Path(space.path).stem}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def run_tune(space_path: str, base_config: str | None, overrides: list[str], *,
             resume: bool = False, storage: str | None = None, address: str | None = None,
             trials: int | None = None, time_budget_s: float | None = None) -> dict:
    """Run (or, with ``resume``, continue) the sweep; returns the best trial's summary."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from cmkg.cluster.train import absolute_paths, init_ray
    from cmkg.cluster.tune_hooks import Progress, PruningSearch
    from cmkg.stages import Store

    space = load_space(space_path, base_config, overrides, trials=trials,
                       time_budget_s=time_budget_s)
    base = absolute_paths(config_mod.load(base_config, list(overrides) + space.set))
    name = experiment_name(space, base)
    store = Store.of(base)
    local = Path(store.root) / "_tune" / name  # results on this machine (the mirror if remote)
    if store.remote:
        ray_root, ray_fs = f"{store.base}/_tune", store.fs
        exp_path = f"{ray_root}/{name}"
    else:
        ray_root, ray_fs = str(local.parent), None
        exp_path = str(local)
    restorable = tune.Tuner.can_restore(exp_path, storage_filesystem=ray_fs)
    if restorable and not resume:
        raise UserError(f"sweep {name} already exists at {exp_path}; pass --resume to continue "
                        "it (or change the space or config for a new one)")

    init_ray(address)
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")),
                  default=1)
    cpus = space.cpus_per_trial or int(biggest)
    if cpus > biggest:
        raise UserError(f"{space.path}: cpus_per_trial={cpus} but the largest Ray node has "
                        f"{biggest:g} CPUs; trials would wait forever")
    local.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{local / 'optuna.db'}"
    rdb = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=rdb, load_if_exists=True,
                                direction="minimize" if space.mode == "min" else "maximize")
    for key, value in (("metric", space.metric), ("stage", space.stage), ("space", space.path)):
        study.set_user_attr(key, value)  # what `cmkg report tune` labels its plots with
    sampler = (optuna.samplers.TPESampler(seed=space.seed) if space.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=space.seed))
    search = PruningSearch(space=space.define_by_run, metric=space.metric, mode=space.mode,
                           sampler=sampler, study_name=name, storage=rdb,
                           pruner=make_pruner(space))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), stage=space.stage, threads=cpus,
                             source=space.path, decode=space.decoders()),
        {"cpu": cpus, "gpu": space.gpus_per_trial})
    progress = Progress(total=space.trials, metric=space.metric, mode=space.mode,
                        decode=space.decoders(), budget_s=space.time_budget_s)
    stopping = f"; scheduler {json.dumps(space.scheduler)}" if space.scheduler else ""
    budget = f"; time budget {space.time_budget_s:g}s" if space.time_budget_s else ""
    print(f"sweep {name}: {space.trials} trials of {space.stage}, {space.concurrency} at a time x "
          f"{cpus} CPU{stopping}{budget}; study {url}; results {exp_path}", file=sys.stderr,
          flush=True)
    if restorable:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True,
                                   storage_filesystem=ray_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(search, max_concurrent=space.concurrency),
                scheduler=make_scheduler(space, search), num_samples=space.trials,
                time_budget_s=space.time_budget_s, reuse_actors=True,
                metric=space.metric, mode=space.mode),
            run_config=tune.RunConfig(name=name, storage_path=ray_root,
                                      storage_filesystem=ray_fs, callbacks=[progress],
                                      failure_config=tune.FailureConfig(max_failures=1)))
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout is the summary
        results = tuner.fit()
    budget_hit = bool(space.time_budget_s) and time.monotonic() - started >= space.time_budget_s
    if budget_hit:
        settle(study, results, progress)
    return summarise(results, space, base_config, list(overrides) + space.set, local, study,
                     budget_hit=budget_hit)


def settle(study, results, progress) -> None:
    """Trials the time budget stopped: Tune stops them without telling the searcher, so their
    Optuna trials are still RUNNING. They become PRUNED (FAIL if they errored) with the last
    metrics Tune holds for them, and get their progress line."""
    import optuna
    from optuna.trial import TrialState

    from cmkg.cluster.tune_hooks import record_attrs

    by_id = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    trials = study.get_trials(deepcopy=False)
    progress.done = max(progress.done, sum(t.state.is_finished() for t in trials))
    for frozen in trials:
        if frozen.state != TrialState.RUNNING:
            continue
        r = by_id.get(frozen.user_attrs.get("tune_trial_id"))
        result = dict(r.metrics) if r is not None else {}
        trial = optuna.trial.Trial(study, frozen._trial_id)
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
        progress.say(state.name, result, r.config if r is not None else {}, note="time budget")


def summarise(results, space: Space, base_config: str | None, overrides: list[str],
              out: Path, study, budget_hit: bool = False) -> dict:
    """``trials.csv`` (Tune's), ``trials.parquet`` and the plots (the study's), ``best.yaml``
    from the trials that finished (pruned and errored ones are counted). With none finished,
    the files are written and the sweep fails with a message (exit status 2)."""
    from optuna.trial import TrialState

    write_text(out / "trials.csv", results.get_dataframe().to_csv(index=False))
    write_results(study, out)
    done = [r for r in results if r.error is None and finished(r.metrics)]
    errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
    pruned = sum(t.state == TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    summary = {"space": space.path, "stage": space.stage, "metric": space.metric,
               "mode": space.mode, "trials_finished": len(done), "trials_pruned": pruned,
               "trials_failed": len(errors), "best": None, "retrain": None}
    if not done:
        write_yaml(out / "best.yaml", summary)
        why = " within the time budget" if budget_hit else ""
        raise UserError(f"sweep over {space.path}: no trial finished{why} ({pruned} stopped "
                        f"early, {len(errors)} failed; first error: "
                        f"{errors[0] if errors else 'none'}); summary in {out}")
    pick = min if space.mode == "min" else max
    best = pick(done, key=lambda r: r.metrics[space.metric])
    params = trial_params(best.config, space.decoders())
    sets = " ".join("--set " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
                    for k, v in params.items())
    extra = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    summary["best"] = {"params": params,
                       "metrics": {k: best.metrics[k] for k in (*REPORTED, "artifact")}}
    summary["retrain"] = (f"cmkg train {space.stage} --config {base_config or 'smoke'} {extra} "
                          f"{sets}").replace("  ", " ").strip()
    write_yaml(out / "best.yaml", summary)
    print(
        f"best of {len(done)} trials ({pruned} pruned): {space.metric} "
        f"{best.metrics[space.metric]:.3f} with {params} -> {out / 'best.yaml'}",
        file=sys.stderr, flush=True)
    return summary


# -- results from the study alone ------------------------------------------------------------

def trials_table(study) -> list[dict]:
    """One row per Optuna trial: number, state, value, ``params_<key>`` (one column per
    parameter; absent where a ``when`` left it out), the last value of every reported metric,
    epochs run, wall time (s), artifact (finished trials), Tune's trial id and the times.
    What the sweep recorded on each trial (user attributes) first, else the study's own data
    (the last intermediate value, the last step, start to end)."""
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    metric = study.user_attrs.get("metric", "val_epe_mm")
    rows = []
    for t in trials:
        attrs, last = t.user_attrs, t.last_step
        row = {"number": t.number, "state": t.state.name, "value": t.value}
        row.update({f"params_{k}": t.params.get(k) for k in names})
        metrics = attrs.get("metrics", {})
        row.update({k: metrics.get(k) for k in REPORTED})
        if row.get(metric) is None and last is not None:
            row[metric] = t.intermediate_values[last]
        row["epochs"] = attrs.get("epochs", last)
        row["wall_s"] = attrs.get("wall_s", t.duration.total_seconds() if t.duration else None)
        row["artifact"] = attrs.get("artifact")
        row["tune_trial_id"] = attrs.get("tune_trial_id")
        row["datetime_start"], row["datetime_complete"] = t.datetime_start, t.datetime_complete
        rows.append(row)
    for k in names:  # a column of one type: mixed choices (3, "auto") become text
        values = [r[f"params_{k}"] for r in rows if r[f"params_{k}"] is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric and len({type(v) for v in values}) > 1:
            for r in rows:
                if r[f"params_{k}"] is not None:
                    r[f"params_{k}"] = str(r[f"params_{k}"])
    return rows


def plot_study(study, out: Path) -> list[Path]:
    """PNGs of ``optuna.visualization.matplotlib`` into ``out``: the optimization history,
    parallel coordinates and slices once a trial finished, parameter importances once two
    finished over two parameters. A plot the study cannot have yet is removed, not left stale."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {k for t in complete for k in t.params}
    wanted = {"optimization_history": bool(complete),
              "param_importances": len(complete) >= 2 and len(names) >= 2,
              "parallel_coordinate": bool(complete), "slice": bool(complete)}
    target = study.user_attrs.get("metric", "value")
    written = []
    for name in PLOTS:
        path = out / f"{name}.png"
        if not wanted[name]:
            path.unlink(missing_ok=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # one value on an axis: it widens it
            axes = getattr(vis, f"plot_{name}")(study, target_name=target)
        fig = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_results(study, out: Path) -> list[Path]:
    """``trials.parquet`` and the plots of ``study`` into ``out``; the paths written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(out / "trials.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(trials_table(study)), tmp)
    return [out / "trials.parquet", *plot_study(study, out)]


def report_tune(sweep: str | Path, storage: str | None = None) -> list[Path]:
    """``cmkg report tune``: rebuild ``trials.parquet`` and the plots of a sweep folder from its
    study alone (``optuna.db`` there, or ``storage``; the study is named after the folder)."""
    import optuna

    sweep = Path(sweep)
    url = storage or f"sqlite:///{sweep / 'optuna.db'}"
    if storage is None and not (sweep / "optuna.db").is_file():
        raise UserError(f"{sweep}: no optuna.db here; name a sweep folder "
                        "({run.store}/_tune/NAME) or pass --storage URL")
    names = optuna.get_all_study_names(storage=url)
    if sweep.name in names:
        name = sweep.name
    elif len(names) == 1:
        name = names[0]
    else:
        raise UserError(f"{url}: no study named {sweep.name} (studies: {', '.join(names)})")
    return write_results(optuna.load_study(study_name=name, storage=url), sweep)
