"""The run index (cmkg.runs) over a tiny real store: a teacher and three students of 1 epoch;
gc over phi.json's references on a hand-made store (folders with meta.json only)."""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cmkg import config, runs
from cmkg.errors import UserError

TINY = ["data.source.num=240", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32",
        "epochs.teacher=1", "epochs.student=1", "epochs.kd=1"]
# what TINY changes in the smoke preset (data.root, run.store, run.progress, run.threads are
# set too, but cannot change a result)
# (the sizes and epochs.kd are smoke's own)
TINY_DIFFERS = {"data.source.num": 240, "data.target.num": 120, "optim.batch_size": 16,
                "epochs.teacher": 1, "epochs.student": 1}


def _base(data, store) -> list[str]:
    return TINY + [f"data.root={data}", f"run.store={store}", "run.progress=none",
                   f"run.threads={min(2, os.cpu_count() or 1)}"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """{name: artifact} of a store holding a teacher, a student (smoke's lr 1e-3), one with
    optim.lr=3e-3 and one with run.seed=1."""
    import torch

    from cmkg import stages

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = tmp_path_factory.mktemp("runs_index")
    base = _base(tmp / "data", tmp / "runs")
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
        "  data.source.num=240 data.target.num=120 "
        "optim.lr=0.003 optim.batch_size=16 epochs.teacher=1 epochs.student=1")
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
    assert e.differs["epochs.meta"] == 1  # smoke's, against the paper's 100
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


def test_cmkg_runs_ls_on_an_empty_or_missing_store_says_so(tmp_path, capsys):
    """Nothing trained yet is no error for ls (exit 0); --where is still checked, and show,
    which needs an artifact, still fails on a missing store."""
    from cmkg import cli

    (tmp_path / "empty" / "teacher").mkdir(parents=True)
    for store in (tmp_path / "empty", tmp_path / "missing"):
        assert cli.main(["runs", "ls", "--store", str(store), "--stage", "kd"]) == 0
        assert capsys.readouterr().out == f"no artifacts in {store} yet\n"
    assert not (tmp_path / "missing").exists()  # ls creates nothing
    assert cli.main(["runs", "ls", "--store", str(tmp_path / "missing"),
                     "--where", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert cli.main(["runs", "show", "abc", "--store", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# -- cmkg runs show / diff / gc -----------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(store):
    """(root, {name: artifact}) of a second store: copies of the first one's four artifacts
    (cache hits for kd's inputs) and a kd stage trained on the teacher and the student."""
    from cmkg import stages

    root, arts = store
    chain_root = root.parent / "chain"
    for art in arts.values():
        shutil.copytree(art.path, chain_root / art.stage / art.path.name)
    kd = stages.run_stage("kd", config.load("smoke", _base(root.parent / "data", chain_root)))
    return chain_root, {**{n: stages.open_artifact(chain_root / a.stage / a.path.name)
                           for n, a in arts.items()}, "kd": kd}


RECORD_SPEC = {"table": "table1", "columns": [{"name": "kd", "metrics": ["epe_mm"]}],
               "rows": [{"label": "L_ACT", "paper": {}}]}


@pytest.fixture
def referenced(chain, tmp_path):
    """A copy of the chain store whose records name the kd stage only (its inputs are kept
    through lineage) and a sweep's best.yaml naming the fast student; seed1 is named by
    nothing."""
    from cmkg.report import write_records

    root = tmp_path / "runs"
    shutil.copytree(chain[0], root)
    kd = chain[1]["kd"]
    write_records(root / "_results" / "smoke" / "table1.parquet", RECORD_SPEC, [
        {"table": "table1", "row": "L_ACT", "column": "kd", "seed": 0, "status": "done",
         "stage": "kd", "key": kd.key, "artifacts": {"kd": kd.key}}])
    fast = chain[1]["fast"]
    (root / "_tune" / "sweep").mkdir(parents=True)
    (root / "_tune" / "sweep" / "best.yaml").write_text(yaml.safe_dump(
        {"stage": "student", "best": {"params": {"optim.lr": 0.003},
                                      "metrics": {"artifact": f"{root}/student/{fast.key[:20]}"}}}))
    (root / "_tune" / "empty").mkdir()  # a sweep where no trial finished names nothing
    (root / "_tune" / "empty" / "best.yaml").write_text(yaml.safe_dump({"best": None}))
    return root, chain[1]


def test_show_lineage_of_a_kd_stage(chain):
    root, arts = chain
    entries = runs.index(root)
    kd = runs.find(entries, arts["kd"].key[:7])
    assert kd.key == arts["kd"].key and kd.inputs == {
        "teacher": arts["teacher"].key, "student": arts["student"].key}
    tree = runs.lineage(kd, entries)
    assert [line.split()[:3] for line in tree] == [
        ["kd", arts["kd"].key[:20], "seed"], ["├──", "teacher", arts["teacher"].key[:20]],
        ["└──", "student", arts["student"].key[:20]]]
    assert f"test EPE {arts['teacher'].metrics['test']['epe_mm']:.2f}" in tree[1]
    text = runs.format_show(kd, entries, [])
    m = arts["kd"].metrics
    for line in (f"test EPE          {m['test']['epe_mm']:.2f} mm",
                 f"test AUC 20-50    {m['test']['auc_20_50']:.3f}",
                 f"best val EPE      {m['best_val_epe_mm']:.2f} mm at epoch {m['best_epoch']}",
                 f"mean pose (test)  {m['mean_pose_test']['epe_mm']:.2f} mm",
                 "config (differs from preset smoke)",
                 "nothing: `cmkg runs gc` would remove it"):
        assert line in text
    config_block = text.split("config (differs from preset smoke)\n")[1].split("\n\n")[0]
    assert [ln.split() for ln in config_block.splitlines()] == [
        [k, str(v)] for k, v in TINY_DIFFERS.items()]
    # an input given from elsewhere: named with its folder
    alone = [e for e in entries if e.key != arts["student"].key]
    assert "└── student " + arts["student"].key[:20] + "  (not in this store: " + str(
        root / "student" / arts["student"].key[:20]) + ")" in runs.lineage(kd, alone)


def test_show_names_the_records_and_sweeps(referenced, capsys):
    from cmkg import cli

    root, arts = referenced
    entries = runs.index(root)
    refs, problems = runs.references(runs.reference_files(root))
    assert problems == []
    by_name = {n: runs.format_show(runs.find(entries, a.key), entries, refs)
               for n, a in arts.items()}
    record = str(root / "_results" / "smoke" / "table1.parquet")
    assert f"{record}: table1 'L_ACT' / 'kd' seed 0" in by_name["kd"]
    kd_id = f"kd/{arts['kd'].key[:20]}"
    assert f"upstream of {kd_id}, which records or sweeps name" in by_name["teacher"]
    assert f"upstream of {kd_id}" in by_name["student"] and record not in by_name["student"]
    assert f"{root / '_tune' / 'sweep' / 'best.yaml'}: best trial of sweep sweep" in by_name["fast"]
    assert "nothing: `cmkg runs gc` would remove it" in by_name["seed1"]
    assert "would remove" not in by_name["kd"] + by_name["fast"] + by_name["teacher"]
    # the command, with a --report folder holding another record
    other = root.parent / "elsewhere"
    from cmkg.report import write_records

    write_records(other / "results" / "table1.parquet", RECORD_SPEC, [
        {"table": "table1", "row": "L_ACT", "column": "kd", "seed": 3, "status": "done",
         "stage": "student", "key": arts["seed1"].key,
         "artifacts": {"student": arts["seed1"].key}}])
    assert cli.main(["runs", "show", arts["seed1"].key[:12], "--store", str(root),
                     "--report", str(other)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"student {arts['seed1'].key[:20]}  {root}/student/")
    assert f"{other / 'results' / 'table1.parquet'}: table1 'L_ACT' / 'kd' seed 3" in out


def test_find_reports_ambiguous_and_unknown_prefixes(chain, capsys):
    from cmkg import cli

    root, arts = chain
    entries = runs.index(root)
    fake = [dataclasses.replace(entries[0], key="abcd" + "0" * 60),
            dataclasses.replace(entries[1], key="abce" + "1" * 60), entries[2]]
    assert runs.find(fake, "abcd").key == "abcd" + "0" * 60
    assert runs.find(fake, f"runs/teacher/abce{'1' * 16}").key == "abce" + "1" * 60  # a path
    with pytest.raises(UserError, match=r"KEY abc: 2 artifacts match") as e:
        runs.find(fake, "abc")
    assert "abcd" + "0" * 16 in str(e.value) and "abce" + "1" * 16 in str(e.value)
    with pytest.raises(UserError, match=r"KEY abf9: no artifact key starts with 'abf9'; the "
                       r"nearest \(2 characters in common\)") as e:
        runs.find(fake, "abf9")
    assert "abcd" + "0" * 16 in str(e.value) and entries[2].name not in str(e.value)
    assert cli.main(["runs", "show", "xyz", "--store", str(root)]) == 2
    assert "KEY xyz: no artifact key starts with" in capsys.readouterr().err


def test_diff_lists_exactly_the_differing_entries(chain, capsys):
    from cmkg import cli

    root, arts = chain
    by_key = {e.key: e for e in runs.index(root)}
    student, fast, seed1, teacher, kd = (by_key[arts[n].key] for n in
                                         ("student", "fast", "seed1", "teacher", "kd"))
    headline = ["test EPE mm", "test AUC 20-50", "best val EPE mm"]

    def labels(a, b):
        return [r[0] for r in runs.diff_rows(a, b)]

    assert labels(student, fast) == ["optim.lr"] + headline
    assert labels(student, seed1) == ["run.seed"] + headline
    assert labels(teacher, student) == ["stage"] + headline  # one config, two stages
    assert labels(student, kd) == ["stage", "input teacher", "input student"] + headline
    assert labels(student, student) == headline
    rows = {r[0]: r for r in runs.diff_rows(student, fast)}
    assert rows["optim.lr"][1:3] == ("0.001", "0.003")
    d = fast.test_epe_mm - student.test_epe_mm
    assert rows["test EPE mm"][1:] == (f"{student.test_epe_mm:.2f}", f"{fast.test_epe_mm:.2f}",
                                       f"{d:+.2f}")
    # run.threads, data.root, ... cannot change a result: never a difference
    other = dataclasses.replace(fast, config={**fast.config, "run.threads": 7,
                                              "data.root": "/elsewhere"})
    assert labels(student, other) == ["optim.lr"] + headline
    assert cli.main(["runs", "diff", arts["student"].key[:10], arts["fast"].key[:10],
                     "--store", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["student", student.name, "student", fast.name, "B", "-", "A"]
    assert [ln.split()[0] for ln in lines[1:]] == ["optim.lr", "test", "test", "best"]


@contextlib.contextmanager
def held(*locks):
    """Hold the writer locks ``locks`` in another process (POSIX locks are per process: this
    one would get them) for the block, as a training stage does."""
    code = ("import fcntl, os, sys\nfs = [open(p, 'a+') for p in sys.argv[1:]]\n"
            "for f in fs:\n    fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "    f.seek(0); f.truncate(); f.write(f'test pid {os.getpid()}'); f.flush()\n"
            "print('held', flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, locks)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(10)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_gc_keeps_what_records_and_sweeps_name(referenced, capsys):
    from cmkg import cli

    root, arts = referenced
    # a leftover of a killed run (its lock free) and a stage in training (its lock held)
    leftover = root / "student" / ("0" * 20 + ".partial")
    shutil.copytree(arts["seed1"].path, leftover)
    (root / "student" / ("0" * 20 + ".lock")).write_text("")
    training = root / "teacher" / ("1" * 20 + ".partial")
    shutil.copytree(arts["teacher"].path, training)
    kd_training = root / "kd" / ("2" * 20 + ".partial")
    kd_training.mkdir()
    for lock in ("1" * 20 + ".lock", "2" * 20 + ".lock"):  # what the writers hold
        (root / ("teacher" if lock[0] == "1" else "kd") / lock).write_text("")
    before = _tree(root)

    with held(training.with_name("1" * 20 + ".lock"), kd_training.with_name("2" * 20 + ".lock")):
        # while a kd trains, every teacher and student may be its input: seed1 stays too
        lines = []
        removed = runs.gc(root, dry_run=True, echo=lines.append)
        assert [r.path for r in removed] == [leftover] and _tree(root) == before
        assert removed[0].size > 0 and lines[-1].startswith("would remove 1 folder(s), ")
    with held(training.with_name("1" * 20 + ".lock")) as pid:
        assert cli.main(["runs", "gc", "--store", str(root), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert _tree(root) == before
        seed1 = arts["seed1"].key[:20]
        assert f"would remove student/{seed1}" in out and "unreferenced" in out
        assert f"would remove student/{leftover.name}" in out and "leftover partial" in out
        assert f"kept     teacher/{training.name}  (a live writer holds its lock: test pid {pid})" \
            in out
        assert cli.main(["runs", "gc", "--store", str(root)]) == 0
        out = capsys.readouterr().out
    assert f"removed      student/{seed1}" in out
    assert out.splitlines()[-1].startswith("removed 3 folder(s), ")  # seed1, both partials
    assert "kept 4 of 5 artifacts: 2 named by records or best.yaml (3 file(s) read), " \
        "2 upstream of them" in out
    assert {e.key for e in runs.index(root)} == {arts[n].key for n in
                                                  ("teacher", "student", "fast", "kd")}
    assert training.is_dir() and not leftover.exists() and not kd_training.exists()
    assert not list(root.rglob(".tmp-gc-*"))
    # the writer has gone (the kernel dropped its lock): its partial is a leftover now
    assert [r.path for r in runs.gc(root, echo=lambda _: None)] == [training]
    assert runs.gc(root, echo=lambda _: None) == []


def test_gc_refuses(referenced, tmp_path):
    root, arts = referenced
    with pytest.raises(UserError, match="local stores only"):
        runs.gc("s3://bucket/runs")
    # a record file it cannot read: nothing removed
    bad = root / "reports" / "cpu" / "results" / "table2.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not parquet")
    before = _tree(root)
    with pytest.raises(UserError, match=r"(?s)cannot tell what these files reference.*table2\.parquet"):
        runs.gc(root)
    assert _tree(root) == before
    with pytest.raises(UserError, match="--report .*nowhere: no such folder"):
        runs.gc(root, [str(tmp_path / "nowhere")], dry_run=True)
    # a store nothing names: refused unless a dry run
    bare = tmp_path / "bare"
    shutil.copytree(arts["seed1"].path, bare / "student" / arts["seed1"].path.name)
    with pytest.raises(UserError, match="names an artifact of this store, so all 1 would be"):
        runs.gc(bare)
    assert len(runs.gc(bare, dry_run=True, echo=lambda _: None)) == 1
    assert len(runs.index(bare)) == 1


def test_references_name_every_seed_of_a_sweep_and_the_cells_that_chose(tmp_path):
    """gc keeps what a multi-seed sweep's best trial trained on each seed (best.per_seed) and
    the chains of the cells that made a choice on choice seeds (the records' chosen column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    best = tmp_path / "sweep" / "best.yaml"
    best.parent.mkdir()
    best.write_text(yaml.safe_dump({"best": {
        "metrics": {"artifact": "/s/target/" + "a" * 20},
        "per_seed": [{"seed": 0, "artifact": "/s/target/" + "a" * 20},
                     {"seed": 1, "artifact": "/s/target/" + "b" * 20}]}}))
    assert {(r.stage, r.name) for r in runs._best_refs(best)} == {
        ("target", "a" * 20), ("target", "b" * 20)}
    rec = tmp_path / "table2.parquet"
    chosen = {"by": "choose", "artifacts": [{"target": "c" * 20, "student": "d" * 20}]}
    pq.write_table(pa.Table.from_pylist([{
        "table": "table2", "row": "l2", "column": "target", "seed": 5, "stage": "target",
        "key": "e" * 64, "artifacts": json.dumps({"target": "e" * 64}),
        "chosen": json.dumps(chosen)}]), rec)
    assert {(r.stage, r.name) for r in runs._record_refs(rec)} == {
        ("target", "e" * 20), ("target", "c" * 20), ("student", "d" * 20)}


def _fake(root, stage, key, **inputs):
    """A finished artifact folder as ``index`` reads it (meta.json, config.yaml), no weights."""
    folder = root / stage / key[:20]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"preset": "smoke", "run": {"seed": 0}}))
    (folder / "meta.json").write_text(json.dumps({"key": key, "stage": stage, "inputs": {
        s: {"key": k, "path": f"{root}/{s}/{k[:20]}"} for s, k in inputs.items()}}))


def test_gc_keeps_what_phi_json_names(tmp_path):
    """phi.json names each seed's variants (meta stages) and their student: gc keeps them and
    their inputs (the teacher of the full variant), wherever a report's phi.json is read from,
    and still removes a meta stage nothing names."""
    from cmkg.ablation.phi import write_phi

    root = tmp_path / "runs"
    teacher, student = "t" * 64, "s" * 64
    _fake(root, "teacher", teacher)
    _fake(root, "student", student)
    variants = {v: f"{i}" * 64 for i, v in enumerate(["full", "order", "half0", "half1",
                                                      "no_teacher"])}
    for v, key in variants.items():
        _fake(root, "meta", key, **({"teacher": teacher} if v == "full" else {}),
              student=student)
    orphan = "9" * 64
    _fake(root, "meta", orphan, teacher=teacher, student=student)
    records = [{"seed": 0, "status": "done", "artifacts": {**variants, "student": student}},
               {"seed": 1, "status": "failed", "error": "meta 0123: boom"}]
    rep = tmp_path / "rep"  # a report folder outside the store: read with --report only
    write_phi(rep / "results" / "phi.json", preset="smoke", seeds=[0, 1], permutations=100,
              records=records)
    with pytest.raises(UserError, match="so all 8 would be removed"):
        runs.gc(root)
    removed = runs.gc(root, [str(rep)], dry_run=True, echo=lambda _: None)
    assert [(r.stage, r.path.name) for r in removed] == [("meta", orphan[:20])]
    refs, problems = runs.references(runs.reference_files(root, [str(rep)]))
    assert not problems and {(r.stage, r.name, r.what) for r in refs} == {
        *(("meta", k[:20], f"phi diagnostics seed 0, {v}") for v, k in variants.items()),
        ("student", student[:20], "phi diagnostics seed 0, student")}
    # the store's copy (cmkg phi writes one to {store}/_results/{preset}/) is read without --report
    (root / "_results" / "smoke").mkdir(parents=True)
    shutil.copy(rep / "results" / "phi.json", root / "_results" / "smoke" / "phi.json")
    removed = runs.gc(root, echo=lambda _: None)
    assert [(r.stage, r.path.name) for r in removed] == [("meta", orphan[:20])]
    assert {e.key for e in runs.index(root)} == {teacher, student, *variants.values()}
    # a phi.json that is not one: nothing removed
    (root / "_results" / "smoke" / "phi.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(UserError, match=r"(?s)cannot tell what these files reference.*phi\.json"):
        runs.gc(root)
    assert len(runs.index(root)) == 7
