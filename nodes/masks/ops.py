"""Mask operations (torch/OpenCV, no ComfyUI), exact on pixel grids. Masks [T, H, W] (or [H, W]) in 0..1,
1 = region; binary ops threshold at 0.5 and return {0, 1} float; feather and mean smoothing return soft masks.

The conversion to Wan's keep-mask (1 = keep) is nodes/video/frames.edit_to_keep / wan_mask_channels."""

from __future__ import annotations

import cv2
import numpy as np
import torch

OPS = ("loose_box", "dilate", "erode", "feather", "convex_hull", "smooth_majority", "smooth_mean", "invert",
       "threshold")
COMBINE = ("union", "intersection", "difference")


def _frames(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be [T, H, W] (ComfyUI MASK) or [H, W]; got {shape}.")
    if not torch.isfinite(mask).all():
        raise ValueError("mask has NaN/inf values.")
    return (mask[None], True) if mask.ndim == 2 else (mask, False)


def _binary(mask: torch.Tensor) -> np.ndarray:
    return (mask.detach().float().cpu() >= 0.5).numpy().astype(np.uint8)


def _out(array: np.ndarray, squeeze: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array)).float()
    return t[0] if squeeze else t


def disc(radius: int) -> np.ndarray:
    """Structuring element: every pixel within Euclidean distance `radius` of the centre, [2r+1, 2r+1] uint8."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ((x * x + y * y) <= radius * radius).astype(np.uint8)


def loose_box(mask: torch.Tensor, expand: float = 0.1, min_area: int = 50) -> torch.Tensor:
    """LoRA-Edit's loose mask: per frame, each 8-connected component's bounding box (w x h pixels), dropped when
    w*h < min_area, grown by floor(w*expand/2) px left and right and floor(h*expand/2) px top and bottom
    (expand 0.1 = +10 %: 5 % each side), clipped to the frame, filled."""
    if expand < 0 or min_area < 0:
        raise ValueError(f"expand and min_area must be >= 0; got {expand}, {min_area}.")
    m, squeeze = _frames(mask)
    binary = _binary(m)
    out = np.zeros_like(binary)
    h, w = binary.shape[1:]
    for t, frame in enumerate(binary):
        n, _, stats, _ = cv2.connectedComponentsWithStats(frame, connectivity=8)
        for x, y, bw, bh, _area in stats[1:n]:
            if bw * bh < min_area:
                continue
            px, py = int(bw * expand / 2), int(bh * expand / 2)
            out[t, max(0, y - py):min(h, y + bh + py), max(0, x - px):min(w, x + bw + px)] = 1
    return _out(out, squeeze)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow by `radius` px: a pixel is set when a set pixel lies within Euclidean distance radius."""
    return _morph(mask, radius, cv2.dilate, outside=0, other="erode to shrink")


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Shrink by `radius` px: a pixel stays set when every pixel within distance radius is set (the frame border
    does not erode: outside the frame counts as set)."""
    return _morph(mask, radius, cv2.erode, outside=1, other="dilate to grow")


def _morph(mask: torch.Tensor, radius: int, op, outside: int, other: str) -> torch.Tensor:
    """Binary morphology op (cv2.dilate / cv2.erode) with a disc of `radius`, frame by frame; pixels outside the
    frame count as `outside`."""
    m, squeeze = _frames(mask)
    if radius < 0:
        raise ValueError(f"radius must be >= 0; got {radius} (use {other}).")
    binary = _binary(m)
    if radius == 0:
        return _out(binary, squeeze)
    k = disc(radius)
    return _out(np.stack([op(f, k, borderType=cv2.BORDER_CONSTANT, borderValue=outside) for f in binary]), squeeze)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft edge outside the region: max(mask, Gaussian blur with sigma radius/2) -> 1 inside, fading to ~0 about
    `radius` px outside. radius 0 = unchanged."""
    m, squeeze = _frames(mask)
    if radius < 0:
        raise ValueError(f"radius must be >= 0; got {radius}.")
    arr = m.detach().float().cpu().clamp(0, 1).numpy()
    if radius == 0:
        return _out(arr, squeeze)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), radius / 2, borderType=cv2.BORDER_REPLICATE) for f in arr])
    return _out(np.clip(np.maximum(blurred, arr), 0, 1), squeeze)


def convex_hull(mask: torch.Tensor) -> torch.Tensor:
    """Per frame, the filled convex hull of all set pixels (pixel centres; hull pixels included)."""
    m, squeeze = _frames(mask)
    binary = _binary(m)
    out = np.zeros_like(binary)
    for t, frame in enumerate(binary):
        pts = cv2.findNonZero(frame)
        if pts is None:
            continue
        cv2.fillConvexPoly(out[t], cv2.convexHull(pts), 1)
        out[t] |= frame
    return _out(out, squeeze)


def temporal_smooth(mask: torch.Tensor, window: int, mode: str = "majority") -> torch.Tensor:
    """Smooth over time with a centred window of `window` frames (odd; clip ends repeat the edge frame).
    majority: a pixel is set when more than half of the window has it set; mean: the window's average."""
    m, squeeze = _frames(mask)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of frames >= 1; got {window}.")
    if mode not in ("majority", "mean"):
        raise ValueError(f"mode must be 'majority' or 'mean'; got '{mode}'.")
    x = (m.float() >= 0.5).float() if mode == "majority" else m.float().clamp(0, 1)
    if window == 1 or m.shape[0] == 1:
        return x[0] if squeeze else x
    r = window // 2
    padded = torch.cat([x[:1].expand(r, -1, -1), x, x[-1:].expand(r, -1, -1)], 0)   # [T + 2r, H, W]
    mean = padded.unfold(0, window, 1).mean(-1)                                      # [T, H, W]
    out = (mean > 0.5).float() if mode == "majority" else mean
    return out[0] if squeeze else out


def invert(mask: torch.Tensor) -> torch.Tensor:
    m, squeeze = _frames(mask)
    out = 1.0 - m.float().clamp(0, 1)
    return out[0] if squeeze else out


def threshold(mask: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    m, squeeze = _frames(mask)
    out = (m.float() >= level).float()
    return out[0] if squeeze else out


def apply_op(mask: torch.Tensor, op: str, pixels: int = 0, expand: float = 0.1, min_area: int = 50,
             window: int = 3, level: float = 0.5) -> torch.Tensor:
    """One operation by name (the FFPMaskOps node): pixels = radius for dilate/erode/feather."""
    if op == "loose_box":
        return loose_box(mask, expand, min_area)
    if op == "dilate":
        return dilate(mask, pixels)
    if op == "erode":
        return erode(mask, pixels)
    if op == "feather":
        return feather(mask, pixels)
    if op == "convex_hull":
        return convex_hull(mask)
    if op in ("smooth_majority", "smooth_mean"):
        return temporal_smooth(mask, window, op.split("_")[1])
    if op == "invert":
        return invert(mask)
    if op == "threshold":
        return threshold(mask, level)
    raise ValueError(f"unknown mask op '{op}'; use one of {OPS}.")


def combine(a: torch.Tensor, b: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Soft set operations on [T, H, W] masks (one side may have 1 frame: broadcast): union = max,
    intersection = min, difference = a and not b = min(a, 1 - b)."""
    a, sa = _frames(a)
    b, sb = _frames(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks differ in size: {a.shape[2]}x{a.shape[1]} vs {b.shape[2]}x{b.shape[1]} (WxH). "
                         "Resize one to the other first.")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"masks have {a.shape[0]} and {b.shape[0]} frames; give equal counts or one single mask.")
    a, b = a.float().clamp(0, 1), b.float().clamp(0, 1)
    if mode == "union":
        out = torch.maximum(a, b)
    elif mode == "intersection":
        out = torch.minimum(a, b)
    elif mode == "difference":
        out = torch.minimum(a, 1 - b)
    else:
        raise ValueError(f"unknown combine mode '{mode}'; use one of {COMBINE}.")
    return out[0] if (sa and sb) else out
