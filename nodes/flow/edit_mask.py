"""The edit region of frame 1, derived from the difference between the edited and the source frame.

Image editors and re-encoding change more than the edit: a strip of noise along the frame border, and a faint
change everywhere (recompression). Both are dropped, and what was dropped is said."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

BORDER = 0.015          # of the frame's longer side (at least 3 px): the band where editor noise lives
MIN_AREA = 0.0002       # of the frame (at least 12 px): smaller regions are specks
STRONG = 1.5            # a kept region's mean difference reaches STRONG x the threshold, or it is large
LARGE = 0.01            # of the frame: a region this big is kept whatever its mean difference


@dataclass(frozen=True)
class DerivedMask:
    """mask [H, W] float {0, 1}; ignored: what was dropped, in words ('' when nothing)."""

    mask: torch.Tensor
    ignored: str


def derive_mask(source_first: torch.Tensor, edited_first: torch.Tensor, threshold: float) -> DerivedMask:
    """Where the edited first frame [H, W, 3] differs from the source's: [H, W] in {0, 1}, cleaned.

    Per-pixel max channel difference, lightly blurred, thresholded and opened; regions that lie (almost)
    within the border band, and small faint ones (mean difference under STRONG x threshold), are dropped;
    the rest grows by up to 3 px into pixels over threshold/2 (hysteresis) and is closed. Raises when
    nothing is left."""
    diff = (edited_first.float() - source_first.float()).abs().amax(-1).numpy().astype(np.float32)
    diff = cv2.GaussianBlur(diff, (5, 5), 0)
    h, w = diff.shape
    strong = (diff > threshold).astype(np.uint8)
    strong = cv2.morphologyEx(strong, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
    band = max(3, round(BORDER * max(h, w)))
    inner = np.zeros((h, w), bool)
    inner[band:h - band, band:w - band] = True
    inner_area = np.bincount(labels.ravel(), inner.ravel(), n)
    mean_diff = np.bincount(labels.ravel(), diff.ravel(), n) / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    min_area = max(12, MIN_AREA * h * w)
    keep = np.zeros(n, bool)
    border_px = faint_px = 0
    for k in range(1, n):
        area = stats[k, cv2.CC_STAT_AREA]
        if inner_area[k] < min_area:
            border_px += area
        elif mean_diff[k] < STRONG * threshold and area < LARGE * h * w:
            faint_px += area
        else:
            keep[k] = True
    kept = keep[labels].astype(np.uint8)
    weak = (diff > threshold / 2).astype(np.uint8)      # hysteresis: the soft rim of a kept region, 3 px at most
    mask = kept | (cv2.dilate(kept, np.ones((7, 7), np.uint8)) & weak)
    mask[~inner] &= kept[~inner]
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    if not mask.any():
        what = f" (ignored: {_ignored(border_px, faint_px, h * w, band, threshold)})" if border_px or faint_px else ""
        raise ValueError(f"the edited first frame matches the source's frame 1 (largest colour difference "
                         f"{float(diff.max()):.3f}, mask_threshold {threshold}){what}; nothing to propagate. "
                         "Check you connected the edited image, lower mask_threshold, or connect an edit_mask.")
    ignored = _ignored(border_px, faint_px, h * w, band, threshold) if border_px or faint_px else ""
    return DerivedMask(torch.from_numpy(mask.astype(np.float32)), ignored)


def _ignored(border_px: int, faint_px: int, total: int, band: int, threshold: float) -> str:
    parts = []
    if border_px:
        parts.append(f"{border_px} px ({border_px / total:.2%}) of changes within {band} px of the frame border "
                     "(image-editor noise)")
    if faint_px:
        parts.append(f"{faint_px} px ({faint_px / total:.2%}) of faint changes (mean difference under "
                     f"{STRONG * threshold:.3f}: recompression)")
    return "; ".join(parts)


def derive_edit_mask(source_first: torch.Tensor, edited_first: torch.Tensor, threshold: float) -> torch.Tensor:
    """derive_mask's mask only: [H, W] in {0, 1}."""
    return derive_mask(source_first, edited_first, threshold).mask
