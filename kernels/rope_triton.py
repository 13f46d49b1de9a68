"""Fused Wan 3-D RoPE in Triton: q and k rotated in one pass, angles computed on the fly from per-token
positions (no [L, D/2, 2, 2] table). Same convention as kernels/rope.py (its reference and oracle).

One program per token row (b, l): it loads the token's 3 positions and the [D/2] inverse frequencies (float64
values split into float32 hi + lo), forms the D/2 angles in float32 plus a first-order correction for what the
float32 product lost (so long positions keep fp64-like accuracy), and rotates every head of q and k with them.
Per-head positions: pos may be [G, L, 3] with the heads split into G contiguous groups (e.g. AST-RoPE's spatial
and temporal heads); the program then forms one angle row per group and rotates that group's heads with it (a
[G, L, 3] input, never a per-head table).
Backward: q/k gradients = rotation by -angle; when the positions require grad, the same backward program also
returns d loss / d pos (issue 14: without it the AST-RoPE predictor never learned on a GPU):
  d out0 / d angle = -out1, d out1 / d angle = out0  =>  d L / d angle_j = sum_heads (g1 * out0 - g0 * out1)
  d L / d pos[a] = sum_{j of axis a} omega_j * d L / d angle_j   (summed over q and k, and over the batch).
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
def _add(a, b):
    return a + b


@triton.jit
def _sum0(x):
    """Sum over axis 0 through tl.reduce with our own combine function: tl.sum is a jit function of triton's
    standard library, which stays compiled-only when triton was imported before TRITON_INTERPRET was set."""
    return tl.reduce(x, 0, _add)


@triton.jit
def _angles(POS, OMEGA, axis, pairs, pmask, g, l_idx, L, HALF: tl.constexpr):
    """cos, sin [BLOCK_P] of token l_idx in head group g (near-fp64 angles, see the module docstring)."""
    w_hi = tl.load(OMEGA + pairs, mask=pmask, other=0.0)            # float64 frequencies split in hi + lo,
    w_lo = tl.load(OMEGA + HALF + pairs, mask=pmask, other=0.0)      # and w_hi itself in 12-bit halves wh + wl
    wh = tl.load(OMEGA + 2 * HALF + pairs, mask=pmask, other=0.0)
    wl = tl.load(OMEGA + 3 * HALF + pairs, mask=pmask, other=0.0)
    p = tl.load(POS + (g * L + l_idx) * 3 + axis, mask=pmask, other=0.0)
    ang = p * w_hi
    t = p * 4097.0                                                   # Veltkamp split of p: p = ph + pl exactly
    ph = t - (t - p)
    pl = p - ph
    err = (((ph * wh - ang) + ph * wl) + pl * wh) + pl * wl + p * w_lo   # what the float32 product lost (Dekker)
    c0 = tl.cos(ang)
    s0 = tl.sin(ang)
    return c0 - s0 * err, s0 + c0 * err, w_hi + w_lo                 # first-order correction: near-fp64 angles


@triton.jit
def _rope_kernel(Q, K, OQ, OK, POS, OMEGA, AXIS, GSTART, DPOS, L, H,
                 s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_ob, s_ol, s_oh,
                 SIGN: tl.constexpr, G: tl.constexpr, POS_GRAD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Forward (SIGN +1: Q, K = q, k) or backward (SIGN -1: Q, K = the output grads; with POS_GRAD, OQ, OK hold
    the forward inputs on entry, and DPOS [B, G, L, 3] receives d loss / d pos before they are overwritten)."""
    row = tl.program_id(0)
    b = row // L
    l_idx = row % L
    pairs = tl.arange(0, BLOCK_P)
    heads = tl.arange(0, BLOCK_H)
    pmask = pairs < HALF
    axis = tl.load(AXIS + pairs, mask=pmask, other=0)
    for g in tl.static_range(G):
        h0 = tl.load(GSTART + g)
        h1 = tl.load(GSTART + g + 1)
        c1, s1, w = _angles(POS, OMEGA, axis, pairs, pmask, g, l_idx, L, HALF)
        c = c1[None, :]
        s = (s1 * SIGN)[None, :]
        m = (heads[:, None] >= h0) & (heads[:, None] < h1) & pmask[None, :]
        q_even = Q + b * s_qb + l_idx * s_ql + heads[:, None] * s_qh + 2 * pairs[None, :]
        k_even = K + b * s_kb + l_idx * s_kl + heads[:, None] * s_kh + 2 * pairs[None, :]
        oq = OQ + b * s_ob + l_idx * s_ol + heads[:, None] * s_oh + 2 * pairs[None, :]
        ok = OK + b * s_ob + l_idx * s_ol + heads[:, None] * s_oh + 2 * pairs[None, :]
        q0 = tl.load(q_even, mask=m, other=0.0).to(tl.float32)
        q1 = tl.load(q_even + 1, mask=m, other=0.0).to(tl.float32)
        k0 = tl.load(k_even, mask=m, other=0.0).to(tl.float32)
        k1 = tl.load(k_even + 1, mask=m, other=0.0).to(tl.float32)
        if POS_GRAD:   # forward outputs from the saved inputs x: out0 = x0 c - x1 s, out1 = x0 s + x1 c
            x0 = tl.load(oq, mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(oq + 1, mask=m, other=0.0).to(tl.float32)
            y0 = tl.load(ok, mask=m, other=0.0).to(tl.float32)
            y1 = tl.load(ok + 1, mask=m, other=0.0).to(tl.float32)
            cf = c1[None, :]
            sf = s1[None, :]
            dang = q1 * (x0 * cf - x1 * sf) - q0 * (x0 * sf + x1 * cf) \
                + k1 * (y0 * cf - y1 * sf) - k0 * (y0 * sf + y1 * cf)
            dang = _sum0(tl.where(m, dang, 0.0)) * w           # [BLOCK_P]: d loss / d angle * omega
            base = DPOS + ((b * G + g) * L + l_idx) * 3
            tl.store(base + 0, _sum0(tl.where(axis == 0, dang, 0.0)))
            tl.store(base + 1, _sum0(tl.where(axis == 1, dang, 0.0)))
            tl.store(base + 2, _sum0(tl.where(axis == 2, dang, 0.0)))
        tl.store(oq, (q0 * c - q1 * s).to(OQ.dtype.element_ty), mask=m)
        tl.store(oq + 1, (q0 * s + q1 * c).to(OQ.dtype.element_ty), mask=m)
        tl.store(ok, (k0 * c - k1 * s).to(OK.dtype.element_ty), mask=m)
        tl.store(ok + 1, (k0 * s + k1 * c).to(OK.dtype.element_ty), mask=m)


def _launch(q: Tensor, k: Tensor, pos: Tensor, omega: Tensor, axis: Tensor, gstart: Tensor, sign: float,
            saved: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """pos [G, L, 3] float32. saved = the forward's (q, k) when the position gradient is wanted (backward)."""
    assert q.shape == k.shape and q.ndim == 4, "q and k must both be [B, L, H, D]"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the head dim must be contiguous"
    b, seq, h, d = q.shape
    groups = pos.shape[0]
    assert pos.shape == (groups, seq, 3) and pos.dtype == torch.float32 and pos.is_contiguous()
    if saved is None:
        oq, ok = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)
        dpos = torch.empty(1, device=q.device, dtype=torch.float32)
    else:   # the kernel reads the forward inputs from the output buffers, then overwrites them with dq, dk
        oq, ok = (x.to(q.dtype).contiguous().clone() for x in saved)
        dpos = torch.empty(b, groups, seq, 3, device=q.device, dtype=torch.float32)
    _rope_kernel[(b * seq,)](
        q, k, oq, ok, pos, omega, axis, gstart, dpos, seq, h,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        oq.stride(0), oq.stride(1), oq.stride(2),
        SIGN=sign, G=groups, POS_GRAD=saved is not None, HALF=d // 2,
        BLOCK_H=triton.next_power_of_2(h), BLOCK_P=triton.next_power_of_2(d // 2),
    )
    return oq, ok, (dpos.sum(0) if saved is not None else None)


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, pos, omega, axis, gstart):
        ctx.pos_grad = pos.requires_grad
        ctx.save_for_backward(pos.detach(), omega, axis, gstart, *((q, k) if ctx.pos_grad else ()))
        oq, ok, _ = _launch(q, k, pos.detach(), omega, axis, gstart, 1.0)
        return oq, ok

    @staticmethod
    def backward(ctx, gq, gk):
        pos, omega, axis, gstart, *saved = ctx.saved_tensors
        dq, dk, dpos = _launch(gq.contiguous(), gk.contiguous(), pos, omega, axis, gstart, -1.0,
                               tuple(saved) if ctx.pos_grad else None)
        return dq, dk, dpos, None, None, None


def rope_qk_triton(q: Tensor, k: Tensor, pos: Tensor, theta: float = THETA,
                   head_groups: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """q, k [B, L, H, D] (same shape, CUDA or the interpreter's CPU), pos [L, 3] or [G, L, 3] (one position set
    per contiguous head group of sizes `head_groups`, default H / G each) -> (RoPE(q), RoPE(k)).

    Differentiable in q, k and pos (the gradient of pos has pos's shape; computed only when pos requires grad)."""
    d, h = q.shape[-1], q.shape[2]
    wide = rope_omega(d, theta, q.device)
    hi = wide.float()
    split = hi * 4097.0                                              # Veltkamp: hi = wh + wl, 12 bits each
    wh = split - (split - hi)
    omega = torch.cat([hi, (wide - hi.double()).float(), wh, hi - wh])
    axis = rope_axis_index(d, q.device).to(torch.int32)
    grouped = pos.ndim == 3
    p = (pos if grouped else pos[None]).to(device=q.device, dtype=torch.float32).contiguous()
    sizes = head_groups if head_groups is not None else (h // p.shape[0],) * p.shape[0]
    assert len(sizes) == p.shape[0] and sum(sizes) == h, f"head groups {sizes} must cover the {h} heads"
    gstart = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=q.device, dtype=torch.int32)
    oq, ok = _FusedRope.apply(q, k, p, omega, axis, gstart)
    return oq, ok
