"""Planted knowledge (``data.planted``), the positive control whose transferable knowledge
exists by construction: the channel values, where they carry the pose, the keys they enter and
the networks that see them (docs/benchmark.md, "Planted knowledge")."""

import dataclasses

import numpy as np
import pytest
import torch

from cmkg import config, stages
from cmkg.config import ConfigError
from cmkg.data import HandDataset, planted
from cmkg.data.dataset import prepare_batch


def _planted(cfg, **fields):
    pl = dataclasses.replace(cfg.data.planted, **fields)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, planted=pl))


def test_values_carry_the_pose_on_the_shortcut_split_only():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((4000, 21, 3))
    u = target.reshape(4000, -1) @ planted.projections(3, 4, 63).T
    u = (u - u.mean(0)) / u.std(0)
    for cue in (0.0, 0.5, 0.9):
        x = planted.values(3, 4, cue, "fp", "train", target, shortcut=True)
        assert x.shape == (4000, 4) and x.dtype == np.float32
        corr = [np.corrcoef(x[:, c], u[:, c])[0, 1] for c in range(4)]
        assert np.allclose(corr, cue, atol=0.04), corr  # each channel: cue x its projection
        assert np.allclose(x.std(0), 1.0, atol=0.05)  # the same marginal as the noise
    noise = planted.values(3, 4, 0.9, "fp", "test", target, shortcut=False)
    assert np.abs([np.corrcoef(noise[:, c], u[:, c])[0, 1] for c in range(4)]).max() < 0.05
    # a function of (seed, dataset, split): reproducible, and independent across them
    assert np.array_equal(noise, planted.values(3, 4, 0.9, "fp", "test", target, False))
    for other in (planted.values(4, 4, 0.9, "fp", "test", target, False),
                  planted.values(3, 4, 0.9, "fp2", "test", target, False),
                  planted.values(3, 4, 0.9, "fp", "val", target, False)):
        assert abs(np.corrcoef(noise.ravel(), other.ravel())[0, 1]) < 0.05


@pytest.mark.parametrize("sets, key", [
    (["data.planted.channels=-1"], "data.planted.channels"),
    (["data.planted.cue=1.5"], "data.planted.cue"),
    (["data.planted.seed=-2"], "data.planted.seed"),
    (["data.planted.source_cue=-0.1"], "data.planted.source_cue"),
])
def test_bad_planted_entries_name_their_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load("smoke", sets)


def test_planted_enters_the_rgb_stages_keys_only(tiny_cfg):
    on = _planted(tiny_cfg, channels=2, cue=0.9)
    for stage in stages.STAGES:
        off_key, spec = stages.stage_key(stage, tiny_cfg)[:2]
        on_key, on_spec = stages.stage_key(stage, on)[:2]
        assert "planted" not in spec  # off: every key as before the knob existed
        if stage == "teacher":  # the depth teacher never sees the channels: shared
            assert on_key == off_key and "planted" not in on_spec
        else:
            assert on_key != off_key and on_spec["planted"]["channels"] == 2
    # the cue acts on the target's train split alone: the source stages share one key per cue
    weaker = _planted(on, cue=0.5)
    assert stages.stage_key("target", weaker)[0] != stages.stage_key("target", on)[0]
    for stage in ("student", "kd", "meta"):
        assert stages.stage_key(stage, weaker)[0] == stages.stage_key(stage, on)[0]
    # source_cue acts on the source's train split alone: source stages change, the teacher and
    # an unregularised target keep their keys; at 0 it is absent from every key
    sourced = _planted(on, source_cue=0.5)
    assert stages.stage_key("teacher", sourced)[0] == stages.stage_key("teacher", on)[0]
    plain = {"regularizer": dataclasses.replace(on.regularizer, form="none")}
    assert stages.stage_key("target", dataclasses.replace(sourced, **plain))[0] == \
        stages.stage_key("target", dataclasses.replace(on, **plain))[0]
    for stage in ("student", "kd", "meta"):
        key, spec = stages.stage_key(stage, sourced)[:2]
        assert key != stages.stage_key(stage, on)[0] and spec["planted"]["source_cue"] == 0.5
        assert "source_cue" not in stages.stage_key(stage, on)[1]["planted"]


def test_a_planted_target_trains_sees_the_channels_and_reloads(tiny_cfg):
    cfg = _planted(dataclasses.replace(tiny_cfg, regularizer=dataclasses.replace(
        tiny_cfg.regularizer, form="none")), channels=2, cue=1.0)
    art = stages.run_stage("target", cfg)
    model = art.load_model()
    assert model.stem[0].in_channels == 3 + 2
    root = stages.ensure_dataset(cfg.data.target, cfg)
    train = HandDataset(root, "train", ("rgb",), planted=cfg.data.planted,
                        shortcut=cfg.data.planted.cue)
    test = HandDataset(root, "test", ("rgb",), planted=cfg.data.planted)
    batch = prepare_batch(train.__getitems__(np.arange(4)), torch.device("cpu"))
    assert batch["rgb"].shape[1] == 5
    # the extra channels are constant maps holding the values
    assert torch.equal(batch["rgb"][:, 3:, 0, 0], torch.from_numpy(train.planted[:4]))
    assert torch.equal(batch["rgb"][:, 3:].amax((2, 3)), batch["rgb"][:, 3:].amin((2, 3)))
    assert not np.allclose(test.planted[:, 0].std(), 0)
    assert np.isfinite(art.metrics["test"]["epe_mm"])
