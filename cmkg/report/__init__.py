"""Reports: the paper's tables and figures, regenerated from stored result records only.

The ablation runner writes one Parquet file per table, ``RESULTS_DIR/{table}.parquet``
(``write_records``): one row per cell (table, row, column, seed) in ``SCHEMA``, and the table's
spec (title, columns and their metrics, rows with the paper's numbers, comparisons, notes, seeds,
preset, the figures it draws) as JSON under the schema metadata key ``cmkg.table``.
``render_reports`` turns those files, and nothing else, into ``reports/``: ``{table}.md`` and
``{table}.csv`` (and ``{table}_comparisons.csv``), ``figure4.png``, ``figure5.png`` and a
``README.md`` index.

    records.py   the record schema, Parquet write/read, spec checks, the failed record
    stats.py     cell summaries, paired intervals, relative effects, t-tests, Holm, verdicts
    format.py    numbers, intervals, Markdown and CSV as every file writes them
    tables.py    one table's Markdown and CSV files
    figures.py   Figures 4 and 5 (from the records, or from stage folders), histograms
    index.py     the folder's README.md
    render.py    render_reports: all of the above into a folder
"""

from cmkg.histograms import BINS, histogram
from cmkg.report.figures import (
    FIGURES,
    check_figures,
    fig5_from_artifacts,
    figure4,
    figure5,
    flat_weights,
    parameter_histograms,
)
from cmkg.report.index import readme_markdown
from cmkg.report.records import (
    METRICS,
    SCHEMA,
    SPEC_KEY,
    failed_record,
    load_records,
    read_records,
    read_spec,
    replace_spec,
    spec_problems,
    write_records,
)
from cmkg.report.render import render_reports
from cmkg.report.stats import (
    INCONCLUSIVE,
    KINDS,
    NO_EFFECT_CLAIMED,
    OPPOSITE,
    SAME,
    SMALLER,
    evaluate,
    holm,
    paired_interval,
    t_test,
    verdict,
)
from cmkg.report.tables import comparisons_csv, table_csv, table_markdown

__all__ = [
    "BINS", "FIGURES", "INCONCLUSIVE", "KINDS", "METRICS", "NO_EFFECT_CLAIMED", "OPPOSITE",
    "SAME", "SCHEMA", "SMALLER", "SPEC_KEY", "check_figures", "comparisons_csv", "evaluate",
    "failed_record", "fig5_from_artifacts", "figure4", "figure5", "flat_weights", "histogram",
    "holm", "load_records", "paired_interval", "parameter_histograms", "read_records",
    "read_spec", "readme_markdown", "render_reports", "replace_spec", "spec_problems",
    "t_test", "table_csv", "table_markdown", "verdict", "write_records",
]
