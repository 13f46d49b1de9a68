"""Carry a first-frame edit through a clip with chained optical flow.

For every frame t we track where each pixel came from in frame 0 (nodes/flow/track.py), then carry the edit
along that map and composite: pixels outside the propagated edit region are bit-identical to the source.
Frame by frame (carry), so a file-to-file run holds a few frames, never the clip (nodes/flow/stream.py).

What is carried, per pixel of the edit region: where the edit keeps the source's structure (a recolour), the
edit's change added to the frame (keeps its lighting); where it changes the structure (a new shape, a
removed part), the edited result itself, relit by the source's lighting change since frame 1 -- never the
delta, which would leave the old object's ghost. Where the edit shows background instead of the source's object
(found on frame 1 and as the clip reveals the background behind it: nodes/flow/removal.py), that background is
carried with the background's motion, not the object's. A colour change (one affine RGB map explains the edit,
nodes/flow/colour.py) whose region is known in every frame (per-frame masks, or a global restyle) is
carried as that map of each frame's own pixels instead: no correspondence needed, so fast motion and blur do
not lose it. Mode 'layer' (nodes/flow/layer.py) moves the whole edit region as one piecewise-affine layer
over a reconstructed background, for pose and shape changes; with per-frame masks it is one affine layer
with the region's own motion fitted to the masks (layer.MaskLayer), and mode 'auto' picks it for every edit
no colour map explains (a new shape or texture, an insertion, a removal; world benchmark, 14 held-out scenes
per edit, PSNR: shape_swap 31.8 -> 33.7 dB, insertion 29.2 -> 35.3, removal 34.6 -> 36.4, retexture
32.8 -> 34.5). Without per-frame masks, when the per-pixel chain breaks up (most of
the tracked region unmatched, the rest in pieces, the unmatched pixels still moving with the object: not an
occluder, for BROKEN_FRAMES frames) mode 'auto' notes it, and with FlowSettings.auto_layer restarts in layer
mode. When the carried region is lost (under LOST_AREA of frame 1's for LOST_FRAMES frames) while the camera
pans past the object, mode 'auto' restarts with per-frame masks from the masks room's motion follower
(FlowSettings.auto_follow; a fast pan past occluders, DAVIS bmx-trees)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

from ..common import OnStep, ShouldStop, log, report
from ..video.frames import check_mask, check_video, fit_to_frame, to_uint8
from .colour import EXPLAINED, apply_colour_map, fit_colour_map
from .dis import identity_grid, sample, sample_u8
from .edit_mask import derive_edit_mask, derive_mask  # noqa: F401  (public here since the first release)
from .removal import Removal
from .track import FlowFn, Track, patch_error, track_frames, track_to_first  # noqa: F401  (public names)

MODES = ("auto", "delta", "pixels", "layer")
FULL_FRAME = 0.9         # an edit region covering this much of frame 1 is a global restyle
BROKEN_VALID = 0.5       # auto notes a broken chain when fewer of the tracked region's pixels than this match and the
BROKEN_PIECES = 4        # matched rest falls into this many pieces (each >= 2 % of it; not an occluder)
BROKEN_FRAMES = 3        # for this many frames in a row (the per-pixel chain broke up)
WITH_OBJECT = 0.5        # ... and this share of its unmatched pixels moves with the matched ones (not an occluder)
LOST_AREA = 0.25        # auto counts the edit region as lost when the carried region is under this share of frame 1's
LOST_FRAMES = 3         # for this many frames in a row
FOLLOW_GROWTH = 2.0     # the follower's mask is used while its area stays within this many times frame 1's
GAIN_RANGE = (0.5, 2.0)  # the lighting gain applied to carried pixels is clipped to this


@dataclass(frozen=True)
class FlowSettings:
    """mode: 'auto' (with per-frame masks and an edit no colour map explains: 'layer', one layer with the
    region's motion fitted to the masks; otherwise delta; when the per-pixel chain breaks up it notes where and
    suggests 'layer', or, with
    auto_layer, restarts in layer mode: see run_carry. An occluder passing over the edited object
    does not count as a break-up (its unmatched pixels move on their own, not with the object; see _broken):
    on the pack's synthetic occlusion clip auto_layer now scores delta's 28.6 dB, 20.7 before that test;
    auto_layer is still opt-in),
    'delta' (the edit's change added where it keeps the structure, the relit result elsewhere), 'pixels' (the
    relit edited pixels everywhere), 'layer' (the edit region as one moving layer). quality: DIS preset of
    the direct flow to frame 0 (seeded by the chain and refined, on every second frame: track.py); chain_quality: of the frame-to-frame flow that seeds it
    (None: quality). mask_threshold: colour difference (0..1) that counts as edited when no mask is given.
    mask_grow/feather: pixels. light: lighting-tolerant matching and relighting of carried pixels.
    colour_map: in auto/delta, carry a colour change (one affine RGB map explains the edit) as that map of
    each frame's own pixels where the region is known every frame (per-frame masks; a global restyle).
    removal: in delta/pixels with per-frame masks, where the edit shows background instead of the source's
    object (a removed part), carry the background with the background's motion (nodes/flow/removal.py); in
    layer mode with per-frame masks, leave those parts out of the moving layer (off: all of the region moves).
    flow: another backend for the frame-to-frame flow, flow(gray_a, gray_b, init) -> [H, W, 2] float32
    (track.FlowFn: grey uint8 frames a -> b, init None), e.g. RAFT or ComfyUI's OPTICAL_FLOW.
    focus: where the region is carried along the track alone (a derived or frame-1 mask, no colour map, no
    removal), track each frame only in a box around the last frame's region (its reach: see `reach_box`), not
    the whole frame (track.track_frames' focus).
    auto_follow: in mode auto with only a frame-1 (or derived) mask, when the carried region is lost (under
    LOST_AREA of frame 1's area for LOST_FRAMES frames in a row) and the camera pans past the object (the masks
    room's pick_method on frames 1 and 2), restart with per-frame masks from the masks room's motion follower
    (what Mask Propagate gives without SAM2), so the colour map or the mask layer carries the edit; otherwise
    a note says the region was lost. Costs nothing until the region is lost."""

    mode: str = "auto"
    auto_layer: bool = False
    auto_follow: bool = True
    quality: str = "medium"
    mask_threshold: float = 0.08
    mask_grow: int = 4
    feather: int = 3
    anchor_refine: bool = True
    match_tolerance: float = 0.06
    chain_quality: str | None = None
    light: bool = True
    colour_map: bool = True
    removal: bool = True
    focus: bool = True
    flow: FlowFn | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; use one of {MODES}.")
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in (0, 1); got {self.mask_threshold}.")
        if self.mask_grow < 0 or self.feather < 0:
            raise ValueError(f"mask_grow and feather must be >= 0; got {self.mask_grow}, {self.feather}.")


@dataclass(frozen=True)
class Propagation:
    """video [T, H, W, 3] and mask [T, H, W] (1 = edit region, soft at the feathered edge); notes: what was
    fixed or derived on the way (size policy, derived mask, mode chosen)."""

    video: torch.Tensor
    mask: torch.Tensor
    notes: tuple[str, ...] = ()


@dataclass
class EditPlan:
    """Frame 1's edit, prepared once. edit, src0: float32 [H, W, 3] 0..1; soft0: [H, W] softened frame-1
    region; structure: [H, W] 0..1, where the edit changes the structure (carry the result, not the delta);
    mode: the resolved mode; notes: what the plan decided; colour: the edit as an affine RGB map [3, 4]
    (nodes/flow/colour.py) when it is a colour change and the region is known in every frame (per-frame
    masks, or a global restyle; modes auto/delta), else None; residual [H, W, 3]: the
    edit minus that map of frame 1 (added in frame 1 only, so frame 1 is the edit itself). removal: where
    the edit shows background instead of the source's object, found on frame 1 and as the clip reveals it
    (nodes/flow/removal.py; modes delta/pixels): carried there with the background's motion."""

    edit: np.ndarray
    src0: np.ndarray
    first_mask: np.ndarray
    soft0: np.ndarray
    structure: np.ndarray
    mode: str
    notes: list[str]
    colour: np.ndarray | None = None
    residual: np.ndarray | None = None
    removal: Removal | None = None


@dataclass(frozen=True)
class Carried:
    """One frame's carried edit: region [H, W] (0 outside it) and content [y1-y0, x1-x0, 3] float32 inside
    box (y0, y1, x0, x1), the bounding box of region > 0 (None when the region is empty)."""

    region: np.ndarray
    box: tuple[int, int, int, int] | None
    content: np.ndarray | None


def _close(valid: np.ndarray, radius: int) -> np.ndarray:
    """Fill gaps of up to ~2*radius px in the valid map (edge pixels whose patch straddles a motion
    boundary fail the match test although they are tracked): [H, W] bool -> float32."""
    if radius == 0:
        return valid.astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.morphologyEx(valid.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(np.float32)


def soften(mask: np.ndarray, grow: int, feather: int) -> np.ndarray:
    """[H, W] mask in 0..1 -> 1 on the mask, fading to 0 over `grow` + `feather` px outside it."""
    mask = mask.astype(np.float32)
    out = mask
    if grow:
        out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    if feather:
        out = cv2.GaussianBlur(out, (0, 0), feather / 2)
    return np.clip(np.maximum(out, mask), 0, 1)


def structure_change(src0: np.ndarray, edit: np.ndarray, region: np.ndarray) -> np.ndarray:
    """[H, W] in 0..1: how much the edit changes the image's structure (its grey-level detail) rather than
    its colour, inside region [H, W]; 1 = a new shape, texture or a removed part."""
    def detail(rgb):
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return g - cv2.GaussianBlur(g, (0, 0), 2.0)
    d = cv2.GaussianBlur(np.abs(detail(edit) - detail(src0)), (0, 0), 3.0)
    return np.clip((d - 0.012) / 0.025, 0, 1) * (region > 0)


def plan_edit(src0_u8: np.ndarray, edited: torch.Tensor, first_mask: torch.Tensor, settings: FlowSettings,
              per_frame: bool) -> EditPlan:
    """Prepare frame 1's edit and resolve settings.mode ('auto' -> delta or layer)."""
    edit = np.ascontiguousarray(edited.numpy(), dtype=np.float32)
    src0 = src0_u8.astype(np.float32) * np.float32(1 / 255)
    m0 = first_mask.numpy().astype(np.float32)
    soft0 = soften(m0, settings.mask_grow, settings.feather)
    structure = structure_change(src0, edit, m0 > 0.5)
    notes, mode = [], settings.mode
    cover = float((m0 > 0.5).mean())
    share = float(structure[m0 > 0.5].mean()) if (m0 > 0.5).any() else 0.0
    changed = (m0 > 0.5) & (np.abs(edit - src0).max(-1) > settings.mask_threshold / 2)
    colour, explained = fit_colour_map(src0, edit, changed)
    recolour = (settings.colour_map and explained >= EXPLAINED and mode in ("auto", "delta")
                and (per_frame or cover >= FULL_FRAME))   # the region is known every frame (given, or all of it)
    if cover >= FULL_FRAME:
        how = ("as one colour map of each frame's pixels" if recolour else
               "as a per-pixel colour change along the flow")
        notes.append(f"the edit covers {cover:.0%} of frame 1 (a global restyle; one affine colour map explains "
                     f"{explained:.0%} of it): the flow engine carries it {how}; for a new style in motion use "
                     "the Wan engine")
        if mode in ("auto", "layer"):
            mode = "delta"
    elif mode == "auto" and per_frame and not recolour:
        mode = "layer"
        notes.append(f"mode auto -> layer: per-frame masks and an edit no colour map explains ({share:.0%} of its "
                     "region changes the image's structure): the new content moves as one layer with the region's "
                     "motion")
    elif mode == "auto":
        mode = "delta"
        notes.append(f"mode auto -> delta: {share:.0%} of the edit region changes the image's structure (the "
                     "result is carried there, not the change)")
    if recolour and cover < FULL_FRAME:
        notes.append(f"the edit is a colour change (one affine colour map explains {explained:.0%} of its "
                     "region): carried as that map of each frame's own pixels inside the given per-frame masks")
    if not recolour:
        plan = EditPlan(edit, src0, m0, soft0, structure, mode, notes)
        if per_frame and cover < FULL_FRAME and explained < EXPLAINED:   # a colour change removes nothing; per-frame
            # masks only: with the frame-1 mask alone it moved background PSNR the wrong way (world 43.1 -> 37.1 dB)
            plan.removal = _removal(plan, settings)
        return plan
    residual = edit - np.clip(apply_colour_map(colour, src0), 0, 1)
    return EditPlan(edit, src0, m0, soft0, structure, mode, notes, colour, residual)


def removal_of(plan: EditPlan, settings: FlowSettings) -> Removal:
    """A fresh Removal of the plan's edit inside frame 1's region (first_mask > 0.5), grown as the mask is."""
    return Removal(plan.src0, plan.edit, plan.first_mask > 0.5, settings.mask_grow + settings.feather + 1)


def _removal(plan: EditPlan, settings: FlowSettings) -> Removal | None:
    """removal_of for modes delta/pixels (settings.removal on, a region given), else None."""
    if not (settings.removal and plan.mode in ("delta", "pixels") and (plan.first_mask > 0.5).any()):
        return None
    return removal_of(plan, settings)


REACH_PX = 16       # px around the region that focus tracks, besides 1.5x the frame's motion near it


def reach_box(box: tuple[int, int, int, int] | None, flow: np.ndarray | None, shape: tuple[int, int]
              ) -> tuple[int, int, int, int] | None:
    """Where the next frame is tracked (FlowSettings.focus): box (y0, y1, x0, x1), the bounding box of this frame's
    region (Carried.box), grown by REACH_PX plus 1.5x the frame-to-frame motion inside it (the 95th percentile of
    |flow|, flow [H, W, 2] t -> t-1: a few wild DIS vectors must not open the box), within the frame of `shape`
    (H, W); None (the whole frame) when the region is empty (box None: the object may come back anywhere) or flow
    is None (frame 1: the motion is not known yet)."""
    if box is None or flow is None:
        return None
    h, w = shape
    y0, y1, x0, x1 = box
    motion = float(np.percentile(np.sqrt((flow[y0:y1, x0:x1] ** 2).sum(-1)), 95))
    m = REACH_PX + int(np.ceil(1.5 * min(motion, max(h, w))))
    return max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m)


def _bbox(region: np.ndarray) -> tuple[int, int, int, int] | None:
    x, y, w, h = cv2.boundingRect((region > 0).astype(np.uint8))
    return None if w == 0 else (y, y + h, x, x + w)


def relight_gain(frame: np.ndarray, seen0: np.ndarray, scale: int = 16) -> np.ndarray:
    """Per-pixel, per-channel lighting gain of uint8 frame t over frame 1 seen through the track (seen0,
    uint8 [h, w, 3]), at low frequency (blurred at 1/scale size): float32 [h, w, 3], clipped to GAIN_RANGE."""
    h, w = frame.shape[:2]
    small = (max(1, w // scale), max(1, h // scale))
    a = cv2.resize(frame, small, interpolation=cv2.INTER_AREA).astype(np.float32) + 4
    b = cv2.resize(seen0, small, interpolation=cv2.INTER_AREA).astype(np.float32) + 4
    gain = cv2.resize(cv2.blur(a, (3, 3)) / cv2.blur(b, (3, 3)), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(gain.reshape(h, w, 3), *GAIN_RANGE)


def carry_pixels(frames: Iterator[np.ndarray], plan: EditPlan, settings: FlowSettings,
                 masks: Callable[..., np.ndarray | None], check_broken: bool = False
                 ) -> Iterator[tuple[np.ndarray, Carried]]:
    """Modes delta/pixels: frames uint8 [H, W, 3] in, (frame, Carried) out, one per frame.

    masks(t, grow): the given region of frame t [H, W] (softened unless grow=False), or None to carry frame
    1's along the track.
    check_broken: when the tracked region stays mostly unmatched and in pieces, note it once in plan.notes, or
    with settings.auto_layer raise _ChainBroke (run_carry then restarts in layer mode); when the region carried
    along the track is lost (LOST_AREA, LOST_FRAMES) while the camera pans, with settings.auto_follow raise
    _RegionLost (run_carry restarts with the follower's masks), else note it once."""
    low, broken, lost = plan.first_mask > 0.5, 0, 0
    low_f = low.astype(np.float32)
    ahead = {}                                           # "box": where focus tracks the next frame
    reach = np.ones((4 * settings.mask_grow + 3,) * 2, np.uint8)   # a square: covers _close's ellipse, faster

    def care(coords: np.ndarray) -> np.ndarray:
        """Where valid is read: the tracked region and _close's reach around it (coords: the track's box)."""
        return cv2.dilate((sample(plan.soft0, coords) > 0).view(np.uint8), reach).view(bool)
    own = masks(0, False) is None and plan.colour is None and plan.removal is None   # valid read near the region only
    focus = own and settings.focus
    tracks = track_frames(frames, settings.quality, settings.anchor_refine, settings.match_tolerance,
                          settings.chain_quality, settings.flow, settings.light, care=care if own else None,
                          focus=(lambda: ahead.get("box")) if focus else None)
    frame0 = frame1 = bg = None
    area0 = float(plan.soft0.sum())
    keep_out = None if plan.removal is None else \
        cv2.dilate(low.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(np.float32)
    for t, (frame, track) in enumerate(tracks):
        if frame0 is None:
            frame0 = frame
        elif frame1 is None:
            frame1 = frame
        given = masks(t, plan.colour is None)            # a colour map's region as given: a grown rim would be recoloured
        if given is not None:
            region = given
        elif plan.colour is not None:                    # a global restyle
            region = np.ones(frame.shape[:2], np.float32)
        else:
            coords, valid, _ = track.crop()
            region = sample(plan.soft0, coords) * _close(valid, settings.mask_grow)
            if track.box is not None:                    # tracked in a box only: the region lies inside it
                y0, y1, x0, x1 = track.box
                region, inner = np.zeros(frame.shape[:2], np.float32), region
                region[y0:y1, x0:x1] = inner
        if check_broken and t:
            coords, valid, flow = track.crop()
            why = _broken(sample(low_f, coords) > 0.5, valid, flow)
            broken = broken + 1 if why else 0
            if broken == BROKEN_FRAMES:
                where = f"the per-pixel chain broke up at frame {t + 1} ({why}, {BROKEN_FRAMES} frames in a row)"
                if settings.auto_layer:
                    raise _ChainBroke(where)
                if not any(n.startswith("mode auto: the per-pixel chain") for n in plan.notes):   # once
                    plan.notes.append(f"mode auto: {where}; if the edit tears into fragments, try mode 'layer' "
                                      "(or auto_layer), which moves it as one piece")
                    log.info("FFP flow: %s", plan.notes[-1])
        if check_broken and own and t:
            lost = lost + 1 if float(region.sum()) < LOST_AREA * area0 else 0
            if lost == LOST_FRAMES:
                _region_lost(t, plan, settings, frame0, frame1)
        moved = hard = None
        if plan.removal is not None and t:
            hard = masks(t, False)
            bg = _background_motion(track, keep_out, given, bg)
            if bg is not None:
                _reveal(plan.removal, frame, track, bg, hard)
            moved = bg if plan.removal.any else None
        carried = _content(frame, frame0, track, region, plan, settings, moved, hard)
        if focus:
            ahead["box"] = reach_box(carried.box, track.flow, region.shape)
        yield frame, carried
    if plan.removal is not None and plan.removal.any:
        plan.notes.append(f"{plan.removal.share():.0%} of the edit region shows background where the source had "
                          "an object (a removed part): carried there with the background's motion, not the object's")


BG_POINTS = 20000       # about this many tracked pixels are the background's motion fit to


def _background_motion(track: Track, keep_out: np.ndarray, given: np.ndarray | None,
                       last: np.ndarray | None) -> np.ndarray | None:
    """The background's motion frame t -> frame 1 as an affine [2, 3], fitted to the tracked
    pixels that land outside frame 1's region (dilated: keep_out [H, W] float32 0/1) and, with per-frame masks,
    lie outside frame t's (given); robust affine fit (fit.fit_affine). last: the previous frame's, kept
    when too few pixels qualify."""
    from .fit import fit_affine

    h, w = keep_out.shape
    stride = max(1, int((h * w / BG_POINTS) ** 0.5))
    q2 = np.ascontiguousarray(track.coords[::stride, ::stride])
    ok = track.valid[::stride, ::stride] & (sample(keep_out, q2) < 0.01)
    if given is not None:
        ok &= given[::stride, ::stride] < 0.01
    ys, xs = np.nonzero(ok)
    a = fit_affine(np.stack([xs, ys], 1).astype(np.float64) * stride, q2[ys, xs].astype(np.float64))
    return last if a is None else a


def _reveal(removal: Removal, frame: np.ndarray, track: Track, bg: np.ndarray, hard: np.ndarray | None) -> None:
    """Show removal the background frame t reveals behind frame 1's region, located by the background's motion
    bg: with per-frame masks, pixels outside frame t's region hard [H, W] (grown 2 px); without, pixels whose
    track does not hold on frame 1's object (unmatched)."""
    from .fit import apply

    h, w = frame.shape[:2]
    if hard is not None:
        outside = cv2.dilate((hard > 0.5).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    else:
        outside = ~track.valid
    bg_coords = apply(bg, identity_grid(h, w).reshape(-1, 2)).reshape(h, w, 2).astype(np.float32)
    removal.observe(frame, bg_coords, outside)


MOVING = 1.5            # px: a pixel whose motion is this close to another (the background, the object) moves with it


class _RegionLost(Exception):
    """Auto mode lost the edit region at frame t while the camera pans (the message says where): run_carry
    restarts with per-frame masks from the motion follower."""

    def __init__(self, where: str, t: int):
        super().__init__(where)
        self.t = t


def _region_lost(t: int, plan: EditPlan, settings: FlowSettings, frame0: np.ndarray, frame1: np.ndarray) -> None:
    """The region carried along the track was lost at frame t: raise _RegionLost when settings.auto_follow and
    the camera pans past the object (frames 0, 1 uint8 RGB), else note it once in plan.notes."""
    from ..masks.flow_track import pans_past

    where = (f"the edit region was lost at frame {t + 1} (under {LOST_AREA:.0%} of frame 1's area for "
             f"{LOST_FRAMES} frames in a row)")
    if settings.auto_follow and pans_past(frame0, frame1, plan.first_mask > 0.5, settings.quality):
        raise _RegionLost(where, t)
    if not any(n.startswith("mode auto: the edit region was lost") for n in plan.notes):
        plan.notes.append(f"mode auto: {where}; give a mask for every frame (Mask Propagate, SAM2) to keep it")
        log.info("FFP flow: %s", plan.notes[-1])


def follower_masks(open_frames: Callable[[], Iterator[np.ndarray]], plan: EditPlan, settings: FlowSettings,
                   should_stop: ShouldStop | None = None) -> tuple[Callable[..., np.ndarray], int | None]:
    """Per-frame masks of the edit region from the masks room's motion follower (follow_region, from frame
    1's region plan.first_mask > 0.5) over a fresh pass of the frames -> (masks, stop): masks(t, grow) as
    `prepare` returns them ([H, W] float32, softened unless grow=False), kept bit-packed at the tracking size
    (at most 640 px on the long side: about 29 KB a frame) and scaled back as track_masks does. stop: the first
    frame whose mask grew past FOLLOW_GROWTH x frame 1's area (the follower has spilled onto the scene: from
    there masks are empty and the follower stops), or None."""
    from ..masks.flow_track import follow_region

    key = plan.first_mask > 0.5
    h, w = key.shape
    packed, small, stop = [], key.shape, None
    for t, m in enumerate(follow_region(open_frames(), key, settings.quality, should_stop=should_stop)):
        if t == 0:
            small, limit = m.shape, FOLLOW_GROWTH * max(1, int(m.sum()))
        elif m.sum() > limit:
            stop = t
            break
        packed.append(np.packbits(m))

    def masks(t: int, grow: bool = True) -> np.ndarray:
        if t >= len(packed):
            return np.zeros((h, w), np.float32)
        m = key if t == 0 else np.unpackbits(packed[t], count=small[0] * small[1]).reshape(small).astype(bool)
        if m.shape != (h, w):
            m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
        m = m.astype(np.float32)
        return soften(m, settings.mask_grow, settings.feather) if grow else m
    return masks, stop


def replan_per_frame(plan: EditPlan, settings: FlowSettings, note: str) -> None:
    """Plan the same edit again, in place, as one given with per-frame masks (auto: a colour map or the mask
    layer); plan.notes keeps what was said, then `note`, then the new plan's notes."""
    new = plan_edit(np.round(plan.src0 * 255).astype(np.uint8), torch.from_numpy(plan.edit),
                    torch.from_numpy(plan.first_mask), settings, True)
    notes = plan.notes + [note] + new.notes
    for f in dataclasses.fields(EditPlan):
        setattr(plan, f.name, getattr(new, f.name))
    plan.notes = notes


class _ChainBroke(Exception):
    """Auto mode's per-pixel chain broke up (the message says where and how): run_carry restarts in layer mode."""


def _broken(held: np.ndarray, valid: np.ndarray, flow: np.ndarray | None = None) -> str:
    """Why the per-pixel chain counts as broken up in this frame ('' when it holds): held [H, W] bool, the
    pixels whose track lands in frame 1's region; valid: tracked without occlusion; flow [H, W, 2]: the
    frame-to-frame flow. Broken: most of the region unmatched, the matched rest in BROKEN_PIECES pieces, and
    (given flow) the unmatched pixels moving with the matched ones (at least WITH_OBJECT of them within
    MOVING px of their median motion): the object's look changed. An occluder passing over it moves on its
    own (synthetic demo clip: 5-10 % of the unmatched pixels move with the disc; a breaking-up texture: 100 %)."""
    if not held.any():
        return ""
    kept = held & valid
    matched = float(kept.sum()) / float(held.sum())
    if matched >= BROKEN_VALID:
        return ""
    n, _, stats, _ = cv2.connectedComponentsWithStats(kept.astype(np.uint8), connectivity=8)
    pieces = int((stats[1:, cv2.CC_STAT_AREA] >= 0.02 * max(kept.sum(), 1)).sum())
    if pieces < BROKEN_PIECES:
        return ""
    lost = held & ~valid
    if flow is not None and kept.sum() >= 16 and lost.any():
        motion = np.median(flow[kept], 0)
        along = float((np.linalg.norm(flow[lost] - motion, axis=-1) < MOVING).mean())
        if along < WITH_OBJECT:
            return ""                                # something else moves over the object: an occluder
        return (f"{matched:.0%} of the tracked edit region still matches frame 1, in {pieces} pieces, and "
                f"{along:.0%} of the rest moves with it")
    return f"{matched:.0%} of the tracked edit region still matches frame 1, in {pieces} pieces"


def _content(frame: np.ndarray, frame0: np.ndarray, track: Track, region: np.ndarray, plan: EditPlan,
             settings: FlowSettings, bg: np.ndarray | None = None,
             hard: np.ndarray | None = None) -> Carried:
    """The carried edit inside region's bounding box (see the module docstring for what is carried)."""
    box = _bbox(region)
    if box is None:
        return Carried(region, None, None)
    y0, y1, x0, x1 = box
    coords = track.coords[y0:y1, x0:x1]
    src = frame[y0:y1, x0:x1].astype(np.float32) * np.float32(1 / 255)
    if plan.colour is not None:                      # the map of this frame's own pixels (frame 1: the edit itself)
        content = apply_colour_map(plan.colour, src)
        if track.flow is None:
            content += plan.residual[y0:y1, x0:x1]
        return Carried(region, box, np.clip(content, 0, 1, out=content))
    edit = sample(plan.edit, coords)
    if settings.light:
        seen0 = sample_u8(frame0, coords) if track.seen is None else track.seen[y0:y1, x0:x1]
        result = edit * relight_gain(frame[y0:y1, x0:x1], seen0)
    else:
        result = edit.copy()
    if plan.mode == "pixels":
        content = result
    else:
        delta = edit - sample(plan.src0, coords)
        keep = 1 - sample(plan.structure, coords)[..., None]
        content = result + keep * (src + delta - result)
    if bg is not None:                               # a removed part: frame 1's background, moved with the background
        from .fit import apply
        grid = np.stack(np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)), -1)
        bcoords = apply(bg, grid.reshape(-1, 2)).reshape(grid.shape).astype(np.float32)
        back = sample(plan.removal.background, bcoords)
        if settings.light:
            back *= relight_gain(frame[y0:y1, x0:x1], sample_u8(frame0, bcoords))
        rem = sample(plan.removal.removed, coords)
        if hard is not None and plan.removal.whole:  # the whole object was removed, and the given mask says
            # these pixels are that object: whatever the track says
            inside_t = hard[y0:y1, x0:x1] > 0.5
            rem[inside_t] = sample(plan.removal.removed_far, coords)[inside_t]
        if hard is not None:                         # the rim outside the object shows the source's own background
            rem *= cv2.dilate((hard[y0:y1, x0:x1] > 0.01).astype(np.uint8), np.ones((3, 3), np.uint8))
        rem = rem[..., None]
        content += rem * (back - content)
    return Carried(region, box, np.clip(content, 0, 1, out=content))


def carry(open_frames: Callable[[], Iterator[np.ndarray]], plan: EditPlan, settings: FlowSettings,
          masks: Callable[..., np.ndarray | None]) -> Iterator[tuple[np.ndarray, Carried]]:
    """plan.mode's carrier over the frames (open_frames() gives a fresh pass: layer mode reads twice)."""
    from .layer import MaskLayer, carry_layer

    if plan.mode == "layer" and masks(0, False) is not None:      # per-frame masks: the region's own motion
        layer = MaskLayer(open_frames(), plan, settings, masks)
        plan.notes.append(layer.note())
        yield from layer.frames(open_frames())
    elif plan.mode == "layer":
        yield from carry_layer(open_frames, plan, settings, masks)
    else:
        auto = settings.mode == "auto" and plan.colour is None       # a colour map needs the region only
        yield from carry_pixels(open_frames(), plan, settings, masks, check_broken=auto)


def composite(src: np.ndarray, carried: Carried, out: np.ndarray) -> np.ndarray:
    """out = src + region * (content - src) inside carried.box, src elsewhere (bit-identical). float32
    [H, W, 3] arrays; out may be src."""
    if out is not src:
        np.copyto(out, src)
    if carried.box is not None:
        y0, y1, x0, x1 = carried.box
        s = src[y0:y1, x0:x1]
        r = carried.region[y0:y1, x0:x1, None]
        out[y0:y1, x0:x1] = s + r * (carried.content - s)
    return out


def prepare(source_first: torch.Tensor, shape: tuple[int, int, int], edited_first: torch.Tensor,
            edit_mask: torch.Tensor | None, settings: FlowSettings, size_policy: str
            ) -> tuple[EditPlan, Callable[..., np.ndarray | None], list[str]]:
    """Fit the edit, derive or check the mask, plan. source_first: IMAGE frame [H, W, 3]; shape: (T, H, W).
    Returns (plan, masks(t), notes)."""
    t_len, h, w = shape
    edited, fit_note = fit_to_frame(edited_first.float(), h, w, size_policy)
    notes = [fit_note] if fit_note else []
    per_frame = None
    if edit_mask is None:
        derived = derive_mask(source_first, edited, settings.mask_threshold)
        first_mask = derived.mask
        notes.append(f"edit mask derived from the colour difference: {first_mask.mean().item():.1%} of frame 1"
                     + (f"; ignored {derived.ignored}" if derived.ignored else ""))
    else:
        edit_mask = check_mask(edit_mask.float(), "edit_mask", torch.empty(t_len, h, w, 0))
        if edit_mask.amax() <= 0:
            raise ValueError("edit_mask is empty (all zero): nothing marks the edit region. Paint the edited "
                             "area white, or leave edit_mask unconnected to derive it from the edit.")
        first_mask, per_frame = edit_mask[0], (edit_mask if edit_mask.shape[0] > 1 else None)
    plan = plan_edit(to_uint8(source_first), edited, first_mask, settings, per_frame is not None)
    notes += plan.notes
    plan.notes = notes

    def masks(t: int, grow: bool = True) -> np.ndarray | None:
        if per_frame is None:
            return None
        m = per_frame[t].numpy()
        return soften(m, settings.mask_grow, settings.feather) if grow else np.ascontiguousarray(m, np.float32)
    return plan, masks, notes


def run_carry(open_frames: Callable[[], Iterator[np.ndarray]], plan: EditPlan, settings: FlowSettings,
              masks: Callable[..., np.ndarray | None], sink: Callable[[int, np.ndarray, Carried], None],
              t_len: int | None, should_stop: ShouldStop | None = None,
              on_step: Callable[[int, int], None] | None = None) -> None:
    """Drive carry over every frame, calling sink(t, frame, carried), then on_step(t + 1, t_len); honours
    should_stop after each frame but the first. With settings.auto_layer, when the per-pixel chain breaks up it
    logs why and starts again from frame 1 in layer mode (the sink then gets t = 0, 1, ... a second time);
    with settings.auto_follow, when the region is lost while the camera pans, it starts again with the
    follower's per-frame masks (`follower_masks`; one more pass over the frames), unless the follower's mask
    spilled onto the scene before the frame where the track was lost (then the track is run again as it was)."""
    try:
        for t, (frame, carried) in enumerate(carry(open_frames, plan, settings, masks)):
            sink(t, frame, carried)
            if t:
                report(None, should_stop, t, (t_len or t + 1) - 1)
            if on_step is not None:
                on_step(t + 1, t_len or t + 1)
    except _ChainBroke as why:
        plan.mode = "layer"
        plan.notes.append(f"mode auto -> layer: {why}; the edit region now moves as one piece (restarted at frame 1)")
        log.info("FFP flow: %s", plan.notes[-1])
        run_carry(open_frames, plan, settings, masks, sink, t_len, should_stop, on_step)
    except _RegionLost as why:
        followed, stop = follower_masks(open_frames, plan, settings, should_stop)
        if stop is not None and stop <= why.t:          # the follower spilled before the track was lost
            plan.notes.append(f"mode auto: {why}; the motion follower's mask spilled onto the scene at frame "
                              f"{stop + 1}, sooner, so the track is kept")
            log.info("FFP flow: %s", plan.notes[-1])
            run_carry(open_frames, plan, dataclasses.replace(settings, auto_follow=False), masks, sink, t_len,
                      should_stop, on_step)
            return
        tail = "" if stop is None else (f"; from frame {stop + 1} its mask grew past {FOLLOW_GROWTH:g}x frame 1's "
                                        "area (it spilled onto the scene), so the edit stops there")
        replan_per_frame(plan, settings, f"mode auto: {why} while the camera pans past the object: restarted at "
                                         "frame 1 with per-frame masks from the motion follower (Mask Propagate's "
                                         f"without SAM2){tail}")
        log.info("FFP flow: %s", plan.notes[-1])
        run_carry(open_frames, plan, settings, followed, sink, t_len, should_stop, on_step)


def propagate_edit(source: torch.Tensor, edited_first: torch.Tensor, edit_mask: torch.Tensor | None = None,
                   settings: FlowSettings = FlowSettings(), size_policy: str = "auto",
                   on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> Propagation:
    """Carry the edit of frame 0 through the clip.

    source: IMAGE [T, H, W, 3]; edited_first: [H', W', 3] or [1, H', W', 3] (fitted to H x W by size_policy);
    edit_mask: None (derived from the difference), [1, H, W] (frame-0 mask, propagated by flow) or [T, H, W]
    (the edit region of every frame, e.g. from SAM2). Returns the edited video and the region used. Works
    frame by frame: beyond the input and the output it holds a few frames."""
    check_video(source, "source_video")
    t_len, h, w = source.shape[:3]
    plan, masks, notes = prepare(source[0], (t_len, h, w), edited_first, edit_mask, settings, size_policy)
    for note in notes:
        log.info("FFP flow: %s", note)
    out = torch.empty(source.shape, dtype=torch.float32)
    region = torch.empty((t_len, h, w), dtype=torch.float32)
    out_np, region_np = out.numpy(), region.numpy()

    def frames() -> Iterator[np.ndarray]:
        return (to_uint8(source[t]) for t in range(t_len))

    def sink(t: int, frame: np.ndarray, carried: Carried) -> None:
        composite(source[t].float().numpy(), carried, out_np[t])
        region_np[t] = carried.region

    def step(i: int, n: int) -> None:
        if on_step is not None:
            on_step(i, n, out[i - 1])
    run_carry(frames, plan, settings, masks, sink, t_len, should_stop, step)
    return Propagation(out, region, tuple(plan.notes))


class _Uint8Frames:
    """IMAGE [T, H, W, 3] seen as uint8 frames, converted one at a time (never the whole clip)."""

    def __init__(self, source: torch.Tensor):
        self.source, self.shape = source, (*source.shape[:3], 3)

    def __getitem__(self, t: int) -> np.ndarray:
        return to_uint8(self.source[t])


def propagate_mask(source: torch.Tensor, first_mask: torch.Tensor, quality: str = "medium",
                   match_tolerance: float = 0.06, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None) -> torch.Tensor:
    """Carry a frame-1 mask [H, W] (1 = region) through source [T, H, W, 3] along the flow: [T, H, W] in 0..1.
    Pixels that lose their match with frame 1 (occluded) drop out of the region."""
    check_video(source, "source_video")
    m0 = check_mask(first_mask.float(), "first_mask", source[:1])[0].numpy()
    out = np.empty(source.shape[:3], np.float32)
    tracks = track_to_first(_Uint8Frames(source), quality, True, match_tolerance, on_step, should_stop)
    for t, track in enumerate(tracks):
        out[t] = sample(m0, track.coords) * track.valid
    return torch.from_numpy(out)
