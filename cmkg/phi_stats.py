"""Statistics of phi that can detect per-weight signal (docs/phi-diagnostics.md). No Ray, no
training: plain functions of tensors keyed by parameter name.

A phi state is ``{name: tensor}``, one tensor per regularised weight tensor of one network.
Two such states are compared weight by weight only when they belong to the *same* network
(the same student at the start of the meta stage): weight i of one then is weight i of the
other. Two seeds train different networks whose hidden units do not correspond, so a per-weight
comparison across seeds is about 0 whether or not phi carries knowledge; only the order-free
statistics (``order_free``) compare across seeds.

``compare(a, b)``: per tensor, Spearman's rank correlation rho of a and b and its
*within-tensor permutation null*: b's values permuted within each tensor K times, which keeps
every tensor's values (their histogram, hence any difference of level or spread between
tensors) and destroys only which weight holds which value. Per tensor: rho, the null's mean, SD
and 95th percentile, z = (rho - null mean) / null SD and a two-sided permutation p. Over
tensors: the mean of the per-tensor rhos weighted by their sizes, against the same weighted
mean of each permutation's per-tensor rhos (the summary's own null). A tensor where either side
is constant has no rank correlation and is left out (``skipped``). The null's mean and SD are
also known exactly (0 and 1/sqrt(n - 1) per tensor of n weights: ``null_sd_exact``); the K
permutations estimate them, its percentiles and the permutation p. ``compare_all`` compares
several pairs at once, drawing each permutation once for all of them. ``live_weights``: the
weights L_REG depends on (a Fisher diagonal above 0); the diagnostics compare those only, since
weights no loss reaches keep their starting phi in every run and would count as agreement.

Quantities of the same network that phi may merely echo (``compare`` phi against them):
``abs_theta`` |theta|, ``squared_change`` (theta_after - theta_before)^2 and ``fisher_diagonal``
the mean over a few fixed batches of the squared per-batch gradient of L_REG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from cmkg.diagnostics import kept_state
from cmkg.losses import regression_loss

PhiState = Mapping[str, Tensor]
PERMUTATIONS = 100  # K: permutations of the null (the smallest two-sided p is 1 / (K + 1))
ABS_QUANTILES = (10, 50, 90, 99)  # percentiles of |phi| in the order-free statistics


def _centred_ranks(x: np.ndarray) -> np.ndarray | None:
    """Ranks (ties averaged) minus their mean, scaled to unit norm; None when x is constant."""
    r = rankdata(x, method="average")
    r -= r.mean()
    norm = np.sqrt(np.dot(r, r))
    return None if norm == 0 else r / norm


def _flat(t) -> np.ndarray:
    return (t.detach().double().flatten().cpu().numpy() if isinstance(t, Tensor)
            else np.asarray(t, dtype=np.float64).ravel())


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long arrays (ties averaged); nan when either
    is constant."""
    ra, rb = _centred_ranks(_flat(a)), _centred_ranks(_flat(b))
    if ra is None or rb is None:
        return float("nan")
    return float(np.dot(ra, rb))


def _null_summary(rho: float, null: np.ndarray, exact_sd: float) -> dict:
    mean, sd = float(null.mean()), float(null.std(ddof=1)) if len(null) > 1 else 0.0
    dev = np.abs(null - mean)
    return {"rho": rho, "null_mean": mean, "null_sd": sd, "null_sd_exact": exact_sd,
            "null_p95": float(np.percentile(null, 95)),
            "z": (rho - mean) / sd if sd > 0 else None,
            "p": float((1 + np.sum(dev >= abs(rho - mean))) / (len(null) + 1))}


def _empty(permutations: int, skipped: list[str]) -> dict:
    return {"rho": None, "null_mean": None, "null_sd": None, "null_sd_exact": None,
            "null_p95": None, "z": None, "p": None, "weights": 0, "tensors": 0,
            "skipped": skipped, "per_tensor": [], "permutations": permutations}


def compare(a: PhiState, b: PhiState, *, permutations: int = PERMUTATIONS,
            seed: int = 0, names: Iterable[str] | None = None,
            live: PhiState | None = None) -> dict:
    """Spearman's rho of ``a`` and ``b`` per tensor, each against its within-tensor permutation
    null (``b`` permuted ``permutations`` times), and their size-weighted summary with its own
    null. ``names``: the tensors to compare (default: ``a``'s, all of which ``b`` must hold with
    the same shapes); ``live``: per tensor, a boolean mask of the weights to compare (the
    others are left out, ``excluded``). Deterministic for a given ``seed``. One pair of
    ``compare_all``."""
    return compare_all({"": (a, b)}, permutations=permutations, seed=seed, names=names,
                       live=live)[""]


def live_weights(fisher: PhiState) -> dict[str, Tensor]:
    """The weights L_REG depends on: a Fisher diagonal above 0. The others never move and their
    phi stays where it started (e.g. the outer taps of a 3x3 convolution that only ever sees
    1x1 maps); every phi and every quantity shares them, so they would count as agreement."""
    return {n: f > 0 for n, f in fisher.items()}


def compare_all(pairs: Mapping[str, tuple[PhiState, PhiState]], *,
                permutations: int = PERMUTATIONS, seed: int = 0,
                names: Iterable[str] | None = None,
                live: PhiState | None = None) -> dict[str, dict]:
    """``compare`` for several pairs of states over the same tensors at once: each permutation
    of a tensor is drawn once and serves every pair (the costly part on millions of weights),
    and a state shared by several pairs is ranked once.

    Per tensor of n weights the permutation null of rho has mean 0 and SD 1/sqrt(n - 1)
    exactly (centred unit-norm rank vectors, ties or not); ``null_sd_exact`` reports it (for
    the summary: sqrt(sum n_t^2 / (n_t - 1)) / sum n_t) beside the K permutations' estimate."""
    first = next(iter(pairs.values()))[0]
    names = list(first) if names is None else list(names)
    for label, (a, b) in pairs.items():
        missing = [n for n in names if n not in a or n not in b
                   or tuple(b[n].shape) != tuple(a[n].shape)]
        if missing:
            raise ValueError(f"phi states {label!r} differ in their tensors (first: {missing[0]})")
    rng = np.random.default_rng(seed)
    acc = {label: {"per_tensor": [], "skipped": [], "null": np.zeros(permutations), "n": 0,
                   "sum": 0.0, "var": 0.0} for label in pairs}
    excluded = 0
    for name in names:
        keep = None if live is None else _flat(live[name]).astype(bool)
        excluded += 0 if keep is None else int((~keep).sum())
        ranks: dict[int, np.ndarray | None] = {}  # a tensor shared by pairs: ranked once
        used = {}
        for label, (a, b) in pairs.items():
            for t in (a[name], b[name]):
                if id(t) not in ranks:
                    x = _flat(t)
                    ranks[id(t)] = _centred_ranks(x if keep is None else x[keep])
            ra, rb = ranks[id(a[name])], ranks[id(b[name])]
            if ra is None or rb is None:
                acc[label]["skipped"].append(name)
            else:
                used[label] = (ra, rb)
        if not used:
            continue
        n = len(next(iter(used.values()))[0])
        null = {label: np.empty(permutations) for label in used}
        for k in range(permutations):
            perm = rng.permutation(n)
            for label, (ra, rb) in used.items():
                null[label][k] = np.dot(ra, rb[perm])
        for label, (ra, rb) in used.items():
            rho, s = float(np.dot(ra, rb)), acc[label]
            s["per_tensor"].append({"name": name, "n": n,
                                    **_null_summary(rho, null[label], 1 / np.sqrt(n - 1))})
            s["n"] += n
            s["sum"] += n * rho
            s["var"] += n * n / (n - 1)
            s["null"] += n * null[label]
    out = {}
    for label, s in acc.items():
        if not s["n"]:
            out[label] = {**_empty(permutations, s["skipped"]), "excluded": excluded}
            continue
        summary = _null_summary(s["sum"] / s["n"], s["null"] / s["n"], np.sqrt(s["var"]) / s["n"])
        out[label] = {**summary, "weights": s["n"], "excluded": excluded,
                      "tensors": len(s["per_tensor"]), "skipped": s["skipped"],
                      "per_tensor": s["per_tensor"], "permutations": permutations}
    return out


def order_free(phi: PhiState) -> dict:
    """Statistics that do not depend on which weight is which (comparable across seeds): the
    count, the fraction below 0 (a negative phi grows its weight), the fraction exactly 0 (from
    phi_init 0: weights phi never moved), mean and SD, and the percentiles ``ABS_QUANTILES`` of
    |phi|."""
    x = np.concatenate([_flat(t) for t in phi.values()])
    q = np.percentile(np.abs(x), ABS_QUANTILES)
    return {"count": int(x.size), "fraction_negative": float(np.mean(x < 0)),
            "fraction_zero": float(np.mean(x == 0)),
            "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            **{f"abs_p{k}": float(v) for k, v in zip(ABS_QUANTILES, q)}}


def abs_theta(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """|theta| of ``model``'s tensors ``names``."""
    named = dict(model.named_parameters())
    return {n: named[n].detach().abs().cpu() for n in names}


def squared_change(before: nn.Module, after: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """(theta_after - theta_before)^2 per weight of the tensors ``names``."""
    a, b = dict(after.named_parameters()), dict(before.named_parameters())
    return {n: (a[n].detach() - b[n].detach()).pow(2).cpu() for n in names}


def fisher_diagonal(model: nn.Module, batches: list[dict], names: Iterable[str], *,
                    reduction: str = "sum") -> dict[str, Tensor]:
    """The empirical Fisher diagonal of L_REG at ``model``'s weights: over ``batches``, the mean
    of the squared per-batch gradient of L_REG (Eq. 1, ``reduction`` over its 63 coordinates),
    in training mode as the stages compute it; the model's buffers are left as they were."""
    names = list(names)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with kept_state(model):
        for batch in batches:
            pred, _ = model(batch["rgb"])
            loss = regression_loss(pred, batch["target"], reduction)
            for s, g in zip(acc, torch.autograd.grad(loss, params)):
                s += g.detach().double().pow(2)
    return {n: (s / max(len(batches), 1)).cpu() for n, s in zip(names, acc)}
