import numpy as np
import pytest

from cmkg import synth


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
        out = synth.render_range(name, 0, 32, 0, 256)
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
