"""Ablation files -> cells -> one deduplicated stage plan -> result records. No Ray here.

An ablation file (``ablations/table*.yaml``) describes one of the paper's tables::

    table: table2
    title: "Table 2: regularizers on the target"
    seeds: 3                       # report seeds: a count (default of --seeds) or a list
    choice_seeds: 3                # optional: choose rows choose on seeds 0-2, report on 3-5
    set: {}                        # overrides of the base config for every cell
    scale:                         # per preset: overrides and a note the report prints
      cpu: {set: {epochs.target: 10}, note: "target trained for 10 epochs"}
    columns:                       # what is measured: one stage's test metrics per cell
      target: {stage: target, title: "EPE / AUC", metrics: [epe_mm, auc_20_50], set: {}}
    rows:
      - {label: none, set: {regularizer.form: none}, paper: {target: {epe_mm: 15.67}}}
      - label: "l2 (σ chosen on val)"   # one cell per value and seed; the report keeps the
        set: {regularizer.form: l2}     # value with the lowest mean best val EPE (``choose``)
        choose: {key: regularizer.sigma, values: [1.0e-3, 1.0e-2, 1.0e-1]}
    baseline_row: none             # paired deltas of every row against this one, per column
    compare_columns: [[kd, rgb]]   # paired deltas between columns, in every row
    compare: [{a: [row, column], b: [row, column]}]   # any other pair of cells
    figures:                       # what the table draws in Figures 4-5 (cmkg.report.figures)
      figure4: {pck_rows: {}}

A *cell* is (row, column, seed): the base config, then the file's ``set`` and ``scale``, the
column's ``set``, the row's ``set`` and ``scale``, the command's ``--set`` and finally
``run.seed`` = the seed — one seed reseeds the whole chain (data order and the initialisation
of teacher, student, meta and target), so a seed's phi_META meets a target network initialised
like the student it was learned on. A column's ``extend_epochs: [kd]`` trains its stage for its
own epochs plus those stages' (Table 1's control: an RGB student trained as long as student + kd).

A row with ``choose`` is a selection done the honest way: every value runs (a cell per value,
column and seed, the value layered after the row's ``set``), and per column the value whose cells
reach the lowest best validation EPE, averaged over the seeds, becomes the row; test metrics play
no part in the choice, and the report notes the value chosen and every value's val EPE. With
``choice_seeds`` (or ``--choice-seeds K``) the choice is made on those seeds alone, one value
for the row, which then runs on the report seeds, other seeds (fresh-seed confirmation; the
other values never run there). A row with ``choose: {follow: label}`` takes the named row's key
and values and, per column, the value that row chose (a control at the strength the learned
prior chose, Table 2); it never chooses on its own metrics, and with choice seeds it runs only
that value, on the report seeds. A row with ``tuned: PATH/best.yaml`` takes a sweep's best trial
(``tuned.py``); its report seeds must be other than the sweep's. With ``tuned: {cpu: PATH}`` it
is that only at the presets named, and left out of the table at any other (``at_preset``).

Every cell's ``stages.plan`` is unioned by (stage, key): Table 2's seven rows share one teacher,
one student and one phi per weighted form per seed. What the store lacks is trained (by the Ray
layer, ``cmkg.cluster.ablate``); each finished cell becomes a *result record* (``record``):
metrics, artifact keys, wall times, code version, device — the only input of ``cmkg report``.

    spec.py      the ablation file: Ablation, Column, Row, the strict loader ``load`` and
                 ``at_preset`` (the table as one preset runs it)
    cells.py     expand into cells, the union of their plans, the work estimate, ``choose``,
                 the seeds (``seed_plan``: report and choice seeds)
    tuned.py     tuned rows: a sweep's best.yaml read, its seeds checked against the report's
    results.py   result records, the table spec
    runner.py    ``run`` (with its overwrite guard), ``dry_run``, the status line
    migrate.py   ``refresh_spec``: a stored spec's figures and comparison kinds from the ablation file
"""

from cmkg.ablation.cells import (
    WORK_FACTOR,
    Cell,
    choose,
    decisions,
    expand,
    notes,
    preset_of,
    seed_plan,
    seeds_of,
    train_samples,
    union,
    work,
)
from cmkg.ablation.migrate import refresh_spec
from cmkg.ablation.results import LOWER_IS_BETTER, fingerprint, record, table_spec
from cmkg.ablation.runner import check_overwrite, dry_run, run, status_line
from cmkg.ablation.spec import METRICS, Ablation, Column, Row, at_preset, load

__all__ = [
    "LOWER_IS_BETTER", "METRICS", "WORK_FACTOR", "Ablation", "Cell", "Column", "Row",
    "at_preset", "check_overwrite", "choose", "decisions", "dry_run", "expand", "fingerprint", "load", "notes",
    "preset_of", "record", "refresh_spec", "run", "seed_plan", "seeds_of",
    "status_line", "table_spec", "train_samples", "union", "work",
]
