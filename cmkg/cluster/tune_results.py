"""A sweep's results: what each trial records on its Optuna trial, the summary (``best.yaml``),
``trials.parquet`` and the plots, and ``cmkg report tune``, which rebuilds the last two from the
study alone. Nothing here imports Ray: a sweep's folder is read with Optuna only.

Files in a sweep folder (``{store}/_tune/{name}``): ``trials.csv`` (Ray Tune's table),
``trials.parquet`` and ``README.md`` (one row per Optuna trial: number, state, ``params_*``, the
last value of every reported metric, with several seeds each seed's validation and test EPE,
epochs run, wall time, artifact), ``best.yaml`` (what a table row needs to apply the best
trial: ``set``, its dotted config keys and values, with the sweep, metric, value and seeds that
chose it; docs/sweeps.md has the format) and the PNG plots of
``optuna.visualization.matplotlib`` (optimization history, parallel coordinates, slices, and
parameter importances once two trials finished over two parameters). The study itself lives in
the store's shared ``{store}/_tune/optuna.db`` (or ``--storage``), named after the folder.
``cmkg report tune DIR --report OUT`` copies the summary into OUT (e.g.
``reports/sweeps/<name>``), artifact paths cut to ``{stage}/{key}``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from cmkg.atomic import atomic_path, write_text, write_yaml
from cmkg.cluster.spaces import Space, trial_params
from cmkg.errors import UserError

REPORTED = ("val_epe_mm", "val_auc_20_50", "test_epe_mm", "test_auc_20_50")  # trials report these
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")


def finished(result: dict | None) -> bool:
    """Whether a trial's result is its final one: only the report after the stage published
    carries test metrics."""
    return bool(result) and "test_epe_mm" in result


def per_seed(result: dict) -> dict[str, dict]:
    """A final result's per-seed figures (``{seed: {metric: value, ..., artifact}}``), {} for
    a per-epoch result (they travel through Tune as one JSON string)."""
    value = result.get("per_seed")
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def record_attrs(trial, result: dict) -> None:
    """The trial's last reported metrics, epochs run, wall time and artifact, and with several
    seeds each seed's figures (``per_seed``), on the Optuna trial (``optuna.trial.Trial``)
    before it is told: a finished trial is read-only. What :func:`trials_table` reads back."""
    trial.set_user_attr("metrics", {k: result[k] for k in REPORTED if k in result})
    if per_seed(result):
        trial.set_user_attr("per_seed", per_seed(result))
    for attr, key in (("epochs", "epoch"), ("wall_s", "time_total_s"), ("artifact", "artifact"),
                      ("tune_trial_id", "trial_id")):
        if result.get(key) is not None:
            trial.set_user_attr(attr, result[key])


def retrain_command(space: Space, base_config: str | None, overrides: list[str],
                    params: dict) -> str:
    """The ``cmkg train`` command that rebuilds a trial's stage (a cache hit once it ran)."""
    sets = " ".join("--set " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
                    for k, v in params.items())
    extra = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return (f"cmkg train {space.stage} --config {base_config or 'smoke'} {extra} "
            f"{sets}").replace("  ", " ").strip()


def seeds_of(space: Space, base_config: str | None, overrides: list[str]) -> list[int]:
    """The seeds a sweep's trials ran at: the space's ``seeds``, else the one ``run.seed`` of
    its config."""
    if space.seeds:
        return list(space.seeds)
    from cmkg import config as config_mod

    return [config_mod.load(base_config, list(overrides) + space.set).run.seed]


# where a sweep ran and stored its files: left out of best.yaml (its overrides and retrain
# command), which is committed and read on other machines; none of them changes a result
MACHINE_PATHS = ("run.store", "run.cache", "data.root", "run.tracking.uri")


def machine_neutral(overrides: list[str]) -> list[str]:
    """``overrides`` without the ``--set`` entries that name this machine's folders
    (``MACHINE_PATHS``)."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in MACHINE_PATHS]


def summarise(results, space: Space, base_config: str | None, overrides: list[str],
              out: Path, study, budget_hit: bool = False) -> dict:
    """``trials.csv`` (Tune's ``results``), ``trials.parquet``, ``README.md`` and the plots
    (the study's), ``best.yaml`` from the trials that finished (pruned and errored ones are
    counted); ``overrides`` are the command line's ``--set`` entries, recorded without the ones
    that name this machine's folders (``machine_neutral``). With none finished, the
    files are written and the sweep fails with a message (exit status 2)."""
    from optuna.trial import TrialState

    overrides = machine_neutral(overrides)
    write_text(out / "trials.csv", results.get_dataframe().to_csv(index=False))
    done = [r for r in results if r.error is None and finished(r.metrics)]
    errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
    pruned = sum(t.state == TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    summary = {"sweep": out.name, "space": space.path, "stage": space.stage,
               "config": base_config, "overrides": list(overrides), "metric": space.metric,
               "mode": space.mode, "seeds": seeds_of(space, base_config, overrides),
               "value": None, "set": None, "trials_finished": len(done),
               "trials_pruned": pruned, "trials_failed": len(errors), "best": None,
               "retrain": None}
    if not done:
        write_yaml(out / "best.yaml", summary)
        write_results(study, out)
        why = " within the time budget" if budget_hit else ""
        raise UserError(f"sweep over {space.path}: no trial finished{why} ({pruned} stopped "
                        f"early, {len(errors)} failed; first error: "
                        f"{errors[0] if errors else 'none'}); summary in {out}")
    pick = min if space.mode == "min" else max
    best = pick(done, key=lambda r: r.metrics[space.metric])
    params = trial_params(best.config, space.decoders())
    summary["value"] = best.metrics[space.metric]
    summary["set"] = {**space.fixed_set(), **params}
    number = next((t.number for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get("tune_trial_id") == best.metrics.get("trial_id")), None)
    summary["best"] = {"number": number, "params": params,
                       "metrics": {k: best.metrics[k] for k in (*REPORTED, "artifact")},
                       "per_seed": [{"seed": int(k), **v}
                                    for k, v in per_seed(best.metrics).items()]}
    first = {"run.seed": space.seeds[0]} if space.seeds else {}
    summary["retrain"] = retrain_command(space, base_config, list(overrides) + space.set,
                                         {**params, **first})
    write_yaml(out / "best.yaml", summary)
    write_results(study, out)
    print(
        f"best of {len(done)} trials ({pruned} pruned): {space.metric} "
        f"{best.metrics[space.metric]:.3f} with {params} -> {out / 'best.yaml'}",
        file=sys.stderr, flush=True)
    return summary


# -- results from the study alone ------------------------------------------------------------

def _one_type_per_column(rows: list[dict], names: list[str]) -> None:
    """A parameter column of mixed choices (3, "auto") becomes text (parquet needs one type)."""
    for k in names:
        values = [r[f"params_{k}"] for r in rows if r[f"params_{k}"] is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric and len({type(v) for v in values}) > 1:
            for r in rows:
                if r[f"params_{k}"] is not None:
                    r[f"params_{k}"] = str(r[f"params_{k}"])


SEED_COLUMNS = ("val_epe_mm", "test_epe_mm")  # per seed, in a sweep over several seeds


def trials_table(study) -> list[dict]:
    """One row per Optuna trial: number, state, value, ``params_<key>`` (one column per
    parameter; absent where a ``when`` left it out), the last value of every reported metric
    (with several seeds: their means), ``<metric>_seed<s>`` for each seed of a sweep over
    several seeds (finished trials), epochs run, wall time (s), artifact (finished trials; the
    first seed's), Tune's trial id and the times. What the sweep recorded on each trial (user
    attributes) first, else the study's own data (the last intermediate value, the last step,
    start to end)."""
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    seeds = sorted({int(s) for t in trials for s in t.user_attrs.get("per_seed", {})})
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
        if len(seeds) > 1:
            by_seed = attrs.get("per_seed", {})
            row.update({f"{k}_seed{s}": by_seed.get(str(s), {}).get(k)
                        for s in seeds for k in SEED_COLUMNS})
        row["epochs"] = attrs.get("epochs", last)
        row["wall_s"] = attrs.get("wall_s", t.duration.total_seconds() if t.duration else None)
        row["artifact"] = attrs.get("artifact")
        row["tune_trial_id"] = attrs.get("tune_trial_id")
        row["datetime_start"], row["datetime_complete"] = t.datetime_start, t.datetime_complete
        rows.append(row)
    _one_type_per_column(rows, names)
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


def markdown(study, rows: list[dict]) -> str:
    """``README.md``: the study's name, metric and seeds, its best finished trial, then one
    line per trial (number, state, value, the parameters it sampled, per-seed values, epochs,
    wall time)."""
    from optuna.trial import TrialState

    metric = study.user_attrs.get("metric", "value")
    seeds = study.user_attrs.get("seeds")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    lines = [f"# Sweep {study.study_name}", "",
             f"Stage {study.user_attrs.get('stage', '?')}, space "
             f"`{study.user_attrs.get('space', '?')}`, metric {metric} "
             f"({study.direction.name.lower()}; validation)"
             + (f", each trial the mean over seeds {', '.join(map(str, seeds))}" if seeds and
                len(seeds) > 1 else "") + f"; {len(rows)} trials, {len(complete)} finished.", ""]
    if complete:
        best = study.best_trial
        shown = ", ".join(f"{k} = {_text(v)}" for k, v in best.params.items())
        lines += [f"Best: trial {best.number}, {metric} {best.value:.3f}: {shown}.", ""]
    columns = [c for c in rows[0] if c not in ("tune_trial_id", "datetime_start",
                                               "datetime_complete", "artifact")] if rows else []
    lines += ["| " + " | ".join(c.removeprefix("params_") for c in columns) + " |",
              "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_text(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(study, out: Path) -> list[Path]:
    """``trials.parquet``, ``README.md`` and the plots of ``study`` into ``out``; the paths
    written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = trials_table(study)
    with atomic_path(out / "trials.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    write_text(out / "README.md", markdown(study, rows))
    return [out / "trials.parquet", out / "README.md", *plot_study(study, out)]


def open_sweep_study(sweep: str | Path, storage: str | None = None):
    """A sweep folder's Optuna study: in ``storage``, else in the folder's own ``optuna.db``
    (sweeps started before the store shared one), else in the store's shared
    ``{store}/_tune/optuna.db``; the study is named after the folder."""
    import optuna

    sweep = Path(sweep)
    own, shared = sweep / "optuna.db", sweep.parent / "optuna.db"
    if storage is None and not (own.is_file() or shared.is_file()):
        raise UserError(f"{sweep}: no optuna.db here or in {sweep.parent}; name a sweep folder "
                        "({run.store}/_tune/NAME) or pass --storage URL")
    url = storage or f"sqlite:///{own if own.is_file() else shared}"
    names = optuna.get_all_study_names(storage=url)
    if sweep.name in names:
        name = sweep.name
    elif len(names) == 1 and own.is_file() and storage is None:  # an old sweep's own file
        name = names[0]
    else:
        raise UserError(f"{url}: no study named {sweep.name} (studies: {', '.join(names)})")
    return optuna.load_study(study_name=name, storage=url)


def report_tune(sweep: str | Path, storage: str | None = None,
                report: str | Path | None = None) -> list[Path]:
    """``cmkg report tune``: rebuild ``trials.parquet``, ``README.md`` and the plots of a sweep
    folder from its study alone; with ``report``, write them there instead, with
    ``trials.csv`` (the same rows) and a copy of the sweep's ``best.yaml``, every artifact path
    cut to ``{stage}/{key}`` so the copy names nothing outside the store (e.g.
    ``--report reports/sweeps/<name>`` for a summary to commit)."""
    study = open_sweep_study(sweep, storage)
    if report is None:
        return write_results(study, Path(sweep))
    out = Path(report)
    out.mkdir(parents=True, exist_ok=True)
    written = write_results(study, out)
    import pyarrow.parquet as pq

    table = pq.read_table(out / "trials.parquet").to_pylist()
    for row in table:
        row["artifact"] = _in_store(row.get("artifact"))
    import pyarrow as pa

    with atomic_path(out / "trials.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(table), tmp)
    write_text(out / "trials.csv", pa.Table.from_pylist(table).to_pandas().to_csv(index=False))
    written.append(out / "trials.csv")
    best = Path(sweep) / "best.yaml"
    if best.is_file():
        import yaml

        summary = yaml.safe_load(best.read_text()) or {}
        if summary.get("best"):
            metrics = summary["best"].get("metrics") or {}
            metrics["artifact"] = _in_store(metrics.get("artifact"))
            for seed in summary["best"].get("per_seed") or []:
                seed["artifact"] = _in_store(seed.get("artifact"))
        write_yaml(out / "best.yaml", summary)
        written.append(out / "best.yaml")
    return written


def _in_store(artifact: str | None) -> str | None:
    """``/any/where/runs/target/<key>`` -> ``target/<key>``: an artifact as the store names it."""
    if not artifact:
        return artifact
    return "/".join(str(artifact).rstrip("/").split("/")[-2:])
