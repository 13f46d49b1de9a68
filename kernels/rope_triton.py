"""Fused Wan 3-D RoPE in Triton: q and k rotated in one pass, angles computed on the fly from per-token
positions (no [L, D/2, 2, 2] table). Same convention as kernels/rope.py (its reference and oracle).

One program per token row (b, l): it loads the token's 3 positions and the [D/2] inverse frequencies (float64
values split into float32 hi + lo), forms the D/2 angles in float32 plus a first-order correction for what the
float32 product lost (so long positions keep fp64-like accuracy), and rotates every head of q and k with them. Backward = rotation by -angle.
The product's rounding error comes from Dekker's two-product (12-bit halves, exact in plain float32 arithmetic),
not from `tl.fma`: Triton 3.8's interpreter evaluates fma as a rounded multiply-add, which returned 0 there.
Imports triton at module import: the dispatch in kernels/__init__.py imports this module lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rope import THETA, rope_axis_index, rope_omega


@triton.jit
def _rope_kernel(Q, K, OQ, OK, POS, OMEGA, AXIS, L, H,
                 s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_ob, s_ol, s_oh,
                 SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    b = row // L
    l_idx = row % L
    pairs = tl.arange(0, BLOCK_P)
    heads = tl.arange(0, BLOCK_H)
    pmask = pairs < HALF
    axis = tl.load(AXIS + pairs, mask=pmask, other=0)
    w_hi = tl.load(OMEGA + pairs, mask=pmask, other=0.0)            # float64 frequencies split in hi + lo,
    w_lo = tl.load(OMEGA + HALF + pairs, mask=pmask, other=0.0)      # and w_hi itself in 12-bit halves wh + wl
    wh = tl.load(OMEGA + 2 * HALF + pairs, mask=pmask, other=0.0)
    wl = tl.load(OMEGA + 3 * HALF + pairs, mask=pmask, other=0.0)
    p = tl.load(POS + l_idx * 3 + axis, mask=pmask, other=0.0)
    ang = p * w_hi
    t = p * 4097.0                                                   # Veltkamp split of p: p = ph + pl exactly
    ph = t - (t - p)
    pl = p - ph
    err = (((ph * wh - ang) + ph * wl) + pl * wh) + pl * wl + p * w_lo   # what the float32 product lost (Dekker)
    c0 = tl.cos(ang)
    s0 = tl.sin(ang)
    c = (c0 - s0 * err)[None, :]                                     # first-order correction: near-fp64 angles
    s = ((s0 + c0 * err) * SIGN)[None, :]
    m = (heads[:, None] < H) & pmask[None, :]
    even = heads[:, None] * s_qh + 2 * pairs[None, :]
    q0 = tl.load(Q + b * s_qb + l_idx * s_ql + even, mask=m, other=0.0).to(tl.float32)
    q1 = tl.load(Q + b * s_qb + l_idx * s_ql + even + 1, mask=m, other=0.0).to(tl.float32)
    out = OQ + b * s_ob + l_idx * s_ol + heads[:, None] * s_oh + 2 * pairs[None, :]
    tl.store(out, (q0 * c - q1 * s).to(OQ.dtype.element_ty), mask=m)
    tl.store(out + 1, (q0 * s + q1 * c).to(OQ.dtype.element_ty), mask=m)
    even = heads[:, None] * s_kh + 2 * pairs[None, :]
    k0 = tl.load(K + b * s_kb + l_idx * s_kl + even, mask=m, other=0.0).to(tl.float32)
    k1 = tl.load(K + b * s_kb + l_idx * s_kl + even + 1, mask=m, other=0.0).to(tl.float32)
    out = OK + b * s_ob + l_idx * s_ol + heads[:, None] * s_oh + 2 * pairs[None, :]
    tl.store(out, (k0 * c - k1 * s).to(OK.dtype.element_ty), mask=m)
    tl.store(out + 1, (k0 * s + k1 * c).to(OK.dtype.element_ty), mask=m)


def _launch(q: Tensor, k: Tensor, pos: Tensor, omega: Tensor, axis: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    assert q.shape == k.shape and q.ndim == 4, "q and k must both be [B, L, H, D]"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the head dim must be contiguous"
    b, seq, h, d = q.shape
    assert pos.shape == (seq, 3) and pos.dtype == torch.float32 and pos.is_contiguous()
    oq, ok = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)
    _rope_kernel[(b * seq,)](
        q, k, oq, ok, pos, omega, axis, seq, h,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        oq.stride(0), oq.stride(1), oq.stride(2),
        SIGN=sign, HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), BLOCK_P=triton.next_power_of_2(d // 2),
    )
    return oq, ok


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, pos, omega, axis):
        ctx.save_for_backward(pos, omega, axis)
        return _launch(q, k, pos, omega, axis, 1.0)

    @staticmethod
    def backward(ctx, gq, gk):
        pos, omega, axis = ctx.saved_tensors
        dq, dk = _launch(gq.contiguous(), gk.contiguous(), pos, omega, axis, -1.0)
        return dq, dk, None, None, None


def rope_qk_triton(q: Tensor, k: Tensor, pos: Tensor, theta: float = THETA) -> tuple[Tensor, Tensor]:
    """q, k [B, L, H, D] (same shape, CUDA or the interpreter's CPU), pos [L, 3] -> (RoPE(q), RoPE(k)).

    Differentiable in q and k (positions are treated as constants)."""
    d = q.shape[-1]
    wide = rope_omega(d, theta, q.device)
    hi = wide.float()
    split = hi * 4097.0                                              # Veltkamp: hi = wh + wl, 12 bits each
    wh = split - (split - hi)
    omega = torch.cat([hi, (wide - hi.double()).float(), wh, hi - wh])
    axis = rope_axis_index(d, q.device).to(torch.int32)
    return _FusedRope.apply(q, k, pos.to(device=q.device, dtype=torch.float32).contiguous(), omega, axis)
