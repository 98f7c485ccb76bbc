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
    params:                    # dotted config keys, sampled in this order
      regularizer.form: {choice: [l2, weighted_l2]}
      regularizer.sigma: {float: [1.0e-6, 1.0e-3], log: true, when: {regularizer.form: [l2]}}
      meta.inner_steps: {int: [1, 3], when: {regularizer.form: [weighted_l2]}}

Optuna samples define-by-run, so ``when`` makes a parameter exist only for some values of an
earlier one. The study lives in a database: SQLite under the store by default, any SQLAlchemy
URL (PostgreSQL) with ``--storage``. A trial is a function that resolves its config and runs the
stage in-process inside the trial (``run_stage_auto``: the trial already holds its CPUs/GPU, so
no Ray Train start-up); stages shared by trials (the teacher, a student, a phi) are cache hits
in the artifact store after the first trial that needs them. Results go to
``{store}/_tune/{name}``: Ray Tune's experiment (``--resume`` continues it), ``optuna.db``,
``trials.csv`` and ``best.yaml`` (the best trial's parameters, metrics and the command that
retrains it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cmkg import config as config_mod
from cmkg.atomic import write_text, write_yaml
from cmkg.config import Config, ConfigError
from cmkg.errors import UserError

METRICS = {"val_epe_mm": "min", "val_auc_20_50": "max"}
KINDS = ("float", "int", "choice")
SPACE_KEYS = ("stage", "metric", "trials", "concurrency", "cpus_per_trial", "gpus_per_trial",
              "sampler", "seed", "set", "params")


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


def load_space(path: str | Path, base_config: str | None = None,
               overrides: list[str] | None = None) -> Space:
    """Read and check a search-space file: every problem at once, naming the file and key;
    each parameter is tried at its bounds/choices against the config it will override."""
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
    for key, lo in (("trials", 1), ("concurrency", 1), ("cpus_per_trial", 0), ("seed", 0)):
        v = data.get(key, getattr(Space, key))
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            problems.append(f"{key}: must be an integer >= {lo}, got {v!r}")
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
                  trials=data.get("trials", Space.trials),
                  concurrency=data.get("concurrency", Space.concurrency),
                  cpus_per_trial=data.get("cpus_per_trial", Space.cpus_per_trial),
                  gpus_per_trial=float(gpus), sampler=data.get("sampler", "tpe"),
                  seed=data.get("seed", 0), set=fixed)
    base = config_mod.load(base_config, list(overrides or []) + fixed)
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


def _trial(params: dict, *, base: dict, stage: str, threads: int, source: str,
           decode: dict[str, dict]) -> None:
    """One trial: resolve the config, run the stage in this process, report its metrics."""
    from ray import tune

    from cmkg.cluster.train import run_stage_auto
    from cmkg.stages import Store

    params = _decoded(_flatten(params), decode)
    cfg = trial_config(config_mod.from_dict(base, source), params, source)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=threads,
                                                           progress="none"))
    art = run_stage_auto(stage, cfg, workers=1)
    m = art.metrics
    # the epoch whose weights the stage keeps (best validation EPE) gives the validation AUC
    best = min(m["history"], key=lambda h: h.get("val", {}).get("epe_mm", float("inf")))
    tune.report({"val_epe_mm": m["best_val_epe_mm"],
                 "val_auc_20_50": best.get("val", {}).get("auc_20_50", float("nan")),
                 "test_epe_mm": m["test"]["epe_mm"], "test_auc_20_50": m["test"]["auc_20_50"],
                 "artifact": Store.of(cfg).describe(stage, art.key)})


def experiment_name(space: Space, base: Config) -> str:
    """Stable per (space file content, base config): rerunning the same command finds it."""
    text = Path(space.path).read_text() + json.dumps(base.to_dict(), sort_keys=True)
    return f"{Path(space.path).stem}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def run_tune(space_path: str, base_config: str | None, overrides: list[str], *,
             resume: bool = False, storage: str | None = None,
             address: str | None = None) -> dict:
    """Run (or, with ``resume``, continue) the sweep; returns the best trial's summary."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from cmkg.cluster.train import absolute_paths, init_ray
    from cmkg.stages import Store

    space = load_space(space_path, base_config, overrides)
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
    sampler = (optuna.samplers.TPESampler(seed=space.seed) if space.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=space.seed))
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=space.define_by_run, metric=space.metric, mode=space.mode,
                     sampler=sampler, study_name=name,
                     storage=optuna.storages.RDBStorage(url)),
        max_concurrent=space.concurrency)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), stage=space.stage, threads=cpus,
                             source=space.path, decode=space.decoders()),
        {"cpu": cpus, "gpu": space.gpus_per_trial})
    print(f"sweep {name}: {space.trials} trials of {space.stage}, {space.concurrency} at a time x "
          f"{cpus} CPU; study {url}; results {exp_path}", file=sys.stderr, flush=True)
    if restorable:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True,
                                   storage_filesystem=ray_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=space.trials,
                                        reuse_actors=True,
                                        metric=space.metric, mode=space.mode),
            run_config=tune.RunConfig(name=name, storage_path=ray_root,
                                      storage_filesystem=ray_fs,
                                      failure_config=tune.FailureConfig(max_failures=1)))
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout is the summary
        results = tuner.fit()
    return summarise(results, space, base_config, list(overrides) + space.set, local)


def summarise(results, space: Space, base_config: str | None, overrides: list[str],
              out: Path) -> dict:
    """``trials.csv`` and ``best.yaml`` from the finished trials (errored ones are listed)."""
    frame = results.get_dataframe()
    write_text(out / "trials.csv", frame.to_csv(index=False))
    done = [r for r in results if r.error is None and space.metric in (r.metrics or {})]
    errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
    if not done:
        raise UserError(f"sweep over {space.path}: no trial finished ({len(errors)} failed; "
                        f"first error: {errors[0] if errors else 'none'})")
    pick = min if space.mode == "min" else max
    best = pick(done, key=lambda r: r.metrics[space.metric])
    params = _decoded(_flatten(best.config), space.decoders())
    sets = " ".join("--set " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
                    for k, v in params.items())
    extra = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    summary = {
        "space": space.path, "stage": space.stage, "metric": space.metric, "mode": space.mode,
        "trials_finished": len(done), "trials_failed": len(errors),
        "best": {"params": params,
                 "metrics": {k: best.metrics[k] for k in ("val_epe_mm", "val_auc_20_50",
                                                          "test_epe_mm", "test_auc_20_50",
                                                          "artifact")}},
        "retrain": f"cmkg train {space.stage} --config {base_config or 'smoke'} {extra} {sets}"
                   .replace("  ", " ").strip(),
    }
    write_yaml(out / "best.yaml", summary)
    print(
        f"best of {len(done)} trials: {space.metric} {best.metrics[space.metric]:.3f} with "
        f"{params} -> {out / 'best.yaml'}", file=sys.stderr, flush=True)
    return summary
