"""The procedural video world: seeded scenes of textured moving objects, each rendered twice with the same
motion (the source clip, and the clip after one edit), so every edit has an exact ground truth.

A scene is a textured background seen through a panning/zooming camera, under a slowly moving light, with
1-3 textured objects that translate, turn, grow/shrink and move parts (a fish's tail wags, a blob wobbles),
and sometimes a foreground post that occludes them. Frame 1 predicts the motion (so an image-to-video model
can beat repeating frame 1):
  - an object moves where its shape points (every shape has a nose on its local +u axis);
  - its speed is set by its size (smaller = faster: speed = SPEED_K / radius);
  - it turns towards the side its eye sits on (eye offset e in [-0.2, 0.2] -> TURN_K * e rad per frame);
  - it grows moving down the frame and shrinks moving up (perspective: scale ~ exp(DEPTH_K * dy));
  - the camera pans along the background's band-limited sawtooth bands (slow rise, sharp drop: the pan
    goes the way the rise goes), pan speed = band period / 10 per frame; no bands = no pan;
  - the camera zooms in when the vignette is bright in the centre, out when dark (strength ~ zoom rate);
  - the light's bright side spreads across the frame (the light edge moves towards the dark side).
Coordinates are in frame heights (y down, x right), so a scene looks the same at every resolution;
rendering supersamples (SUPERSAMPLE x SUPERSAMPLE per pixel, signed-distance edges) for smooth content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

EDITS = ("recolour", "colour_fill", "retexture", "shape_swap", "insertion", "removal", "restyle")
TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 1_000_100)     # never used in training
SHAPES = ("arrow", "dart", "teardrop", "bullet", "fish", "blob")
TEXTURES = ("stripes", "checker", "dots", "rings", "split")
STYLES = ("duotone", "channel_swap", "sepia", "invert", "tint")
SUPERSAMPLE = 2
SPEED_K = 0.0022         # speed (frame heights / frame) * radius (frame heights)
TURN_K = 0.25            # rad / frame per unit of eye offset
DEPTH_K = 1.2            # log-scale change per frame height moved down
EYE_U = 0.2              # the eye's position along the object's axis (object units)


@dataclass(frozen=True)
class WorldSample:
    """One edit of one scene; float32 tensors, images in 0..1.

    source [T, H, W, 3]: the clip; target [T, H, W, 3]: the ground-truth edited clip (same motion);
    edited_first [H, W, 3] = target[0]; edit_mask [T, H, W]: 1 = edit region (the union, per frame, of what
    the edit changes: the edited object's visible coverage before and after, or the whole frame for restyle),
    soft at anti-aliased edges; source and target are identical wherever it is 0. object_masks [N, T, H, W]:
    the visible (occlusion-aware) coverage of each object of the source scene (movers, then the post)."""

    source: Tensor
    edited_first: Tensor
    target: Tensor
    edit_mask: Tensor
    object_masks: Tensor
    edit: str
    seed: int


@dataclass(frozen=True)
class Obj:
    """An object: shape/texture kinds and parameters, plus its trajectory per frame (world coordinates).

    pos [T, 2], heading [T] (rad), scale [T] (radius, frame heights); flat: one unlit colour (colour_fill)."""

    oid: int
    shape: str
    texture: str
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    tex_freq: float
    tex_angle: float
    tex_phase: float
    eye: float
    phase: float
    pos: np.ndarray
    heading: np.ndarray
    scale: np.ndarray
    flat: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Scene:
    """Everything needed to render a clip. bg_waves [K, 4]: (fx, fy, phase, amp); pan [2] per frame;
    band_period 0 = no bands; zoom: log-zoom rate per frame; light_dir [2] unit; style: restyle colour map."""

    size: tuple[int, int]
    frames: int
    bg_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_waves: np.ndarray
    band_period: float
    pan: np.ndarray
    zoom: float
    light_dir: np.ndarray
    light_offset: float
    objects: tuple[Obj, ...]
    style: tuple | None = None


def _check(size: tuple[int, int], frames: int, edit: str | None = None) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"size must be (height, width), both positive multiples of 16 (Wan's rule); "
                         f"got {tuple(size)}. Use e.g. (64, 64) or (96, 96).")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1 (Wan's rule: 5, 9, 13, 17, ...); got {frames}.")
    if edit is not None and edit not in EDITS:
        raise ValueError(f"unknown edit '{edit}'; use one of {EDITS}.")


def _colour(rng: np.random.Generator, sat=(0.45, 0.95), val=(0.35, 0.95)) -> tuple[float, float, float]:
    """A random colour from hue, saturation and value."""
    return _hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return tuple(float(c) for c in rgb)


def _trajectory(rng: np.random.Generator, frames: int, aspect: float, radius: float, eye: float):
    """Start inside the frame heading roughly to its centre; integrate heading (turn rate from the eye),
    speed (from the size) and scale (from vertical motion). Returns pos [T, 2], heading [T], scale [T]."""
    start = np.array([rng.uniform(0.25, 0.75) * aspect, rng.uniform(0.25, 0.75)])
    centre = np.array([aspect / 2, 0.5])
    to_centre = math.atan2(*(centre - start)[::-1])
    heading = to_centre + rng.normal(0, 0.9) + TURN_K * eye * np.arange(frames)
    speed = SPEED_K / radius
    steps = speed * np.stack([np.cos(heading), np.sin(heading)], -1)
    pos = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], 0)])
    scale = radius * np.exp(DEPTH_K * (pos[:, 1] - start[1]))
    return pos, heading, scale


def _make_object(rng: np.random.Generator, oid: int, frames: int, aspect: float) -> Obj:
    radius = rng.uniform(0.1, 0.18)
    eye = float(rng.choice([-0.2, -0.1, 0.0, 0.1, 0.2]))
    pos, heading, scale = _trajectory(rng, frames, aspect, radius, eye)
    return Obj(oid=oid, shape=str(rng.choice(SHAPES)), texture=str(rng.choice(TEXTURES)),
               colours=(_colour(rng), _colour(rng)), tex_freq=rng.uniform(0.5, 1.1),
               tex_angle=rng.uniform(0, np.pi), tex_phase=rng.uniform(0, 2 * np.pi), eye=eye,
               phase=rng.uniform(0, 2 * np.pi), pos=pos, heading=heading, scale=scale)


def _make_post(rng: np.random.Generator, oid: int, frames: int, aspect: float) -> Obj:
    """A static foreground post (world coordinates, so it moves with the camera): the occluder."""
    pos = np.array([rng.uniform(0.3, 0.7) * aspect, 0.5])
    tilt = np.pi / 2 + rng.uniform(-0.3, 0.3)
    return Obj(oid=oid, shape="post", texture="stripes", colours=(_colour(rng, val=(0.3, 0.6)),
               _colour(rng, val=(0.5, 0.9))), tex_freq=rng.uniform(0.2, 0.4), tex_angle=0.0,
               tex_phase=rng.uniform(0, 2 * np.pi), eye=0.0, phase=0.0, pos=np.repeat(pos[None], frames, 0),
               heading=np.full(frames, tilt), scale=np.full(frames, rng.uniform(0.05, 0.08)))


def make_scene(seed: int, size: tuple[int, int] = (64, 64), frames: int = 17) -> Scene:
    """The source scene of a seed (deterministic: one local numpy Generator)."""
    _check(size, frames)
    rng = np.random.default_rng([int(seed), 0])
    aspect = size[1] / size[0]
    n_waves = 6
    freq = rng.uniform(0.8, 3.0, n_waves)
    ang = rng.uniform(0, 2 * np.pi, n_waves)
    waves = np.stack([freq * np.cos(ang), freq * np.sin(ang), rng.uniform(0, 2 * np.pi, n_waves),
                      rng.uniform(0.3, 1.0, n_waves)], -1)
    panning = rng.random() < 0.75
    band_period = rng.uniform(0.2, 0.35) if panning else 0.0
    pan_ang = rng.uniform(0, 2 * np.pi)
    pan = band_period / 10 * np.array([np.cos(pan_ang), np.sin(pan_ang)])
    zoom = rng.choice([-1.0, 1.0]) * rng.uniform(0.004, 0.012) if rng.random() < 0.5 else 0.0
    light_ang = rng.uniform(0, 2 * np.pi)
    objects = [_make_object(rng, i, frames, aspect) for i in range(int(rng.integers(1, 4)))]
    if rng.random() < 0.5:
        objects.append(_make_post(rng, len(objects), frames, aspect))
    return Scene(size=tuple(size), frames=frames, bg_colours=(_colour(rng, sat=(0.2, 0.7)),
                 _colour(rng, sat=(0.2, 0.7))), bg_waves=waves, band_period=band_period, pan=pan,
                 zoom=float(zoom), light_dir=np.array([np.cos(light_ang), np.sin(light_ang)]),
                 light_offset=rng.uniform(-0.2, 0.2), objects=tuple(objects))


def edit_scene(scene: Scene, seed: int, edit: str) -> tuple[Scene, int | None]:
    """The scene after `edit` (its own Generator, so the source scene is the same for every edit).

    Returns (edited scene, oid of the object the edit changes; None for restyle)."""
    _check(scene.size, scene.frames, edit)
    rng = np.random.default_rng([int(seed), 1 + EDITS.index(edit)])
    movers = [o for o in scene.objects if o.shape != "post"]
    if edit == "restyle":
        kind = str(rng.choice(STYLES))
        return replace(scene, style=(kind, _colour(rng, val=(0.1, 0.3)), _colour(rng, val=(0.8, 1.0)),
                                     int(rng.integers(1, 3)))), None
    if edit == "insertion":
        new = _make_object(rng, max(o.oid for o in scene.objects) + 1, scene.frames, scene.size[1] / scene.size[0])
        objects = list(scene.objects)
        objects.insert(len(movers), new)                 # in front of the movers, behind the post
        return replace(scene, objects=tuple(objects)), new.oid
    target = movers[int(rng.integers(len(movers)))]
    if edit == "removal":
        return replace(scene, objects=tuple(o for o in scene.objects if o.oid != target.oid)), target.oid
    if edit == "recolour":
        turn = rng.uniform(0.3, 0.7)
        new = replace(target, colours=tuple(_rotate_hue(c, turn) for c in target.colours))
    elif edit == "colour_fill":
        new = replace(target, flat=_colour(rng, sat=(0.8, 1.0), val=(0.8, 1.0)))
    elif edit == "retexture":
        kind = str(rng.choice([t for t in TEXTURES if t != target.texture]))
        new = replace(target, texture=kind, tex_freq=rng.uniform(0.5, 1.1), tex_angle=rng.uniform(0, np.pi))
    else:                                                # shape_swap
        new = replace(target, shape=str(rng.choice([s for s in SHAPES if s != target.shape])))
    return replace(scene, objects=tuple(new if o.oid == target.oid else o for o in scene.objects)), target.oid


def _rotate_hue(rgb, turn: float) -> tuple[float, float, float]:
    """Rotate a colour's hue by `turn` of a full circle (Rodrigues rotation about the grey axis)."""
    a = 2 * np.pi * turn
    k = np.ones(3) / np.sqrt(3)
    v = np.array(rgb)
    out = v * np.cos(a) + np.cross(k, v) * np.sin(a) + k * (k @ v) * (1 - np.cos(a))
    return tuple(float(c) for c in np.clip(out, 0, 1))


# ---- rendering (numpy float32: single-threaded elementwise maths, fast on a busy CPU) --------------------

Array = np.ndarray
F32 = np.float32


def _col(values) -> Array:
    """A per-frame value [T] as float32 [T, 1, 1] (broadcasts over a frame)."""
    return np.asarray(values, F32)[:, None, None]


def _sigmoid(x: Array) -> Array:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _polygon_sdf(u: Array, v: Array, verts: Array) -> Array:
    """Signed distance (negative inside) from points (u, v) [...] to a closed polygon verts [N, 2]."""
    pts = [(float(a), float(b)) for a, b in verts]
    d = (u - pts[0][0]) ** 2 + (v - pts[0][1]) ** 2
    inside = np.zeros(u.shape, bool)
    for i in range(len(pts)):
        (ax, ay), (bx, by) = pts[i], pts[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = u - ax, v - ay
        t = np.clip((wx * ex + wy * ey) * (1 / (ex * ex + ey * ey)), 0, 1)
        d = np.minimum(d, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        c1, c2, c3 = v >= ay, v < by, ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
    return np.where(inside, -1, 1).astype(F32) * np.sqrt(d)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int) -> Array:
    a = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], -1)


_TEAR_A = math.acos(0.6 / 1.3)
_POLYS = {
    "arrow": np.array([[1, 0], [0.1, 0.75], [0.1, 0.32], [-0.9, 0.32], [-0.9, -0.32], [0.1, -0.32], [0.1, -0.75]]),
    "dart": np.array([[1, 0], [-0.8, 0.75], [-0.35, 0], [-0.8, -0.75]]),
    "teardrop": np.concatenate([[[1.0, 0.0]], _arc(-0.3, 0, 0.6, _TEAR_A, 2 * np.pi - _TEAR_A, 11)]),
    "bullet": np.concatenate([_arc(0.3, 0, 0.6, -np.pi / 2, np.pi / 2, 7), [[-0.9, 0.6], [-0.9, -0.6]]]),
}
_FISH_BODY = _arc(0.15, 0, 1.0, 0, 2 * np.pi, 13)[:-1] * np.array([0.8, 0.48]) + np.array([0.15, 0])
_FISH_TAIL = np.array([[0.1, 0.0], [-0.45, 0.42], [-0.45, -0.42]])


def _shape_sdf(obj: Obj, u: Array, v: Array, t: Array) -> Array:
    """Signed distance in object units; u, v [T, h, w]; t [T] frame indices (articulated/non-rigid parts)."""
    if obj.shape == "fish":                              # the tail swings about a hinge at u = -0.5
        body = _polygon_sdf(u, v, _FISH_BODY)
        wag = 0.5 * np.sin(0.7 * t + obj.phase)
        cos, sin = _col(np.cos(wag)), _col(np.sin(wag))
        tu = u + 0.5
        return np.minimum(body, _polygon_sdf(tu * cos + v * sin, -tu * sin + v * cos, _FISH_TAIL))
    if obj.shape == "blob":                              # an egg (pointed nose) whose outline wobbles
        ang = np.arctan2(v, u)
        phase = _col(0.5 * t + obj.phase)
        r = 0.68 + 0.25 * np.cos(ang) + 0.1 * np.sin(3 * ang + phase) + 0.06 * np.sin(5 * ang - 1.3 * phase)
        return (np.sqrt(u * u + v * v) - r) * F32(0.8)
    if obj.shape == "post":                              # a bar across the whole frame
        return np.abs(v) - 1
    return _polygon_sdf(u, v, _POLYS[obj.shape])


def _pattern(obj: Obj, u: Array, v: Array) -> Array:
    """Texture pattern in 0..1 over object coordinates (smooth: no aliasing at 2x supersampling)."""
    f, a, p = float(obj.tex_freq), float(obj.tex_angle), float(obj.tex_phase)
    along = u * math.cos(a) + v * math.sin(a)
    across = -u * math.sin(a) + v * math.cos(a)
    if obj.texture == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * f * along + p)
    if obj.texture == "checker":
        return 0.5 + 0.5 * np.tanh(3 * np.sin(math.pi * 1.5 * f * along) * np.sin(math.pi * 1.5 * f * across))
    if obj.texture == "dots":
        cu = along * (1.5 * f)
        cv = across * (1.5 * f)
        cu, cv = cu - np.round(cu), cv - np.round(cv)
        return _sigmoid(12 * (0.3 - np.sqrt(cu * cu + cv * cv)))
    if obj.texture == "rings":
        return 0.5 + 0.5 * np.sin(2 * math.pi * 1.3 * f * np.sqrt(u * u + v * v) + p)
    return _sigmoid(6 * (along + 0.3 * math.sin(p)))     # split: two-tone


def _lerp(c0, c1, w: Array) -> Array:
    """Colours c0 -> c1 by weight w [...] -> [..., 3]."""
    c0, c1 = np.asarray(c0, F32), np.asarray(c1, F32)
    return c0 + w[..., None] * (c1 - c0)


def _screen_grid(scene: Scene) -> tuple[Array, Array]:
    """Supersampled pixel centres in frame heights: x, y [h*S, w*S]."""
    h, w = scene.size[0] * SUPERSAMPLE, scene.size[1] * SUPERSAMPLE
    y = (np.arange(h, dtype=F32) + 0.5) / h
    x = (np.arange(w, dtype=F32) + 0.5) / h
    return np.meshgrid(x, y, indexing="xy")


def _to_world(scene: Scene, x: Array, y: Array) -> tuple[Array, Array]:
    """Screen points [h, w] or [T, h, w] -> world points [T, h, w] (the camera pans by `pan` and zooms by
    exp(zoom) per frame about the frame centre)."""
    t = np.arange(scene.frames)
    cx, cy = scene.size[1] / scene.size[0] / 2, 0.5
    inv_zoom = _col(np.exp(-scene.zoom * t))
    return (x - cx) * inv_zoom + _col(cx + scene.pan[0] * t), (y - cy) * inv_zoom + _col(cy + scene.pan[1] * t)


def _background(scene: Scene, wx: Array, wy: Array) -> Array:
    """World-space colour field [T, h, w, 3]: sum of sinusoids plus the pan bands (band-limited sawtooth)."""
    field = np.zeros_like(wx)
    for fx, fy, ph, amp in scene.bg_waves.tolist():
        field += amp * np.sin(2 * math.pi * (fx * wx + fy * wy) + ph)
    col = _lerp(*scene.bg_colours, 0.5 + 0.5 * np.tanh(field / 1.5))
    if scene.band_period:
        d = scene.pan / np.linalg.norm(scene.pan)
        z = (2 * math.pi / scene.band_period) * (float(d[0]) * wx + float(d[1]) * wy)
        saw = -(np.sin(z) + np.sin(2 * z) / 2 + np.sin(3 * z) / 3) / 1.7   # rises along +d, drops sharply
        col *= 1 + 0.18 * saw[..., None]
    return col


def _illumination(scene: Scene, x: Array, y: Array) -> Array:
    """Screen-space light [T, h, w]: a vignette whose sign cues the zoom, times a light edge that moves
    towards the dark side (the lit side spreads)."""
    t = _col(np.arange(scene.frames))
    cx = scene.size[1] / scene.size[0] / 2
    vignette = 1 + (15 * scene.zoom) * (0.25 - (x - cx) ** 2 - (y - 0.5) ** 2)
    along = (x - cx) * float(scene.light_dir[0]) + (y - 0.5) * float(scene.light_dir[1])
    return vignette * (1 + 0.15 * np.tanh(4 * (along + scene.light_offset + 0.015 * t)))


def _object_layer(scene: Scene, obj: Obj, wx: Array, wy: Array, px: float) -> tuple[Array, Array]:
    """(alpha [T, h, w], albedo [T, h, w, 3]) of an object at world points [T, h, w]; px: one supersampled
    pixel in frame heights."""
    t = np.arange(scene.frames)
    cos, sin, s = _col(np.cos(obj.heading)), _col(np.sin(obj.heading)), _col(obj.scale)
    dx, dy = wx - _col(obj.pos[:, 0]), wy - _col(obj.pos[:, 1])
    u, v = (dx * cos + dy * sin) / s, (dy * cos - dx * sin) / s
    to_px = s * _col(np.exp(scene.zoom * t)) / F32(px)    # object units -> supersampled pixels
    alpha = np.clip(0.5 - _shape_sdf(obj, u, v, t) * to_px, 0, 1)
    if obj.flat is not None:
        return alpha, np.broadcast_to(np.asarray(obj.flat, F32), (*alpha.shape, 3))
    albedo = _lerp(*obj.colours, _pattern(obj, u, v))
    if obj.shape != "post":
        eye = _sigmoid((0.12 - np.sqrt((u - EYE_U) ** 2 + (v - obj.eye) ** 2)) * to_px)
        albedo *= 1 - 0.9 * eye[..., None]
    return alpha, albedo


def _restyle(style: tuple, img: Array) -> Array:
    """The whole-frame colour map of a restyle edit: img [..., 3] -> [..., 3]."""
    kind, dark, light, shift = style
    if kind == "duotone":
        return _lerp(dark, light, img @ np.array([0.299, 0.587, 0.114], F32))
    if kind == "channel_swap":
        return np.roll(img, shift, -1)
    if kind == "sepia":
        m = np.array([[0.393, 0.349, 0.272], [0.769, 0.686, 0.534], [0.189, 0.168, 0.131]], F32)
        return np.clip(img @ m, 0, 1)
    if kind == "invert":
        return 1 - img
    return np.clip(img * (np.asarray(light, F32) * 1.2) + np.asarray(dark, F32) * 0.3, 0, 1)


def _tile(scene: Scene, obj: Obj) -> tuple[Array, Array, Array]:
    """Per-frame windows of supersampled pixels that hold an object (the post: the whole frame).

    Returns screen x, y [T, bh, bw] (frame heights) and the windows' top-left pixels [T, 2] (row, col)."""
    hs, ws = scene.size[0] * SUPERSAMPLE, scene.size[1] * SUPERSAMPLE
    t = np.arange(scene.frames)
    if obj.shape == "post":
        bh, bw, origin = hs, ws, np.zeros((scene.frames, 2), int)
    else:
        zoom = np.exp(scene.zoom * t)
        centre = np.array([scene.size[1] / scene.size[0] / 2, 0.5])
        screen = (obj.pos - centre - scene.pan * t[:, None]) * zoom[:, None] + centre   # [T, 2] (x, y)
        side = int(np.ceil(2 * 1.2 * (obj.scale * zoom).max() * hs)) + 4
        bh, bw = min(side, hs), min(side, ws)
        origin = np.stack([np.clip(np.round(screen[:, 1] * hs - bh / 2), 0, hs - bh),
                           np.clip(np.round(screen[:, 0] * hs - bw / 2), 0, ws - bw)], -1).astype(int)
    rows = (origin[:, :1] + np.arange(bh) + 0.5).astype(F32) / hs      # [T, bh]
    cols = (origin[:, 1:] + np.arange(bw) + 0.5).astype(F32) / hs      # [T, bw]
    return (np.broadcast_to(cols[:, None, :], (scene.frames, bh, bw)),
            np.broadcast_to(rows[:, :, None], (scene.frames, bh, bw)), origin)


def _pool(a: Array) -> Array:
    """Area average of SUPERSAMPLE x SUPERSAMPLE blocks: [T, h*S, w*S, ...] -> [T, h, w, ...]."""
    n = SUPERSAMPLE
    out = sum(a[:, i::n, j::n] for i in range(n) for j in range(n))
    return out * F32(1 / (n * n))


def render_scene(scene: Scene) -> tuple[Tensor, dict[int, Tensor]]:
    """Render a scene: (frames [T, H, W, 3] float32 in 0..1, {oid: visible coverage [T, H, W]}).

    Layers composite back to front (objects in scene order, over the background), lit, at SUPERSAMPLE x the
    size, then area-averaged. Each object is drawn only in a window around it; a layer with zero alpha
    leaves the composite bit-identical."""
    x, y = _screen_grid(scene)
    px = 1.0 / (scene.size[0] * SUPERSAMPLE)
    img = _background(scene, *_to_world(scene, x, y)) * _illumination(scene, x, y)[..., None]
    alphas = []
    for obj in scene.objects:
        tx, ty, origin = _tile(scene, obj)
        alpha, colour = _object_layer(scene, obj, *_to_world(scene, tx, ty), px)
        if obj.flat is None:
            colour = colour * _illumination(scene, tx, ty)[..., None]
        full = np.zeros(img.shape[:3], F32)
        bh, bw = alpha.shape[1:]
        for t, (r, c) in enumerate(origin):
            region = img[t, r:r + bh, c:c + bw]
            img[t, r:r + bh, c:c + bw] = region * (1 - alpha[t, ..., None]) + colour[t] * alpha[t, ..., None]
            full[t, r:r + bh, c:c + bw] = alpha[t]
        alphas.append((obj.oid, full))
    visible, front = {}, np.ones(img.shape[:3], F32)
    for oid, alpha in reversed(alphas):
        visible[oid] = alpha * front
        front = front * (1 - alpha)
    img = np.clip(img, 0, 1)
    if scene.style is not None:
        img = _restyle(scene.style, img)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(_pool(a), dtype=F32))  # noqa: E731
    return as_t(img), {oid: as_t(m) for oid, m in visible.items()}


def render_clip(seed: int, *, size: tuple[int, int] = (64, 64), frames: int = 17) -> Tensor:
    """The source clip of a seed: [T, H, W, 3] float32 in 0..1 (training data)."""
    return render_scene(make_scene(seed, size, frames))[0]


def render_sample(seed: int, edit: str, *, size: tuple[int, int] = (64, 64), frames: int = 17) -> WorldSample:
    """The source clip of a seed, its ground-truth edited clip for `edit`, and the masks (see WorldSample)."""
    _check(size, frames, edit)
    scene = make_scene(seed, size, frames)
    edited, oid = edit_scene(scene, seed, edit)
    source, vis_src = render_scene(scene)
    target, vis_tgt = render_scene(edited)
    if oid is None:
        mask = torch.ones(source.shape[:3])
    else:
        zero = torch.zeros(source.shape[:3])
        mask = torch.maximum(vis_src.get(oid, zero), vis_tgt.get(oid, zero))
    objects = torch.stack([vis_src[o.oid] for o in scene.objects])
    return WorldSample(source=source, edited_first=target[0].clone(), target=target, edit_mask=mask,
                       object_masks=objects, edit=edit, seed=int(seed))
