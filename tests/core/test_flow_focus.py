"""The engine's focus: each frame tracked only in a box around the last frame's edit region (FlowSettings.focus)."""

import numpy as np
import pytest
from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.flow import engine
from ffprop.nodes.flow.dis import identity_grid, sample_u8
from ffprop.nodes.flow.engine import REACH_PX, FlowSettings, propagate_edit, reach_box
from ffprop.nodes.flow.track import track_frames
from ffprop.nodes.video.synthetic import synthetic_clip, texture

PAN = np.array([3.0, 1.25])      # px per frame: the whole picture moves (a camera pan)


def panning(t_len=12, h=120, w=160):
    """A textured picture panned by PAN per frame: frame t at (x, y) shows frame 0 at (x, y) + PAN t.
    -> uint8 [T, H, W, 3]."""
    import cv2
    big = texture(h + 64, w + 64, np.random.default_rng(3), 2.0)
    out = []
    for t in range(t_len):
        m = np.float32([[1, 0, -PAN[0] * t], [0, 1, -PAN[1] * t]])
        out.append(cv2.warpAffine(big, m, (w + 64, h + 64), flags=cv2.INTER_LINEAR)[:h, :w])
    return (np.stack(out) * 255 + 0.5).astype(np.uint8)


def test_a_focused_track_is_exact_inside_its_box_and_not_valid_outside():
    """A box of a quarter of the frame: inside it the track follows a 33 px pan to frame 0 (the direct flow runs
    on the box and the window of frame 0 it moved from); outside it nothing is valid and coords stay put."""
    frames = panning()
    h, w = frames.shape[1:3]
    box = (30, 90, 40, 120)
    grid = identity_grid(h, w)
    tracks = list(track_frames(iter(frames), focus=lambda: box))
    y0, y1, x0, x1 = box
    inner = (slice(y0 + 6, y1 - 6), slice(x0 + 6, x1 - 6))             # beyond DIS's patches at the box edge
    for t, (_, track) in enumerate(tracks[1:], start=1):
        assert track.box == box
        err = np.linalg.norm(track.coords[inner] - (grid[inner] + PAN * t), axis=-1)
        assert np.median(err) < 0.3 and (err < 1).mean() > 0.95, f"frame {t}: median {np.median(err):.2f} px"
        assert track.valid[inner].mean() > 0.95
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        assert not track.valid[outside].any()
        assert np.array_equal(track.coords[outside], tracks[t - 1][1].coords[outside])
        box_coords = np.ascontiguousarray(track.coords[y0:y1, x0:x1])      # seen: frame 0 through the track
        assert np.array_equal(track.seen[y0:y1, x0:x1], sample_u8(frames[0], box_coords))


def test_focus_none_is_the_whole_frame_bit_for_bit():
    frames = panning(6)
    a = [tr for _, tr in track_frames(iter(frames))]
    b = [tr for _, tr in track_frames(iter(frames), focus=lambda: None)]
    for x, y in zip(a, b):
        assert y.box is None and np.array_equal(x.coords, y.coords) and np.array_equal(x.valid, y.valid)


def test_reach_box_grows_the_region_by_the_margin_and_the_motion():
    shape = (100, 200)
    still = np.zeros((*shape, 2), np.float32)
    assert reach_box(None, still, shape) is None                          # nothing tracked: the whole frame
    box = (40, 50, 100, 110)                                             # the region's bounding box
    assert reach_box(box, None, shape) is None                           # frame 1: no motion known yet
    assert reach_box(box, still, shape) == (40 - REACH_PX, 50 + REACH_PX, 100 - REACH_PX, 110 + REACH_PX)
    flow = still.copy()
    flow[..., 0] = 6.0                                                   # 6 px per frame: 9 px more each side
    assert reach_box(box, flow, shape) == (40 - REACH_PX - 9, 50 + REACH_PX + 9, 100 - REACH_PX - 9, 110 + REACH_PX + 9)
    assert reach_box((0, 5, 190, 200), still, shape) == (0, 5 + REACH_PX, 190 - REACH_PX, 200)   # clipped to the frame


def test_the_engine_with_focus_carries_the_demo_edit_as_well_as_the_whole_frame(monkeypatch):
    """The demo clip (a recoloured disc, a pan, an occluder): with focus the engine tracks a box that is a
    fraction of the frame and scores the ground truth as the whole-frame track does."""
    shares = []
    original = engine.reach_box

    def spy(region_box, flow, shape):
        box = original(region_box, flow, shape)
        shares.append(1.0 if box is None else (box[1] - box[0]) * (box[3] - box[2]) / (shape[0] * shape[1]))
        return box

    monkeypatch.setattr(engine, "reach_box", spy)
    clip = synthetic_clip(33, 144, 256)
    scores = {}
    for focus in (False, True):
        video = propagate_edit(clip.source, clip.edited[0], settings=FlowSettings(focus=focus)).video.numpy()
        scores[focus] = np.mean([psnr(a, b) for a, b in zip(video[1:], clip.edited.numpy()[1:])])
    assert len(shares) == 33 and shares[0] == 1.0 and max(shares[1:]) < 0.6, f"box shares {min(shares):.2f}..{max(shares):.2f}"
    assert scores[True] > 28 and scores[True] == pytest.approx(scores[False], abs=0.5), scores


def test_the_direct_flow_of_a_box_looks_where_the_box_came_from():
    """_direct on a box 36 px away from where its content was in frame 0, seeded 2 px off: DIS runs on the box
    and the window of frame 0 it moved from, and removes the seed's error."""
    from ffprop.nodes.flow.dis import to_gray
    from ffprop.nodes.flow.track import _direct, dis_backend

    frames = panning(13)
    h, w = frames.shape[1:3]
    box = (30, 90, 40, 110)
    y0, y1, x0, x1 = box
    grid = identity_grid(h, w)[y0:y1, x0:x1]
    truth = grid + PAN * 12
    seed = truth + np.float32([2.0, -2.0])
    got = _direct(dis_backend("medium", seeded=True), to_gray(frames[12]), to_gray(frames[0]), seed, grid, box)
    err = np.linalg.norm(got - truth, axis=-1)[6:-6, 6:-6]
    assert np.median(err) < 0.3 and (err < 1).mean() > 0.95, f"median {np.median(err):.2f} px"


def test_in_a_box_the_light_test_reads_the_pixels_around_the_object_not_the_object():
    """A box that is mostly the edited object, which changed shape (it fails the plain match) while the light
    did not (the rest of the box matches): not a change of light. Over the whole box it would have been one."""
    from ffprop.nodes.flow.track import _matched_share

    ok = np.ones((80, 80), bool)
    ok[10:70, 10:70] = False                               # the object: 56 % of the box fails
    obj = np.zeros((80, 80), bool)
    obj[8:72, 8:72] = True
    care = lambda c: obj[c[..., 1].astype(int), c[..., 0].astype(int)]   # noqa: E731  (coords are the grid here)
    coords = identity_grid(80, 80)
    assert _matched_share(ok, coords, None, True) == pytest.approx(ok.mean())   # no care region: the whole box
    assert ok.mean() < 0.5 < _matched_share(ok, coords, care, True)
    assert _matched_share(ok, coords, care, False) == pytest.approx(ok.mean())  # the whole frame: as before
