"""What each stage is, in one table: the network it trains, what that network sees, which data
it reads and which stages it needs first.

    stage     paper                       network  input        data     needs
    teacher   Sect. 3, depth regressor    teacher  depth        source   -
    student   Sect. 3, RGB regressor      student  rgb          source   -
    kd        Sect. 3, L_REG + L_DIST     student  rgb + depth  source   teacher, student
    meta      Algorithm 1 (learns phi)    student  rgb + depth  source   teacher, student
    target    Algorithm 2 (F = L_REG + R) student  rgb          target   meta, for a weighted R
                                                                         (or the stage of
                                                                         regularizer.phi_source)

kd and meta fine-tune the student against the frozen teacher, so they read paired RGB and depth;
the target stage trains a fresh student on a set without depth. Everything that branches on a
stage (its key, its datasets, the checks before Ray starts, the work estimate) reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmkg.config import PRIOR_INPUT, STAGES
from cmkg.forms import weighted as weighted_form  # the forms of Eq. (10): they need a phi

if TYPE_CHECKING:
    from cmkg.config import Config, DataSpec


@dataclass(frozen=True)
class StageDef:
    name: str
    network: str  # the config entry naming its backbone: model.teacher or model.student
    modality: str  # what the trained (and evaluated) network sees: "depth" | "rgb"
    data: str  # "source" (+ data.augment when set) or "target"
    paired: bool  # trains on paired RGB and depth against the frozen teacher (L_DIST)
    inputs: tuple[str, ...] = ()  # upstream stages it always needs
    # needs phi when the regularizer is a weighted form: the meta stage's (phi_META), or the
    # weights of the stage regularizer.phi_source names (config.PRIOR_INPUT)
    prior: bool = False
    learns_prior: bool = False  # learns phi (Algorithm 1): no DDP, phi published beside the model

    @property
    def reads(self) -> tuple[str, ...]:
        """The modalities its training split must hold."""
        return ("rgb", "depth") if self.paired else (self.modality,)


DEFS: dict[str, StageDef] = {
    "teacher": StageDef("teacher", "teacher", "depth", "source", False),
    "student": StageDef("student", "student", "rgb", "source", False),
    "kd": StageDef("kd", "student", "rgb", "source", True, ("teacher", "student")),
    "meta": StageDef("meta", "student", "rgb", "source", True, ("teacher", "student"),
                     learns_prior=True),
    "target": StageDef("target", "student", "rgb", "target", False, prior=True),
}
assert tuple(DEFS) == STAGES, "cmkg.config.STAGES and the stage table disagree"
MODALITY = {name: d.modality for name, d in DEFS.items()}


def depends(stage: str, cfg: Config) -> tuple[str, ...]:
    """Upstream stages of ``stage`` under ``cfg``."""
    d = DEFS[stage]
    weighted = d.prior and weighted_form(cfg.regularizer.form)
    inputs = d.inputs
    if d.learns_prior and not cfg.meta.teacher:  # G = L_REG: the teacher-free meta control
        inputs = tuple(i for i in inputs if i != "teacher")
    return inputs + ((prior_input(cfg),) if weighted else ())


def prior_input(cfg: Config) -> str:
    """The stage a weighted target reads its phi from: ``meta`` (phi_META, the paper), or for
    ``regularizer.phi_source`` oracle the unregularised ``target`` run of its seed, for
    source_weights the source ``kd`` student (``config.PRIOR_INPUT``)."""
    return PRIOR_INPUT[cfg.regularizer.phi_source]


def stage_datasets(stage: str, cfg: Config) -> list[DataSpec]:
    """The datasets a stage trains on, the evaluation set (val and test splits) first."""
    if DEFS[stage].data == "target":
        return [cfg.data.target]
    return [cfg.data.source] + ([cfg.data.augment] if cfg.data.augment else [])


def planted(stage: str, cfg: Config):
    """The planted channels a stage's network sees (``data.planted``, a positive control): the
    config's where they are on and the network is an RGB one, else None (the depth teacher
    never sees them)."""
    p = cfg.data.planted
    return p if p.channels > 0 and DEFS[stage].modality == "rgb" else None


def stage_arch(stage: str, cfg: Config) -> str:
    """The backbone a stage trains."""
    return getattr(cfg.model, DEFS[stage].network)
