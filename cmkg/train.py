"""Plain-PyTorch training: one ``fit()`` loop for every stage, evaluation, stage objectives.

Nothing here imports Ray. The Ray layer calls the same functions inside its workers; ``fit``
takes a ``report`` callback (a local checkpoint writer here, ``ray.train.report`` there).

Stage objectives (Sect. 3, 5.1), each a function ``batch -> dict`` of named loss parts whose
``loss`` entry is optimised; the same dict goes to the logs, the history and the tests:
- teacher: depth -> joints, L_REG (Eq. 1)
- student: RGB -> joints, L_REG
- kd:      RGB student warm-started from ``student``, L_REG + L_ACT + lambda * L_ATT
           (Eqs. 1-4) against the frozen depth teacher on the paired depth map
- meta:    Algorithm 1 (``cmkg.meta.meta_iteration``), passed to ``fit`` as ``update``: a step
           that computes and applies its own updates
- target:  a fresh RGB student on the target set, F = L_REG + R(theta; phi_META) (Algorithm 2)

Every objective takes ``reduction`` (term -> ``sum`` | ``mean``, the config's ``reduction``
section): how L_REG, L_ACT and L_ATT reduce their elements (``cmkg.losses``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cmkg.config import KEEP, averaged_epochs
from cmkg.data.dataset import prepare_batch
from cmkg.diagnostics import describe
from cmkg.errors import NumericalError
from cmkg.losses import distillation_loss, reductions, regression_loss
from cmkg.metrics import denormalise, pose_metrics

LossFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

def regression_objective(model: nn.Module, modality: str, *,
                         reduction: Mapping[str, str] | None = None) -> LossFn:
    """L_REG of the model on one modality (teacher: depth, student: rgb).

    ``reduction``: term -> reduction (``cmkg.config.REDUCTIONS``), here only ``reg`` is read."""
    red = reductions(reduction)["reg"]

    def loss_fn(batch):
        pred, _ = model(batch[modality])
        reg = regression_loss(pred, batch["target"], red)
        return {"loss": reg, "reg": reg}

    return loss_fn


def regularized_objective(model: nn.Module, reg: nn.Module, params_of: nn.Module | None = None,
                          *, reduction: Mapping[str, str] | None = None) -> LossFn:
    """F = L_REG + R(theta) (Eq. 9; Algorithm 2 with phi frozen): RGB student on the target.

    ``params_of``: the bare module whose parameters R reads when ``model`` is a DDP wrapper."""
    params_of = params_of or model
    red = reductions(reduction)["reg"]

    def loss_fn(batch):
        pred, _ = model(batch["rgb"])
        reg_loss = regression_loss(pred, batch["target"], red)
        prior = reg(dict(params_of.named_parameters()))
        return {"loss": reg_loss + prior, "reg": reg_loss, "prior": prior}

    return loss_fn


def distillation_objective(net: nn.Module, teacher: nn.Module, *, losses: list[str],
                           lambda_att: float, att_layers: list[int],
                           reduction: Mapping[str, str] | None = None) -> LossFn:
    """L_REG + L_DIST: the student sees RGB, the frozen teacher the paired depth map.

    ``net`` is a ``StudentWithAdapter`` (or a data-parallel wrapper of one): its adapter maps the
    student's last activation to the teacher's width when they differ (ResNet-18 vs 50). The
    teacher stays in eval mode, outside the optimizer and the wrapper, under ``no_grad``."""
    picks = [i - 1 for i in att_layers]
    red = reductions(reduction)

    def loss_fn(batch):
        pred, acts, last = net(batch["rgb"])
        with torch.no_grad():
            _, t_acts = teacher(batch["depth"])
        reg = regression_loss(pred, batch["target"], red["reg"])
        parts = distillation_loss(
            last, t_acts[-1], [acts[i] for i in picks], [t_acts[i] for i in picks],
            lambda_att=lambda_att, use_act="act" in losses, use_att="att" in losses,
            reduction=red)
        return {"loss": reg + parts["dist"], "reg": reg, **parts}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, loader, modality: str, device: torch.device) -> dict[str, np.ndarray]:
    """Root-relative predictions in mm (via the GT scale) with their ground truth and vis."""
    was_training = model.training
    model.eval()
    preds, gts, vis = [], [], []
    for batch in loader:
        inputs = {k: batch[k] for k in (modality, "planted") if k in batch}
        pred, _ = model(prepare_batch(inputs, device)[modality])
        preds.append(denormalise(pred.float().cpu().numpy(), batch["scale"].numpy()))
        gts.append(batch["joints"].numpy())
        vis.append(batch["vis"].numpy())
    model.train(was_training)
    return {"pred": np.concatenate(preds), "gt": np.concatenate(gts), "vis": np.concatenate(vis)}


def evaluate(model: nn.Module, loader, modality: str, device: torch.device) -> dict:
    p = predict(model, loader, modality, device)
    return pose_metrics(p["pred"], p["gt"], p["vis"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class FitState:
    """Everything a resumed run needs besides model and optimizer."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    best_epe: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None  # state_dict of the best model so far, on the CPU
    # keep="average": the float64 running sum (on the CPU) of the floating entries of the
    # model's state at the end of each epoch averaged so far, and those epochs (their count).
    # Checkpointed with the rest (the whole FitState is pickled), so a resumed run continues
    # the same sum; class-level defaults, so checkpoints from before these fields still load.
    # The sum is dropped once the last epoch has averaged it into ``best_state``.
    average_sum: dict | None = None
    averaged: list[int] | None = None


# the loss parts by their names in the paper (Eqs. 1-4, 9; Algorithm 1), for the messages
TERMS = {"reg": "L_REG", "act": "L_ACT", "att": "L_ATT", "dist": "L_DIST", "prior": "R(theta)"}


def _numerical_hint(stage: str, bad: dict[str, float], lr: float | None) -> str:
    """The config keys most likely behind a non-finite loss, with their values where known."""
    lr_key = "optim.lr" if lr is None else f"optim.lr={lr:g}"
    if stage == "meta":
        return f"{lr_key}, meta.alpha or meta.beta is probably too high; lower them"
    if "att" in bad or "dist" in bad:
        return f"{lr_key} or distill.lambda_att is probably too high; lower them"
    if "prior" in bad:
        return (f"{lr_key} is probably too high, or the prior R(theta) diverges "
                "(regularizer.form, regularizer.prior); lower optim.lr")
    return f"{lr_key} is probably too high; lower optim.lr"


def _check_finite(sums: dict[str, Tensor], steps: int, stage: str, epoch: int, *,
                  check_every: int = 1, lr: float | None = None) -> dict[str, float]:
    means = {k: float(v) / steps for k, v in sums.items()}
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        # the sums stay non-finite once a step is: it happened since the last check passed
        first = (steps - 1) // check_every * check_every + 1
        where = f"step {steps}" if first == steps else f"steps {first}-{steps}"
        parts = {k: v for k, v in bad.items() if k != "loss"} or bad
        subject = ("the total loss" if list(parts) == ["loss"]
                   else "loss " + ", ".join(TERMS.get(k, k) for k in parts))
        values = {str(v) for v in parts.values()}
        what = values.pop() if len(values) == 1 else "non-finite"
        raise NumericalError(f"{stage}: {subject} became {what} in epoch {epoch}, {where} "
                             f"({_numerical_hint(stage, bad, lr)})")
    return means


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    """The rate times (1 + cos(pi t / T)) / 2 at step t of T: from the set rate to 0 at the
    end of the run (``optim.schedule: cosine``); step it once per training step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)))


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the real module here


def _accumulate(state: FitState, model: nn.Module, epoch: int) -> None:
    """Add the model's floating state (parameters, BatchNorm running mean and var) to the
    running sum of ``keep="average"``, in float64 on the CPU."""
    current = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    if state.average_sum is None:
        state.average_sum = {k: v.to("cpu", torch.float64, copy=True) for k, v in current.items()}
        state.averaged = []
    else:
        for k, v in current.items():
            state.average_sum[k] += v.to("cpu", torch.float64)
    state.averaged.append(epoch)


def _average(state: FitState, model: nn.Module) -> dict[str, Tensor]:
    """The averaged state on the CPU: each floating entry the running sum over the count, in its
    own dtype; the other entries (num_batches_tracked) the model's final values."""
    n = len(state.averaged)
    return {k: (state.average_sum[k] / n).to(v.dtype) if k in state.average_sum
            else v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _publish_average(model: nn.Module, state: FitState, validate: Callable[[], dict] | None,
                     stage: str, epoch: int, lr: float | None) -> dict:
    """Keep the average of ``state``'s running sum as ``best_state`` (validated, if ``validate``,
    with the model's own weights put back after) and return its history entry."""
    bare = _unwrap(model)
    average = _average(state, bare)
    entry = {"epochs": list(state.averaged)}
    state.best_state, state.best_epoch, state.average_sum = average, epoch, None
    if validate is not None:
        final = {k: v.detach().clone() for k, v in bare.state_dict().items()}
        bare.load_state_dict(average)
        try:
            val = validate()
        finally:
            bare.load_state_dict(final)
        if not math.isfinite(val["epe_mm"]):
            raise NumericalError(f"{stage}: the averaged weights of epochs {entry['epochs'][0]}-"
                                 f"{epoch} are non-finite (validation EPE {val['epe_mm']}; "
                                 f"{_numerical_hint(stage, {}, lr)})")
        entry["val"] = {k: val[k] for k in ("epe_mm", "auc_20_50")}
        state.best_epe = val["epe_mm"]
    return entry


def fit(model: nn.Module, loss_fn: LossFn | None, loader, optimizer: torch.optim.Optimizer | None,
        epochs: int, *, device: torch.device, update: LossFn | None = None,
        validate: Callable[[], dict] | None = None, eval_every: int = 1,
        state: FitState | None = None, report: Callable[[FitState], None] | None = None,
        stage: str = "fit", progress: str = "auto", check_every: int = 50,
        diagnose: Callable[[], dict] | None = None, scheduler=None,
        keep: str = "best_val", average_epochs: int = 0,
        train_metrics: Callable[[], dict] | None = None) -> FitState:
    """Train ``model`` on ``loss_fn`` for ``epochs`` epochs, validating and keeping the best.

    Each step minimises ``loss_fn(batch)["loss"]`` with ``optimizer``; or, when ``update`` is
    given instead, calls it and lets it apply its own updates (the meta stage's Algorithm 1).

    ``validate()`` returns metrics with ``epe_mm``; the weights kept in ``state.best_state`` are
    those of the best validation epoch (``keep="best_val"``), the final ones (``"final"``), or
    (``"average"``) the element-wise mean of the model's state at the end of each of the last
    ``average_epochs`` epochs (0: the last half, at least 1; ``cmkg.config.averaged_epochs``):
    epoch-level Polyak/SWA averaging. Floating entries are averaged, parameters and BatchNorm
    running mean and var alike: the BatchNorm statistics are the mean of the epochs' running
    statistics, not recomputed for the averaged weights with a pass over the data, so they
    are not exactly those of the averaged network. Integer buffers (``num_batches_tracked``)
    take their final values. The average is validated once after the last epoch: that EPE
    becomes ``state.best_epe`` with ``best_epoch`` the last epoch, and the last epoch's history
    record gets ``"average": {"epochs": [the averaged epochs], "val": {"epe_mm", "auc_20_50"}}``
    (``val`` only with ``validate``) beside its own ``val`` of the final weights. The model
    itself is left holding the final weights; the running sum lives in ``state``, so a run
    resumed from a checkpoint averages the same epochs to the same bits.
    ``scheduler`` (e.g. ``cosine_schedule``), if given, steps after every training step.
    ``train_metrics()``, if given, measures the weights on (part of) the training split where an
    epoch validates, kept as the record's ``train_eval`` (the learning curves' train EPE); like
    ``validate`` it must leave weights, buffers and RNGs as it found them. ``diagnose()``, if given, runs after every epoch's training steps and
    its dict is kept as the epoch record's ``diagnostics`` (``cmkg.diagnostics``: gradient
    shares, the prior's strength); it must leave weights, buffers and RNGs as it found them.
    ``report(state)`` runs after every epoch (checkpointing). Losses are
    summed on the device and read back every ``check_every`` steps, where a non-finite value
    stops the run with :class:`NumericalError`.
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    n_average = averaged_epochs(average_epochs, epochs)
    if keep == "average" and not 1 <= n_average <= epochs:
        raise ValueError(f"average_epochs must be 0 (the last half) or in 1..{epochs} (the "
                         f"epochs), got {average_epochs}")
    state = state or FitState()
    bar_on = progress == "auto" and sys.stderr.isatty()
    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None  # for the messages
    for epoch in range(state.epoch + 1, epochs + 1):
        # -- train one epoch ------------------------------------------------------------------
        model.train()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # distributed samplers reshuffle per epoch
        start = time.perf_counter()
        total: Tensor | None = None  # running sums of the loss parts, on the device
        parts: dict[str, Tensor] = {}
        steps = 0
        bar = tqdm(total=len(loader), desc=f"{stage} {epoch}/{epochs}", leave=False,
                   disable=not bar_on, file=sys.stderr, dynamic_ncols=True)
        for batch in loader:
            batch = prepare_batch(batch, device)
            if update is not None:
                parts = update(batch)
            else:
                parts = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            # one stacked add per step keeps the bookkeeping to two small kernels
            stacked = torch.stack([v.detach() for v in parts.values()])
            total = stacked if total is None else total + stacked
            steps += 1
            if steps % check_every == 0:
                running = _check_finite(dict(zip(parts, total)), steps, stage, epoch,
                                        check_every=check_every, lr=lr)
                bar.set_postfix(loss=f"{running['loss']:.4g}", refresh=False)
            bar.update()
        bar.close()
        train = _check_finite(dict(zip(parts, total)) if total is not None else {}, max(steps, 1),
                              stage, epoch, check_every=check_every, lr=lr)
        record = {"epoch": epoch, "train": train, "train_time_s": time.perf_counter() - start}
        if diagnose is not None:
            record["diagnostics"] = diagnose()
        if keep == "average" and epoch > epochs - n_average:
            _accumulate(state, _unwrap(model), epoch)

        # -- validate, keep the best ----------------------------------------------------------
        if validate is not None and (epoch % eval_every == 0 or epoch == epochs):
            val = validate()
            if not math.isfinite(val["epe_mm"]):  # the last steps' update diverged after its loss
                raise NumericalError(f"{stage}: the weights became non-finite in epoch {epoch} "
                                     f"(validation EPE {val['epe_mm']}; "
                                     f"{_numerical_hint(stage, {}, lr)})")
            record["val"] = {k: val[k] for k in ("epe_mm", "auc_20_50")}
            if train_metrics is not None:
                record["train_eval"] = {"epe_mm": train_metrics()["epe_mm"]}
            kept = (val["epe_mm"] < state.best_epe if keep == "best_val"
                    else keep == "final" and epoch == epochs)
            if kept:
                state.best_epe, state.best_epoch = val["epe_mm"], epoch
                state.best_state = {k: v.detach().to("cpu", copy=True)
                                    for k, v in _unwrap(model).state_dict().items()}
        if keep == "average" and epoch == epochs:
            record["average"] = _publish_average(model, state, validate, stage, epoch, lr)
        state.history.append(record)
        state.epoch = epoch

        # -- report ---------------------------------------------------------------------------
        if progress != "none":
            parts_txt = " ".join(f"{k} {v:.4g}" for k, v in train.items() if k != "loss")
            val_txt = (f"  val EPE {record['val']['epe_mm']:.2f} mm AUC {record['val']['auc_20_50']:.3f}"
                       if "val" in record else "")
            print(f"{stage:8s} epoch {epoch:3d}/{epochs}  loss {train['loss']:.4g} ({parts_txt})"
                  f"{val_txt}  {record['train_time_s']:.1f}s", file=sys.stderr, flush=True)
            if "val" in record.get("average", {}):
                a, v = record["average"], record["average"]["val"]
                print(f"{stage:8s} average of epochs {a['epochs'][0]}-{a['epochs'][-1]}  val EPE "
                      f"{v['epe_mm']:.2f} mm AUC {v['auc_20_50']:.3f}", file=sys.stderr, flush=True)
            if "diagnostics" in record:
                print(f"{stage:8s} epoch {epoch:3d}/{epochs}  {describe(record['diagnostics'])}",
                      file=sys.stderr, flush=True)
        if report is not None:
            report(state)
    if state.best_state is None:  # no validation: the last weights are the result
        state.best_state = copy.deepcopy({k: v.cpu() for k, v in _unwrap(model).state_dict().items()})
        state.best_epoch = state.epoch
    return state
