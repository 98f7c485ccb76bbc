import os

import pytest

from cmkg import config


@pytest.fixture
def tiny_cfg(tmp_path):
    """A seconds-long config: 32 px, a few hundred samples, resnet10, 2 epochs per stage."""
    return config.load("smoke", [
        "data.source.num=240", "data.target.num=120", "optim.batch_size=16",
        "epochs.teacher=2", "epochs.student=2", "epochs.kd=1",
        f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}", "run.progress=none",
    ])


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
