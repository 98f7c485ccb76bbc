"""Running a stage: the one training loop (``train_node``), publishing, and the cached walk of a
plan (``run_stage``).

``train_node`` trains one planned node: build the stage, resume from its latest checkpoint,
``fit`` with a checkpoint after every epoch, then evaluate the best weights on the test split
and publish the artifact. It runs in this process (``run_stage``) and, unchanged, in every Ray
Train worker (``cmkg.cluster.train``); what differs is passed in: the device, DDP's ``wrap``,
the distributed sampler (``prepare_loader``) and where checkpoints go (``Checkpoints``: the
stage's ``.partial`` folder here, ``ray.train.report`` there). Nothing here imports Ray.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from cmkg import diagnostics, models, tracking
from cmkg.atomic import torch_save, write_json, write_yaml
from cmkg.config import Config
from cmkg.console import say
from cmkg.data import identity_collate, read_manifest
from cmkg.errors import NumericalError, UserError
from cmkg.histograms import histogram
from cmkg.meta import check_phi
from cmkg.metrics import denormalise, pose_metrics
from cmkg.parallel import broadcast_module
from cmkg.regularizers import Regularizer
from cmkg.stages.artifacts import Artifact, Store, code_version, writer_lock
from cmkg.stages.build import StageRun, build_stage, make_loaders, order_seed
from cmkg.stages.defs import DEFS
from cmkg.stages.plan import Node, plan
from cmkg.train import FitState, cosine_schedule, evaluate, fit

CHECKPOINT = "checkpoint.pt"
TRAIN_EVAL = 256  # training samples measured per validated epoch for the learning curves


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name}: CUDA is not available on this machine")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

class PartialFolder:
    """Checkpoints of an in-process run: ``{key}.partial/checkpoint.pt``, written atomically
    after every epoch and mirrored to a remote store, so a rerun here or on another machine
    resumes it."""

    def __init__(self, store: Store, node: Node):
        self.store, self.node = store, node
        self.path = store.partial(node.stage, node.key) / CHECKPOINT

    def load(self, device: torch.device) -> dict | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store.pull_checkpoint(self.node.stage, self.node.key, self.path)
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location=device, weights_only=False)

    def save(self, blob: Callable[[], dict], state: FitState) -> None:
        torch_save(self.path, blob())
        self.store.push_checkpoint(self.node.stage, self.node.key, self.path)

    def discard(self) -> None:
        self.store.drop_partial(self.node.stage, self.node.key)


def checkpoint_blob(run: StageRun, key: str, state: FitState, gen: torch.Generator) -> dict:
    """Everything a resumed run needs: model(s), optimizers, phi, fit state (pickled whole, with
    ``keep: average``'s running sum), RNG states. The Ray path checkpoints this same blob."""
    blob = {"key": key, "model": run.trainable.state_dict(),
            "optimizers": [o.state_dict() for o in run.optimizers], "state": state,
            "loader_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}
    if run.scheduler is not None:
        blob["scheduler"] = run.scheduler.state_dict()
    return blob


def restore(run: StageRun, blob: dict, key: str, gen: torch.Generator) -> FitState | None:
    """Load a checkpoint blob of the same stage key into ``run``; None if it is another's."""
    if blob.get("key") != key:
        return None
    run.trainable.load_state_dict(blob["model"])
    for opt, st in zip(run.optimizers, blob["optimizers"]):
        opt.load_state_dict(st)
    if run.scheduler is not None:
        run.scheduler.load_state_dict(blob["scheduler"])
    gen.set_state(blob["loader_rng"])
    torch.set_rng_state(blob["torch_rng"])
    return blob["state"]


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def train_node(node: Node, upstream: dict[str, Artifact], store: Store, *,
               device: torch.device, checkpoints, wrap: Callable | None = None,
               prepare_loader: Callable | None = None,
               on_epoch: Callable[[int, dict], None] | None = None,
               publishes: bool = True) -> Artifact | None:
    """Train ``node`` and publish its artifact (``publishes``: rank 0 of a data-parallel run).

    ``checkpoints`` has ``load(device) -> blob | None``, ``save(blob_fn, state)`` and
    ``discard()``; ``on_epoch(epoch, record)`` runs after each epoch's checkpoint, so a caller
    that stops the run there (a sweep's scheduler) leaves it resumable."""
    stage, cfg, key, spec = node.stage, node.cfg, node.key, node.spec
    # -- build ---------------------------------------------------------------------------------
    learns_prior = DEFS[stage].learns_prior
    run = build_stage(stage, cfg, spec, upstream, device, wrap=None if learns_prior else wrap)
    if learns_prior:  # no DDP for Algorithm 1: start every worker from rank 0's weights
        broadcast_module(run.trainable)
    gen = torch.Generator().manual_seed(order_seed(stage, cfg))  # run.seed, or meta.order_seed
    train_loader, val_loader, test_loader = make_loaders(run, cfg, device, gen)
    if prepare_loader is not None:
        train_loader = prepare_loader(train_loader)
    if cfg.optim.schedule == "cosine":  # over this run's steps (per worker under Ray Train)
        run.scheduler = cosine_schedule(run.optimizers[0], spec["epochs"] * len(train_loader))

    # -- resume ----------------------------------------------------------------------------------
    state = FitState()
    blob = checkpoints.load(device)
    resumed = None if blob is None else restore(run, blob, key, gen)
    if resumed is not None:
        state = resumed
        say(f"{stage}: resuming {store.describe(stage, key)} after epoch {state.epoch}/"
            f"{spec['epochs']}")

    track = tracking.StageRun(node, store.root, active=publishes)  # run.tracking, opt in
    track.history(state.history)  # a resumed run's earlier epochs

    def report(st: FitState) -> None:
        if learns_prior:
            check_phi(run.regularizer, stage, st.epoch)
        checkpoints.save(lambda: checkpoint_blob(run, key, st, gen), st)
        track.epoch(st.history[-1])
        if on_epoch is not None:  # after the checkpoint: a caller stopping here can resume it
            on_epoch(st.epoch, st.history[-1])

    # -- fit -------------------------------------------------------------------------------------
    started = time.time()
    if publishes:
        say(f"{stage}: training {spec['arch']} on {DEFS[stage].modality} ({len(run.train_set)} "
            f"train / {len(run.val_set)} val samples, {spec['epochs']} epochs, {device}) -> "
            f"{store.describe(stage, key)}")
    with track:  # an error or a stop ends the tracked run FAILED or KILLED
        try:
            state = fit_stage(run, cfg, spec, train_loader, val_loader, device, state, report)
        except NumericalError:  # a diverged run is nothing to resume: leave no partial behind
            checkpoints.discard()
            raise
        if not publishes:
            return None
        art = publish(run, node, upstream, state, test_loader, store, device, started)
        track.finish(art.metrics, store.describe(stage, key))
    return art


def fit_stage(run: StageRun, cfg: Config, spec: dict, train_loader, val_loader,
              device: torch.device, state: FitState, report: Callable) -> FitState:
    """``fit()`` with the stage's objective or update step, validating on the eval set and,
    where the stage has a ``diagnose`` hook, measuring its terms after every epoch."""
    total_steps = spec["epochs"] * len(train_loader)  # K of the prior's figure D: this run's steps
    modality = DEFS[run.stage].modality
    # the train EPE of the learning curves: a fixed slice of the training split, no augmentation
    head = torch.utils.data.Subset(run.train_set, range(min(TRAIN_EVAL, len(run.train_set))))
    head_loader = torch.utils.data.DataLoader(head, batch_size=256, collate_fn=identity_collate)
    return fit(run.wrapped, run.loss_fn, train_loader,
               run.optimizers[0] if run.update is None else None, spec["epochs"],
               device=device, update=run.update,
               validate=lambda: evaluate(run.model, val_loader, modality, device),
               train_metrics=lambda: evaluate(run.model, head_loader, modality, device),
               eval_every=cfg.run.eval_every, state=state, report=report, stage=run.stage,
               progress=cfg.run.progress, scheduler=run.scheduler, keep=cfg.optim.keep,
               average_epochs=cfg.optim.average_epochs,
               diagnose=None if run.diagnose is None else lambda: run.diagnose(total_steps))


def publish(run: StageRun, node: Node, upstream: dict[str, Artifact], state: FitState,
            test_loader, store: Store, device: torch.device, started: float) -> Artifact:
    """Evaluate the best weights on the test split, write the artifact's files into its partial
    folder and publish it with one rename (then, for a remote store, upload it)."""
    stage, key, spec, cfg = node.stage, node.key, node.spec, node.cfg
    modality = DEFS[stage].modality
    partial = store.partial(stage, key)
    partial.mkdir(parents=True, exist_ok=True)
    prefix = "student." if run.trainable is not run.model else ""
    best = {k[len(prefix):]: v for k, v in state.best_state.items() if k.startswith(prefix)}
    run.model.load_state_dict(best)
    if run.finish is not None:
        run.finish()
    test = evaluate(run.model, test_loader, modality, device)
    blob = {"arch": spec["arch"], "modality": modality, "state_dict": best}
    if "planted" in spec:  # absent otherwise: the files of default runs as before
        blob["extra_channels"] = spec["planted"]["channels"]
    torch_save(partial / "model.pt", blob)
    metrics = _metrics(run, state, test, spec)
    if DEFS[stage].learns_prior:  # phi_META = phi_K, the final phi (Algorithm 1, line 12)
        torch_save(partial / "phi.pt", run.regularizer.phi_state())
        metrics["phi"] = phi_summary(run.regularizer)
    write_json(partial / "metrics.json", metrics)
    write_yaml(partial / "config.yaml", cfg.to_dict())
    write_json(partial / "meta.json", {
        "stage": stage, "key": key, "spec": spec,
        "inputs": {d: {"key": a.key, "path": str(a.path)} for d, a in upstream.items()},
        "data": {"train": [read_manifest(r)["fingerprint"] for r in run.train_roots],
                 "eval": read_manifest(run.eval_root)["fingerprint"]},
        "code_version": code_version(), "torch": torch.__version__, "device": str(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started})
    art = store.publish(stage, key)
    say(f"{stage}: test EPE {test['epe_mm']:.2f} mm, AUC(20-50) {test['auc_20_50']:.3f} -> "
        f"{store.describe(stage, key)}")
    return art


def _metrics(run: StageRun, state: FitState, test: dict, node_spec: dict) -> dict:
    """metrics.json: test metrics, the mean-pose reference, best validation, the history, the
    target's prior strength and calibration where they apply, and with planted channels how
    the first convolution (and a weighted prior) treats them (``diagnostics.planted_split``)."""
    # reference: predicting the training set's mean pose for every test image
    mean_pose = np.broadcast_to(run.train_set.target.mean(0), run.test_set.target.shape)
    baseline = pose_metrics(denormalise(mean_pose, run.test_set.scale), run.test_set.joints,
                            run.test_set.vis)
    metrics = {"test": test, "best_epoch": state.best_epoch, "best_val_epe_mm": state.best_epe,
               "mean_pose_test": {k: baseline[k] for k in ("epe_mm", "auc_20_50")},
               "history": state.history}
    last = state.history[-1].get("diagnostics", {}) if state.history else {}
    strength = last.get("prior_strength")
    if strength:  # the target stage: the prior's strength after the last epoch, over all weights
        metrics["prior_strength"] = {k: strength[k] for k in ("lr", "total_steps", "overall")}
    if run.calibration is not None:
        metrics["calibration"] = run.calibration
    if DEFS[run.stage].prior and run.regularizer is not None and run.regularizer.weighted:
        # the phi this stage trained with: phi_META after its scale and per-weight cap (Fig. 5)
        phi = torch.cat([p.detach().double().flatten().cpu() for p in run.regularizer.phi()])
        metrics["phi_applied"] = {"hist": histogram(phi.numpy()),
                                  "fraction_negative": float((phi < 0).double().mean())}
    if "planted" in node_spec:  # the planted control: does the network, or its prior, ignore them?
        real = models.MODALITY_CHANNELS[DEFS[run.stage].modality]
        prior = run.regularizer if run.regularizer is not None and run.regularizer.weighted else None
        metrics["planted"] = diagnostics.planted_split(run.model, real, prior)
    return metrics


PHI_PERCENTILES = (1, 10, 50, 90, 99)


def phi_summary(reg: Regularizer) -> dict:
    """Distribution of the learned phi (Fig. 5): mean, std, extremes, fraction negative, over
    all of phi and (``layers``) per regularised tensor with the percentiles PHI_PERCENTILES."""
    phi = torch.cat([p.detach().flatten().cpu() for p in reg.phi()])
    layers = {}
    for name, p in zip(reg.names, (p.detach().flatten().double().cpu() for p in reg.phi())):
        q = np.percentile(p.numpy(), PHI_PERCENTILES)
        layers[name] = {"count": p.numel(), "mean": float(p.mean()),
                        "std": float(p.std()) if p.numel() > 1 else 0.0,
                        "fraction_negative": float((p < 0).double().mean()),
                        **{f"p{k}": float(v) for k, v in zip(PHI_PERCENTILES, q)}}
    return {"count": phi.numel(), "mean": float(phi.mean()), "std": float(phi.std()),
            "min": float(phi.min()), "max": float(phi.max()),
            "fraction_negative": float((phi < 0).float().mean()), "layers": layers}


# ---------------------------------------------------------------------------------------------
# Walking a plan
# ---------------------------------------------------------------------------------------------

def train_in_process(node: Node, upstream: dict[str, Artifact], store: Store,
                     on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    """``train_node`` in this process, on ``run.device`` with ``run.threads`` threads."""
    torch.set_num_threads(node.cfg.run.threads or os.cpu_count() or 1)
    return train_node(node, upstream, store, device=resolve_device(node.cfg.run.device),
                      checkpoints=PartialFolder(store, node), on_epoch=on_epoch)


def run_stage(stage: str, cfg: Config, store: Store | None = None,
              on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    """Run ``stage`` (and, first, any upstream stage the store lacks); return its artifact.

    ``on_epoch(epoch, record)``, if given, runs after every epoch of ``stage`` itself (not of its
    inputs) with the epoch's history record (``val`` holds ``epe_mm`` and ``auc_20_50`` where
    the epoch validated), after that epoch's checkpoint: a sweep reports it, and may stop the
    run there (the stage stays unpublished in ``{key}.partial/``, and a rerun resumes it)."""
    return run_plan(plan(stage, cfg), store or Store.of(cfg), on_epoch=on_epoch)


def run_plan(nodes: list[Node], store: Store, train: Callable | None = None,
             on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    """Every node of a plan (upstream first), each a cache hit or trained by ``train``
    (in-process by default); returns the last node's artifact."""
    done: dict[tuple[str, str], Artifact] = {}
    for node in nodes:
        hook = on_epoch if node is nodes[-1] else None
        step = train or functools.partial(train_in_process, on_epoch=hook)
        done[node.id] = run_node(node, store, upstream_of(node, done, store), step)
    return done[nodes[-1].id]


def upstream_of(node: Node, done: dict[tuple[str, str], Artifact],
                store: Store | None = None) -> dict[str, Artifact]:
    """The input artifacts of ``node``: explicit ones, else the finished upstream nodes, else
    (a node run on its own, after its inputs' own tasks) found in ``store`` by key."""
    out = {}
    for d, k in node.inputs.items():
        art = node.given.get(d) or done.get((d, k)) or (store.get(d, k) if store else None)
        if art is None:
            raise RuntimeError(f"{node.stage}: its input {d} {k[:20]} has not been trained")
        out[d] = art
    return out


def run_node(node: Node, store: Store, upstream: dict[str, Artifact],
             train: Callable | None = None) -> Artifact:
    """The artifact of one plan node: a cache hit, or ``train(node, upstream, store)``
    (in-process by default) while this process holds the key's writer lock. A process that finds
    the lock held waits, then takes the cache hit: one writer per key."""
    train = train or train_in_process
    art = store.get(node.stage, node.key)
    if art is not None:
        say(f"{node.stage}: cached {store.describe(node.stage, node.key)}")
        return art
    with writer_lock(store, node.stage, node.key):
        art = store.get(node.stage, node.key)
        if art is not None:
            say(f"{node.stage}: finished by another process, cached "
                f"{store.describe(node.stage, node.key)}")
            return art
        return train(node, upstream, store)
