"""The run index (cmkg.runs) over a tiny real store: a teacher and three students of 1 epoch."""

import dataclasses
import os
import shutil

import pytest
import yaml

from cmkg import config, runs
from cmkg.errors import UserError

TINY = ["data.source.num=240", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32",
        "epochs.teacher=1", "epochs.student=1", "epochs.kd=1"]
# what TINY changes in the smoke preset (data.root, run.store, run.progress, run.threads are
# set too, but cannot change a result)
TINY_DIFFERS = {"data.source.num": 240, "data.source.size": 32, "data.target.num": 120,
                "data.target.size": 32, "optim.batch_size": 16, "epochs.teacher": 1,
                "epochs.student": 1, "epochs.kd": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """{name: artifact} of a store holding a teacher, a student (smoke's lr 1e-3), one with
    optim.lr=3e-3 and one with run.seed=1."""
    import torch

    from cmkg import stages

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = tmp_path_factory.mktemp("runs_index")
    base = TINY + [f"data.root={tmp / 'data'}", f"run.store={tmp / 'runs'}",
                   "run.progress=none", f"run.threads={min(2, os.cpu_count() or 1)}"]
    arts = {name: stages.run_stage(stage, config.load("smoke", base + extra))
            for name, stage, extra in [("teacher", "teacher", []), ("student", "student", []),
                                       ("fast", "student", ["optim.lr=3e-3"]),
                                       ("seed1", "student", ["run.seed=1"])]}
    return tmp / "runs", arts


def keys(entries):
    return {e.key for e in entries}


def test_index_lists_finished_artifacts_only(store):
    root, arts = store
    # what a store holds besides artifacts: the writer locks training left, an unfinished
    # run that got as far as meta.json, a mirror's temporary download folder
    assert list(root.glob("student/*.lock"))
    done = arts["student"].path
    shutil.copytree(done, root / "student" / "0123456789abcdef0123.partial")
    shutil.copytree(done, root / "student" / ".tmp-0123456789abcdef0123-x")
    (root / "student" / "fedcba9876543210fedc").mkdir()  # no meta.json yet

    entries = runs.index(root)
    assert sorted((e.stage, e.key) for e in entries) == sorted(
        (a.stage, a.key) for a in arts.values())
    by_key = {e.key: e for e in entries}
    for art in arts.values():
        e = by_key[art.key]
        assert e.path == f"{root}/{art.stage}/{art.key[:20]}" and e.name == art.path.name
        assert e.test_epe_mm == art.metrics["test"]["epe_mm"] > 0
        assert e.best_val_epe_mm == art.metrics["best_val_epe_mm"]
        assert e.started == art.meta["started"] and e.duration_s > 0
        assert e.preset == "smoke" and e.config["optim.batch_size"] == 16
    assert by_key[arts["seed1"].key].seed == 1 and by_key[arts["fast"].key].seed == 0


def test_differing_entries(store):
    root, arts = store
    by_key = {e.key: e for e in runs.index(root)}
    assert by_key[arts["student"].key].differs == TINY_DIFFERS
    assert by_key[arts["teacher"].key].differs == TINY_DIFFERS
    assert by_key[arts["fast"].key].differs == {**TINY_DIFFERS, "optim.lr": 0.003}
    assert by_key[arts["seed1"].key].differs == {**TINY_DIFFERS, "run.seed": 1}


def test_select_by_config_entry_stage_and_seed(store):
    root, arts = store
    entries = runs.index(root)
    fast = {arts["fast"].key}
    assert keys(runs.select(entries, where=["optim.lr=3e-3"])) == fast  # YAML 1.1: a string
    assert keys(runs.select(entries, where=["optim.lr=0.003"])) == fast
    slow = runs.select(entries, stage="student", where=["optim.lr=1e-3"])
    assert keys(slow) == {arts["student"].key, arts["seed1"].key}
    assert keys(runs.select(entries, stage="teacher")) == {arts["teacher"].key}
    assert keys(runs.select(entries, seed=1)) == {arts["seed1"].key}
    assert keys(runs.select(entries, stage="student", seed=0, where=["optim.lr=0.001"])) == {
        arts["student"].key}
    # strings, null sections and lists
    assert len(runs.select(entries, where=["model.student=resnet10"])) == 4
    assert runs.select(entries, where=["model.student=resnet18"]) == []
    assert runs.select(entries, where=["optim.lr=fast"]) == []
    assert len(runs.select(entries, where=["data.augment=null", "data.split=[0.8, 0.1, 0.1]"])) == 4
    assert runs.select(entries, where=["data.split=[0.7, 0.2, 0.1]"]) == []


def test_unknown_where_key_is_a_user_error(store):
    entries = runs.index(store[0])
    with pytest.raises(UserError, match=r"optim\.lrr: unknown config key \(did you mean 'optim\.lr'"):
        runs.select(entries, where=["optim.lrr=1e-3"])
    with pytest.raises(UserError, match=r"--where lr: unknown config key \(did you mean 'optim\.lr'"):
        runs.select(entries, where=["lr=1e-3"])
    with pytest.raises(UserError, match="expected key=value"):
        runs.select(entries, where=["optim.lr"])
    with pytest.raises(UserError, match="unknown stage 'students'"):
        runs.select(entries, stage="students")
    with pytest.raises(UserError, match="no such folder"):
        runs.index(store[0] / "nowhere")


def test_format_table(store):
    root, arts = store
    lines = runs.format_table(runs.index(root)).splitlines()
    assert lines[0].split()[:3] == ["KEY", "STAGE", "SEED"] and len(lines) == 5
    assert lines[1].startswith(arts["teacher"].key[:20] + "  teacher")  # stage order first
    students = [a for a in arts.values() if a.stage == "student"]  # started to the second
    in_order = sorted(students, key=lambda a: (a.meta["started"], a.key))
    assert [line[:20] for line in lines[2:]] == [a.key[:20] for a in in_order]
    fast = next(line for line in lines if line.startswith(arts["fast"].key[:20]))
    assert fast.endswith(  # --set syntax, in the config's order
        "  data.source.num=240 data.source.size=32 data.target.num=120 data.target.size=32 "
        "optim.lr=0.003 optim.batch_size=16 epochs.teacher=1 epochs.student=1 epochs.kd=1")
    assert f"{arts['fast'].metrics['test']['epe_mm']:.2f}" in fast
    assert "data.root" not in fast and "run.store" not in fast
    assert "run.seed" not in runs.format_table(runs.select(runs.index(root), seed=1))
    assert runs.format_table([]) == "no finished artifacts match"


def test_format_table_orders_by_stage_then_date(store):
    by_key = {e.key: e for e in runs.index(store[0])}
    arts = store[1]
    dated = [dataclasses.replace(by_key[arts[name].key], started=started) for name, started in
             [("seed1", "2024-01-01T09:00:00"), ("teacher", "2024-03-01T09:00:00"),
              ("fast", "2023-12-31T23:59:59"), ("student", "2024-01-01T08:59:00")]]
    lines = runs.format_table(dated).splitlines()[1:]
    assert [line[:20] for line in lines] == [arts[n].key[:20] for n in
                                             ("teacher", "fast", "student", "seed1")]
    assert "2023-12-31 23:59" in lines[1]


def test_defaults_without_a_preset(store, tmp_path):
    """A config naming no preset differs from the dataclass defaults (the paper's); a config
    string compares as the string typed."""
    root, arts = store
    copy = tmp_path / "runs" / "student" / arts["fast"].path.name
    shutil.copytree(arts["fast"].path, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["preset"] = None
    cfg["data"]["source"]["path"] = "2024"  # a shard folder whose name YAML reads as a number
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    (e,) = runs.index(tmp_path / "runs")
    assert runs.select([e], where=["data.source.path=2024"]) == [e]  # a string compares as one
    assert runs.select([e], where=["data.source.path=2024.0"]) == []
    assert e.preset is None
    assert e.differs["model.student"] == "resnet10" and e.differs["optim.lr"] == 0.003
    assert e.differs["epochs.meta"] == 2  # smoke's, against the paper's 100
    assert "optim.weight_decay" not in e.differs and "data.root" not in e.differs


def test_remote_store_is_listed_from_its_uri(store, s3_uri):
    from cmkg import storage

    root, arts = store
    uri = s3_uri("store")
    fs, base = storage.open_uri(uri)
    for art in arts.values():
        storage.upload_dir(art.path, fs, f"{base}/{art.stage}/{art.path.name}")
    storage.upload_file(arts["fast"].path / "model.pt", fs,  # an upload under way: no meta.json
                        f"{base}/student/0123456789abcdef0123/model.pt")
    entries = runs.index(uri)
    assert keys(entries) == {a.key for a in arts.values()}
    e = runs.select(entries, where=["optim.lr=3e-3"])[0]
    assert e.path == f"s3://{base}/student/{arts['fast'].key[:20]}" and "test" not in e.path
    assert e.test_epe_mm == arts["fast"].metrics["test"]["epe_mm"]


def test_cmkg_runs_ls_finds_a_stage_by_a_config_entry(store, capsys):
    """The command users run to find the key to pass on: one line, the fast student's."""
    from cmkg import cli

    root, arts = store
    assert cli.main(["runs", "ls", "--store", str(root), "--where", "optim.lr=0.003"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == [arts["fast"].key[:20], "student", "0"]
    assert cli.main(["runs", "ls", "--store", str(root), "--stage", "teacher"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == [arts["teacher"].key[:20]]
    assert cli.main(["runs", "ls", "--store", str(root), "--where", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
