"""Stages under Ray Train on a Ray started by the test (never a stray cluster)."""

from pathlib import Path

import pytest

from cmkg import stages
from cmkg.errors import UserError

pytestmark = pytest.mark.ray


def test_two_workers_publish_the_same_artifact_as_in_process(local_ray, tiny_cfg):
    from cmkg.cluster.train import run_stage_ray

    art = run_stage_ray("teacher", tiny_cfg, workers=2, max_failures=0)
    key, spec, _ = stages.stage_key("teacher", tiny_cfg)
    assert art.key == key and art.meta["spec"] == spec  # same key: same cache as in-process
    history = art.metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train"]["loss"] > 0 for h in history)
    assert art.metrics["test"]["epe_mm"] > 0 and (art.path / "model.pt").is_file()
    # a second request is a cache hit, with or without Ray
    assert stages.run_stage("teacher", tiny_cfg).path == art.path
    # Ray Train kept per-epoch checkpoints under the store for resumption
    assert list(Path(tiny_cfg.run.store, "_ray").rglob("checkpoint_*/checkpoint.pt"))


def test_preflight_refuses_workers_that_cannot_fit(local_ray, tiny_cfg):
    from cmkg.cluster.train import run_stage_ray

    with pytest.raises(UserError, match=r"--workers 5 .* cannot fit this Ray cluster"):
        run_stage_ray("student", tiny_cfg, workers=5)
    with pytest.raises(UserError, match="GPU"):
        run_stage_ray("student", tiny_cfg, workers=1, gpus_per_worker=1)



def test_store_on_s3_holds_artifact_and_ray_checkpoints(local_ray, tiny_cfg, s3_uri, tmp_path):
    """run.store as a URI: Ray Train checkpoints to {store}/_ray and rank 0 publishes there."""
    from dataclasses import replace

    import pyarrow.fs as pafs

    from cmkg import storage
    from cmkg.cluster.train import run_stage_ray

    uri = s3_uri("runs")
    cfg = replace(tiny_cfg, run=replace(tiny_cfg.run, store=uri, cache=str(tmp_path / "mirror")))
    art = run_stage_ray("teacher", cfg, workers=1, max_failures=0)
    fs, base = storage.open_uri(uri)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File]
    key = art.key[:20]
    assert f"{base}/teacher/{key}/meta.json" in files and f"{base}/teacher/{key}/model.pt" in files
    assert any(p.startswith(f"{base}/_ray/teacher-{key}/") and p.endswith("/checkpoint.pt")
               for p in files)
    assert art.path == tmp_path / "mirror" / "teacher" / key  # the driver reads its mirror
    assert [h["epoch"] for h in art.metrics["history"]] == [1, 2]


def test_one_worker_stage_as_ray_task_trains_in_process(local_ray, tiny_cfg):
    """The sweep/ablation path: a Ray task receives the planned nodes and trains them
    in-process (no TorchTrainer) into the same artifact keys the in-process run finds."""
    from cmkg.cluster import tasks

    nodes = stages.plan("teacher", tiny_cfg)
    path = local_ray.get(tasks.submit(nodes, cpus_per_worker=1))
    art = stages.open_artifact(path)
    assert art.key == nodes[-1].key == stages.stage_key("teacher", tiny_cfg)[0]
    assert [h["epoch"] for h in art.metrics["history"]] == [1, 2]
    assert not Path(tiny_cfg.run.store, "_ray").exists()  # no Ray Train run was started
    assert stages.run_stage("teacher", tiny_cfg).path == art.path  # cache hit
