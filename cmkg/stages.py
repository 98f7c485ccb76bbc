"""Stages and the artifact store: the data flow of DESIGN.md as cached, resumable steps.

Stages: ``teacher`` (depth, L_REG), ``student`` (RGB, L_REG), ``kd`` (student + L_DIST against the
teacher), ``meta`` (Algorithm 1: the student's distillation fine-tuning while phi is learned)
and ``target`` (Algorithm 2: a fresh student on the target set with F = L_REG + R(theta)).

A stage turns a resolved config and the artifacts of its inputs into an *artifact*: a folder
``{store}/{stage}/{key}`` holding

    model.pt      best weights (by validation EPE) with arch and modality
    phi.pt        (meta) phi_META, the final phi, with its form and parametrisation
    metrics.json  test metrics of those weights, best validation metrics, per-epoch history
    config.yaml   the full resolved config
    meta.json     key, the spec it hashes, input artifact keys, data fingerprints, code
                  version, device, timings

``key`` is the sha256 of the stage's *spec*: only the config entries that change its result
(data, backbone, optimiser, epochs, seed, the keys of its inputs). Re-running an identical stage
is a cache hit, and stages that differ only downstream share their inputs (Table 2's rows share
one teacher and one phi). While training, the stage lives in ``{key}.partial/`` with a
checkpoint written atomically after every epoch; rerunning the same command resumes from it,
and the finished folder appears by one rename, so a reader never sees half an artifact.

``build_stage`` (datasets, networks, objective, optimizers), ``fit`` and the publishing step are
separate so the Ray layer can run them inside its workers. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from cmkg import __version__, diagnostics, models, parallel, regularizers, storage
from cmkg.atomic import atomic_path, torch_save, write_json, write_yaml
from cmkg.config import Config, DataSpec, digest
from cmkg.data import HandDataset, identity_collate, read_manifest, synth_source, synthesize
from cmkg.data.dataset import prepare_batch
from cmkg.errors import DataError, UserError
from cmkg.losses import DEFAULT_REDUCTION
from cmkg.meta import check_phi, meta_iteration, phi_bounds
from cmkg.metrics import denormalise, pose_metrics
from cmkg.regularizers import WEIGHTED, Regularizer
from cmkg.train import (
    FitState,
    distillation_objective,
    evaluate,
    fit,
    regression_objective,
    regularized_objective,
)

STAGE_VERSION = 2  # bump when a stage's meaning changes, to invalidate cached artifacts
# 2: run.eval_every in the key (it decides which epoch's weights are kept)
STAGES = ("teacher", "student", "kd", "meta", "target")
MODALITY = {"teacher": "depth", "student": "rgb", "kd": "rgb", "meta": "rgb", "target": "rgb"}


def depends(stage: str, cfg: Config) -> tuple[str, ...]:
    """Upstream stages: kd and meta fine-tune the student against the teacher; the target
    stage needs a learned prior only for the weighted regularizers."""
    if stage in ("kd", "meta"):
        return ("teacher", "student")
    if stage == "target" and cfg.regularizer.form in WEIGHTED:
        return ("meta",)
    return ()


@dataclass
class Artifact:
    stage: str
    key: str
    path: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def load_phi(self) -> Regularizer:
        """The learned prior of a meta stage (Eq. 10), phi frozen."""
        if not (self.path / "phi.pt").is_file():
            raise DataError(f"{self.path}: not a meta stage folder (no phi.pt)")
        state = torch.load(self.path / "phi.pt", map_location="cpu", weights_only=True)
        return Regularizer.from_phi_state(state).requires_grad_(False)

    def load_model(self, device: torch.device | str = "cpu") -> models.PoseNet:
        blob = torch.load(self.path / "model.pt", map_location=device, weights_only=True)
        net = models.build(blob["arch"], blob["modality"])
        net.load_state_dict(blob["state_dict"])
        return net.to(device)


def open_artifact(path: str | Path, cfg: Config | None = None, key: str = "inputs") -> Artifact:
    """A finished stage folder given by path or URI (``inputs.teacher``, ``regularizer.prior``);
    a URI is mirrored into ``{data.root}/artifacts`` first."""
    if storage.is_uri(path):
        root = Path(cfg.data.root if cfg else "data") / "artifacts"
        path = storage.mirror(str(path), root, key, storage.COMMIT_FILE)
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a finished cmkg stage folder ({e})") from None
    return Artifact(meta["stage"], meta["key"], path)


@functools.cache
def code_version() -> str:
    """git commit of the working tree (``-dirty`` if modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return __version__


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name}: CUDA is not available on this machine")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def dataset_identity(spec: DataSpec, cfg: Config) -> dict:
    """What a stage key records of a dataset: the generator config (content address of a
    synthetic set, known before rendering) or the fingerprint of a shard folder."""
    if storage.is_uri(spec.path):  # read the remote manifest only; the shards come later
        fs, path = storage.open_uri(spec.path, "data path")
        try:
            manifest = json.loads(storage.read_bytes(fs, f"{path}/manifest.json"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{spec.path}: not a readable cmkg dataset ({e})") from None
        return {"fingerprint": manifest["fingerprint"]}
    if spec.path is not None:
        return {"fingerprint": read_manifest(spec.path)["fingerprint"]}
    return synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))


def ensure_dataset(spec: DataSpec, cfg: Config) -> Path:
    """The local folder of a dataset: a synthetic one is rendered into ``data.root`` on first
    use, one given by URI is downloaded into ``{data.root}/remote`` on first use."""
    if storage.is_uri(spec.path):
        return storage.mirror(spec.path, Path(cfg.data.root) / "remote", "data path",
                              "manifest.json")
    if spec.path is not None:
        return Path(spec.path)
    source = synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))
    name = f"{spec.domain}-{spec.size}px-n{spec.num}-seed{spec.seed}-{digest(source)[:10]}"
    out = Path(cfg.data.root) / "synth" / name
    synthesize(out, spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))
    return out


def stage_datasets(stage: str, cfg: Config) -> list[DataSpec]:
    """The datasets a stage reads."""
    if stage == "target":
        return [cfg.data.target]
    return [cfg.data.source] + ([cfg.data.augment] if cfg.data.augment else [])


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def stage_spec(stage: str, cfg: Config, inputs: dict[str, str]) -> dict:
    """The config entries that determine a stage's result, plus its input artifact keys."""
    if stage == "target":
        data = {"train": [dataset_identity(cfg.data.target, cfg)],
                "eval": dataset_identity(cfg.data.target, cfg)}
    else:
        data = {"train": [dataset_identity(cfg.data.source, cfg)]
                + ([dataset_identity(cfg.data.augment, cfg)] if cfg.data.augment else []),
                "eval": dataset_identity(cfg.data.source, cfg)}
    arch = cfg.model.teacher if stage == "teacher" else cfg.model.student
    spec = {"stage": stage, "version": STAGE_VERSION, "data": data, "arch": arch,
            "modality": MODALITY[stage], "optim": asdict(cfg.optim),
            "epochs": getattr(cfg.epochs, stage), "eval_every": cfg.run.eval_every,
            "seed": cfg.run.seed, "inputs": inputs}
    r = cfg.regularizer
    if stage in ("kd", "meta"):
        spec["distill"] = asdict(cfg.distill)
    if stage == "meta":
        spec["meta"] = asdict(cfg.meta)
        spec["regularizer"] = {"form": r.form, "params": r.params, "phi_param": r.phi_param,
                               "phi_init": r.phi_init, "phi_clip": r.phi_clip}
    if stage == "target":
        spec["regularizer"] = {"form": r.form, "params": r.params}
        if r.form in ("l1", "l2"):
            spec["regularizer"]["sigma"] = r.sigma
        if r.form in WEIGHTED and r.calibrate_d is not None:  # absent: keys stay as before
            spec["regularizer"].update(calibrate_d=r.calibrate_d, d_cap=r.d_cap)
    # the loss reductions of the terms a stage uses enter its key only where they differ from
    # the defaults: the defaults are the behaviour from before reductions were a choice, so the
    # keys (and cached artifacts) of default runs stay what they were
    terms = ("reg", "act", "att") if stage in ("kd", "meta") else ("reg",)
    reduction = {t: getattr(cfg.reduction, t) for t in terms}
    if any(reduction[t] != DEFAULT_REDUCTION[t] for t in terms):
        spec["reduction"] = reduction
    return spec


def _explicit_input(dep: str, cfg: Config) -> str | None:
    return cfg.regularizer.prior if dep == "meta" else getattr(cfg.inputs, dep)


@dataclass
class Node:
    """One step of a plan: a stage, its key and spec, the config it runs with, and its inputs
    (upstream stage -> key; ``given`` holds the inputs named explicitly by path)."""

    stage: str
    key: str
    spec: dict
    cfg: Config
    inputs: dict[str, str]
    given: dict[str, Artifact]

    @property
    def id(self) -> tuple[str, str]:
        return self.stage, self.key


def plan(stage: str, cfg: Config) -> list[Node]:
    """The unique nodes ``stage`` needs, upstream first, ``stage`` last (each (stage, key) once).

    This is the only walk of the stage graph: single-stage runs (``run_stage``), Ray Train runs,
    sweeps and the ablation runner (which unions the plans of its cells) all use it. Explicit
    inputs (``inputs.teacher``, ``inputs.student``, ``regularizer.prior``) end the walk."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    nodes: list[Node] = []
    keys: dict[str, str] = {}
    given: dict[str, Artifact] = {}
    for dep in depends(stage, cfg):
        explicit = _explicit_input(dep, cfg)
        if explicit:
            role = "regularizer.prior" if dep == "meta" else f"inputs.{dep}"
            given[dep] = open_artifact(explicit, cfg, role)
            keys[dep] = given[dep].key
            continue
        sub = plan(dep, cfg)
        nodes += [n for n in sub if n.id not in {m.id for m in nodes}]
        keys[dep] = sub[-1].key
    spec = stage_spec(stage, cfg, keys)
    nodes.append(Node(stage, digest(spec), spec, cfg, keys, given))
    return nodes


def stage_key(stage: str, cfg: Config) -> tuple[str, dict, dict[str, Artifact | None]]:
    """(key, spec, inputs) of a stage; inputs are explicit artifacts or None where the upstream
    stage is found (or trained) by its own key. A view of the last node of ``plan``."""
    node = plan(stage, cfg)[-1]
    return node.key, node.spec, {d: node.given.get(d) for d in node.inputs}


class Store:
    """Artifacts under ``root/{stage}/{key[:20]}``: a local folder, or a pyarrow filesystem URI
    mirrored into the local ``cache`` (see ``cmkg.storage``). ``final`` is always the local
    folder a stage publishes into and readers open."""

    def __init__(self, root: str | Path, cache: str | Path | None = None,
                 filesystem: pafs.FileSystem | None = None):
        self.uri = str(root)
        self.fs, self.base = None, None
        if filesystem is not None:
            self.fs, self.base = filesystem, str(root).rstrip("/")
        elif storage.is_uri(root):
            self.fs, self.base = storage.open_uri(str(root), "run.store")
        if self.fs is None:
            self.root = Path(root)
        else:
            default = Path("~/.cache/cmkg/store") / storage.short_hash(self.uri)
            self.root = Path(cache or default).expanduser()

    @classmethod
    def of(cls, cfg: Config) -> Store:
        return cls(cfg.run.store, cfg.run.cache)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:20]

    def location(self, stage: str, key: str) -> str:
        """Where the artifact lives for users: the remote path, or the local folder."""
        return f"{self.base}/{stage}/{key[:20]}" if self.remote else str(self.final(stage, key))

    def describe(self, stage: str, key: str) -> str:
        """The artifact's place for messages: ``scheme://path`` (no credentials) or a folder."""
        if self.remote:
            return f"{self.uri.split('://', 1)[0]}://{self.location(stage, key)}"
        return str(self.final(stage, key))

    def get(self, stage: str, key: str) -> Artifact | None:
        path = self.final(stage, key)
        if (path / storage.COMMIT_FILE).is_file():
            self.commit(stage, key)  # a mirror whose upload was interrupted: finish it
            return Artifact(stage, key, path)
        if self.remote and storage.exists(self.fs, f"{self.location(stage, key)}/"
                                                   f"{storage.COMMIT_FILE}"):
            storage.download_dir(self.fs, self.location(stage, key), path)
            return Artifact(stage, key, path)
        return None

    def commit(self, stage: str, key: str) -> None:
        """Upload a published local artifact to a remote store (no-op for a local one)."""
        if not self.remote:
            return
        where = self.location(stage, key)
        if not storage.exists(self.fs, f"{where}/{storage.COMMIT_FILE}"):
            storage.upload_dir(self.final(stage, key), self.fs, where)
        if storage.exists(self.fs, f"{where}.partial"):  # the resumable checkpoint is spent
            self.fs.delete_dir(f"{where}.partial")

    def push_checkpoint(self, stage: str, key: str, local: Path) -> None:
        """Copy the in-process checkpoint to the remote store, so another machine can resume."""
        if self.remote:
            where = f"{self.location(stage, key)}.partial/{local.name}"
            storage.upload_file(local, self.fs, where)

    def pull_checkpoint(self, stage: str, key: str, local: Path) -> None:
        """Fetch the remote checkpoint when this machine has none."""
        remote = f"{self.location(stage, key)}.partial/{local.name}"
        if self.remote and not local.is_file() and storage.exists(self.fs, remote):
            with atomic_path(local) as tmp:
                pafs.copy_files(remote, str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Train's checkpoints: ``{root}/_ray``."""
        if self.remote:
            return f"{self.base}/_ray", self.fs
        return str(self.root.resolve() / "_ray"), None


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_stage(stage: str, cfg: Config, store: Store | None = None,
              on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    """Run ``stage`` (and, first, any upstream stage the store lacks); return its artifact.

    ``on_epoch(epoch, record)``, if given, runs after every epoch of ``stage`` itself (not of its
    inputs) with the epoch's history record (``val`` holds ``epe_mm`` and ``auc_20_50`` where
    the epoch validated), after that epoch's checkpoint: a sweep reports it, and may stop the
    run there (the stage stays unpublished in ``{key}.partial/``, and a rerun resumes it)."""
    store = store or Store.of(cfg)
    done: dict[tuple[str, str], Artifact] = {}
    nodes = plan(stage, cfg)
    for node in nodes:
        hook = on_epoch if node is nodes[-1] else None
        done[node.id] = run_node(node, store, upstream_of(node, done), on_epoch=hook)
    return done[node.id]


def upstream_of(node: Node, done: dict[tuple[str, str], Artifact]) -> dict[str, Artifact]:
    """The input artifacts of ``node``: explicit ones, else the finished upstream nodes."""
    return {d: node.given.get(d) or done[(d, k)] for d, k in node.inputs.items()}


def run_node(node: Node, store: Store, upstream: dict[str, Artifact],
             train: Callable | None = None,
             on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    """The artifact of one plan node: a cache hit, or trained by ``train`` (in-process by
    default, calling ``on_epoch`` after each epoch) while this process holds the key's writer
    lock. A process that finds the lock held waits, then takes the cache hit: one writer per
    key."""
    train = train or functools.partial(_train, on_epoch=on_epoch)
    art = store.get(node.stage, node.key)
    if art is not None:
        _say(f"{node.stage}: cached {store.describe(node.stage, node.key)}")
        return art
    with writer_lock(store, node.stage, node.key):
        art = store.get(node.stage, node.key)
        if art is not None:
            _say(f"{node.stage}: finished by another process, cached "
                 f"{store.describe(node.stage, node.key)}")
            return art
        return train(node.stage, node.cfg, node.key, node.spec, upstream, store)


@contextlib.contextmanager
def writer_lock(store: Store, stage: str, key: str):
    """Exclusive right to train ``stage``/``key``: a POSIX lock (``lockf``) on
    ``{store}/{stage}/{key}.lock`` beside the artifact. The kernel (or the NFS lock manager)
    drops it when its owner dies, so a lock is never stale; the file names the owner for the
    waiting side's message. With a remote store the lock lives in this machine's mirror and
    excludes writers on this machine only (publishing stays safe: the first ``meta.json`` wins)."""
    final = store.final(stage, key)
    lock = final.with_name(final.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            _say(f"{stage}: {owner} is training {key[:20]}; waiting for it")
            fcntl.lockf(f, fcntl.LOCK_EX)  # blocks until the owner publishes, fails or dies
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.lockf(f, fcntl.LOCK_UN)


def _loader(ds, batch_size: int, shuffle: bool, cfg: Config, device: torch.device,
            gen: torch.Generator | None = None):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=gen,
        collate_fn=identity_collate, num_workers=cfg.run.loader_workers,
        persistent_workers=cfg.run.loader_workers > 0, pin_memory=device.type == "cuda")


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


def build_stage(stage: str, cfg: Config, spec: dict, upstream: dict[str, Artifact],
                device: torch.device, wrap: Callable | None = None) -> StageRun:
    """Datasets, networks, objective and optimizers of a stage (Sect. 3, Algorithms 1-2).

    ``wrap`` (e.g. Ray Train's ``prepare_model``, i.e. DDP) wraps the trainable module of the
    teacher, student, kd and target stages before their objectives are built on it; the meta
    stage never takes it (Algorithm 1 averages its gradients by hand)."""
    wrap = wrap or (lambda m: m)
    modality = MODALITY[stage]
    # -- data ------------------------------------------------------------------------------------
    if stage == "target":
        eval_root = ensure_dataset(cfg.data.target, cfg)
        train_roots = [eval_root]
    else:
        eval_root = ensure_dataset(cfg.data.source, cfg)
        train_roots = [eval_root] + ([ensure_dataset(cfg.data.augment, cfg)]
                                     if cfg.data.augment else [])
    need = ("rgb", "depth") if stage in ("kd", "meta") else (modality,)
    train_set = HandDataset(train_roots, "train", need)
    if len(train_set) < cfg.optim.batch_size:
        raise DataError(f"{train_roots[0]}: {len(train_set)} training samples, fewer than one "
                        f"batch (optim.batch_size={cfg.optim.batch_size})")
    val_set = HandDataset(eval_root, "val", (modality,))
    test_set = HandDataset(eval_root, "test", (modality,))

    # -- networks and objective ------------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)
    model = models.build(spec["arch"], modality).to(device)
    adam = lambda params: torch.optim.Adam(  # noqa: E731
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    run = StageRun(stage, model, model, [], None, None, train_set, val_set, test_set,
                   train_roots, eval_root)
    if stage in ("teacher", "student"):
        run.wrapped = wrap(model)
        run.loss_fn = regression_objective(run.wrapped, modality, reduction=asdict(cfg.reduction))
        run.optimizers = [adam(model.parameters())]
    elif stage in ("kd", "meta"):
        model.load_state_dict(upstream["student"].load_model().state_dict())  # warm start
        teacher = upstream["teacher"].load_model(device).eval().requires_grad_(False)
        adapter = models.activation_adapter(model, teacher).to(device)
        if stage == "kd":
            run.trainable = models.StudentWithAdapter(model, adapter)
            run.optimizers = [adam(run.trainable.parameters())]
            run.wrapped = wrap(run.trainable)
            run.loss_fn = distillation_objective(run.wrapped, teacher, **asdict(cfg.distill),
                                                 reduction=asdict(cfg.reduction))
            run.diagnose = diagnostics.distill_diagnose(  # on the bare modules: no DDP collectives
                distillation_objective(run.trainable, teacher, **asdict(cfg.distill),
                                       reduction=asdict(cfg.reduction)),
                diagnostics.fixed_batch(train_set, cfg.optim.batch_size, device), model,
                cfg.distill.lambda_att)
        else:  # no DDP for Algorithm 1: gradients are averaged by hand (parallel.mean_across)
            run.trainable = torch.nn.ModuleDict({"student": model, "adapter": adapter})
            run.optimizers = [adam(run.trainable.parameters())]
            r, m = cfg.regularizer, cfg.meta
            if r.form not in WEIGHTED:
                raise UserError(f"regularizer.form={r.form}: the meta stage learns phi of a "
                                f"weighted form ({', '.join(WEIGHTED)})")
            reg = regularizers.build(r.form, model, params=r.params, phi_param=r.phi_param,
                                     phi_init=r.phi_init).to(device)
            run.regularizer = reg
            run.trainable["phi"] = reg
            phi_opt = (torch.optim.SGD(reg.parameters(), lr=m.beta) if m.phi_optimizer == "sgd"
                       else torch.optim.Adam(reg.parameters(), lr=m.beta))
            run.optimizers.append(phi_opt)
            clip = tuple(r.phi_clip) if r.phi_clip else phi_bounds(m.alpha)
            run.update = lambda batch: meta_iteration(
                model, adapter, teacher, reg, batch, run.optimizers[0], phi_opt, alpha=m.alpha,
                steps=m.inner_steps, first_order=m.first_order, phi_clip=clip,
                reduce=parallel.mean_across, **asdict(cfg.distill), reduction=asdict(cfg.reduction))
            run.diagnose = diagnostics.meta_diagnose(
                model, adapter, teacher, diagnostics.fixed_batch(train_set, cfg.optim.batch_size,
                                                                 device),
                **asdict(cfg.distill), reduction=asdict(cfg.reduction))
    else:  # target: a fresh student, F = L_REG + R(theta; phi_META) (Algorithm 2)
        r = cfg.regularizer
        if r.form in WEIGHTED:
            reg = upstream["meta"].load_phi()
            if reg.form != r.form:
                raise UserError(f"regularizer.form={r.form} but the prior "
                                f"{upstream['meta'].path} holds {reg.form}")
            named = dict(model.named_parameters())
            wanted = regularizers.regularised_names(model, r.params)
            held = dict(zip(reg.names, (t.shape for t in reg.raw)))
            bad = sorted(set(wanted) ^ set(held)) or [
                n for n in wanted if held[n] != named[n].shape]
            if bad:
                raise UserError(f"regularizer.prior {upstream['meta'].path}: phi does not fit "
                                f"the {spec['arch']} student (first mismatch: {bad[0]})")
        else:
            reg = regularizers.build(r.form, model, params=r.params, sigma=r.sigma)
        run.regularizer = reg = reg.to(device)
        if r.form in WEIGHTED and r.calibrate_d is not None:
            run.calibration = calibrate(run, cfg, spec, device)
        run.wrapped = wrap(model)
        run.loss_fn = regularized_objective(run.wrapped, reg, model,
                                            reduction=asdict(cfg.reduction))
        run.optimizers = [adam(model.parameters())]
        run.diagnose = diagnostics.target_diagnose(  # on the bare model: no DDP collectives
            regularized_objective(model, reg, reduction=asdict(cfg.reduction)),
            diagnostics.fixed_batch(train_set, cfg.optim.batch_size, device), model, reg,
            run.optimizers[0])
    if run.wrapped is None:
        run.wrapped = run.trainable
    return run


def calibrate(run: StageRun, cfg: Config, spec: dict, device: torch.device) -> dict:
    """The calibrated prior (``regularizer.calibrate_d``): scale phi_META of the target stage so
    that its median |D| at the fresh student's weights is the set value (``diagnostics.
    calibrate_prior``), with s from a fixed draw of training batches and K = epochs x steps of a
    one-process run. Deterministic, draws nothing from torch's generators, so every data-parallel
    worker computes the same phi."""
    r, bs = cfg.regularizer, cfg.optim.batch_size
    n = min(diagnostics.CALIBRATION_BATCHES, len(run.train_set) // bs)
    order = np.random.default_rng(cfg.run.seed).permutation(len(run.train_set))
    batches = [prepare_batch(run.train_set.__getitems__(np.sort(order[i * bs:(i + 1) * bs])),
                             device) for i in range(n)]
    total_steps = spec["epochs"] * (len(run.train_set) // bs)
    info = diagnostics.calibrate_prior(
        run.regularizer, run.model, batches, lr=cfg.optim.lr, total_steps=total_steps,
        d_target=r.calibrate_d, d_cap=r.d_cap, reduction=cfg.reduction.reg)
    m = cfg.meta
    if r.phi_param == "free" and r.phi_init == 0 and m.phi_optimizer == "sgd":
        info["beta_equivalent"] = m.beta * info["scale"]  # Algorithm 1's beta, to first order
    reached = "" if info["d_median"] > 0.99 * r.calibrate_d else (
        f" (set {r.calibrate_d:g}: beyond what Adam's normalisation allows at this lr x steps)")
    _say(f"target: calibrated prior: phi_META x {info['scale']:.3g} -> median |D| "
         f"{info['d_median']:.3g}{reached} (was {info['d_median_before']:.3g}), "
         f"{100 * info['fraction_capped']:.1f} % of weights capped at |D| = {r.d_cap}")
    return info


def make_loaders(run: StageRun, cfg: Config, device: torch.device, gen: torch.Generator):
    """Train (shuffled with ``gen``), val and test loaders of a built stage."""
    return (_loader(run.train_set, cfg.optim.batch_size, True, cfg, device, gen),
            _loader(run.val_set, 256, False, cfg, device),
            _loader(run.test_set, 256, False, cfg, device))


def checkpoint_blob(run: StageRun, key: str, state: FitState, gen: torch.Generator) -> dict:
    """Everything a resumed run needs: model(s), optimizers, phi, fit state, RNG states."""
    return {"key": key, "model": run.trainable.state_dict(),
            "optimizers": [o.state_dict() for o in run.optimizers], "state": state,
            "loader_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}


def restore(run: StageRun, blob: dict, key: str, gen: torch.Generator) -> FitState | None:
    """Load a checkpoint blob of the same stage key into ``run``; None if it is another's."""
    if blob.get("key") != key:
        return None
    run.trainable.load_state_dict(blob["model"])
    for opt, st in zip(run.optimizers, blob["optimizers"]):
        opt.load_state_dict(st)
    gen.set_state(blob["loader_rng"])
    torch.set_rng_state(blob["torch_rng"])
    return blob["state"]


def partial_dir(store: Store, stage: str, key: str) -> tuple[Path, Path]:
    final = store.final(stage, key)
    return final, final.with_name(final.name + ".partial")


def _train(stage: str, cfg: Config, key: str, spec: dict, upstream: dict[str, Artifact],
           store: Store, on_epoch: Callable[[int, dict], None] | None = None) -> Artifact:
    device = resolve_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or os.cpu_count() or 1)
    run = build_stage(stage, cfg, spec, upstream, device)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    train_loader, val_loader, test_loader = make_loaders(run, cfg, device, gen)

    # -- resume from the partial folder ----------------------------------------------------------
    final, partial = partial_dir(store, stage, key)
    partial.mkdir(parents=True, exist_ok=True)
    ckpt_path = partial / "checkpoint.pt"
    store.pull_checkpoint(stage, key, ckpt_path)
    state = FitState()
    if ckpt_path.is_file():
        resumed = restore(run, torch.load(ckpt_path, map_location=device, weights_only=False),
                          key, gen)
        if resumed is not None:
            state = resumed
            _say(f"{stage}: resuming {partial} after epoch {state.epoch}/{spec['epochs']}")

    def checkpoint(st: FitState) -> None:
        if stage == "meta":
            check_phi(run.regularizer, stage, st.epoch)
        torch_save(ckpt_path, checkpoint_blob(run, key, st, gen))
        store.push_checkpoint(stage, key, ckpt_path)
        if on_epoch is not None:  # after the checkpoint: a caller stopping here can resume it
            on_epoch(st.epoch, st.history[-1])

    # -- fit -------------------------------------------------------------------------------------
    started = time.time()
    _say(f"{stage}: training {spec['arch']} on {MODALITY[stage]} ({len(run.train_set)} train / "
         f"{len(run.val_set)} val samples, {spec['epochs']} epochs, {device}) -> "
         f"{store.describe(stage, key)}")
    from cmkg.errors import NumericalError

    try:
        state = fit_stage(run, cfg, spec, train_loader, val_loader, device, state, checkpoint)
    except NumericalError:  # a diverged run is nothing to resume: leave no partial behind
        shutil.rmtree(partial, ignore_errors=True)
        if store.remote and storage.exists(store.fs, f"{store.location(stage, key)}.partial"):
            store.fs.delete_dir(f"{store.location(stage, key)}.partial")
        raise
    return publish(run, cfg, key, spec, upstream, state, test_loader, store, device, started)


def fit_stage(run: StageRun, cfg: Config, spec: dict, train_loader, val_loader,
              device: torch.device, state: FitState, report: Callable) -> FitState:
    """``fit()`` with the stage's objective or update step, validating on the eval set and,
    where the stage has a ``diagnose`` hook, measuring its terms after every epoch."""
    total_steps = spec["epochs"] * len(train_loader)  # K of the prior's figure D: this run's steps
    return fit(run.wrapped, run.loss_fn, train_loader,
               run.optimizers[0] if run.update is None else None, spec["epochs"],
               device=device, update=run.update,
               validate=lambda: evaluate(run.model, val_loader, MODALITY[run.stage], device),
               eval_every=cfg.run.eval_every, state=state, report=report, stage=run.stage,
               progress=cfg.run.progress,
               diagnose=None if run.diagnose is None else lambda: run.diagnose(total_steps))


def publish(run: StageRun, cfg: Config, key: str, spec: dict, upstream: dict[str, Artifact],
            state: FitState, test_loader, store: Store, device: torch.device,
            started: float) -> Artifact:
    """Evaluate the best weights on the test split and publish the artifact with one rename
    (then, for a remote store, upload it)."""
    stage, modality = run.stage, MODALITY[run.stage]
    final, partial = partial_dir(store, stage, key)
    partial.mkdir(parents=True, exist_ok=True)
    prefix = "student." if run.trainable is not run.model else ""
    best = {k[len(prefix):]: v for k, v in state.best_state.items() if k.startswith(prefix)}
    run.model.load_state_dict(best)
    test = evaluate(run.model, test_loader, modality, device)
    # reference: predicting the training set's mean pose for every test image
    mean_pose = np.broadcast_to(run.train_set.target.mean(0), run.test_set.target.shape)
    baseline = pose_metrics(denormalise(mean_pose, run.test_set.scale), run.test_set.joints,
                            run.test_set.vis)
    metrics = {"test": test, "best_epoch": state.best_epoch, "best_val_epe_mm": state.best_epe,
               "mean_pose_test": {k: baseline[k] for k in ("epe_mm", "auc_20_50")},
               "history": state.history}
    torch_save(partial / "model.pt", {"arch": spec["arch"], "modality": modality,
                                      "state_dict": best})
    if stage == "meta":  # phi_META = phi_K, the final phi (Algorithm 1, line 12)
        torch_save(partial / "phi.pt", run.regularizer.phi_state())
        metrics["phi"] = phi_summary(run.regularizer)
    last = state.history[-1].get("diagnostics", {}) if state.history else {}
    strength = last.get("prior_strength")
    if strength:  # the target stage: the prior's strength after the last epoch, over all weights
        metrics["prior_strength"] = {k: strength[k] for k in ("lr", "total_steps", "overall")}
    if run.calibration is not None:
        metrics["calibration"] = run.calibration
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
    (partial / "checkpoint.pt").unlink(missing_ok=True)
    if final.exists():  # another process finished the same stage first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.rename(partial, final)
    store.commit(stage, key)
    _say(f"{stage}: test EPE {test['epe_mm']:.2f} mm, AUC(20-50) {test['auc_20_50']:.3f} -> "
         f"{store.describe(stage, key)}")
    return Artifact(stage, key, final)


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
