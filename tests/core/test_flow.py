"""The flow engine on synthetic motion with known ground truth, compositing guarantees, bad input."""

import numpy as np
import pytest
import torch
from ffprop.nodes.common import Cancelled
from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.flow.dis import identity_grid
from ffprop.nodes.flow.engine import FlowSettings, propagate_edit, propagate_mask, track_to_first
from ffprop.nodes.video.synthetic import synthetic_clip, texture

V = np.array([3.0, 1.5])        # square motion, px per frame (sub-pixel in y)
X0, Y0, S = 30.0, 30.0, 40      # square top-left at frame 0, side


def translated_square(t_len=12, h=128, w=160):
    """Static textured background, textured square moving by V per frame. -> uint8 [T, H, W, 3]."""
    import cv2
    rng = np.random.default_rng(1)
    bg, tex = texture(h, w, rng, 2.0), texture(S, S, rng, 1.5)
    frames = []
    for t in range(t_len):
        f = bg.copy()
        m = np.float32([[1, 0, X0 + V[0] * t], [0, 1, Y0 + V[1] * t]])
        patch = cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR)
        cover = cv2.warpAffine(np.ones((S, S), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
        frames.append(f * (1 - cover) + patch * cover)
    return (np.stack(frames) * 255 + 0.5).astype(np.uint8)


def test_translated_square_is_tracked_within_one_pixel():
    frames = translated_square()
    grid = identity_grid(*frames.shape[1:3])

    def square_errors(t, track, margin):
        x0, y0 = X0 + V[0] * t, Y0 + V[1] * t
        inner = np.zeros(frames.shape[1:3], bool)
        inner[int(np.ceil(y0)) + margin:int(y0) + S - margin, int(np.ceil(x0)) + margin:int(x0) + S - margin] = True
        return track.coords[inner] - (grid[inner] - V * t), track.valid[inner]

    for t, track in enumerate(track_to_first(frames)):
        err, valid = square_errors(t, track, margin=3)
        dist = np.linalg.norm(err, axis=1)
        assert np.linalg.norm(np.median(err, 0)) < 0.5, f"frame {t}: square off by {np.median(err, 0)} px"
        assert (dist < 1).mean() > 0.8 and valid.mean() > 0.8, f"frame {t}: {(dist < 1).mean():.1%} within 1 px"
        err, _ = square_errors(t, track, margin=6)          # beyond DIS's 8 px patches reaching the edge
        assert np.percentile(np.linalg.norm(err, axis=1), 95) < 1.0


def test_edit_follows_the_object_and_background_is_bit_identical():
    clip = synthetic_clip(17, 144, 256)
    result = propagate_edit(clip.source, clip.edited[0])
    outside = result.mask == 0
    assert torch.equal(result.video[outside], clip.source[outside])          # exact, not close
    for t in range(9):                                                       # before the occluder arrives
        disc = (clip.mask[t] > 0.5).numpy()
        got = psnr(result.video[t].numpy(), clip.edited[t].numpy(), disc)   # vs ground truth: recoloured disc
        assert got > 18 and got > psnr(clip.source[t].numpy(), clip.edited[t].numpy(), disc) + 7, f"frame {t}"


def test_demo_clip_with_occluder_keeps_the_edit():
    clip = synthetic_clip()                                                   # 49 frames, occluder crosses
    result = propagate_edit(clip.source, clip.edited[0])
    per_frame = [psnr(a, b) for a, b in zip(result.video.numpy(), clip.edited.numpy())]
    assert min(per_frame) > 28, f"worst frame {min(per_frame):.2f} dB"


@pytest.mark.parametrize("mode", ["delta", "pixels"])
def test_modes_and_per_frame_masks(mode):
    clip = synthetic_clip(9, 144, 256)
    clip = type(clip)(clip.source[:5], clip.edited[:5], clip.mask[:5])     # before the occluder arrives
    masks = (clip.mask > 0.5).float()
    result = propagate_edit(clip.source, clip.edited[0], masks, FlowSettings(mode=mode, mask_grow=0, feather=0))
    assert torch.equal(result.mask, masks)                                    # a given region is used as is
    assert torch.equal(result.video[masks == 0], clip.source[masks == 0])
    assert psnr(result.video.numpy(), clip.edited.numpy(), masks.numpy()) > 24


def test_propagate_mask_follows_the_disc():
    clip = synthetic_clip(17, 144, 256)
    masks = propagate_mask(clip.source[:9], (clip.mask[0] > 0.5).float())
    gt, got = clip.mask[8] > 0.5, masks[8] > 0.5
    assert (gt & got).sum() / (gt | got).sum() > 0.65


def test_progress_and_cancel():
    clip = synthetic_clip(9, 64, 96)
    calls = []
    propagate_edit(clip.source, clip.edited[0], on_step=lambda i, n, p: calls.append((i, n, p.shape)))
    assert [c[0] for c in calls] == list(range(1, 10)) and calls[-1][1] == 9 and calls[0][2] == (64, 96, 3)
    with pytest.raises(Cancelled, match="step 3 of 8"):
        stops = iter([False, False, True])
        propagate_edit(clip.source, clip.edited[0], should_stop=lambda: next(stops))


def test_bad_input_errors():
    clip = synthetic_clip(9, 64, 96)
    with pytest.raises(ValueError, match="nothing to propagate"):
        propagate_edit(clip.source, clip.source[0])
    with pytest.raises(ValueError, match="edit_mask is empty"):
        propagate_edit(clip.source, clip.edited[0], torch.zeros(1, 64, 96))
    with pytest.raises(ValueError, match="edit_mask is 48x32 but the video is 96x64"):
        propagate_edit(clip.source, clip.edited[0], torch.ones(1, 32, 48))
    with pytest.raises(ValueError, match="5 frames but the video has 9"):
        propagate_edit(clip.source, clip.edited[0], torch.ones(5, 64, 96))
    bad = clip.source.clone()
    bad[4, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        propagate_edit(bad, clip.edited[0])
    with pytest.raises(ValueError, match="unknown mode"):
        FlowSettings(mode="paint")
    with pytest.raises(ValueError, match="48x32 but the video is 96x64"):
        propagate_edit(clip.source, torch.rand(32, 48, 3), size_policy="error")
