"""Procedural paired renderer: RGB + depth + mask + 3D/2D joints + K for named hand domains.

The hand is a union of spheres: one per joint, a dense row along every finger bone (a capsule),
and a bed of larger spheres spanning the palm (a solid slab). Each sphere is splatted into the
pixels of its screen-space box and all fragments go through one z-buffer (``scatter_reduce``
with ``amin`` on a key that packs depth and primitive id), so depth, occlusion, mask and the
shading normal all come from the same visible surface. The background plane and the few large
distractor shapes are tested densely against every pixel, which is cheap for a handful of them.

Each sample is a hand-centred crop, as the RHD/STB/FreiHAND pipelines feed their networks: the
focal length is fixed per domain, the hand's distance is chosen so it spans ``fill`` of the image.

Two kinds of domain. The i.i.d. ones (rhd-like, augment, freihand-*) draw every sample
independently. A sequence domain (stb-like) is STB's design: one subject in 12 sequences
(B1Counting, B1Random, ..., B6Random) of temporally smooth motion, each around its own centre
of pose, view and position, with its own background; consecutive frames are near duplicates and
the test sequences (B1) are unseen in training (``Sequences``).

Determinism: i.i.d. samples are drawn in fixed blocks of ``BLOCK`` whose random streams come
from ``SeedSequence([seed, domain, block])``, so a sample's bytes depend only on (domain, seed,
index, size), not on how generation is sharded. A sequence's trajectory, scene and the subject
come from seed sequences of (seed, domain, sequence index) and (seed, domain); its frames are
rendered in blocks of ``BLOCK`` frames whose pixel noise is seeded by (seed, domain, sequence,
block), so a frame's bytes depend on (domain, seed, size, frames per sequence, sequence, frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmkg import hand
from cmkg.domains import (  # noqa: F401  the catalogue (torch-free), re-exported from here
    BACKGROUNDS,
    DOMAIN_KNOBS,
    DOMAINS,
    SEQUENCE_KNOBS,
    STB_SEQUENCES,
    Domain,
    Sequences,
    domain_code,
    variant,
)

GENERATOR_VERSION = 1  # of the i.i.d. domains (it seeds their blocks: bumping changes them)
SEQUENCE_VERSION = 1  # of the sequence domains
BLOCK = 128
SEQUENCE_FRAMES = 1500  # frames per sequence of render_range's default stream, as in STB
ID_STRIDE = 10_000  # sequence sample id: ID_STRIDE * sequence index + frame, as STB's converter
HARMONICS = 3
DEPTH_KEY_SCALE = 64.0  # depth quantum in the z-buffer key: 1/64 mm
ID_BITS = 12  # primitive ids per sample < 4096
VIS_TOLERANCE = 1.3  # visible: surface at the joint's pixel within 1.3 radii in front of it

# ---------------------------------------------------------------------------------------------
# Hand surface as spheres (hand frame, mm)
# ---------------------------------------------------------------------------------------------

def _bone_subdivisions() -> list[tuple[int, int, int]]:
    """(parent, child, n) for every rendered bone: n spheres between its end joints, spaced at
    most 0.6 of the finger radius at 1.15x the mean hand size so the row reads as a capsule."""
    mean = hand.mean_shape(1)
    radii = hand.joint_radii(mean)[0]
    rows = []
    for child in range(1, hand.NUM_JOINTS):
        parent = int(hand.PARENTS[child])
        if parent == 0 and child != 1:
            continue  # wrist -> finger MCP lies inside the palm slab
        length = float(np.linalg.norm(_MEAN_JOINTS[child] - _MEAN_JOINTS[parent]))
        spacing = 0.6 * min(radii[child], radii[parent])
        rows.append((parent, child, max(1, math.ceil(1.15 * length / spacing) - 1)))
    return rows


_MEAN_JOINTS = hand.forward_kinematics(
    hand.HandPose(np.zeros((1, 4, 4)), np.zeros((1, 4))), hand.mean_shape(1))[0]
BONES = _bone_subdivisions()
PALM_GRID = (4, 5)  # across x along


def hand_spheres(joints: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (N, P, 3), radii (N, P) and owning joint (P,) of the sphere set of each hand.

    Joint spheres come first (P[:21]), then the bone rows, then the palm bed."""
    centres, rads, owner = [joints], [radii], list(range(hand.NUM_JOINTS))
    for parent, child, n in BONES:
        t = (np.arange(1, n + 1) / (n + 1))[None, :, None]  # (1, n, 1)
        centres.append(joints[:, parent, None] * (1 - t) + joints[:, child, None] * t)
        rads.append(radii[:, parent, None] * (1 - t[..., 0]) + radii[:, child, None] * t[..., 0])
        owner += [child] * n
    # palm: bilinear bed between a wrist line and the knuckle line (index MCP .. little MCP)
    wrist, index_mcp, little_mcp = joints[:, 0], joints[:, 5], joints[:, 17]
    across = index_mcp - little_mcp
    gu, gv = PALM_GRID
    u = np.linspace(0.0, 1.0, gu)[None, :, None, None]
    v = np.linspace(0.0, 0.85, gv)[None, None, :, None]
    near = wrist[:, None, None] + (u - 0.5) * 0.7 * across[:, None, None]  # wrist line
    far = little_mcp[:, None, None] + u * across[:, None, None]
    palm = (near * (1 - v) + far * v).reshape(-1, gu * gv, 3)
    thick = hand.PALM_HALF_THICKNESS_MM * radii[:, 9:10] / hand.JOINT_RADII_MM["middle"][0]
    centres.append(palm)
    rads.append(np.broadcast_to(thick, palm.shape[:2]))
    owner += [0] * (gu * gv)
    return np.concatenate(centres, 1), np.concatenate(rads, 1), np.array(owner)


NUM_FINE = hand.NUM_JOINTS + sum(n for _, _, n in BONES)  # joint + bone spheres (small)


# ---------------------------------------------------------------------------------------------
# Sampling a block of scenes
# ---------------------------------------------------------------------------------------------

def _rotation(rng: np.random.Generator, dom: Domain, n: int) -> np.ndarray:
    """Hand-to-camera rotations (n, 3, 3). Camera: x right, y down, z forward. The base pose
    puts the fingers up (-y) and the palm towards the camera (-z)."""
    az = rng.uniform(-dom.azimuth, dom.azimuth, n) + 180.0 * (rng.uniform(size=n) < dom.back_prob)
    el = rng.uniform(-dom.elevation, dom.elevation, n)
    roll = rng.uniform(-dom.roll, dom.roll, n)
    return _view(az, el, roll)


def _view(az: np.ndarray, el: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Hand-to-camera rotations (n, 3, 3) from azimuth, elevation and roll (deg, (n,) each)."""
    base = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    d = np.deg2rad
    return hand.rot_z(d(roll)) @ hand.rot_x(d(el)) @ hand.rot_y(d(az)) @ base


@dataclass
class Scene:
    """Geometry and appearance parameters for a block of samples (numpy, float64, mm)."""

    joints: np.ndarray  # (N, 21, 3) camera frame
    joint_radii: np.ndarray  # (N, 21)
    spheres: np.ndarray  # (N, P, 3)
    sphere_radii: np.ndarray  # (N, P)
    K: np.ndarray  # (N, 3, 3)
    skin: np.ndarray  # (N, 3)
    light_dir: np.ndarray  # (N, 3) towards the light, camera frame
    light_rgb: np.ndarray  # (N, 3)
    ambient: np.ndarray  # (N,)
    diffuse: np.ndarray  # (N,)
    bg_depth: np.ndarray  # (N, 3): plane z = a + b*(u-c) + c*(v-c)
    distractors: np.ndarray  # (N, D, 8): kind, u, v, radius_px, half_h, z, occluder, skin_like
    distractor_rgb: np.ndarray  # (N, D, 3)


def _place(shape: hand.HandShape, pose: hand.HandPose, rot: np.ndarray, f: np.ndarray,
           fill: np.ndarray, shift: np.ndarray, size: int):
    """Pose the hands in front of the camera: rotation ``rot`` (n, 3, 3), focal length ``f``
    (n,) px, the hand spanning ``fill`` (n,) of the image, its box centre moved by ``shift``
    (n, 2) image sizes off the optical axis. Returns camera-frame joints (n, 21, 3), sphere
    centres (n, P, 3) and radii (n, P), joint radii (n, 21)."""
    local = hand.forward_kinematics(pose, shape)
    radii = hand.joint_radii(shape)
    centres, rads, _ = hand_spheres(local, radii)
    local_all = np.concatenate([local, centres], 1) @ np.swapaxes(rot, 1, 2)  # (N, 21+P, 3)
    lo = (local_all - rads.max(1)[:, None, None]).min(1)
    hi = (local_all + rads.max(1)[:, None, None]).max(1)
    centre, half = (lo + hi) / 2, (hi - lo)[:, :2].max(1) / 2
    z = f * half / (fill * size / 2)  # distance making the hand span `fill`
    z = np.maximum(z, (hi - lo)[:, 2] + 100.0)
    offset = shift * size * z[:, None] / f[:, None]
    trans = np.stack([offset[:, 0], offset[:, 1], z], 1) - centre
    cam = local_all + trans[:, None]
    return cam[:, : hand.NUM_JOINTS], cam[:, hand.NUM_JOINTS:], rads, radii


def _intrinsics(f: np.ndarray, size: int) -> np.ndarray:
    K = np.zeros((len(f), 3, 3))
    K[:, 0, 0] = K[:, 1, 1] = f
    K[:, 0, 2] = K[:, 1, 2] = size / 2
    K[:, 2, 2] = 1.0
    return K


def _bg_plane(rng: np.random.Generator, n: int, size: int, root_z: np.ndarray) -> np.ndarray:
    """Background planes (n, 3): z = a + b*(u-c) + c*(v-c), 150-600 mm behind the wrist."""
    return np.stack([root_z + rng.uniform(150.0, 600.0, n),
                     rng.uniform(-1.0, 1.0, n) * 200.0 / size,
                     rng.uniform(-1.0, 1.0, n) * 200.0 / size], 1)


def _distractors(rng: np.random.Generator, dom: Domain, n: int, size: int, root_z: np.ndarray,
                 skin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distractor shapes (n, D, 8) and their colours (n, D, 3), see ``Scene``."""
    d = max(dom.distractors, 1)
    active = np.arange(d)[None] < rng.integers(0, dom.distractors + 1, (n, 1))
    occluder = rng.uniform(size=(n, d)) < dom.occluder_prob
    dz = np.where(occluder, -rng.uniform(30.0, 120.0, (n, d)), rng.uniform(60.0, 400.0, (n, d)))
    skin_like = rng.uniform(size=(n, d)) < dom.skin_like_distractors
    distractors = np.stack([
        rng.integers(0, 2, (n, d)).astype(float),  # 0 ball, 1 flat card
        rng.uniform(-0.1, 1.1, (n, d)) * size,
        rng.uniform(-0.1, 1.1, (n, d)) * size,
        np.where(occluder, rng.uniform(0.05, 0.12, (n, d)),
                 rng.uniform(0.08, 0.35, (n, d))) * size * active,
        rng.uniform(0.3, 1.0, (n, d)),  # card aspect
        root_z[:, None] + dz,
        occluder.astype(float),
        skin_like.astype(float),
    ], -1)
    distractor_rgb = np.where(skin_like[..., None],
                              skin[:, None] + rng.normal(0, 0.05, (n, d, 3)),
                              rng.uniform(0.05, 0.95, (n, d, 3)))
    return distractors, np.clip(distractor_rgb, 0, 1)


def sample_scene(rng: np.random.Generator, dom: Domain, n: int, size: int) -> Scene:
    """``n`` independent scenes of an i.i.d. domain."""
    shape = hand.sample_shape(rng, n, dom.size_mean, dom.size_std)
    pose = hand.sample_pose(rng, n, dom.pose_spread)
    rot = _rotation(rng, dom, n)
    f = size * rng.uniform(*dom.focal, n)
    fill = rng.uniform(*dom.fill, n)
    shift = rng.uniform(-dom.shift, dom.shift, (n, 2))
    joints, spheres, rads, radii = _place(shape, pose, rot, f, fill, shift, size)

    if dom.skin_random_hue:
        skin = rng.uniform(0.15, 0.95, (n, 3))
    else:
        tones = np.array(dom.skin_tones)
        skin = tones[rng.integers(0, len(tones), n)] + rng.normal(0, dom.skin_jitter, (n, 3))
    light = np.concatenate([rng.uniform(-1.0, 1.0, (n, 2)), -rng.uniform(0.4, 1.2, (n, 1))], 1)
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    light_rgb = 1.0 + rng.uniform(-dom.light_tint, dom.light_tint, (n, 3))

    root_z = joints[:, 0, 2]
    bg = _bg_plane(rng, n, size, root_z)
    distractors, distractor_rgb = _distractors(rng, dom, n, size, root_z, skin)
    return Scene(
        joints=joints, joint_radii=radii, spheres=spheres, sphere_radii=rads,
        K=_intrinsics(f, size), skin=np.clip(skin, 0.02, 1.0), light_dir=light,
        light_rgb=light_rgb, ambient=rng.uniform(*dom.ambient, n),
        diffuse=rng.uniform(*dom.diffuse, n), bg_depth=bg, distractors=distractors,
        distractor_rgb=distractor_rgb)


# ---------------------------------------------------------------------------------------------
# Rendering (torch, float32)
# ---------------------------------------------------------------------------------------------

def _pack(depth: torch.Tensor, ids: torch.Tensor | int) -> torch.Tensor:
    return torch.round(depth * DEPTH_KEY_SCALE).long() * (1 << ID_BITS) + ids


def _splat(keys: torch.Tensor, xyz: torch.Tensor, rad: torch.Tensor, f: torch.Tensor,
           first_id: int, size: int) -> None:
    """Scatter-min the fragments of spheres (B, P) into ``keys`` (B*H*W,) in place.

    A sphere at camera point (X, Y, Z) with radius r covers a disc of radius rho = f r / Z px
    around its projection; at offset q (in units of rho) its near surface lies at
    Z - r sqrt(1 - q^2). Spheres are bucketed by ceil(rho), each bucket splatting a box of
    (2R+1)^2 pixels, so a few large spheres do not inflate the work of the many small ones."""
    b, p = rad.shape
    z = xyz[..., 2]
    u = (f[:, None] * xyz[..., 0] / z + size / 2).reshape(-1)
    v = (f[:, None] * xyz[..., 1] / z + size / 2).reshape(-1)
    rho = (f[:, None] * rad / z).reshape(-1)
    z, rad = z.reshape(-1), rad.reshape(-1)
    sample = torch.arange(b).repeat_interleave(p)
    ids = first_id + torch.arange(p).repeat(b)
    reach = torch.ceil(rho).to(torch.int32)
    for r in torch.unique(reach[rad > 0]).tolist():
        sel = torch.nonzero((reach == r) & (rad > 0)).squeeze(1)
        offs = torch.arange(-r, r + 1, dtype=torch.float32)
        us, vs, rhos = u[sel, None], v[sel, None], rho[sel, None]
        px = torch.floor(us) + offs.repeat(2 * r + 1)  # (n, K)
        py = torch.floor(vs) + offs.repeat_interleave(2 * r + 1)
        du = (px + 0.5 - us) / rhos
        dv = (py + 0.5 - vs) / rhos
        q2 = du * du + dv * dv
        ok = torch.nonzero((q2 < 1.0) & (px >= 0) & (px < size) & (py >= 0) & (py < size),
                           as_tuple=True)
        row = ok[0]
        depth = z[sel][row] - rad[sel][row] * torch.sqrt(1.0 - q2[ok])
        pix = (sample[sel][row] * size + py[ok].long()) * size + px[ok].long()
        keys.scatter_reduce_(0, pix, _pack(depth, ids[sel][row]), reduce="amin")


def _noise_field(gen: torch.Generator, b: int, ch: int, cells: int, size: int) -> torch.Tensor:
    """Smooth random field (B, ch, size, size) with about ``cells`` blobs across."""
    grid = torch.randn(b, ch, cells + 1, cells + 1, generator=gen)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)


def _background(gen: torch.Generator, dom: Domain, b: int, size: int) -> torch.Tensor:
    """Albedo of the background (B, 3, S, S) in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    if dom.background == "green":
        base = torch.tensor([0.12, 0.62, 0.22]).view(1, 3, 1, 1)
        tint = 0.04 * torch.randn(b, 3, 1, 1, generator=gen)
        return (base + tint + dom.bg_texture * _noise_field(gen, b, 1, 2, size)).clamp(0, 1)
    if dom.background == "indoor":  # walls and a desk: smooth neutral gradients, large panels
        grey = 0.35 + 0.35 * torch.rand(b, 1, 1, 1, generator=gen)
        warm = torch.tensor([0.05, 0.02, -0.03]).view(1, 3, 1, 1)
        slope = 0.15 * torch.randn(b, 2, 1, 1, generator=gen)
        img = grey + warm + slope[:, :1] * xs + slope[:, 1:] * ys
        edge = torch.rand(b, 1, 1, 1, generator=gen) * 1.6 - 0.8
        panel = 0.15 * torch.randn(b, 3, 1, 1, generator=gen)
        img = img + panel * (ys > edge).float()
        return (img + dom.bg_texture * _noise_field(gen, b, 3, 3, size)).clamp(0, 1)
    # clutter / photo: colourful smooth fields plus oriented stripes of random frequency
    colours = torch.rand(b, 3, 1, 1, generator=gen)
    img = colours + 0.5 * dom.bg_texture * _noise_field(gen, b, 3, 4, size)
    img = img + 0.3 * dom.bg_texture * _noise_field(gen, b, 3, 12, size)
    theta = torch.rand(b, 1, 1, 1, generator=gen) * math.pi
    freq = 2 + 10 * torch.rand(b, 1, 1, 1, generator=gen)
    phase = torch.rand(b, 1, 1, 1, generator=gen) * 2 * math.pi
    stripes = torch.sin(freq * math.pi * (xs * torch.cos(theta) + ys * torch.sin(theta)) + phase)
    amp = dom.bg_texture * torch.rand(b, 3, 1, 1, generator=gen)
    if dom.background == "photo":
        amp = amp * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    return (img + amp * stripes).clamp(0, 1)


def render(scene: Scene, dom: Domain, size: int, gen: torch.Generator,
           bg: torch.Tensor | None = None,
           skin_noise: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Render a block of scenes. Returns uint8 rgb (B,S,S,3), float32 depth mm (B,S,S),
    uint8 mask (B,S,S), float32 joints3d (B,21,3) mm, joints2d (B,21,2) px, bool vis (B,21),
    float32 K (B,3,3).

    ``bg`` (B, 3, S, S) background albedo and ``skin_noise`` (B, 1, S, S) skin-texture field
    are drawn from ``gen`` per sample unless given (a sequence keeps both fixed)."""
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    b, s = scene.joints.shape[0], size
    f = t(scene.K[:, 0, 0])
    ys, xs = torch.meshgrid(torch.arange(s) + 0.5 - s / 2, torch.arange(s) + 0.5 - s / 2,
                            indexing="ij")

    # background plane (id 0) and distractors (ids 1..D), tested densely
    bgp = t(scene.bg_depth)
    bg_depth = bgp[:, 0, None, None] + bgp[:, 1, None, None] * xs + bgp[:, 2, None, None] * ys
    keys = _pack(bg_depth, 0)  # (B, S, S)
    dis = t(scene.distractors)
    n_dis = dis.shape[1]
    dpx = xs + s / 2 - dis[..., 1, None, None]  # (B, D, S, S)
    dpy = ys + s / 2 - dis[..., 2, None, None]
    rad_px = dis[..., 3, None, None]
    card = dis[..., 0, None, None] > 0.5
    inside_ball = dpx**2 + dpy**2 < rad_px**2
    inside_card = (dpx.abs() < rad_px) & (dpy.abs() < rad_px * dis[..., 4, None, None])
    inside = torch.where(card, inside_card, inside_ball) & (rad_px > 0)
    q2 = (dpx**2 + dpy**2) / rad_px.clamp(min=1e-6) ** 2
    ball_r_mm = rad_px * dis[..., 5, None, None] / f.view(b, 1, 1, 1)
    ball_depth = dis[..., 5, None, None] - ball_r_mm * torch.sqrt((1 - q2).clamp(min=0))
    dis_depth = torch.where(card, dis[..., 5, None, None].expand_as(q2), ball_depth)
    dis_depth = torch.where(inside, dis_depth, torch.inf)
    near, near_id = dis_depth.min(1)  # (B, S, S): the nearest distractor at each pixel
    keys = torch.where(near < bg_depth, _pack(near.clamp(max=bg_depth), near_id + 1), keys)
    keys = keys.reshape(-1)

    # the hand: small joint/bone spheres and large palm spheres in two splat groups
    spheres, rads = t(scene.spheres), t(scene.sphere_radii)
    first = 1 + n_dis
    _splat(keys, spheres[:, :NUM_FINE], rads[:, :NUM_FINE], f, first, s)
    _splat(keys, spheres[:, NUM_FINE:], rads[:, NUM_FINE:], f, first + NUM_FINE, s)
    keys = keys.view(b, s, s)
    ids = keys % (1 << ID_BITS)
    depth = (keys // (1 << ID_BITS)).float() / DEPTH_KEY_SCALE
    is_hand = ids >= first
    is_dis = (ids >= 1) & ~is_hand

    # shading normals: spheres from the pixel's offset to the winning centre; planes face us
    normal = torch.zeros(b, s, s, 3)
    normal[..., 2] = -1.0
    hid = (ids - first).clamp(min=0).view(b, -1)
    gather = lambda a: torch.gather(a, 1, hid).view(b, s, s)  # noqa: E731
    z_w = gather(spheres[..., 2])
    rho = f.view(b, 1, 1) * gather(rads) / z_w
    du = (xs - f.view(b, 1, 1) * gather(spheres[..., 0]) / z_w) / rho
    dv = (ys - f.view(b, 1, 1) * gather(spheres[..., 1]) / z_w) / rho
    hand_n = torch.stack([du, dv, -torch.sqrt((1 - du * du - dv * dv).clamp(min=0))], -1)
    normal = torch.where(is_hand[..., None], hand_n, normal)
    did = (ids - 1).clamp(0, n_dis - 1)
    dis_idx = did[:, None].expand(b, 1, s, s)
    dball = torch.gather(card.expand(b, n_dis, s, s), 1, dis_idx)[:, 0] == 0
    ddu = torch.gather(dpx, 1, dis_idx)[:, 0] / torch.gather(rad_px.expand_as(dpx), 1, dis_idx)[:, 0]
    ddv = torch.gather(dpy, 1, dis_idx)[:, 0] / torch.gather(rad_px.expand_as(dpy), 1, dis_idx)[:, 0]
    ball_n = torch.stack([ddu, ddv, -torch.sqrt((1 - ddu * ddu - ddv * ddv).clamp(min=0))], -1)
    normal = torch.where((is_dis & dball)[..., None], ball_n, normal)

    # albedo: textured background, coloured distractors, textured skin (optionally harmonised)
    bg = (_background(gen, dom, b, s) if bg is None else bg).permute(0, 2, 3, 1)  # (B, S, S, 3)
    skin = t(scene.skin)
    if dom.harmonize > 0:
        skin = (1 - dom.harmonize) * skin + dom.harmonize * bg.mean((1, 2))
    if skin_noise is None:
        skin_noise = _noise_field(gen, b, 1, 6, s)
    skin_tex = 1 + dom.skin_texture * skin_noise.permute(0, 2, 3, 1)
    albedo = torch.where(is_hand[..., None], skin.view(b, 1, 1, 3) * skin_tex, bg)
    dis_rgb = torch.gather(t(scene.distractor_rgb), 1, did.view(b, -1, 1).expand(b, s * s, 3))
    dis_tex = 1 + 0.5 * dom.bg_texture * (bg - bg.mean((1, 2), keepdim=True))
    albedo = torch.where(is_dis[..., None], dis_rgb.view(b, s, s, 3) * dis_tex, albedo)

    light = t(scene.light_dir)
    lambert = (normal * light.view(b, 1, 1, 3)).sum(-1).clamp(min=0)
    shade = t(scene.ambient).view(b, 1, 1) + t(scene.diffuse).view(b, 1, 1) * lambert
    rgb = albedo * shade[..., None] * t(scene.light_rgb).view(b, 1, 1, 3)
    rgb = rgb + dom.rgb_noise * torch.randn(b, s, s, 3, generator=gen)
    rgb = (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8)

    # 2D joints and visibility: a joint is visible when the hand surface seen at its pixel lies
    # within VIS_TOLERANCE of its radius in front of it (the neighbouring spheres of a bone that
    # points at the camera sit slightly nearer than the joint's own sphere), and not behind it
    joints = t(scene.joints)
    uv = f.view(b, 1, 1) * joints[..., :2] / joints[..., 2:] + s / 2
    pix = torch.floor(uv).long()
    inside_img = ((pix >= 0) & (pix < s)).all(-1)
    pc = pix.clamp(0, s - 1)
    flat = pc[..., 1] * s + pc[..., 0]
    gap = torch.gather(depth.view(b, -1), 1, flat) - joints[..., 2]
    hand_at = torch.gather(is_hand.view(b, -1), 1, flat)
    radius = t(scene.joint_radii)
    vis = inside_img & hand_at & (gap >= -VIS_TOLERANCE * radius) & (gap <= 0)

    depth = depth + dom.depth_noise_mm * torch.randn(b, s, s, generator=gen)

    return {
        "rgb": rgb.numpy(),
        "depth": depth.numpy(),
        "mask": is_hand.to(torch.uint8).numpy(),
        "joints3d": joints.numpy(),
        "joints2d": uv.numpy(),
        "vis": vis.numpy(),
        "K": t(scene.K).numpy(),
    }


def _block_rngs(domain: str, seed: int, block: int) -> tuple[np.random.Generator, torch.Generator]:
    ss = np.random.SeedSequence([seed, domain_code(domain), block, GENERATOR_VERSION])
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(ss), gen


# ---------------------------------------------------------------------------------------------
# Sequence domains: one subject, smooth trajectories around per-sequence centres
# ---------------------------------------------------------------------------------------------

def _seeds(domain: str, seed: int, *key: int) -> tuple[np.random.Generator, torch.Generator]:
    ss = np.random.SeedSequence([seed, domain_code(domain), SEQUENCE_VERSION, *key])
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(ss), gen


class _Signals:
    """``n`` smooth zero-mean signals of unit RMS over t in [0, 1): each a sum of HARMONICS
    sinusoids of random period, phase and weight (drawn once, evaluated at any t)."""

    def __init__(self, rng: np.random.Generator, n: int, cycles: tuple[float, float]):
        self.freq = rng.uniform(*cycles, (HARMONICS, n))
        self.phase = rng.uniform(0.0, 2 * math.pi, (HARMONICS, n))
        w = rng.normal(size=(HARMONICS, n))
        self.weight = w / np.sqrt((w**2).sum(0) / 2)  # RMS of sum_k w_k sin(.) is |w| / sqrt 2

    def __call__(self, t: np.ndarray) -> np.ndarray:  # (T,) -> (T, n)
        arg = 2 * math.pi * self.freq * t[:, None, None] + self.phase
        return (self.weight * np.sin(arg)).sum(1)


@dataclass
class _Subject:
    shape: hand.HandShape  # n = 1
    skin: np.ndarray  # (3,)
    focal: float  # multiple of the image size
    flex: np.ndarray  # (2, 5): MCP and PIP (thumb: MCP and IP) flexion at full curl, fraction


def _subject(domain: str, dom: Domain, seed: int) -> _Subject:
    rng, _ = _seeds(domain, seed, 0)
    shape = hand.sample_shape(rng, 1, dom.size_mean, dom.size_std)
    tones = np.array(dom.skin_tones)
    skin = tones[rng.integers(0, len(tones))] + rng.normal(0, dom.skin_jitter, 3)
    return _Subject(shape=shape, skin=np.clip(skin, 0.02, 1.0),
                    focal=float(rng.uniform(*dom.focal)), flex=rng.uniform(0.7, 1.0, (2, 5)))


# columns of a sequence's signals
_VIEW, _SHIFT, _FILL, _GRASP, _CURL, _ABD, _THUMB_ABD, _LIGHT, _AMBIENT = (
    slice(0, 3), slice(3, 5), 5, 6, slice(7, 12), slice(12, 16), 16, slice(17, 19), 19)
_NUM_SIGNALS = 20


def _sequence_scene(domain: str, dom: Domain, seed: int, seq: int, frames: np.ndarray,
                    length: int, size: int) -> tuple[Scene, torch.Tensor, torch.Tensor]:
    """Scenes of ``frames`` (T,) of sequence ``seq`` (``length`` frames long), with the
    sequence's fixed background albedo (1, 3, S, S) and skin-texture field (1, 1, S, S)."""
    sq, sub = dom.sequences, _subject(domain, dom, seed)
    rng, gen = _seeds(domain, seed, 1, seq)
    # -- what is fixed over the sequence (drawn in a fixed order, whatever ``frames``) ----------
    sig = _Signals(rng, _NUM_SIGNALS, sq.cycles)
    view0 = rng.uniform(-1.0, 1.0, 3) * np.array([dom.azimuth, dom.elevation, dom.roll])
    shift0 = rng.uniform(-dom.shift, dom.shift, 2)
    fill0 = rng.uniform(*dom.fill)
    grasp0 = rng.uniform(*sq.grasp_centre)
    curl0 = rng.normal(0.0, sq.finger_centre, 5)  # index .. little, thumb
    abd0 = rng.normal(0.0, sq.abduction_centre_deg, 4)
    thumb_abd0 = rng.uniform(*sq.thumb_abduction_centre_deg)
    count_cycles, count_phase = rng.integers(1, 3), rng.uniform()
    light0 = np.concatenate([rng.uniform(-1.0, 1.0, 2), -rng.uniform(0.4, 1.2, 1)])
    light_rgb = 1.0 + rng.uniform(-dom.light_tint, dom.light_tint, 3)
    ambient0, diffuse0 = rng.uniform(*dom.ambient), rng.uniform(*dom.diffuse)
    bg_plane = _bg_plane(rng, 1, size, np.zeros(1))
    distractors, distractor_rgb = _distractors(rng, dom, 1, size, np.zeros(1), sub.skin[None])
    bg = _background(gen, dom, 1, size)
    skin_noise = _noise_field(gen, 1, 1, 6, size)

    # -- the trajectory at the requested frames ------------------------------------------------
    n = len(frames)
    s = sig(frames / length)  # (T, _NUM_SIGNALS)
    if sq.names[seq].endswith("Counting"):  # count 0..5..0: finger k extends once count > k + 1/2
        phase = (count_cycles * frames / length + count_phase) % 1.0
        count = 5.4 * (1.0 - np.abs(2.0 * phase - 1.0)) - 0.2 + 0.3 * s[:, _GRASP]
        curl = 0.85 / (1.0 + np.exp(2.5 * (count[:, None] - np.arange(5) - 0.5)))
        curl = curl + 0.5 * sq.finger * s[:, _CURL]
    else:
        curl = grasp0 + sq.grasp * s[:, _GRASP, None] + curl0 + sq.finger * s[:, _CURL]
    curl = np.clip(curl, 0.0, 1.0)  # (T, 5)
    lim = hand.LIMITS_DEG
    fc = curl[:, :4]
    pip = fc * 100.0 * sub.flex[1, :4]
    abd = (1.0 - fc) * (abd0 + sq.abduction_deg * s[:, _ABD])
    abd_lim = np.array([lim["mcp_abd"][f] for f in hand.FINGERS[1:]])
    fingers = np.stack([
        np.clip(fc * 90.0 * sub.flex[0, :4], *lim["mcp_flex"]),
        np.clip(abd, abd_lim[:, 0], abd_lim[:, 1]),
        np.clip(pip, *lim["pip_flex"]),
        np.clip(2.0 / 3.0 * pip, *lim["dip_flex"]),
    ], axis=-1)
    tc = curl[:, 4]
    thumb = np.stack([
        np.clip(-25.0 + 60.0 * tc, *lim["thumb_cmc_flex"]),
        np.clip(thumb_abd0 + 1.5 * sq.abduction_deg * s[:, _THUMB_ABD], *lim["thumb_cmc_abd"]),
        np.clip(-10.0 + 90.0 * tc * sub.flex[0, 4], *lim["thumb_mcp_flex"]),
        np.clip(-15.0 + 95.0 * tc * sub.flex[1, 4], *lim["thumb_ip_flex"]),
    ], axis=-1)
    view = view0 + np.array(sq.view_deg) * s[:, _VIEW]  # (T, 3) azimuth, elevation, roll
    shape = hand.HandShape(bones=np.repeat(sub.shape.bones, n, 0),
                           radii=np.repeat(sub.shape.radii, n, 0),
                           size=np.repeat(sub.shape.size, n, 0))
    f = np.full(n, size * sub.focal)
    fill = np.clip(fill0 + sq.fill * s[:, _FILL], 0.5, 0.95)
    joints, spheres, rads, radii = _place(
        shape, hand.HandPose(fingers=fingers, thumb=thumb),
        _view(view[:, 0], view[:, 1], view[:, 2]), f, fill, shift0 + sq.shift * s[:, _SHIFT], size)

    light = np.concatenate([light0[None, :2] + sq.light * s[:, _LIGHT],
                            np.broadcast_to(light0[2:], (n, 1))], 1)
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    root_z = joints[:, 0, 2]
    bg_depth = np.repeat(bg_plane, n, 0)
    bg_depth[:, 0] += root_z  # the scene keeps its distance behind the hand
    distractors = np.repeat(distractors, n, 0)
    distractors[..., 5] += root_z[:, None]
    scene = Scene(
        joints=joints, joint_radii=radii, spheres=spheres, sphere_radii=rads,
        K=_intrinsics(f, size), skin=np.repeat(sub.skin[None], n, 0), light_dir=light,
        light_rgb=np.repeat(light_rgb[None], n, 0),
        ambient=ambient0 + sq.ambient * s[:, _AMBIENT], diffuse=np.full(n, diffuse0),
        bg_depth=bg_depth, distractors=distractors,
        distractor_rgb=np.repeat(distractor_rgb, n, 0))
    return scene, bg, skin_noise


def render_sequence_block(domain: str, seed: int, size: int, seq: int, block: int,
                          length: int, knobs: dict | None = None) -> dict[str, np.ndarray]:
    """Frames [block * BLOCK, min((block + 1) * BLOCK, length)) of sequence ``seq`` of the
    sequence domain ``domain`` (with ``knobs``, see ``variant``), each sequence ``length``
    frames long (see ``render``)."""
    dom = variant(domain, knobs)
    frames = np.arange(block * BLOCK, min((block + 1) * BLOCK, length))
    scene, bg, skin_noise = _sequence_scene(domain, dom, seed, seq, frames, length, size)
    _, gen = _seeds(domain, seed, 2, seq, block)  # per-frame pixel and depth noise
    n = len(frames)
    return render(scene, dom, size, gen, bg.expand(n, -1, -1, -1),
                  skin_noise.expand(n, -1, -1, -1))


# ---------------------------------------------------------------------------------------------
# The sample stream
# ---------------------------------------------------------------------------------------------

def render_range(domain: str, seed: int, size: int, start: int, stop: int,
                 frames: int | None = None, knobs: dict | None = None) -> dict[str, np.ndarray]:
    """Samples [start, stop) of the stream (domain, seed, size), rendered block by block, of the
    named domain with ``knobs`` applied (``variant``).

    The stream of a sequence domain is its sequences one after the other, ``frames`` frames
    each (default SEQUENCE_FRAMES; an i.i.d. domain ignores it): sample i is frame
    i % frames of sequence i // frames, and the stream ends after the last sequence."""
    dom = variant(domain, knobs)
    parts = []
    if dom.sequences is None:
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            rng, gen = _block_rngs(domain, seed, block)
            out = render(sample_scene(rng, dom, BLOCK, size), dom, size, gen)
            lo, hi = max(start - block * BLOCK, 0), min(stop - block * BLOCK, BLOCK)
            parts.append({k: v[lo:hi] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    frames = SEQUENCE_FRAMES if frames is None else frames
    total = len(dom.sequences.names) * frames
    if not 0 <= start < stop <= total:
        raise ValueError(f"{domain}: samples [{start}, {stop}) outside its stream of "
                         f"{len(dom.sequences.names)} sequences x {frames} frames")
    for seq in range(start // frames, (stop - 1) // frames + 1):
        a, b = max(start - seq * frames, 0), min(stop - seq * frames, frames)
        for block in range(a // BLOCK, (b - 1) // BLOCK + 1):
            out = render_sequence_block(domain, seed, size, seq, block, frames, knobs)
            lo, hi = max(a - block * BLOCK, 0), min(b - block * BLOCK, BLOCK)
            parts.append({k: v[lo:hi] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
