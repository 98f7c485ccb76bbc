"""Figures 4 and 5, drawn from the records of the tables whose spec names them.

What a table draws is data, not code: its ablation file's ``figures:`` entry, checked by
``check_figures`` and stored in the table's spec beside its records::

    figures:
      figure4:
        # Fig. 4 (left, middle): 3D PCK of two columns of one row, and the per-seed gain in
        # AUC 20-50 of the second column over the first beside the paper's gain
        pck_pair: {row: "L_ACT + L_ATT", columns: [rgb, kd], dataset: source,
                   paper_delta_auc: 0.045}
        pck_rows: {}          # Fig. 4 (right): 3D PCK of every row
      figure5:
        # theta without R and with R, and the learned phi (the first seed with histograms);
        # ``with``: the first of these rows whose records hold a phi histogram
        parameters: {without: none, with: ["weighted l2 (calibrated)", "weighted l2 (paper β)"]}

``figureN.png`` holds the panels every table names for it, tables in name order; a figure no
table names is not drawn. Fig. 5 can also be drawn from finished stage folders
(``fig5_from_artifacts``, the CLI's ``cmkg figure params``): the histogram of the target
network's parameters trained without a regularizer and with R of Eq. (10), and beside them the
histogram of the phi that run applied (its ``phi_applied``; for older stages, the learned phi).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cmkg.atomic import atomic_path
from cmkg.errors import DataError
from cmkg.histograms import histogram
from cmkg.report import stats
from cmkg.yamlfile import dotted, is_number, mapping, unknown_keys

# figure -> panel -> {key: kind}; every key is required. Kinds: a row label, a list of row
# labels, two column names, a text, a number.
FIGURES = {
    "figure4": {"pck_pair": {"row": "row", "columns": "two columns", "dataset": "text",
                             "paper_delta_auc": "number"},
                "pck_rows": {}},
    "figure5": {"parameters": {"without": "row", "with": "rows"}},
}


# ---------------------------------------------------------------- the figures entry of a spec

def check_figures(value, rows: list[str], columns: list[str], where: str,
                  problems: list[str]) -> dict:
    """A ``figures`` entry checked against ``FIGURES`` and the table's row labels and column
    names; every problem appended to ``problems``. Returns the entry (what was valid)."""
    out: dict = {}
    figures = mapping(value, where, problems)
    unknown_keys(figures, FIGURES, where, problems)
    for figure, panels in figures.items():
        if figure not in FIGURES:
            continue
        at = dotted(where, figure)
        panels = mapping(panels, at, problems)
        unknown_keys(panels, FIGURES[figure], at, problems)
        for panel, entry in panels.items():
            if panel in FIGURES[figure]:
                checked = _check_panel(entry, FIGURES[figure][panel], rows, columns,
                                       dotted(at, panel), problems)
                if checked is not None:
                    out.setdefault(figure, {})[panel] = checked
    return out


def without_rows(figures: dict, labels: set[str]) -> dict:
    """A checked ``figures`` entry without the rows ``labels`` (a row an ablation leaves out at
    a preset, ``cmkg.ablation.spec.at_preset``): a panel naming one of them as its ``row`` is
    dropped, a ``rows`` list loses them (the panel too when none is left), and so is a figure
    left without panels."""
    out: dict = {}
    for figure, panels in figures.items():
        for panel, entry in panels.items():
            kinds, kept = FIGURES[figure][panel], dict(entry)
            for key, kind in kinds.items():
                if kind == "row" and kept[key] in labels:
                    kept = None
                    break
                if kind == "rows":
                    kept[key] = [v for v in kept[key] if v not in labels]
                    if not kept[key]:
                        kept = None
                        break
            if kept is not None:
                out.setdefault(figure, {})[panel] = kept
    return out


def _check_panel(entry, kinds: dict, rows, columns, at: str, problems: list[str]) -> dict | None:
    before = len(problems)
    entry = mapping(entry, at, problems)
    unknown_keys(entry, kinds, at, problems)
    for key, kind in kinds.items():
        value, where = entry.get(key), dotted(at, key)
        if key not in entry:
            problems.append(f"{where}: missing")
        elif kind == "row" and value not in rows:
            problems.append(f"{where}: {value!r} is not a row label")
        elif kind == "rows" and not (isinstance(value, list) and value
                                     and all(v in rows for v in value)):
            problems.append(f"{where}: must be a non-empty list of row labels, got {value!r}")
        elif kind == "two columns" and not (isinstance(value, list) and len(value) == 2
                                            and len(set(value)) == 2
                                            and all(v in columns for v in value)):
            problems.append(f"{where}: must be two columns of {', '.join(columns)}, "
                            f"got {value!r}")
        elif kind == "text" and not (isinstance(value, str) and value):
            problems.append(f"{where}: must be a non-empty string, got {value!r}")
        elif kind == "number" and not is_number(value):
            problems.append(f"{where}: must be a number, got {value!r}")
    if len(problems) > before:
        return None
    return {k: float(v) if kinds.get(k) == "number" else v for k, v in entry.items()}


def _entry(spec: dict, figure: str) -> dict:
    return (spec.get("figures") or {}).get(figure) or {}


# ---------------------------------------------------------------- drawing

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return Path(out)


# ---------------------------------------------------------------- Figure 4: PCK curves

def _mean_pck(cell: list[dict], where: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(thresholds, mean PCK over the finished seeds, n) of a cell; None if none finished."""
    done = [r for r in cell if r["status"] == "done" and r["pck"]]
    if not done:
        return None
    x = done[0]["pck_thresholds_mm"]
    if any(r["pck_thresholds_mm"] != x or len(r["pck"]) != len(x) for r in done):
        raise DataError(f"{where}: PCK curves of different thresholds across seeds")
    return np.asarray(x), np.mean([r["pck"] for r in done], axis=0), len(done)


def _pck_axes(ax, title: str) -> None:
    ax.set_xlabel("error threshold (mm)")
    ax.set_ylabel("3D PCK")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")


def figure4(tables: dict[str, tuple[dict, list[dict]]], out: str | Path) -> list[str]:
    """Fig. 4: the panels the tables' specs name (``pck_pair``: PCK of two columns and the
    per-seed AUC gain, Table 1; ``pck_rows``: PCK of every row, Table 2).

    Returns what the drawn panels show; empty (and no file) when no table names one."""
    panels: list[tuple[str, Callable]] = []
    for name, (spec, records) in tables.items():
        entry = _entry(spec, "figure4")
        if "pck_pair" in entry:
            panels += _pair_panels(name, spec, records, entry["pck_pair"])
        if "pck_rows" in entry:
            panels.append(_rows_panel(name, spec, records))
    if not panels:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (_, draw) in zip(axes[0], panels):
        draw(ax)
    fig.tight_layout()
    _save(fig, out)
    return [caption for caption, _ in panels]


def _pair_panels(table: str, spec: dict, records: list[dict],
                 entry: dict) -> list[tuple[str, Callable]]:
    """PCK of the two columns of a row, and the per-seed AUC 20-50 gain of the second over the
    first with its 95 % interval, beside the paper's gain."""
    row, columns, dataset = entry["row"], entry["columns"], entry["dataset"]
    paper = entry["paper_delta_auc"]
    by_cell = stats.cells(spec, records)
    first, second = (by_cell[(row, c)] for c in columns)

    def left(ax):
        for name, cell in zip(columns, (first, second)):
            curve = _mean_pck(cell, f"{table} {row}/{name}")
            if curve is not None:
                ax.plot(curve[0], curve[1], label=f"{name} (n={curve[2]})")
        _pck_axes(ax, f"{row}: 3D PCK on the {dataset}")

    def middle(ax):
        a, b = stats.values(second, "auc_20_50"), stats.values(first, "auc_20_50")
        seeds = sorted(set(a) & set(b))
        d = [a[s] - b[s] for s in seeds]
        iv = stats.paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
        ax.scatter(np.linspace(-0.15, 0.15, len(d)) if len(d) > 1 else [0.0] * len(d), d,
                   color="tab:blue", zorder=3, label="per seed")
        if iv["n"]:
            err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
            ax.errorbar([0.0], [iv["mean"]], yerr=err, fmt="_", color="black",
                        markersize=30, capsize=6, label="mean, 95 % interval")
            ax.annotate(f"{iv['mean']:+.3f}", (0.25, iv["mean"]), va="center", fontsize=8)
        ax.bar([1.0], [paper], width=0.5, color="tab:gray", label="paper")
        ax.annotate(f"{paper:+.3f}", (1.0, paper), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks([0.0, 1.0], [f"ours (n={iv['n']})", "paper"])
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(f"ΔAUC 20-50, {columns[1]} − {columns[0]} ({dataset})", fontsize=9)
        ax.legend(fontsize=7)

    return [(f"3D PCK of {' vs '.join(columns)} ({row})", left),
            (f"the per-seed AUC 20-50 gain of {' − '.join(reversed(columns))} "
             "beside the paper's", middle)]


def _rows_panel(table: str, spec: dict, records: list[dict]) -> tuple[str, Callable]:
    """The mean PCK curve of every (row, column) of a table."""
    by_cell = stats.cells(spec, records)

    def right(ax):
        one = len(spec["columns"]) == 1
        for (row, column), cell in by_cell.items():
            curve = _mean_pck(cell, f"{table} {row}/{column}")
            if curve is not None:
                name = row if one else f"{row} / {column}"
                ax.plot(curve[0], curve[1], label=f"{name} (n={curve[2]})")
        _pck_axes(ax, f"{spec.get('title') or table}: 3D PCK")

    return f"3D PCK of every row of {table}", right


# ---------------------------------------------------------------- Figure 5: histograms

def _first_extra(spec: dict, records: list[dict], row: str, key: str) -> tuple[int, dict] | None:
    """(seed, extra) of the first seed (the spec's order) whose finished cell in ``row`` holds
    ``extra[key]``; the columns are tried in the spec's order."""
    order = {s: i for i, s in enumerate(spec.get("seeds") or [])}
    columns = [c["name"] for c in spec["columns"]]
    found = [r for r in records if r["row"] == row and r["status"] == "done" and key in r["extra"]]
    found.sort(key=lambda r: (order.get(r["seed"], len(order)), r["seed"],
                              columns.index(r["column"])))
    return (found[0]["seed"], found[0]["extra"]) if found else None


def figure5(tables: dict[str, tuple[dict, list[dict]]], out: str | Path) -> list[str]:
    """Fig. 5 from the records: theta without R, theta with R, and phi (the first seed).

    Returns the drawn panels' titles; empty (and no file) when no record holds a histogram."""
    panels = []
    for spec, records in tables.values():
        entry = _entry(spec, "figure5").get("parameters")
        if entry:
            panels += _parameter_panels(spec, records, entry)
    if panels:
        _draw_histograms(panels, out)
    return [p["title"].replace("\n", ", ") for p in panels]


def _parameter_panels(spec: dict, records: list[dict], entry: dict) -> list[dict]:
    """theta of the ``without`` row, theta and phi of the first ``with`` row that has a phi
    histogram (the last one if none has)."""
    panels = []
    with_row = next((r for r in entry["with"] if _first_extra(spec, records, r, "phi_hist")),
                    entry["with"][-1])
    for row, label, color in ((entry["without"], "w/o R", "tab:blue"),
                              (with_row, "with R", "tab:orange")):
        hit = _first_extra(spec, records, row, "theta_hist")
        if hit is not None:
            h = hit[1]["theta_hist"]
            panels.append({"title": f"theta, {label} ({row}, seed {hit[0]})", "edges": h["edges"],
                           "counts": h["counts"], "color": color, "xlabel": "parameter value"})
    hit = _first_extra(spec, records, with_row, "phi_hist")
    if hit is not None:
        # the fraction below 0 of the phi drawn: the applied phi's where the record has it
        # (strength, sign, control, cap), else phi_META's (the same sign for a scale and a cap)
        applied = hit[1].get("phi_applied")
        phi = applied if isinstance(applied, dict) else hit[1].get("phi") or {}
        what = "phi as applied" if applied else "learned phi"
        title = f"{what} ({with_row}, seed {hit[0]})"
        if "fraction_negative" in phi:
            title += f"\n{phi['fraction_negative']:.1%} negative"
        panels.append({"title": title, "edges": hit[1]["phi_hist"]["edges"],
                       "counts": hit[1]["phi_hist"]["counts"], "color": "tab:green",
                       "xlabel": "phi"})
    return panels


def _draw_histograms(panels: list[dict], out: str | Path) -> Path:
    """One log-scale histogram per panel, from precomputed ``edges`` and ``counts``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if "bars" in p:  # {label: value} on a log axis (the prior's D per layer)
            names, values = list(p["bars"]), [max(v, 1e-12) for v in p["bars"].values()]
            ax.barh(range(len(names)), values, color=p["color"])
            ax.set_yticks(range(len(names)), names, fontsize=5)
            ax.set_xscale("log")
            ax.axvline(0.1, color="grey", lw=0.8, ls="--")
            ax.set_title(p["title"], fontsize=9)
            ax.set_xlabel(p["xlabel"])
            continue
        edges = np.asarray(p["edges"], float)
        ax.hist(edges[:-1], bins=edges, weights=np.asarray(p["counts"], float), color=p["color"])
        ax.set_title(p["title"], fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel(p["xlabel"])
    fig.tight_layout()
    return _save(fig, out)


def flat_weights(state: dict, names: list[str] | None = None) -> np.ndarray:
    """All regularised weights (conv and linear ``*.weight`` by default) as one float64 vector."""
    keys = names if names is not None else [
        k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    return np.concatenate([state[k].detach().double().flatten().cpu().numpy() for k in keys])


def parameter_histograms(without: dict, with_prior: dict, phi: np.ndarray | dict | None,
                         out: str | Path, *, labels=("w/o R", "with R"),
                         strength: dict | None = None, phi_title: str = "learned phi") -> dict:
    """Write Fig. 5 from two state dicts (and phi: values, or a ``{edges, counts}`` histogram
    such as a target's ``phi_applied``) as a PNG; return the histograms it drew.

    ``strength``: the with-R run's ``prior_strength`` diagnostics (``cmkg.diagnostics``) after
    its last epoch; adds a panel of the median |D| per regularised layer."""
    a, b = flat_weights(without), flat_weights(with_prior)
    lim = float(np.quantile(np.abs(np.concatenate([a, b])), 0.999))
    ha, hb = histogram(a, lim), histogram(b, lim)
    data = {"theta_edges": ha["edges"],
            "theta_counts": {labels[0]: ha["counts"], labels[1]: hb["counts"]}}
    panels = [{"title": f"theta, {label}", **h, "color": color, "xlabel": "parameter value"}
              for label, h, color in zip(labels, (ha, hb), ("tab:blue", "tab:orange"))]
    if phi is not None:
        hp = phi if isinstance(phi, dict) else histogram(phi)
        data["phi_edges"], data["phi_counts"] = hp["edges"], hp["counts"]
        panels.append({"title": phi_title, **hp, "color": "tab:green", "xlabel": "phi"})
    if strength and strength.get("layers"):
        data["abs_d_median"] = {n: v["abs_d_median"] for n, v in strength["layers"].items()}
        overall = strength["overall"]["abs_d_median"]
        panels.append({"title": f"prior strength, with R: median |D| per layer\n(all: "
                                f"{overall:.3g}; dashed: 0.1)", "bars": data["abs_d_median"],
                       "color": "tab:purple", "xlabel": "median |D| over the run"})
    _draw_histograms(panels, out)
    return data


def fig5_from_artifacts(without_dir: str | Path, with_dir: str | Path,
                        prior_dir: str | Path | None, out: str | Path) -> dict:
    """Fig. 5 from two target-stage folders (form none, and weighted) and a meta-stage folder.

    The phi drawn is the one the weighted run trained with: its ``phi_applied`` histogram (after
    strength, sign, control and the calibration's scale and cap), where its metrics hold one;
    for older stages, phi_META of ``prior_dir`` times the calibration's scale (before its cap)."""
    import torch

    from cmkg import stages

    without = stages.open_artifact(without_dir).load_model().state_dict()
    art = stages.open_artifact(with_dir)
    with_prior = art.load_model().state_dict()
    history = art.metrics.get("history") or [{}]
    strength = history[-1].get("diagnostics", {}).get("prior_strength")
    phi, title = None, "learned phi"
    applied = art.metrics.get("phi_applied")
    if applied:
        phi, title = applied["hist"], (f"phi as applied ({applied['fraction_negative']:.1%} "
                                       "negative)")
    elif prior_dir is not None:
        reg = stages.open_artifact(prior_dir).load_phi()
        phi = torch.cat([p.flatten() for p in reg.phi()]).double().numpy()
        scale = art.metrics.get("calibration", {}).get("scale")
        if scale is not None:  # the phi the run used (before its per-weight cap)
            phi, title = phi * scale, f"phi, calibrated (phi_META x {scale:.3g})"
    return parameter_histograms(without, with_prior, phi, out, strength=strength,
                                phi_title=title)
