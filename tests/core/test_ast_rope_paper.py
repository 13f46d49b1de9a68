"""AST-RoPE's paper variant (SEED_SPEC 3.6): spatial and temporal head groups see different temporal positions in
one attention call. Positions formula, the stock model at alpha = 1, agreement with an fp64 attention reference
computed head by head, and the errors (heads not divisible by the split)."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ffprop.kernels import rope_reference, triton_status  # noqa: E402
from ffprop.nodes.ast_rope.patch import apply_ast_rope, choose_alphas  # noqa: E402
from ffprop.nodes.ast_rope.positions import HeadSplit, RopeAlphas, paper_positions, position_fn  # noqa: E402
from ffprop.nodes.host.protocol import stock_rope_ids  # noqa: E402

TRITON_OK, TRITON_WHY = triton_status("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY))]
PAPER = HeadSplit()


def test_paper_positions_follow_the_mapping():
    ids = stock_rope_ids(4, 2, 3)                                          # F = 4 latent frames: F' = 3
    out = paper_positions(ids, RopeAlphas(0.5, 0.25, split=PAPER), heads=4)
    assert out.shape == (2, ids.shape[0], 3)                                 # 2 groups of 2 heads
    spatial, temporal = out
    t = ids[:, 0]
    assert torch.equal(spatial[:, 0], torch.where(t == 0, torch.tensor(0.5 * 3), t))   # (1 - alpha_S) F'
    assert torch.equal(temporal[:, 0], 0.25 * t)                                        # alpha_T * f
    assert torch.equal(out[:, :, 1:], ids[None, :, 1:].expand(2, -1, -1))  # height/width unchanged
    literal = paper_positions(ids, RopeAlphas(0.5, 1.0, split=HeadSplit(first_frame="literal", f_prime=8.0)), 4)
    assert torch.equal(literal[0, :, 0], torch.where(t == 0, torch.tensor(4.0), t))      # alpha_S F'
    quarter = paper_positions(ids, RopeAlphas(0.5, 0.25, split=HeadSplit(spatial_ratio=0.25)), heads=4)
    assert quarter.shape[0] == 4 and torch.equal(quarter[0], spatial)        # 1 spatial group, 3 temporal
    assert all(torch.equal(quarter[g], temporal) for g in (1, 2, 3))
    shifted = stock_rope_ids(4, 2, 3) + torch.tensor([5.0, 0, 0])           # ids that start at t = 5
    moved = paper_positions(shifted, RopeAlphas(0.5, 0.25, split=PAPER), 4)
    assert torch.equal(moved[1, :, 0], 5 + 0.25 * t) and float(moved[0, 0, 0]) == 5 + 1.5


def test_alpha_one_gives_the_stock_ids_and_bad_splits_are_rejected():
    ids = stock_rope_ids(3, 2, 2)
    assert position_fn(RopeAlphas(1.0, 1.0, split=PAPER), heads=2)(ids) is ids
    a = torch.ones((), requires_grad=True)                                   # a trainable alpha = 1: same values
    out = position_fn(RopeAlphas(a, a, split=PAPER), heads=2)(ids)
    assert torch.equal(out, ids[None].expand(2, -1, -1))
    with pytest.raises(ValueError, match="heads not divisible by the split"):
        position_fn(RopeAlphas(0.5, 0.5, split=HeadSplit(spatial_ratio=0.25)), heads=6)
    with pytest.raises(ValueError, match="head count"):
        position_fn(RopeAlphas(0.5, 0.5, split=PAPER))
    with pytest.raises(ValueError, match="one alpha_T"):
        position_fn(RopeAlphas(0.5, torch.tensor([0.5, 0.7]), split=PAPER), heads=2)
    with pytest.raises(ValueError, match="first_frame"):
        position_fn(RopeAlphas(0.5, 0.5, split=HeadSplit(first_frame="middle")), heads=2)
    assert choose_alphas("manual", alpha_s=0.5, alpha_t=0.8, variant="paper").split == PAPER


# ---- on a tiny diffusers Wan -------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401  (the skip below: the class must import)
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers' WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from tiny_wan import seeded_tiny_wan  # noqa: E402

F, H, W = 3, 4, 4


@pytest.fixture(scope="module")
def wan() -> DiffusersWan:
    return seeded_tiny_wan(0, heads=4)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1
    c = WanCond(keep, torch.randn(1, 16, F, H, W, generator=g), torch.randn(1, 8, 32, generator=g))
    return torch.randn(1, 16, F, H, W, generator=g), c


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_one_is_the_stock_model_and_groups_reduce_to_one_position_set(wan, backend):
    x, c = inputs()
    stock = wan.predict(x, 0.5, c)
    one = apply_ast_rope(wan, RopeAlphas(1.0, 1.0, split=PAPER), backend).predict(x, 0.5, c)
    if backend == "torch":                  # the fused kernel rotates with its own (near-fp64) angles, not the table
        assert torch.equal(one, stock)
    else:
        torch.testing.assert_close(one, stock, rtol=0, atol=1e-5)
    # all heads temporal = the global variant with alpha_S = 1 (same positions for every head)
    all_t = apply_ast_rope(wan, RopeAlphas(0.3, 0.6, split=HeadSplit(spatial_ratio=0.0)), backend).predict(x, 0.5, c)
    glob = apply_ast_rope(wan, RopeAlphas(1.0, 0.6), backend).predict(x, 0.5, c)
    assert torch.equal(all_t, glob)
    paper = apply_ast_rope(wan, RopeAlphas(0.3, 0.6, split=PAPER), backend).predict(x, 0.5, c)
    all_s = apply_ast_rope(wan, RopeAlphas(0.3, 0.6, split=HeadSplit(spatial_ratio=1.0)), backend).predict(x, 0.5, c)
    assert (paper - glob).abs().max() > 1e-4 and (paper - all_s).abs().max() > 1e-4 and (paper - stock).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_head_group_attends_at_its_own_positions_fp64(wan, backend):
    """Block 0's self-attention output equals an fp64 attention computed head by head, each head's q/k rotated
    at its group's positions (heads 0-1 spatial, 2-3 temporal)."""
    alphas = RopeAlphas(0.4, 0.5, split=PAPER)
    patched = apply_ast_rope(wan, alphas, backend)
    attn = patched.model.blocks[0].attn1
    got = {}
    hooks = [attn.norm_q.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.norm_k.register_forward_hook(lambda m, a, o: got.__setitem__("k", o)),
             attn.to_v.register_forward_hook(lambda m, a, o: got.__setitem__("v", o)),
             attn.to_out[0].register_forward_pre_hook(lambda m, a: got.__setitem__("out", a[0]))]
    try:
        x, c = inputs()
        patched.predict(x, 0.5, c)
    finally:
        for h in hooks:
            h.remove()
    ids = stock_rope_ids(F, H // 2, W // 2)
    pos = paper_positions(ids, alphas, heads=4).double()
    q, k, v = (got[n].double().unflatten(2, (4, -1)) for n in ("q", "k", "v"))
    heads = []
    for h in range(4):
        p = pos[0 if h < 2 else 1]
        qh, kh = rope_reference(q[:, :, h:h + 1], p), rope_reference(k[:, :, h:h + 1], p)
        w = torch.softmax(torch.einsum("bld,bmd->blm", qh[:, :, 0], kh[:, :, 0]) / math.sqrt(12), dim=-1)
        heads.append(w @ v[:, :, h])
    expect = torch.stack(heads, dim=2).flatten(2)
    torch.testing.assert_close(got["out"].double(), expect, rtol=0, atol=2e-5)
    shared = rope_reference(q[:, :, 0:1], pos[1])                          # the groups do differ in the model
    assert (shared - rope_reference(q[:, :, 0:1], pos[0])).abs().max() > 1e-3


def test_paper_variant_without_the_fused_path_is_refused(wan):
    fn = position_fn(RopeAlphas(0.4, 0.5, split=PAPER), heads=4)
    x, c = inputs()
    with pytest.raises(RuntimeError, match="fused RoPE"):
        wan.with_rope_positions(fn).predict(x, 0.5, c)
    with pytest.raises(ValueError, match="heads not divisible"):
        apply_ast_rope(wan, RopeAlphas(0.4, 0.5, split=HeadSplit(spatial_ratio=1 / 3)))
