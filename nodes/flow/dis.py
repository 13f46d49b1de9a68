"""Dense optical flow (OpenCV DIS) and the warping maths around it. numpy arrays, [H, W, 2] flows (dx, dy).

A flow `f` from frame a to frame b says: pixel x of a is at x + f(x) in b."""

from __future__ import annotations

import cv2
import numpy as np

QUALITY = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
           "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def to_gray(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 grey [H, W]."""
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


SEEDED = {"medium": (4, 16), "fast": (5, 12), "ultrafast": (5, 12)}
"""seeded=True: (patch stride, gradient-descent iterations) per preset, and no variational refinement; the
preset's finest scale and patch size are kept (at a coarser finest scale small frames lose the detail)."""


class DenseFlow:
    """A reusable DIS estimator. `flow(a, b)` -> [H, W, 2] float32 from grey frame a to grey frame b.

    seeded: tuned to refine a good initial guess (SEEDED: sparser patches, fewer iterations, no variational
    refinement): at medium on 832x480 about 40 % of the preset's time."""

    def __init__(self, quality: str = "medium", seeded: bool = False):
        if quality not in QUALITY:
            raise ValueError(f"unknown flow quality '{quality}'; use one of {list(QUALITY)}.")
        self._dis = cv2.DISOpticalFlow_create(QUALITY[quality])
        self._dis.setUseSpatialPropagation(True)
        if seeded:
            stride, iters = SEEDED[quality]
            self._dis.setPatchStride(stride)
            self._dis.setGradientDescentIterations(iters)
            self._dis.setVariationalRefinementIterations(0)

    def flow(self, a: np.ndarray, b: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        """init: an initial guess [H, W, 2] (refined, not replaced)."""
        if init is None:
            return self._dis.calc(a, b, None)
        return self._dis.calc(a, b, np.ascontiguousarray(init, dtype=np.float32))


def identity_grid(h: int, w: int) -> np.ndarray:
    """[H, W, 2] float32 pixel coordinates (x, y)."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.stack([xs, ys], -1)


def _map(coords: np.ndarray) -> np.ndarray:
    """coords as remap's one two-channel float32 map (no copy when it already is one)."""
    if coords.dtype != np.float32 or coords.strides[-1] != 4 or coords.strides[-2] != 8:
        coords = np.ascontiguousarray(coords, dtype=np.float32)
    return coords


def sample(image: np.ndarray, coords: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Bilinear (or nearest) lookup of image [H, W(, C)] at absolute coords [H', W', 2]; edges replicated.
    One CV_32FC2 map, not two strided x/y planes that OpenCV would copy first (same result, bit for bit).
    Nearest lookup of 8-byte pixels (a [H, W, 2] float32 flow or track) moves each pixel as one float64: it
    only copies them, so the same bits, in about half the time of a two-channel remap."""
    if nearest and image.ndim == 3 and image.shape[2] * image.itemsize == 8 and image.flags.c_contiguous:
        one = cv2.remap(image.view(np.float64)[..., 0], _map(coords), None, cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_REPLICATE)
        return one.view(image.dtype).reshape(*one.shape, image.shape[2])
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(image, _map(coords), None, interp, borderMode=cv2.BORDER_REPLICATE)


def sample_u8(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a uint8 image [H, W(, C)] at coords [H', W', 2] through remap's fixed-point maps
    (cv2.convertMaps: coords rounded to 1/32 px, integer weights): about 1.7x faster than sample's float map
    at 832x480 RGB, conversion included; it differs from sample by at most the image's local slope / 64 (a
    grey level on smooth footage). Edges replicated; NaN or far-off coords give an edge pixel (callers mask
    those with `inside`)."""
    m1, m2 = cv2.convertMaps(_map(coords), None, cv2.CV_16SC2)
    return cv2.remap(image, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def inside(coords: np.ndarray, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
    """[H', W'] bool: coords fall inside an h x w image (NaN: outside). out: a [H', W'] bool buffer to reuse."""
    m = cv2.inRange(_map(coords), (0.0, 0.0), (float(w - 1), float(h - 1)))   # 255 where both are in range
    if out is None:
        return m > 0
    np.greater(m, 0, out=out)
    return out


def consistent(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Forward-backward check (Sundaram et al. 2010) for the backward flow b (t -> t-1) against the forward
    flow f (t-1 -> t): pixel x of frame t is trusted when f(x + b(x)) ~= -b(x). Returns [H, W] bool."""
    h, w = backward.shape[:2]
    target = identity_grid(h, w) + backward
    f_at = sample(forward, target)
    err = np.sum((backward + f_at) ** 2, -1)
    bound = 0.01 * (np.sum(backward ** 2, -1) + np.sum(f_at ** 2, -1)) + 0.5
    return (err < bound) & inside(target, h, w)
