"""Typed, strict configuration: dataclass defaults <- preset YAML <- experiment YAML <- --set.

The dataclass defaults are the paper's settings (Sect. 5.1); the presets in ``cmkg/presets/``
(``smoke``, ``cpu``, ``paper``) and experiment files are short diffs against them. An experiment
file may name its preset with a top-level ``preset:`` key.

Loading is strict and reports every problem at once, each with its dotted key: unknown keys
(with a suggestion), wrong types, out-of-range values, missing data folders. YAML is read with
``yaml.safe_load`` and never executes code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmkg.errors import ConfigError
from cmkg.storage import is_uri
from cmkg.yamlfile import assignment, read_mapping, unknown_keys

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("smoke", "cpu", "paper")
SCHEDULES = ("constant", "cosine")  # optim.schedule
SUBSETS = ("all", "half0", "half1")  # meta.subset
SOLVES = ("iterate", "fixed_point")  # meta.solve
KEEP = ("best_val", "final", "average")  # optim.keep
SIGNS = ("learned", "positive")  # regularizer.sign
PHI_CONTROLS = ("none", "permuted", "uniform", "other_seed")  # regularizer.phi_control
PHI_SOURCES = ("meta", "oracle", "source_weights")  # regularizer.phi_source
BACKBONES = ("resnet10", "resnet18", "resnet50")  # model.teacher / model.student (cmkg.models)
# reduction.TERM: the first choice is each term's default (cmkg.losses)
REDUCTIONS = {"reg": ("sum", "mean"), "act": ("mean", "sum"), "att": ("mean", "sum")}
# the stage each phi source reads (cmkg.stages.defs.depends): its phi, or the weights of 1/theta^2
PRIOR_INPUT = {"meta": "meta", "oracle": "target", "source_weights": "kd"}


@dataclass
class DomainKnobs:
    """What a preset changes of a named synthetic domain (``data.knobs.DOMAIN``, see
    ``cmkg.synth.variant``); null = the domain's own value. Set ones enter the dataset's content
    address (and so the stage keys); a domain with none set has the address it had before
    knobs existed."""

    azimuth: float | None = None  # viewpoint half-ranges (deg)
    elevation: float | None = None
    roll: float | None = None
    background: str | None = None  # clutter | indoor | green | photo
    bg_texture: float | None = None  # contrast of the background's texture
    distractors: int | None = None  # at most this many distractor shapes per image
    skin_like_distractors: float | None = None  # probability a distractor is skin-coloured
    occluder_prob: float | None = None  # probability a distractor is in front of the hand
    rgb_noise: float | None = None
    skin_texture: float | None = None
    blocks: int | None = None  # sequence domains: blocks B1..Bn of a Counting + a Random sequence
    val: list[str] | None = None  # sequence domains: the validation sequences
    test: list[str] | None = None  # sequence domains: the test sequences (null: B1's two)

    def set(self) -> dict:
        """The knobs that are set, as ``synth.variant`` takes them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class DataSpec:
    """One dataset: a synthetic domain rendered on demand, or a shard folder (``path``)."""

    domain: str = "rhd-like"
    num: int = 41258  # RHD's training set size
    size: int = 256
    seed: int = 0
    path: str | None = None  # a `cmkg data synth/convert` folder; overrides the four above


@dataclass
class PlantedConfig:
    """Planted knowledge, a positive control of the prior (docs/benchmark.md, "Planted
    knowledge"); off (``channels: 0``) everywhere but ``ablations/planted.yaml``. Every RGB
    network gets ``channels`` extra input channels, each a constant map per image: independent
    N(0, 1) noise on the source (every split) and on the target's val and test splits; on the
    target's train split alone, ``cue`` x a fixed random projection of the pose (standardised)
    + sqrt(1 - cue^2) x noise, a shortcut that does not hold at test time. The depth teacher
    never sees them. Set, it enters the keys of the RGB stages (not the teacher's)."""

    channels: int = 0
    cue: float = 0.0  # correlation of each channel with its pose projection on target train
    # the same on the source's train split (0: noise there, as by default): the RGB labels then
    # reward the shortcut on the source too; the depth teacher never sees the channels (but its
    # pose features reward them as well, docs/prior-strength.md)
    source_cue: float = 0.0
    seed: int = 0  # draws the projections and the noise

    @property
    def on(self) -> bool:
        return self.channels > 0


@dataclass
class DataConfig:
    source: DataSpec = field(default_factory=DataSpec)  # paired RGB + depth
    target: DataSpec = field(default_factory=lambda: DataSpec(domain="stb-like", num=18000,
                                                              seed=1))
    augment: DataSpec | None = None  # extra paired synthetic set "A" of Table 1
    # per synthetic domain, what this config changes of it (cmkg.synth.variant): it applies to
    # every dataset of that domain (source, target, augment), whichever the rows choose
    knobs: dict[str, DomainKnobs] = field(default_factory=dict)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test
    root: str = "data"  # where synthetic datasets are cached, content-addressed
    planted: PlantedConfig = field(default_factory=PlantedConfig)  # a positive control; off


@dataclass
class ModelConfig:
    teacher: str = "resnet18"
    student: str = "resnet18"


@dataclass
class OptimConfig:
    lr: float = 2.5e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    # the paper is silent on a schedule: constant (the default, as before) or cosine, which
    # decays the rate to 0 over the stage's steps, so its final weights are a settled point
    schedule: str = "constant"
    # the weights a stage publishes: those of its best validation epoch (the default, as
    # before), the final ones (no selection on a small validation split), or ``average``: the
    # element-wise mean of the weights at the end of each of the last ``average_epochs`` epochs
    keep: str = "best_val"
    # keep=average only: how many final epochs to average; 0 (the default) is the last half of
    # each stage's epochs, at least 1 (``averaged_epochs``)
    average_epochs: int = 0


def averaged_epochs(setting: int, epochs: int) -> int:
    """How many final epochs ``optim.keep: average`` averages in a stage of ``epochs`` epochs:
    ``optim.average_epochs`` when set (> 0), else the last half, at least 1."""
    return setting if setting > 0 else max(1, epochs // 2)


@dataclass
class EpochsConfig:
    teacher: int = 200
    student: int = 100
    kd: int = 100
    meta: int = 100  # Algorithm 1 runs during the student's distillation fine-tuning (Sect. 5.1)
    target: int = 100


# the stages, in dependency order: one epochs entry each (what each stage is: cmkg.stages.defs)
STAGES = tuple(f.name for f in dataclasses.fields(EpochsConfig))


@dataclass
class DistillConfig:
    losses: list[str] = field(default_factory=lambda: ["act", "att"])
    lambda_att: float = 1.0e3
    att_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])


@dataclass
class ReductionConfig:
    """How each loss reduces its elements (``cmkg.losses``); every choice still averages over
    the batch. The defaults are the code's original choices, so they move no number and no key."""

    reg: str = "sum"  # L_REG: sum over the 21x3 coordinates (Eq. 1) | mean: also /63 (nn.MSELoss)
    act: str = "mean"  # L_ACT: mean over B, C, H, W | sum: over C, H, W (Eq. 2 literally)
    att: str = "mean"  # L_ATT: mean over B and positions | sum: over positions (Eq. 3 literally)


@dataclass
class RegularizerConfig:
    """R(theta) of the target stage (Table 2) and the form whose phi the meta stage learns."""

    form: str = "weighted_l2"  # a row of cmkg.forms.FORMS (none, l1, l2, weighted_l1, weighted_l2)
    sigma: float = 1.0e-5  # constant weight of l1 / l2
    params: str = "weights"  # weights (conv + linear weights) | all
    phi_param: str = "free"  # free (the paper's, may go negative) | softplus (phi > 0)
    phi_init: float = 0.0
    phi_clip: list[float] | None = None  # bounds on raw phi; null = +-1 / (2 meta.alpha)
    prior: str | None = None  # a finished meta stage folder; default: found by key
    # calibrated prior (a documented deviation, weighted forms on the target only): scale
    # phi_META so that the median |D| over the regularised weights is calibrate_d, then cap
    # every weight's |D| at d_cap (D: e-folds R moves a weight over the run, docs/prior-strength.md);
    # null = phi_META as Algorithm 1 learned it (the paper)
    calibrate_d: float | None = None
    d_cap: float | None = 3.0
    # phi as the target applies it (weighted forms; docs/prior-strength.md), in this order:
    # strength (null = 1: phi_META as learned, the paper) -> sign (learned: as learned, the
    # paper; positive: max(phi, 0)) -> phi_control (none; permuted: within each tensor, from
    # run.seed; uniform: every entry the mean over all regularised weights; other_seed: phi_META
    # of the meta stage of prior_seed, null = run.seed - 1, seed 0 takes seed 1) -> the
    # calibration's scale and cap (calibrate_d; exclusive with strength)
    strength: float | None = None
    sign: str = "learned"
    phi_control: str = "none"
    prior_seed: int | None = None
    # where a weighted form's phi comes from (docs/prior-strength.md, "φ sources"): meta (the
    # paper: phi_META of Algorithm 1); oracle: phi_j ~ 1 / (theta*_j^2 + eps) from the same
    # seed's unregularised target run (the hindsight generalised-ridge reference); source_weights:
    # the same from the source kd student (no meta-learning). Both non-meta sources are scaled to
    # mean 1 over the regularised weights, so regularizer.strength is their mean phi (an l2's
    # sigma at equal mean); eps = phi_eps x the tensor's mean theta^2
    phi_source: str = "meta"
    phi_eps: float = 0.1


@dataclass
class MetaConfig:
    """Algorithm 1."""

    inner_steps: int = 1  # l
    alpha: float = 2.5e-4  # inner SGD step size
    beta: float = 1.0e-3  # phi learning rate (SGD, Sect. 5.1)
    phi_optimizer: str = "sgd"  # sgd (paper) | adam
    first_order: bool = False  # drop the Hessian-vector terms of steps i >= 1
    # diagnostics of phi (docs/phi-diagnostics.md); each enters the meta stage's key only where
    # it differs from its default, so the keys of Algorithm 1 as the paper runs it stay
    teacher: bool = True  # G = L_REG + L_ACT + lambda L_ATT; false: G = L_REG (no teacher at all)
    order_seed: int | None = None  # seed of the meta stage's data order; null = run.seed
    subset: str = "all"  # all | half0 | half1: one of two fixed disjoint halves of its train split
    # iterate: Algorithm 1's steps (the paper); fixed_point: theta trained on G as in Algorithm 1,
    # then phi set to the point where Algorithm 1 stops moving, phi*_j = theta_j g_j /
    # (2 (theta_j^2 + eps_t)), g = the train split's mean gradient of L_DIST at the final theta,
    # eps_t = regularizer.phi_eps x the tensor's mean theta^2, scaled to mean |phi| 1
    # (docs/prior-strength.md, "Algorithm 1's fixed point on the benchmark")
    solve: str = "iterate"


@dataclass
class InputsConfig:
    """Explicit upstream artifacts (folders of finished stages); by default found by key."""

    teacher: str | None = None
    student: str | None = None


@dataclass
class TrackingConfig:
    """Experiment tracking (``cmkg.tracking``, docs/tracking.md); in no stage key."""

    backend: str = "none"  # none | mlflow | tensorboard
    uri: str | None = None  # MLflow tracking URI or TensorBoard log folder; null: beside run.store


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = all cores
    store: str = "runs"  # artifact store: a local folder or a pyarrow URI (s3://, gs://, ...)
    cache: str | None = None  # local mirror of a remote store; default ~/.cache/cmkg/store/<hash>
    loader_workers: int = 0
    eval_every: int = 1
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | lines | none
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: EpochsConfig = field(default_factory=EpochsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reduction: ReductionConfig = field(default_factory=ReductionConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def knobs_of(spec: DataSpec, cfg: Config) -> dict:
    """The knobs set for the domain of a synthetic dataset spec ({} for none)."""
    k = cfg.data.knobs.get(spec.domain)
    return k.set() if k is not None else {}


def _check_knobs(domain: str, k: DomainKnobs, key: str, check) -> None:
    from cmkg import domains as synth  # the renderer's catalogue, torch-free

    for name in ("azimuth", "elevation", "roll"):
        v = getattr(k, name)
        check(v is None or 0 <= v <= 180, f"{key}.{name}", f"must be in [0, 180] deg, got {v}")
    for name in ("bg_texture", "skin_like_distractors", "occluder_prob", "rgb_noise",
                 "skin_texture"):
        v = getattr(k, name)
        check(v is None or 0 <= v <= 1, f"{key}.{name}", f"must be in [0, 1], got {v}")
    check(k.distractors is None or 0 <= k.distractors <= 16, f"{key}.distractors",
          f"must be in [0, 16], got {k.distractors}")
    check(k.background is None or k.background in synth.BACKGROUNDS, f"{key}.background",
          f"must be one of {', '.join(synth.BACKGROUNDS)}, got {k.background!r}")
    check(k.blocks is None or 2 <= k.blocks <= 99, f"{key}.blocks",
          f"must be in [2, 99], got {k.blocks}")
    seq = [n for n in ("blocks", "val", "test") if getattr(k, n) is not None]
    if seq and synth.DOMAINS[domain].sequences is None:
        check(False, f"{key}.{seq[0]}", f"only a sequence domain has it ({domain} is i.i.d.)")
    elif seq:
        try:
            synth.variant(domain, k.set())
        except KeyError as e:  # its second argument, if any, is the knob at fault
            check(False, f"{key}.{e.args[1] if len(e.args) > 1 else 'val'}", e.args[0])


def _check_tracking(t: TrackingConfig, check) -> None:
    from cmkg import tracking  # no mlflow/tensorboard import: only whether they are installed

    check(t.backend in tracking.BACKENDS, "run.tracking.backend",
          f"must be one of {', '.join(tracking.BACKENDS)}, got {t.backend!r}")
    missing = tracking.missing_package(t.backend) if t.backend in tracking.BACKENDS else None
    check(missing is None, "run.tracking.backend",
          f"{t.backend} needs the {missing} package, which is not installed: "
          "pip install -e '.[tracking]'")
    check(t.uri is None or bool(t.uri.strip()), "run.tracking.uri",
          "must be null (beside run.store) or a URI / folder, got an empty string")
    if t.uri and t.uri.strip():
        problem = tracking.uri_problem(t.backend, t.uri)
        check(problem is None, "run.tracking.uri", problem or "")


def digest(obj) -> str:
    """sha256 of an object's canonical JSON: the basis of artifact keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Strict construction from plain data
# ---------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str, problems: list[str], base=None):
    """Check ``value`` against the annotation ``tp``; return the converted value. Mappings for
    nested dataclasses update ``base`` (the field's default), so partial mappings keep defaults."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems, base)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return _INVALID
        return _build(base if base is not None else tp(), value, key, problems)
    if origin is dict:  # str -> dataclass: each entry updates the entry already there
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return _INVALID
        out = dict(base or {})
        for k, v in value.items():
            got = _coerce(v, item, f"{key}.{k}", problems, out.get(k))
            if got is not _INVALID:
                out[str(k)] = got
        return out
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
            return _INVALID
        return [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return _INVALID
    return value


_INVALID = object()


def _build(obj, data: dict, prefix: str, problems: list[str]):
    """Update a copy of the dataclass instance ``obj`` from the mapping ``data``."""
    obj = dataclasses.replace(obj)
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    unknown_keys(data, names, prefix, problems)
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            continue
        value = _coerce(v, hints[k], key, problems, getattr(obj, k))
        if value is not _INVALID:
            setattr(obj, k, value)
    return obj


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# Validation of values
# ---------------------------------------------------------------------------------------------

def validate(cfg: Config) -> list[str]:
    """Range and choice checks; returns every problem found."""
    from cmkg.domains import DOMAINS  # torch-free, like every vocabulary validate reads

    p = []

    def check(ok: bool, key: str, msg: str):
        if not ok:
            p.append(f"{key}: {msg}")

    specs = [("data.source", cfg.data.source), ("data.target", cfg.data.target)]
    if cfg.data.augment is not None:
        specs.append(("data.augment", cfg.data.augment))
    for name, spec in specs:
        if is_uri(spec.path):
            pass  # checked when first read (a network round trip)
        elif spec.path is not None:
            check(Path(spec.path, "manifest.json").is_file(), f"{name}.path",
                  f"{spec.path!r} is not a cmkg dataset folder (no manifest.json)")
        else:
            check(spec.domain in DOMAINS, f"{name}.domain",
                  f"{spec.domain!r} is not a synthetic domain ({', '.join(DOMAINS)})")
            check(spec.num >= 10, f"{name}.num", f"must be >= 10, got {spec.num}")
            check(16 <= spec.size <= 1024, f"{name}.size", f"must be in [16, 1024], got {spec.size}")
            check(spec.seed >= 0, f"{name}.seed", f"must be >= 0, got {spec.seed}")
    for domain, knobs in cfg.data.knobs.items():
        check(domain in DOMAINS, f"data.knobs.{domain}",
              f"{domain!r} is not a synthetic domain ({', '.join(DOMAINS)})")
        if domain in DOMAINS:
            _check_knobs(domain, knobs, f"data.knobs.{domain}", check)
    aug, src = cfg.data.augment, cfg.data.source
    if aug is not None and aug.path is None and src.path is None:
        check(aug.size == src.size, "data.augment.size",
              f"must equal data.source.size ({src.size}): the sets are trained on together, "
              f"got {aug.size}")
    pl = cfg.data.planted
    check(0 <= pl.channels <= 64, "data.planted.channels",
          f"must be an integer in [0, 64] (0: off), got {pl.channels}")
    check(0 <= pl.cue <= 1, "data.planted.cue", f"must be in [0, 1], got {pl.cue}")
    check(0 <= pl.source_cue <= 1, "data.planted.source_cue",
          f"must be in [0, 1], got {pl.source_cue}")
    check(pl.seed >= 0, "data.planted.seed", f"must be >= 0, got {pl.seed}")
    sp = cfg.data.split
    check(len(sp) == 3 and all(x >= 0 for x in sp) and abs(sum(sp) - 1) < 1e-6 and sp[0] > 0,
          "data.split", f"must be three non-negative fractions train/val/test summing to 1, got {sp}")
    for role in ("teacher", "student"):
        arch = getattr(cfg.model, role)
        check(arch in BACKBONES, f"model.{role}", f"{arch!r} is not one of {', '.join(BACKBONES)}")
    check(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    check(cfg.optim.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {cfg.optim.batch_size}")
    check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(cfg.optim.schedule in SCHEDULES, "optim.schedule",
          f"must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    check(cfg.optim.keep in KEEP, "optim.keep",
          f"must be one of {', '.join(KEEP)}, got {cfg.optim.keep!r}")
    for stage in STAGES:
        n = getattr(cfg.epochs, stage)
        check(n >= 1, f"epochs.{stage}", f"must be >= 1, got {n}")
    avg, keep = cfg.optim.average_epochs, cfg.optim.keep
    shorter = [f"epochs.{s}={getattr(cfg.epochs, s)}" for s in STAGES
               if 0 < getattr(cfg.epochs, s) < avg]
    if avg < 0:
        check(False, "optim.average_epochs",
              f"must be >= 0 (0: the last half of each stage's epochs), got {avg}")
    elif avg > 0 and keep != "average":
        check(False, "optim.average_epochs",
              f"is read only with optim.keep=average, got {avg} with optim.keep={keep}")
    elif shorter:
        check(False, "optim.average_epochs",
              f"must be at most every stage's epochs, got {avg} against {', '.join(shorter)} "
              "(0 averages the last half of each stage's epochs)")
    bad = [x for x in cfg.distill.losses if x not in ("act", "att")]
    check(not bad and cfg.distill.losses, "distill.losses",
          f"must be a non-empty subset of ['act', 'att'], got {cfg.distill.losses}")
    check(cfg.distill.lambda_att >= 0, "distill.lambda_att", "must be >= 0")
    check(bool(cfg.distill.att_layers) and all(1 <= i <= 4 for i in cfg.distill.att_layers),
          "distill.att_layers", f"must list layers among 1..4, got {cfg.distill.att_layers}")
    for term, choices in REDUCTIONS.items():
        value = getattr(cfg.reduction, term)
        check(value in choices, f"reduction.{term}",
              f"must be {' or '.join(choices)}, got {value!r}")
    from cmkg.forms import FORMS  # torch-free: the rows of the regularizer forms

    r = cfg.regularizer
    check(r.form in FORMS, "regularizer.form", f"{r.form!r} is not one of {', '.join(FORMS)}")
    check(r.sigma >= 0, "regularizer.sigma", f"must be >= 0, got {r.sigma}")
    check(r.params in ("weights", "all"), "regularizer.params", "must be weights or all")
    check(r.phi_param in ("free", "softplus"), "regularizer.phi_param", "must be free or softplus")
    check(r.phi_param == "free" or r.phi_init > 0, "regularizer.phi_init",
          "must be > 0 with phi_param=softplus")
    check(r.phi_clip is None or (len(r.phi_clip) == 2 and r.phi_clip[0] < r.phi_clip[1]),
          "regularizer.phi_clip", f"must be null or [low, high] with low < high, got {r.phi_clip}")
    check(r.calibrate_d is None or r.calibrate_d > 0, "regularizer.calibrate_d",
          f"must be null or > 0, got {r.calibrate_d}")
    check(r.d_cap is None or r.d_cap > 0, "regularizer.d_cap", f"must be null or > 0, got {r.d_cap}")
    check(r.calibrate_d is None or r.d_cap is None or r.d_cap >= r.calibrate_d,
          "regularizer.d_cap", f"must be >= regularizer.calibrate_d ({r.calibrate_d}), "
          f"got {r.d_cap}")
    check(r.strength is None or (math.isfinite(r.strength) and r.strength > 0),
          "regularizer.strength", f"must be null or a finite number > 0, got {r.strength}")
    check(r.strength is None or r.calibrate_d is None, "regularizer.strength",
          f"cannot be set with regularizer.calibrate_d ({r.calibrate_d}): the calibration "
          "chooses phi's scale itself; set one of them")
    check(r.sign in SIGNS, "regularizer.sign", f"must be one of {', '.join(SIGNS)}, got {r.sign!r}")
    check(r.phi_control in PHI_CONTROLS, "regularizer.phi_control",
          f"must be one of {', '.join(PHI_CONTROLS)}, got {r.phi_control!r}")
    check(r.phi_source in PHI_SOURCES, "regularizer.phi_source",
          f"must be one of {', '.join(PHI_SOURCES)}, got {r.phi_source!r}")
    check(r.phi_eps > 0, "regularizer.phi_eps", f"must be > 0, got {r.phi_eps}")
    if r.phi_source in PHI_SOURCES and r.phi_source != "meta":
        check(r.form == "weighted_l2", "regularizer.phi_source",
              f"{r.phi_source} gives the phi of weighted_l2 (1 / theta^2, the generalised-ridge "
              f"form), got regularizer.form={r.form}")
        check(r.sign == "learned", "regularizer.sign",
              f"applies to a learned phi; phi_source={r.phi_source} is positive already")
        check(r.prior is None, "regularizer.prior",
              f"names a meta stage; phi_source={r.phi_source} takes phi from its "
              f"{PRIOR_INPUT[r.phi_source]} stage, found by key")
    check(r.prior_seed is None or r.phi_control == "other_seed", "regularizer.prior_seed",
          f"is read only with regularizer.phi_control=other_seed, got phi_control={r.phi_control}")
    check(r.prior_seed is None or (isinstance(r.prior_seed, int) and r.prior_seed >= 0),
          "regularizer.prior_seed", f"must be null or an integer >= 0, got {r.prior_seed!r}")
    check(r.phi_control != "other_seed" or r.prior is None, "regularizer.phi_control",
          "other_seed takes phi from the meta stage of regularizer.prior_seed, found by key; "
          f"it cannot be combined with an explicit regularizer.prior ({r.prior})")
    if r.prior is not None and not is_uri(r.prior):
        check(Path(r.prior, "phi.pt").is_file(), "regularizer.prior",
              f"{r.prior!r} is not a finished meta stage folder (no phi.pt)")
    m = cfg.meta
    check(m.inner_steps >= 1, "meta.inner_steps", f"must be >= 1, got {m.inner_steps}")
    check(m.alpha > 0, "meta.alpha", f"must be > 0, got {m.alpha}")
    check(m.beta >= 0, "meta.beta", f"must be >= 0, got {m.beta}")
    check(m.phi_optimizer in ("sgd", "adam"), "meta.phi_optimizer", "must be sgd or adam")
    check(m.order_seed is None or m.order_seed >= 0, "meta.order_seed",
          f"must be null or >= 0, got {m.order_seed}")
    check(m.subset in SUBSETS, "meta.subset",
          f"must be one of {', '.join(SUBSETS)}, got {m.subset!r}")
    check(m.solve in SOLVES, "meta.solve", f"must be one of {', '.join(SOLVES)}, got {m.solve!r}")
    check(m.solve != "fixed_point" or m.teacher, "meta.solve",
          "fixed_point needs the teacher: with meta.teacher=false G = L_REG = F at phi = 0, so "
          "Algorithm 1's fixed point is phi = 0 (no prior)")
    check(m.solve != "fixed_point" or r.phi_param == "free", "meta.solve",
          f"fixed_point sets phi itself, so it needs regularizer.phi_param=free, got {r.phi_param}")
    for role in ("teacher", "student"):
        path = getattr(cfg.inputs, role)
        if path is not None and not is_uri(path):
            check(Path(path, "model.pt").is_file(), f"inputs.{role}",
                  f"{path!r} is not a finished stage folder (no model.pt)")
    dev = cfg.run.device
    check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "run.device",
          f"must be auto, cpu, cuda or cuda:N, got {dev!r}")
    check(cfg.run.threads >= 0, "run.threads", "must be >= 0")
    check(cfg.run.loader_workers >= 0, "run.loader_workers", "must be >= 0")
    check(cfg.run.eval_every >= 1, "run.eval_every", "must be >= 1")
    check(cfg.run.progress in ("auto", "lines", "none"), "run.progress",
          f"must be auto, lines or none, got {cfg.run.progress!r}")
    _check_tracking(cfg.run.tracking, check)
    check(cfg.preset is None or cfg.preset in PRESETS, "preset",
          f"must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    return p


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def nest(dotted: dict) -> dict:
    """``{"optim.lr": 1e-3, "data.augment": {...}}`` -> ``{"optim": {"lr": 1e-3}, ...}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "model.student=resnet50"]`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    problems = []
    for item in overrides:
        parsed = assignment(item, "--set", problems)
        if parsed is None:
            continue
        key, value, _ = parsed
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {key}: conflicts with another --set")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError("--set", problems)
    return out


def load(config: str | None = None, overrides: list[str] | None = None,
         layers_after: list[tuple[str, dict]] | None = None) -> Config:
    """Resolve a config: ``config`` is a preset name or a YAML path (its ``preset:`` key, if
    any, is applied first); ``layers_after`` are (source, nested mapping) layers applied next,
    each checked on its own so a problem names its source (an ablation file's row);
    ``overrides`` are ``key=value`` strings applied last."""
    layers: list[tuple[str, dict]] = []
    if config is None:
        user = {}
        source = "defaults"
    elif config in PRESETS:
        user = {"preset": config}
        source = f"preset {config}"
    else:
        path = Path(config)
        user = read_mapping(path)
        source = str(path)
    preset = user.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(source, [f"preset: must be one of {', '.join(PRESETS)}, got {preset!r}"])
        layers.append((str(PRESET_DIR / f"{preset}.yaml"),
                       read_mapping(PRESET_DIR / f"{preset}.yaml")))
    layers.append((source, user))
    layers += layers_after or []
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))

    merged: dict = {}
    problems: list[str] = []
    for where, layer in layers:
        found: list[str] = []
        _build(Config(), layer, "", found)  # check each layer on its own, to name its file
        problems += [f"{p} [{where}]" for p in found] if len(layers) > 1 else found
        merged = _merge(merged, layer)
    cfg = _build(Config(), merged, "", [])
    problems += validate(cfg)
    if problems:
        raise ConfigError(" <- ".join(w for w, _ in layers), problems)
    return cfg


def from_dict(data: dict, source: str = "config dict") -> Config:
    """A ``Config`` from ``to_dict()`` output (how configs travel to remote workers)."""
    problems: list[str] = []
    cfg = _build(Config(), data, "", problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg
