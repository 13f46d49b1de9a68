"""Parts of the source's object that the edit removed: found on frame 1 and as the clip reveals them.

Where the edited frame shows background instead of the source's object (a removal, or the part of an old
shape a new one does not cover), carrying the edit along the object's track paints a window of frame 1's
background that moves with the object, or, where the track slips, lets the old object show through: its ghost.
Such pixels are carried with the background's motion instead (nodes/flow/engine.py). Two tests find them:

- frame 1 alone: the edit's 5x5 patch matches the background inpainted from outside the region, and the
  source's does not (smooth backgrounds);
- the clip: where the object has moved away, the background behind its frame-1 place shows in frame t
  (a tracked pixel outside frame t's region that lands inside frame 1's). Where that background matches the
  edit and not the source, the edit removed the object there; where it matches neither, the edit put
  something new there; where it matches the source, nothing was there to remove (an insertion). Once enough
  of the region has been seen this way and nearly all of it matched (REMOVAL_SHARE), the whole region counts
  as removed except where it did not match: a removal of the whole object.

State is a few frame-sized maps: memory does not grow with the clip. numpy, RGB float32 0..1 unless named u8."""

from __future__ import annotations

import cv2
import numpy as np

from .dis import sample
from .track import light_error, patch_error

REMOVED_TOL = 0.05      # frame 1: an edited patch this close to the inpainted background shows background ...
REMOVED_GAIN = 0.5      # ... when it is also closer than this share of the source's distance to it
SEEN_TOL = 0.045        # the clip: the revealed background matches the edit within this patch error
SEEN_ENOUGH = 0.15      # a whole-object removal is decided once this share of the region has been revealed ...
REMOVAL_SHARE = 0.2     # ... and less than this share of what was revealed disagrees with the edit


def _inpaint(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """float32 RGB image with hole [H, W] bool (grown 2 px) filled from its surroundings (OpenCV Telea)."""
    u8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    grown = cv2.dilate(hole.astype(np.uint8), np.ones((5, 5), np.uint8))
    return cv2.inpaint(u8, grown, 5, cv2.INPAINT_TELEA).astype(np.float32) * np.float32(1 / 255)


class Removal:
    """The removed part of frame 1's region [H, W] bool, for an edit [H, W, 3] of src0 [H, W, 3].

    removed: [H, W] float32 in {0, 1} inside the region, and up to rim px beyond it the value of the nearest
    region pixel (a track that slips just outside the region still reads its part's answer; rim: the
    engine's mask_grow + feather + 1); removed_far: the same without the rim's limit (for pixels known to
    belong to the edited object: inside frame t's given mask); background [H, W, 3]: frame
    1's background, the edit with the parts it kept inpainted, overwritten by the real background where the
    clip revealed it. any: some part counts as removed."""

    def __init__(self, src0: np.ndarray, edit: np.ndarray, region: np.ndarray, rim: int = 8):
        self.region = region
        self.area = int(region.sum())
        self.edit_u8 = (np.clip(edit, 0, 1) * 255 + 0.5).astype(np.uint8)
        self.src_u8 = (np.clip(src0, 0, 1) * 255 + 0.5).astype(np.uint8)
        guess = _inpaint(edit, region)
        d_edit, d_src = patch_error(edit, guess), patch_error(src0, guess)
        first = ((d_edit < REMOVED_TOL) & (d_edit < REMOVED_GAIN * d_src) & region).astype(np.uint8)
        self.first = cv2.morphologyEx(first, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        kept = region & ~self.first
        self.background = _inpaint(edit, kept) if kept.any() else np.ascontiguousarray(edit, np.float32)
        self.seen_ok = np.zeros(region.shape, bool)
        self.seen_bad = np.zeros(region.shape, bool)
        self.seen_plain = np.zeros(region.shape, bool)
        dist, labels = cv2.distanceTransformWithLabels((~region).astype(np.uint8), cv2.DIST_L2, 5,
                                                    labelType=cv2.DIST_LABEL_PIXEL)
        self._labels = labels                          # DIST_LABEL_PIXEL numbers the region's pixels 1.. row by row
        self._near = dist <= rim
        self._ys, self._xs = np.nonzero(region)
        self.whole = False
        self._refresh()

    def _refresh(self) -> None:
        whole = self.region & ~self.seen_plain if self.whole else False   # not where the source showed background
        removed = (self.first | self.seen_ok | whole) & ~self.seen_bad
        lut = np.zeros(len(self._ys) + 1, np.float32)
        lut[1:] = removed[self._ys, self._xs]
        self.removed_far = np.ascontiguousarray(lut[self._labels])
        self.removed = self.removed_far * self._near
        self.any = bool(removed.any())

    def share(self) -> float:
        """Share of the region that counts as removed now."""
        return float(self.removed[self.region].mean()) if self.area else 0.0

    def observe(self, frame: np.ndarray, coords: np.ndarray, outside: np.ndarray) -> None:
        """Frame t (uint8 [H, W, 3]) with its track coords [H, W, 2] into frame 1; outside [H, W] bool: pixels
        trusted to show background in frame t (tracked, away from frame t's region). Those that land inside
        frame 1's region reveal the background there: compared with the edit, stored in background."""
        q = np.round(coords).astype(np.int32)
        h, w = self.region.shape
        np.clip(q[..., 0], 0, w - 1, out=q[..., 0])
        np.clip(q[..., 1], 0, h - 1, out=q[..., 1])
        hit = outside & self.region[q[..., 1], q[..., 0]]
        if not hit.any():
            return
        err = light_error(frame, sample(self.edit_u8, coords))   # the light has moved since frame 1
        was = light_error(frame, sample(self.src_u8, coords))    # the source there: background too (no removal)
        ys, xs = np.nonzero(hit)
        qx, qy = q[ys, xs, 0], q[ys, xs, 1]
        ok = err[ys, xs] < SEEN_TOL
        plain = was[ys, xs] < SEEN_TOL                   # nothing was removed here: neither answer
        new = ~(self.seen_ok[qy, qx] | self.seen_bad[qy, qx]) & ~plain
        self.seen_plain[qy[plain], qx[plain]] = True
        self.seen_ok[qy[ok & new], qx[ok & new]] = True
        self.seen_bad[qy[~ok & new], qx[~ok & new]] = True
        bad = ~ok & new
        self.background[qy[bad], qx[bad]] = frame[ys[bad], xs[bad]].astype(np.float32) * np.float32(1 / 255)
        n_ok, n_bad = int(self.seen_ok.sum()), int(self.seen_bad.sum())
        self.whole = n_ok + n_bad >= SEEN_ENOUGH * self.area and n_bad < REMOVAL_SHARE * (n_ok + n_bad)
        self._refresh()
