"""The committed reports/ are what `cmkg report` makes of the committed records, byte for byte."""

import re
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name, rows", [("positive", ("oracle", "source-weights")),
                                        ("planted", ("planted", "source-weights")),
                                        ("planted_fixed_point", ("fixed point", "φ*"))])
def test_the_positive_controls_reports_are_apart_and_rebuild(tmp_path, capsys, name, rows):
    """reports/positive/ (ablations/positive.yaml), reports/planted/ (ablations/planted.yaml)
    and reports/planted_fixed_point/ (ablations/planted_fixed_point.yaml) hold the positive
    controls: each its own records and report, rebuilt byte for byte, and none of their rows in
    the main report's verdicts."""
    folder = REPORTS / name
    assert [p.name for p in (folder / "results").glob("*.parquet")] == [f"{name}.parquet"]
    assert cli.main(["report", "--results", str(folder / "results"), "--report", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.md")) + \
        sorted(p.name for p in tmp_path.glob("*.csv"))
    assert {"README.md", f"{name}.md", f"{name}.csv"} <= set(written)
    for file in written:
        assert (tmp_path / file).read_bytes() == (folder / file).read_bytes(), file
    main = (REPORTS / "README.md").read_text()
    assert not any(r in main for r in rows)


def test_committed_reports_name_no_machine_path():
    """Committed files are read on other machines: no absolute path of the one that wrote them
    (a store, a data root, a home or temp folder) in any text file under reports/."""
    pattern = re.compile(r"(?<![\w.])/(root|home|tmp|work|Users|mnt|var/folders)/|[A-Z]:\\\\")
    found = []
    for path in sorted(REPORTS.rglob("*")):
        if path.suffix in (".md", ".csv", ".yaml", ".yml", ".json", ".txt") and path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPORTS)}:{n}: {line.strip()[:80]}")
    assert not found, "\n".join(found)
