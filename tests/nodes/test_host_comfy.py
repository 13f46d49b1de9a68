"""The ComfyUI Wan host adapter on tiny random models built from ComfyUI's own WanModel (needs COMFYUI_DIR)."""

from __future__ import annotations

import pytest
import torch
from comfy_support import TINY_KINDS, import_comfy, load_tiny_comfy_wan, tiny_wan_state_dict

import_comfy()

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
from ffprop.nodes.host import names  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond, WanDiT, stock_rope_ids  # noqa: E402

F, H, W = 3, 4, 6
LATENT_CHANNELS = {"i2v": 16, "t2v": 16, "fun_control": 32}


@pytest.fixture(scope="module", params=sorted(TINY_KINDS))
def wan(request) -> tuple[str, ComfyWan]:
    return request.param, ComfyWan(load_tiny_comfy_wan(request.param))


def make_cond(kind: str, batch: int = 1, clip: bool = True, seed: int = 1) -> WanCond:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(batch, 4, F, H, W)
    keep[:, :, 0] = 1.0
    return WanCond(
        keep_mask=keep,
        cond_latent=torch.randn(batch, LATENT_CHANNELS[kind], F, H, W, generator=g),
        context=torch.randn(batch, 12, 4096, generator=g),
        clip_tokens=torch.randn(batch, 257, 1280, generator=g) if clip and kind != "t2v" else None,
    )


def noisy(batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, F, H, W, generator=torch.Generator().manual_seed(seed))


def direct_input(kind: str, x: torch.Tensor, cond: WanCond) -> torch.Tensor:
    if kind == "t2v":
        return x
    if kind == "fun_control":
        return torch.cat([x, cond.cond_latent], dim=1)
    return torch.cat([x, cond.keep_mask, cond.cond_latent], dim=1)


def weights(adapter: ComfyWan) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.module.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_tiny_state_dict_is_detected_as_the_right_model(kind):
    sd = tiny_wan_state_dict(kind)
    assert "head.modulation" in sd and all(v.isfinite().all() for v in sd.values())
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == TINY_KINDS[kind][2]
    assert torch.equal(tiny_wan_state_dict(kind)["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])


def test_dims(wan):
    kind, adapter = wan
    d = adapter.dims
    assert isinstance(adapter, WanDiT)
    assert (d.hidden_size, d.num_heads, d.head_dim, d.num_layers) == (128, 1, 128, 2)
    assert d.in_channels == TINY_KINDS[kind][1] and d.out_channels == 16 and d.text_dim == 4096
    assert d.rope_axes_dim == (44, 42, 42) and d.patch_size == (1, 2, 2)
    assert d.clip_dim == (None if kind == "t2v" else 1280)
    assert len(adapter.blocks()) == 2


@torch.no_grad()
def test_predict_equals_direct_call(wan):
    kind, adapter = wan
    x, cond, t = noisy(2), make_cond(kind, batch=2), torch.tensor([0.8, 0.2])
    v = adapter.predict(x, t, cond)
    ref = adapter.module(direct_input(kind, x, cond), t * 1000, cond.context, clip_fea=cond.clip_tokens,
                         transformer_options={})
    assert v.shape == x.shape and v.isfinite().all() and torch.equal(v, ref)


@torch.no_grad()
def test_conditioning_is_used_or_ignored_by_kind(wan):
    kind, adapter = wan
    x, cond = noisy(), make_cond(kind)
    v = adapter.predict(x, 0.5, cond)
    flipped = adapter.predict(x, 0.5, WanCond(1 - cond.keep_mask, cond.cond_latent, cond.context, cond.clip_tokens))
    no_latent = WanCond(None, None, cond.context, cond.clip_tokens)
    if kind == "t2v":
        assert torch.equal(v, adapter.predict(x, 0.5, no_latent))
        assert torch.equal(v, flipped)
    else:
        assert torch.equal(v, flipped) == (kind == "fun_control")  # Fun-Control has no mask channels
        with pytest.raises(ValueError, match="cond_latent is None"):
            adapter.predict(x, 0.5, no_latent)


def test_cond_mismatch_errors():
    adapter = ComfyWan(load_tiny_comfy_wan("i2v"))
    cond = make_cond("i2v")
    with pytest.raises(ValueError, match="input channels but cond_latent has 32"):
        adapter.predict(noisy(), 0.5, WanCond(cond.keep_mask, torch.zeros(1, 32, F, H, W), cond.context))
    with pytest.raises(ValueError, match="keep_mask must be"):
        adapter.predict(noisy(), 0.5, WanCond(None, cond.cond_latent, cond.context))
    with pytest.raises(ValueError, match="text_dim"):
        adapter.predict(noisy(), 0.5, WanCond(cond.keep_mask, cond.cond_latent, torch.zeros(1, 12, 32)))


def test_linear_names_exist_on_model(wan):
    kind, adapter = wan
    table = adapter.linear_names()
    expected = set(names.CANONICAL) - (set(names.IMAGE_ONLY) if kind == "t2v" else set())
    assert set(table) == expected
    for canonical, paths in table.items():
        for i, path in enumerate(paths):
            module = adapter.module.get_submodule(path)
            assert isinstance(module, torch.nn.Linear), (path, type(module))
            assert names.split_path(path, "comfy") == (i, canonical)
            key = f"diffusion_model.{path}.lora_up.weight"
            assert names.convert_lora_key(names.convert_lora_key(key, "diffusers"), "comfy") == key


@torch.no_grad()
def test_identity_rope_hook_is_bit_identical_and_sees_stock_ids(wan):
    kind, adapter = wan
    x, cond = noisy(), make_cond(kind)
    before = adapter.predict(x, 0.5, cond)
    seen = []
    hooked = adapter.with_rope_positions(lambda ids: seen.append(ids.clone()) or ids)
    assert hooked.patcher is not adapter.patcher
    assert torch.equal(hooked.predict(x, 0.5, cond), before)
    assert torch.equal(seen[0], stock_rope_ids(F, H // 2, W // 2))


@torch.no_grad()
def test_scaled_rope_hook_changes_output_and_leaves_base_alone(wan):
    kind, adapter = wan
    x, cond = noisy(), make_cond(kind)
    before = adapter.predict(x, 0.5, cond)
    base_weights = weights(adapter)
    scaled = adapter.with_rope_positions(lambda ids: ids * torch.tensor([0.25, 1.0, 1.0]))
    assert "diffusion_model.rope_embedder" not in adapter.patcher.object_patches
    changed = scaled.predict(x, 0.5, cond)
    assert (changed - before).abs().max() > 1e-6
    again = adapter.predict(x, 0.5, cond)  # loading the base patcher unpatches the clone's rope
    assert torch.equal(again, before)
    assert type(adapter.module.rope_embedder).__name__ == "EmbedND"
    after = weights(adapter)
    assert after.keys() == base_weights.keys() and all(torch.equal(after[k], base_weights[k]) for k in after)
    assert torch.equal(scaled.predict(x, 0.5, cond), changed)


def test_non_wan_model_rejected():
    class NotWan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(4, 4)

    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(NotWan(), load_device=cpu, offload_device=cpu)
    with pytest.raises(ValueError, match="diffusion model is Linear .*not a Wan DiT.*Load Diffusion Model"):
        ComfyWan(patcher)
    with pytest.raises(ValueError, match="needs a ComfyUI MODEL"):
        ComfyWan(torch.nn.Linear(4, 4))
