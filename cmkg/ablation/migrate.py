"""Bring a stored table spec up to date with its ablation file's ``figures`` entry.

Why this exists: the figures a table draws (which row and columns Fig. 4 compares, the paper's
AUC gain, which rows Fig. 5 shows) used to be label strings in the report's code and, for one
number, a top-level ``figure4_paper_delta_auc`` of table1.yaml. They are now the ablation files'
``figures:`` entries, copied into each table's spec by the runner, and the report reads them
from the spec only. Records written before that hold no ``figures`` in their spec and would be
rendered without figures; ``refresh_figures`` gives such a file the entry of the current
ablation file (dropping the old key) and leaves everything else, the rows included, as it was.
It was run once on ``reports/results/table{1,2,3}.parquet``.
"""

from __future__ import annotations

from pathlib import Path

from cmkg import report
from cmkg.ablation.spec import load

OLD_KEYS = ("figure4_paper_delta_auc",)  # where the figures' data lived in a spec before
ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"


def refresh_figures(path: str | Path, ablation_file: str | Path | None = None) -> dict:
    """Replace the ``figures`` entry of the spec stored in the records file ``path`` with the
    ablation file's (default: the spec's ``source`` in ``ablations/``); the rows are rewritten
    as they were read. Returns the new spec."""
    spec = report.read_spec(path)
    ab = load(ablation_file if ablation_file is not None else ABLATIONS / spec["source"])
    if ab.table != spec["table"]:
        raise ValueError(f"{path}: records of {spec['table']!r}, but the ablation file "
                         f"{ab.path} is {ab.table!r}")
    spec = {k: v for k, v in spec.items() if k not in OLD_KEYS and k != "figures"}
    if ab.figures:
        spec["figures"] = ab.figures
    report.replace_spec(path, spec)
    return spec
