"""Figures from stored artifacts (the tables of the ablation runner will join them here).

``parameter_histograms`` draws the paper's Fig. 5: the histogram of the target network's
parameters trained without a regularizer and with R of Eq. (10), and, beside them, the
histogram of the learned phi. It reads finished stage folders only; nothing is typed in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmkg.atomic import atomic_path

BINS = 101


def flat_weights(state: dict[str, torch.Tensor], names: list[str] | None = None) -> np.ndarray:
    """All regularised weights (conv and linear ``*.weight`` by default) as one float64 vector."""
    keys = names if names is not None else [
        k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    return np.concatenate([state[k].detach().double().flatten().cpu().numpy() for k in keys])


def parameter_histograms(without: dict[str, torch.Tensor], with_prior: dict[str, torch.Tensor],
                         phi: np.ndarray | None, out: str | Path, *, labels=("w/o R", "with R"),
                         ) -> dict:
    """Write Fig. 5 as a PNG; return the histogram data it drew (edges and counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = flat_weights(without), flat_weights(with_prior)
    lim = float(np.quantile(np.abs(np.concatenate([a, b])), 0.999))
    edges = np.linspace(-lim, lim, BINS + 1)
    data = {"theta_edges": edges.tolist(),
            "theta_counts": {labels[0]: np.histogram(a, edges)[0].tolist(),
                             labels[1]: np.histogram(b, edges)[0].tolist()}}
    panels = 3 if phi is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2))
    for ax, values, label in zip(axes, (a, b), labels):
        ax.hist(values, bins=edges, color="tab:blue" if label == labels[0] else "tab:orange")
        ax.set_title(f"theta, {label}")
        ax.set_yscale("log")
        ax.set_xlabel("parameter value")
    if phi is not None:
        plim = float(np.quantile(np.abs(phi), 0.999)) or 1.0
        pedges = np.linspace(-plim, plim, BINS + 1)
        data["phi_edges"] = pedges.tolist()
        data["phi_counts"] = np.histogram(phi, pedges)[0].tolist()
        axes[2].hist(phi, bins=pedges, color="tab:green")
        axes[2].set_title("learned phi")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("phi")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return data


def fig5_from_artifacts(without_dir: str | Path, with_dir: str | Path,
                        prior_dir: str | Path | None, out: str | Path) -> dict:
    """Fig. 5 from two target-stage folders (form none, and weighted) and a meta-stage folder."""
    from cmkg.stages import open_artifact

    without = open_artifact(without_dir).load_model().state_dict()
    with_prior = open_artifact(with_dir).load_model().state_dict()
    phi = None
    if prior_dir is not None:
        reg = open_artifact(prior_dir).load_phi()
        phi = torch.cat([p.flatten() for p in reg.phi()]).double().numpy()
    return parameter_histograms(without, with_prior, phi, out)
