"""The CLI's promises about where results go: a bare reproduce or ablate never touches the
committed reports/, and replacing records of another run needs --force; reproduce's last step,
the phi diagnostics (--phi-seeds)."""

import json
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
    # then the phi diagnostics (default --phi-seeds 3) into the same folder: their stages went
    # to the executor after the tables' (per seed a teacher, a student, five meta stages), each
    # seed is recorded as failed, and the index links them
    assert len(no_training) >= 2 and no_training[-1] == 3 * 7
    doc = json.loads((written / "results" / "phi.json").read_text())
    assert doc["seeds"] == [0, 1, 2] and [r["status"] for r in doc["records"]] == ["failed"] * 3
    assert (store / "_results" / "smoke" / "phi.json").read_text() == \
        (written / "results" / "phi.json").read_text()  # the store's copy, for cmkg runs gc
    readme = (written / "README.md").read_text(encoding="utf-8")
    assert "## φ diagnostics" in readme and "0 measured, 3 failed" in readme
    assert "[phi.md](phi.md)" in readme and (written / "phi.md").is_file()


@pytest.fixture
def stubbed(monkeypatch):
    """The tables' runner and the phi run replaced by stubs that record their calls (in order)
    and return the status given in ``status``; phi's checks (``preflight``) stay real."""
    from cmkg import ablation
    from cmkg.ablation import phi

    calls, status = [], {"tables": 0, "phi": 0}
    real = phi.preflight

    def preflight(*args, **kwargs):
        calls.append(("preflight", kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "run", lambda *a, **kw: calls.append(("tables", kw))
                        or status["tables"])
    monkeypatch.setattr(phi, "run", lambda *a, **kw: calls.append(("phi", kw)) or status["phi"])
    monkeypatch.setattr(phi, "preflight", preflight)
    return calls, status


def test_reproduce_runs_the_phi_diagnostics_after_the_tables(tmp_path, capsys, stubbed):
    calls, status = stubbed
    common = ["--store", str(tmp_path / "runs"), "--report", str(tmp_path / "rep"),
              "--address", "head:6379", "--cpus-per-worker", "3"]
    assert cli.main(["reproduce", *common]) == 0
    assert [c for c, _ in calls] == ["preflight", "tables", "phi"]  # checked before the tables
    phi = calls[-1][1]
    assert (phi["seeds"], phi["report_dir"], phi["address"], phi["cpus_per_worker"],
            phi["force"], phi["dry"]) == (3, str(tmp_path / "rep"), "head:6379", 3, False, False)
    assert phi["report_dir"] == calls[1][1]["report_dir"]
    calls.clear()
    assert cli.main(["reproduce", *common, "--phi-seeds", "2", "--dry-run", "--force"]) == 0
    assert [c for c, _ in calls] == ["preflight", "tables", "phi"]
    assert (calls[-1][1]["seeds"], calls[-1][1]["dry"], calls[-1][1]["force"]) == (2, True, True)
    calls.clear()
    assert cli.main(["reproduce", *common, "--phi-seeds", "0"]) == 0  # 0 skips them
    assert [c for c, _ in calls] == ["tables"]
    calls.clear()
    status["phi"] = 1  # a seed not measured fails the command, as a failed cell does
    assert cli.main(["reproduce", *common]) == 1
    calls.clear()
    capsys.readouterr()
    assert cli.main(["reproduce", *common, "--phi-seeds", "-1"]) == 2
    assert "--phi-seeds must be >= 0" in capsys.readouterr().err and calls == []
    with pytest.raises(SystemExit) as e:  # ablate has no phi step
        cli.main(["ablate", "ablations/table2.yaml", "--phi-seeds", "1"])
    assert e.value.code == 2


def test_reproduce_does_not_replace_phi_records_of_other_seeds(tmp_path, capsys, stubbed):
    """phi.json of other seeds stops reproduce before the tables run, as theirs do; --force
    or the same seeds go on."""
    from cmkg.ablation import phi

    calls, _ = stubbed
    rep = tmp_path / "rep"
    phi.write_phi(rep / "results" / "phi.json", preset="smoke", seeds=[0, 1], permutations=100,
                  records=[])
    argv = ["reproduce", "--store", str(tmp_path / "runs"), "--report", str(rep)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "phi.json holds the phi records of preset 'smoke', seeds [0, 1]" in err
    assert "--phi-seeds 0 skips them" in err and [c for c, _ in calls] == ["preflight"]
    calls.clear()
    assert cli.main([*argv, "--phi-seeds", "2"]) == 0  # the same seeds: a refresh
    assert cli.main([*argv, "--force"]) == 0
    assert [c for c, _ in calls] == ["preflight", "tables", "phi"] * 2


def test_the_readme_example_cannot_replace_the_committed_records(tmp_path, capsys):
    """`cmkg reproduce --config cpu --seeds 3 --report reports` would replace Table 2's 5-seed
    records with 3 seeds: it stops before anything is planned into the store or written."""
    before = _snapshot(REPORTS)
    rc = cli.main(["reproduce", "--config", "cpu", "--seeds", "3", "--report", str(REPORTS),
                   "--store", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "table2.parquet" in err and "--force" in err
    assert _snapshot(REPORTS) == before and not (tmp_path / "runs").exists()


# -- flags: spelled out, unknown ones named, renamed ones pointing to their new name ----------

def _commands(parser, path=()):
    """(path, parser) of every parser: the top level, each subcommand, theirs."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


def _leaves():
    return [(path, p) for path, p in _commands(cli.build_parser()) if p._subparsers is None]


def test_every_command_refuses_an_abbreviated_flag(capsys):
    """`cmkg ablate X --seed 1` is not `--seeds 1`: each command, given a prefix of one of its
    long flags, exits 2 naming that prefix (and the flag it resembles)."""
    parsers = list(_commands(cli.build_parser()))
    assert len(parsers) > 20 and all(not p.allow_abbrev for _, p in parsers)
    for path, parser in _leaves():
        flags = sorted(f for f in parser._option_string_actions if f.startswith("--")
                       and f != "--help")
        assert flags, path
        flag = max(flags, key=len)  # a prefix that is no other flag of the command
        abbrev = next(flag[:n] for n in range(len(flag) - 1, 2, -1)
                      if flag[:n] not in parser._option_string_actions)
        with pytest.raises(SystemExit) as e:  # parsing only: nothing runs
            cli.build_parser().parse_args([*path, abbrev, "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2, (path, abbrev)
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"cmkg {' '.join(path)}: error: unrecognized arguments: "
                               f"{abbrev}"), (path, err)
        assert "did you mean --" in last, (path, err)


def test_the_issue_examples_are_refused(capsys):
    for argv, flag, meant in ((["ablate", "ablations/table2.yaml", "--seed", "1"], "--seed",
                               "--seeds"), (["runs", "ls", "--stor", "x"], "--stor", "--store"),
                              (["tune", "tune_spaces/x.yaml", "--trial", "3"], "--trial",
                               "--trials")):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(argv)
        assert e.value.code == 2
        assert f"unrecognized arguments: {flag} (did you mean {meant}?)" in \
            capsys.readouterr().err


def test_a_renamed_flag_names_its_new_name(capsys):
    """`cmkg report --out X` failed on X ("invalid choice: 'X' (choose from 'tune')"); now the
    flag is the error, with its new name."""
    for argv in (["report", "--out", "X"], ["report", "--out=X"]):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "invalid choice" not in err
        assert err.strip().splitlines()[-1] == ("cmkg report: error: unrecognized arguments: "
                                                "--out (--out was renamed --report)")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["ablate", "a.yaml", "--cpus-per-task", "2", "--out", "runs"])
    assert ("--cpus-per-task --out (--cpus-per-task was renamed --cpus-per-worker; --out was "
            "renamed --store)") in capsys.readouterr().err
    # every entry of the table: a command that has the new flag and no longer the old one
    leaves = {" ".join(path): p for path, p in _leaves()}
    for command, renamed in cli.RENAMED.items():
        for old, new in renamed.items():
            flags = leaves[command]._option_string_actions
            assert new in flags and old not in flags, (command, old, new)
