"""The flow engine's fast paths give the same numbers as the plain ones (nodes/flow/dis.py, track.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ffprop.nodes.flow.dis import identity_grid, inside, sample


def _plain_sample(image, coords, nearest=False):
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(image, np.ascontiguousarray(coords[..., 0]), np.ascontiguousarray(coords[..., 1]), interp,
                     borderMode=cv2.BORDER_REPLICATE)


def _plain_inside(coords, h, w):
    x, y = coords[..., 0], coords[..., 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def _coords(h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    c = identity_grid(h, w) + rng.normal(0, 6, (h, w, 2)).astype(np.float32)
    c[0, 0] = np.nan
    c[1, 1, 0] = 1e9
    c[2, 2] = (w - 1, h - 1)           # the last pixel is inside
    c[3, 3] = (w - 1 + 1e-3, 0)        # just beyond it is not
    c[4, 4] = (-0.0, -1e-6)
    return c


@pytest.mark.parametrize("nearest", [False, True])
@pytest.mark.parametrize("kind", ["u8rgb", "u8gray", "f32rgb", "f32flow"])
def test_sample_bit_identical_to_two_plane_remap(kind, nearest):
    rng = np.random.default_rng(1)
    h, w = 37, 53
    image = {"u8rgb": rng.integers(0, 256, (h, w, 3), np.uint8), "u8gray": rng.integers(0, 256, (h, w), np.uint8),
             "f32rgb": rng.random((h, w, 3), np.float32), "f32flow": _coords(h, w, 2)}[kind]
    coords = _coords(h, w)
    for c in (coords, coords[5:30, 7:40], coords.astype(np.float64)):   # whole, a box (strided), another dtype
        got, want = sample(image, c, nearest), _plain_sample(image, c.astype(np.float32), nearest)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f")


def test_inside_matches_plain_comparisons_and_reuses_buffer():
    h, w = 37, 53
    coords = _coords(h, w)
    want = _plain_inside(coords, h, w)
    assert not want.all() and want.any()
    assert np.array_equal(inside(coords, h, w), want)
    buf = np.zeros((h, w), bool)
    assert inside(coords, h, w, out=buf) is buf and np.array_equal(buf, want)
    assert np.array_equal(inside(coords[5:30, 7:40], h, w), want[5:30, 7:40])
