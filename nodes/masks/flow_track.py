"""Optical-flow mask tracker: the fallback of mask propagation when no SAM2 weights exist (numpy/OpenCV only).

A keyframe mask is carried frame to frame. Per frame t (tracking order, previous frame p):
- DIS flow t -> p and p -> t; the forward-backward check marks pixels whose flow is trusted.
- Two motion fields: the object's (trusted flow of pixels that land inside the previous mask, eroded, spread to
  the surroundings by normalised convolution) and the background's (likewise from pixels landing outside).
  The raw flow at an object's edge is a blend of the two (DIS is smooth), and sampling the previous mask along
  it drags background pixels at the trailing edge into the mask; sampling it along the object's own motion
  does not: for a moving object that motion maps exactly the pixels it now covers back into the old mask.
- Occlusion: a pixel the object's motion claims, whose 5x5 colour patch the background/occluder's motion
  explains much better (vs frame p), leaves the visible mask.
- Whole-object motion: a second hypothesis, the object's translation found by masked template matching; per
  frame the hypothesis whose patches match best over the object is used (DIS often follows the background
  across a thin or motion-blurred object).
- Re-acquisition: an amodal mask (the object's extent carried by its motion whether seen or not), every
  pixel's position in the keyframe and the object's last seen colours are kept; a hidden amodal pixel whose
  patch matches the keyframe or those colours again rejoins the visible mask.
- Anchor (track_mask): the keyframe-anchored mask of nodes/flow (every pixel chained back to the keyframe and
  patch-checked against it) bounds the mask, and is re-used when the tracker has lost the object.
- Clean-up: 1-pixel specks removed, 1-pixel holes closed.

Several objects keyed on the same frame share every flow: the flows above and the anchor's depend on the frames
only, so they are computed once per frame (`Motion`) and each object's tracker reads them.

A second method, `MotionFollower` (track_masks(method="motion"), or "auto" when the camera pans past the object),
re-finds the object every frame as what moves unlike the camera (a RANSAC homography of the flow) and like the
object, and shapes it with GrabCut using the keyframe's object colours: for fast pans past occluders (DAVIS
bmx-trees), where the patch tracker's region motion is taken over by the background and the trees in front.

Large frames are tracked at most `max_side` pixels on the long side and the masks scaled back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from ..common import Cancelled, ShouldStop
from ..flow.dis import DenseFlow, consistent, identity_grid, sample, sample_u8, to_gray
from ..flow.engine import patch_error, track_to_first
from ..flow.track import patch_error_u8
from .grabcut import grabcut_labels

MAX_SIDE = 640
LOST = 0.3      # below this share of the key mask's area the tracker counts as lost and re-acquires


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), sigma)


def _spread(field: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """field [H, W, 2] known where weight [H, W] (0/1) is set, spread everywhere by normalised convolution;
    far from any known pixel it tends to the known pixels' median (or zero when there are none)."""
    w = weight.astype(np.float32)
    if w.sum() < 1:
        return np.zeros_like(field)
    glob = np.median(field[w > 0], 0).astype(np.float32)
    num = _blur(field * w[..., None], sigma)
    den = _blur(w, sigma)[..., None]
    k = np.float32(1e-3)
    return (num + k * glob) / (den + k)


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


@dataclass(frozen=True)
class Motion:
    """One frame in tracking order and its flow to the previous one: what every object's tracker reads.
    gray uint8 [H, W]; rgb float32 [H, W, 3] in 0..1; back: DIS flow t -> p [H, W, 2]; trusted: bool [H, W],
    the forward-backward check of back against the flow p -> t."""

    gray: np.ndarray
    rgb: np.ndarray
    back: np.ndarray
    trusted: np.ndarray


class MotionStream:
    """Motion of each next frame (tracking order) after `key_frame` uint8 RGB [H, W, 3]: two DIS flows per frame."""

    def __init__(self, key_frame: np.ndarray, quality: str = "medium"):
        self.dis, self.prev_gray = DenseFlow(quality), to_gray(key_frame)

    def next(self, frame: np.ndarray) -> Motion:
        gray, rgb = to_gray(frame), frame.astype(np.float32) / 255
        back = self.dis.flow(gray, self.prev_gray)      # t -> p
        trusted = consistent(self.dis.flow(self.prev_gray, gray), back)
        self.prev_gray = gray
        return Motion(gray, rgb, back, trusted)


class MaskTracker:
    """Carries `key_mask` (bool [H, W], on `key_frame` uint8 RGB [H, W, 3]) frame by frame: call `step(frame)`
    with the next frame's Motion in tracking order; it returns the visible mask (bool [H, W]). The trackers of
    several objects on one keyframe share one MotionStream: `step(stream.next(frame))`.

    tolerance: 0..1 patch colour difference; a pixel the object's motion claims counts as occluded when its
    error exceeds tolerance / 2 and the background's motion explains it better by `occlusion_margin`; a hidden
    pixel rejoins when it matches the keyframe or the object's last seen colours within tolerance / 2."""

    CORE_ERODE = 5          # px: object/background motion is read this far inside each region (DIS blurs edges)
    SEEN = 0.3              # below this visible share of the amodal extent, the object keeps its last DIS motion
    TEMPLATE_FROM_SEEN = 0.3  # template = last frame's visible pixels when they cover this share of the extent

    def __init__(self, key_frame: np.ndarray, key_mask: np.ndarray, tolerance: float = 0.12,
                 occlusion_margin: float = 0.03):
        h, w = key_mask.shape
        self.grid = identity_grid(h, w)
        self.tolerance, self.margin = tolerance, occlusion_margin
        self.sigma = max(3.0, 0.012 * max(h, w))
        self.key_rgb = key_frame.astype(np.float32) / 255
        self.prev_rgb, self.prev_gray = self.key_rgb, to_gray(key_frame)
        self.visible = key_mask.astype(np.float32)
        self.amodal = self.visible.copy()               # soft extent, seen or hidden
        self.coords = self.grid.copy()                  # where each pixel lies in the keyframe
        self.memory = self.key_rgb.copy()               # the object's last seen colours, carried along its motion
        self.last_motion: np.ndarray | None = None      # DIS object motion of the last well-seen frame

    def step(self, motion: Motion, allowed: np.ndarray | None = None) -> np.ndarray:
        """motion: the next frame's Motion (MotionStream.next). allowed: optional bool [H, W]; the visible mask
        is limited to it (and so is what is carried on)."""
        gray, rgb, back, trusted = motion.gray, motion.rgb, motion.back, motion.trusted
        raw = sample(self.visible, self.grid + back)
        core = _erode_keep(((raw > 0.99) & trusted), self.CORE_ERODE)
        bg = cv2.erode((raw < 0.01).astype(np.uint8), _disk(2)) > 0
        bg_src = self.grid + _spread(back, bg & trusted, self.sigma)
        obj_src, e_obj = self._object_source(rgb, back, core)
        carried = sample(self.visible, obj_src)
        e_bg = patch_error(rgb, sample(self.prev_rgb, bg_src))
        occluded = (e_bg + self.margin < e_obj) & (e_obj > self.tolerance * 0.5)
        visible = (carried >= 0.5) & ~occluded
        # the amodal extent, keyframe positions and colour memory follow the object's motion
        self.amodal = sample(self.amodal, obj_src)
        snapped = np.round(obj_src)
        self.coords = sample(self.coords, snapped, nearest=True) + (obj_src - snapped)
        self.memory = sample(self.memory, obj_src)
        hidden = (self.amodal >= 0.5) & ~visible
        if hidden.any():
            e_seen = np.minimum(patch_error(rgb, sample(self.key_rgb, self.coords)), patch_error(rgb, self.memory))
            visible |= hidden & (e_seen < self.tolerance * 0.5)
        m = cv2.morphologyEx(visible.astype(np.uint8), cv2.MORPH_CLOSE, _disk(1))
        visible = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(1)) > 0
        if allowed is not None:
            visible &= allowed
        self.prev_rgb, self.prev_gray = rgb, gray
        self.adopt(visible)
        return visible

    def adopt(self, mask: np.ndarray) -> None:
        """Make bool [H, W] the current visible mask (step() does; a caller may add re-acquired pixels)."""
        self.visible = mask.astype(np.float32)
        self.amodal = np.maximum(self.amodal, self.visible)
        self.memory = np.where(mask[..., None], self.prev_rgb, self.memory)

    def _object_source(self, rgb: np.ndarray, back: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the object's pixels of frame t come from in frame p (coords [H, W, 2]): of the hypotheses
        (DIS motion of its core, whole-object translation by template matching) the one whose patches match
        best over the carried extent. Also the per-pixel patch error, the lower of the hypotheses (a limb or
        wheel the chosen one misses is not taken for an occluder)."""
        cands = [self.grid + self._core_motion(back, core)]
        shift = self._template_shift(rgb)
        if shift is not None:
            cands.append(self.grid + shift)
        best, lowest = (np.inf, cands[0]), None
        for src in cands:
            err = patch_error(rgb, sample(self.prev_rgb, src))
            inside = sample(self.amodal, src) >= 0.5
            score = float(err[inside].mean()) if inside.any() else np.inf
            if score < best[0]:
                best = (score, src)
            lowest = err if lowest is None else np.minimum(lowest, err)
        return best[1], lowest

    def _template_shift(self, rgb: np.ndarray) -> np.ndarray | None:
        """Whole-object translation t -> p ([H, W, 2], constant) by masked template matching of the object in
        frame t around its last place: robust where DIS follows the background across a thin or blurred object
        (DAVIS bmx-trees after the trees). Template: the last frame's visible pixels, or while mostly hidden
        the object's remembered colours over its amodal extent."""
        obj = (self.amodal >= 0.5).astype(np.uint8)
        if obj.sum() < 16:
            return None
        colours = self.memory
        if self.visible.sum() >= self.TEMPLATE_FROM_SEEN * obj.sum():
            obj, colours = (self.visible > 0.5).astype(np.uint8), self.prev_rgb
        x, y, bw, bh = cv2.boundingRect(obj)
        h, w = obj.shape
        r = int(max(12, 0.06 * max(h, w)))
        x0, y0, x1, y1 = max(0, x - r), max(0, y - r), min(w, x + bw + r), min(h, y + bh + r)
        if x1 - x0 <= bw or y1 - y0 <= bh:
            return None
        weight = np.repeat(obj[y:y + bh, x:x + bw, None].astype(np.float32), 3, -1)
        res = cv2.matchTemplate(rgb[y0:y1, x0:x1], colours[y:y + bh, x:x + bw], cv2.TM_SQDIFF, mask=weight)
        _, _, loc, _ = cv2.minMaxLoc(res)
        dx, dy = loc[0] + x0 - x, loc[1] + y0 - y                  # the object moved p -> t by (dx, dy)
        return np.broadcast_to(np.float32([-dx, -dy]), self.grid.shape).copy()

    def _core_motion(self, back: np.ndarray, core: np.ndarray) -> np.ndarray:
        """The object's DIS flow t -> p: trusted flow of its core, spread outwards; its last such motion while
        it is mostly hidden (an occluder's flow must not drag it along)."""
        seen = (self.visible > 0.5).sum() / max(1.0, float((self.amodal >= 0.5).sum()))
        if self.last_motion is not None and (seen < self.SEEN or core.sum() < 3):
            return self.last_motion
        if core.sum() < 3:
            return _spread(back, self.visible > 0.5, self.sigma)
        self.last_motion = _spread(back, core, self.sigma)
        return self.last_motion


def _erode_keep(mask: np.ndarray, radius: int, min_pixels: int = 30) -> np.ndarray:
    """Erode by up to `radius`, less where that would leave fewer than min_pixels (thin objects)."""
    while radius > 0:
        eroded = cv2.erode(mask.astype(np.uint8), _disk(radius)) > 0
        if eroded.sum() >= min_pixels:
            return eroded
        radius -= 2
    return mask


class _Resized:
    """frames [T, H, W, 3] seen at another size, one frame at a time (what track_to_first indexes)."""

    def __init__(self, frames: np.ndarray, size: tuple[int, int]):
        self.frames, self.size = frames, size
        self.shape = (frames.shape[0], size[1], size[0], 3)

    def __getitem__(self, t: int) -> np.ndarray:
        return at_size(self.frames[t], self.size)


def at_size(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image or mask [H, W, ...] at size (W, H) (cv2.INTER_AREA), itself when it already is."""
    return a if a.shape[1::-1] == size else cv2.resize(a, size, interpolation=cv2.INTER_AREA)


METHODS = ("patch", "motion", "auto")
PAN = 3.0           # px per frame: "auto" follows by motion when the camera moves this much (frame 0 -> 1) ...
APART = 1.0         # ... and the key mask's median flow differs from the camera's by this much


def track_mask(frames: np.ndarray, key_mask: np.ndarray, quality: str = "medium", tolerance: float = 0.12,
               max_side: int = MAX_SIDE, anchor: bool = True, should_stop: ShouldStop | None = None,
               method: str = "patch") -> Iterator[np.ndarray]:
    """One object: track_masks with a single key mask; yields bool [H, W] masks, frame 0 first."""
    for masks in track_masks(frames, [key_mask], quality, tolerance, max_side, anchor, should_stop, method):
        yield masks[0]


def track_masks(frames: np.ndarray, key_masks: list[np.ndarray], quality: str = "medium", tolerance: float = 0.12,
                max_side: int = MAX_SIDE, anchor: bool = True, should_stop: ShouldStop | None = None,
                method: str = "patch") -> Iterator[list[np.ndarray]]:
    """frames: uint8 [T, H, W, 3] in tracking order, frames[0] the keyframe; key_masks: one bool [H, W] per
    object, all on that keyframe. Yields per frame the list of the objects' bool [H, W] masks, frame 0 (the key
    masks themselves) first. The flows (4 DIS flows per frame: 2 for the frame-to-frame motion, 2 for the
    keyframe anchor) are computed once per frame and shared by the objects; each object's result is the same
    as tracking it alone.

    anchor: also track every pixel back to the keyframe (nodes/flow's track_to_first: chained flow re-anchored
    to the keyframe, patch-checked against it) and keep the mask within that keyframe-anchored mask grown by
    a few pixels (while that mask holds at least 30 % of the key area): the frame-to-frame tracker then cannot
    drift far onto a neighbour. When the tracked mask falls under LOST of the key area (object hidden, or lost),
    the keyframe-anchored mask is added back: re-acquisition of an object that reappears elsewhere.

    method: "patch" (MaskTracker, with the anchor above) or "motion" (MotionFollower: the object found each
    frame as what moves unlike the camera, shaped by GrabCut; one DIS flow per frame, tolerance and anchor
    unused): for objects the camera follows past occluders (fast pans, DAVIS bmx-trees). "auto": "motion"
    when between frames 0 and 1 the camera moves at least PAN px and every key mask's median flow differs from
    the camera's by at least APART px (`pick_method`), else "patch"."""
    if method not in METHODS:
        raise ValueError(f"unknown mask tracking method '{method}'; use one of {list(METHODS)}.")
    t_len, h, w = frames.shape[:3]
    size = tracking_size(h, w, max_side)
    scale = min(1.0, max_side / max(h, w))
    small = _Resized(frames, size)
    keys = [k.astype(bool) for k in key_masks]
    yield keys
    if scale < 1:
        keys = [cv2.resize(k.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5 for k in keys]
    if method == "auto":
        method = pick_method(small[0], small[1], keys, quality) if t_len > 1 else "patch"
    if method == "motion":
        yield from _follow((small[t] for t in range(1, t_len)), small[0], keys, quality, (w, h), should_stop)
        return
    stream = MotionStream(small[0], quality)
    trackers = [MaskTracker(small[0], k, tolerance) for k in keys]
    anchored = track_to_first(small, quality, True, tolerance) if anchor else None
    if anchored is not None:
        next(anchored)
    grow, key_areas = _disk(max(2, round(0.02 * max(size)))), [float(k.sum()) for k in keys]
    for t in range(1, t_len):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at frame {t} of {t_len}")
        track = next(anchored) if anchored is not None else None
        motion = stream.next(small[t])
        masks = []
        for tracker, key, key_area in zip(trackers, keys, key_areas):
            allowed = held = None
            if track is not None:
                held = (sample(key.astype(np.float32), track.coords) >= 0.5) & track.valid
                if held.sum() >= 0.3 * key_area:
                    allowed = cv2.dilate(held.astype(np.uint8), grow) > 0
            m = tracker.step(motion, allowed)
            if allowed is not None and m.sum() < LOST * key_area:
                m = m | (cv2.morphologyEx(held.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0)
                tracker.adopt(m)
            if scale < 1:
                m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
            masks.append(m)
        yield masks


def pans_past(first: np.ndarray, second: np.ndarray, key: np.ndarray, quality: str = "medium",
              max_side: int = MAX_SIDE) -> bool:
    """Whether the camera pans past the object (bool key [H, W] on uint8 RGB first; second the next frame):
    pick_method at the tracking size says "motion", as track_masks(method="auto") decides."""
    size = tracking_size(*first.shape[:2], max_side)
    keys = [at_size(key.astype(np.float32), size) >= 0.5]
    return pick_method(at_size(first, size), at_size(second, size), keys, quality) == "motion"


def pick_method(first: np.ndarray, second: np.ndarray, keys: list[np.ndarray], quality: str = "medium") -> str:
    """track_masks' "auto": "motion" when the camera pans (background homography of the DIS flow frame 1 -> 0
    outside the key masks: median motion >= PAN px) and each object (bool [H, W] keys on uint8 RGB first)
    moves apart from it (median residual inside its mask >= APART px); else "patch"."""
    h, w = keys[0].shape
    grid = identity_grid(h, w)
    back = DenseFlow(quality).flow(to_gray(second), to_gray(first))
    union = np.any(keys, 0)
    cam = background_motion(back, cv2.dilate(union.astype(np.uint8), _disk(7)) > 0, grid)
    if cam is None or not all(k.any() for k in keys):
        return "patch"
    resid = np.linalg.norm(back - cam, axis=-1)
    panning = float(np.median(np.linalg.norm(cam, axis=-1)[~union])) >= PAN
    apart = all(float(np.median(resid[k])) >= APART for k in keys)
    return "motion" if panning and apart else "patch"


def _follow(frames: Iterator[np.ndarray], first: np.ndarray, keys: list[np.ndarray], quality: str,
            size: tuple[int, int] | None, should_stop: ShouldStop | None) -> Iterator[list[np.ndarray]]:
    """track_masks' "motion" method after frame 0: one MotionFollower per key mask (bool, at the tracking size,
    on `first`) over the next frames (uint8 RGB at the tracking size, one at a time), sharing one DIS flow
    t -> t-1 per frame; masks scaled to size (W, H) (None: the tracking size)."""
    dis, prev = DenseFlow(quality), to_gray(first)
    followers = [MotionFollower(first, k) for k in keys]
    for t, frame in enumerate(frames, 1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at frame {t}")
        gray = to_gray(frame)
        back, prev = dis.flow(gray, prev), gray
        masks = [f.step(frame, back) for f in followers]
        if size is not None and frame.shape[1::-1] != size:
            masks = [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5 for m in masks]
        yield masks


def tracking_size(h: int, w: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(W, H) at which track_masks tracks a clip of H x W: the long side at most max_side."""
    scale = min(1.0, max_side / max(h, w))
    return max(8, round(w * scale)), max(8, round(h * scale))


def follow_region(frames: Iterator[np.ndarray], key_mask: np.ndarray, quality: str = "medium",
                  max_side: int = MAX_SIDE, should_stop: ShouldStop | None = None) -> Iterator[np.ndarray]:
    """The motion follower (track_masks(method="motion")) over frames given one at a time, as a file streams
    them: uint8 RGB [H, W, 3], the keyframe first; key_mask bool [H, W] on it. Yields bool masks at the
    tracking size (`tracking_size`), the key mask's first: the same masks as track_masks, before its scaling
    back to H x W (cv2.INTER_LINEAR, >= 0.5). Holds two frames."""
    frames = iter(frames)
    first = next(frames)
    size = tracking_size(*first.shape[:2], max_side)
    key = at_size(key_mask.astype(bool).astype(np.float32), size) >= 0.5
    yield key
    for masks in _follow((at_size(f, size) for f in frames), at_size(first, size), [key], quality, None, should_stop):
        yield masks[0]


# ---- the motion follower: an object that moves unlike the camera (fast pans, occluding trees) --------------

def colour_model(frame: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """GrabCut's object GMM (1x65 float64) of frame uint8 RGB [H, W, 3] under bool mask [H, W]; None when the
    mask is empty or full."""
    if not mask.any() or mask.all():
        return None
    cv2.setRNGSeed(0)
    lab = np.where(mask, cv2.GC_FGD, cv2.GC_BGD).astype(np.uint8)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.grabCut(np.ascontiguousarray(frame), lab, None, bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)
    return fgd


def background_motion(back: np.ndarray, exclude: np.ndarray, grid: np.ndarray, step: int = 4) -> np.ndarray | None:
    """The camera's flow t -> p ([H, W, 2]): a RANSAC homography fitted to back [H, W, 2] sampled every `step`
    px outside bool exclude [H, W]; None when too few samples or no fit."""
    h, w = exclude.shape
    sel = ~exclude[::step, ::step]
    if sel.sum() < 16:
        return None
    src = grid[::step, ::step][sel].reshape(-1, 2)
    hom, _ = cv2.findHomography(src, src + back[::step, ::step][sel].reshape(-1, 2), cv2.RANSAC, 1.0)
    if hom is None:
        return None
    return cv2.perspectiveTransform(grid.reshape(-1, 1, 2), hom).reshape(h, w, 2) - grid


class MotionFollower:
    """Follows an object that moves differently from the camera (bool key_mask [H, W] on key_frame uint8 RGB
    [H, W, 3]); `step(frame, back)` with the next frame (uint8 RGB) and its DIS flow to the previous frame
    (t -> p, [H, W, 2]) returns the object's mask (bool [H, W]). Per frame:
    - the camera's motion: a RANSAC homography of the flow outside the object's neighbourhood; the residual
      (flow minus camera, px) is large on the object and near zero on the background; noise floor: NOISE x
      its median away from the object, at least MIN_SPEED px;
    - the object's motion: the median flow of the pixels near it above the floor that move like it
      (`_like_object`: nearer its last motion than LIKE x their distance to the camera's, which an occluder in
      front with more parallax, a tree trunk, is not); its last motion when too few pixels do;
    - the blob: pixels with residual over REL x the object's speed against the camera that move like it,
      within reach (r0 px) of the last blob carried by the object's motion. The blob is the state carried on;
      it is wider than the object (DIS smooths motion edges). Accepted when its area is within AREA_CHANGE of
      the last, or when it covers COVER of the carried blob and is at most WIDER times it (growing back after
      an occluder, and the first frame's wider blob); otherwise the carried blob coasts, and the nearest blob
      of plausible area (REACQUIRE_AREA, residual over REACQUIRE px) within a radius growing with the coasted
      frames re-acquires the object;
    - uncovered background: pixels that the camera's motion brings from inside the last mask but the object's
      motion does not (from that mask with its gaps under GAPS x the long side closed, grown by HELD x the long
      side for a non-rigid object): background the object has just uncovered on its trailing side, where DIS
      finds no match and smooths the object's flow over it, so the blob spills onto a band as wide as the
      object's speed against the camera. They leave the blob given to GrabCut and are its sure background
      (not the carried blob: it stays the motion state);
    - what DIS misses: the last mask moved by the object's translation found by masked template matching (its
      pixels of the last frame looked up in this one within SEARCH x the long side of where the camera's motion
      puts them, `_matched`). DIS smooths a small, low-texture or half-hidden object's flow towards the
      camera's, so the blob loses it (it lags, or keeps only its most textured part) while its pixels still
      match where it went. It joins the blob given to GrabCut (not the carried blob). The template leaves out
      the last mask's pixels that the camera's motion explained better than that translation (background
      GrabCut kept; a template of it would follow the camera);
    - the mask: GrabCut in the blob (sure object: the blob eroded by CORE x the square root of its area, at
      most CORE_MAX px, so a small far object keeps a core; the object's colours: the keyframe mask's GMM, frozen;
      the background's learnt around the blob each frame).
    Deterministic (OpenCV's fixed RANSAC seed, cv2.setRNGSeed before GrabCut)."""

    REL = 0.3
    MIN_SPEED = 0.3
    NOISE = 6.0
    LIKE = 2.0
    AREA_CHANGE = (0.5, 1.6)
    COVER, WIDER = 0.7, 3.0
    REACQUIRE = 1.0
    REACQUIRE_AREA = (0.3, 2.0)
    CORE, CORE_MAX = 0.12, 6
    HELD, GAPS = 0.01, 0.015
    SEARCH, CAMERA_LIKE = 0.04, 0.02

    def __init__(self, key_frame: np.ndarray, key_mask: np.ndarray):
        h, w = key_mask.shape
        self.grid = identity_grid(h, w)
        self.blob = key_mask.astype(bool)
        self.fg_model = colour_model(key_frame, self.blob)
        self.velocity, self.speed, self.coasting = None, 0.0, 0
        self.area = max(1.0, float(self.blob.sum()))
        self.mask = self.blob                           # the last mask returned
        self.prev = key_frame                           # the last frame
        self.camera_like: np.ndarray | None = None     # pixels of the last frame that moved like the camera
        self.held = _disk(max(2, round(self.HELD * max(h, w))))
        self.gaps = _disk(max(2, round(self.GAPS * max(h, w))))

    def _carried(self, mask: np.ndarray, motion: np.ndarray) -> np.ndarray:
        """bool mask [H, W] of the last frame moved to this one by motion t -> p ([2] or [H, W, 2])."""
        return sample(mask.astype(np.float32), self.grid + motion) >= 0.5

    def step(self, frame: np.ndarray, back: np.ndarray) -> np.ndarray:
        prev = self.blob
        r0 = max(8, int(0.5 * np.sqrt(self.area)))
        near = cv2.dilate(prev.astype(np.uint8), _disk(r0)) > 0
        bg = background_motion(back, near, self.grid)
        if bg is None:
            bg = np.zeros_like(back)
        rel = back - bg
        resid = np.linalg.norm(rel, axis=-1)
        floor = max(self.MIN_SPEED, self.NOISE * float(np.median(resid[~near]))) if (~near).any() else self.MIN_SPEED
        cand = near & (resid > floor)
        cand &= self._like_object(back, resid)
        if cand.sum() > max(20, 0.1 * self.area):
            motion = np.median(back[cand], 0)
            self.speed = float(np.linalg.norm(np.median(rel[cand], 0)))
        elif self.velocity is not None:
            motion = self.velocity
        else:
            motion = np.median(back[prev], 0) if prev.any() else np.zeros(2, np.float32)
        self.velocity = motion.astype(np.float32)
        carried = self._carried(prev, self.velocity)
        blob, lo, hi = carried, *self.AREA_CHANGE
        found = None
        if self.speed > floor:
            moving = (resid > max(floor, self.REL * self.speed)) & self._like_object(back, resid)
            reach = cv2.dilate(carried.astype(np.uint8), _disk(r0)) > 0
            found = moving & reach
        grows = found is not None and (found & carried).sum() >= self.COVER * carried.sum() and \
            found.sum() <= self.WIDER * carried.sum()
        if found is not None and (grows or lo * self.area <= found.sum() <= hi * self.area):
            blob, self.coasting = found, 0
        else:
            self.coasting += 1
            again = self._reacquire(resid > max(floor, self.REACQUIRE), carried, r0 * (2 + self.coasting))
            if again is not None:
                blob, self.coasting = again, 0
        # background the object uncovered: hidden behind it in the last frame (there by the camera's motion,
        # not by the object's); DIS finds no match there and smooths the object's flow over it, so it joins
        # the blob (a band as wide as the object's speed against the camera, on its trailing side)
        held = cv2.dilate(cv2.morphologyEx(self.mask.astype(np.uint8), cv2.MORPH_CLOSE, self.gaps), self.held) > 0
        uncovered = self._carried(self.mask, bg) & ~self._carried(held, self.velocity)
        shift = self._matched(frame, bg)
        region = blob if shift is None else blob | self._carried(self.mask, shift)
        self.camera_like = None if shift is None else self._camera_like(frame, bg, shift)
        self.blob, self.prev = blob, frame
        self.area = max(1.0, float(blob.sum()))
        self.mask = self._refine(frame, region & ~uncovered, uncovered)
        return self.mask

    def _matched(self, frame: np.ndarray, bg: np.ndarray) -> np.ndarray | None:
        """The object's translation t -> p ([2] px): the last mask's pixels of the last frame found in frame
        (uint8 RGB [H, W, 3]) by masked template matching (least squared RGB difference) within SEARCH x the long
        side of where the camera's motion bg ([H, W, 2], t -> p) puts them; None for a mask under 16 px."""
        m = self.mask
        if self.camera_like is not None and (m & ~self.camera_like).sum() >= 16:
            m = m & ~self.camera_like
        if m.sum() < 16:
            return None
        h, w = m.shape
        x, y, bw, bh = cv2.boundingRect(m.astype(np.uint8))
        cam = bg[m].mean(0)
        r = max(4, round(self.SEARCH * max(h, w)))
        lo, hi = np.floor(-cam).astype(int) - r, np.ceil(-cam).astype(int) + r
        x0, y0 = max(0, x + lo[0]), max(0, y + lo[1])
        x1, y1 = min(w, x + bw + hi[0]), min(h, y + bh + hi[1])
        if x1 - x0 <= bw or y1 - y0 <= bh:
            return None
        weight = np.repeat(m[y:y + bh, x:x + bw, None].astype(np.float32), 3, -1)
        patch = self.prev[y:y + bh, x:x + bw].astype(np.float32)
        res = cv2.matchTemplate(frame[y0:y1, x0:x1].astype(np.float32), patch, cv2.TM_SQDIFF, mask=weight)
        _, _, loc, _ = cv2.minMaxLoc(res)
        return np.float32([x - x0 - loc[0], y - y0 - loc[1]])

    def _camera_like(self, frame: np.ndarray, bg: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """bool [H, W]: pixels of frame (uint8 RGB) whose 5x5 patch the camera's motion bg ([H, W, 2], t -> p)
        brings from the last frame better, by CAMERA_LIKE, than the object's translation shift ([2]) does:
        background the mask may hold, left out of the next template."""
        e_cam = patch_error_u8(frame, sample_u8(self.prev, self.grid + bg))
        e_obj = patch_error_u8(frame, sample_u8(self.prev, self.grid + shift))
        return e_cam + self.CAMERA_LIKE < e_obj

    def _like_object(self, back: np.ndarray, resid: np.ndarray) -> np.ndarray:
        """bool [H, W]: flow back [H, W, 2] nearer the object's last motion than LIKE x its distance to the
        camera's (resid); an occluder with more parallax than the object (a tree trunk in front) is not."""
        if self.velocity is None:
            return np.ones(resid.shape, bool)
        return np.linalg.norm(back - self.velocity, axis=-1) < self.LIKE * resid

    def _reacquire(self, moving: np.ndarray, carried: np.ndarray, radius: float) -> np.ndarray | None:
        """The part of bool moving [H, W] (pixels moving unlike the camera) nearest the carried blob's centre,
        within radius px, of a plausible area (REACQUIRE_AREA x the last area); None when there is none."""
        if not carried.any():
            return None
        n, comp, stats, centres = cv2.connectedComponentsWithStats(moving.astype(np.uint8))
        ys, xs = np.nonzero(carried)
        c = np.array([xs.mean(), ys.mean()])
        lo, hi = self.REACQUIRE_AREA
        best, best_d = None, radius
        for i in range(1, n):
            d = float(np.linalg.norm(centres[i] - c))
            if lo * self.area <= stats[i, cv2.CC_STAT_AREA] <= hi * self.area and d < best_d:
                best, best_d = i, d
        return None if best is None else comp == best

    def _refine(self, frame: np.ndarray, blob: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
        """GrabCut within the blob (bool [H, W]) on frame, background (bool [H, W] or None) sure background; the
        blob itself when GrabCut finds nothing."""
        if blob.sum() < 30:
            return blob
        h, w = blob.shape
        x, y, bw, bh = cv2.boundingRect(blob.astype(np.uint8))
        pad = max(10, int(0.5 * max(bw, bh)))
        x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad)
        b = blob[y0:y1, x0:x1]
        lab = np.full(b.shape, cv2.GC_BGD, np.uint8)
        lab[cv2.dilate(b.astype(np.uint8), _disk(3)) > 0] = cv2.GC_PR_BGD
        if background is not None:
            lab[background[y0:y1, x0:x1]] = cv2.GC_BGD
        lab[b] = cv2.GC_PR_FGD
        core = cv2.erode(b.astype(np.uint8), _disk(max(2, min(self.CORE_MAX, round(self.CORE * np.sqrt(b.sum())))))) > 0
        if core.sum() > 10:
            lab[core] = cv2.GC_FGD
        out = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = grabcut_labels(np.ascontiguousarray(frame[y0:y1, x0:x1]), lab, 3, self.fg_model)
        return out if out.any() else blob
