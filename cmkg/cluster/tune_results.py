"""A sweep's results: what each trial records on its Optuna trial, the summary (``best.yaml``),
``trials.parquet`` and the plots, and ``cmkg report tune``, which rebuilds the last two from the
study alone. Nothing here imports Ray: a sweep's folder is read with Optuna only.

Files in a sweep folder (``{store}/_tune/{name}``): ``trials.csv`` (Ray Tune's table),
``trials.parquet`` (one row per Optuna trial: number, state, ``params_*``, the last value of
every reported metric, epochs run, wall time, artifact), ``best.yaml`` (the best trial's
parameters, metrics and the command that retrains it) and the PNG plots of
``optuna.visualization.matplotlib`` (optimization history, parallel coordinates, slices, and
parameter importances once two trials finished over two parameters).
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


def record_attrs(trial, result: dict) -> None:
    """The trial's last reported metrics, epochs run, wall time and artifact, on the Optuna
    trial (``optuna.trial.Trial``) before it is told: a finished trial is read-only. What
    :func:`trials_table` reads back."""
    trial.set_user_attr("metrics", {k: result[k] for k in REPORTED if k in result})
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


def summarise(results, space: Space, base_config: str | None, overrides: list[str],
              out: Path, study, budget_hit: bool = False) -> dict:
    """``trials.csv`` (Tune's ``results``), ``trials.parquet`` and the plots (the study's),
    ``best.yaml`` from the trials that finished (pruned and errored ones are counted). With
    none finished, the files are written and the sweep fails with a message (exit status 2)."""
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
    summary["best"] = {"params": params,
                       "metrics": {k: best.metrics[k] for k in (*REPORTED, "artifact")}}
    summary["retrain"] = retrain_command(space, base_config, overrides, params)
    write_yaml(out / "best.yaml", summary)
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
