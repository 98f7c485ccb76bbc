"""How strong is each term of an objective? Gradient shares and the prior's figure D.

Measured once per epoch on one fixed training batch (``fixed_batch``) by the hooks that
``cmkg.stages`` passes to ``fit(diagnose=...)``; each epoch record keeps them under
``diagnostics``. docs/prior-strength.md says why these numbers matter and what they measured.

Gradient shares. For an objective that is a sum of terms T_k (kd and meta: G = L_REG + L_ACT +
lambda * L_ATT; target: F = L_REG + R(theta)), on the backbone parameters theta (the stem and
layer1..layer4 of the student, not its regression head)::

    share_k = ||grad_theta T_k|| / ||grad_theta sum_j T_j||

A share near 1 with the others near 0 means the other terms hardly steer training. The shares
need not sum to 1 (the gradients are vectors); for ``att`` the term is lambda * L_ATT.

The prior's strength (Algorithm 2: Adam on F = L_REG + R(theta; phi)). Adam divides each weight's
gradient by s_i, the root of its bias-corrected second moment. For a weight the data do not pull
on, R alone moves it as d(theta_i)/dk = -lr * (dR/dtheta_i) / s_i, so over the K steps of the run
it changes log|theta_i| by -D_i with::

    D_i = lr * K * (dR/dtheta_i * theta_i) / (s_i * theta_i^2)
    s_i = sqrt(v_i / (1 - beta2^t)) + eps      (v_i: Adam's exp_avg_sq after t steps)

For weighted l2, R = sum_i phi_i theta_i^2, this is D_i = lr * K * 2 phi_i / s_i; for l2, phi_i =
sigma; for (weighted) l1, D_i = lr * K * phi_i / (s_i |theta_i|). D_i > 0: R decays the weight
(D_i e-folds over the run), D_i < 0: R grows it; |D_i| << 0.1: R does nothing. A weight at
exactly 0 counts as D_i = 0 (R does not move it there). Where the data give a weight no
gradient, s_i comes from R's own gradient and D_i = lr * K / |theta_i| whatever phi_i is: Adam
normalises R's scale away. ``optim.weight_decay`` (an l2 of its own inside Adam) is not part of D.
Under a learning-rate schedule, lr * K is the sum of the rates over the run's steps
(``schedule_lr_sum``; lr (K + 1) / 2 for ``optim.schedule: cosine``), not the rate at the step
D is measured at (0 after a cosine run's last step).

Next to D, ||grad R|| / ||grad L_REG|| on each regularised tensor (``grad_ratio``) says how much
of the gradient R contributes on the fixed batch.

Everything here is plain PyTorch; a hook restores the model's buffers (BatchNorm statistics) and
mode, reads but never changes the optimizer and draws no random numbers, so a run with
diagnostics trains exactly like one without.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from cmkg.data.dataset import prepare_batch
from cmkg.meta import objective_g

STRONG = 0.1  # |D| above this: R shapes the weight over the run (docs/prior-strength.md)
INERT = 0.01  # median |D| below this: R moves the typical weight by under 1 % over the run


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def fixed_batch(dataset, size: int, device: torch.device) -> dict[str, Tensor]:
    """``size`` samples spread evenly over ``dataset`` (no randomness), on ``device``."""
    idx = np.linspace(0, len(dataset) - 1, min(size, len(dataset))).round().astype(int)
    return prepare_batch(dataset.__getitems__(idx), device)


def backbone_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters of a ``PoseNet`` minus its regression head: where every term acts."""
    return [p for n, p in model.named_parameters() if not n.startswith("head.")]


@contextlib.contextmanager
def kept_state(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in training mode, then restore its mode and buffers (BatchNorm running
    statistics and counters), so a diagnostic forward leaves no trace."""
    saved = {n: b.detach().clone() for n, b in module.named_buffers()}
    was_training = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(saved[n])


def term_gradients(terms: dict[str, Tensor], params: list[Tensor]) -> dict[str, list[Tensor]]:
    """grad of each term on ``params``; zeros where a term does not reach a parameter."""
    out = {}
    for name, term in terms.items():
        if term.requires_grad:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        else:  # e.g. R of form none: a constant zero
            grads = [None] * len(params)
        out[name] = [torch.zeros_like(p) if g is None else g.detach()
                     for p, g in zip(params, grads)]
    return out


def _norm(grads: list[Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None  # None: undefined (JSON has no inf)


def gradient_shares(grads: dict[str, list[Tensor]]) -> dict[str, float | None]:
    """||grad T_k|| / ||grad sum_j T_j|| for the per-term gradients ``grads`` (one list each)."""
    total = [sum(gs) for gs in zip(*grads.values())]  # the gradient of the sum is the sum
    den = _norm(total)
    return {k: _ratio(_norm(g), den) for k, g in grads.items()}


def adam_rms(optimizer: torch.optim.Optimizer, param: Tensor) -> Tensor | None:
    """s = sqrt(bias-corrected exp_avg_sq) + eps: what Adam divides ``param``'s step by; None
    before its first step."""
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta2, eps = group["betas"][1], group["eps"]
    correction = 1.0 - beta2 ** float(state["step"])
    return (state["exp_avg_sq"] / correction).sqrt() + eps


def strength(grad_prior: Tensor, theta: Tensor, s: Tensor, *, lr: float, total_steps: int,
             ) -> Tensor:
    """D = lr * K * (dR/dtheta * theta) / (s * theta^2), elementwise; 0 where theta = 0.

    Computed and returned in float64: for a float32 weight below about 1e-19, theta^2 and an
    l2's dR/dtheta * theta underflow to 0 in float32, and 0 / 0 made D nan (and the median of
    a whole run nan with it)."""
    theta = theta.detach().double()
    safe = torch.where(theta == 0, torch.ones_like(theta), theta)
    d = lr * total_steps * (grad_prior.double() * theta) / (s.double() * safe.pow(2))
    return torch.where(theta == 0, torch.zeros_like(d), d)


def summarize(d: Tensor) -> dict[str, float]:
    """median and 90th percentile of |D|, fraction with |D| > 0.1, fraction with D < 0."""
    a = d.detach().double().flatten().cpu().numpy()
    mag = np.abs(a)
    med, p90 = np.percentile(mag, [50, 90])
    return {"abs_d_median": float(med), "abs_d_p90": float(p90),
            f"frac_abs_d_gt_{STRONG}": float((mag > STRONG).mean()),
            "frac_d_negative": float((a < 0).mean())}


def schedule_lr_sum(lr: float, total_steps: int, schedule: str = "constant") -> float:
    """The sum of the learning rates over a run's ``total_steps`` steps (the lr * K of D):
    lr K for a constant rate; for ``optim.schedule: cosine`` (lr (1 + cos(pi t / K)) / 2 at step
    t = 0 .. K - 1, ``cmkg.train.cosine_schedule``) that sum, lr (K + 1) / 2."""
    if schedule == "constant":
        return lr * total_steps
    if schedule == "cosine":
        return lr * sum(0.5 * (1 + math.cos(math.pi * t / total_steps)) for t in range(total_steps))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def prior_strength(names: list[str], params: list[Tensor], grad_reg: list[Tensor],
                   grad_prior: list[Tensor], optimizer: torch.optim.Optimizer, *,
                   total_steps: int, lr_sum: float | None = None) -> dict:
    """D and ||grad R|| / ||grad L_REG|| per regularised tensor ``names`` and over all of them.

    ``params``, ``grad_reg``, ``grad_prior``: the tensors, grad L_REG and grad R, in the order
    of ``names``; ``lr_sum``: the sum of the rates over the run (``schedule_lr_sum``), None for
    the optimizer's current rate times ``total_steps`` (a constant rate). Returns ``{"lr",
    "total_steps", "overall": {...}, "layers": {name: {...}}}`` (lr: the mean rate over the run)
    with the keys of ``summarize`` plus ``grad_ratio``; ``{}`` before Adam's first step."""
    lr = optimizer.param_groups[0]["lr"] if lr_sum is None else lr_sum / total_steps
    layers, ds = {}, []
    for name, p, gr, gp in zip(names, params, grad_reg, grad_prior):
        s = adam_rms(optimizer, p)
        if s is None:
            return {}
        d = strength(gp, p, s, lr=lr, total_steps=total_steps)
        ds.append(d.flatten())
        layers[name] = {"grad_ratio": _ratio(_norm([gp]), _norm([gr])), **summarize(d)}
    overall = {"grad_ratio": _ratio(_norm(grad_prior), _norm(grad_reg)),
               **summarize(torch.cat(ds))}
    return {"lr": lr, "total_steps": total_steps, "overall": overall, "layers": layers}


# ---------------------------------------------------------------------------------------------
# Hooks for fit(): total training steps K -> the epoch's diagnostics
# ---------------------------------------------------------------------------------------------

def weighted_terms(parts: dict[str, Tensor], lambda_att: float) -> dict[str, Tensor]:
    """The summands of G = L_REG + L_ACT + lambda * L_ATT present in ``parts``."""
    terms = {k: parts[k] for k in ("reg", "act") if k in parts}
    if "att" in parts:
        terms["att"] = lambda_att * parts["att"]
    return terms


def share_diagnose(terms_fn: Callable[[], dict[str, Tensor]], model: nn.Module,
                   ) -> Callable[[int], dict]:
    """Hook: ``{"grad_share": {term: share}}`` of the terms ``terms_fn()`` computes (on a fixed
    batch) on the backbone of ``model``, whose buffers the forward may touch."""
    params = backbone_parameters(model)

    def diagnose(total_steps: int) -> dict:
        with kept_state(model):
            grads = term_gradients(terms_fn(), params)
        return {"grad_share": gradient_shares(grads)}

    return diagnose


def distill_diagnose(loss_fn: Callable[[dict], dict[str, Tensor]], batch: dict[str, Tensor],
                     model: nn.Module, lambda_att: float) -> Callable[[int], dict]:
    """Hook of the kd stage: shares of L_REG, L_ACT and lambda * L_ATT. ``loss_fn``:
    ``distillation_objective`` on the bare student (with adapter) ``model`` belongs to."""
    return share_diagnose(lambda: weighted_terms(loss_fn(batch), lambda_att), model)


def meta_diagnose(model: nn.Module, adapter: nn.Module, teacher: nn.Module,
                  batch: dict[str, Tensor], *, losses: list[str], lambda_att: float,
                  att_layers: list[int], reduction: Mapping[str, str] | None = None,
                  ) -> Callable[[int], dict]:
    """Hook of the meta stage: shares of the summands of G (Eq. 8) at theta_k, the gradient
    that updates theta in step 3 of Algorithm 1."""

    def terms() -> dict[str, Tensor]:
        with torch.no_grad():
            _, t_acts = teacher(batch["depth"])
        parts = objective_g(model, adapter, dict(model.named_parameters()), {}, batch["rgb"],
                            batch["target"], t_acts, losses=losses, lambda_att=lambda_att,
                            att_layers=att_layers, reduction=reduction)
        return weighted_terms(parts, lambda_att)

    return share_diagnose(terms, model)


class PhiConvergence:
    """phi's movement per epoch of the meta stage (``phi_convergence`` in each epoch's
    diagnostics): ``relative_change`` ||phi_e - phi_s|| / ||phi_e|| (phi_s: phi when the epoch's
    first step started, so a resumed run measures from its checkpoint's phi), ``phi_norm``
    ||phi_e|| and ``mean_abs`` mean |phi_e|. With the epoch's mean meta-gradient norm (the
    training record's ``phi_grad_norm``) it tells a converged phi (change -> 0) from a transient
    that is still growing (relative change ~ 1 / epoch: phi proportional to the steps taken).

    ``started()`` is called before every meta step (it snapshots phi once per epoch),
    ``__call__`` after the epoch's steps."""

    def __init__(self, reg):
        self.reg, self.start = reg, None

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().flatten().double().cpu() for p in self.reg.phi()])

    def started(self) -> None:
        if self.start is None:
            self.start = self._flat()

    def __call__(self, total_steps: int | None = None) -> dict:
        now = self._flat()
        start = self.start if self.start is not None else now
        norm = float(now.norm())
        change = float((now - start).norm())
        self.start = None
        return {"phi_convergence": {"relative_change": change / norm if norm > 0 else 0.0,
                                    "phi_norm": norm, "mean_abs": float(now.abs().mean())}}


def target_diagnose(loss_fn: Callable[[dict], dict[str, Tensor]], batch: dict[str, Tensor],
                    model: nn.Module, reg, optimizer: torch.optim.Optimizer,
                    lr_sum: Callable[[int], float] | None = None) -> Callable[[int], dict]:
    """Hook of the target stage (F = L_REG + R): the shares of ``reg`` and ``prior`` on the
    backbone and, per regularised tensor of ``reg`` (a ``Regularizer``), D and the gradient
    ratio (``prior_strength``). ``loss_fn``: ``regularized_objective`` on the bare ``model``;
    ``lr_sum``: total steps K -> the sum of the rates over the run, for a schedule (None: the
    optimizer's rate is constant)."""
    named = dict(model.named_parameters())
    backbone = {id(p) for p in backbone_parameters(model)}
    params = list(named.values())
    reg_names = list(reg.names)

    def diagnose(total_steps: int) -> dict:
        with kept_state(model):
            parts = loss_fn(batch)
            grads = term_gradients({"reg": parts["reg"], "prior": parts["prior"]}, params)
        on_backbone = {k: [g for p, g in zip(params, gs) if id(p) in backbone]
                       for k, gs in grads.items()}
        by_name = {k: dict(zip(named, gs)) for k, gs in grads.items()}
        return {"grad_share": gradient_shares(on_backbone),
                "prior_strength": prior_strength(
                    reg_names, [named[n] for n in reg_names],
                    [by_name["reg"][n] for n in reg_names],
                    [by_name["prior"][n] for n in reg_names], optimizer,
                    total_steps=total_steps,
                    lr_sum=None if lr_sum is None else lr_sum(total_steps))}

    return diagnose


def describe(diag: dict) -> str:
    """One line for the console: the shares, phi's movement (meta), the prior's overall D."""
    shares = " ".join(f"{k} {v:.3g}" if v is not None else f"{k} -"
                      for k, v in diag.get("grad_share", {}).items())
    text = f"grad share {shares}" if shares else ""
    conv = diag.get("phi_convergence")
    if conv:
        text += (("; " if text else "") + f"phi moved {conv['relative_change']:.3g} of its norm "
                 f"{conv['phi_norm']:.3g} (mean |phi| {conv['mean_abs']:.3g})")
    overall = diag.get("prior_strength", {}).get("overall")
    if overall:
        text += (f"; prior |D| median {overall['abs_d_median']:.3g} p90 "
                 f"{overall['abs_d_p90']:.3g}, |D|>{STRONG} {overall[f'frac_abs_d_gt_{STRONG}']:.3g}"
                 f", D<0 {overall['frac_d_negative']:.3g}")
    return text


# ---------------------------------------------------------------------------------------------
# The calibrated prior: phi_META scaled to a set strength D
# ---------------------------------------------------------------------------------------------

CALIBRATION_BATCHES = 8


def gradient_rms(model: nn.Module, names: list[str], batches: list[dict[str, Tensor]], *,
                 reduction: str = "sum") -> list[Tensor]:
    """Per regularised tensor ``names``, the RMS over ``batches`` of grad L_REG: the s_i Adam
    divides by on its first steps (its bias-corrected second moment over those batches), at the
    model's current weights. Leaves no trace (``kept_state``)."""
    from cmkg.losses import regression_loss

    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    sq = [torch.zeros_like(p) for p in params]
    with kept_state(model):
        for batch in batches:
            pred, _ = model(batch["rgb"])
            grads = torch.autograd.grad(regression_loss(pred, batch["target"], reduction), params)
            for acc, g in zip(sq, grads):
                acc.add_(g.detach().pow(2))
    return [(acc / len(batches)).sqrt() for acc in sq]


def _expected_d(c: float, lrk: float, a: Tensor, theta: Tensor, s: Tensor) -> Tensor:
    """|D| of each weight when phi is c * phi_META: R's gradient c * a (a = grad R at
    phi_META) joins the data's RMS s in Adam's scale, sqrt(s^2 + (c a)^2), so |D| grows with c
    but saturates at lr K / |theta| (R alone, normalised by Adam)."""
    x = c * a.abs()
    return lrk * x / ((s.pow(2) + x.pow(2)).sqrt() + 1e-8) / theta.abs().clamp_min(1e-12)


def calibrate_prior(reg, model: nn.Module, batches: list[dict[str, Tensor]], *, lr: float,
                    total_steps: int, d_target: float, d_cap: float | None,
                    reduction: str = "sum") -> dict:
    """Scale phi of ``reg`` (a weighted ``Regularizer``) in place by the one factor c that makes
    the median |D| over the weights that get a data gradient ``d_target``, as estimated at the
    model's initial weights; then cap each weight's |D| at ``d_cap`` by shrinking its own phi.
    Returns what was done, for the stage's metrics.

    The estimate (``_expected_d``): s_i from ``gradient_rms`` on ``batches``, R's gradient added
    to it as Adam would, K = ``total_steps``. A median above what Adam's saturation allows cannot
    be reached: c is then the largest tried (1e30 x) and ``d_median`` says what it gives.

    Why a scale is a beta: for free phi learned from phi_init = 0 with SGD, c * phi_META is, to
    first order, the phi that Algorithm 1 learns with beta * c: theta's trajectory there does not
    depend on phi (its step 3 descends G alone) and phi enters the meta-gradient only through
    theta_1'' = theta_k - alpha (grad L_REG + grad R), a relative change of order 2 alpha |phi|
    (tested: ``tests/test_calibration.py``). For softplus phi, c * phi keeps the shape of
    phi_META at the set strength but is not a beta of Algorithm 1."""
    named = dict(model.named_parameters())
    thetas = [named[n].detach() for n in reg.names]
    s = gradient_rms(model, reg.names, batches, reduction=reduction)
    phis = [p.detach().clone() for p in reg.phi()]
    grads = reg.grad(dict(zip(reg.names, thetas)))
    a = [grads[n].detach() for n in reg.names]  # grad R at phi_META: linear in phi
    lrk = lr * total_steps
    # the median over the weights the data move: a weight with no data gradient (a kernel tap
    # that only ever sees padding) gets no phi from Algorithm 1 and no scale from Adam
    fed = [si > 0 for si in s]

    def median(c: float) -> float:
        d = torch.cat([_expected_d(c, lrk, ai, t, si)[m] for ai, t, si, m in
                       zip(a, thetas, s, fed)])
        return float(d.double().median()) if d.numel() else 0.0

    before = median(1.0)
    if not before > 0:
        raise ValueError("phi_META gives D = 0 everywhere: nothing to calibrate")
    lo, hi = -30.0, 30.0  # log10 c: bisection, |D| is increasing in c
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if median(10.0 ** mid) < d_target else (lo, mid)
    scale = 10.0 ** hi
    capped, total, new = 0, 0, []
    for phi, ai, t, si in zip(phis, a, thetas, s):
        k = torch.ones_like(phi)
        if d_cap is not None:  # per weight: the factor k with |D(c k)| = d_cap, where reachable
            q = d_cap * t.abs() / lrk
            x_cap = q * si / (1 - q.pow(2)).clamp_min(1e-12).sqrt()
            # a weight without data gradient is left alone: Adam makes R's pull on it lr K / |theta|
            # whatever its phi (the cap would have to zero phi, which softplus cannot)
            over = (q < 1) & (si > 0) & (_expected_d(scale, lrk, ai, t, si) > d_cap)
            k = torch.where(over, x_cap / (scale * ai.abs()).clamp_min(1e-30), k).clamp(max=1.0)
        capped += int((k < 1).sum())
        total += k.numel()
        new.append(phi * scale * k)
    reg.set_phi(new)
    return {"d_target": d_target, "d_cap": d_cap, "scale": scale, "d_median_before": before,
            "d_median": median(scale), "fraction_capped": capped / total, "lr": lr,
            "total_steps": total_steps, "batches": len(batches), "phi_abs_median": float(
                torch.cat([p.flatten().abs() for p in new]).double().median())}


# ---------------------------------------------------------------------------------------------
# Planted channels (data.planted): does a network, or a prior, single them out?
# ---------------------------------------------------------------------------------------------

FIRST_CONV = "stem.0.weight"  # models.PoseNet's first convolution, (64, C + k, 7, 7)


def planted_split(model: nn.Module, real: int, regularizer=None) -> dict[str, float]:
    """How the first convolution treats the planted input channels (the last ones, after the
    ``real`` RGB channels) against the real ones: ``weight_ratio`` = mean theta^2 over the
    planted channels' kernels / the same over the real channels' (1: used alike; << 1: the
    network ignores the planted ones), and for a weighted prior ``phi_ratio`` = mean phi there
    / mean phi on the real channels' kernels (>> 1: the prior keeps the planted ones small),
    with both means. The cheap check of the planted control: no target training needed."""
    w = dict(model.named_parameters())[FIRST_CONV].detach().double()
    sq = w.pow(2)
    out = {"weight_planted": float(sq[:, real:].mean()), "weight_real": float(sq[:, :real].mean())}
    out["weight_ratio"] = out["weight_planted"] / out["weight_real"]
    if regularizer is not None and regularizer.weighted and FIRST_CONV in regularizer.names:
        phi = regularizer.phi()[regularizer.names.index(FIRST_CONV)].detach().double()
        out["phi_planted"] = float(phi[:, real:].mean())
        out["phi_real"] = float(phi[:, :real].mean())
        out["phi_ratio"] = out["phi_planted"] / out["phi_real"] if out["phi_real"] else math.nan
    return out
