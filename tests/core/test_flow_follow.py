"""Auto follow (issue 17): with only a frame-1 mask, when the carried region is lost while the camera pans past the
object, mode auto restarts with per-frame masks from the masks room's motion follower. The clip is the motion
follower's synthetic pan (tests/core/test_masks_motion.py: the background pans 7 px a frame past an object the
camera follows, dark bars cross it), the edit a hue rotation of the object on frame 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ffprop.nodes.flow.engine import FlowSettings, propagate_edit
from ffprop.nodes.flow.stream import propagate_file
from ffprop.nodes.masks.flow_track import follow_region, pans_past, track_masks
from ffprop.nodes.video.frames import from_uint8, to_uint8
from ffprop.nodes.video.io import read_video, write_image
from test_masks_motion import panning_clip


def _recolour(video: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] with R, G, B rotated to B, R, G (a hue rotation)."""
    return video[..., [2, 0, 1]]


@pytest.fixture(scope="module")
def pan():
    """(source IMAGE [T, H, W, 3], true visible masks bool [T, H, W], truth IMAGE: the recolour in every frame)."""
    video, masks = panning_clip()
    truth = np.where(masks[..., None], _recolour(video), video)
    return from_uint8(video), masks, from_uint8(truth)


def _vanished(out: torch.Tensor, truth: torch.Tensor, source: torch.Tensor, masks: np.ndarray) -> list[int]:
    """Frames (1..T-1) where the object is visible (>= 64 px) and over 3/4 of the recolour is missing: mean RGB
    distance to the truth inside the true mask over the untouched source's (bench_flow_quality's 'vanished')."""
    gone = []
    for t in range(1, len(out)):
        m = torch.from_numpy(masks[t])
        if m.sum() < 64:
            continue
        d_out = torch.linalg.vector_norm(out[t][m] - truth[t][m], dim=-1).mean()
        d_src = torch.linalg.vector_norm(source[t][m] - truth[t][m], dim=-1).mean()
        if d_out / d_src > 0.75:
            gone.append(t)
    return gone


def test_a_lost_region_on_a_pan_is_followed_and_equals_mask_propagate_first(pan):
    """Without auto_follow the chain loses the object (over half of the frames vanish, the note says so); with
    it (the default) auto restarts with the follower's masks and loses at most 4 frames (bars crossing the
    object), and the output is bit for bit what the engine makes from the follower's masks given per frame
    (Mask Propagate first)."""
    source, masks, truth = pan
    key = torch.from_numpy(masks[:1].astype(np.float32))
    alone = propagate_edit(source, truth[0], key, FlowSettings(auto_follow=False))
    assert any("the edit region was lost at frame" in n and "give a mask for every frame" in n for n in alone.notes)
    lost = _vanished(alone.video, truth, source, masks)
    assert len(lost) > len(source) // 2, lost
    followed = propagate_edit(source, truth[0], key)
    assert any("restarted at frame 1 with per-frame masks from the motion follower" in n for n in followed.notes)
    assert any("carried as that map" in n for n in followed.notes), followed.notes    # replanned: a colour map
    kept = _vanished(followed.video, truth, source, masks)
    assert len(kept) <= 4, kept
    given = np.stack([m[0] for m in track_masks(to_uint8(source), [masks[0]], method="motion")])
    first = propagate_edit(source, truth[0], torch.from_numpy(given.astype(np.float32)))
    assert torch.equal(followed.video, first.video) and torch.equal(followed.mask, first.mask)


def test_follow_region_streams_the_masks_track_masks_makes(pan):
    """follow_region over a generator of frames yields the follower's masks (here at full size: 256 px is under
    the tracking size), the key mask first, equal to track_masks(method='motion')."""
    source, masks, _ = pan
    frames = to_uint8(source)
    streamed = list(follow_region((f for f in frames), masks[0]))
    whole = [m[0] for m in track_masks(frames, [masks[0]], method="motion")]
    assert len(streamed) == len(whole) == len(frames)
    assert all(np.array_equal(a, b) for a, b in zip(streamed, whole))
    half = list(follow_region((f for f in frames[:6]), masks[0], max_side=128))       # tracked at half size
    assert half[0].shape == (72, 128) and half[0].sum() == pytest.approx(masks[0].sum() / 4, rel=0.1)


def test_a_region_lost_without_a_pan_is_only_noted():
    """The camera still and a panel sliding in over the object: the region is lost, pans_past says no, so auto
    only notes the loss and the output is the same with auto_follow off."""
    rng = np.random.default_rng(4)
    bg = (rng.random((64, 96, 3)) * 60 + 100).astype(np.uint8)
    panel = (rng.random((64, 96, 3)) * 80 + 20).astype(np.uint8)
    frames = []
    for t in range(12):
        f = bg.copy()
        f[20:40, 30 + t:50 + t] = (200, 60, 40)                       # a red square drifting right 1 px a frame
        f[:, :12 * t] = panel[:, :12 * t]                            # the panel, in from the left 12 px a frame
        frames.append(f)
    frames = np.stack(frames)
    edited = frames[0].copy()
    edited[20:40, 30:50] = (40, 60, 200)
    key = np.zeros((64, 96), bool)
    key[20:40, 30:50] = True
    assert not pans_past(frames[0], frames[1], key)
    src = from_uint8(frames)
    res = propagate_edit(src, from_uint8(edited), torch.from_numpy(key[None].astype(np.float32)))
    off = propagate_edit(src, from_uint8(edited), torch.from_numpy(key[None].astype(np.float32)),
                         FlowSettings(auto_follow=False))
    assert any("the edit region was lost at frame" in n for n in res.notes), res.notes
    assert not any("restarted" in n for n in res.notes)
    assert torch.equal(res.video, off.video)


def test_the_file_path_restarts_with_the_follower_too(pan, tmp_path):
    """propagate_file (ffprop propagate) on the panning clip: the same restart, and the written clip keeps the
    edit where the engine's in-memory run does."""
    source, masks, truth = pan
    folder = tmp_path / "frames"
    for t in range(len(source)):
        write_image(folder / f"{t:03d}.png", source[t])
    res = propagate_file(folder, truth[0], tmp_path / "out.mp4", torch.from_numpy(masks[:1].astype(np.float32)))
    assert res.frames == len(source)
    assert any("restarted at frame 1 with per-frame masks from the motion follower" in n for n in res.notes)
    back, _ = read_video(tmp_path / "out.mp4")
    assert len(_vanished(back, truth, source, masks)) <= 4


def test_the_followers_masks_stop_where_they_spill_past_twice_frame_1s_area(monkeypatch):
    """follower_masks uses the follower's masks while their area stays within FOLLOW_GROWTH x frame 1's; from the
    first frame past it the masks are empty (the edit stops there) and stop names that frame. A stand-in
    follower yields a square growing 1.3x in area per frame (what loraedit 032's follower does from frame 37)."""
    import ffprop.nodes.masks.flow_track as flow_track
    from ffprop.nodes.flow.engine import FOLLOW_GROWTH, follower_masks, plan_edit

    h, w = 60, 80
    key = np.zeros((h, w), bool)
    key[20:30, 30:40] = True
    sides = [round(10 * 1.3 ** (t / 2)) for t in range(8)]                # areas 1, 1.3, 1.69, 2.2, ... x

    def growing(frames, key_mask, quality="medium", max_side=640, should_stop=None):
        for t, _ in enumerate(frames):
            m = np.zeros((h, w), bool)
            m[25 - sides[t] // 2:25 + (sides[t] + 1) // 2, 35 - sides[t] // 2:35 + (sides[t] + 1) // 2] = True
            yield m
    monkeypatch.setattr(flow_track, "follow_region", growing)
    frame = np.full((h, w, 3), 120, np.uint8)
    plan = plan_edit(frame, torch.from_numpy(np.float32(frame) / 255), torch.from_numpy(key.astype(np.float32)),
                     FlowSettings(), False)
    masks, stop = follower_masks(lambda: iter([frame] * 8), plan, FlowSettings())
    areas = [s * s / 100 for s in sides]
    assert stop == next(t for t, a in enumerate(areas) if a > FOLLOW_GROWTH) == 3
    assert [bool(masks(t, False).any()) for t in range(8)] == [True, True, True] + [False] * 5
    assert masks(2, False).sum() == sides[2] ** 2 and np.array_equal(masks(0, False) > 0, key)


def test_a_follower_that_spills_before_the_track_was_lost_leaves_the_track(pan, monkeypatch):
    """When the follower's mask grows past FOLLOW_GROWTH x frame 1's before the frame where the track was lost,
    the restart would be worse than the track: auto keeps the track (the same output as auto_follow off) and
    says why. A stand-in follower spills at once (the whole frame from frame 2)."""
    import ffprop.nodes.masks.flow_track as flow_track

    def spilling(frames, key_mask, quality="medium", max_side=640, should_stop=None):
        for t, f in enumerate(frames):
            yield key_mask.astype(bool) if t == 0 else np.ones(f.shape[:2], bool)
    monkeypatch.setattr(flow_track, "follow_region", spilling)
    source, masks, truth = pan
    key = torch.from_numpy(masks[:1].astype(np.float32))
    kept = propagate_edit(source, truth[0], key)
    assert any("spilled onto the scene at frame 2, sooner, so the track is kept" in n for n in kept.notes), kept.notes
    off = propagate_edit(source, truth[0], key, FlowSettings(auto_follow=False))
    assert torch.equal(kept.video, off.video) and torch.equal(kept.mask, off.mask)
