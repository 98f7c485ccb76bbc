"""Algorithm 1: meta-learning the prior phi of R(theta; phi) on a paired source dataset.

Per iteration k on a source batch (x, x~, y), with F = L_REG + R(theta; phi) and
G = L_REG + L_DIST (Eq. 8):

    1. theta_0'' = theta_k;  theta_{i+1}'' = theta_i'' - alpha * grad F(theta_i''; phi_k),
       i = 0 .. l-1, kept differentiable in phi                                  (E-step)
    2. phi_{k+1} = phi_k - beta * grad_phi G(theta_l''(phi_k))                   (M-step)
    3. theta_{k+1} = theta_k - alpha * grad G(theta_k)   (Adam, as in Sect. 5.1)

The teacher-free control (``meta.teacher=false``, docs/phi-diagnostics.md) runs the same three
steps with G = L_REG: no teacher, no adapter, no depth; whether phi then differs from the full
phi tells whether the teacher's terms put anything into it.

Implementation notes:
- The unrolled steps run on the bare module through ``torch.func.functional_call`` with
  ``torch.autograd.grad``; an optimizer's in-place ``step()`` would cut the path to phi.
  BatchNorm runs on *cloned* buffers there, so the unrolled steps leave the model's running
  statistics as one ordinary training step would.
- theta_0'' = theta_k does not depend on phi, so grad L_REG(theta_k) enters step 1 as a constant:
  it comes from the same student forward as step 3's grad G(theta_k) and needs no graph. The
  phi-dependence of theta_1'' runs only through R's closed-form gradient; for l = 1 the exact
  meta-gradient therefore costs no second-order pass (weighted l2: -2 alpha theta_k * grad G).
  Steps i >= 1 build the graph of grad L_REG (Hessian-vector terms) unless ``first_order``.
- ``first_order`` drops those Hessian-vector terms but keeps the path through R; for weighted l2
  with SGD this is the elementwise recursion J_{i+1} = J_i (1 - 2 alpha phi) - 2 alpha theta_i''.
- The teacher forward on x~ serves steps 2 and 3; the student forward at theta_k serves 1 and 3.
- ``reduction`` (term -> sum | mean, ``cmkg.losses``) applies to L_REG in F and G and to L_ACT,
  L_ATT in G alike.

Stability with the paper's unconstrained phi (a negative phi_i boosts theta_i, so F is unbounded
below). Three things keep a run finite, each tested:
- After every meta step the raw phi is clipped, by default to +-1/(2 alpha) (``phi_bounds``):
  in the inner step theta <- theta - alpha (grad L_REG + 2 phi theta) the prior scales a weight
  by (1 - 2 alpha phi), and |2 alpha phi| <= 1 keeps that factor in [0, 2]: a positive phi can
  at most zero a weight in one step, never flip it; a negative one can at most double it.
- The target stage (Algorithm 2) trains theta with Adam, whose step is at most
  lr (1 - beta1) / sqrt(1 - beta2) (3.16 lr with the defaults) whatever the gradient's size, so a
  negative phi grows a weight linearly, not exponentially.
- Every loss part is checked for NaN/Inf (``fit``) and phi after every epoch (``check_phi``);
  either stops the stage with a ``NumericalError`` naming stage, epoch and term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cmkg.errors import NumericalError
from cmkg.losses import distillation_loss, reductions, regression_loss
from cmkg.regularizers import Regularizer

Params = dict[str, Tensor]
Reduce = Callable[[list[Tensor], bool], list[Tensor]]  # (tensors, differentiable) -> averaged


def _local(tensors: list[Tensor], differentiable: bool = False) -> list[Tensor]:
    return tensors


def unroll(model: nn.Module, reg: Regularizer, theta0: Params, buffers: Params, x: Tensor,
           y: Tensor, *, alpha: float, steps: int, first_order: bool = False,
           grad0: Params | None = None, reduce: Reduce = _local,
           reduction: Mapping[str, str] | None = None) -> Params:
    """theta_l'' after ``steps`` differentiable SGD steps on F from ``theta0`` (Alg. 1, E-step).

    ``grad0``: grad L_REG(theta0) if the caller has it (from a shared forward); it carries no
    graph because theta0 does not depend on phi. ``reduce`` averages each step's grad L_REG over
    data-parallel workers (``cmkg.parallel.mean_across``) so every worker unrolls the step of
    the global batch."""
    theta = theta0
    red = reductions(reduction)["reg"]
    for i in range(steps):
        if i == 0 and grad0 is not None:
            g = grad0
        else:
            pred, _ = functional_call(model, {**theta, **buffers}, (x,))
            loss = regression_loss(pred, y, red)
            keep = not first_order and i > 0  # theta_0'' is a constant in phi
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=keep)
            g = dict(zip(theta, reduce(list(grads), keep)))
        r = reg.grad(theta)
        theta = {n: t - alpha * (g[n] + r[n]) if n in r else t - alpha * g[n]
                 for n, t in theta.items()}
    return theta


def objective_g(student: nn.Module, adapter: nn.Module | None, params: Params,
                buffers: Params, x: Tensor, y: Tensor, teacher_acts: list[Tensor] | None, *,
                losses: list[str], lambda_att: float, att_layers: list[int],
                reduction: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """G = L_REG + L_DIST of the student at ``params`` against fixed teacher activations;
    ``teacher_acts`` None (the teacher-free control, ``meta.teacher=false``): G = L_REG."""
    red = reductions(reduction)
    pred, acts = functional_call(student, {**params, **buffers}, (x,))
    picks = [i - 1 for i in att_layers]
    reg = regression_loss(pred, y, red["reg"])
    if teacher_acts is None:
        return {"G": reg, "reg": reg}
    parts = distillation_loss(adapter(acts[-1]), teacher_acts[-1], [acts[i] for i in picks],
                              [teacher_acts[i] for i in picks], lambda_att=lambda_att,
                              use_act="act" in losses, use_att="att" in losses, reduction=red)
    return {"G": reg + parts["dist"], "reg": reg, **parts}


def meta_gradient(student: nn.Module, adapter: nn.Module | None, reg: Regularizer, batch: dict,
                  teacher_acts: list[Tensor] | None, *, alpha: float, steps: int, first_order: bool,
                  losses: list[str], lambda_att: float, att_layers: list[int],
                  grad0: Params | None = None, reduce: Reduce = _local,
                  reduction: Mapping[str, str] | None = None) -> tuple[list[Tensor], Tensor]:
    """d G(theta_l''(phi)) / d raw-phi at the student's current weights, and that G (this
    worker's share; ``reduce`` averages the gradient over workers).

    Standalone (no updates), on cloned BatchNorm buffers: the gradient tests call it."""
    theta0 = {n: p.detach().requires_grad_() for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    x, y = batch["rgb"], batch["target"]
    theta = unroll(student, reg, theta0, buffers, x, y, alpha=alpha, steps=steps,
                   first_order=first_order, grad0=grad0, reduce=reduce, reduction=reduction)
    g = objective_g(student, adapter, theta, buffers, x, y, teacher_acts, losses=losses,
                    lambda_att=lambda_att, att_layers=att_layers, reduction=reduction)["G"]
    return reduce(list(torch.autograd.grad(g, list(reg.raw))), False), g.detach()


def meta_iteration(student: nn.Module, adapter: nn.Module | None, teacher: nn.Module | None,
                   reg: Regularizer, batch: dict, theta_opt: torch.optim.Optimizer,
                   phi_opt: torch.optim.Optimizer, *, alpha: float, steps: int,
                   first_order: bool, losses: list[str], lambda_att: float,
                   att_layers: list[int], phi_clip: tuple[float, float] | None = None,
                   reduce: Reduce = _local, reduction: Mapping[str, str] | None = None,
                   ) -> dict[str, Tensor]:
    """One iteration of Algorithm 1: updates phi (``phi_opt``, SGD with lr beta) and theta
    (``theta_opt``, Adam) in place; returns the named parts for the logs.

    Data-parallel: pass ``reduce=cmkg.parallel.mean_across``; every gradient that feeds an update
    (inner grad L_REG, the phi meta-gradient, grad G(theta_k)) is then the global-batch mean.

    ``teacher`` None (``meta.teacher=false``, the control of docs/phi-diagnostics.md): G = L_REG
    in steps 2 and 3, no teacher forward, no adapter; the batch's depth is never read."""
    x, y = batch["rgb"], batch["target"]
    t_acts = None
    if teacher is not None:
        with torch.no_grad():
            _, t_acts = teacher(batch["depth"])  # serves steps 2 and 3

    # -- the student at theta_k: one forward for steps 1 and 3 -------------------------------
    params = dict(student.named_parameters())
    side = [] if adapter is None else [p for p in adapter.parameters() if p.requires_grad]
    g_k = objective_g(student, adapter, params, {}, x, y, t_acts, losses=losses,
                      lambda_att=lambda_att, att_layers=att_layers, reduction=reduction)
    grad_reg = reduce(list(torch.autograd.grad(g_k["reg"], list(params.values()),
                                               retain_graph=t_acts is not None)), False)
    grad_dist = [None] * (len(params) + len(side))
    if t_acts is not None:
        grad_dist = list(torch.autograd.grad(g_k["dist"], [*params.values(), *side],
                                             allow_unused=True))
    present = [i for i, g in enumerate(grad_dist) if g is not None]
    reduced = reduce([grad_dist[i] for i in present], False) if present else []
    for i, g in zip(present, reduced):
        grad_dist[i] = g

    # -- steps 1-2: unroll l steps of F, then phi <- phi - beta grad_phi G(theta_l'') ------------
    phi_grads, g_inner = meta_gradient(
        student, adapter, reg, batch, t_acts, alpha=alpha, steps=steps, first_order=first_order,
        losses=losses, lambda_att=lambda_att, att_layers=att_layers,
        grad0=dict(zip(params, grad_reg)), reduce=reduce, reduction=reduction)
    for r, g in zip(reg.raw, phi_grads):
        r.grad = g
    phi_norm = torch.sqrt(sum(g.pow(2).sum() for g in phi_grads))
    phi_opt.step()
    if phi_clip is not None:
        with torch.no_grad():
            for r in reg.raw:
                r.clamp_(*phi_clip)

    # -- step 3: theta <- Adam(grad G(theta_k)) ------------------------------------------------
    n = len(params)
    for p, gr, gd in zip(params.values(), grad_reg, grad_dist[:n]):
        p.grad = gr if gd is None else gr + gd
    for p, gd in zip(side, grad_dist[n:]):
        p.grad = gd
    theta_opt.step()

    parts = {"loss": g_k["G"].detach(), "reg": g_k["reg"].detach(), "G_inner": g_inner,
             "phi_grad_norm": phi_norm.detach()}
    parts.update({k: g_k[k].detach() for k in ("act", "att") if k in g_k})
    return parts


def g_step(student: nn.Module, adapter: nn.Module, teacher: nn.Module, batch: dict,
           theta_opt: torch.optim.Optimizer, *, losses: list[str], lambda_att: float,
           att_layers: list[int], reduce: Reduce = _local,
           reduction: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """Step 3 of Algorithm 1 alone, theta <- Adam(grad G(theta_k)), for ``meta.solve=fixed_point``
    (phi is set once at the end, ``fixed_point_phi``): the student travels as in
    ``meta_iteration``, without the E- and M-steps."""
    with torch.no_grad():
        _, t_acts = teacher(batch["depth"])
    params = dict(student.named_parameters())
    side = [p for p in adapter.parameters() if p.requires_grad]
    parts = objective_g(student, adapter, params, {}, batch["rgb"], batch["target"], t_acts,
                        losses=losses, lambda_att=lambda_att, att_layers=att_layers,
                        reduction=reduction)
    everything = [*params.values(), *side]
    grads = torch.autograd.grad(parts["G"], everything, allow_unused=True)
    present = [i for i, g in enumerate(grads) if g is not None]
    reduced = reduce([grads[i] for i in present], False) if present else []
    for p in everything:
        p.grad = None
    for i, g in zip(present, reduced):
        everything[i].grad = g
    theta_opt.step()
    return {"loss": parts["G"].detach(), "reg": parts["reg"].detach(),
            **{k: parts[k].detach() for k in ("act", "att") if k in parts}}


def fixed_point_phi(student: nn.Module, adapter: nn.Module, teacher: nn.Module, batches,
                    names: list[str], *, eps: float, losses: list[str], lambda_att: float,
                    att_layers: list[int],
                    reduction: Mapping[str, str] | None = None) -> list[Tensor]:
    """Where Algorithm 1 stops moving, at the student's current weights theta (``meta.solve``
    fixed_point, docs/prior-strength.md). phi is stationary when the minimiser theta_G of
    G = L_REG + L_DIST is also stationary for F = L_REG + sum_j phi_j theta_j^2, i.e.
    2 phi_j theta_j = dL_DIST/dtheta_j there; so, with g the mean gradient of L_DIST over
    ``batches`` (train-mode BatchNorm on cloned buffers, as in the meta step),

        phi*_j = theta_j g_j / (2 (theta_j^2 + eps_t)),   eps_t = eps x mean_t theta^2,

    (the eps keeps weights near 0 finite), scaled to mean |phi*| 1 over the ``names`` tensors in
    float64, so a target's ``regularizer.strength`` is its mean |phi|. The teacher's pull g
    alone: with no teacher term phi* is 0. Returns phi* per tensor of ``names``, in order."""
    params = {n: p.detach().requires_grad_() for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    count = 0
    for batch in batches:
        with torch.no_grad():
            _, t_acts = teacher(batch["depth"])
        parts = objective_g(student, adapter, params, buffers, batch["rgb"], batch["target"],
                            t_acts, losses=losses, lambda_att=lambda_att, att_layers=att_layers,
                            reduction=reduction)
        grads = torch.autograd.grad(parts["dist"], [params[n] for n in names], allow_unused=True)
        b = len(batch["target"])
        for n, g in zip(names, grads):
            if g is not None:  # None: a tensor L_DIST does not reach (the head)
                total[n] += b * g.double()
        count += b
    if count == 0:
        raise ValueError("fixed_point_phi needs at least one batch")
    raw = []
    for n in names:
        theta = params[n].detach().double()
        sq = theta.pow(2)
        raw.append(theta * (total[n] / count) / (2.0 * (sq + eps * float(sq.mean()))))
    scale = float(torch.cat([p.flatten() for p in raw]).abs().mean())
    return [(p / scale if scale > 0 else p).to(params[n].dtype) for p, n in zip(raw, names)]


def phi_bounds(alpha: float) -> tuple[float, float]:
    """Default clip of raw phi: +-1/(2 alpha), so |2 alpha phi| <= 1 in the inner step."""
    return -1.0 / (2.0 * alpha), 1.0 / (2.0 * alpha)


def check_phi(reg: Regularizer, stage: str, iteration: int) -> None:
    """Stop with a clear error when phi became NaN/Inf."""
    for name, r in zip(reg.names, reg.raw):
        if not torch.isfinite(r).all():
            raise NumericalError(f"stage {stage}: phi of {name} became non-finite at epoch "
                                 f"{iteration}; lower meta.beta or use regularizer.phi_param=softplus")

