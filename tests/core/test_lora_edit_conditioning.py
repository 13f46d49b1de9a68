"""LoRA-Edit conditioning builder: V_cond / keep exactly as SEED_SPEC 5.3 specifies (CPU, no ComfyUI)."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.lora_edit.conditioning import (
    GREY,
    comfy_concat_mask,
    keep_channels,
    masked_condition_video,
    masked_still,
    wan_cond,
)
from ffprop.nodes.video.frames import keep_to_edit

T, H, W = 9, 32, 48


def clip(seed: int = 0) -> torch.Tensor:
    return torch.rand(T, H, W, 3, generator=torch.Generator().manual_seed(seed))


def box_mask(frames: int = T) -> torch.Tensor:
    m = torch.zeros(frames, H, W)
    m[:, 8:24, 16:40] = 1.0
    return m


def test_frame_one_kept_region_grey_rest_source():
    src, edited = clip(), torch.rand(1, H, W, 3)
    mask = box_mask()
    v, keep = masked_condition_video(src, mask, edited)
    assert v.shape == src.shape and keep.shape == (T, H, W)
    assert torch.equal(v[0], edited[0]) and torch.equal(keep[0], torch.ones(H, W))
    inside = mask[1:] > 0.5
    assert torch.all(v[1:][inside] == GREY)
    assert torch.equal(v[1:][~inside], src[1:][~inside])
    assert torch.equal(keep[1:], 1 - mask[1:])          # keep = 1 outside the edit region, 0 inside
    assert torch.equal(keep_to_edit(keep[1:]), mask[1:])


def test_soft_mask_binarised_at_half_and_single_frame_broadcast():
    src = clip()
    soft = torch.zeros(1, H, W)
    soft[0, :, :10] = 0.4   # below the rule: keep
    soft[0, :, 10:20] = 0.6  # above: edit
    v, keep = masked_condition_video(src, soft, src[:1])
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(keep[1:, :, :10] == 1) and torch.all(keep[1:, :, 10:20] == 0)
    assert torch.all(v[1:, :, 10:20] == GREY) and torch.equal(v[1:, :, :10], src[1:, :, :10])


def test_global_edit_without_mask():
    src = clip()
    v, keep = masked_condition_video(src, None, src[:1])
    assert torch.equal(v[0], src[0]) and torch.all(v[1:] == GREY)
    assert torch.all(keep[0] == 1) and torch.all(keep[1:] == 0)


def test_multi_frame_head():
    src, head = clip(), clip(5)[:5]
    v, keep = masked_condition_video(src, box_mask(), head)
    assert torch.equal(v[:5], head) and torch.all(keep[:5] == 1) and torch.any(keep[5:] == 0)


def test_still_masks_the_edit_region_of_its_own_frame():
    src = clip()
    v, keep = masked_still(src[3], box_mask(1)[0])
    assert v.shape == (1, H, W, 3) and keep.shape == (1, H, W)
    assert torch.all(keep[0, 8:24, 16:40] == 0) and keep.sum() == H * W - 16 * 24  # no copy shortcut
    assert torch.all(v[0, 8:24, 16:40] == GREY) and torch.equal(v[0, :8], src[3, :8])


def test_wan_channels_and_comfy_concat_mask():
    src = clip()
    _, keep = masked_condition_video(src, box_mask(), src[:1])
    ch = keep_channels(keep)
    assert ch.shape == (1, 4, 3, H // 8, W // 8)
    assert torch.all(ch[0, :, 0] == 1)                         # latent frame 0 = frame 1 x4: all keep
    assert torch.all(ch[0, :, 1:, 1:3, 2:5] == 0) and ch[0, :, 1:, 0, 0].eq(1).all()
    assert torch.equal(1 - comfy_concat_mask(keep), ch)         # what WAN21.concat_cond computes
    lat = torch.randn(1, 16, 3, H // 8, W // 8)
    cond = wan_cond(lat, keep, torch.zeros(1, 4, 8))
    assert torch.equal(cond.keep_mask, ch) and cond.cond_latent is lat
    with pytest.raises(ValueError, match="does not match the keep-mask"):
        wan_cond(torch.randn(1, 16, 2, H // 8, W // 8), keep, torch.zeros(1, 4, 8))


def test_bad_input():
    src = clip()
    with pytest.raises(ValueError, match="empty"):
        masked_condition_video(src, torch.zeros(T, H, W), src[:1])
    with pytest.raises(ValueError, match="frames but the video has"):
        masked_condition_video(src, box_mask(4), src[:1])
    with pytest.raises(ValueError, match="Resize the mask"):
        masked_condition_video(src, torch.ones(T, H // 2, W), src[:1])
    with pytest.raises(ValueError, match="first frame is"):
        masked_condition_video(src, None, torch.rand(1, H, W + 16, 3))
    with pytest.raises(ValueError, match="4k\\+1"):
        wan_cond(torch.randn(1, 16, 2, H // 8, W // 8), torch.ones(6, H, W), torch.zeros(1, 4, 8))


def test_a_slice_without_edit_pixels_keeps_its_source_when_allowed():
    """A chunk or training window after the edited object left the frame: nothing greyed, every frame kept."""
    src = clip()
    video, keep = masked_condition_video(src, torch.zeros(T, H, W), src[:1], allow_empty=True)
    assert torch.equal(video, src) and bool((keep == 1).all())


@pytest.mark.parametrize("mask", [None, "box", "soft_one_frame"])
def test_without_tail_the_conditioning_is_the_documented_rule(mask):
    """tail=None (the default) is LoRA-Edit's rule bit for bit: head frames kept, the edit region grey, keep = 1
    outside it (checked against an explicit construction, for a global edit, per-frame and one-frame masks)."""
    src, head = clip(), clip(3)[:2]
    m = {None: None, "box": box_mask(), "soft_one_frame": torch.rand(1, H, W, generator=torch.Generator().manual_seed(4))}[mask]
    edit = torch.ones(T, H, W) if m is None else (m > 0.5).float().expand(T, H, W)
    want_v = torch.where(edit[..., None] > 0, torch.full_like(src, GREY), src)
    want_v[:2] = head
    want_keep = 1 - edit
    want_keep[:2] = 1
    for v, keep in (masked_condition_video(src, m, head), masked_condition_video(src, m, head, tail=None)):
        assert torch.equal(v, want_v) and torch.equal(keep, want_keep)


def test_tail_is_kept_on_the_last_frames():
    """A later keyframe as tail: the cond video's last J frames are it, keep-mask 1 there (inside the edit region
    too); every other frame is what it is without a tail."""
    src, mask = clip(), box_mask()
    head, tail = clip(1)[:1], clip(2)[:3]
    base_v, base_keep = masked_condition_video(src, mask, head)
    for t, j in ((tail[0], 1), (tail, 3)):
        v, keep = masked_condition_video(src, mask, head, tail=t)
        assert torch.equal(v[-j:], t if t.ndim == 4 else t[None]) and bool((keep[-j:] == 1).all())
        assert torch.equal(v[:-j], base_v[:-j]) and torch.equal(keep[:-j], base_keep[:-j])
        assert float(base_keep[-1, 16, 24]) == 0                       # without it, that pixel was generated
    v, keep = masked_condition_video(src, None, head, tail=tail[:1])   # global edit: only the ends are kept
    assert torch.equal(v[-1], tail[0]) and bool((keep[1:-1] == 0).all()) and bool((keep[-1] == 1).all())


def test_bad_tail():
    src = clip()
    with pytest.raises(ValueError, match="last keyframe is 64x32 but the source clip is 48x32"):
        masked_condition_video(src, None, src[:1], tail=torch.rand(H, W + 16, 3))
    with pytest.raises(ValueError, match="overlap in a clip of 9 frames; pass at most 4 tail frames"):
        masked_condition_video(src, None, src[:5], tail=src[:5])
