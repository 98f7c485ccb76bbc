"""Real-dataset converters on tiny fixtures written in the published layouts
(docs/hand-model.md) by ``cmkg.data.convert.examples`` from synthetic hands with known joints."""

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image
from scipy.spatial.transform import Rotation

from cmkg import cli, config, stages
from cmkg.data import read_manifest, read_split
from cmkg.data.convert import common, freihand, rhd, safepickle, stb
from cmkg.data.convert.examples import (
    RHD_DEPTH_STEP_MM,
    python2_pickle,
    write_freihand,
    write_rhd,
    write_stb,
)
from cmkg.data.store import DEPTH_UNIT_MM
from cmkg.errors import DataError

SIZE = 32  # converted crop size (the smoke preset's)
COLUMNS = ["id", "rgb", "mask", "joints3d", "joints2d", "vis", "K"]


@pytest.fixture(scope="module")
def rhd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rhd") / "RHD_published_v2"
    return root, write_rhd(root)


@pytest.fixture(scope="module")
def rhd_out(rhd_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("rhd-out") / "rhd"
    rhd.convert(rhd_root[0], out, size=SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def stb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stb") / "STB"
    return root, write_stb(root)


@pytest.fixture(scope="module")
def stb_out(stb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stb-out") / "stb"
    stb.convert(stb_root[0], out, size=SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def freihand_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("frei") / "FreiHAND_pub_v2"
    return root, write_freihand(root)


def _nearest_from_K(src: np.ndarray, K_src: np.ndarray, K_crop: np.ndarray, size: int):
    """The crop of ``src`` that K_crop describes, sampled at crop pixel centres; plus a mask of
    the pixels that do not sit on a source pixel boundary (where rounding may go either way)."""
    centres = np.arange(size) + 0.5
    u = (centres - K_crop[0, 2]) / K_crop[0, 0] * K_src[0, 0] + K_src[0, 2]
    v = (centres - K_crop[1, 2]) / K_crop[1, 1] * K_src[1, 1] + K_src[1, 2]
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    sure = (np.abs(v - np.round(v))[:, None] > 1e-6) & (np.abs(u - np.round(u))[None] > 1e-6)
    inside = ((iv >= 0) & (iv < src.shape[0]))[:, None] & ((iu >= 0) & (iu < src.shape[1]))[None]
    out = np.zeros((size, size, *src.shape[2:]), src.dtype)
    out[inside] = src[np.clip(iv, 0, src.shape[0] - 1)[:, None].repeat(size, 1)[inside],
                      np.clip(iu, 0, src.shape[1] - 1)[None].repeat(size, 0)[inside]]
    return out, sure


def _splits(out):
    return {s: read_split(out, s, COLUMNS) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# Safe pickle loading
# ---------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch SENTINEL')",))


def test_safe_pickle_refuses_code_and_loads_numpy(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    # protocol 2 writes builtins as __builtin__, os.system as posix.system
    for evil, name in ((_Evil(f"touch {sentinel}"), "posix.system"), (_EvalEvil(), "eval")):
        path = tmp_path / "evil.pickle"
        path.write_bytes(pickle.dumps({0: {"xyz": evil}}, protocol=2))
        with pytest.raises(DataError, match=rf"evil.pickle: refusing to unpickle .*{name}"):
            safepickle.load(path)
    assert not sentinel.exists()

    data = {7: {"xyz": np.arange(126, dtype=np.float32).reshape(42, 3), "n": np.int64(3),
                "s": np.float32(0.5), "names": ["a", ("b", 2)], "K": np.eye(3)}}
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pickle"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        got = safepickle.load(path)
        np.testing.assert_array_equal(got[7]["xyz"], data[7]["xyz"])
        assert got[7]["n"] == 3 and got[7]["s"] == 0.5 and got[7]["names"] == ["a", ("b", 2)]
    (tmp_path / "py2.pickle").write_bytes(python2_pickle(data))
    np.testing.assert_array_equal(safepickle.load(tmp_path / "py2.pickle")[7]["K"], np.eye(3))
    (tmp_path / "cut.pickle").write_bytes(pickle.dumps(data, protocol=2)[:100])
    with pytest.raises(DataError, match="cut.pickle: not a readable pickle"):
        safepickle.load(tmp_path / "cut.pickle")


def test_cli_refuses_a_malicious_rhd_pickle(rhd_root, tmp_path, capsys):
    root = tmp_path / "rhd"
    shutil.copytree(rhd_root[0], root)
    sentinel = tmp_path / "SENTINEL"
    anno = root / "training" / "anno_training.pickle"
    good = safepickle.load(anno)
    good[3]["xyz"] = _Evil(f"touch {sentinel}")
    anno.write_bytes(pickle.dumps(good, protocol=2))
    out = tmp_path / "out"
    assert cli.main(["data", "convert", "rhd", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "anno_training.pickle: refusing to unpickle the global posix.system" in err
    assert not sentinel.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------
# The crop
# ---------------------------------------------------------------------------------------------

def test_crop_puts_a_known_feature_where_K_says():
    K = np.array([[300.0, 0.0, 161.3], [0.0, 310.0, 118.7], [0.0, 0.0, 1.0]])
    img = np.full((240, 320, 3), 50, np.uint8)
    img[100:104, 200:204] = 255  # a bright square centred on pixel coordinate (202, 102)
    X = np.array([(202 - 161.3) / 300 * 500, (102 - 118.7) / 310 * 500, 500.0])
    np.testing.assert_allclose(common.project(X[None], K), [[202.0, 102.0]])
    # joints spread so that the box (margin 1.5) runs past the top edge of the image
    uv = np.array([[150.0, 20.0], [250.0, 160.0]] + [[200.0, 90.0]] * 19)
    box = common.crop_box(uv, 1.5, img.shape[:2])
    assert box == (95, -15, 210)
    size = 105  # s = 0.5
    out = common.crop_sample(img, uv, K, size, 1.5)
    np.testing.assert_allclose(out["K"], [[150.0, 0, (161.3 - 95) / 2], [0, 155.0, 133.7 / 2],
                                          [0, 0, 1]])
    np.testing.assert_allclose(out["joints2d"], (uv - [95, -15]) / 2)
    w = np.maximum(out["rgb"][..., 0].astype(float) - 50, 0)
    centroid = np.array([(w.sum(0) * (np.arange(size) + 0.5)).sum(),
                         (w.sum(1) * (np.arange(size) + 0.5)).sum()]) / w.sum()
    np.testing.assert_allclose(centroid, common.project(X[None], out["K"])[0], atol=0.05)
    np.testing.assert_allclose(centroid, [53.5, 58.5], atol=0.05)  # (202-95)/2, (102+15)/2
    assert out["rgb"][:7].max() == 0 and out["rgb"][9:].min() == 50  # zeros above the image
    assert out["mask"].shape == (size, size) and out["mask"].max() == 0
    depth = np.arange(240 * 320, dtype=np.float32).reshape(240, 320)
    near = common.crop_nearest(depth, box, size)
    assert near[10, 20] == depth[-15 + 21, 95 + 41]  # floor(x0 + (i + 0.5) * 2)
    assert near[0, 0] == 0.0


# ---------------------------------------------------------------------------------------------
# RHD
# ---------------------------------------------------------------------------------------------

def test_rhd_hand_side_rule():
    mask = np.zeros((10, 10), np.uint8)
    vis = np.zeros(42, bool)
    vis[21:] = True  # the right hand shows every keypoint...
    mask[:2] = 5  # ... but the left hand has more pixels (20 vs 10)
    mask[2] = 30
    assert rhd.choose_side(mask, vis) == 0
    mask[3] = 18  # 20 vs 20: more visible keypoints decides
    assert rhd.choose_side(mask, vis) == 1
    assert rhd.choose_side(mask, np.zeros(42, bool)) == 0  # full tie: left
    assert rhd.choose_side(np.full((4, 4), 1, np.uint8), vis) == 1  # no hand pixels: keypoints


def test_rhd_depth_decoding_is_exact():
    mm = np.array([0.0, 0.1, 412.34, 1234.5, 4999.9, 5000.0])
    code = np.round(mm / RHD_DEPTH_STEP_MM).astype(int)
    png = np.stack([code >> 8, code & 255, np.zeros_like(code)], -1).astype(np.uint8)[None]
    got = rhd.decode_depth(png)[0]
    np.testing.assert_allclose(got, (png[0, :, 0] * 256.0 + png[0, :, 1]) / 65535 * 5000,
                               rtol=1e-6)
    assert np.abs(got - mm).max() <= RHD_DEPTH_STEP_MM / 2 + 1e-3


def test_rhd_conversion(rhd_root, rhd_out):
    _, truth = rhd_root
    m = read_manifest(rhd_out)
    assert m["modalities"] == ["rgb", "depth"] and m["source"]["dataset"] == "rhd"
    assert {k: v["num"] for k, v in m["splits"].items()} == {"train": 27, "val": 3, "test": 8}
    got = _splits(rhd_out)
    with_depth = {s: read_split(rhd_out, s, ["depth"])["depth"] for s in got}
    ids = {s: got[s]["id"] for s in got}
    assert sorted(np.concatenate([ids["train"], ids["val"]])) == list(range(30))
    assert list(ids["test"]) == [rhd.EVAL_ID_OFFSET + i for i in range(8)]
    assert list(ids["val"]) == list(common.carve(np.arange(30), 0, val=0.1)["val"])
    depth_tol = RHD_DEPTH_STEP_MM / 2 + DEPTH_UNIT_MM / 2 + 1e-3
    for split, part in (("train", "training"), ("val", "training"), ("test", "evaluation")):
        g, t = got[split], truth[part]
        i = ids[split] - (rhd.EVAL_ID_OFFSET if part == "evaluation" else 0)
        # the kept hand's joints (left for even ids, right for odd ones)
        np.testing.assert_allclose(g["joints3d"], t["joints3d"][i], atol=1e-3)
        np.testing.assert_array_equal(g["vis"], t["vis"][i])
        for n in range(len(i)):
            proj = common.project(g["joints3d"][n].astype(float), g["K"][n].astype(float))
            np.testing.assert_allclose(proj, g["joints2d"][n], atol=2e-3)
            K_crop = g["K"][n].astype(float)
            want, sure = _nearest_from_K(t["depth"][i[n]], t["K"][i[n]], K_crop, SIZE)
            diff = np.abs(with_depth[split][n] - want)[sure]
            assert sure.mean() > 0.9 and diff.max() <= depth_tol
            lo, hi = (rhd.LEFT_LABELS, rhd.RIGHT_LABELS)[t["side"][i[n]]]
            labels, _ = _nearest_from_K(t["mask"][i[n]], t["K"][i[n]], K_crop, SIZE)
            hand_px = (labels >= lo) & (labels <= hi)
            np.testing.assert_array_equal(g["mask"][n][sure], hand_px[sure])
            assert hand_px.sum() > 0.04 * SIZE * SIZE  # the crop is around the hand
            # the crop box holds every joint, with the margin
            extent = np.ptp(g["joints2d"][n], 0).max()
            assert 0 <= g["joints2d"][n].min() and g["joints2d"][n].max() <= SIZE
            assert SIZE / 1.5 - 1 <= extent <= SIZE / 1.5 + 1
    assert set(truth["training"]["side"][ids["train"]]) == {0, 1}  # both sides exercised


def test_rhd_rgb_follows_K(rhd_root, rhd_out):
    """The stored RGB matches the source pixels K' points at far better than the same crop
    shifted by one pixel (it is resized bilinearly, so it matches only approximately)."""
    root, truth = rhd_root
    g = read_split(rhd_out, "test", ["id", "rgb", "K"])
    errors = {}
    for shift in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]:
        per_sample = []
        for n, i in enumerate(g["id"] - rhd.EVAL_ID_OFFSET):
            src = np.asarray(Image.open(root / "evaluation" / "color" / f"{i:05d}.png"))
            K = g["K"][n].astype(float)
            K[:2, 2] += shift
            want, sure = _nearest_from_K(src, truth["evaluation"]["K"][i], K, SIZE)
            per_sample.append(np.abs(g["rgb"][n].astype(int) - want)[sure].mean())
        errors[shift] = np.mean(per_sample)
    assert errors[(0, 0)] < 0.7 * min(e for k, e in errors.items() if k != (0, 0))


def test_rhd_existing_output_is_reused_or_refused(rhd_root, rhd_out):
    before = (rhd_out / "manifest.json").stat().st_mtime_ns
    again = rhd.convert(rhd_root[0], rhd_out, size=SIZE, progress=False)
    assert again["fingerprint"] == read_manifest(rhd_out)["fingerprint"]
    assert (rhd_out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="holds a different dataset"):
        rhd.convert(rhd_root[0], rhd_out, size=48, progress=False)


# ---------------------------------------------------------------------------------------------
# STB
# ---------------------------------------------------------------------------------------------

def test_stb_extrinsics_and_wrist():
    R = Rotation.from_rotvec(stb.DEPTH_TO_COLOR_ROTVEC).as_matrix()
    np.testing.assert_allclose(stb.rodrigues(stb.DEPTH_TO_COLOR_ROTVEC), R, atol=1e-12)
    x = np.array([[10.0, -20.0, 400.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(stb.depth_to_color(x @ R.T + stb.DEPTH_TO_COLOR_T), x, atol=1e-9)
    np.testing.assert_allclose(stb.depth_to_color(np.zeros(3)), -R.T @ stb.DEPTH_TO_COLOR_T)
    joints = np.zeros((21, 3))
    joints[13] = [10.0, 0, 0]
    joints[0] = [20.0, 5, 0]  # palm centre
    np.testing.assert_allclose(stb.palm_to_wrist(joints)[0], [30.0, 10.0, 0.0])


def test_stb_conversion(stb_root, stb_out):
    _, truth = stb_root
    m = read_manifest(stb_out)
    assert m["modalities"] == ["rgb"] and m["source"]["split"] == "paper"
    assert {k: v["num"] for k, v in m["splits"].items()} == {"train": 27, "val": 3, "test": 6}
    got = _splits(stb_out)
    seq = {s: {stb.SEQUENCES[i // stb.ID_STRIDE] for i in got[s]["id"]} for s in got}
    assert seq["test"] == {"B1Counting", "B1Random"}
    assert seq["train"] | seq["val"] == set(stb.SEQUENCES[2:])
    for g in got.values():
        want = np.array([truth[int(i)] for i in g["id"]])
        np.testing.assert_allclose(g["joints3d"], want, atol=1e-3)  # depth frame + palm undone
        assert g["vis"].all() and g["mask"].max() == 0
        for n in range(len(g["id"])):
            K = g["K"][n].astype(float)
            np.testing.assert_allclose(common.project(g["joints3d"][n].astype(float), K),
                                       g["joints2d"][n], atol=2e-3)
            scale = K[0, 0] / stb.COLOR_K[0, 0]  # K' = scaled, shifted SK colour intrinsics
            np.testing.assert_allclose(K[1, 1], stb.COLOR_K[1, 1] * scale, rtol=1e-6)
    with pytest.raises(DataError, match="depth maps"):
        read_split(stb_out, "train", ["depth"])


# ---------------------------------------------------------------------------------------------
# FreiHAND
# ---------------------------------------------------------------------------------------------

def test_freihand_versions_share_annotations_and_split(freihand_root, tmp_path):
    root, truth = freihand_root
    out = tmp_path / "frei"
    manifests = freihand.convert(root, out, "gh", size=SIZE, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["freihand-g", "freihand-h"]
    assert manifests["g"]["fingerprint"] != manifests["h"]["fingerprint"]
    g, h = _splits(out / "freihand-g"), _splits(out / "freihand-h")
    assert [len(g[s]["id"]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert sorted(np.concatenate([g[s]["id"] for s in g])) == list(range(20))
    for s in g:
        np.testing.assert_array_equal(g[s]["id"], h[s]["id"])
        np.testing.assert_array_equal(g[s]["joints3d"], h[s]["joints3d"])
        np.testing.assert_allclose(g[s]["joints3d"], truth["joints3d"][g[s]["id"]], atol=1e-3)
        np.testing.assert_array_equal(g[s]["K"], h[s]["K"])
        assert g[s]["vis"].all()
        for n in range(len(g[s]["id"])):
            np.testing.assert_allclose(
                common.project(g[s]["joints3d"][n].astype(float), g[s]["K"][n].astype(float)),
                g[s]["joints2d"][n], atol=2e-3)
    assert np.abs(g["train"]["rgb"].astype(int) - h["train"]["rgb"]).mean() > 5
    # a later command adds versions beside the ones already there, with the same split
    more = freihand.convert(root, out, ["g", "a"], size=SIZE, progress=False)
    assert more["g"]["fingerprint"] == manifests["g"]["fingerprint"]
    a = read_split(out / "freihand-a", "test", ["id"])["id"]
    np.testing.assert_array_equal(a, g["test"]["id"])


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the file, nothing left behind
# ---------------------------------------------------------------------------------------------

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _cut_rhd_xyz(path):
    anno = safepickle.load(path)
    anno[2]["xyz"] = anno[2]["xyz"][:21]
    path.write_bytes(pickle.dumps(anno, protocol=2))


# case: (dataset, file, what is done to it, the error after the file's path)
BREAKS = {
    "rhd missing image": ("rhd", "training/color/00004.png", os.unlink, "file not found"),
    "rhd truncated depth": ("rhd", "training/depth/00007.png", _truncate, "unreadable image"),
    "rhd wrong shape": ("rhd", "evaluation/anno_evaluation.pickle", _cut_rhd_xyz,
                        r"sample 2 xyz: expected shape \(42, 3\), got \(21, 3\)"),
    "rhd missing pickle": ("rhd", "evaluation/anno_evaluation.pickle", os.unlink,
                           "file not found"),
    "stb wrong shape": ("stb", "labels/B3Random_SK.mat",
                        lambda p: scipy.io.savemat(p, {"handPara": np.zeros((3, 20, 3))}),
                        r"handPara: expected shape \(3, 21, None\), got \(3, 20, 3\)"),
    "stb corrupt mat": ("stb", "labels/B1Counting_SK.mat", lambda p: p.write_bytes(b"x" * 99),
                        "not a readable MATLAB file"),
    "stb truncated png": ("stb", "images/B2Random/SK_color_1.png", _truncate,
                          "unreadable image"),
    "freihand bad json": ("freihand", "training_K.json", lambda p: _truncate(p, 0.7),
                          "not valid JSON"),
    "freihand wrong shape": ("freihand", "training_xyz.json",
                             lambda p: p.write_text(json.dumps([[[0.0, 0.0]] * 21] * 20)),
                             r"expected shape \(None, 21, 3\), got \(20, 21, 2\)"),
    "freihand missing image": ("freihand", "training/rgb/00000065.jpg", os.unlink,
                               "file not found"),  # sample 5 of version a (N = 20)
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_input_names_the_file_and_leaves_nothing(case, rhd_root, stb_root, freihand_root,
                                                     tmp_path, capsys):
    dataset, name, damage, error = BREAKS[case]
    fixture = {"rhd": rhd_root, "stb": stb_root, "freihand": freihand_root}[dataset][0]
    root = tmp_path / "in"
    shutil.copytree(fixture, root)
    damage(root / name)
    message = re.escape(str(root / name)) + ": " + error
    parent = tmp_path / "outs"
    parent.mkdir()
    convert = {"rhd": rhd.convert, "stb": stb.convert, "freihand": freihand.convert}[dataset]
    with pytest.raises(DataError, match=message):
        convert(root, parent / "ds", size=SIZE, progress=False)
    assert list(parent.iterdir()) == []  # neither the folder nor a temporary one
    assert cli.main(["data", "convert", dataset, str(root), "--out", str(parent / "ds"),
                     "--size", str(SIZE)]) == 2
    assert str(root) in capsys.readouterr().err and list(parent.iterdir()) == []


def test_cli_converts_and_checks_its_arguments(stb_root, tmp_path, capsys):
    out = tmp_path / "stb"
    assert cli.main(["data", "convert", "stb", str(stb_root[0]), "--out", str(out),
                     "--size", "24", "--val-fraction", "0.2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["splits"] == {"train": 24, "val": 6, "test": 6} and line["out"] == str(out)
    assert read_manifest(out)["size"] == 24
    assert cli.main(["data", "convert", "stb", str(stb_root[0]), "--out", str(tmp_path / "x"),
                     "--margin", "0.5"]) == 2
    assert "--margin" in capsys.readouterr().err
    assert cli.main(["data", "convert", "freihand", str(tmp_path), "--out", str(tmp_path / "y"),
                     "--versions", "g,q"]) == 2
    assert "versions ['q']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Stages on converted folders
# ---------------------------------------------------------------------------------------------

def test_stages_run_on_converted_folders(rhd_out, stb_out, tmp_path):
    cfg = config.load("smoke", [
        f"data.source.path={rhd_out}", f"data.target.path={stb_out}", "optim.batch_size=8",
        "epochs.teacher=1", "epochs.student=1", "epochs.kd=1", "epochs.meta=1", "epochs.target=1",
        f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}", "run.progress=none"])
    teacher = stages.run_stage("teacher", cfg)
    kd = stages.run_stage("kd", cfg)
    target = stages.run_stage("target", cfg)  # weighted_l2 with phi from a meta stage on RHD
    source_fp, target_fp = (read_manifest(p)["fingerprint"] for p in (rhd_out, stb_out))
    for art, fp in ((teacher, source_fp), (kd, source_fp), (target, target_fp)):
        assert art.meta["data"]["eval"] == fp and art.meta["data"]["train"] == [fp]
        assert np.isfinite(art.metrics["test"]["epe_mm"]) and art.metrics["test"]["epe_mm"] > 0
    assert teacher.meta["spec"]["modality"] == "depth"
    assert set(kd.meta["inputs"]) == {"teacher", "student"}
    assert "meta" in target.meta["inputs"] and target.meta["spec"]["regularizer"]["form"] == \
        "weighted_l2"
    assert not list((tmp_path / "data").glob("synth/*"))  # nothing synthetic was rendered
