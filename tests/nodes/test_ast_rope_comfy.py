"""AST-RoPE on ComfyUI's own Wan model (tiny random weights) and the FFPASTRoPE nodes (needs COMFYUI_DIR)."""

from __future__ import annotations

import pytest
import torch
from comfy_support import TINY_KINDS, cancelled, import_comfy, load_tiny_comfy_wan

import_comfy()

from comfy.ldm.flux.layers import EmbedND  # noqa: E402
from comfy.ldm.flux.math import apply_rope1  # noqa: E402
from ffprop.kernels import apply_rope_reference, rope_cos_sin  # noqa: E402
from ffprop.nodes.ast_rope.node import FFPASTRoPE  # noqa: E402
from ffprop.nodes.ast_rope.patch import apply_ast_rope  # noqa: E402
from ffprop.nodes.ast_rope.positions import RopeAlphas, position_fn  # noqa: E402
from ffprop.nodes.ast_rope.predictor import AlphaPredictor, PredictorConfig  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan, fused_path_proven  # noqa: E402
from ffprop.nodes.host.protocol import WanCond, stock_rope_ids  # noqa: E402

F, H, W = 3, 4, 6
LATENT_CHANNELS = {"i2v": 16, "t2v": 16, "fun_control": 32}


def make_cond(kind: str, seed: int = 1) -> WanCond:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1.0
    return WanCond(keep, torch.randn(1, LATENT_CHANNELS[kind], F, H, W, generator=g),
                   torch.randn(1, 12, 4096, generator=g),
                   torch.randn(1, 257, 1280, generator=g) if kind != "t2v" else None)


def noisy(seed: int = 2) -> torch.Tensor:
    return torch.randn(1, 16, F, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head_dim", [12, 128])
def test_reference_reproduces_comfy_embednd_apply_rope1_bit_exactly(head_dim):
    s = head_dim // 6
    embed = EmbedND(dim=head_dim, theta=10000, axes_dim=[head_dim - 4 * s, 2 * s, 2 * s])
    ids = stock_rope_ids(5, 4, 6)
    freqs = embed(ids[None]).movedim(1, 2)                              # as WanModel.rope_encode: [1, L, 1, D/2, 2, 2]
    x = torch.randn(2, ids.shape[0], 3, head_dim)
    cos, sin = rope_cos_sin(ids, head_dim)
    assert torch.equal(freqs[0, :, 0, :, 0, 0], cos) and torch.equal(freqs[0, :, 0, :, 1, 0], sin)
    assert torch.equal(apply_rope_reference(x, cos, sin), apply_rope1(x, freqs))
    xb = x.bfloat16()
    assert torch.equal(apply_rope_reference(xb, cos, sin), apply_rope1(xb, freqs))


@pytest.fixture(scope="module", params=sorted(TINY_KINDS))
def wan(request):
    return request.param, ComfyWan(load_tiny_comfy_wan(request.param))


@torch.no_grad()
def test_alpha_one_bit_identical_and_stock_model_untouched(wan):
    kind, dit = wan
    x, c = noisy(), make_cond(kind)
    stock = dit.predict(x, 0.5, c)
    weights = {k: v.clone() for k, v in dit.module.state_dict().items()}
    for backend in ("auto", "torch"):
        assert torch.equal(apply_ast_rope(dit, RopeAlphas(1.0, 1.0), backend).predict(x, 0.5, c), stock)
    changed = apply_ast_rope(dit, RopeAlphas(0.7, 0.5), "torch").predict(x, 0.5, c)
    assert (changed - stock).abs().max() > 1e-5
    assert torch.equal(dit.predict(x, 0.5, c), stock)                    # the original MODEL again
    assert not dit.patcher.object_patches
    assert type(dit.module.rope_embedder) is EmbedND
    assert all(type(b.self_attn).__name__ == "WanSelfAttention" and "forward" not in vars(b.self_attn)
               for b in dit.module.blocks)
    assert all(torch.equal(v, weights[k]) for k, v in dit.module.state_dict().items())


@torch.no_grad()
def test_positions_in_the_model_follow_the_formula():
    """The patched model equals the stock model handed the formula's positions directly (any host path)."""
    dit = ComfyWan(load_tiny_comfy_wan("i2v"))
    x, c = noisy(), make_cond("i2v")
    patched = apply_ast_rope(dit, RopeAlphas(0.75, torch.tensor([0.5, 1.5])), "torch")
    ids = stock_rope_ids(F, H // 2, W // 2)
    expect = torch.stack([torch.tensor([0.0, 0.5, 2.0])[ids[:, 0].long()], 0.75 * ids[:, 1], 0.75 * ids[:, 2]], -1)
    direct = dit.with_rope_positions(lambda got: expect if torch.equal(got, ids) else got)
    out = patched.predict(x, 0.5, c)
    assert torch.equal(out, direct.predict(x, 0.5, c))
    assert (out - dit.predict(x, 0.5, c)).abs().max() > 1e-5


@torch.no_grad()
def test_fused_path_only_where_proven_and_equal_to_the_host_forward(wan):
    """Every Wan variant we claim (I2V, T2V, Fun-Control): AST-RoPE's model equals the host's own self-attention
    fed the same positions by the position hook alone. The fused self-attention replaces the host's only where
    the host's forward is the code it copies (0.3.64); elsewhere (0.28: attn1_patch, comfy_kitchen RoPE) the
    host's own runs."""
    kind, dit = wan
    x, c = noisy(), make_cond(kind)
    for alphas in (RopeAlphas(0.8, 0.5), RopeAlphas(1.25, torch.tensor([0.5, 1.5]))):
        patched = apply_ast_rope(dit, alphas, "torch")
        host_only = dit.with_rope_positions(position_fn(alphas))
        assert torch.equal(patched.predict(x, 0.5, c), host_only.predict(x, 0.5, c))
    proven = fused_path_proven(dit.module.blocks[0].self_attn)
    attn = patched.patcher.get_model_object("diffusion_model.blocks.0.self_attn")
    assert ("_ffp_rope_state" in vars(attn)) == proven
    if not proven:
        assert not any(k.endswith("self_attn") for k in patched.patcher.object_patches)


def _scale_rope():
    nodes_rope = pytest.importorskip("comfy_extras.nodes_rope", reason="this ComfyUI has no ScaleROPE node")
    return nodes_rope.ScaleROPE


def _scaled(model, t=1.0, y=1.0, x=1.0, shift_t=0.0):
    return _scale_rope().execute(model, x, 0.0, y, 0.0, t, shift_t).args[0]


def _ast(model, alpha_s, alpha_t):
    return FFPASTRoPE.execute(model, "manual", "global", alpha_s, alpha_t, 2.0, 1.0, True, "auto", "none").args[0]


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_global_alphas_equal_core_scale_rope(kind):
    """A global alpha_T (alpha_S) gives ScaleROPE's output with scale_t (scale_x = scale_y) = alpha: bit-identical
    at binary fractions, within float32 rounding of linspace elsewhere."""
    model = load_tiny_comfy_wan(kind)
    x, c = noisy(), make_cond(kind)

    def out(m):
        return ComfyWan(m).predict(x, 0.5, c)

    assert torch.equal(out(_ast(model, 1.0, 0.5)), out(_scaled(model, t=0.5)))
    assert torch.equal(out(_ast(model, 0.75, 1.0)), out(_scaled(model, y=0.75, x=0.75)))
    assert torch.equal(out(_ast(model, 0.75, 2.0)), out(_scaled(model, t=2.0, y=0.75, x=0.75)))
    torch.testing.assert_close(out(_ast(model, 0.7, 0.3)), out(_scaled(model, t=0.3, y=0.7, x=0.7)),
                               rtol=1e-5, atol=1e-6)
    assert (out(_ast(model, 1.0, 0.5)) - out(model)).abs().max() > 1e-5


@torch.no_grad()
def test_ast_rope_composes_with_a_scale_rope_already_on_the_model():
    """ScaleROPE (scale_t 2, shift_t 1, scale_x/y 2) then AST-RoPE (alpha_T 0.5, alpha_S 0.75, anchor_first):
    positions t = 1 + 0.5 * 2f, y = 0.75 * 2y, i.e. ScaleROPE(scale_t 1, shift_t 1, scale 1.5) alone."""
    model = load_tiny_comfy_wan("i2v")
    x, c = noisy(), make_cond("i2v")
    first = _scaled(model, t=2.0, y=2.0, x=2.0, shift_t=1.0)
    both = _ast(first, 0.75, 0.5)
    assert both.model_options["transformer_options"]["rope_options"]["scale_t"] == 2.0   # ScaleROPE kept
    want = ComfyWan(_scaled(model, t=1.0, y=1.5, x=1.5, shift_t=1.0)).predict(x, 0.5, c)
    got = ComfyWan(both).predict(x, 0.5, c)
    assert torch.equal(got, want)
    assert (got - ComfyWan(first).predict(x, 0.5, c)).abs().max() > 1e-5
    assert not model.object_patches and "rope_options" not in model.model_options.get("transformer_options", {})


@torch.no_grad()
def test_patched_model_still_takes_weight_patches():
    """A LoRA-style weight patch on the same keys works with the fused self-attention object patches."""
    dit = ComfyWan(load_tiny_comfy_wan("i2v"))
    x, c = noisy(), make_cond("i2v")
    patched = apply_ast_rope(dit, RopeAlphas(1.0, 1.0), "torch")
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    w = patched.patcher.get_model_object(key)
    lora = patched.patcher.clone()
    lora.add_patches({key: (torch.randn_like(w) * 0.5,)}, 1.0)
    stock_lora = dit.patcher.clone()
    stock_lora.add_patches({key: (lora.patches[key][0][1][0],)}, 1.0)
    assert torch.equal(ComfyWan(lora).predict(x, 0.5, c), ComfyWan(stock_lora).predict(x, 0.5, c))
    assert not torch.equal(ComfyWan(lora).predict(x, 0.5, c), dit.predict(x, 0.5, c))


def test_node_modes_and_errors():
    model = load_tiny_comfy_wan("i2v")
    out = FFPASTRoPE.execute(model, "manual", "global", 0.8, 0.5, 2.0, 1.0, True, "auto", "none")
    patched, text = out.result
    assert patched is not model and "alpha_S=0.800" in text and "alpha_T=0.500" in text
    assert "diffusion_model.rope_embedder" in patched.object_patches and not model.object_patches
    off, text = FFPASTRoPE.execute(model, "off", "global", 1.0, 1.0, 2.0, 1.0, True, "auto", "none").result
    assert not off.object_patches and "off" in text
    latent = {"samples": torch.randn(1, 16, 4, 8, 8)}
    _, text = FFPASTRoPE.execute(model, "heuristic", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                                 source_latent=latent).result
    assert "warped" in text
    pred = AlphaPredictor(PredictorConfig(width=32, depth=1, heads=2, grid=2, arch="frames"))
    _, text = FFPASTRoPE.execute(model, "learned", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                                 source_latent=latent, predictor_model=pred).result
    assert "1.000, 1.000, 1.000" in text                                   # a fresh predictor: alpha = 1
    with pytest.raises(ValueError, match="alpha_T must be"):
        FFPASTRoPE.execute(model, "manual", "global", 1.0, 0.01, 2.0, 1.0, True, "auto", "none")
    with pytest.raises(ValueError, match="Wan 2.1 video latent"):
        FFPASTRoPE.execute(model, "heuristic", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                           source_latent={"samples": torch.randn(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="needs a predictor"):
        FFPASTRoPE.execute(model, "learned", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                           source_latent=latent)
    with pytest.raises(ValueError, match="VAE"):
        FFPASTRoPE.execute(model, "heuristic", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                           source_images=torch.rand(5, 32, 32, 3))


def test_non_wan_model_is_rejected():
    import comfy.model_patcher

    fake = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="ComfyUI MODEL|Wan"):
        FFPASTRoPE.execute(fake, "manual", "global", 1.0, 0.5, 2.0, 1.0, True, "auto", "none")


def test_trainer_on_the_comfy_host_lowers_the_loss():
    from ffprop.nodes.ast_rope.train import PredictorSample, PredictorTrainSettings, evaluate_loss, train_predictor

    dit = ComfyWan(load_tiny_comfy_wan("i2v"))
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 16, F, H, W, generator=g)
    sample = PredictorSample(src, src, make_cond("i2v"))
    torch.manual_seed(0)
    pred = AlphaPredictor(PredictorConfig(width=32, depth=1, heads=2, grid=2, arch="frames"))
    before = evaluate_loss(dit, pred, [sample], backend="torch")
    res = train_predictor(dit, [sample], PredictorTrainSettings(steps=30, learning_rate=3e-2, backend="torch"), pred)
    after = evaluate_loss(dit, res.predictor, [sample], backend="torch")
    assert float((res.alphas.alpha_t - 1).abs().max()) > 1e-3
    assert after < before, (before, after)
    assert not dit.patcher.object_patches


class StubVAE:
    """Stands in for the 254 MB Wan VAE: a fixed random linear map of 8x8x4 pixel blocks to 16 latent channels."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        t, h, w, _ = frames.shape
        f = (t - 1) // 4 + 1
        x = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2), 8)          # [T, 3, h, w]
        idx = torch.tensor([0] + [4 * i for i in range(1, f)])
        mix = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
        return torch.einsum("tchw,cd->dthw", x[idx], mix)[None]


def test_trainer_node_saves_a_loadable_predictor(tmp_path, monkeypatch):
    import folder_paths
    from ffprop.nodes.ast_rope.node import FFPASTRoPETrain
    from ffprop.nodes.ast_rope.predictor import load_predictor

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ast_rope", ([str(tmp_path)], {".safetensors"}))
    model = load_tiny_comfy_wan("i2v")
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(9, 32, 48, 3, generator=g)
    positive = [[torch.randn(1, 8, 4096, generator=g), {}]]
    out = FFPASTRoPETrain.execute(model, StubVAE(), positive, clip, 3, 1e-2, "warped", 2.0, 32, 1, True, 1.0, 1.0, 0,
                                  "ci_predictor", edited_video=clip.flip(2), backend="torch")
    predictor, path, text = out.result
    assert path.endswith("ci_predictor.safetensors") and "loss" in text and "alpha_T per step" in text
    assert load_predictor(path).config == predictor.config
    assert not model.object_patches
    with pytest.raises(ValueError, match="self_distill needs edited clips"):
        FFPASTRoPETrain.execute(model, StubVAE(), positive, clip, 1, 1e-2, "warped", 2.0, 32, 1, True, 1.0, 1.0, 0, "")
    latent = {"samples": StubVAE().encode(clip)}
    _, text = FFPASTRoPE.execute(model, "learned", "warped", 1.0, 1.0, 2.0, 1.0, True, "torch", "ci_predictor.safetensors",
                                 source_latent=latent).result
    assert "alpha_T per step" in text


def test_source_video_of_the_wrong_length_is_rejected():
    model = load_tiny_comfy_wan("i2v")
    with pytest.raises(ValueError, match="4k"):
        FFPASTRoPE.execute(model, "heuristic", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                           source_images=torch.rand(8, 32, 32, 3), vae=StubVAE())
    _, text = FFPASTRoPE.execute(model, "heuristic", "warped", 1.0, 1.0, 2.0, 1.0, True, "auto", "none",
                                 source_images=torch.rand(9, 32, 32, 3), vae=StubVAE()).result
    assert "warped" in text


def _predictor_run(dit, **kw):
    from ffprop.nodes.ast_rope.train import PredictorSample, PredictorTrainSettings, train_predictor

    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 16, F, H, W, generator=g)
    settings = PredictorTrainSettings(steps=kw.pop("steps", 2), learning_rate=3e-2, backend="torch", seed=5)
    return train_predictor(dit, [PredictorSample(src, src, make_cond("i2v"))], settings,
                           config=PredictorConfig(width=32, depth=1, heads=2, grid=2), **kw)


def test_predictor_trainer_follows_the_host_training_contract_and_restores_it():
    """in_training (where the host has it) is on during every step and restored after success, error and Cancel;
    the positions' gradients then reach the predictor through the host's own RoPE."""
    import comfy.model_management as mm

    dit = ComfyWan(load_tiny_comfy_wan("i2v"))
    seen = []
    res = _predictor_run(dit, on_step=lambda i, n, loss=None: seen.append(getattr(mm, "in_training", None)))
    expect = None if getattr(mm, "in_training", None) is None else True
    assert seen == [expect, expect] and getattr(mm, "in_training", False) is False
    assert float((res.alphas.alpha_t - 1).abs().max()) > 0                 # gradients reached the predictor

    def fail(i, n, loss=None):
        raise RuntimeError("step callback failed")

    with pytest.raises(RuntimeError, match="step callback failed"):
        _predictor_run(dit, on_step=fail)
    assert getattr(mm, "in_training", False) is False
    with cancelled():
        _predictor_run(dit, steps=5, should_stop=lambda: mm.throw_exception_if_processing_interrupted())
    assert getattr(mm, "in_training", False) is False


def test_predictor_trainer_leaves_the_global_rng_alone_and_repeats_itself():
    """Local generators only (STYLE 5.5): the global torch RNG state is the same after training, and the same seed
    gives the same predictor and losses."""
    dit = ComfyWan(load_tiny_comfy_wan("i2v"))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = _predictor_run(dit)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)                                                  # another global state: no effect
    second = _predictor_run(dit)
    assert first.losses == second.losses
    assert all(torch.equal(a, b) for a, b in zip(first.predictor.state_dict().values(),
                                                 second.predictor.state_dict().values()))


# ---- the paper variant: per-head-group positions (issue 14) -----------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("kind", ["i2v", "fun_control"])
def test_paper_variant_on_the_comfy_host(kind):
    """Two heads (dim 256): alpha = 1 is the stock model; all heads temporal = the global variant; the split gives
    block 0's self-attention an output equal to fp64 attention computed head by head at each group's positions."""
    import math

    from ffprop.kernels import rope_reference
    from ffprop.nodes.ast_rope.positions import HeadSplit, paper_positions

    dit = ComfyWan(load_tiny_comfy_wan(kind, dim=256))
    x, c = noisy(), make_cond(kind)
    stock = dit.predict(x, 0.5, c)
    paper = HeadSplit()
    for backend in ("auto", "torch"):
        assert torch.equal(apply_ast_rope(dit, RopeAlphas(1.0, 1.0, split=paper), backend).predict(x, 0.5, c), stock)
    all_t = apply_ast_rope(dit, RopeAlphas(0.3, 0.6, split=HeadSplit(spatial_ratio=0.0)), "torch").predict(x, 0.5, c)
    glob = apply_ast_rope(dit, RopeAlphas(1.0, 0.6), "torch").predict(x, 0.5, c)
    torch.testing.assert_close(all_t, glob, rtol=0, atol=1e-6)     # 0.28: host kernel vs ours for the global one
    alphas = RopeAlphas(0.4, 0.5, split=paper)
    patched = apply_ast_rope(dit, alphas, "torch")
    attn = dit.module.blocks[0].self_attn                            # child modules are shared with the patch
    got = {}
    hooks = [attn.norm_q.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.norm_k.register_forward_hook(lambda m, a, o: got.__setitem__("k", o)),
             attn.v.register_forward_hook(lambda m, a, o: got.__setitem__("v", o)),
             attn.o.register_forward_pre_hook(lambda m, a: got.__setitem__("out", a[0]))]
    try:
        out = patched.predict(x, 0.5, c)
    finally:
        for h in hooks:
            h.remove()
    assert (out - glob).abs().max() > 1e-5 and (out - stock).abs().max() > 1e-5
    pos = paper_positions(stock_rope_ids(F, H // 2, W // 2), alphas, heads=2).double()
    q, k, v = (got[n].double().unflatten(2, (2, -1)) for n in ("q", "k", "v"))
    heads = []
    for h in range(2):
        qh, kh = rope_reference(q[:, :, h:h + 1], pos[h]), rope_reference(k[:, :, h:h + 1], pos[h])
        w = torch.softmax(torch.einsum("bld,bmd->blm", qh[:, :, 0], kh[:, :, 0]) / math.sqrt(128), dim=-1)
        heads.append(w @ v[:, :, h])
    torch.testing.assert_close(got["out"].double(), torch.stack(heads, 2).flatten(2), rtol=0, atol=1e-5)
    one_head = ComfyWan(load_tiny_comfy_wan(kind))
    with pytest.raises(ValueError, match="heads not divisible by the split"):
        apply_ast_rope(one_head, alphas)


def test_trainer_node_gives_each_pair_its_own_prompt_and_image_tokens(tmp_path, monkeypatch):
    """Pairs in a folder used the node's prompt and source_video's CLIP-vision tokens (the bug): now each pair has
    its own prompt.txt through `clip`, a zero embedding without one, and no borrowed image tokens."""
    import folder_paths
    from ffprop.nodes.ast_rope import node as rope_node
    from ffprop.nodes.video.io import write_video

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ast_rope", ([str(tmp_path)], {".safetensors"}))
    g = torch.Generator().manual_seed(0)
    for name, prompt in (("p1", "first prompt"), ("p2", None)):
        (tmp_path / "pairs" / name).mkdir(parents=True)
        write_video(tmp_path / "pairs" / name / "source.mp4", torch.rand(9, 32, 48, 3, generator=g), 8)
        write_video(tmp_path / "pairs" / name / "edited.mp4", torch.rand(9, 32, 48, 3, generator=g), 8)
        if prompt:
            (tmp_path / "pairs" / name / "prompt.txt").write_text(prompt)

    class TextEncoder:                      # a CLIP's two calls the node makes; the embedding names the text
        def tokenize(self, text):
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.full((1, 8, 4096), float(len(tokens))), {}]]

    seen = {}
    real = rope_node.train_predictor

    def spy(dit, samples, *a, **k):
        seen["samples"] = samples
        return real(dit, samples, *a, **k)

    monkeypatch.setattr(rope_node, "train_predictor", spy)
    model = load_tiny_comfy_wan("i2v", dim=256)                         # 2 heads: the paper variant's split
    clip = torch.rand(9, 32, 48, 3, generator=g)
    positive = [[torch.randn(1, 8, 4096, generator=g), {}]]
    vision = type("CV", (), {"penultimate_hidden_states": torch.randn(1, 257, 1280, generator=g)})()
    FFPASTRoPETrain_ = rope_node.FFPASTRoPETrain
    FFPASTRoPETrain_.execute(model, StubVAE(), positive, clip, 1, 1e-2, "paper", 2.0, 32, 1, True, 1.0, 1.0, 0, "",
                             edited_video=clip.flip(2), pairs_folder=str(tmp_path / "pairs"),
                             clip_vision_output=vision, backend="torch", clip=TextEncoder())
    own, p1, p2 = seen["samples"]
    assert torch.equal(own.cond.context, positive[0][0]) and own.cond.clip_tokens is not None
    assert torch.equal(p1.cond.context, torch.full((1, 8, 4096), float(len("first prompt"))))
    assert torch.equal(p2.cond.context, torch.zeros(1, 8, 4096))          # no prompt.txt: zeros, not the node's
    assert p1.cond.clip_tokens is None and p2.cond.clip_tokens is None     # never source_video's image tokens


def test_freeprop_model_file_applies_lora_and_ast_rope(tmp_path, monkeypatch):
    """A FreeProp file (LoRA + predictor) trained on the comfy host loads as one model: output = the host's LoRA
    patch + AST-RoPE at the predictor's alphas; the input MODEL is untouched."""
    import folder_paths
    from ffprop.nodes.ast_rope.freeprop import FreePropSettings, save_freeprop, train_freeprop
    from ffprop.nodes.ast_rope.node import FFPFreePropApply
    from ffprop.nodes.ast_rope.train import PredictorSample

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ast_rope", ([str(tmp_path)], {".safetensors"}))
    model = load_tiny_comfy_wan("i2v", dim=256)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 16, F, H, W, generator=g)
    c = make_cond("i2v")
    sample = PredictorSample(src, src + 0.5 * torch.randn(src.shape, generator=g), c, src, make_cond("i2v", 5))
    st = FreePropSettings(steps=2, rank=4, learning_rate=1e-2, backend="torch",
                          predictor=PredictorConfig(width=32, depth=1, heads=2, grid=2))
    res = train_freeprop(ComfyWan(model), [sample], 1, st)
    with torch.no_grad():
        res.model.predictor.mlp_t[-1].bias.fill_(-0.5)                   # a clearly non-stock alpha_T
    save_freeprop(tmp_path / "fp.safetensors", res.model)
    out, text = FFPFreePropApply.execute(model, "fp.safetensors", 1.0, source_latent={"samples": src}).result
    assert "alpha_T=0.7" in text and "paper" in text and not model.object_patches
    x = noisy()
    with torch.no_grad():
        got = ComfyWan(out).predict(x, 0.5, c)
        lora_only = ComfyWan(comfy_lora(model, res.model.lora)).predict(x, 0.5, c)
        stock = ComfyWan(model).predict(x, 0.5, c)
    assert (got - lora_only).abs().max() > 1e-6 and (lora_only - stock).abs().max() > 1e-6
    with pytest.raises(ValueError, match="source_latent"):
        FFPFreePropApply.execute(model, "fp.safetensors", 1.0)
    with pytest.raises(ValueError, match="pick a FreeProp model file.*ffprop train freeprop"):
        FFPFreePropApply.execute(model, "none", 1.0, source_latent={"samples": src})
    schema = FFPFreePropApply.GET_SCHEMA()
    combo = next(i for i in schema.inputs if i.id == "freeprop")
    assert combo.default == "none" and combo.options == ["none", "fp.safetensors"]


def comfy_lora(model, lora):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora.comfy_state_dict(), 1.0, 0)[0]
