"""Regularizers R(theta) of Table 2, including the learned prior of Eq. 10.

    none          R = 0
    l1            R = sigma * sum_i |theta_i|
    l2            R = sigma * sum_i theta_i^2
    weighted_l1   R = sum_i phi_i |theta_i|
    weighted_l2   R = sum_i phi_i theta_i^2                       (Eq. 10)

Each form is a row of ``cmkg.forms.FORMS`` (its penalty, whether phi weights it, whether sigma
scales it); ``forward`` and ``grad`` read the row and ``PENALTIES``, so a new form is a row
there and, for a new penalty, one entry here.

One phi per parameter element of the regularised tensors: by default every convolution and
linear weight (``params="weights"``), or every parameter (``params="all"``).

phi's parametrisation: ``free`` is the paper's unconstrained phi (Fig. 5: negative phi boosts its
weight, positive phi decays it to zero); ``softplus`` keeps phi = softplus(rho) > 0. The raw
tensors rho are what the meta step updates; ``phi()`` maps them.

phi as a target applies it (``applied``; docs/prior-strength.md): phi_META times a strength,
its positive part if asked, then a control that keeps its values and removes what it says about
individual weights (``permuted`` within each tensor, or ``uniform``: every entry the mean).

Besides the value, ``grad(theta)`` gives dR/dtheta in closed form as a differentiable function of
phi and theta. Algorithm 1's unrolled inner steps use it: their phi-dependence runs only through
this term, so for l = 1 the exact meta-gradient needs no second-order pass (see ``meta.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkg import forms

# the forms are rows of cmkg.forms.FORMS (torch-free); these names stay for their importers
FORMS = forms.names()
WEIGHTED = forms.weighted_forms()

# the elementwise penalties h(theta) a form's row names: (value, dh/dtheta), the one function a
# new penalty adds. sign' = 0 for abs.
PENALTIES = {
    "abs": (lambda t: t.abs(), lambda t: torch.sign(t)),
    "square": (lambda t: t.pow(2), lambda t: 2.0 * t),
}


def regularised_names(model: nn.Module, which: str = "weights") -> list[str]:
    """Names of the parameters R acts on: conv and linear weights, or all parameters."""
    if which == "all":
        return [n for n, _ in model.named_parameters()]
    if which != "weights":
        raise ValueError(f"regularizer params must be 'weights' or 'all', got {which!r}")
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def _raw_init(value: float, param: str) -> float:
    if param == "free":
        return value
    if value <= 0:
        raise ValueError(f"softplus phi needs a positive initial value, got {value}")
    return value + math.log(-math.expm1(-value))  # inverse softplus


class Regularizer(nn.Module):
    """R(theta; phi) over the named tensors ``shapes``; phi lives in ``self.raw`` (weighted
    forms only), one tensor per regularised parameter, each of that parameter's shape."""

    def __init__(self, form: str, shapes: dict[str, torch.Size], *, sigma: float = 0.0,
                 phi_param: str = "free", phi_init: float = 0.0):
        super().__init__()
        if form not in forms.FORMS:
            raise ValueError(f"unknown regularizer {form!r}; "
                             f"choose one of {', '.join(forms.FORMS)}")
        if phi_param not in ("free", "softplus"):
            raise ValueError(f"phi parametrisation must be 'free' or 'softplus', got {phi_param!r}")
        self.form, self.sigma, self.phi_param = form, float(sigma), phi_param
        self.names = list(shapes)
        self.raw = nn.ParameterList()
        if forms.weighted(form):
            init = _raw_init(phi_init, phi_param)
            for shape in shapes.values():
                self.raw.append(nn.Parameter(torch.full(tuple(shape), init)))

    @property
    def weighted(self) -> bool:
        return forms.weighted(self.form)

    def phi(self) -> list[Tensor]:
        """phi per regularised tensor (differentiable in ``raw``)."""
        if self.phi_param == "softplus":
            return [F.softplus(r) for r in self.raw]
        return list(self.raw)

    def forward(self, theta: dict[str, Tensor]) -> Tensor:
        """R at ``theta`` (a name -> tensor mapping holding at least ``self.names``): the sum of
        the form's penalty h, times sigma or times each weight's phi (``cmkg.forms``)."""
        row = forms.FORMS[self.form]
        if row.penalty is None:
            return next(iter(theta.values())).new_zeros(())
        h = PENALTIES[row.penalty][0]
        ts = [theta[n] for n in self.names]
        if row.weighted:
            return sum((p * h(t)).sum() for p, t in zip(self.phi(), ts))
        return self.sigma * sum(h(t).sum() for t in ts)

    def grad(self, theta: dict[str, Tensor]) -> dict[str, Tensor]:
        """dR/dtheta in closed form, differentiable in phi and theta (sign' = 0 for l1)."""
        ts = {n: theta[n] for n in self.names}
        row = forms.FORMS[self.form]
        if row.penalty is None:
            return {n: torch.zeros_like(t) for n, t in ts.items()}
        dh = PENALTIES[row.penalty][1]
        if row.weighted:
            return {n: p * dh(t) for p, (n, t) in zip(self.phi(), ts.items())}
        return {n: self.sigma * dh(t) for n, t in ts.items()}

    def set_phi(self, phis: list[Tensor]) -> None:
        """Overwrite phi (one tensor per regularised parameter), through the parametrisation:
        softplus needs every value > 0."""
        with torch.no_grad():
            for r, p in zip(self.raw, phis):
                if self.phi_param == "softplus":
                    if (p <= 0).any():
                        raise ValueError("softplus phi must stay > 0")
                    p = p.clamp_min(torch.finfo(p.dtype).tiny)  # a product that underflowed
                    p = p + torch.log(-torch.expm1(-p))  # inverse softplus
                r.copy_(p)

    def phi_state(self) -> dict:
        """What a prior artifact stores: form, parametrisation and phi per parameter name."""
        return {"form": self.form, "phi_param": self.phi_param, "sigma": self.sigma,
                "raw": {n: r.detach().cpu().clone() for n, r in zip(self.names, self.raw)}}

    @classmethod
    def from_phi_state(cls, state: dict) -> Regularizer:
        # phi_init only shapes the placeholder: the stored raw values overwrite it below
        reg = cls(state["form"], {n: r.shape for n, r in state["raw"].items()},
                  sigma=state.get("sigma", 0.0), phi_param=state["phi_param"],
                  phi_init=1.0 if state["phi_param"] == "softplus" else 0.0)
        with torch.no_grad():
            for r, value in zip(reg.raw, state["raw"].values()):
                r.copy_(value)
        return reg


def build(form: str, model: nn.Module, *, params: str = "weights", sigma: float = 0.0,
          phi_param: str = "free", phi_init: float = 0.0) -> Regularizer:
    """A regularizer over ``model``'s conv/linear weights (or all its parameters)."""
    named = dict(model.named_parameters())
    shapes = {n: named[n].shape for n in regularised_names(model, params)}
    return Regularizer(form, shapes, sigma=sigma, phi_param=phi_param, phi_init=phi_init)


# ---------------------------------------------------------------------------------------------
# phi as the target applies it: strength, sign, controls
# ---------------------------------------------------------------------------------------------

def inverse_square(weights: dict[str, Tensor], *, eps: float) -> Regularizer:
    """A frozen weighted l2 whose phi is the generalised-ridge prior of the given weights
    theta* (``regularizer.phi_source`` oracle / source_weights, docs/prior-strength.md):
    phi_j = 1 / (theta*_j^2 + eps_t), eps_t = ``eps`` x the mean of theta*^2 over tensor t,
    then the whole phi divided by its mean over every regularised weight (computed in float64),
    so its mean is 1 and ``applied``'s strength is its mean (an l2's sigma at equal mean)."""
    raw = []
    for t in weights.values():
        sq = t.detach().double().pow(2)
        raw.append(1.0 / (sq + eps * float(sq.mean())))
    mean = float(torch.cat([p.flatten() for p in raw]).mean())
    out = Regularizer("weighted_l2", {n: t.shape for n, t in weights.items()}, phi_param="free")
    with torch.no_grad():
        for r, p, t in zip(out.raw, raw, weights.values()):
            r.copy_((p / mean).to(t.dtype))
    return out.requires_grad_(False)


def positive_part(phis: list[Tensor]) -> list[Tensor]:
    """max(phi, 0) per tensor: a decay where phi decays, nothing where it would grow a weight."""
    return [p.clamp_min(0.0) for p in phis]


def permuted(phis: list[Tensor], seed: int) -> list[Tensor]:
    """phi shuffled within each tensor by a permutation drawn from ``seed`` (one generator, the
    tensors in order; the same on every process and device): each tensor keeps its values, so its
    histogram and strength, while which weight gets which value is random."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in phis:
        order = torch.randperm(p.numel(), generator=gen).to(p.device)
        out.append(p.flatten()[order].view_as(p))
    return out


def uniform(phis: list[Tensor]) -> list[Tensor]:
    """Every entry of every tensor replaced by the mean of phi over all of them (accumulated in
    float64): a constant l2 (sigma = that mean) with the learned phi's total."""
    flat = torch.cat([p.detach().flatten().double() for p in phis])
    mean = float(flat.mean()) if flat.numel() else 0.0
    return [torch.full_like(p, mean) for p in phis]


def with_phi(reg: Regularizer, phis: list[Tensor]) -> Regularizer:
    """A regularizer of ``reg``'s form over its tensors whose (free) phi is ``phis``, frozen
    as ``reg`` is: phi as the target applies it, whatever parametrisation learned it."""
    shapes = dict(zip(reg.names, (p.shape for p in phis)))
    out = Regularizer(reg.form, shapes, sigma=reg.sigma, phi_param="free")
    with torch.no_grad():
        for r, p in zip(out.raw, phis):
            r.copy_(p.detach())
    out.requires_grad_(any(r.requires_grad for r in reg.raw))
    return out.to(phis[0].device) if phis else out


def applied(reg: Regularizer, *, strength: float | None = None, sign: str = "learned",
            control: str = "none", seed: int = 0) -> Regularizer:
    """phi_META (``reg``) as the target applies it, in this order: times ``strength`` (None: 1),
    ``sign`` (``learned``: as learned; ``positive``: ``positive_part``), then ``control``
    (``none``; ``permuted``: ``permuted`` with ``seed``; ``uniform``; ``other_seed`` changes
    which meta stage ``reg`` comes from, not its values). At the defaults ``reg`` itself is
    returned, so the paper's runs train exactly as before these settings existed."""
    if not reg.weighted:
        raise ValueError(f"only a weighted form has a phi to apply, got {reg.form!r}")
    if strength is None and sign == "learned" and control in ("none", "other_seed"):
        return reg
    with torch.no_grad():
        phis = [p.detach().clone() for p in reg.phi()]
        if strength is not None:
            phis = [p * strength for p in phis]
        if sign == "positive":
            phis = positive_part(phis)
        elif sign != "learned":
            raise ValueError(f"sign must be 'learned' or 'positive', got {sign!r}")
        if control == "permuted":
            phis = permuted(phis, seed)
        elif control == "uniform":
            phis = uniform(phis)
        elif control not in ("none", "other_seed"):
            raise ValueError(f"unknown phi control {control!r}")
    return with_phi(reg, phis)
