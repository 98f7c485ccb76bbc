"""How strong is each term of an objective? Gradient shares and the prior's figure D.

Measured once per epoch on one fixed training batch (``fixed_batch``) by the hooks that
``cmkg.stages`` passes to ``fit(diagnose=...)``; each epoch record keeps them under
``diagnostics``. See PRIOR-SCALE.md for why these numbers matter.

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

Next to D, ||grad R|| / ||grad L_REG|| on each regularised tensor (``grad_ratio``) says how much
of the gradient R contributes on the fixed batch.

Everything here is plain PyTorch; a hook restores the model's buffers (BatchNorm statistics) and
mode, reads but never changes the optimizer and draws no random numbers, so a run with
diagnostics trains exactly like one without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from cmkg.data.dataset import prepare_batch
from cmkg.meta import objective_g

STRONG = 0.1  # |D| above this: R shapes the weight over the run (PRIOR-SCALE.md)


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
    """D = lr * K * (dR/dtheta * theta) / (s * theta^2), elementwise; 0 where theta = 0."""
    theta = theta.detach()
    safe = torch.where(theta == 0, torch.ones_like(theta), theta)
    d = lr * total_steps * (grad_prior * theta) / (s * safe.pow(2))
    return torch.where(theta == 0, torch.zeros_like(d), d)


def summarize(d: Tensor) -> dict[str, float]:
    """median and 90th percentile of |D|, fraction with |D| > 0.1, fraction with D < 0."""
    a = d.detach().double().flatten().cpu().numpy()
    mag = np.abs(a)
    med, p90 = np.percentile(mag, [50, 90])
    return {"abs_d_median": float(med), "abs_d_p90": float(p90),
            f"frac_abs_d_gt_{STRONG}": float((mag > STRONG).mean()),
            "frac_d_negative": float((a < 0).mean())}


def prior_strength(names: list[str], params: list[Tensor], grad_reg: list[Tensor],
                   grad_prior: list[Tensor], optimizer: torch.optim.Optimizer, *,
                   total_steps: int) -> dict:
    """D and ||grad R|| / ||grad L_REG|| per regularised tensor ``names`` and over all of them.

    ``params``, ``grad_reg``, ``grad_prior``: the tensors, grad L_REG and grad R, in the order
    of ``names``. Returns ``{"lr", "total_steps", "overall": {...}, "layers": {name: {...}}}``
    with the keys of ``summarize`` plus ``grad_ratio``; ``{}`` before Adam's first step."""
    lr = optimizer.param_groups[0]["lr"]
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


def target_diagnose(loss_fn: Callable[[dict], dict[str, Tensor]], batch: dict[str, Tensor],
                    model: nn.Module, reg, optimizer: torch.optim.Optimizer,
                    ) -> Callable[[int], dict]:
    """Hook of the target stage (F = L_REG + R): the shares of ``reg`` and ``prior`` on the
    backbone and, per regularised tensor of ``reg`` (a ``Regularizer``), D and the gradient
    ratio (``prior_strength``). ``loss_fn``: ``regularized_objective`` on the bare ``model``."""
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
                    total_steps=total_steps)}

    return diagnose


def describe(diag: dict) -> str:
    """One line for the console: the shares, and the prior's overall D."""
    shares = " ".join(f"{k} {v:.3g}" if v is not None else f"{k} -"
                      for k, v in diag.get("grad_share", {}).items())
    text = f"grad share {shares}"
    overall = diag.get("prior_strength", {}).get("overall")
    if overall:
        text += (f"; prior |D| median {overall['abs_d_median']:.3g} p90 "
                 f"{overall['abs_d_p90']:.3g}, |D|>{STRONG} {overall[f'frac_abs_d_gt_{STRONG}']:.3g}"
                 f", D<0 {overall['frac_d_negative']:.3g}")
    return text
