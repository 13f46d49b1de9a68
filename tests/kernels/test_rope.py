"""Wan 3-D RoPE: the torch reference's convention, and the fused Triton kernel vs the fp64 oracle.

On CPU the Triton cases run through Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported
when no GPU is present); they skip with the reason when triton is not installed. The CUDA cases are marked gpu.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ffprop.kernels import apply_rope_reference, resolve_backend, rope_cos_sin, rope_qk, rope_reference, rope_split  # noqa: E402
from ffprop.kernels.rope import rope_angles  # noqa: E402

try:
    from ffprop.kernels.rope_triton import rope_qk_triton
    TRITON_ERROR = None
except Exception as e:  # ImportError, or a triton build that cannot initialise here
    rope_qk_triton, TRITON_ERROR = None, f"{type(e).__name__}: {e}"

needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton not importable: {TRITON_ERROR}")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def positions(length: int, seed: int = 0, scale: float = 40.0) -> torch.Tensor:
    """[L, 3] fractional positions (AST-RoPE style), large enough to exercise long angles."""
    return torch.rand(length, 3, generator=torch.Generator().manual_seed(seed)) * scale


def complex_oracle(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Independent fp64 formulation: pairs (2j, 2j+1) as complex numbers times exp(i * p_axis * theta^(-2j/D_a))."""
    d = x.shape[-1]
    angles = []
    for axis, dim in enumerate(rope_split(d)):
        j = torch.arange(dim // 2, dtype=torch.float64)
        angles.append(pos[:, axis, None].double() * theta ** (-2 * j / dim))
    rot = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=1))        # [L, D/2]
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * rot[None, :, None]).reshape(x.shape)


def test_split_matches_wan():
    assert rope_split(128) == (44, 42, 42) and rope_split(12) == (4, 4, 4) and rope_split(64) == (24, 20, 20)
    for bad in (4, 7, 127):
        with pytest.raises(ValueError, match="head_dim"):
            rope_split(bad)


@pytest.mark.parametrize("head_dim", [12, 128])
def test_reference_equals_independent_complex_formula(head_dim):
    x = torch.randn(2, 9, 3, head_dim, dtype=torch.float64)
    pos = positions(9)
    torch.testing.assert_close(rope_reference(x, pos), complex_oracle(x, pos), rtol=0, atol=1e-12)


def test_angles_follow_formula_at_fractional_positions():
    pos = torch.tensor([[0.5, 2.25, 7.75]])
    ang = rope_angles(pos, 12)[0]                         # axes dims (4, 4, 4): 2 pairs each
    expect = [0.5, 0.5 * 1e4 ** -0.5, 2.25, 2.25 * 1e4 ** -0.5, 7.75, 7.75 * 1e4 ** -0.5]
    torch.testing.assert_close(ang, torch.tensor(expect, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("head_dim", [12, 128])
def test_reference_reproduces_diffusers_wan_rope_bit_exactly(head_dim):
    try:
        import diffusers.models.transformers.transformer_wan as diffusers_wan
    except (ImportError, RuntimeError) as e:  # diffusers wraps broken optional deps (torchaudio) in RuntimeError
        pytest.skip(f"diffusers' Wan module does not import here: {e}")
    from ffprop.nodes.host.protocol import stock_rope_ids

    rope = diffusers_wan.WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    cos, sin = rope(torch.zeros(1, 16, 5, 8, 12))                       # [1, L, 1, D], pairs repeated
    ids = stock_rope_ids(5, 4, 6)
    c, s = rope_cos_sin(ids, head_dim)
    assert torch.equal(cos[0, :, 0, 0::2], c) and torch.equal(sin[0, :, 0, 1::2], s)
    x = torch.randn(2, ids.shape[0], 3, head_dim)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)                        # WanAttnProcessor's apply_rotary_emb
    stock = torch.empty_like(x)
    stock[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    stock[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(apply_rope_reference(x, c, s, host="diffusers"), stock)


def test_dispatch_errors_and_fallback():
    q = torch.randn(1, 5, 2, 12)
    with pytest.raises(ValueError, match="positions"):
        rope_qk(q, q, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="both"):
        rope_qk(q, q[:, :4], torch.zeros(5, 3))
    with pytest.raises(ValueError, match="head_dim"):
        rope_qk(torch.randn(1, 5, 2, 9), torch.randn(1, 5, 2, 9), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="backend"):
        rope_qk(q, q, torch.zeros(5, 3), backend="cuda")
    assert resolve_backend("auto", "cpu") == "torch"                   # the interpreter is never picked by auto
    assert resolve_backend("torch", "cuda") == "torch"
    out_q, out_k = rope_qk(q, 2 * q, positions(5), backend="torch")
    torch.testing.assert_close(out_k, 2 * out_q)


GRID = [(1, 7, 3, 12), (2, 33, 5, 128), (1, 17, 40, 128)]     # odd lengths, head_dim 128, 40 heads (14B)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def errors(fused, lowp, oracle):
    e_fused = (fused.double() - oracle).abs().max().item()
    e_torch = (lowp.double() - oracle).abs().max().item()
    return e_fused, e_torch


@needs_triton
@pytest.mark.parametrize("shape", GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_forward_within_2x_of_torch_error(shape, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(shape, generator=g).to(DEVICE, dtype)
    k = torch.randn(shape, generator=g).to(DEVICE, dtype)
    pos = positions(shape[1], seed=2).to(DEVICE)
    fq, fk = rope_qk_triton(q, k, pos)
    assert fq.dtype == dtype and fq.shape == q.shape
    for x, fused in ((q, fq), (k, fk)):
        oracle = rope_reference(x.double().cpu(), pos.cpu())
        lowp = rope_reference(x, pos, upcast=False).cpu()             # torch in the input precision
        e_fused, e_torch = errors(fused.cpu(), lowp, oracle)
        assert e_fused <= 2 * e_torch, f"fused {e_fused:.3e} vs torch {e_torch:.3e}"


@needs_triton
@pytest.mark.parametrize("shape", GRID[:2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_is_rotation_by_minus_angle(shape, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    gq = torch.randn(shape, generator=g).to(DEVICE, dtype)
    gk = torch.randn(shape, generator=g).to(DEVICE, dtype)
    pos = positions(shape[1], seed=4).to(DEVICE)
    fq, fk = rope_qk_triton(q, k, pos)
    (fq * gq).sum().backward(retain_graph=True)
    (fk * gk).sum().backward()
    for grad_out, grad in ((gq, q.grad), (gk, k.grad)):
        oracle = rope_reference(grad_out.double().cpu(), -pos.cpu())   # R(-angle) = R(angle)^T
        lowp = rope_reference(grad_out, -pos, upcast=False).cpu()
        e_fused, e_torch = errors(grad.cpu(), lowp, oracle)
        assert e_fused <= 2 * e_torch, f"grad fused {e_fused:.3e} vs torch {e_torch:.3e}"


def test_minus_angle_is_the_transpose_of_rope():
    """The backward identity used above: <R(p) x, g> = <x, R(-p) g> for every x, g (fp64)."""
    x, gr = torch.randn(1, 6, 2, 12, dtype=torch.float64), torch.randn(1, 6, 2, 12, dtype=torch.float64)
    pos = positions(6)
    lhs = (rope_reference(x, pos) * gr).sum()
    rhs = (x * rope_reference(gr, -pos)).sum()
    assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-12)


@needs_triton
def test_dispatch_routes_forced_triton_and_matches_reference():
    q, k = torch.randn(1, 9, 2, 12).to(DEVICE), torch.randn(1, 9, 2, 12).to(DEVICE)
    pos = positions(9).to(DEVICE)
    fq, fk = rope_qk(q, k, pos, backend="triton")
    rq, rk = rope_qk(q, k, pos, backend="torch")
    torch.testing.assert_close(fq, rq, rtol=0, atol=2e-6)
    torch.testing.assert_close(fk, rk, rtol=0, atol=2e-6)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set: the CUDA kernel is not compiled")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_cuda_long_sequence(dtype):
    shape = (1, 32760, 40, 128)
    q = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.randn(shape, device="cuda", dtype=dtype)
    pos = positions(shape[1], scale=100).cuda()
    fq, fk = rope_qk_triton(q, k, pos)
    for x, fused in ((q, fq), (k, fk)):
        e_fused = e_torch = 0.0
        for start in range(0, shape[1], 4096):                      # every row, in fp64 slices of 4096 tokens
            rows = slice(start, start + 4096)
            oracle = rope_reference(x[:, rows].double(), pos[rows])
            lowp = rope_reference(x[:, rows], pos[rows], upcast=False)
            ef, et = errors(fused[:, rows], lowp, oracle)
            e_fused, e_torch = max(e_fused, ef), max(e_torch, et)
        assert e_fused <= 2 * e_torch, f"fused {e_fused:.3e} vs torch {e_torch:.3e} over all {shape[1]} rows"


# ---- position gradients and per-head-group positions (issue 14) --------------------------------------------

def fp64_position_grad(q, k, gq, gk, pos, head_groups=None):
    """d <RoPE(q), gq> + <RoPE(k), gk> / d pos through the fp64 reference (torch autograd)."""
    p = pos.detach().double().cpu().requires_grad_()
    rq = rope_reference(q.double().cpu(), p, head_groups=head_groups)
    rk = rope_reference(k.double().cpu(), p, head_groups=head_groups)
    ((rq * gq.double().cpu()).sum() + (rk * gk.double().cpu()).sum()).backward()
    return p.grad


@needs_triton
@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "per_group"])
def test_triton_position_gradient_matches_fp64_autograd(grouped):
    """Was missing: the kernel returned None for positions, so nothing upstream of them (the AST-RoPE predictor)
    learned through the fused path."""
    g = torch.Generator().manual_seed(5)
    shape = (2, 11, 4, 12)
    q, k, gq, gk = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(4))
    pos = (torch.rand(2, 11, 3, generator=g) * 20 if grouped else positions(11, seed=6)).to(DEVICE)
    groups = (1, 3) if grouped else None
    p = pos.clone().requires_grad_()
    fq, fk = rope_qk_triton(q, k, p, head_groups=groups)
    ((fq * gq).sum() + (fk * gk).sum()).backward()
    assert p.grad is not None and p.grad.shape == pos.shape
    oracle = fp64_position_grad(q, k, gq, gk, pos, groups)
    err = (p.grad.double().cpu() - oracle).abs().max().item()
    assert err < 1e-4 * oracle.abs().max().item(), (err, oracle.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_group_positions_match_fp64_reference(backend, dtype):
    """Heads 0..1 (one group) and 2..5 (another) see different positions in one call; each group equals the
    fp64 oracle applied at its own positions to its own heads."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 9, 6, 12, generator=g).to(DEVICE, dtype)
    k = torch.randn(1, 9, 6, 12, generator=g).to(DEVICE, dtype)
    pos = torch.rand(2, 9, 3, generator=g).to(DEVICE) * 30
    fq, fk = rope_qk(q, k, pos, backend=backend, head_groups=(2, 4))
    for x, out in ((q, fq), (k, fk)):
        for heads, p in ((slice(0, 2), pos[0]), (slice(2, 6), pos[1])):
            oracle = complex_oracle(x[:, :, heads].double().cpu(), p.cpu())   # one rounding to dtype at most: one
            rel = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6    # bf16 ulp (the interpreter's cast truncates)
            torch.testing.assert_close(out[:, :, heads].double().cpu(), oracle, rtol=rel * 1.05, atol=1e-5)
    same = rope_qk(q, k, pos[:1].expand(2, -1, -1), backend=backend, head_groups=(2, 4))
    ref = rope_qk(q, k, pos[0], backend=backend)
    assert torch.equal(same[0], ref[0]) and torch.equal(same[1], ref[1]), "equal groups = one shared position set"


def test_head_groups_errors():
    q = torch.randn(1, 5, 3, 12)
    with pytest.raises(ValueError, match="3 attention heads do not split into 2"):
        rope_qk(q, q, torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="summing to the 3 heads"):
        rope_qk(q, q, torch.zeros(2, 5, 3), head_groups=(1, 1))
    with pytest.raises(ValueError, match="per head group"):
        rope_qk(q, q, torch.zeros(2, 4, 3))
