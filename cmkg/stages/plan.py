"""Stage keys and the plan: which stages a run needs, each named by the hash of what decides
its result.

``key`` is the sha256 of the stage's *spec*: only the config entries that change its result
(data, backbone, optimiser, epochs, seed, the keys of its inputs). Re-running an identical stage
is a cache hit, and stages that differ only downstream share their inputs (Table 2's rows share
one teacher and one phi). ``plan`` is the only walk of the stage graph; a planned ``Node``
carries its config, spec and inputs, and is what every executor runs (in this process, in a
Ray task, under Ray Train) without planning again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from cmkg import storage
from cmkg.config import Config, DataSpec, averaged_epochs, digest, knobs_of
from cmkg.data import read_manifest, synth_source
from cmkg.errors import DataError, UserError
from cmkg.forms import uses_sigma, weighted
from cmkg.losses import DEFAULT_REDUCTION
from cmkg.stages.artifacts import Artifact, open_artifact
from cmkg.stages.defs import DEFS, STAGES, depends, planted, prior_input, stage_arch, stage_datasets

STAGE_VERSION = 2  # bump when a stage's meaning changes, to invalidate cached artifacts
# 2: run.eval_every in the key (it decides which epoch's weights are kept)


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
    return synth_source(spec.domain, spec.num, spec.size, spec.seed, tuple(cfg.data.split),
                        knobs_of(spec, cfg))


def stage_spec(stage: str, cfg: Config, inputs: dict[str, str]) -> dict:
    """The config entries that determine a stage's result, plus its input artifact keys."""
    d = DEFS[stage]
    specs = stage_datasets(stage, cfg)
    data = {"train": [dataset_identity(s, cfg) for s in specs],
            "eval": dataset_identity(specs[0], cfg)}
    spec = {"stage": stage, "version": STAGE_VERSION, "data": data, "arch": stage_arch(stage, cfg),
            "modality": d.modality, "optim": _optim(cfg, getattr(cfg.epochs, stage)),
            "epochs": getattr(cfg.epochs, stage), "eval_every": cfg.run.eval_every,
            "seed": cfg.run.seed, "inputs": inputs}
    if planted(stage, cfg) is not None:  # a positive control; absent when off: keys as before
        spec["planted"] = asdict(cfg.data.planted)
        if d.data != "target":  # the cue acts on the target's train split only
            del spec["planted"]["cue"]
        if d.data == "target" or not cfg.data.planted.source_cue:  # since: absent at 0
            del spec["planted"]["source_cue"]
    r = cfg.regularizer
    teacher = d.paired and (not d.learns_prior or cfg.meta.teacher)  # uses the teacher's terms
    if teacher:
        spec["distill"] = asdict(cfg.distill)
    if d.learns_prior:
        spec["meta"] = _meta(cfg)
        spec["regularizer"] = {"form": r.form, "params": r.params, "phi_param": r.phi_param,
                               "phi_init": r.phi_init, "phi_clip": r.phi_clip}
    if d.prior:
        spec["regularizer"] = {"form": r.form, "params": r.params}
        if uses_sigma(r.form):  # the form's row says sigma scales it (cmkg.forms)
            spec["regularizer"]["sigma"] = r.sigma
        if weighted(r.form) and r.calibrate_d is not None:  # absent: keys stay as before
            spec["regularizer"].update(calibrate_d=r.calibrate_d, d_cap=r.d_cap)
        if weighted(r.form):
            spec["regularizer"].update(_applied_prior(cfg))
        if weighted(r.form) and r.phi_source != "meta":  # absent at meta: keys as before
            spec["regularizer"].update(phi_source=r.phi_source, phi_eps=r.phi_eps)
    # the loss reductions of the terms a stage uses enter its key only where they differ from
    # the defaults: the defaults are the behaviour from before reductions were a choice, so the
    # keys (and cached artifacts) of default runs stay what they were
    terms = ("reg", "act", "att") if teacher else ("reg",)
    reduction = {t: getattr(cfg.reduction, t) for t in terms}
    if any(reduction[t] != DEFAULT_REDUCTION[t] for t in terms):
        spec["reduction"] = reduction
    return spec


# optim entries added after keys existed: in a stage's key only where they differ from these
# defaults (the behaviour from before they were a choice), so default runs keep their keys
OPTIM_SINCE = {"schedule": "constant", "keep": "best_val"}
# optim entries read only with one keep: in the key with that keep alone
OPTIM_WITH_KEEP = {"average_epochs": "average"}


def _optim(cfg: Config, epochs: int) -> dict:
    """The optim section of a stage of ``epochs`` epochs as its key records it. With
    ``keep: average``, ``average_epochs`` is the count the stage averages (0 resolved to its
    last half), so two spellings of the same average share a key."""
    out = {k: v for k, v in asdict(cfg.optim).items()
           if (k not in OPTIM_SINCE or v != OPTIM_SINCE[k])
           and OPTIM_WITH_KEEP.get(k, cfg.optim.keep) == cfg.optim.keep}
    if "average_epochs" in out:
        out["average_epochs"] = averaged_epochs(out["average_epochs"], epochs)
    return out


# meta entries added after keys existed (the phi diagnostics' variants): in the meta stage's
# key only where they differ from these defaults, so Algorithm 1 as the paper runs it keeps its
# keys. meta.order_seed equal to run.seed is the default order, and hashed as the default.
META_SINCE = {"teacher": True, "order_seed": None, "subset": "all", "solve": "iterate"}
# what meta.solve=fixed_point never reads (no meta-gradient step): not in its key
META_ITERATE_ONLY = ("inner_steps", "alpha", "beta", "phi_optimizer", "first_order")


def _meta(cfg: Config) -> dict:
    m = asdict(cfg.meta)
    if m["order_seed"] == cfg.run.seed:
        m["order_seed"] = None
    if m["solve"] == "fixed_point":
        m = {k: v for k, v in m.items() if k not in META_ITERATE_ONLY}
        m["phi_eps"] = cfg.regularizer.phi_eps
    return {k: v for k, v in m.items() if k not in META_SINCE or v != META_SINCE[k]}


def _applied_prior(cfg: Config) -> dict:
    """How the target applies phi_META (strength, sign, control; ``regularizers.applied``):
    each entry only where it differs from its default (the paper's phi as learned), so the keys
    of the runs from before these settings existed stay what they were. A strength of 1 is the
    default written out (phi_META times 1, bit for bit): a sweep's best trial at strength 1
    names the same stage as the paper's row."""
    r = cfg.regularizer
    strength = None if r.strength == 1 else r.strength
    out = {k: v for k, v, default in (("strength", strength, None), ("sign", r.sign, "learned"),
                                      ("phi_control", r.phi_control, "none")) if v != default}
    if r.phi_control == "other_seed":
        out["prior_seed"] = prior_seed(cfg)
    return out


def prior_seed(cfg: Config) -> int:
    """The seed whose meta stage supplies the target's phi: ``run.seed`` itself, except with
    ``regularizer.phi_control: other_seed``: ``regularizer.prior_seed``, by default the previous
    seed (run.seed - 1; seed 0 takes seed 1), so seeds 0..n-1 of an ablation (n >= 2) draw their
    misaligned phi from seeds the ablation trains anyway."""
    r, seed = cfg.regularizer, cfg.run.seed
    if r.phi_control != "other_seed":
        return seed
    if r.prior_seed is not None:
        return r.prior_seed
    return seed - 1 if seed > 0 else 1


def _input_config(dep: str, cfg: Config, stage: str) -> Config:
    """The config an upstream stage is planned with: ``cfg``, except that
    - the phi input of a target with ``phi_control: other_seed`` (``defs.prior_input``: its
      meta stage, or the stage its ``phi_source`` reads) is planned, with its own inputs, under
      the prior's seed (``prior_seed``): phi from another network than the target's;
    - the oracle's reference (``phi_source: oracle``, a target's ``target`` input) is the same
      target without a regularizer (form none, the prior's entries at their defaults)."""
    r = cfg.regularizer
    if stage == "target" and dep == prior_input(cfg) and r.phi_control == "other_seed":
        seed = prior_seed(cfg)
        if seed == cfg.run.seed:
            raise UserError(f"regularizer.prior_seed={seed} is the run's own seed (run.seed): "
                            "phi_control=other_seed needs another seed's phi; leave prior_seed "
                            "null for the default (run.seed - 1, seed 0 takes seed 1)")
        if cfg.inputs.student is not None:
            raise UserError("regularizer.phi_control=other_seed plans the other seed's student "
                            f"and {dep} stage; it cannot use an explicit inputs.student "
                            f"({cfg.inputs.student})")
        cfg = replace(cfg, run=replace(cfg.run, seed=seed))
    if stage == "target" and dep == "target":  # phi_source oracle: theta* of form none
        cfg = replace(cfg, regularizer=replace(
            r, form="none", strength=None, phi_control="none", prior_seed=None,
            phi_source="meta", calibrate_d=None))
    return cfg


def _explicit_input(dep: str, cfg: Config) -> str | None:
    return cfg.regularizer.prior if dep == "meta" else getattr(cfg.inputs, dep, None)


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
        sub = plan(dep, _input_config(dep, cfg, stage))
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
