import hashlib

import numpy as np
import pytest

from cmkg import hand, synth
from cmkg.data import read_split, synth_source, synthesize
from cmkg.errors import DataError


@pytest.fixture(scope="module")
def block():
    return synth.render_range("rhd-like", 3, 64, 0, 160)


def test_same_seed_gives_identical_bytes_whatever_the_range(block):
    again = synth.render_range("rhd-like", 3, 64, 0, 160)
    for k in block:
        assert block[k].tobytes() == again[k].tobytes(), k
    part = synth.render_range("rhd-like", 3, 64, 120, 140)  # crosses a block boundary
    for k in block:
        assert part[k].tobytes() == block[k][120:140].tobytes(), k
    other = synth.render_range("rhd-like", 4, 64, 0, 8)
    assert other["rgb"].tobytes() != block["rgb"][:8].tobytes()


def test_stored_2d_joints_are_the_projection_of_the_3d_joints(block):
    K, xyz, uv = block["K"].astype(float), block["joints3d"].astype(float), block["joints2d"]
    proj = np.einsum("nij,nkj->nki", K, xyz)
    np.testing.assert_allclose(proj[..., :2] / proj[..., 2:], uv, atol=1e-3)
    assert (xyz[..., 2] > 50).all()  # every joint in front of the camera


def test_depth_agrees_with_the_joints(block):
    """At a visible joint's pixel the rendered depth lies within the finger radius (the
    visibility tolerance of 1.3 radii, plus depth noise) of the joint's z."""
    from cmkg.hand import joint_radii, mean_shape

    max_radius = joint_radii(mean_shape(1))[0] * 1.3  # largest hands in the domain
    vis = block["vis"]
    assert 0.35 < vis.mean() < 0.95
    n, j = np.nonzero(vis)
    u, v = np.floor(block["joints2d"][n, j]).astype(int).T
    d = block["depth"][n, v, u]
    z = block["joints3d"][n, j, 2]
    noise = 4 * synth.DOMAINS["rhd-like"].depth_noise_mm
    gap = d - z
    assert (gap <= noise).all()
    assert (gap >= -synth.VIS_TOLERANCE * max_radius[j] - noise).all()
    assert block["mask"][n, v, u].all()  # visible joints lie on hand pixels
    # hidden joints are genuinely hidden: something is nearer than their surface
    hn, hj = np.nonzero(~vis)
    hu, hv = np.floor(block["joints2d"][hn, hj]).astype(int).T
    inside = (hu >= 0) & (hu < 64) & (hv >= 0) & (hv < 64)
    dh = block["depth"][hn[inside], hv[inside], hu[inside]]
    assert (dh < block["joints3d"][hn[inside], hj[inside], 2] + noise).all()


def test_hand_is_in_front_of_the_background(block):
    root_z = block["joints3d"][:, 0, 2]
    hand_px = block["mask"].astype(bool)
    assert 0.05 < hand_px.mean() < 0.6
    bg_depth = np.where(hand_px, np.nan, block["depth"])
    hand_depth = np.where(hand_px, block["depth"], np.nan)
    # the hand surface sits within a hand's length of the wrist; the scene behind is farther
    assert np.nanmax(np.abs(hand_depth - root_z[:, None, None])) < 250
    assert np.nanmedian(bg_depth - root_z[:, None, None]) > 100


@pytest.mark.parametrize("name", sorted(synth.DOMAINS))
def test_every_domain_renders(name):
    out = synth.render_range(name, 0, 32, 0, 16)
    assert out["rgb"].shape == (16, 32, 32, 3) and out["rgb"].dtype == np.uint8
    assert out["depth"].shape == (16, 32, 32) and np.isfinite(out["depth"]).all()
    assert out["mask"].any(axis=(1, 2)).all()  # a hand in every image


def test_domains_differ_in_viewpoint_and_background():
    """stb-like (target) keeps the palm roughly facing the camera, rhd-like (source) does not;
    freihand-g is a green screen."""
    def palm_facing(name):
        frames = {"frames": 20} if synth.DOMAINS[name].sequences else {}  # all 12 sequences
        out = synth.render_range(name, 0, 32, 0, 240, **frames)
        j = out["joints3d"].astype(float)
        normal = np.cross(j[:, 5] - j[:, 0], j[:, 17] - j[:, 0])  # palm plane normal
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        return np.abs(normal[:, 2]).mean(), out

    rhd, _ = palm_facing("rhd-like")
    stb, _ = palm_facing("stb-like")
    assert stb > rhd + 0.1
    green = synth.render_range("freihand-g", 0, 32, 0, 16)
    bg = green["rgb"][~green["mask"].astype(bool)].astype(float)
    assert (bg[:, 1] > bg[:, 0] + 40).mean() > 0.9


# ---------------------------------------------------------------------------------------------
# i.i.d. domains: pinned bytes
# ---------------------------------------------------------------------------------------------

# sha256 (first 16 hex digits) of every array of render_range(name, 3, 16, 126, 130), computed
# with the code before the sequence domain existed (torch 2 / numpy 2 on x86-64 CPU; another
# torch or numpy build may legitimately round differently and need new pins)
IID_CHECKSUMS = {
    "augment": "8f8c99f4e9f6d750",
    "freihand-a": "9b54706da25d78a1",
    "freihand-g": "5bcc4a37d8f48dd9",
    "freihand-h": "a62fdee2bb264faa",
    "freihand-s": "a110b3b609d88501",
    "rhd-like": "b4a037878f6eb35a",
}


def test_iid_domains_are_unchanged():
    assert set(IID_CHECKSUMS) == {n for n, d in synth.DOMAINS.items() if d.sequences is None}
    for name, want in IID_CHECKSUMS.items():
        out = synth.render_range(name, 3, 16, 126, 130)  # crosses a block boundary
        h = hashlib.sha256()
        for k in sorted(out):
            h.update(out[k].tobytes())
        assert h.hexdigest()[:16] == want, name


# ---------------------------------------------------------------------------------------------
# The sequence domain (stb-like)
# ---------------------------------------------------------------------------------------------

SEQ_FRAMES = 60  # frames per sequence of the small stream below


@pytest.fixture(scope="module")
def stream():
    """All 12 sequences of stb-like, 60 frames each, 32 px: (720, ...) arrays."""
    return synth.render_range("stb-like", 2, 32, 0, 12 * SEQ_FRAMES, SEQ_FRAMES)


def test_sequence_domain_is_deterministic_whatever_the_sharding():
    frames = 130  # > BLOCK: a sequence spans two blocks
    whole = synth.render_range("stb-like", 2, 32, 126, 262, frames)  # 3 sequences, 5 blocks
    parts = [synth.render_range("stb-like", 2, 32, lo, hi, frames)  # each block again, apart
             for lo, hi in ((126, 128), (128, 131), (131, 259), (259, 262))]
    for k in whole:
        assert whole[k].tobytes() == np.concatenate([p[k] for p in parts]).tobytes(), k
    other = synth.render_range("stb-like", 3, 32, 128, 131, frames)
    assert other["rgb"].tobytes() != whole["rgb"][2:5].tobytes()
    # the stream ends after the last sequence
    with pytest.raises(ValueError, match="12 sequences x 130 frames"):
        synth.render_range("stb-like", 2, 32, 12 * frames - 1, 12 * frames + 1, frames)


def test_sequence_dataset_is_split_by_sequence(tmp_path):
    num = 12 * 5 + 7  # the 7 left over are dropped
    m = synthesize(tmp_path / "s", "stb-like", num, 32, seed=4, split=(0.5, 0.25, 0.25),
                   progress=False)
    src = m["source"]
    assert src["split_by"] == "sequence" and src["frames_per_sequence"] == 5
    assert "split" not in src  # the fractions play no part
    assert src["sequences"]["test"] == ["B1Counting", "B1Random"]
    assert src["sequences"]["val"] == ["B6Random"]
    named = [s for names in src["sequences"].values() for s in names]
    assert sorted(named) == sorted(synth.STB_SEQUENCES) and len(set(named)) == 12
    assert {k: v["num"] for k, v in m["splits"].items()} == {"train": 45, "val": 5, "test": 10}
    for split, names in src["sequences"].items():
        got = read_split(tmp_path / "s", split, ["id", "rgb"])
        seq, frame = np.divmod(got["id"], synth.ID_STRIDE)  # STB's ids: 10000 * sequence + frame
        assert {synth.STB_SEQUENCES[i] for i in seq} == set(names), split
        assert sorted(frame.tolist()) == sorted(list(range(5)) * len(names))
        # a stored frame is the frame of the stream
        i = int(np.argmax(seq == seq[-1]))
        ref = synth.render_range("stb-like", 4, 32, seq[-1] * 5, seq[-1] * 5 + 5, 5)
        assert got["rgb"][i].tobytes() == ref["rgb"][frame[i]].tobytes()
    # the content address: the split fractions do not enter it, the frame count does
    assert synth_source("stb-like", num, 32, 4, (0.8, 0.1, 0.1)) == src
    assert synth_source("stb-like", 12 * 6, 32, 4)["frames_per_sequence"] == 6
    assert synth_source("rhd-like", num, 32, 4)["split"] == [0.8, 0.1, 0.1]
    with pytest.raises(DataError, match="between 1 and 9999 frames per sequence"):
        synthesize(tmp_path / "t", "stb-like", 11, 32, progress=False)


def test_consecutive_frames_are_near_duplicates_and_sequences_differ(stream):
    """Within a sequence the motion is smooth: consecutive frames lie far closer, in 3D joints
    and in pixels, than frames of different sequences; the test sequences' poses are not
    those of the training sequences."""
    n = SEQ_FRAMES
    rel = (stream["joints3d"] - stream["joints3d"][:, :1]).astype(float).reshape(12, n, 21, 3)
    rgb = stream["rgb"].astype(float).reshape(12, n, 32, 32, 3)

    def dist(a, b):  # mean per-joint distance, mm
        return np.linalg.norm(a - b, axis=-1).mean(-1)

    step = dist(rel[:, 1:], rel[:, :-1]).mean()
    across = np.mean([dist(rel[a], rel[b]).mean() for a in range(12) for b in range(a)])
    assert step < 0.2 * across
    px_step = np.abs(rgb[:, 1:] - rgb[:, :-1]).mean()
    px_across = np.mean([np.abs(rgb[a] - rgb[b]).mean() for a in range(12) for b in range(a)])
    assert px_step < 0.35 * px_across
    # test frames (B1: sequences 0, 1) lie several steps from every training frame
    train = rel[2:11].reshape(-1, 1, 21, 3)
    nearest = dist(rel[:2].reshape(1, -1, 21, 3), train).min(0)
    assert np.median(nearest) > 2 * step  # 2.7-3.6x measured (seeds 0, 2, 5)


def test_one_subject_in_every_sequence(stream):
    """The same hand (bone lengths) and camera (focal length) in all frames of all sequences,
    each sequence in front of its own, fixed background."""
    j = stream["joints3d"].astype(float)
    bones = np.linalg.norm(j[:, 1:] - j[:, hand.PARENTS[1:]], axis=-1)  # (N, 20) mm
    assert np.abs(bones - bones[0]).max() < 1e-3
    assert np.unique(stream["K"][:, 0, 0]).size == 1
    mask = stream["mask"].astype(bool).reshape(12, SEQ_FRAMES, 32, 32)
    rgb = stream["rgb"].astype(float).reshape(12, SEQ_FRAMES, 32, 32, 3)
    bg = ~mask[:, :-1] & ~mask[:, 1:]  # background in both frames
    same = np.abs(rgb[:, 1:] - rgb[:, :-1])[bg].mean()  # pixel noise and the light's drift
    other = np.abs(rgb[1:, :-1] - rgb[:-1, :-1])[bg[1:] & bg[:-1]].mean()
    assert same < 0.25 * other
