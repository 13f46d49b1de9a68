"""The ComfyUI Wan host adapter on tiny random models built from ComfyUI's own WanModel (needs COMFYUI_DIR)."""

from __future__ import annotations

import pytest
import torch
from comfy_support import (
    TINY_KINDS,
    UNSUPPORTED_KINDS,
    import_comfy,
    load_tiny_comfy_wan,
    tiny_unsupported_state_dict,
    tiny_wan_state_dict,
)

import_comfy()

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
from ffprop.nodes.host import names  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan, check_wan_model, host_training, streams_weights  # noqa: E402
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
    with pytest.raises(ValueError, match="MODEL is Linear, not a Wan DiT.*I2V \\(36 input.*Load Diffusion Model"):
        ComfyWan(patcher)
    with pytest.raises(ValueError, match="needs a ComfyUI MODEL"):
        ComfyWan(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED_KINDS))
def test_models_the_host_loads_but_ffprop_does_not_drive_get_a_clear_error(kind):
    """Wan 2.2 TI2V-5B, VACE, Wan 2.2 Animate, Flux built from this ComfyUI's own classes: each MODEL node refuses
    it with a ValueError naming the model and what is supported, before any other work (no traceback)."""
    from ffprop.nodes.ast_rope.node import FFPASTRoPE, FFPASTRoPETrain
    from ffprop.nodes.chunks.node import FFPChunkSample
    from ffprop.nodes.lora_edit.node import FFPTrainLoRAEdit

    sd = tiny_unsupported_state_dict(kind)
    assert type(comfy.model_detection.model_config_from_unet(sd, "")).__name__ == UNSUPPORTED_KINDS[kind]
    model = load_tiny_comfy_wan(kind)
    names = {"ti2v_5b": "Wan 2.2 TI2V-5B", "vace": "Wan VACE", "animate": "Wan 2.2 Animate", "flux": "Flux, not a Wan"}
    expect = f"MODEL is {names[kind]}.*does not support.*I2V \\(36 input channels.*T2V \\(16\\).*Fun-Control \\(48\\)"
    clip, cond = torch.rand(5, 32, 32, 3), [[torch.zeros(1, 4, 4096), {}]]
    calls = {
        "trainer": lambda: FFPTrainLoRAEdit.execute(model, None, clip, cond, 1, 0, 1e-4, 4, "all_linears", 0, "24GB",
                                                    "trim", "crop"),
        "ast_rope": lambda: FFPASTRoPE.execute(model, "manual", "global", 1.0, 0.5, 2.0, 1.0, True, "auto", "none"),
        "predictor_trainer": lambda: FFPASTRoPETrain.execute(model, None, cond, clip, 1, 1e-3, "warped", 2.0, 32, 1,
                                                             False, 1.0, 1.0, 0, ""),
        "chunk_sampler": lambda: FFPChunkSample.execute(model, None, cond, cond, None, clip[:1], None, "i2v", 0, 1,
                                                        1.0, "euler", "simple", True, True, True, 1.0, "auto"),
    }
    for node, call in calls.items():
        with pytest.raises(ValueError, match=expect):
            call()
            pytest.fail(f"{node} accepted a {kind} model")
    assert not model.object_patches and not model.patches


@torch.no_grad()
def test_wan22_i2v_expert_layout_is_driven_as_i2v():
    """Wan 2.2 I2V A14B experts are Wan 2.1 blocks with 36 input channels and no CLIP image embedder: ComfyUI
    detects them as WAN21_T2V (concat_cond still builds mask + image); FFProp drives them as I2V."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.wan.model import WanModel
    from comfy_support import random_state_dict

    sd = random_state_dict(WanModel(model_type="t2v", in_dim=36, dim=128, ffn_dim=256, num_heads=1, num_layers=2,
                                    text_dim=4096, out_dim=16, device="cpu", dtype=torch.float32,
                                    operations=comfy.ops.disable_weight_init))
    adapter = ComfyWan(comfy.sd.load_diffusion_model_state_dict(sd))
    assert adapter.kind == "i2v" and adapter.dims.clip_dim is None
    x, cond = noisy(), make_cond("i2v", clip=False)
    ref = adapter.module(direct_input("i2v", x, cond), torch.tensor([500.0]), cond.context, transformer_options={})
    assert torch.equal(adapter.predict(x, 0.5, cond), ref)


def test_check_wan_model_kinds():
    assert [check_wan_model(load_tiny_comfy_wan(k)) for k in sorted(TINY_KINDS)] == sorted(TINY_KINDS)
    with pytest.raises(ValueError, match="Wan t2v model but the chunk sampler needs a Wan i2v model"):
        check_wan_model(load_tiny_comfy_wan("t2v"), ("i2v",), "the chunk sampler")


def test_training_contract_is_set_inside_and_restored_after_success_and_error():
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        with host_training() as has:           # 0.3.64: no switch, nothing changes
            assert has is False and not hasattr(mm, "in_training")
        pytest.skip("this ComfyUI has no comfy.model_management.in_training (its RoPE is plain torch)")
    assert mm.in_training is False
    with host_training() as has:
        assert has is True and mm.in_training is True
    assert mm.in_training is False
    with pytest.raises(KeyError), host_training():
        raise KeyError("boom")
    assert mm.in_training is False
    with pytest.raises(RuntimeError, match="kernel without a backward sat on the training graph.*report it"), \
            host_training():
        raise RuntimeError("Trying to backward through comfy_kitchen.x but no autograd formula was registered")
    assert mm.in_training is False
    mm.in_training = True                       # nested in a caller that set it: left as found
    try:
        with host_training():
            pass
        assert mm.in_training is True
    finally:
        mm.in_training = False


def test_host_rope_kernel_has_no_backward_unless_training():
    """Why the contract exists: on a host with in_training, a backward through its stock forward fails outside
    host_training() (comfy_kitchen's inference RoPE) and works inside it, with gradients on q's weight."""
    if not hasattr(comfy.model_management, "in_training"):
        pytest.skip("this ComfyUI has no comfy.model_management.in_training (its RoPE is plain torch)")
    adapter = ComfyWan(load_tiny_comfy_wan("i2v"))
    x, cond = noisy(), make_cond("i2v")
    weight = adapter.module.blocks[0].self_attn.q.weight

    def backward():
        weight.requires_grad_(True)
        try:
            adapter.predict(x, 0.5, cond).square().mean().backward()
        finally:
            weight.requires_grad_(False)

    with pytest.raises(RuntimeError, match="no autograd formula"):
        backward()
    weight.grad = None
    with host_training():
        backward()
    assert weight.grad is not None and float(weight.grad.abs().max()) > 0


def test_cpu_models_are_never_streamed_by_the_host():
    """Dynamic VRAM (comfy-aimdo) only exists for GPU load devices: on a CPU run ComfyUI builds a plain patcher
    even through ModelPatcherDynamic, so the trainer's own block swap stays in charge."""
    model = load_tiny_comfy_wan("i2v")
    assert not streams_weights(model) and not ComfyWan(model).streams_weights()
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic is None:
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)")
    cpu = torch.device("cpu")
    rerouted = dynamic(model.model, load_device=cpu, offload_device=cpu)
    assert type(rerouted) is comfy.model_patcher.ModelPatcher and not streams_weights(rerouted)
