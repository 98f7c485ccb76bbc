import json
import os

import numpy as np
import pytest
import torch

from cmkg import synth
from cmkg.data import HandDataset, prepare_batch, read_split, synthesize
from cmkg.data import store as store_mod
from cmkg.errors import DataError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "src"
    manifest = synthesize(out, "rhd-like", 300, 32, seed=5, shard_size=100, progress=False)
    return out, manifest


def test_manifest_splits_and_checksums(dataset):
    out, m = dataset
    assert m["num"] == 300 and {k: v["num"] for k, v in m["splits"].items()} == \
        {"train": 240, "val": 30, "test": 30}
    assert len(m["splits"]["train"]["shards"]) == 3
    ids = {s: read_split(out, s, ["id"])["id"] for s in ("train", "val", "test")}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    assert sorted(np.concatenate(list(ids.values()))) == list(range(300))
    assert m["modalities"] == ["rgb", "depth"]


def test_round_trip_matches_the_renderer(dataset):
    out, _ = dataset
    got = read_split(out, "val", ["rgb", "depth", "mask", "joints3d", "joints2d", "vis", "K"])
    ref = synth.render_range("rhd-like", 5, 32, 240, 270)
    for k in ("rgb", "mask", "vis"):
        np.testing.assert_array_equal(got[k], ref[k])
    for k in ("joints3d", "joints2d", "K"):
        np.testing.assert_array_equal(got[k], ref[k])
    np.testing.assert_allclose(got["depth"], ref["depth"], atol=store_mod.DEPTH_UNIT_MM / 2 + 1e-3)


def test_same_config_is_reused_and_a_different_one_refused(dataset):
    out, m = dataset
    before = os.stat(out / "manifest.json").st_mtime_ns
    again = synthesize(out, "rhd-like", 300, 32, seed=5, shard_size=100, progress=False)
    assert again["fingerprint"] == m["fingerprint"]
    assert os.stat(out / "manifest.json").st_mtime_ns == before
    with pytest.raises(DataError, match="different dataset"):
        synthesize(out, "rhd-like", 300, 32, seed=6, progress=False)


def test_corrupt_shard_is_reported_by_name(dataset, tmp_path):
    import shutil

    out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "val-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="val-00000.parquet: checksum mismatch"):
        HandDataset(copy, "val", ("rgb",))


def test_killed_generation_leaves_nothing_readable(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.render_range

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the run was killed midway
        return real(*args)

    monkeypatch.setattr(synth, "render_range", dying)
    out = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, "stb-like", 300, 32, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_dataset_batches(dataset):
    out, _ = dataset
    ds = HandDataset(out, "train", ("rgb", "depth"))
    raw = ds.__getitems__([0, 5, 7])
    assert raw["rgb"].shape == (3, 32, 32, 3) and raw["rgb"].dtype == torch.uint8
    b = prepare_batch(raw, torch.device("cpu"))
    assert b["rgb"].shape == (3, 3, 32, 32) and b["depth"].shape == (3, 1, 32, 32)
    expected = (raw["rgb"][1, 4, 9, 2].item() / 255 - 0.5) / 0.25  # sample 1, y 4, x 9, blue
    assert float(b["rgb"][1, 2, 4, 9]) == pytest.approx(expected)
    assert float(b["depth"].min()) >= -1 and float(b["depth"].max()) <= 1
    # the target is root-relative and scale-normalised, joints in mm recover from it
    np.testing.assert_allclose(b["target"][:, 0].numpy(), 0, atol=1e-6)
    np.testing.assert_allclose((b["target"] * b["scale"][:, None, None]).numpy(),
                               b["joints"].numpy(), rtol=1e-4, atol=1e-3)
    single = ds[5]
    assert single["rgb"].shape == (32, 32, 3)
    with pytest.raises(DataError, match="no manifest.json"):
        HandDataset(out.parent / "nowhere", "train")


def test_manifest_without_depth_refuses_depth(dataset, tmp_path):
    import shutil

    out, _ = dataset
    copy = tmp_path / "rgbonly"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["modalities"] = ["rgb"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="no depth maps"):
        HandDataset(copy, "train", ("rgb", "depth"))
