"""Stages: the data flow of the method as cached, resumable steps.

Stages: ``teacher`` (depth, L_REG), ``student`` (RGB, L_REG), ``kd`` (student + L_DIST against the
teacher), ``meta`` (Algorithm 1: the student's distillation fine-tuning while phi is learned)
and ``target`` (Algorithm 2: a fresh student on the target set with F = L_REG + R(theta)).

    defs.py       what each stage is (one StageDef per stage)
    artifacts.py  Artifact, Store, the writer lock, the ``.partial`` convention and the digests
                  a cache hit is checked against
    plan.py       stage specs and keys, Node, plan (the one walk of the stage graph)
    build.py      datasets, networks, objective and optimizers of a stage
    run.py        train_node (the one training loop), publish, run_stage

Nothing here imports Ray; ``cmkg.cluster`` runs the same ``train_node`` in Ray tasks and Ray
Train workers.
"""

from cmkg.stages.artifacts import (
                               Artifact,
                               Store,
                               check_artifact,
                               code_version,
                               open_artifact,
                               writer_lock,
)
from cmkg.stages.build import StageRun, build_stage, calibrate, ensure_dataset, make_loaders
from cmkg.stages.defs import (
                               DEFS,
                               MODALITY,
                               STAGES,
                               StageDef,
                               depends,
                               planted,
                               stage_arch,
                               stage_datasets,
)
from cmkg.stages.plan import (
                               STAGE_VERSION,
                               Node,
                               dataset_identity,
                               plan,
                               stage_key,
                               stage_spec,
)
from cmkg.stages.run import (
                               PHI_PERCENTILES,
                               PartialFolder,
                               checkpoint_blob,
                               fit_stage,
                               phi_summary,
                               publish,
                               resolve_device,
                               restore,
                               run_node,
                               run_plan,
                               run_stage,
                               train_in_process,
                               train_node,
                               upstream_of,
)

__all__ = [
    "DEFS", "MODALITY", "PHI_PERCENTILES", "STAGES", "STAGE_VERSION", "Artifact", "Node",
    "PartialFolder", "StageDef", "StageRun", "Store", "build_stage", "calibrate",
    "check_artifact", "checkpoint_blob", "code_version", "dataset_identity", "depends", "stage_arch",
    "ensure_dataset", "fit_stage", "make_loaders", "open_artifact", "phi_summary", "plan", "planted",
    "publish", "resolve_device", "restore", "run_node", "run_plan", "run_stage",
    "stage_datasets", "stage_key", "stage_spec", "train_in_process", "train_node",
    "upstream_of", "writer_lock",
]
