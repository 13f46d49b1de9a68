"""Track every pixel of each frame back to frame 0: chained flow, re-anchored to frame 0, patch-checked.

uint8 frames in, one Track per frame out, streaming (the clip is never held): the chained flow of the next
pair runs in a worker thread while this frame is re-anchored and checked (both cores; OpenCV releases the GIL),
and every per-pixel test runs on uint8 with OpenCV kernels. Deterministic: each DIS estimator is used by one
thread only, in frame order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from ..common import OnStep, ShouldStop, report
from .dis import DenseFlow, identity_grid, inside, sample, sample_u8, to_gray

FlowFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
"""flow(gray_a, gray_b, init=None) -> [H, W, 2] float32 flow from grey uint8 frame a to frame b."""
Box = tuple[int, int, int, int]
"""(y0, y1, x0, x1): the rows y0..y1-1 and columns x0..x1-1 a frame is tracked in."""

RELIT_SHARE = 0.5      # when fewer pixels than this match frame 0 plainly, the frame counts as relit
LIGHT_WINDOW = 15      # px: local brightness/colour cast removed over this window by the lighting-tolerant test
LOCAL_LIGHT = 5        # a pixel failing the plain test in a frame that mostly passes it: light_error under tol / this


@dataclass(frozen=True)
class Track:
    """coords [H, W, 2]: where pixel (x, y) of frame t lies in frame 0; valid [H, W]: tracked without
    occlusion (its patch matches frame 0, directly or after removing the local lighting change); flow
    [H, W, 2]: the frame-to-frame flow t -> t-1 the chain used (None for frame 0); seen [H, W, 3] uint8:
    frame 0 looked up at coords (dis.sample_u8; None for frame 0, which is frame 0 itself); box: where this
    frame was tracked (track_frames' focus; None: everywhere): outside it valid is False and coords / seen are
    an earlier frame's."""

    coords: np.ndarray
    valid: np.ndarray
    flow: np.ndarray | None = None
    seen: np.ndarray | None = None
    box: Box | None = None

    def crop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(coords, valid, flow) inside box (views; the whole arrays when box is None)."""
        if self.box is None:
            return self.coords, self.valid, self.flow
        y0, y1, x0, x1 = self.box
        return (self.coords[y0:y1, x0:x1], self.valid[y0:y1, x0:x1],
                None if self.flow is None else self.flow[y0:y1, x0:x1])


def patch_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute RGB difference (0..1) over 5x5 patches of two float frames [H, W, 3] -> [H, W].
    Colour, not grey: objects of equal brightness must not match."""
    return cv2.blur(np.abs(a - b).mean(-1), (5, 5))


_MEAN3 = np.full((1, 3), 1 / 3, np.float32)


def patch_error_u8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """patch_error of two uint8 frames [H, W, 3] -> float32 [H, W] in 0..1 (within 1/255 of the float one),
    about 25x faster: absdiff, channel mean and box filter are OpenCV kernels."""
    mean = cv2.transform(cv2.absdiff(a, b), _MEAN3)
    return cv2.boxFilter(mean, cv2.CV_32F, (5, 5)) * np.float32(1 / 255)


GAIN_LIMIT = 2.5      # the lighting-tolerant test accepts local brightness changes up to this factor either way
_LOG = (np.log1p(np.arange(256, dtype=np.float32)) / np.float32(np.log(256))).astype(np.float32)


_LOG_GAIN_LIMIT = float(np.log(GAIN_LIMIT) / np.log(256))


def light_error(a: np.ndarray, b: np.ndarray, window: int = LIGHT_WINDOW) -> np.ndarray:
    """An illumination-tolerant patch error of two uint8 frames [H, W, 3] -> float32 [H, W] (0..1 scale):
    per channel log intensity minus its local mean over `window` px, compared over 5x5 patches. A gain that
    varies slowly over the frame (shade, a cloud, an exposure change) cancels; texture and edges must still
    agree, and so must the local colour (chromaticity): a flat occluder of another colour fails. Where the
    local gain is beyond GAIN_LIMIT the error is 1."""
    la, lb = cv2.LUT(a, _LOG), cv2.LUT(b, _LOG)
    ma, mb = cv2.blur(la, (window, window)), cv2.blur(lb, (window, window))
    texture = cv2.blur(cv2.transform(cv2.absdiff(la - ma, lb - mb), _MEAN3), (5, 5))
    shift = ma - mb                                     # log gain per channel
    gain = cv2.transform(shift, _MEAN3)
    chroma = cv2.transform(cv2.absdiff(shift, cv2.merge([gain, gain, gain])), _MEAN3)
    err = np.maximum(texture, chroma)
    err[np.abs(gain) > _LOG_GAIN_LIMIT] = 1.0
    return err


LIGHT_TILE = 32       # px: the local-light test runs only on tiles holding a pixel that failed the plain test
_LIGHT_HALO = LIGHT_WINDOW // 2 + 2       # px of context around a tile: the filters' reach (7 + 2)


def light_error_where(a: np.ndarray, b: np.ndarray, need: np.ndarray, tile: int = LIGHT_TILE) -> np.ndarray:
    """light_error of uint8 frames a, b [H, W, 3] where it is needed: float32 [H, W], computed on the runs of
    tile x tile tiles that hold a pixel of need [H, W] bool (with a halo beyond the filters' reach, so it
    equals the full-frame light_error there up to float rounding), +inf elsewhere. A frame where a few
    scattered pixels fail the plain test no longer pays for the whole frame."""
    h, w = need.shape
    out = np.full((h, w), np.inf, np.float32)
    ys, xs = np.arange(0, h, tile), np.arange(0, w, tile)
    hit = np.logical_or.reduceat(np.logical_or.reduceat(need, ys, axis=0), xs, axis=1)
    for i, row in enumerate(hit):
        y0, y1 = int(ys[i]), min(h, int(ys[i]) + tile)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.view(np.uint8), [0]])))
        for j0, j1 in zip(edges[::2], edges[1::2]):           # one run of hit tiles: [j0, j1)
            x0, x1 = int(xs[j0]), min(w, int(j1) * tile)
            cy0, cy1 = max(0, y0 - _LIGHT_HALO), min(h, y1 + _LIGHT_HALO)
            cx0, cx1 = max(0, x0 - _LIGHT_HALO), min(w, x1 + _LIGHT_HALO)
            err = light_error(a[cy0:cy1, cx0:cx1], b[cy0:cy1, cx0:cx1])
            out[y0:y1, x0:x1] = err[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
    return out


def _matched_share(ok: np.ndarray, coords: np.ndarray, care: Callable[[np.ndarray], np.ndarray] | None,
                   partial: bool) -> float:
    """The share of pixels that match frame 0 plainly (ok [h, w] bool), which decides whether the light changed:
    over the whole frame, or, in a box smaller than the frame (partial) with a care region, over the box's
    pixels outside that region (on every 4th row and column): a box is mostly the edited object, whose own
    change (a flower opening) must not read as a change of light."""
    if partial and care is not None:
        ring = ~care(coords[::4, ::4])
        if ring.sum() >= 64:
            return float(ok[::4, ::4][ring].mean())
    return float(ok.mean())


def _fill_from_trusted(coords: np.ndarray, trusted: np.ndarray, grid: np.ndarray, sigma: float = 6.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Displacement (coords - grid) of untrusted pixels replaced by a Gaussian-weighted average of trusted
    neighbours' displacements (normalised convolution, at quarter resolution: the displacement field is
    smooth at this scale): re-acquires pixels after a passing occluder. Returns (filled [H, W, 2], moved
    [H, W] bool: the pixels it replaced; filled is coords elsewhere)."""
    h, w = trusted.shape
    small = (max(1, w // 4), max(1, h // 4))
    keep = trusted.view(np.uint8)
    disp = cv2.copyTo(coords - grid, keep)               # the trusted displacements, 0 elsewhere (a new array)
    num = cv2.GaussianBlur(cv2.resize(disp, small, interpolation=cv2.INTER_AREA), (0, 0), sigma / 4)
    den = cv2.GaussianBlur(cv2.resize(keep.astype(np.float32), small, interpolation=cv2.INTER_AREA), (0, 0), sigma / 4)
    filled_disp = num / np.maximum(den, 1e-6)[..., None]
    den = cv2.resize(den, (w, h), interpolation=cv2.INTER_LINEAR)
    filled = grid + cv2.resize(filled_disp, (w, h), interpolation=cv2.INTER_LINEAR)
    kept = keep | (den < 1e-3).view(np.uint8)
    cv2.copyTo(coords, kept, filled)
    return filled, kept == 0


def _compose(coords: np.ndarray, target: np.ndarray) -> np.ndarray:
    """coords_{t-1} looked up at target [H, W, 2] positions: nearest pixel's trajectory plus the sub-pixel
    offset (locally a translation). Unlike bilinear lookup it never blends the trajectories of two objects
    across a motion boundary, so errors at object edges do not spread frame after frame."""
    snapped = np.round(target)
    out = sample(coords, snapped, nearest=True)
    out += np.subtract(target, snapped, out=snapped)
    return out


def _look_at(look: Callable[[np.ndarray, np.ndarray], np.ndarray], image: np.ndarray, points: np.ndarray
             ) -> np.ndarray:
    """look(image, coords) at points [N, 2] -> [N, C], as one map of rows of 1024 points (remap's maps are
    under 32767 wide)."""
    n = len(points)
    pad = np.zeros((-(-n // 1024) * 1024, 2), np.float32)
    pad[:n] = points
    return look(image, pad.reshape(-1, 1024, 2)).reshape(len(pad), -1)[:n]


def _keep_better(coords: np.ndarray, err: np.ndarray, seen: np.ndarray, cand: np.ndarray, frame: np.ndarray,
                 frame0: np.ndarray, error: Callable[[np.ndarray, np.ndarray], np.ndarray] = patch_error_u8,
                 look: Callable[[np.ndarray, np.ndarray], np.ndarray] = sample, where: np.ndarray | None = None
                 ) -> None:
    """Per pixel, replace coords [H, W, 2], its patch error err [H, W] and frame 0 seen through it (seen
    [H, W, 3], uint8, looked up by `look`) in place by the candidate's where the candidate's patch matches
    frame 0 better (by `error`). where [H, W] bool: the only pixels where cand differs from coords (None: it
    may anywhere); frame 0 is looked up there alone (the same values: a lookup is per pixel)."""
    if where is None:
        cand_seen = look(frame0, cand)
    elif not where.any():
        return                                           # cand is coords: nothing is better
    else:
        cand_seen = seen.copy()
        cand_seen[where] = _look_at(look, frame0, cand[where])
    cand_err = error(frame, cand_seen)
    better = (cand_err < err).view(np.uint8)            # OpenCV's masked copy: ~9x numpy's broadcast copyto
    cv2.copyTo(cand, better, coords)
    cv2.copyTo(cand_err, better, err)
    cv2.copyTo(cand_seen, better, seen)


def _direct(anchor: FlowFn, gray: np.ndarray, gray0: np.ndarray, coords: np.ndarray, grid: np.ndarray,
            box: Box) -> np.ndarray:
    """Direct flow t -> 0 of the box's pixels, seeded by the chain: coords, grid [bh, bw, 2] (the box's) ->
    their positions in frame 0 [bh, bw, 2]. On a box smaller than the frame, DIS runs between the box of frame
    t and the window of frame 0 of the same size that the box's median displacement points at (kept inside
    frame 0), so its cost is the box's, not the frame's."""
    y0, y1, x0, x1 = box
    h, w = gray.shape
    if (y1 - y0, x1 - x0) == (h, w):
        return grid + anchor(gray, gray0, coords - grid)
    disp = coords - grid
    dx, dy = np.median(disp.reshape(-1, 2), 0)
    ox = int(np.clip(round(x0 + float(dx)), 0, w - (x1 - x0)))
    oy = int(np.clip(round(y0 + float(dy)), 0, h - (y1 - y0)))
    offset = np.array([ox - x0, oy - y0], np.float32)
    window = gray0[oy:oy + y1 - y0, ox:ox + x1 - x0]
    return grid + offset + anchor(np.ascontiguousarray(gray[y0:y1, x0:x1]), np.ascontiguousarray(window),
                                  disp - offset)


def dis_backend(quality: str, seeded: bool = False) -> FlowFn:
    """The default flow: OpenCV DIS at `quality` (one estimator per call site: they are not thread-safe);
    seeded: the estimator tuned to refine a given initial guess (dis.DenseFlow)."""
    return DenseFlow(quality, seeded).flow


def track_frames(frames: Iterable[np.ndarray], quality: str = "medium", anchor_refine: bool = True,
                 match_tolerance: float = 0.06, chain_quality: str | None = None,
                 chain_flow: FlowFn | None = None, light_tolerant: bool = True, threaded: bool = True,
                 cheap_anchor: bool = True, anchor_every: int = 2, fixed_point: bool = True,
                 care: Callable[[np.ndarray], np.ndarray] | None = None,
                 focus: Callable[[], Box | None] | None = None) -> Iterator[tuple[np.ndarray, Track]]:
    """frames: uint8 [H, W, 3] each, any iterable (a decoder). Yields (frame, Track) per frame, frame 0 first.

    Each frame: chain the previous map along the backward flow t -> t-1 (DIS at chain_quality, or
    chain_flow); then, per pixel, keep the best of (chained, displacement filled in from trusted neighbours,
    direct flow t -> 0 at `quality` seeded with the chain) by how well the local patch matches frame 0. The
    direct flow removes the chain's drift (textured square moving 3.4 px per frame, 12 frames: median error
    0.22 px, 2.3 px with the chain alone); a cheaper chain (fast, ultrafast) seeds it worse on real motion
    (synthetic disc IoU 0.38 at fast vs 0.70 at medium), so chain_quality defaults to quality. A pixel is
    trusted (valid) when that patch error is below match_tolerance (0..1 grey levels): drift-free, and
    occluders fail it. light_tolerant: in a frame where most pixels fail the plain test (the light changed),
    candidates are compared, and trusted, by the lighting-normalised light_error (under match_tolerance / 2);
    in any other frame a pixel that fails the plain test is still trusted when it passes that one (a shadow
    on the object alone: too few pixels change for the frame-wide switch).

    threaded: the chain's flow on its own DIS estimator in a worker thread, one frame ahead. Off: one
    estimator for both flows, in turn (the first release's sequence). DIS keeps state between calls (a flow
    after a seeded call differs by up to 4 px from a fresh one), so the two give different tracks; on
    bmx-trees the masks room's flow fallback scores IoU 0.189 threaded, 0.143 sequential.

    cheap_anchor: the direct flow by DIS tuned for a seed (dis.DenseFlow seeded: same scales, sparser
    patches, fewer iterations, no variational refinement; about 40 % of the time at medium), seeded by the
    chain at `quality`: the seed already holds the large motion, the anchor only removes the drift. The
    engine's default; the masks room's follower keeps the full anchor (track_to_first: a cheaper anchor lost
    IoU on bmx-trees there, 0.189 -> 0.113). anchor_every: the direct flow on every k-th frame only (and the
    last); in between the chain (and the fill) carry the track, re-anchored k frames later. fixed_point:
    frame 0 is looked up through remap's fixed-point maps (dis.sample_u8, 1/32 px: faster), else through
    float maps (dis.sample, the masks room's follower). care(coords) -> [H, W] bool: where the caller reads
    valid (e.g. near the carried edit region); the local-light test runs only there, elsewhere valid is the
    plain test's (None: everywhere); it gets the coords of the frame's box. focus() -> Box or None, asked
    before each frame after frame 0: track that frame only inside the box (None: the whole frame); every
    per-pixel step, the direct flow included, then costs the box's share of the frame. Outside the box the
    Track keeps the previous coords and seen and is not valid; the chained flow stays whole-frame (what
    the box reads of the previous track may lie just outside the previous box: give the box a margin of the
    motion's reach)."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        return
    h, w = first.shape[:2]
    anchor = dis_backend(quality, cheap_anchor) if anchor_refine else None
    shared = (not threaded and chain_flow is None and chain_quality in (None, quality) and anchor is not None
              and not cheap_anchor)
    chain = chain_flow or (anchor if shared else dis_backend(chain_quality or quality))
    grid = identity_grid(h, w)
    look = sample_u8 if fixed_point else sample
    frame0, gray0 = first, to_gray(first)
    coords, valid, seen = grid.copy(), np.ones((h, w), bool), None
    yield first, Track(coords, valid)

    def pair_flow(frame: np.ndarray, prev_gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gray = to_gray(frame)
        return gray, chain(gray, prev_gray, None)

    with ThreadPoolExecutor(1, thread_name_prefix="ffp-flow") as pool:
        cur, t = next(it, None), 0
        job = pool.submit(pair_flow, cur, gray0) if cur is not None and threaded else None
        prev_gray = gray0
        while cur is not None:
            gray, flow = job.result() if threaded else pair_flow(cur, prev_gray)
            nxt = next(it, None)                           # decode the next frame while its flow is computed
            if nxt is not None and threaded:
                job = pool.submit(pair_flow, nxt, gray)
            prev_gray = gray
            t += 1
            box = (focus() if focus is not None else None) or (0, h, 0, w)
            y0, y1, x0, x1 = box
            whole = (y1 - y0, x1 - x0) == (h, w)
            g, fr = grid[y0:y1, x0:x1], cur[y0:y1, x0:x1]
            c = _compose(coords, g + flow[y0:y1, x0:x1])   # the box's pixels; the previous track read anywhere
            s = look(frame0, c)                            # frame 0 seen through the track, kept in step with it
            err = patch_error_u8(fr, s)
            filled, moved = _fill_from_trusted(c, err < match_tolerance, g)
            anchored = anchor is not None and (t % max(1, anchor_every) == 0 or nxt is None)
            direct = _direct(anchor, gray, gray0, c, g, box) if anchored else None   # seeded by the chain
            relit = light_tolerant and _matched_share(err < match_tolerance, c, care, not whole) < RELIT_SHARE
            if relit:                                      # the light changed: compare lighting-normalised
                err = light_error(fr, s)
            for cand, where in ((filled, moved), (direct, None)):
                if cand is not None:
                    _keep_better(c, err, s, cand, fr, frame0, light_error if relit else patch_error_u8, look, where)
            v = err < (match_tolerance / 2 if relit else match_tolerance)
            ins = inside(c, h, w)
            if light_tolerant and not relit and not v.all():   # local light: a shadow on the object alone
                need = ~v & ins if care is None else ~v & ins & care(c)
                v |= light_error_where(fr, s, need) < match_tolerance / LOCAL_LIGHT
            v &= ins
            if whole:
                coords, valid, seen, box = c, v, s, None
            else:
                coords = coords.copy()
                coords[y0:y1, x0:x1] = c
                valid = np.zeros((h, w), bool)
                valid[y0:y1, x0:x1] = v
                seen = (frame0 if seen is None else seen).copy()
                seen[y0:y1, x0:x1] = s
            yield cur, Track(coords, valid, flow, seen, box)
            cur = nxt


class _Indexed:
    """frames[t] for t in range(len) as an iterator (array-likes that only support indexing)."""

    def __init__(self, frames):
        self.frames = frames

    def __iter__(self):
        return (self.frames[t] for t in range(self.frames.shape[0]))


def track_to_first(frames: np.ndarray, quality: str = "medium", anchor_refine: bool = True,
                   match_tolerance: float = 0.06, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None, light_tolerant: bool = False,
                   threaded: bool = True) -> Iterator[Track]:
    """frames: uint8 [T, H, W, 3] (or anything with .shape and frames[t]). Yields one Track per frame, frame 0
    first (identity); see track_frames (light_tolerant off by default: the masks room's re-acquisition is
    tuned on the plain test; the full-preset anchor, not cheap_anchor; float lookups, not fixed_point)."""
    t_len = frames.shape[0]
    tracks = track_frames(_Indexed(frames), quality, anchor_refine, match_tolerance, light_tolerant=light_tolerant,
                          threaded=threaded, cheap_anchor=False, anchor_every=1, fixed_point=False)
    for t, (_, track) in enumerate(tracks):
        yield track
        if t:
            report(on_step, should_stop, t, t_len - 1)
