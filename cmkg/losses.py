"""Cross-modal distillation losses (Sect. 3, Eqs. 1-4).

Shapes: joints (B, 21, 3) root-relative and scale-normalised; activations Q_j (B, C, H, W).

- Eq. 1  L_REG  = ||f(x) - y||^2 per sample (sum over the 21x3 coordinates), mean over the batch.
- Eq. 2  L_ACT  = ||Q_l(x; f) - Q_l(x~; g)||^2 on the last activation maps. We average the
  squared differences over all elements (B, C, H, W) so the term keeps its scale across input
  sizes and backbones (a plain sum grows with C*H*W: 512x8x8 at 256 px).
- Eq. 3  L_ATT  = sum over layer pairs of ||A_bar_s - A_bar_t||^2, with A_j = sum_c Q_j^(c)^2
  (channel-wise sum of squares, (B, H*W)) and A_bar = A / ||A||_2 per sample. Following the
  reference implementation of attention transfer [54], whose weight 1e3 the paper adopts, the
  squared differences are averaged over batch and positions.
- Eq. 4  L_DIST = L_ACT + lambda * L_ATT, lambda = 1e3.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Eq. 1: squared Euclidean error of the whole pose vector, averaged over the batch."""
    return (pred - target).pow(2).flatten(1).sum(1).mean()


def activation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Eq. 2: mean squared difference of the last activation maps (B, C, H, W)."""
    return F.mse_loss(student, teacher)


def attention_map(q: Tensor) -> Tensor:
    """A_bar of Eq. 3: channel-wise sum of squares, flattened and l2-normalised: (B, H*W)."""
    return F.normalize(q.pow(2).sum(1).flatten(1), dim=1)


def attention_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Eq. 3 over the given layer pairs."""
    return sum(
        (attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student, teacher)
    )


def distillation_loss(student_last: Tensor, teacher_last: Tensor, student_att: list[Tensor],
                      teacher_att: list[Tensor], *, lambda_att: float, use_act: bool = True,
                      use_att: bool = True) -> dict[str, Tensor]:
    """Eq. 4 on paired activations: L_ACT on the last maps, L_ATT on the attention layer pairs.

    Returns the enabled parts ``act`` and ``att`` and their weighted sum ``dist``.
    """
    parts: dict[str, Tensor] = {}
    dist = student_last.new_zeros(())
    if use_act:
        parts["act"] = activation_loss(student_last, teacher_last)
        dist = dist + parts["act"]
    if use_att:
        parts["att"] = attention_loss(student_att, teacher_att)
        dist = dist + lambda_att * parts["att"]
    parts["dist"] = dist
    return parts
