"""The CLI's promises about where results go: a bare reproduce or ablate never touches the
committed reports/, and replacing records of another run needs --force."""

from pathlib import Path

import pytest

from cmkg import cli, stages

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"


def _snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """The Ray executor replaced by one that trains nothing (every stage fails at once), and
    no dataset rendering: what remains is the runner's bookkeeping, records and report."""
    import cmkg.cluster.ablate

    calls = []

    def execute(nodes, on_done, **kwargs):
        calls.append(len(nodes))
        for node in nodes:
            on_done(node, None, "RuntimeError: not trained in this test")

    monkeypatch.setattr(cmkg.cluster.ablate, "execute", execute)
    monkeypatch.setattr(stages, "ensure_dataset", lambda *args, **kwargs: None)
    return calls


def test_bare_reproduce_writes_beside_its_store_not_into_reports(tmp_path, monkeypatch, capsys,
                                                                 no_training):
    monkeypatch.chdir(ROOT)  # where `reports` would resolve to the committed folder
    before = _snapshot(REPORTS)
    store = tmp_path / "runs"
    rc = cli.main(["reproduce", "--seeds", "1", "--store", str(store),
                   "--set", f"data.root={tmp_path / 'data'}"])
    assert rc == 1 and no_training  # every stage "failed": nothing was trained
    written = store / "reports" / "smoke"
    assert sorted(p.name for p in (written / "results").glob("*.parquet")) == [
        "table1.parquet", "table2.parquet", "table3.parquet"]
    assert (written / "README.md").is_file()
    assert _snapshot(REPORTS) == before


def test_the_readme_example_cannot_replace_the_committed_records(tmp_path, capsys):
    """`cmkg reproduce --config cpu --seeds 3 --report reports` would replace Table 2's 5-seed
    records with 3 seeds: it stops before anything is planned into the store or written."""
    before = _snapshot(REPORTS)
    rc = cli.main(["reproduce", "--config", "cpu", "--seeds", "3", "--report", str(REPORTS),
                   "--store", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "table2.parquet" in err and "--force" in err
    assert _snapshot(REPORTS) == before and not (tmp_path / "runs").exists()
