"""Layer mode: the edit region of frame 1 moves as one layer, composited over a reconstructed background.

For pose and shape changes the per-pixel chain cannot carry the edit (the new shape is not where the old
object's pixels are, and a turning head has no pixel-to-pixel match), so two passes over the frames:

1. Track (nodes/flow/track.py). Per frame fit the object's motion (a piecewise-affine map, fit.PieceFit, to
   the tracked pixels of the frame-1 region) and the background's (one robust affine to the rest). Where the
   background behind the frame-1 region shows (its pixels move with the background, not the object), store
   it in a background plate in frame-1 coordinates, and compare it with the edited frame: where they agree,
   the edit removed that part of the object (it shows background there).
2. Composite: the new layer (the edited frame's region minus what was removed) moved with the object's map
   and relit by the source's lighting, over the plate moved with the background's motion; a removed part
   shows the edited frame's background, never the old object's ghost.

Only small per-frame maps and frame-sized plates are kept: memory does not grow with the clip.

With per-frame masks (the edit region of every frame given) MaskLayer does the same with one affine per frame
fitted to the masks themselves (fit.mask_motion), which also moves an inserted object the source never shows,
and takes the background behind it from nodes/flow/removal.py's plate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import cv2
import numpy as np

from .dis import identity_grid, sample
from .fit import PieceFit, apply, fit_affine
from .track import patch_error, track_frames

if TYPE_CHECKING:
    from .engine import Carried, EditPlan, FlowSettings

FIT_POINTS = 40000    # about this many points (a grid over the frame) are the motions fit to
MOVING = 1.5          # px: a tracked pixel whose track differs this much from the background's is the object
FLOW_FIT_POINTS = 6   # the flow fit uses the unmatched tracks too when fewer matched ones than this remain
REMOVAL_SHARE = 0.2   # if less than this share of the revealed region disagrees with the edit, it is a removal


def _stride(shape: tuple[int, int]) -> int:
    return max(1, int((shape[0] * shape[1] / FIT_POINTS) ** 0.5))


def _fit_frame(track, m0: np.ndarray, keep_out: np.ndarray, pieces: PieceFit, pts: np.ndarray):
    """(object piecewise affines or None, background affine or None) of one frame's track."""
    stride = _stride(m0.shape)
    q2 = np.ascontiguousarray(track.coords[::stride, ::stride])
    q = q2.reshape(-1, 2)
    ok = track.valid[::stride, ::stride].ravel()
    inside = sample(m0, q2).ravel() > 0.5
    out = sample(keep_out, q2).ravel() < 0.01
    obj = pieces.fit(pts[ok & inside], q[ok & inside])
    bg = fit_affine(pts[ok & out], q[ok & out])
    return obj, bg


def carry_layer(open_frames: Callable[[], Iterator[np.ndarray]], plan: "EditPlan", settings: "FlowSettings",
                masks: Callable[..., np.ndarray | None]) -> Iterator[tuple[np.ndarray, "Carried"]]:
    """Layer mode's two passes (module docstring); yields (frame, Carried) per frame of the second pass."""
    from .engine import Carried, _bbox, relight_gain

    m0 = (plan.first_mask > 0.5).astype(np.float32)
    h, w = m0.shape
    ys, xs = np.nonzero(m0)
    pieces = PieceFit((float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1))
    grid = identity_grid(h, w)
    stride = _stride((h, w))
    pts = grid[::stride, ::stride].reshape(-1, 2).astype(np.float64)
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    keep_out = cv2.dilate(m0, grow)
    edit_u8 = (np.clip(plan.edit, 0, 1) * 255 + 0.5).astype(np.uint8)

    # pass 1: motions, background plate, what the edit removed
    plate = np.zeros((h, w, 3), np.uint8)
    known = keep_out < 0.01
    plate[known] = edit_u8[known]
    revealed_ok = np.zeros((h, w), bool)
    revealed_bad = np.zeros((h, w), bool)
    obj_maps: list = []
    bg_maps: list = []
    tracks = track_frames(open_frames(), settings.quality, settings.anchor_refine, settings.match_tolerance,
                          settings.chain_quality, settings.flow, settings.light)
    for t, (frame, track) in enumerate(tracks):
        obj, bg = _fit_frame(track, m0, keep_out, pieces, pts)
        obj = obj if obj is not None else (obj_maps[-1] if obj_maps else None)
        bg = bg if bg is not None else (bg_maps[-1] if bg_maps else np.array([[1, 0, 0], [0, 1, 0]], float))
        obj_maps.append(obj)
        bg_maps.append(bg)
        if t == 0:
            continue
        bg_coords = apply(bg, grid.reshape(-1, 2)).reshape(h, w, 2).astype(np.float32)
        tracked_in = sample(m0, track.coords) > 0.5
        moving = np.linalg.norm(track.coords - bg_coords, axis=-1) > MOVING
        on_object = cv2.dilate((tracked_in & (moving | ~track.valid)).astype(np.uint8), grow[4:11, 4:11])
        visible = (on_object == 0).astype(np.uint8) * 255
        seen = cv2.warpAffine(frame, bg.astype(np.float64), (w, h), flags=cv2.INTER_LINEAR)
        seen_vis = cv2.warpAffine(visible, bg.astype(np.float64), (w, h), flags=cv2.INTER_NEAREST) == 255
        new = seen_vis & ~known
        if new.any():
            plate[new] = seen[new]
            known |= new
            err = patch_error(edit_u8.astype(np.float32) / 255, plate.astype(np.float32) / 255)
            agree = err < settings.match_tolerance * 1.5
            revealed_ok |= new & agree & (m0 > 0)
            revealed_bad |= new & ~agree & (m0 > 0)

    n_ok, n_bad = int(revealed_ok.sum()), int(revealed_bad.sum())
    removal = n_ok + n_bad > 0 and n_bad < REMOVAL_SHARE * (n_ok + n_bad)
    layer0 = (m0 > 0) & ~revealed_ok & ~(removal & ~revealed_bad)
    plan.notes.append(f"layer mode: {layer0.sum() / max(m0.sum(), 1):.0%} of the edit region moves as the new "
                      f"object's layer; {n_ok} px of it show the background the edit revealed"
                      + (" (a removal)" if removal else ""))
    background = np.where((~layer0 | ~known)[..., None], edit_u8, plate)
    hole = (layer0 & ~known).astype(np.uint8)
    if hole.any():
        background = cv2.inpaint(background, cv2.dilate(hole, grow[4:11, 4:11]), 5, cv2.INPAINT_TELEA)
    bg_f = background.astype(np.float32) * np.float32(1 / 255)
    alpha0 = cv2.GaussianBlur(layer0.astype(np.float32), (0, 0), 0.7)

    # pass 2: composite
    frame0 = None
    for t, frame in enumerate(open_frames()):
        frame0 = frame if frame0 is None else frame0
        obj, bg = obj_maps[t], bg_maps[t]
        if obj is None:
            yield frame, Carried(np.zeros((h, w), np.float32), None, None)
            continue
        omap = pieces.map(obj, grid.reshape(-1, 2).astype(np.float64)).reshape(h, w, 2).astype(np.float32)
        given = masks(t)
        alpha = sample(alpha0, omap)
        region = given if given is not None else np.maximum(sample(plan.soft0, omap), alpha)
        box = _bbox(region)
        if box is None:
            yield frame, Carried(region, None, None)
            continue
        y0, y1, x0, x1 = box
        om = omap[y0:y1, x0:x1]
        bmap = apply(bg, grid[y0:y1, x0:x1].reshape(-1, 2)).reshape(y1 - y0, x1 - x0, 2).astype(np.float32)
        layer = sample(plan.edit, om)
        if settings.light:
            layer *= relight_gain(frame[y0:y1, x0:x1], sample(frame0, om))
        a = alpha[y0:y1, x0:x1, None]
        content = a * layer + (1 - a) * sample(bg_f, bmap)
        yield frame, Carried(region, box, np.clip(content, 0, 1, out=content))


def _flow_fit(track, m0: np.ndarray, mt: np.ndarray, pts: np.ndarray, stride: int) -> np.ndarray | None:
    """Affine frame t -> frame 0 fitted (robustly) to the tracked pixels inside frame t's region mt whose track
    lands in frame 0's m0 (the source's own object, where the edit has one)."""
    q2 = np.ascontiguousarray(track.coords[::stride, ::stride])
    ok = ((mt[::stride, ::stride] > 0.5) & (sample(m0, q2) > 0.5)).ravel()
    valid = ok & track.valid[::stride, ::stride].ravel()
    if valid.sum() >= FLOW_FIT_POINTS:
        ok = valid
    return fit_affine(pts[ok], q2.reshape(-1, 2)[ok].astype(np.float64))


class MaskLayer:
    """Layer mode with per-frame masks (the edit region of every frame given): the new object (frame 1's edit
    region minus the parts where the edit shows background: nodes/flow/removal.py) moves as one affine layer
    with the region's own motion, fitted to the masks (fit.mask_motion: ECC of frame t's mask onto frame 1's,
    started from the previous frame's motion and from a fit to the tracked source pixels; the best overlap
    wins), over frame 1's background (removal's plate: the edit where it shows background, the background the
    clip reveals elsewhere, inpainted where never seen) moved with the background's motion. Outside the layer
    and outside frame t's region the frame's own pixels stay.

    Built by pass 1 over the frames (the motions, the revealed background: a few affines per frame and
    frame-sized maps); overlap: the mean IoU of frame t's mask with frame 1's moved by the fitted motion (how
    well one affine explains the region: low for a deforming object or a region that frame 1 barely shows);
    frames(open_frames()) is pass 2, (frame, Carried) per frame."""

    def __init__(self, frames: Iterator[np.ndarray], plan: "EditPlan", settings: "FlowSettings",
                 masks: Callable[..., np.ndarray]):
        from .engine import _background_motion, _reveal, removal_of
        from .fit import IDENTITY, mask_motion

        self.plan, self.settings, self.masks = plan, settings, masks
        m0 = np.ascontiguousarray(plan.first_mask, np.float32)
        h, w = m0.shape
        self.grid = identity_grid(h, w)
        stride = _stride((h, w))
        pts = self.grid[::stride, ::stride].reshape(-1, 2).astype(np.float64)
        removal = removal_of(plan, settings)
        keep_out = cv2.dilate((m0 > 0.5).astype(np.uint8), np.ones((15, 15), np.uint8)).astype(np.float32)
        blur0 = cv2.GaussianBlur(m0, (0, 0), 1.0)
        self.obj_maps, self.bg_maps, fits = [IDENTITY.copy()], [IDENTITY.copy()], []
        tracks = track_frames(frames, settings.quality, settings.anchor_refine, settings.match_tolerance,
                              settings.chain_quality, settings.flow, settings.light)
        for t, (frame, track) in enumerate(tracks):
            if t == 0:
                continue
            hard = masks(t, False)
            bg = _background_motion(track, keep_out, masks(t), self.bg_maps[-1])
            self.bg_maps.append(bg)
            _reveal(removal, frame, track, bg, hard)
            obj = self.obj_maps[-1]
            if (hard > 0.5).any():
                cands = [obj]
                flow_fit = _flow_fit(track, m0, hard, pts, stride)
                if flow_fit is not None:
                    cands.append(flow_fit)
                obj, fit = mask_motion(blur0, cv2.GaussianBlur(hard, (0, 0), 1.0), cands)
                fits.append(fit)
            self.obj_maps.append(obj)
        self.overlap = float(np.mean(fits)) if fits else 1.0
        layer0 = (m0 > 0.5) & ((removal.removed_far < 0.5) | (not settings.removal))   # removal off: all of it
        self.share = float(layer0.sum()) / max(int((m0 > 0.5).sum()), 1)
        self.alpha0 = cv2.GaussianBlur(layer0.astype(np.float32), (0, 0), 0.5)
        self.plate = removal.background

    def note(self) -> str:
        return (f"layer mode with per-frame masks: {self.share:.0%} of the edit region moves as the new object's "
                f"layer with the region's motion (fitted to the masks, overlap {self.overlap:.2f}); the rest "
                "shows the background")

    def frames(self, frames: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, "Carried"]]:
        """Pass 2: the layer over the moved background inside each frame's region."""
        from .engine import Carried, _bbox, relight_gain

        plan, grid, frame0 = self.plan, self.grid, None
        for t, frame in enumerate(frames):
            frame0 = frame if frame0 is None else frame0
            region = self.masks(t)
            box = _bbox(region)
            if box is None:
                yield frame, Carried(region, None, None)
                continue
            y0, y1, x0, x1 = box
            if t == 0:                                   # frame 1 is the edit itself
                yield frame, Carried(region, box, np.ascontiguousarray(plan.edit[y0:y1, x0:x1]))
                continue
            cell = grid[y0:y1, x0:x1].reshape(-1, 2)
            om = apply(self.obj_maps[t], cell).reshape(y1 - y0, x1 - x0, 2).astype(np.float32)
            bm = apply(self.bg_maps[t], cell).reshape(y1 - y0, x1 - x0, 2).astype(np.float32)
            hard = self.masks(t, False)[y0:y1, x0:x1]
            src = frame[y0:y1, x0:x1].astype(np.float32) * np.float32(1 / 255)
            back = sample(self.plate, bm)
            layer = sample(plan.edit, om)
            if self.settings.light:
                back *= relight_gain(frame[y0:y1, x0:x1], sample(frame0, bm))
                layer *= relight_gain(frame[y0:y1, x0:x1], sample(frame0, om))
            back = np.where((hard > 0.01)[..., None], back, src)       # outside frame t's region: the frame
            a = (sample(self.alpha0, om) * np.minimum(1, hard * 2))[..., None]
            content = back + a * (layer - back)
            yield frame, Carried(region, box, np.clip(content, 0, 1, out=content))
