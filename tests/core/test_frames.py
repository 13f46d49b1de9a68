"""IMAGE/MASK/latent conventions, 4k+1 and multiple-of-16 rules, fitting, colour matching."""

import pytest
import torch
from ffprop.nodes.video.color import match_color
from ffprop.nodes.video.frames import (
    check_mask,
    check_video,
    edit_to_keep,
    fit_to_frame,
    fix_frame_count,
    fix_size,
    frames_to_latent,
    keep_to_edit,
    latent_shape,
    wan_mask_channels,
)


def test_edit_keep_round_trip_and_sense():
    edit = (torch.rand(5, 16, 16) > 0.5).float()
    keep = edit_to_keep(edit)
    assert torch.equal(keep, 1 - edit) and torch.equal(keep_to_edit(keep), edit)


def test_wan_mask_channels_packs_frame0_four_times():
    keep = torch.zeros(9, 32, 48)
    keep[0] = 1                                   # stock I2V: keep frame 1 only
    keep[5, :8, :8] = 1                           # one 8x8 cell of pixel frame 5
    packed = wan_mask_channels(keep)
    assert packed.shape == (4, 3, 4, 6)
    assert torch.equal(packed[:, 0], torch.ones(4, 4, 6))           # latent frame 0 = pixel frame 0, x4
    assert packed[:, 1].sum() == 0                                  # pixel frames 1-4
    assert packed[0, 2, 0, 0] == 1 and packed[1:, 2].sum() == 0    # pixel frame 5 -> latent 2, channel 0


def test_latent_rules():
    assert frames_to_latent(49) == 13 and frames_to_latent(81) == 21 and frames_to_latent(1) == 1
    assert latent_shape(49, 480, 832) == (1, 16, 13, 60, 104)
    with pytest.raises(ValueError, match=r"4k\+1.*got 48.*Trim to 45 or pad to 49"):
        frames_to_latent(48)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_shape(49, 470, 832)


@pytest.mark.parametrize("policy,expect", [("trim", 45), ("pad", 49)])
def test_fix_frame_count(policy, expect):
    x = torch.rand(47, 8, 8, 3)
    y, note = fix_frame_count(x, policy)
    assert y.shape[0] == expect and str(expect) in note
    assert torch.equal(y[:45], x[:45])
    if policy == "pad":
        assert torch.equal(y[-1], x[-1]) and torch.equal(y[-2], x[-1])
    assert fix_frame_count(y, policy) == (y, "")
    with pytest.raises(ValueError, match="4k"):
        fix_frame_count(x, "error")


@pytest.mark.parametrize("policy,size", [("crop", (32, 48)), ("pad", (48, 64)), ("resize", (32, 48))])
def test_fix_size(policy, size):
    x = torch.rand(2, 40, 50, 3)
    y, note = fix_size(x, policy)
    assert tuple(y.shape[1:3]) == size and policy in note
    if policy == "crop":
        assert torch.equal(y, x[:, 4:36, 1:49])
    if policy == "pad":
        assert torch.equal(y[:, :40, :50], x) and torch.equal(y[:, 40:, :50], x[:, -1:].expand(-1, 8, -1, -1))
    with pytest.raises(ValueError, match="multiples of 16; got 50x40"):
        fix_size(x, "error")


def test_fit_to_frame_policies():
    big = torch.rand(1024, 1776, 3)                     # the 003_e2 case: same aspect, 2.13x larger
    out, note = fit_to_frame(big, 480, 832)
    assert out.shape == (480, 832, 3) and "resize" in note and "same aspect" in note
    square = torch.rand(512, 512, 3)
    out, note = fit_to_frame(square, 480, 832, "auto")
    assert out.shape == (480, 832, 3) and "crop" in note
    out, note = fit_to_frame(square, 480, 832, "pad")
    assert out.shape == (480, 832, 3) and "pad" in note
    same = torch.rand(480, 832, 3)
    assert fit_to_frame(same, 480, 832, "error") == (same, "")
    with pytest.raises(ValueError, match="512x512 but the video is 832x480"):
        fit_to_frame(square, 480, 832, "error")


def test_bad_frames_and_masks():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        check_video(torch.rand(4, 8, 8))
    x = torch.rand(4, 8, 8, 3)
    x[2, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf values in frame\(s\) \[2\]"):
        check_video(x)
    with pytest.raises(ValueError, match="12x8.*video is 8x8"):
        check_mask(torch.ones(4, 8, 12), frames=torch.rand(4, 8, 8, 3))
    with pytest.raises(ValueError, match="3 frames but the video has 4"):
        check_mask(torch.ones(3, 8, 8), frames=torch.rand(4, 8, 8, 3))


def test_match_color_moves_statistics_to_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(32, 32, 3, generator=g) * 0.5 + 0.25
    frames = (torch.rand(3, 32, 32, 3, generator=g) * 0.3 + 0.05)
    out = match_color(frames, ref)
    assert torch.allclose(out.mean((1, 2)), ref.mean((0, 1)).expand(3, 3), atol=1e-3)
    assert torch.allclose(out.std((1, 2)), ref.std((0, 1)).expand(3, 3), atol=5e-3)
    assert torch.equal(match_color(frames, ref, strength=0), frames)
    with pytest.raises(ValueError, match="empty"):
        match_color(frames, ref, mask=torch.zeros(32, 32))


def test_from_uint8_takes_read_only_arrays_without_warning():
    """PIL and PyAV hand out read-only arrays; torch.from_numpy warned on every real file (issue 11 item 3).
    torch warns once per process, so this runs in a fresh one with warnings as errors."""
    import subprocess
    import sys

    code = """if True:
        import numpy as np, torch
        from ffprop.nodes.video.frames import from_uint8
        array = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
        array.flags.writeable = False
        out, strided = from_uint8(array), from_uint8(array[:, ::2])
        assert torch.equal(out, torch.from_numpy(array.copy()).float() / 255)
        assert torch.equal(strided, out[:, ::2])
        """
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
