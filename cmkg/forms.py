"""The regularizer forms of Table 2, one row each: the one place a form is added.

    form          R(theta)                     row: penalty h, weighted, sigma
    none          0                                 -       no        no
    l1            sigma * sum_i |theta_i|           abs     no        yes
    l2            sigma * sum_i theta_i^2           square  no        yes
    weighted_l1   sum_i phi_i |theta_i|             abs     yes       no
    weighted_l2   sum_i phi_i theta_i^2  (Eq. 10)   square  yes       no

A row says which elementwise penalty h(theta) R sums (its value and gradient are one entry of
``cmkg.regularizers.PENALTIES``), whether each weight's term is scaled by its own phi (a weighted
form: the target reads phi from a meta stage, or from ``regularizer.phi_source``), and whether a
constant ``regularizer.sigma`` scales it (then sigma enters the target's stage key). Everything
that depends on a form (validation, the stage key, the regularizer's value and gradient, which
stages a target needs) reads these rows, so adding a form is one row here and, for a new
penalty, one entry in ``PENALTIES``. Torch-free: ``cmkg.config`` validates against it without
importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Form:
    name: str
    penalty: str | None  # the elementwise h(theta) (cmkg.regularizers.PENALTIES); None: R = 0
    weighted: bool  # h scaled per weight by phi (Eq. 10): needs a phi from meta or phi_source
    sigma: bool  # h scaled by the constant regularizer.sigma, which enters the stage key


FORMS: dict[str, Form] = {f.name: f for f in (
    Form("none", None, weighted=False, sigma=False),
    Form("l1", "abs", weighted=False, sigma=True),
    Form("l2", "square", weighted=False, sigma=True),
    Form("weighted_l1", "abs", weighted=True, sigma=False),
    Form("weighted_l2", "square", weighted=True, sigma=False),
)}


def names() -> tuple[str, ...]:
    return tuple(FORMS)


def weighted(form: str) -> bool:
    """Whether ``form`` scales each weight's term by its own phi (Eq. 10)."""
    return form in FORMS and FORMS[form].weighted


def weighted_forms() -> tuple[str, ...]:
    return tuple(n for n, f in FORMS.items() if f.weighted)


def uses_sigma(form: str) -> bool:
    """Whether ``regularizer.sigma`` scales ``form`` (and so enters a target's stage key)."""
    return form in FORMS and FORMS[form].sigma
