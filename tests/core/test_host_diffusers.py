"""The diffusers Wan host adapter on tiny random WanTransformer3DModels (CPU, no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:  # e.g. a torchaudio build that does not match torch
    pytest.skip(f"diffusers is installed but WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.host import names  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan, load_diffusers_wan, rope_cos_sin  # noqa: E402
from ffprop.nodes.host.protocol import WanCond, WanDiT, stock_rope_ids  # noqa: E402

TEXT_DIM = 32
F, H, W = 3, 4, 6  # latent frames, latent height, latent width


def tiny_wan(in_channels: int = 36, image: bool = True, seed: int = 0) -> DiffusersWan:
    """2 layers, 2 heads x head_dim 12; image=True adds the CLIP image embedder (Wan 2.1 I2V)."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2,
        image_dim=1280 if image else None, added_kv_proj_dim=24 if image else None,
    )
    return DiffusersWan(model.eval())


def make_cond(latent_channels: int = 16, clip: bool = True, tokens: int = 512, batch: int = 1, seed: int = 1) -> WanCond:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(batch, 4, F, H, W)
    keep[:, :, 0] = 1.0
    return WanCond(
        keep_mask=keep,
        cond_latent=torch.randn(batch, latent_channels, F, H, W, generator=g),
        context=torch.randn(batch, tokens, TEXT_DIM, generator=g),
        clip_tokens=torch.randn(batch, 257, 1280, generator=g) if clip else None,
    )


def noisy(batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, F, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def i2v() -> DiffusersWan:
    return tiny_wan()


def direct(model, x_in, t, cond, clip=True):
    return model(x_in, t * 1000, cond.context, cond.clip_tokens if clip else None, return_dict=False)[0]


@torch.no_grad()
def test_dims_and_protocol(i2v):
    d = i2v.dims
    assert isinstance(i2v, WanDiT)
    assert (d.hidden_size, d.num_heads, d.head_dim, d.num_layers) == (24, 2, 12, 2)
    assert (d.in_channels, d.out_channels, d.text_dim, d.patch_size) == (36, 16, TEXT_DIM, (1, 2, 2))
    assert d.rope_axes_dim == (4, 4, 4) and d.clip_dim == 1280
    assert len(i2v.blocks()) == 2 and i2v.module is i2v.model


@torch.no_grad()
def test_i2v_predict_equals_direct_call(i2v):
    x, cond, t = noisy(2), make_cond(batch=2), torch.tensor([0.9, 0.3])
    v = i2v.predict(x, t, cond)
    ref = direct(i2v.model, torch.cat([x, cond.keep_mask, cond.cond_latent], dim=1), t, cond)
    assert v.shape == x.shape and torch.equal(v, ref)
    assert not torch.equal(v, i2v.predict(x, t, WanCond(1 - cond.keep_mask, cond.cond_latent, cond.context, cond.clip_tokens)))


@torch.no_grad()
def test_batch_one_conditioning_is_broadcast(i2v):
    x, cond = noisy(2), make_cond(batch=1)
    v = i2v.predict(x, 0.5, cond)
    ref = direct(i2v.model, torch.cat([x, cond.keep_mask.expand(2, -1, -1, -1, -1),
                                       cond.cond_latent.expand(2, -1, -1, -1, -1)], dim=1),
                 torch.full((2,), 0.5), WanCond(None, None, cond.context.expand(2, -1, -1),
                                                cond.clip_tokens.expand(2, -1, -1)))
    assert torch.equal(v, ref)


@torch.no_grad()
def test_i2v_without_image_embedder_and_short_context():
    wan = tiny_wan(image=False)
    x, cond = noisy(), make_cond(clip=False, tokens=7)
    v = wan.predict(x, 0.25, cond)
    assert torch.equal(v, direct(wan.model, torch.cat([x, cond.keep_mask, cond.cond_latent], 1), torch.tensor([0.25]), cond, clip=False))
    assert "cross_k_img" not in wan.linear_names() and wan.dims.clip_dim is None


@torch.no_grad()
def test_short_context_is_zero_padded_to_512_for_image_models(i2v):
    x, cond = noisy(), make_cond(tokens=20)
    padded = WanCond(cond.keep_mask, cond.cond_latent, torch.cat([cond.context, torch.zeros(1, 492, TEXT_DIM)], 1),
                     cond.clip_tokens)
    assert torch.equal(i2v.predict(x, 0.5, cond), i2v.predict(x, 0.5, padded))


@torch.no_grad()
def test_t2v_takes_x_alone_and_ignores_mask_and_latent():
    wan = tiny_wan(in_channels=16, image=False)
    x, cond = noisy(), make_cond(clip=False, tokens=9)
    v = wan.predict(x, 0.5, cond)
    assert torch.equal(v, direct(wan.model, x, torch.tensor([0.5]), cond, clip=False))
    assert torch.equal(v, wan.predict(x, 0.5, WanCond(None, None, cond.context)))


@torch.no_grad()
def test_fun_control_48_channels_takes_latents_without_mask():
    wan = tiny_wan(in_channels=48)
    x, cond = noisy(), make_cond(latent_channels=32)
    v = wan.predict(x, 0.5, cond)
    assert torch.equal(v, direct(wan.model, torch.cat([x, cond.cond_latent], 1), torch.tensor([0.5]), cond))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cond_latent=None), "cond_latent is None"),
        (dict(cond_latent=torch.zeros(1, 8, F, H, W)), "input channels but cond_latent has 8"),
        (dict(cond_latent=torch.zeros(1, 16, F + 1, H, W)), "F, h, w must match"),
        (dict(keep_mask=None), "keep_mask must be"),
        (dict(keep_mask=torch.ones(1, 1, F, H, W)), "keep_mask must be"),
        (dict(context=torch.zeros(1, 512, 4096)), "text_dim"),
        (dict(context=torch.zeros(1, 600, TEXT_DIM)), "at most 512"),
        (dict(clip_tokens=None), "needs cond.clip_tokens"),
        (dict(clip_tokens=torch.zeros(1, 257, 1024)), "CLIP-vision-H"),
        (dict(cond_latent=torch.zeros(3, 16, F, H, W)), "batch 3"),
    ],
)
def test_cond_mismatch_errors(i2v, change, message):
    cond = make_cond()
    cond = WanCond(**{**cond.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        i2v.predict(noisy(), 0.5, cond)


def test_bad_x_and_t_errors(i2v):
    cond = make_cond()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        i2v.predict(torch.zeros(1, 16, F, 5, W), 0.5, WanCond(None, None, cond.context, cond.clip_tokens))
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        i2v.predict(torch.zeros(1, 36, F, H, W), 0.5, cond)
    with pytest.raises(ValueError, match="0..1"):
        i2v.predict(noisy(), 500.0, cond)
    with pytest.raises(ValueError, match="one per sample"):
        i2v.predict(noisy(), torch.tensor([0.1, 0.2, 0.3]), cond)


def test_non_wan_model_rejected():
    with pytest.raises(ValueError, match="WanTransformer3DModel, got Linear"):
        DiffusersWan(torch.nn.Linear(2, 2))


def test_linear_names_exist_on_model(i2v):
    table = i2v.linear_names()
    assert set(table) == set(names.CANONICAL)
    for canonical, paths in table.items():
        assert len(paths) == i2v.dims.num_layers
        for i, path in enumerate(paths):
            assert isinstance(i2v.model.get_submodule(path), torch.nn.Linear), path
            assert names.split_path(path, "diffusers") == (i, canonical)


def test_name_and_lora_key_conversion():
    for canonical in names.CANONICAL:
        comfy_path, diff_path = f"blocks.7.{names.COMFY[canonical]}", f"blocks.7.{names.DIFFUSERS[canonical]}"
        assert names.convert_path(comfy_path, "comfy", "diffusers") == diff_path
        assert names.convert_path(diff_path, "diffusers", "comfy") == comfy_path
    key = "diffusion_model.blocks.3.self_attn.q.lora_up.weight"
    assert names.convert_lora_key(key, "diffusers") == "transformer.blocks.3.attn1.to_q.lora_B.weight"
    assert names.convert_lora_key("transformer.blocks.3.attn1.to_q.lora_B.weight", "comfy") == key
    assert names.convert_lora_key("diffusion_model.blocks.0.ffn.2.lora_down.weight", "diffusers") == (
        "transformer.blocks.0.ffn.net.2.lora_A.weight")
    assert names.convert_lora_key("diffusion_model.blocks.1.cross_attn.k_img.alpha", "diffusers") == (
        "transformer.blocks.1.attn2.add_k_proj.alpha")
    assert names.convert_lora_key(key, "comfy") == key
    with pytest.raises(ValueError, match="not a Wan block"):
        names.convert_lora_key("diffusion_model.patch_embedding.lora_up.weight", "diffusers")
    with pytest.raises(ValueError, match="unknown host naming"):
        names.convert_lora_key(key, "peft")


def test_rope_table_formula_matches_stock_buffers(i2v):
    rope = i2v.model.rope
    dims = [rope.t_dim, rope.h_dim, rope.w_dim]
    for dim, cos_t, sin_t in zip(dims, rope.freqs_cos.split(dims, 1), rope.freqs_sin.split(dims, 1)):
        cos, sin = rope_cos_sin(torch.arange(cos_t.shape[0]), dim)
        torch.testing.assert_close(cos, cos_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, sin_t, atol=1e-6, rtol=0)


@torch.no_grad()
def test_identity_rope_hook_is_bit_identical_and_sees_stock_ids(i2v):
    x, cond = noisy(), make_cond()
    seen = []
    hooked = i2v.with_rope_positions(lambda ids: seen.append(ids.clone()) or ids)
    assert torch.equal(hooked.predict(x, 0.5, cond), i2v.predict(x, 0.5, cond))
    assert torch.equal(seen[0], stock_rope_ids(F, H // 2, W // 2))
    stock = i2v.model.rope(x)
    for a, b in zip(hooked.model.rope(x), stock):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@torch.no_grad()
def test_scaled_rope_hook_changes_output_and_leaves_original_alone(i2v):
    x, cond = noisy(), make_cond()
    before = i2v.predict(x, 0.5, cond)
    weights = {k: v.clone() for k, v in i2v.model.state_dict().items()}
    stock_rope = i2v.model.rope
    scaled = i2v.with_rope_positions(lambda ids: ids * torch.tensor([0.5, 1.0, 1.0]))
    changed = scaled.predict(x, 0.5, cond)
    assert (changed - before).abs().max() > 1e-5
    assert torch.equal(i2v.predict(x, 0.5, cond), before)
    assert i2v.model.rope is stock_rope and scaled.model is not i2v.model
    assert scaled.model.blocks is i2v.model.blocks  # weights shared, not copied
    assert all(torch.equal(weights[k], v) for k, v in i2v.model.state_dict().items())
    # hooks compose: the newest sees the stock ids and feeds the older one
    twice = scaled.with_rope_positions(lambda ids: ids * torch.tensor([2.0, 1.0, 1.0]))
    assert torch.equal(twice.predict(x, 0.5, cond), before)


def test_rope_hook_with_wrong_shape_is_rejected(i2v):
    bad = i2v.with_rope_positions(lambda ids: ids[:, :2])
    with pytest.raises(ValueError, match="shaped like its input"):
        bad.predict(noisy(), 0.5, make_cond())


@torch.no_grad()
def test_load_diffusers_wan_round_trip(tmp_path, i2v):
    i2v.model.save_pretrained(tmp_path / "transformer")
    loaded = load_diffusers_wan(tmp_path, dtype=torch.float32, device="cpu")
    x, cond = noisy(), make_cond()
    assert torch.equal(loaded.predict(x, 0.5, cond), i2v.predict(x, 0.5, cond))
    with pytest.raises(FileNotFoundError, match="no diffusers Wan model"):
        load_diffusers_wan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_diffusers_wan(tmp_path / "empty")


@torch.no_grad()
def test_load_in_bfloat16_keeps_fp32_modules(tmp_path, i2v):
    i2v.model.save_pretrained(tmp_path)
    wan = load_diffusers_wan(tmp_path, dtype=torch.bfloat16)
    assert wan.model.patch_embedding.weight.dtype == torch.bfloat16
    assert wan.model.scale_shift_table.dtype == torch.float32 and wan.model.rope.freqs_cos.dtype == torch.float32
    assert torch.equal(wan.model.rope.freqs_cos, i2v.model.rope.freqs_cos)
    x, cond = noisy(), make_cond()
    v = wan.predict(x, 0.5, cond)
    assert v.dtype == torch.float32 and v.isfinite().all()
    assert torch.equal(wan.with_rope_positions(lambda ids: ids).predict(x, 0.5, cond), v)
