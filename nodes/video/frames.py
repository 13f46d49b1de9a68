"""IMAGE/MASK/latent conventions and their rules (DESIGN.md section 2), written once.

IMAGE: float [T, H, W, 3] in 0..1.  MASK: float [T, H, W] in 0..1, 1 = the edit region.
Wan keep-mask: 1 = keep (the opposite), used only by conditioning builders.
Wan latents: [B, 16, F, H/8, W/8] with T = 4k+1 frames, F = (T-1)/4+1, H and W multiples of 16.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .formats import FIT_POLICIES, FRAME_POLICIES, SIZE_POLICIES  # noqa: F401  (defined torch-free there)


def check_video(frames: torch.Tensor, name: str = "video") -> torch.Tensor:
    """Validate an IMAGE batch [T, H, W, 3]: shape, at least one frame, finite values. Returns it."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{name} must be frames [T, H, W, 3] (ComfyUI IMAGE); got {shape}.")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(frames.shape)}.")
    where = [t for t in range(frames.shape[0]) if not torch.isfinite(frames[t]).all()]  # per frame: no [T,H,W,3] temporary
    if where:
        raise ValueError(f"{name} has NaN/inf values in frame(s) {where[:10]} (0-based); "
                         "check the node that produced it (a failed decode or a division by zero).")
    return frames


def check_mask(mask: torch.Tensor, name: str = "mask", frames: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a MASK [T, H, W] (or [H, W], returned as [1, H, W]); optionally against frames [T, H, W, 3]."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"{name} must be [T, H, W] (ComfyUI MASK); got {tuple(mask.shape)}.")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} has NaN/inf values.")
    if frames is not None:
        if tuple(mask.shape[1:]) != tuple(frames.shape[1:3]):
            raise ValueError(f"{name} is {mask.shape[2]}x{mask.shape[1]} but the video is "
                             f"{frames.shape[2]}x{frames.shape[1]} (WxH). Resize the mask to the video first.")
        if mask.shape[0] not in (1, frames.shape[0]):
            raise ValueError(f"{name} has {mask.shape[0]} frames but the video has {frames.shape[0]}; "
                             "give one mask for frame 1 or one per frame.")
    return mask


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """IMAGE [..., H, W, 3] float 0..1 -> uint8 numpy of the same shape (rounded, clipped)."""
    return (frames.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 numpy [..., H, W, C] -> float tensor in 0..1. Read-only arrays (PIL's, PyAV's) are copied first:
    torch.from_numpy warns on them, and the float conversion copies anyway."""
    return torch.from_numpy(np.require(array, requirements=("C", "W"))).float() / 255.0


def edit_to_keep(mask: torch.Tensor) -> torch.Tensor:
    """MASK (1 = edit region) -> Wan keep-mask (1 = keep). Same shape."""
    return 1.0 - mask


def keep_to_edit(keep: torch.Tensor) -> torch.Tensor:
    """Wan keep-mask (1 = keep) -> MASK (1 = edit region). Same shape."""
    return 1.0 - keep


def wan_mask_channels(keep: torch.Tensor) -> torch.Tensor:
    """Pixel-rate keep-mask [T, H, W] (T = 4k+1) -> Wan's 4-channel concat mask [4, F, H/8, W/8].

    Nearest-downsampled by 8; frame 0 repeated 4x so each latent frame holds its 4 pixel frames."""
    t, h, w = keep.shape
    frames_to_latent(t)
    small = F.interpolate(keep[:, None].float(), size=(h // 8, w // 8), mode="nearest")[:, 0]
    small = torch.cat([small[:1].repeat(4, 1, 1), small[1:]], 0)  # [T+3, h, w]
    return small.reshape(-1, 4, h // 8, w // 8).transpose(0, 1).contiguous()


def frames_to_latent(num_frames: int) -> int:
    """Latent frames F for T pixel frames; T must be 4k+1."""
    if num_frames < 1 or (num_frames - 1) % 4:
        lo = max(1, num_frames - (num_frames - 1) % 4)
        raise ValueError(f"Wan needs 4k+1 frames (5, 9, ..., 49, 81); got {num_frames}. "
                         f"Trim to {lo} or pad to {lo + 4} (frame policy 'trim' or 'pad').")
    return (num_frames - 1) // 4 + 1


def latent_shape(num_frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """[B, 16, F, H/8, W/8] for a clip of T x H x W (T 4k+1, H and W multiples of 16)."""
    if height % 16 or width % 16:
        raise ValueError(f"Wan needs width and height that are multiples of 16; got {width}x{height}.")
    return (batch, 16, frames_to_latent(num_frames), height // 8, width // 8)


def fix_frame_count(frames: torch.Tensor, policy: str) -> tuple[torch.Tensor, str]:
    """Make T = 4k+1 by policy: 'error', 'trim' (drop the tail) or 'pad' (repeat the last frame).

    frames: [T, ...]. Returns (frames, note); note is '' when nothing changed."""
    t = frames.shape[0]
    if (t - 1) % 4 == 0:
        return frames, ""
    if policy == "trim":
        keep = t - (t - 1) % 4
        return frames[:keep], f"trimmed {t} -> {keep} frames (4k+1 rule)"
    if policy == "pad":
        extra = 4 - (t - 1) % 4
        pad = frames[-1:].expand(extra, *frames.shape[1:])
        return torch.cat([frames, pad], 0), f"padded {t} -> {t + extra} frames by repeating the last (4k+1 rule)"
    if policy == "error":
        frames_to_latent(t)
    raise ValueError(f"unknown frame policy '{policy}'; use one of {FRAME_POLICIES}.")


def resize_frames(frames: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """IMAGE [T, H, W, C] (or MASK [T, H, W]) -> the same at height x width."""
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    is_mask = frames.ndim == 3
    x = frames[:, None] if is_mask else frames.permute(0, 3, 1, 2)
    kw = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x.float(), size=(height, width), mode=mode, **kw).clamp(0, 1)
    return y[:, 0] if is_mask else y.permute(0, 2, 3, 1)


def fix_size(frames: torch.Tensor, policy: str, multiple: int = 16) -> tuple[torch.Tensor, str]:
    """Make H and W multiples of `multiple` by policy 'error', 'crop' (centre), 'pad' (edge) or 'resize'.

    frames: IMAGE [T, H, W, 3] or MASK [T, H, W]. Returns (frames, note)."""
    h, w = frames.shape[1:3]
    if h % multiple == 0 and w % multiple == 0:
        return frames, ""
    if policy == "crop":
        nh, nw = h - h % multiple, w - w % multiple
        top, left = (h - nh) // 2, (w - nw) // 2
        out = frames[:, top:top + nh, left:left + nw]
    elif policy == "pad":
        nh, nw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        out = _pad_edges(frames, nh - h, nw - w)
    elif policy == "resize":
        nh, nw = max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)
        out = resize_frames(frames, nh, nw)
    elif policy == "error":
        raise ValueError(f"Wan needs width and height that are multiples of {multiple}; got {w}x{h}. "
                         "Use size policy 'crop', 'pad' or 'resize'.")
    else:
        raise ValueError(f"unknown size policy '{policy}'; use one of {SIZE_POLICIES}.")
    return out, f"{policy} {w}x{h} -> {nw}x{nh} (multiple-of-{multiple} rule)"


def _pad_edges(frames: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right by repeating edge pixels. frames: [T, H, W(, C)]."""
    is_mask = frames.ndim == 3
    x = frames[:, None] if is_mask else frames.permute(0, 3, 1, 2)
    y = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return y[:, 0] if is_mask else y.permute(0, 2, 3, 1)


def fit_to_frame(image: torch.Tensor, height: int, width: int, policy: str = "auto") -> tuple[torch.Tensor, str]:
    """Fit an edited first frame [H', W', 3] (or [1, H', W', 3]) to the clip's height x width.

    'resize' stretches; 'crop' scales to cover and centre-crops; 'pad' scales to fit and pads with edges;
    'auto' resizes when the aspect ratios agree within 1 %, else crops; 'error' refuses any change.
    Returns ([H, W, 3], note)."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"edited_first_frame must be one image; got a batch of {image.shape[0]}.")
        image = image[0]
    check_video(image[None], "edited_first_frame")
    ih, iw = image.shape[:2]
    if (ih, iw) == (height, width):
        return image, ""
    if policy not in FIT_POLICIES:
        raise ValueError(f"unknown size policy '{policy}'; use one of {FIT_POLICIES}.")
    same_aspect = abs((iw / ih) / (width / height) - 1) < 0.01
    if policy == "error":
        raise ValueError(f"edited_first_frame is {iw}x{ih} but the video is {width}x{height}. "
                         "Set size policy to 'resize', 'crop' or 'pad', or export the edit at the clip's size.")
    if policy == "auto":
        policy = "resize" if same_aspect else "crop"
    x = image[None]
    if policy == "resize":
        out = resize_frames(x, height, width)[0]
    else:
        scale = (max if policy == "crop" else min)(height / ih, width / iw)
        sh, sw = max(1, round(ih * scale)), max(1, round(iw * scale))
        scaled = resize_frames(x, sh, sw)
        if policy == "crop":
            top, left = (sh - height) // 2, (sw - width) // 2
            out = scaled[0, top:top + height, left:left + width]
        else:
            top, left = (height - sh) // 2, (width - sw) // 2
            padded = F.pad(scaled.permute(0, 3, 1, 2), (left, width - sw - left, top, height - sh - top),
                           mode="replicate")
            out = padded.permute(0, 2, 3, 1)[0]
    aspect = "same aspect" if same_aspect else f"aspect {iw / ih:.3f} vs clip {width / height:.3f}"
    return out.contiguous(), f"edited first frame {iw}x{ih} -> {width}x{height} by {policy} ({aspect})"
