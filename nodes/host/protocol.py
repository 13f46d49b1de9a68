"""What every capability needs from a Wan DiT, whoever hosts it (DESIGN.md section 3).

Shapes: B batch, F latent frames, h/w latent height/width (pixels / 8), L text tokens.
Time is flow-matching time t in 0..1 (1 = pure noise); hosts feed the DiT `t * 1000`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

LATENT_CHANNELS = 16
MASK_CHANNELS = 4
CLIP_DIM = 1280

RopePositionFn = Callable[[Tensor], Tensor]
"""fn(ids [L, 3] float, columns (t, h, w), token order t, h, w) -> positions [L, 3], or [G, L, 3]: one set per
contiguous group of H / G attention heads (AST-RoPE's paper variant; only the fused RoPE path applies those)."""


@dataclass(frozen=True)
class WanDims:
    """Sizes of a Wan DiT. `rope_axes_dim` = real RoPE dims per axis (t, h, w), e.g. (44, 42, 42) for head_dim 128.
    `clip_dim` is 1280 when the model has an image (CLIP-vision) embedder, else None."""

    hidden_size: int
    num_heads: int
    head_dim: int
    num_layers: int
    patch_size: tuple[int, int, int]
    in_channels: int
    out_channels: int
    text_dim: int
    rope_axes_dim: tuple[int, int, int]
    clip_dim: Optional[int] = None


@dataclass(frozen=True)
class WanCond:
    """I2V conditioning in model space.

    keep_mask:   [B, 4, F, h, w], 1 = keep (Wan's own sense, the opposite of a ComfyUI MASK).
    cond_latent: [B, C, F, h, w] model-space latent (after process_latent_in); C = 16 for I2V,
                 32 (control latent then image latent) for Fun-Control.
    context:     [B, L, text_dim] text encoder output (UMT5: L = 512, text_dim = 4096).
    clip_tokens: [B, 257, 1280] CLIP-vision-H penultimate tokens, or None.
    """

    keep_mask: Optional[Tensor]
    cond_latent: Optional[Tensor]
    context: Tensor
    clip_tokens: Optional[Tensor] = None


@runtime_checkable
class WanDiT(Protocol):
    """A Wan DiT behind one interface; implemented by `ComfyWan` and `DiffusersWan`."""

    @property
    def dims(self) -> WanDims: ...

    @property
    def module(self) -> nn.Module:
        """The DiT root module; `linear_names()` paths are relative to it."""
        ...

    def predict(self, x_t: Tensor, t: Tensor | float, cond: WanCond) -> Tensor:
        """x_t [B, 16, F, h, w], t [B] in 0..1 -> velocity [B, 16, F, h, w] in x_t's dtype."""
        ...

    def blocks(self) -> list[nn.Module]: ...

    def linear_names(self) -> dict[str, list[str]]:
        """Canonical name (see names.CANONICAL) -> one module path per block; names the model lacks are absent."""
        ...

    def with_rope_positions(self, fn: RopePositionFn) -> "WanDiT":
        """A new adapter whose model builds RoPE from fn(ids); this adapter and its model stay unchanged."""
        ...


def training_context(dit) -> contextlib.AbstractContextManager:
    """The host's training contract for a loop that backpropagates through `dit` (ComfyUI: `host_training`,
    the `in_training` switch); a no-op for adapters that have none (diffusers)."""
    enter = getattr(dit, "training_contract", None)
    return enter() if callable(enter) else contextlib.nullcontext()


def host_streams_weights(dit) -> bool:
    """Whether the host already streams `dit`'s weights to the device (ComfyUI dynamic VRAM)."""
    check = getattr(dit, "streams_weights", None)
    return bool(check()) if callable(check) else False


def stock_rope_ids(frames: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Integer position grid [F*h'*w', 3] of (t, h, w) in token order t, h, w (h', w' = patch grid)."""
    t = torch.arange(frames, device=device, dtype=dtype)
    h = torch.arange(height, device=device, dtype=dtype)
    w = torch.arange(width, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def apply_position_fn(fn: RopePositionFn, ids: Tensor) -> Tensor:
    """Run a position hook on ids [L, 3] and check it returned [L, 3] (or [G, L, 3] per head group)."""
    if ids.ndim == 3:
        raise ValueError("a RoPE position hook after a per-head-group one: the per-group hook must come last.")
    out = fn(ids)
    if not isinstance(out, Tensor) or tuple(out.shape[-2:]) != tuple(ids.shape) or out.ndim not in (2, 3):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"RoPE position function must return a tensor shaped like its input {tuple(ids.shape)} "
            f"(columns t, h, w), or [G, {ids.shape[0]}, 3] per head group; it returned {got}."
        )
    return out


def shared_positions(pos: Tensor) -> Tensor:
    """[L, 3] -> itself; per-head-group [G, L, 3] -> the last group's [L, 3] (what a consumer that takes one
    position set, e.g. a stock rope table, gets; the fused RoPE path applies every group)."""
    return pos[-1] if pos.ndim == 3 else pos


def compose_position_fns(first: RopePositionFn, then: RopePositionFn) -> RopePositionFn:
    """ids -> then(first(ids)); used when a hook is added to an already hooked adapter. `static` (same ids give
    the same positions, so a host may cache its tables) when both parts are."""
    def composed(ids: Tensor) -> Tensor:
        return apply_position_fn(then, apply_position_fn(first, ids))
    composed.static = getattr(first, "static", False) and getattr(then, "static", False)
    return composed


def _batch(name: str, x: Tensor, batch: int) -> Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]} but x_t has batch {batch}; pass batch {batch} or 1.")


def timesteps(t: Tensor | float, batch: int, device) -> Tensor:
    """t in 0..1 (float, [1] or [B]) -> [B] float32 timesteps in the DiT's 0..1000 scale."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"t has {t.numel()} values but x_t has batch {batch}; pass one t or one per sample.")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"t must be flow-matching time in 0..1 (1 = noise); got {t.tolist()}. Divide timesteps by 1000.")
    return (t * 1000.0).expand(batch).contiguous()


def model_input(x_t: Tensor, cond: WanCond, dims: WanDims) -> Tensor:
    """Build the DiT input from x_t [B, 16, F, h, w] and cond, following ComfyUI's WAN21.concat_cond.

    in_channels 16: x_t alone (T2V; keep_mask/cond_latent are ignored).
    in_channels 16 + 4 + C: cat([x_t, keep_mask, cond_latent]) (I2V: 36).
    in_channels 16 + C: cat([x_t, cond_latent]) (Fun-Control: 48, no mask).
    """
    if x_t.ndim != 5 or x_t.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"x_t must be a Wan latent [B, 16, F, h, w]; got shape {tuple(x_t.shape)}.")
    b, _, f, h, w = x_t.shape
    _, ph, pw = dims.patch_size
    if h % ph or w % pw:
        raise ValueError(
            f"latent size {h}x{w} is not a multiple of the patch size {ph}x{pw}; "
            f"use pixel sizes that are multiples of {8 * ph}x{8 * pw}."
        )
    extra = dims.in_channels - LATENT_CHANNELS
    if extra == 0:
        return x_t
    if cond.cond_latent is None:
        raise ValueError(
            f"this model takes {dims.in_channels} input channels (image-to-video) but cond.cond_latent is None; "
            "pass the conditioning latent (VAE latent of the first frame, zeros elsewhere)."
        )
    lat = cond.cond_latent
    if lat.ndim != 5 or tuple(lat.shape[2:]) != (f, h, w):
        raise ValueError(f"cond_latent has shape {tuple(lat.shape)} but x_t is {tuple(x_t.shape)}; F, h, w must match.")
    parts = [x_t]
    if extra == MASK_CHANNELS + lat.shape[1]:
        mask = cond.keep_mask
        if mask is None or mask.ndim != 5 or tuple(mask.shape[1:]) != (MASK_CHANNELS, f, h, w):
            got = None if mask is None else tuple(mask.shape)
            raise ValueError(
                f"this model takes {dims.in_channels} channels = 16 noise + 4 mask + {lat.shape[1]} latent, "
                f"so keep_mask must be [B, 4, {f}, {h}, {w}] (1 = keep); got {got}."
            )
        parts.append(_batch("keep_mask", mask, b))
    elif extra != lat.shape[1]:
        raise ValueError(
            f"this model takes {dims.in_channels} input channels but cond_latent has {lat.shape[1]}: expected "
            f"{extra - MASK_CHANNELS} (with the 4-channel keep_mask) or {extra} (Fun-Control style, no mask). "
            "Is this the right Wan variant (I2V = 36, Fun-Control = 48, T2V = 16)?"
        )
    parts.append(_batch("cond_latent", lat, b))
    return torch.cat([p.to(x_t.dtype) for p in parts], dim=1)


def check_context(cond: WanCond, dims: WanDims, batch: int) -> Tensor:
    """cond.context [B or 1, L, text_dim] -> [B, L, text_dim]."""
    ctx = cond.context
    if ctx is None or ctx.ndim != 3 or ctx.shape[-1] != dims.text_dim:
        got = None if ctx is None else tuple(ctx.shape)
        raise ValueError(f"context must be [B, L, {dims.text_dim}] (the model's text_dim); got {got}.")
    return _batch("context", ctx, batch)


def check_clip(cond: WanCond, dims: WanDims, batch: int) -> Optional[Tensor]:
    """cond.clip_tokens [B or 1, N, 1280] -> [B, N, 1280], or None when absent."""
    clip = cond.clip_tokens
    if clip is None:
        return None
    if clip.ndim != 3 or clip.shape[-1] != CLIP_DIM:
        raise ValueError(f"clip_tokens must be [B, 257, {CLIP_DIM}] (CLIP-vision-H penultimate); got {tuple(clip.shape)}.")
    return _batch("clip_tokens", clip, batch)
