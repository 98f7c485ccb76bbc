"""Search-space files: what a sweep samples, read and checked without Ray.

A *search space* is a YAML file (``tune_spaces/*.yaml``)::

    stage: target              # the stage each trial runs (its missing inputs first)
    metric: val_epe_mm         # val_epe_mm (min) or val_auc_20_50 (max): validation, never test
    trials: 24
    concurrency: 1             # trials at once; each holds cpus_per_worker (+ gpus_per_worker)
    cpus_per_worker: 2         # a trial is a worker; 0 (default): every CPU of the biggest node
    sampler: tpe               # tpe | random
    seed: 0
    set: [run.eval_every=1]    # fixed overrides for every trial
    seeds: 3                   # optional: a trial's value is the mean over run.seed = 0, 1, 2
    time_budget_s: 3600        # optional: stop the sweep after this many seconds
    scheduler: {asha: {grace_period: 1, reduction_factor: 2}}   # optional: early stopping
    params:                    # dotted config keys, sampled in this order
      regularizer.form: {choice: [l2, weighted_l2]}
      regularizer.sigma: {float: [1.0e-6, 1.0e-3], log: true, when: {regularizer.form: [l2]}}
      meta.inner_steps: {int: [1, 3], when: {regularizer.form: [weighted_l2]}}
    enqueue:                   # optional: known points, evaluated first, in this order
      - {regularizer.form: weighted_l2, meta.inner_steps: 1}

Optuna samples define-by-run, so ``when`` makes a parameter exist only for some values of an
earlier one (:meth:`Space.define_by_run`). ``scheduler:`` is one of::

    scheduler: {asha: {grace_period: 1, reduction_factor: 2, max_t: 8}}   # Ray Tune's ASHA
    scheduler: {optuna_pruner: {median: {n_startup_trials: 5, n_warmup_steps: 1}}}
    scheduler: {optuna_pruner: {successive_halving: {min_resource: 1, reduction_factor: 3}}}

ASHA counts in epochs; ``max_t`` defaults to the stage's epochs and may not be below them (every
trial would stop unpublished).

``seeds: k`` (or a list of distinct seeds) makes a trial train its stage once per seed
(``run.seed`` = 0 … k−1, or the listed ones) and score the mean of the seeds' validation
metrics; without it a trial trains the base config's ``run.seed`` once, as before.
``enqueue:`` lists points (parameter -> value; parameters left out are sampled) that Optuna
evaluates before it samples (``Study.enqueue_trial``); each is checked like the parameters:
a key that is not a parameter, a value outside its range or choices, a parameter its ``when``
leaves out, or a value the config refuses is a problem naming ``enqueue[i].key``.
:func:`load_space` reports every problem of a file at once and
tries each parameter at its bounds/choices against the config it will override, so a misspelt
key fails before the first trial. A trial's config is the base config's dict with the sampled
dotted keys set (:func:`apply_params`), built once (:func:`trial_config`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from cmkg import config as config_mod
from cmkg.config import STAGES, Config, ConfigError
from cmkg.yamlfile import (
    assignment,
    entries,
    is_int,
    is_number,
    number,
    read_mapping,
    unknown_keys,
)

METRICS = {"val_epe_mm": "min", "val_auc_20_50": "max"}
KINDS = ("float", "int", "choice")
SPACE_KEYS = ("stage", "metric", "trials", "concurrency", "cpus_per_worker", "gpus_per_worker",
              "sampler", "seed", "set", "params", "scheduler", "time_budget_s", "seeds",
              "enqueue")
RENAMED = {"cpus_per_trial": "cpus_per_worker", "gpus_per_trial": "gpus_per_worker"}
# what the command line may set instead of the file (run_tune's keyword arguments)
FLAGS = {"trials": "--trials", "time_budget_s": "--time-budget",
         "cpus_per_worker": "--cpus-per-worker", "gpus_per_worker": "--gpus-per-worker"}
BUDGETS = ("trials", "time_budget_s")  # of those, the ones that name a sweep of their own
# scheduler kind -> its entries and their defaults (None: the stage's epochs)
ASHA = {"grace_period": 1, "reduction_factor": 2, "max_t": None}
PRUNERS = {"median": {"n_startup_trials": 5, "n_warmup_steps": 0, "interval_steps": 1,
                      "n_min_trials": 1},
           "successive_halving": {"min_resource": "auto", "reduction_factor": 4,
                                  "min_early_stopping_rate": 0, "bootstrap_count": 0}}


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

    def check(self, value) -> str | None:
        """Why ``value`` is not a value this parameter can take (None when it is)."""
        if self.kind == "choice":
            return None if value in self.choices else f"{value!r} is not one of {self.choices}"
        if self.kind == "int" and not is_int(value):
            return f"expected an integer, got {value!r}"
        value = number(value)
        if not is_number(value):
            return f"expected a number, got {value!r}"
        if not self.low <= value <= self.high:
            return f"{value!r} is outside [{self.low:g}, {self.high:g}]"
        return None

    def fixed(self, value):
        """``value`` as Optuna's ``enqueue_trial`` takes it (choices as Optuna stores them)."""
        if self.kind == "choice":
            return self.encode(value)
        return int(value) if self.kind == "int" else float(number(value))


@dataclass
class Space:
    path: str
    stage: str
    params: list[Param]
    metric: str = "val_epe_mm"
    trials: int = 16
    concurrency: int = 1
    cpus_per_worker: int = 0  # 0: every CPU of the biggest node
    gpus_per_worker: float = 0.0
    sampler: str = "tpe"
    seed: int = 0
    set: list[str] = field(default_factory=list)
    scheduler: dict | None = None  # {"asha": {...}} or {"optuna_pruner": {kind: {...}}}, filled in
    time_budget_s: float | None = None
    cli: dict = field(default_factory=dict)  # budgets given on the command line (name the sweep)
    seeds: list[int] | None = None  # None: the base config's run.seed, once
    enqueue: list[dict] = field(default_factory=list)  # points evaluated first (param -> value)

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def decoders(self) -> dict[str, dict]:
        """param -> {JSON as Optuna stores it: the choice} for list/mapping choices."""
        return {p.name: {p.encode(c): c for c in p.choices} for p in self.params
                if p.kind == "choice" and any(isinstance(c, (list, dict)) for c in p.choices)}

    def fixed_points(self) -> list[dict]:
        """The ``enqueue`` points as Optuna's ``enqueue_trial`` takes them, in file order."""
        by_name = {p.name: p for p in self.params}
        return [{k: by_name[k].fixed(v) for k, v in point.items()} for point in self.enqueue]

    def fixed_set(self) -> dict:
        """The space's ``set:`` entries as ``{dotted key: value}`` (values read as YAML)."""
        problems: list[str] = []
        pairs = (assignment(item, "set", problems) for item in self.set)
        return {key: value for key, value, _ in filter(None, pairs)}

    def define_by_run(self, trial) -> None:
        """Optuna's define-by-run space: parameters in file order, each only when its ``when``
        holds for the values sampled before it."""
        sampled: dict = {}
        for p in self.params:
            if p.active(sampled):
                sampled[p.name] = p.suggest(trial)


# -- parsing ----------------------------------------------------------------------------------

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
        if isinstance(value, list):
            value = [number(v) for v in value]
        if not (isinstance(value, list) and len(value) == 2 and all(map(is_number, value))
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


def _parse_asha(body, problems: list[str]) -> dict | None:
    asha = entries("scheduler.asha", body, ASHA, problems)
    if asha is None:
        return None
    for key in ("grace_period", "max_t"):
        if asha[key] is not None and not is_int(asha[key], 1):
            problems.append(f"scheduler.asha.{key}: must be an integer >= 1 (epochs), "
                            f"got {asha[key]!r}")
    rf = asha["reduction_factor"]
    if not is_number(rf) or rf <= 1:
        problems.append(f"scheduler.asha.reduction_factor: must be a number > 1, got {rf!r}")
    if (is_int(asha["grace_period"], 1) and is_int(asha["max_t"], 1)
            and asha["grace_period"] > asha["max_t"]):
        problems.append(f"scheduler.asha.grace_period: {asha['grace_period']} is above "
                        f"max_t={asha['max_t']}")
    return {"asha": asha}


def _parse_pruner(body, problems: list[str]) -> dict | None:
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in PRUNERS:
        problems.append(f"scheduler.optuna_pruner: expected one of {', '.join(PRUNERS)} with its "
                        f"entries, e.g. {{median: {{n_warmup_steps: 1}}}}, got {body!r}")
        return None
    name, spec = next(iter(body.items()))
    where = f"scheduler.optuna_pruner.{name}"
    pruner = entries(where, spec, PRUNERS[name], problems)
    if pruner is None:
        return None
    lows = {"interval_steps": 1, "n_min_trials": 1, "reduction_factor": 2, "min_resource": 1}
    for key, value in pruner.items():
        if not (is_int(value, lows.get(key, 0)) or (key == "min_resource" and value == "auto")):
            problems.append(f"{where}.{key}: must be an integer >= {lows.get(key, 0)}"
                            f"{' or auto' if key == 'min_resource' else ''}, got {value!r}")
    return {"optuna_pruner": {name: pruner}}


def _parse_scheduler(spec, problems: list[str]) -> dict | None:
    """``scheduler:`` checked and filled with its defaults (ASHA's ``max_t`` stays None until
    the stage's epochs are known)."""
    kinds = {"asha": _parse_asha, "optuna_pruner": _parse_pruner}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
        problems.append(f"scheduler: expected {{asha: {{...}}}} or {{optuna_pruner: {{median | "
                        f"successive_halving: {{...}}}}}}, got {spec!r}")
        return None
    kind, body = next(iter(spec.items()))
    return kinds[kind](body, problems)


def _parse_seeds(value, params: list[Param], fixed: list[str], problems: list[str]
                 ) -> list[int] | None:
    """``seeds: k`` -> [0 … k−1]; ``seeds: [s, ...]`` -> those (distinct, >= 0); absent -> None.
    The space then owns ``run.seed``: a parameter or ``set:`` entry for it is a problem."""
    if value is None:
        return None
    if is_int(value, 1):
        seeds = list(range(value))
    elif (isinstance(value, list) and value and all(is_int(v, 0) for v in value)
          and len(set(value)) == len(value)):
        seeds = list(value)
    else:
        problems.append(f"seeds: expected a number of seeds >= 1 or a non-empty list of "
                        f"distinct seeds >= 0, got {value!r}")
        return None
    if any(p.name == "run.seed" for p in params):
        problems.append("params.run.seed: the space's seeds: sets run.seed; drop one of them")
    if any(item.partition("=")[0].strip() == "run.seed" for item in fixed):
        problems.append("set: run.seed: the space's seeds: sets run.seed; drop one of them")
    return seeds


def _parse_enqueue(value, params: list[Param], problems: list[str]) -> list[dict]:
    """``enqueue:`` points, each checked against the parameters: known keys, values in range,
    and only parameters their ``when`` keeps (given the point's earlier values)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) and v for v in value):
        problems.append("enqueue: expected a list of mappings {parameter: value}, "
                        f"got {value!r}")
        return []
    by_name = {p.name: p for p in params}
    points = []
    for i, point in enumerate(value):
        where, bad = f"enqueue[{i}]", len(problems)
        point = {str(k): number(v) for k, v in point.items()}
        for key in point:
            if key not in by_name:
                problems.append(f"{where}.{key}: not a parameter of this space "
                                f"(parameters: {', '.join(by_name)})")
        sampled: dict = {}  # what the point fixes, in file order; a sampled one is unknown
        unknown: set[str] = set()
        for p in params:
            undecided = any(k in unknown for k in p.when)
            if undecided or p.active(sampled):
                if p.name in point:
                    why = p.check(point[p.name])
                    if why:
                        problems.append(f"{where}.{p.name}: {why}")
                    sampled[p.name] = point[p.name]
                else:
                    unknown.add(p.name)
            elif p.name in point:
                problems.append(f"{where}.{p.name}: the parameter is left out by its when "
                                f"{p.when} given this point's values")
        if len(problems) == bad:
            points.append(point)
    return points


def _parse_keys(data: dict, problems: list[str]) -> None:
    """Unknown top-level keys, and the keys renamed since (each names its new name)."""
    problems += [f"{old}: renamed; write {new} (a trial is a worker, as in "
                 f"{FLAGS[new]})" for old, new in RENAMED.items() if old in data]
    unknown_keys({k: v for k, v in data.items() if k not in RENAMED}, SPACE_KEYS, "", problems)


def _parse_numbers(data: dict, given: dict, problems: list[str]) -> dict:
    """The integer and number entries (the command line's ``given`` values over the file's),
    as Space's keyword arguments; a problem names the flag when the value came from it."""
    def where(key):
        return f"{key} ({FLAGS[key]})" if key in given else key

    out = {}
    for key, lo in (("trials", 1), ("concurrency", 1), ("cpus_per_worker", 0), ("seed", 0)):
        out[key] = v = given.get(key, data.get(key, getattr(Space, key)))
        if not is_int(v, lo):
            problems.append(f"{where(key)}: must be an integer >= {lo}, got {v!r}")
    budget = number(given.get("time_budget_s", data.get("time_budget_s")))
    if budget is not None and not (is_number(budget) and budget > 0):
        problems.append(f"{where('time_budget_s')}: must be a number of seconds > 0, "
                        f"got {budget!r}")
    out["time_budget_s"] = budget
    gpus = number(given.get("gpus_per_worker", data.get("gpus_per_worker", 0.0)))
    if not is_number(gpus) or gpus < 0:
        problems.append(f"{where('gpus_per_worker')}: must be a number >= 0, got {gpus!r}")
    out["gpus_per_worker"] = gpus
    return out


def _parse(path: Path, data: dict, given: dict, problems: list[str]) -> Space | None:
    """The space as the file (and the command line's ``given`` values) state it; None (and
    the problems appended) when the file has any."""
    _parse_keys(data, problems)
    stage = data.get("stage")
    if stage not in STAGES:
        problems.append(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    metric = data.get("metric", "val_epe_mm")
    if metric not in METRICS:
        problems.append(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    numbers = _parse_numbers(data, given, problems)
    scheduler = (_parse_scheduler(data["scheduler"], problems)
                 if data.get("scheduler") is not None else None)
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
    seeds = _parse_seeds(data.get("seeds"), params, fixed, problems)
    enqueue = _parse_enqueue(data.get("enqueue"), params, problems)
    if problems:
        return None
    budget, gpus = numbers.pop("time_budget_s"), numbers.pop("gpus_per_worker")
    return Space(path=str(path), stage=stage, params=params, metric=metric, **numbers,
                 gpus_per_worker=float(gpus), sampler=data.get("sampler", "tpe"), set=fixed,
                 scheduler=scheduler, time_budget_s=None if budget is None else float(budget),
                 cli={k: v for k, v in given.items() if k in BUDGETS}, seeds=seeds,
                 enqueue=enqueue)


def _check_against_config(space: Space, base: Config, problems: list[str]) -> None:
    """What needs the resolved config: ASHA's ``max_t`` against the stage's epochs (filled in
    when not given), and each parameter tried at its bounds/choices."""
    asha = (space.scheduler or {}).get("asha")
    if asha is not None:  # epochs are known now: a trial stopped at max_t never publishes
        epochs = getattr(base.epochs, space.stage)
        if asha["max_t"] is None:
            asha["max_t"] = epochs
            if asha["grace_period"] > epochs:
                problems.append(f"scheduler.asha.grace_period: {asha['grace_period']} is above "
                                f"max_t={epochs} (epochs.{space.stage})")
        elif asha["max_t"] < epochs:
            problems.append(f"scheduler.asha.max_t: {asha['max_t']} is below "
                            f"epochs.{space.stage}={epochs}: every trial would be stopped "
                            "before its stage finishes")
    data = base.to_dict()
    for p in space.params:  # a misspelt key or an out-of-range bound fails here, not in trial 7
        for value in p.examples():
            try:
                trial_config(data, {p.name: value}, space.path)
            except ConfigError as e:  # only this key's problems: others may be joint
                problems += [f"params.{p.name}={value!r}: {m}" for m in e.problems
                             if m.split(":", 1)[0] == p.name]
    for i, point in enumerate(space.enqueue):  # a point is one trial's values: tried together
        extra = {"run.seed": space.seeds[0]} if space.seeds else {}
        try:
            trial_config(data, {**point, **extra}, space.path)
        except ConfigError as e:
            problems += [f"enqueue[{i}].{m}" for m in e.problems]


def load_space(path: str | Path, base_config: str | None = None,
               overrides: list[str] | None = None, *, trials: int | None = None,
               time_budget_s: float | None = None, cpus_per_worker: int | None = None,
               gpus_per_worker: float | None = None) -> Space:
    """Read and check a search-space file: every problem at once, naming the file and key;
    each parameter is tried at its bounds/choices against the config it will override.
    The keyword arguments (``--trials``, ``--time-budget``, ``--cpus-per-worker``,
    ``--gpus-per-worker``) override the file's entries; the budgets also name the sweep."""
    path = Path(path)
    data = read_mapping(path)
    given = {k: v for k, v in (("trials", trials), ("time_budget_s", time_budget_s),
                               ("cpus_per_worker", cpus_per_worker),
                               ("gpus_per_worker", gpus_per_worker)) if v is not None}
    problems: list[str] = []
    space = _parse(path, data, given, problems)
    if space is None:
        raise ConfigError(str(path), problems)
    base = config_mod.load(base_config, list(overrides or []) + space.set)
    _check_against_config(space, base, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return space


# -- a trial's config and parameters -----------------------------------------------------------

def apply_params(data: dict, params: dict, source: str) -> dict:
    """A copy of the config dict ``data`` with the dotted ``params`` set, values kept exact;
    an optional section (``data.augment``) that a parameter enters is created."""
    data = copy.deepcopy(data)
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
    return data


def trial_config(base: Config | dict, params: dict, source: str) -> Config:
    """``base`` (a Config or its ``to_dict()``) with the sampled parameters (dotted keys)
    applied: one ``config.from_dict``."""
    data = base.to_dict() if isinstance(base, Config) else base
    return config_mod.from_dict(apply_params(data, params, source), source)


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
    pruner = (space.scheduler or {}).get("optuna_pruner")
    if pruner is None:
        return None
    import optuna

    kinds = {"median": optuna.pruners.MedianPruner,
             "successive_halving": optuna.pruners.SuccessiveHalvingPruner}
    (kind, settings), = pruner.items()
    return kinds[kind](**settings)
