"""Building a stage: its datasets, networks, objective and optimizers (Sect. 3, Algorithms 1-2).

``build_stage`` is called the same way in this process and in every Ray Train worker; what
differs there is passed in (the device, and ``wrap``: Ray Train's DDP ``prepare_model``). A
synthetic dataset is rendered into ``data.root`` on first use (``ensure_dataset``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cmkg import diagnostics, models, parallel, regularizers, storage
from cmkg.config import Config, DataSpec, digest, knobs_of
from cmkg.console import say
from cmkg.data import HandDataset, identity_collate, synth_source, synthesize
from cmkg.data.dataset import prepare_batch
from cmkg.errors import DataError, UserError
from cmkg.forms import weighted, weighted_forms
from cmkg.meta import fixed_point_phi, g_step, meta_iteration, phi_bounds
from cmkg.regularizers import Regularizer
from cmkg.stages.artifacts import Artifact
from cmkg.stages.defs import DEFS, planted, prior_input, stage_datasets
from cmkg.train import distillation_objective, regression_objective, regularized_objective


def ensure_dataset(spec: DataSpec, cfg: Config) -> Path:
    """The local folder of a dataset: a synthetic one is rendered into ``data.root`` on first
    use, one given by URI is downloaded into ``{data.root}/remote`` on first use."""
    if storage.is_uri(spec.path):
        return storage.mirror(spec.path, Path(cfg.data.root) / "remote", "data path",
                              "manifest.json")
    if spec.path is not None:
        return Path(spec.path)
    knobs = knobs_of(spec, cfg)
    source = synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split),
                          knobs)
    name = f"{spec.domain}-{spec.size}px-n{spec.num}-seed{spec.seed}-{digest(source)[:10]}"
    out = Path(cfg.data.root) / "synth" / name
    synthesize(out, spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split),
               knobs=knobs)
    return out


@dataclass
class StageRun:
    """Everything ``fit()`` needs for one stage, built the same way in every worker."""

    stage: str
    model: torch.nn.Module  # the network evaluated and published
    trainable: torch.nn.Module  # what the checkpoint holds (model + adapter + phi where used)
    optimizers: list[torch.optim.Optimizer]
    loss_fn: Callable | None  # batch -> parts, fit() steps the optimizer
    update: Callable | None  # batch -> parts, applying its own updates (Algorithm 1)
    train_set: HandDataset
    val_set: HandDataset
    test_set: HandDataset
    train_roots: list[Path]
    eval_root: Path
    regularizer: Regularizer | None = None
    wrapped: torch.nn.Module | None = None  # trainable as fit() drives it (DDP under Ray)
    diagnose: Callable[[int], dict] | None = None  # total steps K -> an epoch's diagnostics
    calibration: dict | None = None  # the calibrated prior's scale (target, calibrate_d set)
    scheduler: object | None = None  # the learning-rate schedule of optimizers[0] (optim.schedule)
    finish: Callable[[], None] | None = None  # after training, before publishing (meta.solve)


def build_stage(stage: str, cfg: Config, spec: dict, upstream: dict[str, Artifact],
                device: torch.device, wrap: Callable | None = None) -> StageRun:
    """Datasets, networks, objective and optimizers of a stage (Sect. 3, Algorithms 1-2).

    ``wrap`` (e.g. Ray Train's ``prepare_model``, i.e. DDP) wraps the trainable module of the
    teacher, student, kd and target stages before their objectives are built on it; the meta
    stage never takes it (Algorithm 1 averages its gradients by hand)."""
    wrap = wrap or (lambda m: m)
    run = _data(stage, cfg)
    torch.manual_seed(cfg.run.seed)
    extra = spec.get("planted", {}).get("channels", 0)
    run.model = run.trainable = models.build(spec["arch"], DEFS[stage].modality, extra).to(device)
    if stage in ("teacher", "student"):
        run.wrapped = wrap(run.model)
        run.loss_fn = regression_objective(run.wrapped, DEFS[stage].modality,
                                           reduction=asdict(cfg.reduction))
        run.optimizers = [_adam(cfg, run.model.parameters())]
    elif stage == "kd":
        _distillation(run, cfg, upstream, device, wrap)
    elif stage == "meta":
        _meta_learning(run, cfg, upstream, device)
    else:
        _target(run, cfg, spec, upstream, device, wrap)
    if run.wrapped is None:
        run.wrapped = run.trainable
    return run


def _adam(cfg: Config, params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def _data(stage: str, cfg: Config) -> StageRun:
    """A StageRun holding the stage's datasets (networks and objective still to come): the
    training split of every dataset the stage reads, the val and test splits of the first."""
    d = DEFS[stage]
    train_roots = [ensure_dataset(s, cfg) for s in stage_datasets(stage, cfg)]
    eval_root = train_roots[0]
    pl = planted(stage, cfg)  # the planted channels: a shortcut on the target's train split only
    cue = 0.0 if pl is None else pl.cue if d.data == "target" else pl.source_cue
    train_set = HandDataset(train_roots, "train", d.reads, planted=pl, shortcut=cue)
    if d.learns_prior and cfg.meta.subset != "all":  # a split-half diagnostic of phi
        train_set = take(train_set, halves(len(train_set))[cfg.meta.subset])
    if len(train_set) < cfg.optim.batch_size:
        raise DataError(f"{train_roots[0]}: {len(train_set)} training samples, fewer than one "
                        f"batch (optim.batch_size={cfg.optim.batch_size})"
                        + (f" in meta.subset={cfg.meta.subset}" if d.learns_prior else ""))
    val_set = HandDataset(eval_root, "val", (d.modality,), planted=pl)
    test_set = HandDataset(eval_root, "test", (d.modality,), planted=pl)
    return StageRun(stage, None, None, [], None, None, train_set, val_set, test_set,
                    train_roots, eval_root)


HALVES_SEED = 20200614  # fixed: the halves of a training split are the same for every run


def halves(n: int) -> dict[str, np.ndarray]:
    """Two fixed disjoint halves of ``range(n)`` that cover it (``meta.subset``): a permutation
    drawn from a fixed seed, split in the middle, each half sorted. Depends on ``n`` only."""
    order = np.random.default_rng(HALVES_SEED).permutation(n)
    return {"half0": np.sort(order[: n // 2]), "half1": np.sort(order[n // 2:])}


def take(ds: HandDataset, idx: np.ndarray) -> HandDataset:
    """A copy of ``ds`` holding the samples ``idx`` only: every per-sample array (and every
    per-sample array in a dict of them, the images) indexed, the rest shared."""
    n, out = len(ds), copy.copy(ds)
    for name, value in vars(ds).items():
        if isinstance(value, np.ndarray) and value.shape[:1] == (n,):
            setattr(out, name, value[idx])
        elif isinstance(value, dict) and value and all(
                isinstance(v, np.ndarray) and v.shape[:1] == (n,) for v in value.values()):
            setattr(out, name, {k: v[idx] for k, v in value.items()})
    assert len(out) == len(idx), "HandDataset.take: the sample count is not len(target)"
    return out


def order_seed(stage: str, cfg: Config) -> int:
    """The seed of a stage's training-data order (its loader's generator): ``run.seed``, or for
    the meta stage ``meta.order_seed`` where set (a split-half diagnostic of phi: the same
    student and teacher, another order)."""
    if DEFS[stage].learns_prior and cfg.meta.order_seed is not None:
        return cfg.meta.order_seed
    return cfg.run.seed


def _warm_start(run: StageRun, upstream: dict[str, Artifact], device: torch.device):
    """kd and meta: the student's weights, the frozen teacher and the activation adapter."""
    run.model.load_state_dict(upstream["student"].load_model().state_dict())
    teacher = upstream["teacher"].load_model(device).eval().requires_grad_(False)
    adapter = models.activation_adapter(run.model, teacher).to(device)
    return teacher, adapter


def _distillation(run: StageRun, cfg: Config, upstream: dict[str, Artifact],
                  device: torch.device, wrap: Callable) -> None:
    """kd: the student fine-tuned with L_REG + L_ACT + lambda L_ATT against the teacher."""
    teacher, adapter = _warm_start(run, upstream, device)
    run.trainable = models.StudentWithAdapter(run.model, adapter)
    run.optimizers = [_adam(cfg, run.trainable.parameters())]
    run.wrapped = wrap(run.trainable)
    kwargs = dict(**asdict(cfg.distill), reduction=asdict(cfg.reduction))
    run.loss_fn = distillation_objective(run.wrapped, teacher, **kwargs)
    run.diagnose = diagnostics.distill_diagnose(  # on the bare modules: no DDP collectives
        distillation_objective(run.trainable, teacher, **kwargs),
        diagnostics.fixed_batch(run.train_set, cfg.optim.batch_size, device), run.model,
        cfg.distill.lambda_att)


def _meta_learning(run: StageRun, cfg: Config, upstream: dict[str, Artifact],
                   device: torch.device) -> None:
    """meta (Algorithm 1): the student's distillation fine-tuning while phi is learned. No DDP:
    gradients are averaged by hand (``parallel.mean_across``).

    ``meta.teacher=false`` (the teacher-free control): G = L_REG, the teacher is neither an
    input of the stage (``defs.depends``) nor loaded, and there is no adapter."""
    r, m = cfg.regularizer, cfg.meta
    model = run.model
    if m.teacher:
        teacher, adapter = _warm_start(run, upstream, device)
        run.trainable = torch.nn.ModuleDict({"student": model, "adapter": adapter})
    else:
        model.load_state_dict(upstream["student"].load_model().state_dict())
        teacher = adapter = None
        run.trainable = torch.nn.ModuleDict({"student": model})
    run.optimizers = [_adam(cfg, run.trainable.parameters())]
    if not weighted(r.form):
        raise UserError(f"regularizer.form={r.form}: the meta stage learns phi of a "
                        f"weighted form ({', '.join(weighted_forms())})")
    reg = regularizers.build(r.form, model, params=r.params, phi_param=r.phi_param,
                             phi_init=r.phi_init).to(device)
    run.regularizer = reg
    run.trainable["phi"] = reg
    phi_opt = (torch.optim.SGD(reg.parameters(), lr=m.beta) if m.phi_optimizer == "sgd"
               else torch.optim.Adam(reg.parameters(), lr=m.beta))
    run.optimizers.append(phi_opt)
    kwargs = dict(**asdict(cfg.distill), reduction=asdict(cfg.reduction))
    if m.solve == "fixed_point":
        _fixed_point(run, cfg, model, adapter, teacher, reg, kwargs, device)
        return
    clip = tuple(r.phi_clip) if r.phi_clip else phi_bounds(m.alpha)
    convergence = diagnostics.PhiConvergence(reg)

    def update(batch):
        convergence.started()
        return meta_iteration(
            model, adapter, teacher, reg, batch, run.optimizers[0], phi_opt, alpha=m.alpha,
            steps=m.inner_steps, first_order=m.first_order, phi_clip=clip,
            reduce=parallel.mean_across, **kwargs)

    run.update = update
    shares = None
    if teacher is not None:  # teacher-free, G has one term: no shares to measure
        shares = diagnostics.meta_diagnose(
            model, adapter, teacher,
            diagnostics.fixed_batch(run.train_set, cfg.optim.batch_size, device), **kwargs)
    run.diagnose = lambda k: {**(shares(k) if shares else {}), **convergence(k)}


def _fixed_point(run: StageRun, cfg: Config, model, adapter, teacher, reg: Regularizer,
                 kwargs: dict, device: torch.device) -> None:
    """meta.solve=fixed_point: theta trained on G as Algorithm 1 trains it (``g_step``), phi
    left at 0 until the end, then set once to Algorithm 1's fixed point at the final weights
    (``fixed_point_phi``, over the whole train split in a fixed order)."""
    run.update = lambda batch: g_step(model, adapter, teacher, batch, run.optimizers[0],
                                      reduce=parallel.mean_across, **kwargs)
    shares = diagnostics.meta_diagnose(
        model, adapter, teacher, diagnostics.fixed_batch(run.train_set, cfg.optim.batch_size, device),
        **kwargs)
    run.diagnose = shares

    def finish() -> None:
        batches = (prepare_batch(b, device) for b in _loader(run.train_set, 256, False, cfg, device))
        phis = fixed_point_phi(model, adapter, teacher, batches, list(reg.names),  # rank 0 alone
                               eps=cfg.regularizer.phi_eps, **kwargs)
        with torch.no_grad():
            for raw, phi in zip(reg.raw, phis):
                raw.copy_(phi)
        say(f"meta: phi set to Algorithm 1's fixed point at the final weights "
            f"({100 * float(torch.cat([p.flatten() for p in phis]).lt(0).double().mean()):.1f} % "
            f"negative)")

    run.finish = finish


def _target(run: StageRun, cfg: Config, spec: dict, upstream: dict[str, Artifact],
            device: torch.device, wrap: Callable) -> None:
    """target (Algorithm 2): a fresh student, F = L_REG + R(theta; phi_META), with phi_META
    as the config applies it: strength -> sign -> control (``regularizers.applied``) -> the
    calibration's scale and cap. Everything downstream (the objective, the diagnostics' D, the
    ``phi_applied`` histogram) sees that phi."""
    r, model = cfg.regularizer, run.model
    if weighted(r.form):
        base = (_learned_prior(upstream["meta"], cfg, spec, model) if r.phi_source == "meta"
                else _weights_prior(upstream[prior_input(cfg)], cfg, model))
        reg = regularizers.applied(base, strength=r.strength, sign=r.sign,
                                   control=r.phi_control, seed=cfg.run.seed)
    else:
        reg = regularizers.build(r.form, model, params=r.params, sigma=r.sigma)
    run.regularizer = reg = reg.to(device)
    if weighted(r.form) and r.calibrate_d is not None:
        run.calibration = calibrate(run, cfg, spec, device)
    run.wrapped = wrap(model)
    run.loss_fn = regularized_objective(run.wrapped, reg, model, reduction=asdict(cfg.reduction))
    run.optimizers = [_adam(cfg, model.parameters())]
    run.diagnose = diagnostics.target_diagnose(  # on the bare model: no DDP collectives
        regularized_objective(model, reg, reduction=asdict(cfg.reduction)),
        diagnostics.fixed_batch(run.train_set, cfg.optim.batch_size, device), model, reg,
        run.optimizers[0], lr_sum=_lr_sum(cfg))


def _lr_sum(cfg: Config) -> Callable[[int], float] | None:
    """K -> the sum of the learning rates over a target run of K steps (D's lr x K), for a
    schedule; None for a constant rate (the optimizer's rate is the run's)."""
    if cfg.optim.schedule == "constant":
        return None
    return lambda k: diagnostics.schedule_lr_sum(cfg.optim.lr, k, cfg.optim.schedule)


def _weights_prior(art: Artifact, cfg: Config, model) -> Regularizer:
    """phi of ``regularizer.phi_source`` oracle / source_weights: 1 / (theta_j^2 + eps) from the
    weights of ``art`` (the unregularised target run of this seed, or the source kd student),
    scaled to mean 1 (``regularizers.inverse_square``)."""
    r = cfg.regularizer
    state = art.load_model().state_dict()
    names = regularizers.regularised_names(model, r.params)
    named = dict(model.named_parameters())
    bad = [n for n in names if n not in state or state[n].shape != named[n].shape]
    if bad:
        raise UserError(f"regularizer.phi_source={r.phi_source}: the weights of {art.path} do "
                        f"not fit the target's student (first mismatch: {bad[0]})")
    return regularizers.inverse_square({n: state[n] for n in names}, eps=r.phi_eps)


def _learned_prior(meta: Artifact, cfg: Config, spec: dict, model) -> Regularizer:
    """phi_META of the meta stage, checked against the target's form and network."""
    r = cfg.regularizer
    reg = meta.load_phi()
    if reg.form != r.form:
        raise UserError(f"regularizer.form={r.form} but the prior {meta.path} holds {reg.form}")
    named = dict(model.named_parameters())
    wanted = regularizers.regularised_names(model, r.params)
    held = dict(zip(reg.names, (t.shape for t in reg.raw)))
    bad = sorted(set(wanted) ^ set(held)) or [n for n in wanted if held[n] != named[n].shape]
    if bad:
        raise UserError(f"regularizer.prior {meta.path}: phi does not fit the {spec['arch']} "
                        f"student (first mismatch: {bad[0]})")
    return reg


def calibrate(run: StageRun, cfg: Config, spec: dict, device: torch.device) -> dict:
    """The calibrated prior (``regularizer.calibrate_d``): scale phi_META of the target stage so
    that its median |D| at the fresh student's weights is the set value (``diagnostics.
    calibrate_prior``), with s from a fixed draw of training batches and K = epochs x steps of a
    one-process run (lr: the mean rate over those steps under a schedule). Deterministic, draws
    nothing from torch's generators, so every data-parallel worker computes the same phi."""
    r, bs = cfg.regularizer, cfg.optim.batch_size
    n = min(diagnostics.CALIBRATION_BATCHES, len(run.train_set) // bs)
    order = np.random.default_rng(cfg.run.seed).permutation(len(run.train_set))
    batches = [prepare_batch(run.train_set.__getitems__(np.sort(order[i * bs:(i + 1) * bs])),
                             device) for i in range(n)]
    total_steps = spec["epochs"] * (len(run.train_set) // bs)
    lr = cfg.optim.lr if _lr_sum(cfg) is None else _lr_sum(cfg)(total_steps) / total_steps
    info = diagnostics.calibrate_prior(
        run.regularizer, run.model, batches, lr=lr, total_steps=total_steps,
        d_target=r.calibrate_d, d_cap=r.d_cap, reduction=cfg.reduction.reg)
    m = cfg.meta
    if (r.phi_param == "free" and r.phi_init == 0 and m.phi_optimizer == "sgd"
            and r.sign == "learned" and r.phi_control in ("none", "other_seed")):
        info["beta_equivalent"] = m.beta * info["scale"]  # Algorithm 1's beta, to first order
    reached = "" if info["d_median"] > 0.99 * r.calibrate_d else (
        f" (set {r.calibrate_d:g}: beyond what Adam's normalisation allows at this lr x steps)")
    say(f"target: calibrated prior: phi_META x {info['scale']:.3g} -> median |D| "
        f"{info['d_median']:.3g}{reached} (was {info['d_median_before']:.3g}), "
        f"{100 * info['fraction_capped']:.1f} % of weights capped at |D| = {r.d_cap}")
    return info


def make_loaders(run: StageRun, cfg: Config, device: torch.device, gen: torch.Generator):
    """Train (shuffled with ``gen``), val and test loaders of a built stage."""
    return (_loader(run.train_set, cfg.optim.batch_size, True, cfg, device, gen),
            _loader(run.val_set, 256, False, cfg, device),
            _loader(run.test_set, 256, False, cfg, device))


def _loader(ds, batch_size: int, shuffle: bool, cfg: Config, device: torch.device,
            gen: torch.Generator | None = None):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=gen,
        collate_fn=identity_collate, num_workers=cfg.run.loader_workers,
        persistent_workers=cfg.run.loader_workers > 0, pin_memory=device.type == "cuda")
