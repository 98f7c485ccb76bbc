import numpy as np
import pytest

from cmkg import hand


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    shape = hand.sample_shape(rng, 500)
    pose = hand.sample_pose(rng, 500, spread=1.5)
    return pose, shape, hand.forward_kinematics(pose, shape)


def test_joint_maps_are_permutations_and_rhd_is_tip_first():
    for m in (hand.RHD_TO_OURS, hand.STB_TO_OURS, hand.MANO_TO_OURS):
        assert sorted(m) == list(range(21))
    # RHD stores each finger tip-first: our thumb CMC (1) is RHD's 4, our thumb tip (4) RHD's 1
    assert hand.RHD_TO_OURS[1] == 4 and hand.RHD_TO_OURS[4] == 1
    assert len(hand.JOINT_NAMES) == 21 and hand.JOINT_NAMES[9] == "middle_mcp"
    assert hand.PARENTS[0] == -1 and hand.PARENTS[5] == 0 and hand.PARENTS[8] == 7


def test_bone_lengths_follow_the_shape(sample):
    pose, shape, joints = sample
    for f in range(1, 5):
        base = 4 * f + 1
        np.testing.assert_allclose(np.linalg.norm(joints[:, base], axis=1), shape.bones[:, f, 0])
        for k in range(3):
            seg = np.linalg.norm(joints[:, base + k + 1] - joints[:, base + k], axis=1)
            np.testing.assert_allclose(seg, shape.bones[:, f, k + 1], rtol=1e-9)
    for k in range(3):
        seg = np.linalg.norm(joints[:, 2 + k] - joints[:, 1 + k], axis=1)
        np.testing.assert_allclose(seg, shape.bones[:, 0, k + 1], rtol=1e-9)
    # mean hand: the adult lengths of a 185 mm hand (hand.BONE_LENGTHS_MM, docs/hand-model.md)
    assert shape.bones[:, 2, 1].mean() == pytest.approx(51.3, rel=0.05)


def test_sampled_angles_within_limits(sample):
    pose, _, _ = sample
    lim = hand.LIMITS_DEG
    f = pose.fingers
    assert (f[..., 0] >= lim["mcp_flex"][0]).all() and (f[..., 0] <= lim["mcp_flex"][1]).all()
    assert (f[..., 2] >= lim["pip_flex"][0]).all() and (f[..., 2] <= lim["pip_flex"][1]).all()
    assert (f[..., 3] >= lim["dip_flex"][0]).all() and (f[..., 3] <= lim["dip_flex"][1]).all()
    for i, name in enumerate(hand.FINGERS[1:]):
        lo, hi = lim["mcp_abd"][name]
        assert (f[:, i, 1] >= lo).all() and (f[:, i, 1] <= hi).all()
    for k, key in enumerate(["thumb_cmc_flex", "thumb_cmc_abd", "thumb_mcp_flex", "thumb_ip_flex"]):
        assert (pose.thumb[:, k] >= lim[key][0]).all() and (pose.thumb[:, k] <= lim[key][1]).all()
    # the sampler covers the flexion range rather than sitting in one corner of it
    assert f[..., 2].max() > 80 and f[..., 2].min() < 5


def _signed_bend(a, b, c, lateral):
    """Angle (deg) between bones a->b and b->c, positive when it turns towards the palm."""
    u, v = b - a, c - b
    cos = np.sum(u * v, 1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    sign = np.sign(np.sum(np.cross(u, v) * lateral, 1))
    return ang * np.where(sign == 0, 1, sign)


def test_positions_realise_the_joint_angles(sample):
    """PIP/DIP angles measured from the 3D joints equal the sampled ones, with flexion turning
    towards the palm, so the limits hold in the geometry, not only in the parameters."""
    pose, shape, joints = sample
    for i, _name in enumerate(hand.FINGERS[1:]):
        base = 4 * (i + 1) + 1
        # the finger's flexion axis: rotating +y towards +z is a positive turn about +x, which
        # after MCP abduction is the proximal frame's x axis; recover it from the geometry
        prox = joints[:, base + 1] - joints[:, base]
        mid = joints[:, base + 2] - joints[:, base + 1]
        lateral = np.cross(prox, mid)
        ok = np.linalg.norm(lateral, axis=1) > 1e-6  # skip straight fingers
        lateral[ok] /= np.linalg.norm(lateral[ok], axis=1, keepdims=True)
        pip = _signed_bend(joints[:, base], joints[:, base + 1], joints[:, base + 2], lateral)
        np.testing.assert_allclose(np.abs(pip[ok]), pose.fingers[ok, i, 2], atol=1e-6)


def test_flexion_turns_towards_the_palm_and_abduction_radially():
    shape = hand.mean_shape(1)
    flat = hand.forward_kinematics(hand.HandPose(np.zeros((1, 4, 4)), np.zeros((1, 4))), shape)[0]
    # the flat hand lies in the palm plane (z = 0), fingers pointing distally (+y)
    np.testing.assert_allclose(flat[5:, 2], 0, atol=1e-9)
    assert (flat[[8, 12, 16, 20], 1] > 120).all()
    fingers = np.zeros((1, 4, 4))
    fingers[0, 0, 2] = 90.0  # index PIP flexed 90 deg
    fingers[0, 1, 1] = 20.0  # middle finger abducted 20 deg
    bent = hand.forward_kinematics(hand.HandPose(fingers, np.zeros((1, 4))), shape)[0]
    middle_phalanx = bent[7] - bent[6]
    assert middle_phalanx[2] / np.linalg.norm(middle_phalanx) > 0.99  # straight into the palm
    # abduction is positive towards the thumb (+x): the middle fingertip moves radially
    assert bent[12, 0] - bent[9, 0] > flat[12, 0] - flat[9, 0] + 10


def test_normalise_root_and_scale(sample):
    _, _, joints = sample
    norm = hand.normalise(joints + np.array([10.0, -5.0, 400.0]))
    np.testing.assert_allclose(norm[:, 0], 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(norm[:, 10] - norm[:, 9], axis=1), 1, rtol=1e-12)
