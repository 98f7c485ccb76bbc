"""Learning curves per table: ``{table}_curves.png``, drawn from the records' ``curves`` only.

For every column of the table (its stage), two panels over epochs: the mean training loss, and
the EPE on a fixed slice of the training split (dashed) beside the validation EPE (solid); one
line per row, each the mean over the seeds whose cell logged it. A gap between the two EPEs that
grows is over-fitting; a training loss still falling at the last epoch is under-training.
Records written before the curves were recorded have none, and no figure is drawn for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmkg.report.figures import _pyplot, _save


def _mean_curve(points: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, mean of ``key`` over the seeds that logged it at that epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for seed_points in points:
        for p in seed_points:
            if p.get(key) is not None:
                by_epoch.setdefault(p["epoch"], []).append(float(p[key]))
    if not by_epoch:
        return None
    epochs = np.array(sorted(by_epoch))
    return epochs, np.array([np.mean(by_epoch[e]) for e in epochs])


def curves_of(spec: dict, records: list[dict]) -> dict[str, dict[str, list[list[dict]]]]:
    """{column: {row: [the cell's own stage curve, per seed]}} of the cells that logged one."""
    out: dict[str, dict[str, list[list[dict]]]] = {}
    for r in records:
        curve = (r.get("curves") or {}).get(r.get("stage") or "")
        if r["status"] == "done" and curve:
            out.setdefault(r["column"], {}).setdefault(r["row"], []).append(curve)
    return out


def learning_curves(spec: dict, records: list[dict], out: str | Path) -> list[str]:
    """Draw the table's learning curves into ``out``; the panels drawn (none: nothing written)."""
    curves = curves_of(spec, records)
    columns = [c for c in spec["columns"] if c["name"] in curves]
    if not columns:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(columns), figsize=(5.2 * len(columns), 7.4), squeeze=False)
    panels = []
    for j, col in enumerate(columns):
        loss_ax, epe_ax = axes[0][j], axes[1][j]
        for i, (row, points) in enumerate(curves[col["name"]].items()):
            color = f"C{i % 10}"
            for ax, key, style, label in ((loss_ax, "loss", "-", row),
                                          (epe_ax, "val_epe_mm", "-", f"{row} (val)"),
                                          (epe_ax, "train_epe_mm", "--", None)):
                line = _mean_curve(points, key)
                if line is not None:
                    ax.plot(*line, style, color=color, marker=".", label=label)
        title = col.get("title") or col["name"]
        loss_ax.set(title=f"{title}: training loss", xlabel="epoch", yscale="log")
        epe_ax.set(title=f"{title}: EPE, train slice (dashed) and val", xlabel="epoch",
                   ylabel="EPE (mm)")
        epe_ax.legend(fontsize=7)
        panels.append(f"{title} ({len(curves[col['name']])} rows)")
    fig.suptitle(f"{spec.get('title', spec['table'])}: learning curves (mean over seeds)")
    fig.tight_layout()
    _save(fig, out)
    return panels
