"""Regularizers R(theta) of Table 2, including the learned prior of Eq. 10.

    none          R = 0
    l1            R = sigma * sum_i |theta_i|
    l2            R = sigma * sum_i theta_i^2
    weighted_l1   R = sum_i phi_i |theta_i|
    weighted_l2   R = sum_i phi_i theta_i^2                       (Eq. 10)

One phi per parameter element of the regularised tensors: by default every convolution and
linear weight (``params="weights"``), or every parameter (``params="all"``).

phi's parametrisation: ``free`` is the paper's unconstrained phi (Fig. 5: negative phi boosts its
weight, positive phi decays it to zero); ``softplus`` keeps phi = softplus(rho) > 0. The raw
tensors rho are what the meta step updates; ``phi()`` maps them.

Besides the value, ``grad(theta)`` gives dR/dtheta in closed form as a differentiable function of
phi and theta. Algorithm 1's unrolled inner steps use it: their phi-dependence runs only through
this term, so for l = 1 the exact meta-gradient needs no second-order pass (see ``meta.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMS = ("none", "l1", "l2", "weighted_l1", "weighted_l2")
WEIGHTED = ("weighted_l1", "weighted_l2")


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
        if form not in FORMS:
            raise ValueError(f"unknown regularizer {form!r}; choose one of {', '.join(FORMS)}")
        if phi_param not in ("free", "softplus"):
            raise ValueError(f"phi parametrisation must be 'free' or 'softplus', got {phi_param!r}")
        self.form, self.sigma, self.phi_param = form, float(sigma), phi_param
        self.names = list(shapes)
        self.raw = nn.ParameterList()
        if form in WEIGHTED:
            init = _raw_init(phi_init, phi_param)
            for shape in shapes.values():
                self.raw.append(nn.Parameter(torch.full(tuple(shape), init)))

    @property
    def weighted(self) -> bool:
        return self.form in WEIGHTED

    def phi(self) -> list[Tensor]:
        """phi per regularised tensor (differentiable in ``raw``)."""
        if self.phi_param == "softplus":
            return [F.softplus(r) for r in self.raw]
        return list(self.raw)

    def forward(self, theta: dict[str, Tensor]) -> Tensor:
        """R at ``theta`` (a name -> tensor mapping holding at least ``self.names``)."""
        if self.form == "none":
            return next(iter(theta.values())).new_zeros(())
        ts = [theta[n] for n in self.names]
        if self.form == "l1":
            return self.sigma * sum(t.abs().sum() for t in ts)
        if self.form == "l2":
            return self.sigma * sum(t.pow(2).sum() for t in ts)
        phis = self.phi()
        if self.form == "weighted_l1":
            return sum((p * t.abs()).sum() for p, t in zip(phis, ts))
        return sum((p * t.pow(2)).sum() for p, t in zip(phis, ts))

    def grad(self, theta: dict[str, Tensor]) -> dict[str, Tensor]:
        """dR/dtheta in closed form, differentiable in phi and theta (sign' = 0 for l1)."""
        ts = {n: theta[n] for n in self.names}
        if self.form == "none":
            return {n: torch.zeros_like(t) for n, t in ts.items()}
        if self.form == "l1":
            return {n: self.sigma * torch.sign(t) for n, t in ts.items()}
        if self.form == "l2":
            return {n: 2.0 * self.sigma * t for n, t in ts.items()}
        phis = self.phi()
        if self.form == "weighted_l1":
            return {n: p * torch.sign(t) for p, (n, t) in zip(phis, ts.items())}
        return {n: 2.0 * p * t for p, (n, t) in zip(phis, ts.items())}

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
