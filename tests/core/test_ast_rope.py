"""AST-RoPE on CPU without ComfyUI: the position remap, alpha sources, predictor + trainer on a tiny diffusers Wan."""

from __future__ import annotations

import math

import pytest
import torch
from ffprop.nodes.ast_rope.patch import apply_ast_rope, check_rope_model, choose_alphas
from ffprop.nodes.ast_rope.positions import (
    RopeAlphas,
    check_alphas,
    heuristic_alphas,
    latent_motion,
    position_fn,
    remap_positions,
)
from ffprop.nodes.ast_rope.predictor import AlphaPredictor, PredictorConfig, load_predictor, save_predictor
from ffprop.nodes.common import Cancelled
from ffprop.nodes.host.protocol import stock_rope_ids

SMALL = PredictorConfig(width=32, depth=1, heads=2, grid=2, alpha_max=2.0, arch="frames")   # per-step alphas (v1)


# ---- positions --------------------------------------------------------------------------------------------

def test_identity_returns_the_ids_unchanged():
    ids = stock_rope_ids(3, 4, 5)
    assert remap_positions(ids, RopeAlphas(1.0, 1.0)) is ids
    assert torch.equal(position_fn(RopeAlphas(1.0, torch.ones(2)))(ids), ids)


def test_global_remap_is_exactly_the_formula():
    ids = stock_rope_ids(4, 3, 5)
    out = remap_positions(ids, RopeAlphas(alpha_s=0.75, alpha_t=0.5))
    assert torch.equal(out[:, 0], ids[:, 0] * 0.5)
    assert torch.equal(out[:, 1], ids[:, 1] * 0.75) and torch.equal(out[:, 2], ids[:, 2] * 0.75)


def test_warped_remap_is_the_cumulative_sum_of_steps():
    ids = stock_rope_ids(4, 2, 2)
    steps = torch.tensor([0.5, 2.0, 1.25])
    out = remap_positions(ids, RopeAlphas(1.0, steps))
    tau = torch.tensor([0.0, 0.5, 2.5, 3.75])
    assert torch.equal(out[:, 0], tau[ids[:, 0].long()])
    assert torch.equal(out[:, 1:], ids[:, 1:])
    # fractional frame offsets interpolate linearly; frames past the last step repeat it
    frac = torch.tensor([[1.5, 0.0, 0.0], [5.0, 0.0, 0.0]])
    got = remap_positions(frac, RopeAlphas(1.0, steps, anchor_first=False))[:, 0]
    torch.testing.assert_close(got, torch.tensor([1.5, 3.75 + 2 * 1.25]))


def test_anchor_keeps_the_first_frame_position_under_an_offset():
    ids = stock_rope_ids(3, 2, 2)
    ids[:, 0] += 5.0                                                      # e.g. a t_start offset
    anchored = remap_positions(ids, RopeAlphas(1.0, 0.5, anchor_first=True))[:, 0]
    free = remap_positions(ids, RopeAlphas(1.0, 0.5, anchor_first=False))[:, 0]
    assert torch.equal(anchored.unique(), torch.tensor([5.0, 5.5, 6.0]))
    assert torch.equal(free.unique(), torch.tensor([2.5, 3.0, 3.5]))


@pytest.mark.parametrize("bad", [
    RopeAlphas(0.01, 1.0), RopeAlphas(1.0, 50.0), RopeAlphas(float("nan"), 1.0),
    RopeAlphas(1.0, torch.tensor([1.0, 0.0])), RopeAlphas(torch.ones(2), 1.0),
])
def test_alphas_out_of_range_are_rejected(bad):
    with pytest.raises(ValueError, match="alpha"):
        check_alphas(bad)


def test_positions_are_differentiable_in_alpha():
    a = torch.tensor(0.8, requires_grad=True)
    out = remap_positions(stock_rope_ids(3, 2, 2), RopeAlphas(a, a))
    out.sum().backward()
    assert a.grad is not None and a.grad.item() > 0


# ---- heuristic --------------------------------------------------------------------------------------------

def moving_latent(speed: float, frames: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Synthetic Wan-like latent [1, 16, F, size, size]: a static noise texture plus a textured square moving
    right by `speed` latent pixels per latent frame (speed 0 = a static clip)."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(16, size, size, generator=g) * 0.3
    obj = torch.randn(16, 5, 5, generator=g) + 2.0
    out = []
    for f in range(frames):
        z = bg.clone()
        x = int(round(2 + speed * f)) % (size - 5)
        z[:, 5:10, x:x + 5] = obj
        out.append(z)
    return torch.stack(out, dim=1)[None]


def test_heuristic_alphas_are_bounded_and_grow_with_motion():
    means = []
    for speed in (0.0, 0.5, 1.0, 2.0):
        a = heuristic_alphas(moving_latent(speed), alpha_max=2.0)
        assert a.warped and a.alpha_t.shape == (5,)
        assert bool(((a.alpha_t >= 0.5) & (a.alpha_t <= 2.0)).all())
        means.append(a.alpha_t.mean().item())
    assert means == sorted(means) and means[0] < 1.0 < means[-1], means
    assert torch.equal(heuristic_alphas(moving_latent(2.0), strength=0.0).alpha_t, torch.ones(5))


def test_heuristic_alphas_on_synthetic_clip_frames():
    """Pixel clips (the pack's synthetic clip) at 1x/2x/4x frame stride as 16-channel proxies: faster -> larger."""
    from ffprop.nodes.video.synthetic import synthetic_clip

    frames = synthetic_clip(num_frames=49, height=64, width=96).source            # [T, H, W, 3]
    mix = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    means = []
    for stride in (1, 2, 4):
        sub = frames[::stride][:9]
        lat = torch.nn.functional.avg_pool2d(sub.permute(0, 3, 1, 2), 8).permute(0, 2, 3, 1) @ mix
        a = heuristic_alphas(lat.permute(3, 0, 1, 2)[None], alpha_max=3.0)
        assert bool(((a.alpha_t >= 1 / 3) & (a.alpha_t <= 3)).all())
        means.append(a.alpha_t.mean().item())
    assert means[0] < means[1] < means[2], means


def test_latent_shape_errors():
    with pytest.raises(ValueError, match="16"):
        latent_motion(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        latent_motion(torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(ValueError, match="source video"):
        choose_alphas("heuristic", latent=None)
    with pytest.raises(ValueError, match="NaN"):
        choose_alphas("heuristic", latent=torch.full((1, 16, 3, 4, 4), float("nan")))
    assert choose_alphas("off") is None


# ---- predictor --------------------------------------------------------------------------------------------

def test_fresh_predictor_gives_alpha_one_and_round_trips(tmp_path):
    torch.manual_seed(0)
    p = AlphaPredictor(SMALL)
    lat = moving_latent(1.0)
    a_s, a_t = p(lat)
    assert torch.equal(a_s, torch.ones(1)) and torch.equal(a_t, torch.ones(1, 5))
    with torch.no_grad():
        p.head.bias.copy_(torch.tensor([0.3, -0.2]))
    path = save_predictor(p, tmp_path / "p.safetensors")
    q = load_predictor(path)
    assert q.config == SMALL
    torch.testing.assert_close(q(lat), p(lat), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    a = choose_alphas("learned", latent=lat, predictor=q, variant="warped")
    assert a.warped and bool((a.alpha_t > 1).all()) and float(a.alpha_s) < 1


def test_predictor_file_of_wrong_architecture(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not an FFProp AST-RoPE predictor"):
        load_predictor(tmp_path / "lora.safetensors")
    p = AlphaPredictor(SMALL)
    state = {k: v.contiguous() for k, v in p.state_dict().items()}
    state["embed.weight"] = torch.zeros(7, 32)
    save_file(state, str(tmp_path / "bad.safetensors"),
              metadata={"kind": "ffprop.ast_rope_predictor", "config": '{"width": 32, "depth": 1, "heads": 2, "grid": 2}'})
    with pytest.raises(ValueError, match="does not match"):
        load_predictor(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="readable"):
        load_predictor(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="max_frames"):
        AlphaPredictor(PredictorConfig(width=32, depth=1, heads=2, max_frames=4))(moving_latent(1.0))


def test_unsplittable_head_dim_is_rejected():
    class Fake:
        class dims:
            head_dim, rope_axes_dim = 9, (1, 4, 4)
    with pytest.raises(ValueError, match="head_dim"):
        check_rope_model(Fake())


# ---- tiny diffusers Wan -----------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers' WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.host.diffusers import DiffusersWan, PositionRope  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402

F, H, W = 3, 4, 6


def tiny(in_channels: int = 36, seed: int = 0, heads: int = 2, head_dim: int = 12) -> DiffusersWan:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
    )
    return DiffusersWan(model.eval())


def cond(seed: int = 1, frames: int = F) -> WanCond:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, 4, frames, H, W)
    keep[:, :, 0] = 1.0
    return WanCond(keep, torch.randn(1, 16, frames, H, W, generator=g), torch.randn(1, 8, 32, generator=g))


def noisy(seed: int = 2, frames: int = F) -> torch.Tensor:
    return torch.randn(1, 16, frames, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wan() -> DiffusersWan:
    return tiny()


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_alpha_one_is_bit_identical_and_leaves_the_model_untouched(wan, backend):
    x, c = noisy(), cond()
    stock = wan.predict(x, 0.4, c)
    weights = {k: v.clone() for k, v in wan.model.state_dict().items()}
    patched = apply_ast_rope(wan, RopeAlphas(1.0, 1.0), backend)
    assert torch.equal(patched.predict(x, 0.4, c), stock)
    changed = apply_ast_rope(wan, RopeAlphas(0.8, 0.5), backend).predict(x, 0.4, c)
    assert (changed - stock).abs().max() > 1e-3
    assert torch.equal(wan.predict(x, 0.4, c), stock)
    assert type(wan.model.rope).__name__ == "WanRotaryPosEmbed"
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in wan.model.blocks)
    assert all(torch.equal(v, weights[k]) for k, v in wan.model.state_dict().items())


@torch.no_grad()
def test_model_positions_follow_the_formula(wan):
    patched = apply_ast_rope(wan, RopeAlphas(0.75, torch.tensor([0.5, 1.5])), "torch")
    patched.predict(noisy(), 0.5, cond())
    rope = patched.model.rope
    assert isinstance(rope, PositionRope)
    ids = stock_rope_ids(F, H // 2, W // 2)
    expect = torch.stack([torch.tensor([0.0, 0.5, 2.0])[ids[:, 0].long()], 0.75 * ids[:, 1], 0.75 * ids[:, 2]], -1)
    assert torch.equal(rope.state.positions, expect)


def frame0_attention_mass(dit: DiffusersWan, alphas: RopeAlphas, frames: int = 5) -> float:
    """Mean softmax mass that queries of frames >= 1 put on frame-0 keys in block 0 (q/k captured in the
    patched model, rotated at the positions it recorded)."""
    from ffprop.kernels import rope_reference

    patched = apply_ast_rope(dit, alphas, "torch")
    attn = patched.model.blocks[0].attn1
    got = {}
    hooks = [attn.norm_q.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.norm_k.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    try:
        static = noisy(frames=1).expand(1, 16, frames, H, W).contiguous()       # a static clip
        patched.predict(static, 0.5, cond(frames=frames))
    finally:
        for h in hooks:
            h.remove()
    pos = patched.model.rope.state.positions
    q = rope_reference(got["q"].unflatten(2, (attn.heads, -1)), pos)
    k = rope_reference(got["k"].unflatten(2, (attn.heads, -1)), pos)
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    n = pos.shape[0] // frames
    return p[:, :, n:, :n].sum(-1).mean().item()


@torch.no_grad()
def test_smaller_alpha_t_raises_attention_on_frame_zero():
    dit = tiny(in_channels=36, seed=3, heads=1, head_dim=24)
    for blk in dit.model.blocks:                          # q = k projections: content similarity is positive, so
        blk.attn1.to_k.weight.copy_(blk.attn1.to_q.weight)    # RoPE's distance decay is visible
        blk.attn1.norm_k.weight.copy_(blk.attn1.norm_q.weight)
    masses = [frame0_attention_mass(dit, RopeAlphas(1.0, a)) for a in (1.0, 0.5, 0.25)]
    assert masses[0] < masses[1] < masses[2], masses


def train_samples(seed: int = 5):
    from ffprop.nodes.ast_rope.train import PredictorSample

    g = torch.Generator().manual_seed(seed)
    src = torch.nn.functional.adaptive_avg_pool3d(moving_latent(3.0, frames=F, size=16), (F, H, W))
    c = cond(seed)
    edited = src + 0.5 * torch.randn(src.shape, generator=g)
    return src, c, edited, PredictorSample


def test_trainer_lowers_the_loss_and_moves_alpha(wan):
    from ffprop.nodes.ast_rope.train import PredictorTrainSettings, evaluate_loss, train_predictor

    src, c, _, Sample = train_samples()
    sample = Sample(src, src, c)
    torch.manual_seed(0)
    predictor = AlphaPredictor(SMALL)
    before = evaluate_loss(wan, predictor, [sample], backend="torch")
    steps = []
    res = train_predictor(wan, [sample], PredictorTrainSettings(steps=40, learning_rate=2e-2, backend="torch"),
                          predictor, on_step=lambda i, n, p=None: steps.append(i))
    after = evaluate_loss(wan, res.predictor, [sample], backend="torch")
    assert after < before, (before, after)
    assert steps == list(range(1, 41)) and len(res.losses) == 40
    assert float((res.alphas.alpha_t - 1).abs().max()) > 1e-3
    assert all(p.requires_grad for p in wan.model.parameters())        # the DiT's flags were restored
    assert all(p.grad is None for p in wan.model.parameters())         # and it got no gradients


def test_self_distillation_terms_are_zero_at_the_teacher_and_pull_towards_it_otherwise():
    from ffprop.nodes.ast_rope.train import drift_loss, motion_loss

    g = torch.Generator().manual_seed(0)
    ht = torch.randn(1, 3, 6, 8, generator=g)                              # teacher tokens [B, F, N, d]
    moved = ht + 0.5 * torch.randn(ht.shape, generator=g)
    for term in (motion_loss, drift_loss):
        hs = ht.clone().requires_grad_(True)
        at_teacher = term(hs, ht)
        at_teacher.backward()
        assert abs(at_teacher.item()) < 1e-6 and float(hs.grad.abs().max()) < 1e-5, "a minimum at the teacher"
        hs = moved.clone().requires_grad_(True)
        away = term(hs, ht)
        away.backward()
        assert away.item() > 1e-3 and bool(torch.isfinite(hs.grad).all()) and float(hs.grad.abs().max()) > 1e-4
        with torch.no_grad():                                              # a small step down the gradient helps
            assert term(moved - 1e-2 * hs.grad / hs.grad.norm(), ht).item() < away.item()
    # by definition both compare structure, not magnitude: per-frame / per-token positive scales do not count
    scale = torch.rand(1, 3, 1, 1, generator=g) + 0.5
    assert motion_loss(ht * scale, ht).item() < 1e-10
    assert abs(drift_loss(ht * (torch.rand(1, 3, 6, 1, generator=g) + 0.5), ht).item()) < 1e-6


def test_self_distillation_enters_the_training_loss_and_its_gradient(wan):
    from dataclasses import replace

    from ffprop.nodes.ast_rope.train import PredictorTrainSettings, train_predictor

    src, c, edited, Sample = train_samples()
    pair = Sample(src, edited, cond(7), src, c)                            # student: edited; teacher: identity
    off = PredictorTrainSettings(steps=2, learning_rate=2e-2, backend="torch")
    plain = train_predictor(wan, [pair], off, config=SMALL)
    weighted_zero = train_predictor(wan, [pair], replace(off, self_distill=True, lambda_motion=0.0, lambda_mmd=0.0),
                                    config=SMALL)
    distilled = train_predictor(wan, [pair], replace(off, self_distill=True), config=SMALL)
    assert weighted_zero.losses == plain.losses, "terms weighted 0 change nothing (same seed, same steps)"
    assert distilled.losses[0] > plain.losses[0], "the terms add a positive amount when student != teacher"
    moved = [not torch.equal(a, b) for a, b in zip(distilled.predictor.state_dict().values(),
                                                    plain.predictor.state_dict().values())]
    assert any(moved), "their gradient reaches the predictor"
    with pytest.raises(ValueError, match="pairs"):
        train_predictor(wan, [Sample(src, src, c)], PredictorTrainSettings(steps=1, self_distill=True), config=SMALL)
    with pytest.raises(Cancelled):
        train_predictor(wan, [Sample(src, src, c)], PredictorTrainSettings(steps=5, backend="torch"), config=SMALL,
                        should_stop=lambda: True)


def test_joint_training_api_recovers_a_planted_alpha(wan):
    """The API a LoRA-Edit trainer would call (AlphaHolder + apply_ast_rope) is differentiable in alpha: fitting
    the patched model's output at alpha_T = 0.6 from alpha_T = 1 recovers 0.6."""
    from ffprop.nodes.ast_rope.positions import AlphaHolder

    x, c = noisy(), cond()
    with torch.no_grad():
        target = apply_ast_rope(wan, RopeAlphas(1.0, 0.6), "torch").predict(x, 0.5, c)
    holder = AlphaHolder()
    hooked = apply_ast_rope(wan, holder, "torch")
    log_alpha = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=0.05)
    for _ in range(60):
        holder.alphas = RopeAlphas(1.0, log_alpha.exp())
        loss = (hooked.predict(x, 0.5, c) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(log_alpha.exp().item() - 0.6) < 0.03, log_alpha.exp().item()
