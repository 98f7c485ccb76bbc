"""Artifact stores and datasets on a pyarrow filesystem URI: a real S3 protocol (moto server)."""

import json
import re

import pyarrow.fs as pafs
import pytest

from cmkg import cli, stages, storage
from cmkg.data import read_manifest
from cmkg.stages import Store


def _cfg(cfg, **run):
    from dataclasses import replace

    return replace(cfg, run=replace(cfg.run, **run))


def _remote_files(uri: str, sub: str) -> set[str]:
    fs, base = storage.open_uri(uri)
    sel = pafs.FileSelector(f"{base}/{sub}", recursive=True, allow_not_found=True)
    return {i.path[len(base) + len(sub) + 2:] for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File}


def test_stage_publishes_to_s3_and_another_machine_reuses_it(s3_uri, tiny_cfg, tmp_path):
    uri = s3_uri("runs")
    cfg = _cfg(tiny_cfg, store=uri, cache=str(tmp_path / "mirror-a"))
    art = stages.run_stage("teacher", cfg)
    key = stages.stage_key("teacher", cfg)[0]
    folder = f"teacher/{key[:20]}"
    assert _remote_files(uri, folder) >= {"model.pt", "metrics.json", "meta.json", "config.yaml"}
    assert art.path == tmp_path / "mirror-a" / folder  # readers open the local mirror
    # "another machine": an empty mirror finds the artifact by URI and downloads it, no training
    other = Store(uri, tmp_path / "mirror-b")
    again = stages.run_stage("teacher", cfg, store=other)
    assert again.path == tmp_path / "mirror-b" / folder
    assert (again.path / "model.pt").read_bytes() == (art.path / "model.pt").read_bytes()
    assert again.metrics == art.metrics
    # the per-epoch checkpoint went to the store while training and is gone once published
    assert not _remote_files(uri, f"{folder}.partial")
    assert not (tmp_path / "mirror-a" / f"{folder}.partial").exists()


def test_interrupted_upload_is_invisible_then_finished(s3_uri, tiny_cfg, tmp_path, monkeypatch):
    uri = s3_uri("runs")
    cfg = _cfg(tiny_cfg, store=uri, cache=str(tmp_path / "mirror-a"))
    real = storage.upload_file

    def dies_on_commit(src, fs, dst):
        if src.name == storage.COMMIT_FILE:
            raise ConnectionError("network gone")
        real(src, fs, dst)

    monkeypatch.setattr(storage, "upload_file", dies_on_commit)
    with pytest.raises(ConnectionError):
        stages.run_stage("teacher", cfg)
    key = stages.stage_key("teacher", cfg)[0]
    uploaded = _remote_files(uri, f"teacher/{key[:20]}")
    assert "model.pt" in uploaded and storage.COMMIT_FILE not in uploaded  # meta.json goes last
    assert Store(uri, tmp_path / "mirror-b").get("teacher", key) is None  # not half an artifact
    monkeypatch.setattr(storage, "upload_file", real)
    # the machine that published locally finishes the upload the next time it looks
    assert Store(uri, tmp_path / "mirror-a").get("teacher", key) is not None
    assert Store(uri, tmp_path / "mirror-c").get("teacher", key) is not None


def test_in_process_run_resumes_on_another_machine(s3_uri, tiny_cfg, tmp_path, monkeypatch,
                                                   capfd):
    uri = s3_uri("runs")
    cfg = _cfg(tiny_cfg, store=uri, cache=str(tmp_path / "mirror-a"), progress="lines")
    real = Store.push_checkpoint

    def preempted(self, stage, key, local):
        real(self, stage, key, local)
        raise KeyboardInterrupt  # the machine goes away right after epoch 1's checkpoint

    monkeypatch.setattr(Store, "push_checkpoint", preempted)
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage("teacher", cfg)
    monkeypatch.setattr(Store, "push_checkpoint", real)
    capfd.readouterr()
    art = stages.run_stage("teacher", _cfg(cfg, cache=str(tmp_path / "mirror-b")))
    err = capfd.readouterr().err
    assert "resuming" in err and "after epoch 1/2" in err
    assert [h["epoch"] for h in art.metrics["history"]] == [1, 2]
    assert re.search(r"epoch\s+2/2\s+loss", err)
    assert not re.search(r"epoch\s+1/2\s+loss", err)  # epoch 1 was not trained again


def test_dataset_and_prior_by_uri(s3_uri, tiny_cfg, tmp_path):
    from dataclasses import replace

    local = stages.ensure_dataset(tiny_cfg.data.target, tiny_cfg)
    fs, base = storage.open_uri(s3_uri("datasets/stb"))
    storage.upload_dir(local, fs, base, last="manifest.json")
    spec = replace(tiny_cfg.data.target, path=s3_uri("datasets/stb"))
    cfg = replace(tiny_cfg, data=replace(tiny_cfg.data, target=spec,
                                         root=str(tmp_path / "node-data")))
    ident = stages.dataset_identity(spec, cfg)
    assert ident == {"fingerprint": read_manifest(local)["fingerprint"]}
    mirrored = stages.ensure_dataset(spec, cfg)
    assert mirrored.parent == tmp_path / "node-data" / "remote"
    assert read_manifest(mirrored)["fingerprint"] == ident["fingerprint"]
    art = stages.run_stage("target", cfg)
    assert art.metrics["test"]["epe_mm"] > 0


def test_unusable_store_uri_is_a_user_error(tmp_path, capsys):
    code = cli.main(["train", "teacher", "--config", "smoke", "--set", "run.progress=none",
                     "--set", f"data.root={tmp_path}", "--store", "nosuchscheme://bucket/runs"])
    assert code == 2
    err = capsys.readouterr().err
    assert "run.store='nosuchscheme://bucket/runs'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_missing_remote_artifact_names_the_key(s3_uri, tiny_cfg):
    from cmkg.errors import DataError

    with pytest.raises(DataError, match="regularizer.prior=.*no meta.json"):
        stages.open_artifact(s3_uri("runs/meta/none"), tiny_cfg, "regularizer.prior")


def test_remote_layout_matches_local(tmp_path):
    store = Store(f"file://{tmp_path}/remote", tmp_path / "mirror")
    assert store.remote and store.location("kd", "ab" * 32) == f"{tmp_path}/remote/kd/{'ab' * 10}"
    assert store.ray_storage() == (f"{tmp_path}/remote/_ray", store.fs)
    assert json.dumps(Store(tmp_path / "plain").ray_storage()[1]) == "null"
