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


def test_seeded_estimator_is_cheaper_and_refines_a_seed():
    from ffprop.nodes.flow.dis import SEEDED, DenseFlow

    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.integers(0, 256, (96, 128), np.uint8), (0, 0), 2)
    moved = np.roll(base, (2, 3), (0, 1))                 # content moves by (dx, dy) = (3, 2)
    seed = np.zeros((96, 128, 2), np.float32)
    seed[..., 0], seed[..., 1] = -2.5, -1.5               # flow moved -> base is (-3, -2): a rough guess
    flow = DenseFlow("medium", seeded=True).flow(moved, base, seed)
    assert np.abs(np.median(flow[20:-20, 20:-20].reshape(-1, 2), 0) - (-3, -2)).max() < 0.25
    dis = DenseFlow("medium", seeded=True)._dis
    assert (dis.getPatchStride(), dis.getGradientDescentIterations()) == SEEDED["medium"]
    assert dis.getVariationalRefinementIterations() == 0


def test_inside_matches_plain_comparisons_and_reuses_buffer():
    h, w = 37, 53
    coords = _coords(h, w)
    want = _plain_inside(coords, h, w)
    assert not want.all() and want.any()
    assert np.array_equal(inside(coords, h, w), want)
    buf = np.zeros((h, w), bool)
    assert inside(coords, h, w, out=buf) is buf and np.array_equal(buf, want)
    assert np.array_equal(inside(coords[5:30, 7:40], h, w), want[5:30, 7:40])


def test_light_error_where_equals_the_full_frame_one_where_needed():
    from ffprop.nodes.flow.track import LIGHT_TILE, light_error, light_error_where

    rng = np.random.default_rng(3)
    h, w = 150, 230
    a = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 2)
    b = np.clip(a.astype(np.int16) * 0.7 + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    need = np.zeros((h, w), bool)
    need[rng.integers(0, h, 40), rng.integers(0, w, 40)] = True
    need[:, -3:] = True                                  # a strip at the frame border
    full, part = light_error(a, b), light_error_where(a, b, need)
    assert np.allclose(part[need], full[need], rtol=0, atol=1e-6)
    one = np.zeros((h, w), bool)                         # tiles holding no needed pixel are skipped (+inf)
    one[LIGHT_TILE + 3, 2 * LIGHT_TILE + 5] = True
    got = light_error_where(a, b, one)
    tile = np.zeros((h, w), bool)
    tile[LIGHT_TILE:2 * LIGHT_TILE, 2 * LIGHT_TILE:3 * LIGHT_TILE] = True
    assert np.isinf(got[~tile]).all() and np.allclose(got[tile], full[tile], rtol=0, atol=1e-6)


def test_cheap_anchor_in_the_engine_full_anchor_for_the_mask_follower(monkeypatch):
    from ffprop.nodes.flow import track

    made = []
    real = track.dis_backend
    monkeypatch.setattr(track, "dis_backend", lambda q, seeded=False: made.append((q, seeded)) or real(q, seeded))
    rng = np.random.default_rng(4)
    base = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), np.uint8), (0, 0), 1.5)
    frames = np.stack([np.roll(base, t, 1) for t in range(3)])
    list(track.track_frames(iter(frames), "medium"))
    assert sorted(made) == [("medium", False), ("medium", True)]   # the chain, and the anchor it seeds
    made.clear()
    list(track.track_to_first(frames, "medium"))
    assert made == [("medium", False), ("medium", False)]


def test_anchor_every_second_frame_and_the_last(monkeypatch):
    from ffprop.nodes.flow import track

    calls = []
    real = track.dis_backend

    def counted(q, seeded=False):
        fn = real(q, seeded)
        return (lambda a, b, init=None: calls.append(seeded) or fn(a, b, init)) if seeded else fn
    monkeypatch.setattr(track, "dis_backend", counted)
    rng = np.random.default_rng(6)
    base = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), np.uint8), (0, 0), 1.5)
    frames = [np.roll(base, t, 1) for t in range(6)]     # frames 1..5 after frame 0: anchored at 2, 4 and 5
    assert len(list(track.track_frames(iter(frames)))) == 6
    assert len(calls) == 3
    calls.clear()
    list(track.track_frames(iter(frames), anchor_every=1))
    assert len(calls) == 5


def test_fixed_point_lookup_is_close_to_the_float_one():
    from ffprop.nodes.flow.dis import sample_u8

    rng = np.random.default_rng(7)
    h, w = 60, 80
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 3)   # smooth footage
    coords = identity_grid(h, w) + rng.normal(0, 4, (h, w, 2)).astype(np.float32)
    got, want = sample_u8(image, coords).astype(int), sample(image, coords).astype(int)
    slope = np.abs(np.diff(image.astype(int), axis=1)).max()
    assert got.shape == want.shape and sample_u8(image, coords).dtype == np.uint8
    assert np.abs(got - want).max() <= max(1, slope // 32)
    assert (got != want).any()                           # it is another lookup, not the float one renamed


def test_care_limits_the_local_light_test_and_nothing_else():
    from ffprop.nodes.flow.track import track_frames

    rng = np.random.default_rng(8)
    base = cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), np.uint8), (0, 0), 1.5)
    frames = []
    for t in range(4):
        f = np.roll(base, t, 1).astype(np.float32)
        if t:
            f[20:44, 10:86] *= 0.6                        # a shadow across both halves after frame 0: local light
        frames.append(f.astype(np.uint8))
    left = np.zeros((64, 96), bool)
    left[:, :48] = True
    full = list(track_frames(iter(frames)))
    part = list(track_frames(iter(frames), care=lambda coords: left))
    plain = list(track_frames(iter(frames), light_tolerant=False))
    for (_, a), (_, b), (_, p) in zip(full, part, plain):
        assert np.array_equal(a.coords, b.coords)          # the track itself does not depend on care
        assert np.array_equal(a.valid[left], b.valid[left])
        assert np.array_equal(b.valid[~left], p.valid[~left] | (a.valid & b.valid)[~left])
    shadow = np.zeros((64, 96), bool)
    shadow[24:40, 60:80] = True
    assert full[-1][1].valid[shadow].mean() > part[-1][1].valid[shadow].mean()   # care was honoured


def test_keep_better_looks_up_only_where_the_candidate_moved():
    from ffprop.nodes.flow.dis import sample_u8
    from ffprop.nodes.flow.track import _keep_better, patch_error_u8

    rng = np.random.default_rng(9)
    h, w = 40, 1100                                      # wider than one 1024-point row of the sparse lookup
    frame0 = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 1.5)
    frame = np.roll(frame0, 2, 1)
    coords = identity_grid(h, w) + rng.normal(0, 1.5, (h, w, 2)).astype(np.float32)
    where = rng.random((h, w)) < 0.3
    cand = coords.copy()
    cand[where] -= (2, 0)                                # moved pixels: mostly better
    for look in (sample, sample_u8):
        seen = look(frame0, coords)
        runs = []
        for wh in (None, where):
            c, s = coords.copy(), seen.copy()
            e = patch_error_u8(frame, s)
            _keep_better(c, e, s, cand, frame, frame0, patch_error_u8, look, wh)
            runs.append((c, e, s))
        assert not np.array_equal(runs[0][0], coords)
        for a, b in zip(*runs):
            assert np.array_equal(a, b)
    c, e, s = coords.copy(), patch_error_u8(frame, seen), seen.copy()
    _keep_better(c, e, s, coords.copy(), frame, frame0, where=np.zeros((h, w), bool))   # nothing moved
    assert np.array_equal(c, coords) and np.array_equal(s, seen)
