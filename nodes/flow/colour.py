"""An edit that is a colour change, as one affine RGB map: fit it on frame 1, apply it to any frame's pixels.

A recolour carried as a map of the current frame's own pixels needs no pixel-to-pixel correspondence with
frame 1, only the region: it survives motion blur, fast motion and light changes (the map is linear in the
pixel, so a darker frame gives a darker recolour) where a carried per-pixel delta is lost as soon as the
track misses. numpy arrays, RGB float32 0..1."""

from __future__ import annotations

import numpy as np

SAMPLES = 20000       # about this many pixels of the region are the map fit to
TOLERANCE = 0.05      # a pixel is explained by the map when its largest channel error is under this
EXPLAINED = 0.85      # the edit is a colour change when the map explains this share of the region
KEEPS_DETAIL = 0.25   # ... and the map's largest gain (singular value) is at least this: a fill (gain ~0) is not


def fit_colour_map(src: np.ndarray, edit: np.ndarray, region: np.ndarray, iters: int = 5
                   ) -> tuple[np.ndarray, float]:
    """Affine map A [3, 4] with edit ~= A [src, 1] inside region [H, W] bool (robust: IRLS, Cauchy weights),
    and the share of the region's pixels it explains (largest channel error under TOLERANCE; 0 when the map
    flattens the source's detail, its largest gain under KEEPS_DETAIL: a solid fill is a new shape, not a
    colour change). Deterministic: a regular subsample, no randomness."""
    idx = np.flatnonzero(region)
    if len(idx) < 16:
        return np.concatenate([np.eye(3), np.zeros((3, 1))], 1).astype(np.float32), 0.0
    idx = idx[::max(1, len(idx) // SAMPLES)]
    x = np.concatenate([src.reshape(-1, 3)[idx], np.ones((len(idx), 1), np.float32)], 1).astype(np.float64)
    y = edit.reshape(-1, 3)[idx].astype(np.float64)
    w = np.ones(len(idx))
    a = np.zeros((3, 4))
    for _ in range(iters):
        xw = x * w[:, None]
        a = np.linalg.solve(xw.T @ x + 1e-6 * np.eye(4), xw.T @ y).T
        r = np.abs(x @ a.T - y).max(1)
        w = 1.0 / (1.0 + (r / TOLERANCE) ** 2)
    pred = np.clip(apply_colour_map(a.astype(np.float32), src[region].reshape(-1, 1, 3)).reshape(-1, 3), 0, 1)
    share = float((np.abs(pred - edit[region]).max(1) < TOLERANCE).mean())
    if np.linalg.svd(a[:, :3], compute_uv=False)[0] < KEEPS_DETAIL:
        share = 0.0
    return a.astype(np.float32), share


def apply_colour_map(a: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """rgb float32 [..., H, W, 3] through the affine colour map a [3, 4] (not clipped)."""
    return rgb @ a[:, :3].T + a[:, 3]

