"""Cross-modal distillation losses (Sect. 3, Eqs. 1-4).

Shapes: joints (B, 21, 3) root-relative and scale-normalised; activations Q_j (B, C, H, W).

- Eq. 1  L_REG  = ||f(x) - y||^2 per sample, mean over the batch. ``reduction="sum"`` (default)
  sums the squared errors over the 21x3 coordinates as Eq. 1 reads; ``"mean"`` averages them
  instead (÷63, like ``nn.MSELoss``; Sect. 4.2 speaks of "mean squared errors").
- Eq. 2  L_ACT  = ||Q_l(x; f) - Q_l(x~; g)||^2 on the last activation maps. ``reduction="mean"``
  (default) averages the squared differences over all elements (B, C, H, W) so the term keeps
  its scale across input sizes and backbones; ``"sum"`` is Eq. 2 read literally: the sum over
  (C, H, W), mean over the batch, which grows with C*H*W (512x8x8 at 256 px).
- Eq. 3  L_ATT  = sum over layer pairs of ||A_bar_s - A_bar_t||^2, with A_j = sum_c Q_j^(c)^2
  (channel-wise sum of squares, (B, H*W)) and A_bar = A / ||A||_2 per sample. Following the
  reference implementation of attention transfer [54], whose weight 1e3 the paper adopts,
  ``reduction="mean"`` (default) averages the squared differences over batch and positions;
  ``"sum"`` sums them over the H*W positions, mean over the batch (Eq. 3 read literally).
- Eq. 4  L_DIST = L_ACT + lambda * L_ATT, lambda = 1e3.

The reductions are a config choice (``reduction.reg/act/att``); the defaults keep the numbers
this code always produced. Every reduction still averages over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from cmkg.config import REDUCTIONS  # the choices per term (torch-free), the default first

# the default is what the code did before it was a choice
DEFAULT_REDUCTION = {term: choices[0] for term, choices in REDUCTIONS.items()}


def _check(term: str, reduction: str) -> None:
    if reduction not in REDUCTIONS[term]:
        raise ValueError(f"{term} reduction must be one of {', '.join(REDUCTIONS[term])}, "
                         f"got {reduction!r}")


def reductions(reduction: Mapping[str, str] | None = None) -> dict[str, str]:
    """The reduction of every term: ``reduction`` (term -> choice) over the defaults."""
    out = {**DEFAULT_REDUCTION, **(reduction or {})}
    for term, choice in out.items():
        _check(term, choice)
    return out


def regression_loss(pred: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """Eq. 1: squared Euclidean error of the pose vector (``sum`` over the 63 coordinates, or
    their ``mean``), averaged over the batch."""
    _check("reg", reduction)
    sq = (pred - target).pow(2).flatten(1)  # (B, 63)
    return (sq.sum(1) if reduction == "sum" else sq.mean(1)).mean()


def activation_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 2: squared difference of the last activation maps (B, C, H, W), averaged over all
    elements (``mean``) or summed over (C, H, W) and averaged over the batch (``sum``)."""
    _check("act", reduction)
    if reduction == "mean":
        return F.mse_loss(student, teacher)
    return (student - teacher).pow(2).flatten(1).sum(1).mean()


def attention_map(q: Tensor) -> Tensor:
    """A_bar of Eq. 3: channel-wise sum of squares, flattened and l2-normalised: (B, H*W)."""
    return F.normalize(q.pow(2).sum(1).flatten(1), dim=1)


def attention_loss(student: list[Tensor], teacher: list[Tensor], reduction: str = "mean",
                   ) -> Tensor:
    """Eq. 3 over the given layer pairs: squared differences of the attention maps averaged
    over batch and positions (``mean``) or summed over positions, mean over batch (``sum``)."""
    _check("att", reduction)
    if reduction == "mean":
        return sum((attention_map(s) - attention_map(t)).pow(2).mean()
                   for s, t in zip(student, teacher))
    return sum((attention_map(s) - attention_map(t)).pow(2).sum(1).mean()
               for s, t in zip(student, teacher))


def distillation_loss(student_last: Tensor, teacher_last: Tensor, student_att: list[Tensor],
                      teacher_att: list[Tensor], *, lambda_att: float, use_act: bool = True,
                      use_att: bool = True, reduction: Mapping[str, str] | None = None,
                      ) -> dict[str, Tensor]:
    """Eq. 4 on paired activations: L_ACT on the last maps, L_ATT on the attention layer pairs.

    ``reduction`` maps ``act`` and ``att`` to their reductions (defaults: ``mean``). Returns the
    enabled parts ``act`` and ``att`` and their weighted sum ``dist``.
    """
    red = reductions(reduction)
    parts: dict[str, Tensor] = {}
    dist = student_last.new_zeros(())
    if use_act:
        parts["act"] = activation_loss(student_last, teacher_last, red["act"])
        dist = dist + parts["act"]
    if use_att:
        parts["att"] = attention_loss(student_att, teacher_att, red["att"])
        dist = dist + lambda_att * parts["att"]
    parts["dist"] = dist
    return parts
