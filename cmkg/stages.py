"""Stages and the artifact store: the data flow of DESIGN.md as cached, resumable steps.

A *stage* (teacher, student, kd) turns a resolved config and the artifacts of its inputs into
an *artifact*: a folder ``{store}/{stage}/{key}`` holding

    model.pt      best weights (by validation EPE) with arch and modality
    metrics.json  test metrics of those weights, best validation metrics, per-epoch history
    config.yaml   the full resolved config
    meta.json     key, the spec it hashes, input artifact keys, data fingerprints, code
                  version, device, timings

``key`` is the sha256 of the stage's *spec*: only the config entries that change its result
(data, backbone, optimiser, epochs, seed, the keys of its inputs). Re-running an identical stage
is a cache hit, and stages that differ only downstream share their inputs (Table 2's rows share
one teacher). While training, the stage lives in ``{key}.partial/`` with a checkpoint written
atomically after every epoch; rerunning the same command resumes from it, and the finished
folder appears by one rename, so a reader never sees half an artifact.

Nothing here imports Ray: the Ray layer (distributed fits, sweeps, the ablation runner) calls
``run_stage`` or its pieces.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cmkg import __version__, models
from cmkg.atomic import torch_save, write_json, write_yaml
from cmkg.config import Config, DataSpec, digest
from cmkg.data import HandDataset, identity_collate, read_manifest, synth_source, synthesize
from cmkg.errors import DataError, UserError
from cmkg.metrics import denormalise, pose_metrics
from cmkg.train import FitState, distillation_objective, evaluate, fit, regression_objective

STAGE_VERSION = 1  # bump when a stage's meaning changes, to invalidate cached artifacts
DEPENDS = {"teacher": (), "student": (), "kd": ("teacher", "student")}
MODALITY = {"teacher": "depth", "student": "rgb", "kd": "rgb"}


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

    def load_model(self, device: torch.device | str = "cpu") -> models.PoseNet:
        blob = torch.load(self.path / "model.pt", map_location=device, weights_only=True)
        net = models.build(blob["arch"], blob["modality"])
        net.load_state_dict(blob["state_dict"])
        return net.to(device)


def open_artifact(path: str | Path) -> Artifact:
    """A finished stage folder given by path (``inputs.teacher`` and friends)."""
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
    if spec.path is not None:
        return {"fingerprint": read_manifest(spec.path)["fingerprint"]}
    return synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))


def ensure_dataset(spec: DataSpec, cfg: Config) -> Path:
    """The folder of a dataset, rendering a synthetic one into the cache on first use."""
    if spec.path is not None:
        return Path(spec.path)
    source = synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))
    name = f"{spec.domain}-{spec.size}px-n{spec.num}-seed{spec.seed}-{digest(source)[:10]}"
    out = Path(cfg.data.root) / "synth" / name
    synthesize(out, spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split))
    return out


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def stage_spec(stage: str, cfg: Config, inputs: dict[str, str]) -> dict:
    """The config entries that determine a stage's result, plus its input artifact keys."""
    data = {"train": [dataset_identity(cfg.data.source, cfg)]
            + ([dataset_identity(cfg.data.augment, cfg)] if cfg.data.augment else []),
            "eval": dataset_identity(cfg.data.source, cfg)}
    arch = cfg.model.teacher if stage == "teacher" else cfg.model.student
    spec = {"stage": stage, "version": STAGE_VERSION, "data": data, "arch": arch,
            "modality": MODALITY[stage], "optim": asdict(cfg.optim),
            "epochs": getattr(cfg.epochs, stage), "seed": cfg.run.seed, "inputs": inputs}
    if stage == "kd":
        spec["distill"] = asdict(cfg.distill)
    return spec


def stage_key(stage: str, cfg: Config) -> tuple[str, dict, dict[str, Artifact | None]]:
    """(key, spec, inputs) of a stage; inputs are explicit artifacts (``inputs.*``) or None
    where the upstream stage is found (or trained) by its own key."""
    inputs: dict[str, Artifact | None] = {}
    keys: dict[str, str] = {}
    for dep in DEPENDS[stage]:
        explicit = getattr(cfg.inputs, dep)
        inputs[dep] = open_artifact(explicit) if explicit else None
        keys[dep] = inputs[dep].key if inputs[dep] else stage_key(dep, cfg)[0]
    spec = stage_spec(stage, cfg, keys)
    return digest(spec), spec, inputs


class Store:
    """Artifacts on the local file system under ``root/{stage}/{key}``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:20]

    def get(self, stage: str, key: str) -> Artifact | None:
        path = self.final(stage, key)
        return Artifact(stage, key, path) if (path / "meta.json").is_file() else None


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_stage(stage: str, cfg: Config, store: Store | None = None) -> Artifact:
    """Run ``stage`` (and, first, any upstream stage the store lacks); return its artifact."""
    if stage not in DEPENDS:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(DEPENDS)}")
    store = store or Store(cfg.run.store)
    key, spec, inputs = stage_key(stage, cfg)
    done = store.get(stage, key)
    if done is not None:
        _say(f"{stage}: cached {done.path}")
        return done
    upstream = {dep: art or run_stage(dep, cfg, store) for dep, art in inputs.items()}
    return _train(stage, cfg, key, spec, upstream, store)


def _loader(ds, batch_size: int, shuffle: bool, cfg: Config, device: torch.device,
            gen: torch.Generator | None = None):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=gen,
        collate_fn=identity_collate, num_workers=cfg.run.loader_workers,
        persistent_workers=cfg.run.loader_workers > 0, pin_memory=device.type == "cuda")


def _train(stage: str, cfg: Config, key: str, spec: dict, upstream: dict[str, Artifact],
           store: Store) -> Artifact:
    device = resolve_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or os.cpu_count() or 1)
    modality = MODALITY[stage]
    need = ("rgb", "depth") if stage == "kd" else (modality,)

    # -- data ------------------------------------------------------------------------------------
    source = ensure_dataset(cfg.data.source, cfg)
    train_roots = [source] + ([ensure_dataset(cfg.data.augment, cfg)] if cfg.data.augment else [])
    train_set = HandDataset(train_roots, "train", need)
    val_set = HandDataset(source, "val", (modality,))
    test_set = HandDataset(source, "test", (modality,))
    if len(train_set) < cfg.optim.batch_size:
        raise DataError(f"{source}: {len(train_set)} training samples, fewer than one batch "
                        f"(optim.batch_size={cfg.optim.batch_size})")
    gen = torch.Generator().manual_seed(cfg.run.seed)
    train_loader = _loader(train_set, cfg.optim.batch_size, True, cfg, device, gen)
    val_loader = _loader(val_set, 256, False, cfg, device)
    test_loader = _loader(test_set, 256, False, cfg, device)

    # -- models and objective --------------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)
    arch = spec["arch"]
    model = models.build(arch, modality).to(device)
    trainable: torch.nn.Module = model
    if stage == "kd":
        model.load_state_dict(upstream["student"].load_model().state_dict())  # warm start
        teacher = upstream["teacher"].load_model(device).eval().requires_grad_(False)
        adapter = models.activation_adapter(model, teacher).to(device)
        trainable = torch.nn.ModuleDict({"student": model, "adapter": adapter})
        loss_fn = distillation_objective(model, adapter, teacher, **asdict(cfg.distill))
    else:
        loss_fn = regression_objective(model, modality)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=cfg.optim.lr,
                                 weight_decay=cfg.optim.weight_decay)

    # -- resume from the partial folder ----------------------------------------------------------
    final = store.final(stage, key)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    ckpt_path = partial / "checkpoint.pt"
    state = FitState()
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("key") == key:
            trainable.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            state = ckpt["state"]
            gen.set_state(ckpt["loader_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            _say(f"{stage}: resuming {partial} after epoch {state.epoch}/{spec['epochs']}")

    def checkpoint(st: FitState) -> None:
        torch_save(ckpt_path, {"key": key, "model": trainable.state_dict(),
                               "optimizer": optimizer.state_dict(), "state": st,
                               "loader_rng": gen.get_state(), "torch_rng": torch.get_rng_state()})

    # -- fit -------------------------------------------------------------------------------------
    started = time.time()
    _say(f"{stage}: training {arch} on {modality} ({len(train_set)} train / {len(val_set)} val "
         f"samples, {spec['epochs']} epochs, {device}) -> {final}")
    state = fit(trainable, loss_fn, train_loader, optimizer, spec["epochs"], device=device,
                validate=lambda: evaluate(model, val_loader, modality, device),
                eval_every=cfg.run.eval_every, state=state, report=checkpoint, stage=stage,
                progress=cfg.run.progress)

    # -- evaluate the best weights and publish the artifact --------------------------------------
    best = {k[len("student."):] if stage == "kd" else k: v for k, v in state.best_state.items()
            if stage != "kd" or k.startswith("student.")}
    model.load_state_dict(best)
    test = evaluate(model, test_loader, modality, device)
    # reference: predicting the training set's mean pose for every test image
    mean_pose = np.broadcast_to(train_set.target.mean(0), test_set.target.shape)
    baseline = pose_metrics(denormalise(mean_pose, test_set.scale), test_set.joints, test_set.vis)
    torch_save(partial / "model.pt", {"arch": arch, "modality": modality, "state_dict": best})
    write_json(partial / "metrics.json", {
        "test": test, "best_epoch": state.best_epoch, "best_val_epe_mm": state.best_epe,
        "mean_pose_test": {k: baseline[k] for k in ("epe_mm", "auc_20_50")},
        "history": state.history})
    write_yaml(partial / "config.yaml", cfg.to_dict())
    write_json(partial / "meta.json", {
        "stage": stage, "key": key, "spec": spec,
        "inputs": {d: {"key": a.key, "path": str(a.path)} for d, a in upstream.items()},
        "data": {"train": [read_manifest(r)["fingerprint"] for r in train_roots],
                 "eval": read_manifest(source)["fingerprint"]},
        "code_version": code_version(), "torch": torch.__version__, "device": str(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started})
    ckpt_path.unlink(missing_ok=True)
    if final.exists():  # another process finished the same stage first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.rename(partial, final)
    _say(f"{stage}: test EPE {test['epe_mm']:.2f} mm, AUC(20-50) {test['auc_20_50']:.3f} -> {final}")
    return Artifact(stage, key, final)
