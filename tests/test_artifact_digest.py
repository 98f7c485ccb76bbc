"""Digests of published artifacts (issue 28): a truncated file of a cached stage is found on the
next run (the folder moved aside with one line naming the file, the stage retrained), a corrupt
input given by path is one line and exit 2, and an artifact published before digests existed is
still a cache hit."""

import dataclasses
import hashlib
import json
import shutil

import pytest

from cmkg import cli, config, runs, stages, storage
from cmkg.errors import DataError

SETTINGS = ["data.source.num=200", "data.target.num=120", "optim.batch_size=16",
            "epochs.teacher=1", "epochs.student=1", "epochs.kd=1", "epochs.meta=1",
            "epochs.target=1", "run.progress=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """teacher, student and meta of a tiny config, trained once; each test copies the store."""
    tmp = tmp_path_factory.mktemp("digest")
    cfg = config.load("smoke", [*SETTINGS, f"data.root={tmp / 'data'}",
                                f"run.store={tmp / 'runs'}"])
    stages.run_stage("meta", cfg)
    return cfg


@pytest.fixture
def cfg(trained, tmp_path):
    shutil.copytree(trained.run.store, tmp_path / "runs")
    return dataclasses.replace(trained, run=dataclasses.replace(trained.run,
                                                                store=str(tmp_path / "runs")))


def _folder(cfg, stage):
    return stages.Store.of(cfg).final(stage, stages.stage_key(stage, cfg)[0])


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _cli(cfg, stage, *sets):
    args = ["train", stage, "--config", "smoke", "--store", cfg.run.store]
    for s in (*SETTINGS, f"data.root={cfg.data.root}", *sets):
        args += ["--set", s]
    return cli.main(args)


def test_publishing_records_the_sha256_of_every_file(cfg):
    for stage, extra in (("teacher", set()), ("meta", {"phi.pt"})):
        folder = _folder(cfg, stage)
        recorded = json.loads((folder / "digest.json").read_text())["sha256"]
        assert set(recorded) == {"model.pt", "metrics.json", "config.yaml", "meta.json", *extra}
        for name, digest in recorded.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        assert "sha256" not in (folder / "meta.json").read_text()  # no part of key or record


@pytest.mark.parametrize("stage, name", [("teacher", "model.pt"), ("teacher", "metrics.json"),
                                         ("meta", "phi.pt")])
def test_truncated_file_of_a_cached_stage_is_set_aside_and_retrained(cfg, capsys, stage, name):
    folder = _folder(cfg, stage)
    _truncate(folder / name)
    capsys.readouterr()
    art = stages.run_stage(stage, cfg)
    err = capsys.readouterr().err
    (aside,) = folder.parent.glob(f"{folder.name}.corrupt-*")
    (line,) = [ln for ln in err.splitlines() if "corrupt" in ln]
    assert line == (f"{stage}: corrupt artifact: {folder / name}: sha256 differs from "
                    f"digest.json (truncated or changed); moved aside to {aside.name}, to be "
                    "trained again")
    assert f"{stage}: cached" not in err and f"{stage}: training" in err
    assert art.path == folder and stages.check_artifact(folder) is None
    assert (aside / name).stat().st_size < (folder / name).stat().st_size
    if stage == "meta":
        art.load_phi()
    assert [e.path for e in runs.index(cfg.run.store) if ".corrupt-" in e.path] == []


def test_cli_after_truncating_the_teacher_retrains_it_then_kd_runs(cfg, capsys):
    """The issue's case: was "teacher: cached", then a PyTorch traceback from ``train kd``."""
    _truncate(_folder(cfg, "teacher") / "model.pt")
    assert _cli(cfg, "teacher") == 0
    err = capsys.readouterr().err
    assert "teacher: corrupt artifact" in err and "teacher: cached" not in err
    assert _cli(cfg, "kd") == 0
    err = capsys.readouterr().err
    assert "teacher: cached" in err and "kd: test EPE" in err


def test_artifact_without_digest_is_still_a_cache_hit(cfg, capsys):
    for stage in ("teacher", "student", "meta"):  # as published before digests existed
        (_folder(cfg, stage) / "digest.json").unlink()
    capsys.readouterr()
    art = stages.run_stage("meta", cfg)
    err = capsys.readouterr().err
    assert "meta: cached" in err and "training" not in err and "corrupt" not in err, err
    assert art.load_phi().names and art.load_model() is not None
    # what can be checked cheaply still is: a truncated model.pt has lost its zip directory
    folder = _folder(cfg, "teacher")
    _truncate(folder / "model.pt")
    teacher = stages.run_stage("teacher", cfg)
    err = capsys.readouterr().err
    assert f"teacher: corrupt artifact: {folder / 'model.pt'}: unreadable" in err
    assert (teacher.path / "digest.json").is_file()  # the retrained one has its digest


def test_legacy_artifact_whose_weights_do_not_load_is_a_data_error(cfg):
    """Bytes changed inside model.pt keep its zip directory: without a digest that passes the
    cheap check, and loading it is one DataError naming the file, not a traceback."""
    folder = _folder(cfg, "teacher")
    (folder / "digest.json").unlink()
    data = bytearray((folder / "model.pt").read_bytes())
    data[100:4000] = bytes(3900)  # the pickle record and the first tensor's start
    (folder / "model.pt").write_bytes(bytes(data))
    art = stages.Store.of(cfg).get("teacher", stages.stage_key("teacher", cfg)[0])
    assert art is not None
    with pytest.raises(DataError, match=f"{folder / 'model.pt'}: cannot be loaded"):
        art.load_model()


@pytest.mark.parametrize("stage, name, key, target", [
    ("teacher", "model.pt", "inputs.teacher", "kd"),
    ("meta", "phi.pt", "regularizer.prior", "target")])
def test_corrupt_explicit_input_is_one_line_and_exit_2(cfg, tmp_path, capsys, stage, name, key,
                                                       target):
    given = tmp_path / "given"
    shutil.copytree(_folder(cfg, stage), given)
    _truncate(given / name)
    capsys.readouterr()
    assert _cli(cfg, target, f"{key}={given}") == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkg: error:")]
    assert lines == [f"cmkg: error: {key}={given}: corrupt artifact: {given / name}: sha256 "
                     "differs from digest.json (truncated or changed)"], err
    assert "Traceback" not in err and "training" not in err
    assert (given / name).is_file()  # the user's folder is left as it is


def test_remote_store_checks_the_mirror_and_downloads_again(s3_uri, cfg, tmp_path, capsys):
    uri = s3_uri("runs")
    remote = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, store=uri,
                                                              cache=str(tmp_path / "mirror")))
    art = stages.run_stage("teacher", remote)
    assert "digest.json" in {i.base_name for i in _remote_listing(uri, art)}
    _truncate(art.path / "model.pt")  # the mirror's copy: the remote one is sound
    capsys.readouterr()
    again = stages.run_stage("teacher", remote)
    err = capsys.readouterr().err
    assert "teacher: corrupt artifact" in err and "teacher: training" not in err
    assert again.path == art.path and stages.check_artifact(again.path) is None
    # a corrupt remote copy: a fresh mirror finds it after downloading and retrains
    fs, base = storage.open_uri(uri)
    where = f"{base}/teacher/{art.path.name}/model.pt"
    with fs.open_output_stream(where) as f:
        f.write(b"not a model")
    other = dataclasses.replace(remote, run=dataclasses.replace(remote.run,
                                                                cache=str(tmp_path / "other")))
    fresh = stages.run_stage("teacher", other)
    err = capsys.readouterr().err
    assert "(as downloaded from s3://" in err and "teacher: training" in err
    assert err.count("corrupt artifact") == 1  # downloaded and set aside once, not per look
    assert stages.check_artifact(fresh.path) is None


def _remote_listing(uri, art):
    import pyarrow.fs as pafs

    fs, base = storage.open_uri(uri)
    return fs.get_file_info(pafs.FileSelector(f"{base}/teacher/{art.path.name}"))
