"""Histograms as stored in stage metrics and result records: ``{edges, counts}`` over a
symmetric range, so that a figure can be drawn later from the numbers alone (numpy only)."""

from __future__ import annotations

import numpy as np

BINS = 101


def histogram(values: np.ndarray, lim: float | None = None) -> dict:
    """``{edges, counts}`` of ``values`` over [-lim, lim] in ``BINS`` bins; lim defaults to the
    99.9 % quantile of |values| (what a record's ``extra`` theta_hist / phi_hist holds)."""
    values = np.asarray(values, float)
    if lim is None:
        lim = float(np.quantile(np.abs(values), 0.999)) or 1.0
    edges = np.linspace(-lim, lim, BINS + 1)
    return {"edges": edges.tolist(), "counts": np.histogram(values, edges)[0].tolist()}
