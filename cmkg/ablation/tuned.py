"""Tuned rows: an ablation row whose config is a sweep's best trial (``tuned: PATH/best.yaml``).

``cmkg tune`` writes ``best.yaml`` into its sweep folder (``cmkg.cluster.tune_results``,
docs/sweeps.md): the ``sweep``'s name, its ``metric`` (a validation metric), the ``seeds`` its
trials ran at, and ``set``, the best trial's config as a diff of dotted keys (the space's fixed
``set`` and the trial's parameters, e.g. ``{regularizer.form: l2, regularizer.sigma: 0.01}``).
Summaries written before ``set`` existed hold the parameters alone (``best.params``) and no
seeds. A tuned row lays that diff over its own ``set`` and ``scale``; the record and the
table's note say which sweep chose it, on which metric and seeds.

Because the sweep chose on its seeds, the table must report the row on other ones: the report
seeds and the sweep's seeds must be disjoint (``check_seeds``, exit status 2 naming the file and
key otherwise). A ``best.yaml`` that names no seeds ran its trials at one seed, the ``run.seed``
of the sweep's config: the one its ``best.params`` or its ``retrain`` command sets, else the
config's default, 0. A relative path is read from the ablation file's folder.

A sweep chooses at one preset: its best trial means nothing at another, and a smaller preset's
report seeds (the demo reports on seed 0) may be the sweep's own. So ``tuned`` may also map
preset names to files, ``tuned: {cpu: ../reports/sweeps/l2/best.yaml}`` (``read_tuned``): at a
preset it names the row is a tuned row as above; at any other the row is left out of the run's
table, with its comparisons, benchmark and figure entries, and a note says so
(``spec.at_preset``, ``left_out_note``). Every file of the mapping is read when the ablation file
is loaded, whichever preset runs.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from cmkg.errors import ConfigError
from cmkg.yamlfile import is_int, read_mapping

DEFAULT_SEED = 0  # run.seed's default (cmkg.config.RunConfig)


def read_tuned(value, folder: Path, where: str, presets,
               problems: list[str]) -> tuple[dict | None, dict[str, dict]]:
    """A row's ``tuned:`` entry: (``read_best`` of its path, {}) for ``tuned: PATH``, or (None,
    {preset: read_best of its path}) for ``tuned: {preset: PATH, ...}``, every path read now;
    each problem names ``where`` (``rows[i].tuned``, ``rows[i].tuned.cpu``) and the file. The
    keys must be among ``presets``."""
    if not isinstance(value, dict):
        return read_best(value, folder, where, problems), {}
    if not value:
        problems.append(f"{where}: an empty mapping (name the presets whose sweep chose the "
                        f"row, e.g. {{{presets[0]}: PATH/best.yaml}})")
        return None, {}
    for key in value:
        if key not in presets:
            near = difflib.get_close_matches(str(key), presets, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{where}.{key}: not a preset{hint}; a key of tuned is the preset "
                            f"whose sweep chose the row, one of {', '.join(presets)}")
    out = {}
    for preset, path in value.items():
        if preset in presets:
            best = read_best(path, folder, f"{where}.{preset}", problems)
            if best is not None:
                out[str(preset)] = best
    return None, out


def left_out_note(label: str, at: dict[str, dict], preset: str | None) -> str:
    """The table's note for a row tuned at other presets than the one that runs (``at``:
    preset -> ``read_best``), which leaves it out."""
    names = " and ".join(at)
    files = "; ".join(t["file"] if len(at) == 1 else f"{p}: {t['file']}" for p, t in at.items())
    return (f"{label}: tuned at the {names} preset{'s' if len(at) > 1 else ''} only ({files}); "
            f"left out at {preset or 'custom (a config naming no preset)'}")


def read_best(value, folder: Path, where: str, problems: list[str]) -> dict | None:
    """A row's ``tuned:`` entry read from its file: {where, path (resolved), file (as written),
    params, sweep, metric, seeds, seeds_stated}; None and a problem naming ``where``
    (``rows[i].tuned``) and the file when the file is missing or not a sweep's summary."""
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: must be the path of a sweep's best.yaml, or a mapping from "
                        f"preset to such a path, got {value!r}")
        return None
    path = Path(value) if Path(value).is_absolute() else folder / value
    if not path.is_file():
        problems.append(f"{where}: {path}: no such file (a sweep's best.yaml, written by cmkg "
                        "tune into its sweep folder; a relative path is read from the ablation "
                        "file's folder)")
        return None
    try:
        data = read_mapping(path)
    except ConfigError as e:
        problems.append(f"{where}: {path}: " + "; ".join(e.problems))
        return None
    best = data.get("best") if isinstance(data.get("best"), dict) else {}
    params = data.get("set") if data.get("set") is not None else best.get("params")
    if not isinstance(params, dict) or not params or not all(isinstance(k, str) for k in params):
        problems.append(f"{where}: {path}: set (or best.params): expected the best trial's "
                        "config diff (a mapping of dotted keys); a sweep with no finished trial "
                        "has none")
        return None
    seeds, stated = _seeds(data, params, f"{where}: {path}", problems)
    return {"where": where, "path": str(path), "file": value, "params": dict(params),
            "sweep": str(data.get("name") or data.get("sweep") or path.parent.name),
            "metric": str(data.get("metric", "val_epe_mm")), "seeds": seeds,
            "seeds_stated": stated}


def _seeds(data: dict, params: dict, where: str, problems: list[str]) -> tuple[list[int], bool]:
    """The seeds the sweep chose on: ``seeds`` (a count k: 0..k-1, or a list), else the one
    ``run.seed`` its trials ran at. Returns (seeds, whether best.yaml states them)."""
    value = data.get("seeds", (data.get("best") or {}).get("seeds"))
    if value is not None:
        if is_int(value, 1):
            return list(range(value)), True
        if isinstance(value, list) and value and all(is_int(v, 0) for v in value):
            return sorted(set(value)), True
        problems.append(f"{where}: seeds: expected a count >= 1 or a list of seeds, got {value!r}")
        return [], True
    if is_int(params.get("run.seed"), 0):
        return [params["run.seed"]], False
    found = re.findall(r"run\.seed=(\d+)", str(data.get("retrain") or ""))
    return [int(found[-1]) if found else DEFAULT_SEED], False


def check_seeds(tuned: dict, report_seeds: list[int], ablation_path: str) -> str | None:
    """The problem (for a ConfigError of the ablation file) when the report seeds overlap the
    seeds the sweep chose on, else None."""
    both = sorted(set(tuned["seeds"]) & set(report_seeds))
    if not both:
        return None
    how = "its seeds" if tuned["seeds_stated"] else "run.seed of its trials (it names no seeds)"
    return (f"{tuned['where']}: {tuned['path']} was chosen on seeds {tuned['seeds']} ({how}); "
            f"the report seeds {report_seeds} overlap them at {both}: report a tuned row on "
            f"other seeds (choice_seeds, or --choice-seeds / --seeds) than {ablation_path} "
            "gives")


def note(label: str, tuned: dict, report_seeds: str) -> str:
    """The table's note for a tuned row: what it set, which sweep chose it, on which metric and
    seeds, and where it is reported."""
    params = ", ".join(f"{k} = {_text(v)}" for k, v in tuned["params"].items())
    seeds = ", ".join(map(str, tuned["seeds"]))
    assumed = "" if tuned["seeds_stated"] else ", its trials' run.seed"
    return (f"{label}: {params}, tuned by the sweep {tuned['sweep']} ({tuned['metric']} on "
            f"seeds {seeds}{assumed}; {tuned['file']}), reported on seeds {report_seeds}")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
