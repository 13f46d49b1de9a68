"""The LoRA-Edit conditioning builder, shared by training and inference (SEED_SPEC 5.3, 5.8).

V_cond: the source clip with the edit region emptied to grey 0.5 (Wan's zero placeholder in [-1, 1] space),
its first K frames replaced by `head` (the edited first frame at inference, the source's first frame in
training) and, optionally, its last J frames by `tail` (a later edited keyframe: a span generated from both
ends). keep: Wan's pixel-rate keep-mask [T, H, W] (1 = keep, 0 = generate), all ones on head and tail frames.

Mask rule (documented once, used everywhere): a ComfyUI MASK pixel (1 = edit region) is in the edit region
when its value is > 0.5 (`EDIT_THRESHOLD`); soft edges are binarised, never blended into V_cond.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..host.protocol import WanCond
from ..video.frames import check_mask, check_video, frames_to_latent, wan_mask_channels

GREY = 0.5
EDIT_THRESHOLD = 0.5


def binarize_edit_mask(mask: Tensor) -> Tensor:
    """MASK [..] in 0..1 (1 = edit) -> float {0, 1} by the documented rule (value > 0.5 is edit)."""
    return (mask > EDIT_THRESHOLD).to(torch.float32)


def _edit_per_frame(edit_mask: Tensor, source: Tensor, name: str = "edit_mask", allow_empty: bool = False) -> Tensor:
    """Validate and binarise a MASK for `source` [T, H, W, 3]; one frame is repeated to all T. -> [T, H, W].
    allow_empty: a slice of a clip whose mask was validated whole (a training window, a chunk) may hold no edit
    pixel (the object has left the frame): then nothing is greyed there; a user's whole mask may not."""
    mask = check_mask(edit_mask.float().cpu() if edit_mask.device.type != source.device.type else edit_mask.float(),
                      name, source)
    edit = binarize_edit_mask(mask).to(source.device)
    if not allow_empty and not bool(edit.any()):
        raise ValueError(
            f"{name} is empty (no pixel > {EDIT_THRESHOLD}), so nothing would be edited. Leave the mask unconnected "
            "for a global edit (frames 2..T are generated whole, LoRA-Edit's stylisation setting), or check the "
            "mask node (inverted mask? wrong threshold?)."
        )
    if edit.shape[0] == 1:
        edit = edit.expand(source.shape[0], -1, -1)
    return edit


def _end_frames(frames: Tensor, name: str, what: str, h: int, w: int) -> Tensor:
    """head/tail IMAGE [K, H, W, 3] (or [H, W, 3]) checked against the clip's size -> [K, H, W, 3]."""
    if frames.ndim == 3:
        frames = frames[None]
    check_video(frames, f"{name} ({what})")
    if tuple(frames.shape[1:3]) != (h, w):
        raise ValueError(
            f"the {what} is {frames.shape[2]}x{frames.shape[1]} but the source clip is {w}x{h} (WxH); fit it to "
            "the clip first (e.g. the size policy of the conditioning node)."
        )
    return frames


def masked_condition_video(source: Tensor, edit_mask: Optional[Tensor], head: Tensor,
                           allow_empty: bool = False, tail: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Build (V_cond [T, H, W, 3], keep [T, H, W]) for Wan I2V.

    source: IMAGE [T, H, W, 3] in 0..1. edit_mask: MASK [T, H, W] or [1, H, W] (1 = edit region, binarised
    at > 0.5) or None for a global edit. head: IMAGE [K, H, W, 3] (or [H, W, 3]), 1 <= K <= T.
    Frames 0..K-1 of V_cond are `head` with keep = 1; frames K..T-1 are the source with the edit region set to
    grey 0.5 and keep = 1 - edit (None: fully grey, keep = 0). allow_empty: for a slice of a validated clip,
    an all-zero edit_mask keeps every source frame (see _edit_per_frame); otherwise it is an error.
    tail: IMAGE [J, H, W, 3] (or [H, W, 3]) or None: the last J frames are `tail` with keep = 1 (a later edited
    keyframe at the clip's end: the clip is generated from both ends); K + J <= T. None changes nothing.
    """
    check_video(source, "source")
    t, h, w, _ = source.shape
    head = _end_frames(head, "head", "first frame", h, w)
    k = head.shape[0]
    if k > t:
        raise ValueError(f"head has {k} frames but the source clip only {t}; pass at most {t} head frames.")
    if tail is not None:
        tail = _end_frames(tail, "tail", "last keyframe", h, w)
        if k + tail.shape[0] > t:
            raise ValueError(f"head ({k} frames) and tail ({tail.shape[0]}) overlap in a clip of {t} frames; "
                             f"pass at most {t - k} tail frames.")
    head = head.to(source.device, source.dtype)
    if edit_mask is None:
        edit = torch.ones(t, h, w, device=source.device)
    else:
        edit = _edit_per_frame(edit_mask, source, allow_empty=allow_empty)
    keep = 1.0 - edit
    v_cond = torch.where(edit[..., None] > 0, torch.full_like(source, GREY), source)
    v_cond = torch.cat([head, v_cond[k:]], 0)
    keep = torch.cat([torch.ones(k, h, w, device=source.device), keep[k:]], 0)
    if tail is not None:
        j = tail.shape[0]
        v_cond[t - j:], keep[t - j:] = tail.to(source.device, source.dtype), 1.0
    return v_cond.contiguous(), keep.contiguous()


def masked_still(frame: Tensor, edit_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Stage-2 conditioning for one keyframe (SEED_SPEC 5.3, App. B.2): the source frame [H, W, 3] (or
    [1, H, W, 3]) with the edit region grey and keep = 0 there even though it is the "first" frame (this blocks
    the copy shortcut). edit_mask [H, W] / [1, H, W] or None (global: all grey, keep 0).
    Returns (V_cond [1, H, W, 3], keep [1, H, W])."""
    if frame.ndim == 3:
        frame = frame[None]
    check_video(frame, "keyframe")
    if edit_mask is None:
        edit = torch.ones(1, *frame.shape[1:3], device=frame.device)
    else:
        edit = _edit_per_frame(edit_mask if edit_mask.ndim == 3 else edit_mask[None], frame, "keyframe edit_mask")
    v_cond = torch.where(edit[..., None] > 0, torch.full_like(frame, GREY), frame)
    return v_cond.contiguous(), (1.0 - edit).contiguous()


def keep_channels(keep: Tensor) -> Tensor:
    """Pixel-rate keep [T, H, W] (T = 4k+1) -> Wan keep-mask channels [1, 4, F, H/8, W/8] (1 = keep)."""
    return wan_mask_channels(keep)[None]


def comfy_concat_mask(keep: Tensor) -> Tensor:
    """Pixel-rate keep [T, H, W] -> ComfyUI's `concat_mask` [1, 4, F, H/8, W/8] (1 = generate): WAN21.concat_cond
    computes 1 - concat_mask, which gives back `keep_channels(keep)` exactly (binary masks)."""
    return 1.0 - keep_channels(keep)


def wan_cond(cond_latent: Tensor, keep: Tensor, context: Tensor, clip_tokens: Optional[Tensor] = None) -> WanCond:
    """(VAE latent of V_cond in model space [1, 16, F, h, w], keep [T, H, W], text context, CLIP tokens)
    -> the WanCond the host's predict() turns into the 36-channel I2V input."""
    f = frames_to_latent(keep.shape[0])
    mask = keep_channels(keep).to(cond_latent.device, cond_latent.dtype)
    if cond_latent.ndim != 5 or tuple(cond_latent.shape[2:]) != tuple(mask.shape[2:]):
        raise ValueError(
            f"cond_latent {tuple(cond_latent.shape)} does not match the keep-mask: expected [B, 16, {f}, "
            f"{mask.shape[3]}, {mask.shape[4]}] for {keep.shape[0]} frames of {keep.shape[2]}x{keep.shape[1]}."
        )
    return WanCond(keep_mask=mask, cond_latent=cond_latent, context=context, clip_tokens=clip_tokens)


def prepare_clip(source: Tensor, edit_mask: Optional[Tensor], frame_policy: str = "trim", size_policy: str = "crop",
                 length: int = 0) -> tuple[Tensor, Optional[Tensor], list[str]]:
    """Apply the Wan rules to a clip and its mask together: first `length` frames (0 = all), 4k+1 frames by
    frame_policy ('error'/'trim'/'pad'), sizes that are multiples of 16 by size_policy ('error'/'crop'/'pad'/
    'resize'). A one-frame mask is kept as one frame. Returns (source, mask, notes of every change made)."""
    from ..video.frames import fix_frame_count, fix_size

    check_video(source, "source")
    notes = []
    if edit_mask is not None:
        edit_mask = check_mask(edit_mask.float(), "edit_mask", source)
    if length:
        if length > source.shape[0]:
            raise ValueError(f"length {length} is longer than the clip ({source.shape[0]} frames); use 0 for all.")
        source = source[:length]
        if edit_mask is not None and edit_mask.shape[0] > 1:
            edit_mask = edit_mask[:length]
    source, note = fix_frame_count(source, frame_policy)
    if note:
        notes.append(note)
        if edit_mask is not None and edit_mask.shape[0] > 1:
            edit_mask, _ = fix_frame_count(edit_mask, frame_policy)
    source, note = fix_size(source, size_policy)
    if note:
        notes.append(note)
        if edit_mask is not None:
            edit_mask = (fix_size(edit_mask, size_policy)[0] > EDIT_THRESHOLD).float()
    return source, edit_mask, notes
