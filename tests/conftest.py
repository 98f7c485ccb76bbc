import json
import os
import urllib.request
import uuid

import pytest

from cmkg import config


@pytest.fixture
def tiny_cfg(tmp_path):
    """A seconds-long config: 32 px, a few hundred samples, resnet10, 1-2 epochs per stage."""
    return config.load("smoke", [
        "data.source.num=240", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32",
        "epochs.teacher=2", "epochs.student=2", "epochs.kd=1",
        f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}", "run.progress=none",
    ])


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def s3_uri():
    """A bucket on a local S3 server (moto); yields a function making ``s3://`` URIs that carry
    the endpoint and credentials, so every process (Ray workers too) can open them."""
    moto_server = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    bucket = f"cmkg-{uuid.uuid4().hex[:12]}"  # moto keeps state per process: a fresh bucket
    pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"{host}:{port}",
                      scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(bucket)
    yield lambda prefix: (f"s3://test:test@{bucket}/{prefix}?endpoint_override={host}:{port}"
                          "&scheme=http&region=us-east-1")
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset",
                                                  method="POST"))
    server.stop()


@pytest.fixture
def registered_epoch():
    """Epoch of the latest checkpoint Ray Train's controller has registered (its checkpoint-
    manager snapshot under ``{store}/_ray``), 0 if none yet: a checkpoint folder on disk alone
    does not mean a restart will be given it."""
    def latest(store) -> int:
        for snap in store.glob("_ray/*/checkpoint_manager_snapshot.json"):
            try:
                result = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
                return int(result.get("metrics", {}).get("epoch", 0))
            except (ValueError, OSError):
                return 0
        return 0
    return latest


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray of the test module's own (never a stray cluster: RAY_ADDRESS is cleared)."""
    ray = pytest.importorskip("ray")
    saved = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved
