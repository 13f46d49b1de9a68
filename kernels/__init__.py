"""Compute kernels: each a pure-torch reference, a Triton version and a dispatch here (STYLE.md 5.7).

`rope_qk(q, k, pos, backend)` applies Wan's 3-D RoPE at per-token positions to q and k:
backend "auto" = Triton when triton imports, the tensors are on CUDA and the shape is supported, else the
torch reference (the reason logged once); "triton" forces the kernel (error when it cannot run); "torch"
forces the reference. The Triton interpreter (TRITON_INTERPRET=1) makes "triton" runnable on CPU for tests.
Both paths are differentiable in q, k and the positions (the AST-RoPE predictor trains through them), and take
positions per head group: pos [G, L, 3] with `head_groups` (contiguous head counts, default H / G each).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..nodes.common import log_once
from .rope import (
    THETA,
    apply_rope_grouped,
    apply_rope_reference,
    head_group_sizes,
    rope_cos_sin,
    rope_reference,
    rope_split,
)

BACKENDS = ("auto", "triton", "torch")

__all__ = ["BACKENDS", "THETA", "RopeTables", "apply_rope_grouped", "apply_rope_reference", "head_group_sizes",
           "rope_cos_sin", "rope_qk", "rope_reference", "rope_split", "triton_status"]


class RopeTables:
    """Per-forward cache of the torch path's cos/sin: computed once for the current positions, reused by every
    block (the fused Triton path needs none). Positions that carry a gradient (a trained predictor's) get their
    tables computed in each block instead: a gradient-checkpointed block re-runs its forward in backward and
    must record the same ops it did the first time (block 0 would otherwise find the tables cached on its
    re-run: torch.utils.checkpoint's "different number of tensors saved" error)."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, pos: Tensor, head_dim: int, device, theta: float = THETA) -> tuple[Tensor, Tensor]:
        if pos.requires_grad and torch.is_grad_enabled():
            return rope_cos_sin(pos.to(device), head_dim, theta)
        rest = (head_dim, str(device), theta)
        if self._key is None or self._key[0] is not pos or self._key[1] != rest:
            self._value = rope_cos_sin(pos.to(device), head_dim, theta)
            self._key = (pos, rest)
        return self._value


def triton_status(device_type: str = "cuda") -> tuple[bool, str]:
    """(usable, reason) for the Triton RoPE kernel on tensors of this device type."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type != "cuda" and not interp:
        return False, f"tensors are on {device_type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"
    try:
        from . import rope_triton  # noqa: F401
    except Exception as e:  # ImportError, or a triton build that fails to initialise
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def resolve_backend(backend: str, device_type: str) -> str:
    """auto/triton/torch -> "triton" or "torch" for tensors on device_type; logs an auto fallback once."""
    if backend not in BACKENDS:
        raise ValueError(f"rope backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "torch":
        return "torch"
    ok, why = triton_status(device_type)
    if ok:
        if backend == "auto" and device_type != "cuda":   # the interpreter is for tests, never picked by auto
            return "torch"
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"rope backend 'triton' was requested but cannot run: {why}. Use backend 'auto' or 'torch'.")
    log_once(f"rope-fallback-{device_type}", "FFP kernels: fused RoPE unavailable, using the torch reference: %s", why)
    return "torch"


def rope_qk(q: Tensor, k: Tensor, pos: Tensor, theta: float = THETA, backend: str = "auto",
            host: str = "comfy", cos_sin: tuple[Tensor, Tensor] | None = None,
            head_groups: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """q, k [B, L, H, D], pos [L, 3] (t, h, w; may be fractional) or [G, L, 3] (per contiguous head group of
    sizes `head_groups`, default H / G) -> (RoPE(q), RoPE(k)) in q's dtype.
    `host` sets the torch path's operation order (bit-identical to "comfy" or "diffusers" at equal cos/sin);
    `cos_sin` = rope_cos_sin(pos, D) precomputed by the caller (torch path only; e.g. once per forward)."""
    if q.shape != k.shape or q.ndim != 4:
        raise ValueError(f"q and k must both be [B, L, H, D]; got {tuple(q.shape)} and {tuple(k.shape)}.")
    rope_split(q.shape[-1])
    if pos.ndim not in (2, 3) or tuple(pos.shape[-2:]) != (q.shape[1], 3):
        raise ValueError(f"positions must be [L, 3] = [{q.shape[1]}, 3] (or [G, {q.shape[1]}, 3] per head group) "
                         f"for q of shape {tuple(q.shape)}; got {tuple(pos.shape)}.")
    sizes = head_group_sizes(q.shape[2], pos.shape[0], head_groups) if pos.ndim == 3 else None
    if resolve_backend(backend, q.device.type) == "triton":
        from .rope_triton import rope_qk_triton

        return rope_qk_triton(q, k, pos, theta, sizes)
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(pos.to(q.device), q.shape[-1], theta)
    return (apply_rope_grouped(q, cos, sin, sizes, host=host), apply_rope_grouped(k, cos, sin, sizes, host=host))
