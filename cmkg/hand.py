"""A 21-joint procedural hand: skeleton, joint limits, forward kinematics and joint-order maps.

Joint order (MANO/FreiHAND, used everywhere inside cmkg; the paper, Sect. 5.2, brings every
dataset into MANO's layout and moves STB's root from the palm centre to the wrist)::

    0 wrist; 1-4 thumb (CMC, MCP, IP, tip); 5-8 index (MCP, PIP, DIP, tip);
    9-12 middle; 13-16 ring; 17-20 little.

Root = joint 0 (wrist); scale bone = middle MCP-PIP (joints 9-10).

Hand frame (right hand, millimetres): origin at the wrist, +y distal (wrist -> middle MCP),
+x radial (towards the thumb), +z palmar (out of the palm). Flexion turns a finger about its
local x axis towards +z; abduction turns it about its local z axis, positive = radial.

Bone lengths and joint limits are adult anthropometric figures (a hand 185 mm long, 85 mm
wide); docs/hand-model.md lists them beside the datasets' joint orders. The anatomical
metacarpal splay (index -15, middle -6, ring 0, little +7 deg) is measured from each
metacarpal's own carpal base. In the 21-joint skeleton all four metacarpals hang from the wrist
joint, so we fan them wider (``METACARPAL_SPLAY_DEG``) to put the knuckles 45-50 mm apart, a
typical adult knuckle width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_JOINTS = 21
ROOT = 0
SCALE_BONE = (9, 10)  # middle MCP -> PIP
FINGERS = ("thumb", "index", "middle", "ring", "little")

JOINT_NAMES = ["wrist"] + [
    f"{finger}_{part}"
    for finger, parts in zip(
        FINGERS, [("cmc", "mcp", "ip", "tip")] + [("mcp", "pip", "dip", "tip")] * 4
    )
    for part in parts
]
# parent of each joint; fingers are chains of 4 hanging from the wrist
PARENTS = np.array([-1] + [0 if k % 4 == 0 else 1 + 4 * (k // 4) + k % 4 - 1 for k in range(20)])

# Gathers from other datasets' joint orders into ours: ours[j] = theirs[MAP[j]]
# (docs/hand-model.md). RHD: per hand wrist, then thumb..little each tip-first; STB (handPara):
# palm centre, then little..thumb each MCP -> tip; MANO: 16 joints + 5 fingertips as rows 16-20.
RHD_TO_OURS = [0, 4, 3, 2, 1, 8, 7, 6, 5, 12, 11, 10, 9, 16, 15, 14, 13, 20, 19, 18, 17]
STB_TO_OURS = [0, 17, 18, 19, 20, 13, 14, 15, 16, 9, 10, 11, 12, 5, 6, 7, 8, 1, 2, 3, 4]
MANO_TO_OURS = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]

# Phalanx lengths in mm: thumb (metacarpal, proximal, distal), fingers (metacarpal, proximal,
# middle, distal). The thumb's first bone (wrist -> CMC) is the carpal offset below.
BONE_LENGTHS_MM = {
    "thumb": (46.4, 36.3, 29.2),
    "index": (70.0, 49.0, 26.5, 17.9),
    "middle": (69.0, 51.3, 31.5, 20.0),
    "ring": (62.5, 47.9, 30.5, 19.8),
    "little": (56.7, 38.1, 21.6, 17.2),
}
THUMB_CMC_OFFSET_MM = np.array([20.0, 16.0, 8.0])  # wrist -> thumb CMC, hand frame
METACARPAL_SPLAY_DEG = {"index": 21.0, "middle": 6.0, "ring": -8.0, "little": -21.0}  # + radial

# Joint limits in degrees (docs/hand-model.md). Abduction is positive towards the thumb.
LIMITS_DEG = {
    "mcp_flex": (0.0, 90.0),
    "pip_flex": (0.0, 100.0),
    "dip_flex": (-10.0, 90.0),
    "mcp_abd": {"index": (-15.0, 42.0), "middle": (-8.0, 35.0), "ring": (-14.0, 20.0),
                "little": (-40.0, 30.0)},
    "thumb_cmc_flex": (-25.0, 35.0),
    "thumb_cmc_abd": (-30.0, 60.0),
    "thumb_mcp_flex": (-10.0, 80.0),
    "thumb_ip_flex": (-15.0, 80.0),
}

# Rest orientation of the thumb: turned radially, tilted palmar and pronated, so that thumb
# flexion (about its local x axis) curls it across the palm.
THUMB_REST_DEG = {"radial": 40.0, "palmar": 25.0, "pronation": -60.0}

# Finger radii (mm) at each joint of a chain, base -> tip; the palm is a slab of this half-thickness.
JOINT_RADII_MM = {
    "thumb": (11.0, 10.0, 9.0, 8.0),
    "index": (9.5, 8.5, 7.5, 6.5),
    "middle": (10.0, 9.0, 8.0, 7.0),
    "ring": (9.5, 8.5, 7.5, 6.5),
    "little": (8.5, 7.5, 6.5, 6.0),
}
WRIST_RADIUS_MM = 16.0
PALM_HALF_THICKNESS_MM = 13.0


def rot_x(a: np.ndarray) -> np.ndarray:
    """Right-handed rotations about x for angles ``a`` (radians), shape (..., 3, 3)."""
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(*np.shape(a), 3, 3)


def rot_y(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*np.shape(a), 3, 3)


def rot_z(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*np.shape(a), 3, 3)


def _radial(a: np.ndarray) -> np.ndarray:
    """Rotation about local z turning +y towards +x (radial) by ``a`` radians."""
    return rot_z(-a)


@dataclass
class HandPose:
    """Articulation of a batch of N hands, angles in degrees.

    ``fingers``: (N, 4, 4) for index..little: MCP flexion, MCP abduction, PIP flexion, DIP flexion.
    ``thumb``: (N, 4): CMC flexion, CMC abduction, MCP flexion, IP flexion.
    """

    fingers: np.ndarray
    thumb: np.ndarray


@dataclass
class HandShape:
    """Per-hand geometry: ``bones`` (N, 5, 4) mm with the thumb's first entry the carpal offset
    scale; ``radii`` (N, 5, 4) mm at each finger joint; ``size`` (N,) global scale factor."""

    bones: np.ndarray
    radii: np.ndarray
    size: np.ndarray


def mean_shape(n: int = 1) -> HandShape:
    bones = np.zeros((n, 5, 4))
    bones[:, 0, 0] = 1.0  # thumb carpal offset, as a factor on THUMB_CMC_OFFSET_MM
    bones[:, 0, 1:] = BONE_LENGTHS_MM["thumb"]
    for f, name in enumerate(FINGERS[1:], start=1):
        bones[:, f] = BONE_LENGTHS_MM[name]
    radii = np.broadcast_to(np.array([JOINT_RADII_MM[f] for f in FINGERS]), (n, 5, 4)).copy()
    return HandShape(bones=bones, radii=radii, size=np.ones(n))


def sample_shape(rng: np.random.Generator, n: int, size_mean: float = 1.0, size_std: float = 0.07,
                 bone_jitter: float = 0.03, width_std: float = 0.08) -> HandShape:
    """Hands of varied size (global factor) with independent per-bone and thickness jitter."""
    shape = mean_shape(n)
    size = np.clip(rng.normal(size_mean, size_std, n), 0.75, 1.3)
    jitter = np.clip(rng.normal(1.0, bone_jitter, (n, 5, 4)), 0.9, 1.1)
    width = np.clip(rng.normal(1.0, width_std, n), 0.8, 1.25)
    shape.bones *= size[:, None, None] * jitter
    shape.radii *= (size * width)[:, None, None]
    shape.size = size
    return shape


def sample_pose(rng: np.random.Generator, n: int, spread: float = 1.0) -> HandPose:
    """Natural articulations within the joint limits.

    A per-hand grasp level drives every finger's curl (hands mostly open, fist or in between),
    each finger deviating by ``0.3 * spread``; abduction shrinks as a finger curls; DIP follows
    2/3 of PIP. Every angle is clipped into ``LIMITS_DEG``.
    """
    lim = LIMITS_DEG
    grasp = rng.uniform(0.0, 1.0, (n, 1))
    curl = np.clip(grasp + 0.3 * spread * rng.normal(size=(n, 4)), 0.0, 1.0)
    mcp = curl * 90.0 * rng.uniform(0.5, 1.0, (n, 4))
    pip = curl * 100.0 * rng.uniform(0.6, 1.0, (n, 4))
    dip = 2.0 / 3.0 * pip + rng.normal(0.0, 6.0, (n, 4))
    abd = (1.0 - curl) * rng.normal(0.0, 10.0 * spread, (n, 4))
    abd_lim = np.array([lim["mcp_abd"][f] for f in FINGERS[1:]])
    fingers = np.stack([
        np.clip(mcp, *lim["mcp_flex"]),
        np.clip(abd, abd_lim[:, 0], abd_lim[:, 1]),
        np.clip(pip, *lim["pip_flex"]),
        np.clip(dip, *lim["dip_flex"]),
    ], axis=-1)
    t_curl = np.clip(grasp[:, 0] + 0.3 * spread * rng.normal(size=n), 0.0, 1.0)
    thumb = np.stack([
        np.clip(-25.0 + 60.0 * t_curl + rng.normal(0, 8 * spread, n), *lim["thumb_cmc_flex"]),
        rng.uniform(*lim["thumb_cmc_abd"], n),
        np.clip(-10.0 + 90.0 * t_curl * rng.uniform(0.4, 1.0, n), *lim["thumb_mcp_flex"]),
        np.clip(-15.0 + 95.0 * t_curl * rng.uniform(0.3, 1.0, n), *lim["thumb_ip_flex"]),
    ], axis=-1)
    return HandPose(fingers=fingers, thumb=thumb)


def forward_kinematics(pose: HandPose, shape: HandShape) -> np.ndarray:
    """Joint positions (N, 21, 3) in the hand frame, mm, in our joint order."""
    n = pose.thumb.shape[0]
    rad = np.deg2rad
    joints = np.zeros((n, NUM_JOINTS, 3))
    ey = np.array([0.0, 1.0, 0.0])

    # thumb: carpal offset, then the rest frame turned radially, tilted palmar and pronated
    t = THUMB_REST_DEG
    base = _radial(rad(t["radial"])) @ rot_x(rad(t["palmar"])) @ rot_y(rad(t["pronation"]))
    frame = np.broadcast_to(base, (n, 3, 3))
    pos = THUMB_CMC_OFFSET_MM * shape.bones[:, 0, :1]
    joints[:, 1] = pos
    cmc_flex, cmc_abd, mcp_flex, ip_flex = (rad(pose.thumb[:, k]) for k in range(4))
    rotations = [_radial(cmc_abd) @ rot_x(cmc_flex), rot_x(mcp_flex), rot_x(ip_flex)]
    for k, r in enumerate(rotations):
        frame = frame @ r
        pos = pos + (frame @ ey) * shape.bones[:, 0, k + 1, None]
        joints[:, 2 + k] = pos

    for f, name in enumerate(FINGERS[1:], start=1):
        mcp_flex, mcp_abd, pip_flex, dip_flex = (rad(pose.fingers[:, f - 1, k]) for k in range(4))
        frame = np.broadcast_to(_radial(rad(METACARPAL_SPLAY_DEG[name])), (n, 3, 3))
        pos = (frame @ ey) * shape.bones[:, f, 0, None]
        joints[:, 4 * f + 1] = pos
        rotations = [_radial(mcp_abd) @ rot_x(mcp_flex), rot_x(pip_flex), rot_x(dip_flex)]
        for k, r in enumerate(rotations):
            frame = frame @ r
            pos = pos + (frame @ ey) * shape.bones[:, f, k + 1, None]
            joints[:, 4 * f + 2 + k] = pos
    return joints


def joint_radii(shape: HandShape) -> np.ndarray:
    """Surface radius (N, 21) mm around each joint: wrist slab, then each chain base -> tip."""
    n = shape.radii.shape[0]
    radii = np.empty((n, NUM_JOINTS))
    radii[:, 0] = WRIST_RADIUS_MM * shape.radii[:, 2, 0] / JOINT_RADII_MM["middle"][0]
    radii[:, 1:] = shape.radii.reshape(n, 20)
    return radii


def scale_and_root(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale bone length (N,) and root position (N, 3) of joints (N, 21, 3)."""
    a, b = SCALE_BONE
    return np.linalg.norm(joints[:, b] - joints[:, a], axis=-1), joints[:, ROOT]


def normalise(joints: np.ndarray) -> np.ndarray:
    """Root-relative, scale-normalised joints: (J - J_root) / |J_9 - J_10| (the network target)."""
    scale, root = scale_and_root(joints)
    return (joints - root[:, None]) / scale[:, None, None]
