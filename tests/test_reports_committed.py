"""The committed reports/ are what `cmkg report` makes of the committed records, byte for byte."""

from pathlib import Path

from cmkg import cli

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def test_cmkg_report_rebuilds_the_committed_markdown(tmp_path, capsys):
    results = sorted((REPORTS / "results").glob("table*.parquet"))
    assert [p.name for p in results] == ["table1.parquet", "table2.parquet", "table3.parquet"]
    assert cli.main(["report", "--results", str(REPORTS / "results"), "--report", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.md"))
    assert written == sorted(p.name for p in REPORTS.glob("*.md"))
    assert {"README.md", "table1.md", "table2.md", "table3.md"} <= set(written)
    for name in written:
        assert (tmp_path / name).read_bytes() == (REPORTS / name).read_bytes(), name
    # every CSV: the tables, their comparisons and, where the folder has phi.json, phi.csv
    csvs = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert csvs == sorted(p.name for p in REPORTS.glob("*.csv"))
    assert {"table1.csv", "table2.csv", "table3.csv"} <= set(csvs)
    for name in csvs:
        assert (tmp_path / name).read_bytes() == (REPORTS / name).read_bytes(), name


def test_the_positive_controls_report_is_apart_and_rebuilds(tmp_path, capsys):
    """reports/positive/ holds the positive controls (ablations/positive.yaml): its own records
    and report, rebuilt byte for byte, and none of its rows in the main report's verdicts."""
    folder = REPORTS / "positive"
    assert [p.name for p in (folder / "results").glob("*.parquet")] == ["positive.parquet"]
    assert cli.main(["report", "--results", str(folder / "results"), "--report", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.md")) + \
        sorted(p.name for p in tmp_path.glob("*.csv"))
    assert {"README.md", "positive.md", "positive.csv"} <= set(written)
    for name in written:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    main = (REPORTS / "README.md").read_text()
    assert "oracle" not in main and "source-weights" not in main
