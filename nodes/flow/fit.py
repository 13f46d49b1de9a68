"""Robust affine motion fits (IRLS, deterministic) and the smooth piecewise-affine warp built from them.

Points are float arrays [N, 2] (x, y). An affine A [2, 3] maps p -> A @ [p, 1]."""

from __future__ import annotations

import numpy as np

IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], np.float64)


def fit_affine(src: np.ndarray, dst: np.ndarray, prior: np.ndarray | None = None, prior_weight: float = 0.0,
               iters: int = 6, scale: float = 1.5) -> np.ndarray | None:
    """Affine [2, 3] with dst ~= A [src, 1], by iteratively reweighted least squares with Cauchy weights
    (residual scale `scale` px): outliers (other objects, flow errors) get ~no say. prior: an affine the fit
    is pulled towards with prior_weight (points' worth). None when fewer than 6 points."""
    if len(src) < 6:
        return None if prior is None else prior.copy()
    x = np.concatenate([src, np.ones((len(src), 1))], 1).astype(np.float64)
    y = dst.astype(np.float64)
    w = np.ones(len(src))
    span = max(float(np.ptp(src[:, 0])), float(np.ptp(src[:, 1])), 1.0)
    a = IDENTITY.copy()
    for _ in range(iters):
        xw = x * w[:, None]
        lhs, rhs = xw.T @ x, xw.T @ y
        if prior is not None and prior_weight > 0:
            reg = prior_weight * np.diag([span ** 2, span ** 2, 1.0])
            lhs, rhs = lhs + reg, rhs + reg @ prior.T
        try:
            a = np.linalg.solve(lhs + 1e-9 * np.eye(3), rhs).T
        except np.linalg.LinAlgError:
            return None if prior is None else prior.copy()
        r2 = np.sum((x @ a.T - y) ** 2, 1)
        w = 1.0 / (1.0 + r2 / scale ** 2)
    return a


def apply(a: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """[N, 2] points through affine a [2, 3]."""
    return pts @ a[:, :2].T + a[:, 2]


def invert(a: np.ndarray) -> np.ndarray:
    """Inverse of an affine [2, 3]."""
    m = np.linalg.inv(a[:, :2])
    return np.concatenate([m, -m @ a[:, 2:]], 1)


class PieceFit:
    """A piecewise-affine map over a box of frame 0: a global affine plus one per cell of a g x g grid
    (pulled towards the global one), blended with bilinear weights over the cell centres, so the map is
    continuous: the layer it moves bends but never tears."""

    def __init__(self, box: tuple[float, float, float, float], cells: int = 2):
        self.x0, self.y0, self.x1, self.y1 = box
        self.cells = cells

    def _cell(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous cell coordinates (0..g-1) of frame-0 points q [N, 2]."""
        g = self.cells
        u = (q[:, 0] - self.x0) / max(self.x1 - self.x0, 1e-6) * g - 0.5
        v = (q[:, 1] - self.y0) / max(self.y1 - self.y0, 1e-6) * g - 0.5
        return np.clip(u, 0, g - 1), np.clip(v, 0, g - 1)

    def fit(self, p: np.ndarray, q: np.ndarray) -> list[np.ndarray] | None:
        """Fit frame t points p -> frame 0 points q. Returns [global, cell 0, ...] affines, or None."""
        glob = fit_affine(p, q)
        if glob is None:
            return None
        out = [glob]
        u, v = self._cell(q)
        iu, iv = np.round(u).astype(int), np.round(v).astype(int)
        for cy in range(self.cells):
            for cx in range(self.cells):
                sel = (iu == cx) & (iv == cy)
                out.append(fit_affine(p[sel], q[sel], glob, prior_weight=max(20.0, 0.05 * len(p))))
        return out

    def map(self, affines: list[np.ndarray], p: np.ndarray) -> np.ndarray:
        """Frame t points p [N, 2] -> frame 0, blending the cells' affines by where p's global image falls."""
        g = self.cells
        q = apply(affines[0], p)
        if g == 1:
            return q
        u, v = self._cell(q)
        u0, v0 = np.minimum(np.floor(u).astype(int), g - 2), np.minimum(np.floor(v).astype(int), g - 2)
        fu, fv = u - u0, v - v0
        out = np.zeros_like(q)
        for dy, wy in ((0, 1 - fv), (1, fv)):
            for dx, wx in ((0, 1 - fu), (1, fu)):
                idx = (v0 + dy) * g + (u0 + dx)
                for k in np.unique(idx):
                    sel = idx == k
                    out[sel] += (wy * wx)[sel, None] * apply(affines[1 + k], p[sel])
        return out


def _ecc(template: np.ndarray, image: np.ndarray, init: np.ndarray) -> np.ndarray | None:
    """OpenCV ECC affine registration: A [2, 3] with template(x) ~= image(A x), from init; None when it fails.
    Template pixels that A maps outside image do not count (an object leaving the frame)."""
    import cv2

    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
    try:
        _, a = cv2.findTransformECC(template, image, init.astype(np.float32), cv2.MOTION_AFFINE, crit, None, 1)
    except cv2.error:
        return None
    a = a.astype(np.float64)
    return a if np.all(np.isfinite(a)) and abs(np.linalg.det(a[:, :2])) > 1e-3 else None


def overlap(a: np.ndarray, m0: np.ndarray, mt: np.ndarray) -> float:
    """IoU of frame t's mask mt [H, W] with frame 0's m0 moved by a (frame t -> frame 0 affine), counting only
    pixels that a maps inside frame 0."""
    import cv2

    h, w = m0.shape
    moved = cv2.warpAffine(m0, a, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=-1.0)
    ok = moved >= 0
    p, q = moved[ok] > 0.5, mt[ok] > 0.5
    union = int((p | q).sum())
    return float((p & q).sum()) / union if union else 0.0


MASK_SIDE = 160        # px: mask_motion registers masks at most this large (ECC at 832x480: 0.44 s per frame)


def _rescale(a: np.ndarray, s: float) -> np.ndarray:
    """An affine [2, 3] of full-size pixels as the same motion in pixels scaled by s (pixel centres kept)."""
    h = 0.5 * (s - 1)                                  # x_small = s * x + h
    out = a.copy()
    out[:, 2] = s * a[:, 2] + h - a[:, :2] @ np.array([h, h])
    return out


def mask_motion(m0: np.ndarray, mt: np.ndarray, candidates: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The region's motion frame t -> frame 0 from its masks m0, mt [H, W] float32 (0..1): each candidate
    affine [2, 3] (e.g. the previous frame's, a fit to the flow) and ECC registrations of the masks started
    from it, both ways (frame t onto 0, and 0 onto t inverted: pixels leaving the frame drop out); the one
    whose moved m0 overlaps mt best. Registered at most MASK_SIDE px large. Returns (affine, its overlap)."""
    import cv2

    s = min(1.0, MASK_SIDE / max(m0.shape))
    if s < 1:
        size = (max(1, round(m0.shape[1] * s)), max(1, round(m0.shape[0] * s)))
        s = size[0] / m0.shape[1]
        m0, mt = (cv2.resize(m, size, interpolation=cv2.INTER_AREA) for m in (m0, mt))
        candidates = [_rescale(c, s) for c in candidates]
    tried = []
    for c in candidates:
        tried.append(c)
        fwd = _ecc(mt, m0, c)
        if fwd is not None:
            tried.append(fwd)
        rev = _ecc(m0, mt, invert(c))
        if rev is not None:
            tried.append(invert(rev))
    scores = [overlap(a, m0, mt) for a in tried]
    best = int(np.argmax(scores))
    return (tried[best] if s == 1 else _rescale(tried[best], 1 / s)), scores[best]
