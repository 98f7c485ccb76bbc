"""Bring a stored table spec up to date with its ablation file: the ``figures`` entry and the
comparisons' ``kind``.

Why this exists: the figures a table draws (which row and columns Fig. 4 compares, the paper's
AUC gain, which rows Fig. 5 shows) used to be label strings in the report's code and, for one
number, a top-level ``figure4_paper_delta_auc`` of table1.yaml. They are now the ablation files'
``figures:`` entries, copied into each table's spec by the runner, and the report reads them
from the spec only. Likewise each comparison's ``kind`` (``method``: a claim of the paper's
method; ``sanity``: a property of the data), which decides whether the report counts it as a
claim and adjusts it for multiplicity, is the ablation file's and is stored in the spec.
Records written before either hold neither; ``refresh_spec`` gives such a file the ``figures``
entry of the current ablation file (dropping the old key) and each stored comparison the kind
the file gives the same comparison (a, b and metric), and leaves everything else, the rows and
the comparisons themselves included, as it was. It was run on
``reports/results/table{1,2,3}.parquet`` (figures first, kinds later).
"""

from __future__ import annotations

from pathlib import Path

from cmkg import report
from cmkg.ablation.spec import at_preset, load

OLD_KEYS = ("figure4_paper_delta_auc",)  # where the figures' data lived in a spec before
ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"


def refresh_spec(path: str | Path, ablation_file: str | Path | None = None) -> dict:
    """Replace the ``figures`` entry of the spec stored in the records file ``path`` with the
    ablation file's (default: the spec's ``source`` in ``ablations/``) and set each stored
    comparison's ``kind`` to the file's, both as the spec's preset runs the file
    (``spec.at_preset``); the rows are rewritten as they were read. Raises
    ``ValueError`` when the file is another table's or lacks a stored comparison. Returns the
    new spec."""
    spec = report.read_spec(path)
    ab = load(ablation_file if ablation_file is not None else ABLATIONS / spec["source"])
    stored = spec.get("preset")  # the rows of the records' preset (rows tuned at others out)
    ab = at_preset(ab, None if stored in (None, "custom") else stored)
    if ab.table != spec["table"]:
        raise ValueError(f"{path}: records of {spec['table']!r}, but the ablation file "
                         f"{ab.path} is {ab.table!r}")
    kinds = {(tuple(c["a"]), tuple(c["b"]), c["metric"]): c["kind"] for c in ab.comparisons}
    comparisons = []
    for c in spec.get("comparisons") or []:
        which = (tuple(c["a"]), tuple(c["b"]), c["metric"])
        if which not in kinds:
            raise ValueError(f"{path}: comparison {c['a']} − {c['b']} ({c['metric']}) is not "
                             f"in the ablation file {ab.path}: no kind to give it")
        comparisons.append({**c, "kind": kinds[which]})
    spec = {k: v for k, v in spec.items() if k not in OLD_KEYS and k != "figures"}
    if "comparisons" in spec:
        spec["comparisons"] = comparisons
    if ab.figures:
        spec["figures"] = ab.figures
    report.replace_spec(path, spec)
    return spec


