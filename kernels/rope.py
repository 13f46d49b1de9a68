"""Wan 3-D RoPE, pure-torch reference (the oracle for kernels/rope_triton.py).

Convention reproduced: the interleaved-pair complex RoPE of ComfyUI (`comfy/ldm/flux/layers.py EmbedND` +
`comfy/ldm/flux/math.py apply_rope1`) and diffusers (`WanRotaryPosEmbed` + `WanAttnProcessor`): channel pairs
(2j, 2j+1) of a head are rotated by one angle; the head's D/2 pairs are split between the axes (t, h, w) as
[D - 4(D//6), 2(D//6), 2(D//6)] real dims (128 -> 44/42/42); pair j of axis a (dim D_a) at position p turns by
p * theta^(-2j/D_a). Positions may be fractional (AST-RoPE), so angles are computed from positions directly.

Shapes: x [B, L, H, D]; pos [L, 3] (t, h, w) per token; cos/sin [L, D/2]. Per-head positions: pos [G, L, 3]
with the H heads split into G contiguous groups (`head_groups` = their sizes, default H / G each); cos/sin
[G, L, D/2]; each group's heads are rotated with their own rows (no per-head table is built).
"""

from __future__ import annotations

import torch
from torch import Tensor

THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis (t, h, w) exactly as Wan builds them; ValueError when head_dim cannot be split."""
    if head_dim < 6 or head_dim % 2:
        raise ValueError(
            f"Wan 3-D RoPE needs an even head_dim >= 6 to split into t/h/w pairs; got head_dim {head_dim}. "
            "Is this a Wan 2.1 DiT (head_dim 128)?"
        )
    s = head_dim // 6
    return head_dim - 4 * s, 2 * s, 2 * s


def rope_omega(head_dim: int, theta: float = THETA, device=None) -> Tensor:
    """Inverse frequencies [D/2] float64, axes concatenated (t, h, w); as ComfyUI's `rope()` computes them."""
    parts = []
    for dim in rope_split(head_dim):
        scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=device)
        parts.append(1.0 / (theta**scale))
    return torch.cat(parts)


def rope_axis_index(head_dim: int, device=None) -> Tensor:
    """[D/2] long: which position column (0 = t, 1 = h, 2 = w) drives each pair."""
    dt, dh, dw = rope_split(head_dim)
    return torch.repeat_interleave(torch.arange(3, device=device), torch.tensor([dt // 2, dh // 2, dw // 2], device=device))


def rope_angles(pos: Tensor, head_dim: int, theta: float = THETA) -> Tensor:
    """pos [L, 3] or [G, L, 3] -> angles [(G,) L, D/2] in float64. Positions are rounded to float32 first, as
    ComfyUI does."""
    if pos.ndim not in (2, 3) or pos.shape[-1] != 3:
        raise ValueError(f"positions must be [L, 3] (t, h, w per token) or [G, L, 3] (per head group); "
                         f"got {tuple(pos.shape)}.")
    omega = rope_omega(head_dim, theta, pos.device)
    p = pos.to(torch.float32).to(torch.float64)[..., rope_axis_index(head_dim, pos.device)]
    return p * omega


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float = THETA) -> tuple[Tensor, Tensor]:
    """pos [(G,) L, 3] -> cos, sin [(G,) L, D/2] float32 (float64 angles, as ComfyUI and diffusers build their tables)."""
    ang = rope_angles(pos, head_dim, theta)
    return ang.cos().float(), ang.sin().float()


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor, upcast: bool = True, host: str = "comfy") -> Tensor:
    """x [B, L, H, D] (pairs interleaved), cos/sin [L, D/2] -> x rotated, in x's dtype.

    upcast=True computes in >= float32 (float64 stays float64, so this is also the oracle); upcast=False in x's
    dtype. host picks the operation order so results are bit-identical to that host for the same cos/sin:
    "comfy" = apply_rope1 (c*a then addcmul(-s, b)), "diffusers" = WanAttnProcessor (a*c - b*s)."""
    wide = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    c, s = cos.to(wide)[None, :, None], sin.to(wide)[None, :, None]      # [1, L, 1, D/2]
    if host == "diffusers":
        xw = x.to(wide)
        a, b = xw.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(xw)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out.to(x.dtype)
    xp = x.to(wide).reshape(*x.shape[:-1], -1, 1, 2)                      # [B, L, H, D/2, 1, 2]
    out = torch.stack([c, s], dim=-1) * xp[..., 0]                        # column multiplying the even element
    out.addcmul_(torch.stack([-s, c], dim=-1), xp[..., 1])                # column multiplying the odd element
    return out.reshape(x.shape).to(x.dtype)


def head_group_sizes(heads: int, groups: int, head_groups: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Sizes of the G contiguous head groups (default H / G each); ValueError naming the numbers otherwise."""
    if head_groups is None:
        if groups < 1 or heads % groups:
            raise ValueError(f"{heads} attention heads do not split into {groups} equal head groups; give the "
                             "group sizes (head_groups) or a split the head count divides.")
        return (heads // groups,) * groups
    sizes = tuple(int(n) for n in head_groups)
    if len(sizes) != groups or sum(sizes) != heads or min(sizes) < 0:
        raise ValueError(f"head groups {sizes} must be {groups} non-negative sizes summing to the {heads} heads.")
    return sizes


def apply_rope_grouped(x: Tensor, cos: Tensor, sin: Tensor, head_groups: tuple[int, ...] | None = None,
                       upcast: bool = True, host: str = "comfy") -> Tensor:
    """x [B, L, H, D], cos/sin [L, D/2] or [G, L, D/2] (one row set per contiguous head group) -> RoPE(x).
    One group = apply_rope_reference itself (bit-identical)."""
    if cos.ndim == 2:
        return apply_rope_reference(x, cos, sin, upcast, host)
    sizes = head_group_sizes(x.shape[2], cos.shape[0], head_groups)
    parts = [apply_rope_reference(xg, cos[g], sin[g], upcast, host)
             for g, xg in enumerate(x.split(list(sizes), dim=2))]
    return torch.cat(parts, dim=2)


def rope_reference(x: Tensor, pos: Tensor, theta: float = THETA, upcast: bool = True, host: str = "comfy",
                   head_groups: tuple[int, ...] | None = None) -> Tensor:
    """x [B, L, H, D], pos [L, 3] or [G, L, 3] -> RoPE(x) at those (possibly fractional) positions."""
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta)
    if x.dtype == torch.float64:
        ang = rope_angles(pos, x.shape[-1], theta)
        cos, sin = ang.cos(), ang.sin()
    return apply_rope_grouped(x, cos, sin, head_groups, upcast, host)
