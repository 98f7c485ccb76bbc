"""3D hand-pose metrics under the standard RGB protocol (Sect. 5.2: EPE, 3D PCK, AUC).

Predictions are root-relative and scale-normalised; they are denormalised with the ground-truth
scale (middle MCP-PIP length) and compared with root-relative ground truth, in millimetres.

Every figure is a mean over joints of a per-joint figure computed on the samples where that
joint is visible (the reference evaluation utility of Zimmermann & Brox), not a pooled mean:
- EPE: per-joint mean error; also the median the utility reports.
- PCK(t): per-joint fraction of errors <= t (inclusive), curve at linspace(0, 50 mm, 20).
- AUC 20-50 mm: trapezoid integral of the curve samples from index 8 on (21.05 ... 50 mm)
  divided by the threshold range; AUC 0-50 mm likewise over the whole curve.
Joints never visible are left out of the joint average, as the utility does.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS_MM = np.linspace(0.0, 50.0, 20)
AUC_FROM = 8  # THRESHOLDS_MM[8] = 21.05 mm: the "20-50 mm" AUC


def denormalise(pred: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, 21, 3) normalised prediction -> root-relative millimetres with the GT scale (N,)."""
    return pred * scale[:, None, None]


def joint_errors(pred_mm: np.ndarray, gt_mm: np.ndarray) -> np.ndarray:
    """Euclidean error (N, 21) in mm between two (N, 21, 3) arrays in the same frame."""
    return np.linalg.norm(np.asarray(pred_mm, float) - np.asarray(gt_mm, float), axis=-1)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def pose_metrics(pred_mm: np.ndarray, gt_mm: np.ndarray, vis: np.ndarray | None = None,
                 thresholds: np.ndarray = THRESHOLDS_MM) -> dict:
    """EPE (mean, median), PCK curve and AUCs of (N, 21, 3) predictions against ground truth."""
    err = joint_errors(pred_mm, gt_mm)
    vis = np.ones(err.shape, bool) if vis is None else np.asarray(vis, bool)
    if vis.shape != err.shape:
        raise ValueError(f"visibility has shape {vis.shape}, expected {err.shape}")
    means, medians, curves = [], [], []
    for j in range(err.shape[1]):
        e = err[vis[:, j], j]
        if e.size == 0:
            continue
        means.append(e.mean())
        medians.append(np.median(e))
        curves.append([(e <= t).mean() for t in thresholds])
    if not means:
        raise ValueError("no visible joint to evaluate")
    curve = np.mean(curves, axis=0)
    return {
        "epe_mm": float(np.mean(means)),
        "epe_median_mm": float(np.mean(medians)),
        "auc_20_50": _trapezoid(curve[AUC_FROM:], thresholds[AUC_FROM:])
        / float(thresholds[-1] - thresholds[AUC_FROM]),
        "auc_0_50": _trapezoid(curve, thresholds) / float(thresholds[-1] - thresholds[0]),
        "pck_thresholds_mm": [float(t) for t in thresholds],
        "pck": [float(p) for p in curve],
        "per_joint_epe_mm": [float(m) for m in means],  # visible joints, in joint order
        "num_samples": int(err.shape[0]),
        "num_joints": len(means),
    }


def selection_val_epe(stage_metrics: dict) -> float:
    """The one validation figure every chooser ranks by: a `choose` row's values
    (``ablation.cells``), a sweep's trials (``cluster.tune``), a tuned row's best trial. It is the
    validation EPE of the weights the stage published (``best_val_epe_mm`` of its metrics.json):
    under ``optim.keep: final`` (the cpu preset) the last epoch's, under ``best_val`` the best
    epoch's, under ``average`` the averaged weights'. Never the best over epochs of weights that
    were not kept, and never a test figure (docs/statistics.md)."""
    return float(stage_metrics["best_val_epe_mm"])
