"""LoRA-Edit nodes with ComfyUI's real Wan classes (needs COMFYUI_DIR): the conditioning reaches WAN21.concat_cond
as the keep-mask, the trainer runs under inference mode like the server, the MODEL output carries ComfyUI lora
patches, the base model stays bit-identical, the saved file loads with ComfyUI's LoRA loader and gives the same
output, cancel stops training, T2V is refused."""

from __future__ import annotations

import pytest
import torch
from comfy_support import FakeVAE, cancelled, clip_and_mask, import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.lora_edit.conditioning import keep_channels, masked_condition_video  # noqa: E402
from ffprop.nodes.lora_edit.node import (  # noqa: E402
    FFPLoRAEditConditioning,
    FFPLoRAEditMemory,
    FFPSaveLoRA,
    FFPTrainLoRAEdit,
    lora_edit_conditioning,
)

T, H, W = 9, 32, 32



def positive(seed=3):
    return [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope="module")
def model():
    with torch.inference_mode():   # the server loads models under inference mode: weights are inference tensors
        return load_tiny_comfy_wan("i2v")


def predict(patcher, x, cond):
    with torch.inference_mode():
        return ComfyWan(patcher).predict(x, 0.5, cond)


def probe_cond():
    g = torch.Generator().manual_seed(5)
    keep = torch.ones(1, 4, 3, 4, 4)
    keep[:, :, 1:, 1:3, 1:3] = 0
    return WanCond(keep, torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 8, 4096, generator=g))


def train(model, **kw):
    src, mask = clip_and_mask()
    args = dict(model=model, vae=FakeVAE(), source_video=src, positive=positive(), steps=4, steps_stage2=0,
                learning_rate=1e-2, rank=4, target_modules="all_linears", seed=0, memory_preset="24GB",
                frame_policy="trim", size_policy="crop", edit_mask=mask)
    args.update(kw)
    with torch.inference_mode():
        out = FFPTrainLoRAEdit.execute(**args).args
    assert len(out) == 5 and out[3] is None and out[4] is None      # Wan 2.1: the expert outputs stay empty
    return out[:3]


def test_conditioning_reaches_concat_cond_as_keep_mask(model):
    src, mask = clip_and_mask()
    edited = torch.rand(1, H, W, 3)
    pos, neg, latent = lora_edit_conditioning(positive(), positive(4), FakeVAE(), src, mask, edited)
    assert latent["samples"].shape == (1, 16, 3, 4, 4)
    cond = pos[0][1]
    assert neg[0][1]["concat_mask"] is cond["concat_mask"]
    noise = torch.zeros(1, 16, 3, 4, 4)
    y = model.model.concat_cond(noise=noise, device="cpu", concat_latent_image=cond["concat_latent_image"],
                                concat_mask=cond["concat_mask"])
    _, keep = masked_condition_video(src, mask, edited)
    assert y.shape == (1, 20, 3, 4, 4)
    assert torch.equal(y[:, :4], keep_channels(keep))                              # mask: 1 = keep, frame 1 kept
    v_cond, _ = masked_condition_video(src, mask, edited)
    torch.testing.assert_close(y[:, 4:], model.model.process_latent_in(FakeVAE().encode(v_cond)))
    out = FFPLoRAEditConditioning.execute(positive(), positive(4), FakeVAE(), src[:, :30, :30], edited, 0, "trim",
                                          "crop", "auto", edit_mask=mask[:, :30, :30]).args
    assert out[2]["samples"].shape == (1, 16, 3, 2, 2)   # 30x30 centre-cropped to 16x16


def test_trainer_patches_a_clone_and_leaves_the_base_bit_identical(model):
    x, cond = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(9)), probe_cond()
    before_sd = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before = predict(model, x, cond)
    patched, lora, loss = train(model)
    assert patched is not model and len(patched.patches) == len(lora.paths) == 2 * 10
    assert all(type(v[0][1]).__name__ == "LoRAAdapter" for v in patched.patches.values())  # stock lora patches
    assert loss.shape == (1, 256, 512, 3)
    after_base = predict(model, x, cond)
    assert torch.equal(before, after_base)
    assert all(torch.equal(before_sd[k], v) for k, v in model.model.diffusion_model.state_dict().items())
    with_lora = predict(patched, x, cond)
    assert (with_lora - before).abs().max() > 1e-4
    assert torch.equal(predict(model, x, cond), before)     # unloading the patched clone restores the base


def core_lora_model_loader(model, lora_sd, bypass=False):
    """Core's LoraModelLoader (a LORA_MODEL dict onto a MODEL): V3 node on 0.28 (with `bypass`), V1 on 0.3.64."""
    import inspect

    from comfy_extras.nodes_train import LoraModelLoader

    if hasattr(LoraModelLoader, "execute"):
        if "bypass" not in inspect.signature(LoraModelLoader.execute).parameters:
            pytest.skip("this ComfyUI's LoraModelLoader has no bypass mode")
        return LoraModelLoader.execute(model, lora_sd, 1.0, bypass).args[0]
    if bypass:
        pytest.skip("this ComfyUI's LoraModelLoader has no bypass mode")
    return LoraModelLoader().load_lora_model(model, lora_sd, 1.0)[0]


def test_saved_lora_loads_with_core_loaders_and_matches(model, tmp_path, monkeypatch):
    """The file FFPSaveLoRA writes, in core's LoraLoaderModelOnly (by name from models/loras) and LoraModelLoader
    (as a LORA_MODEL dict): the same output as the trainer's own MODEL output, bit for bit."""
    import nodes

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    patched, lora, _ = train(model, steps=2, seed=1)
    name = FFPSaveLoRA.execute(lora, "edits/clip1", False).args[0]
    assert name == "edits/clip1.safetensors" and (tmp_path / name).is_file()
    assert FFPSaveLoRA.execute(lora, "edits/clip1", False).args[0] == "edits/clip1_2.safetensors"
    with pytest.raises(ValueError, match="not allowed"):
        FFPSaveLoRA.execute(lora, "../escape", False)
    x, cond = torch.randn(1, 16, 3, 4, 4), probe_cond()
    ours = predict(patched, x, cond)
    assert not torch.equal(ours, predict(model, x, cond))
    by_name = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert torch.equal(predict(by_name, x, cond), ours)
    sd = comfy.utils.load_torch_file(str(tmp_path / name), safe_load=True)
    assert torch.equal(predict(core_lora_model_loader(model, sd), x, cond), ours)


def test_saved_lora_in_core_bypass_mode_matches(model, tmp_path, monkeypatch):
    """0.28's LoraModelLoader bypass mode (LoRA as forward hooks, weights untouched): same output up to rounding."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    patched, lora, _ = train(model, steps=2, seed=1)
    name = FFPSaveLoRA.execute(lora, "bypass", False).args[0]
    sd = comfy.utils.load_torch_file(str(tmp_path / name), safe_load=True)
    bypassed = core_lora_model_loader(model, sd, bypass=True)
    x, cond = torch.randn(1, 16, 3, 4, 4), probe_cond()
    torch.testing.assert_close(predict(bypassed, x, cond), predict(patched, x, cond), rtol=1e-4, atol=1e-5)


def _in_training():
    return getattr(comfy.model_management, "in_training", None)


def test_trainer_follows_the_host_training_contract_and_restores_it(model):
    """in_training (where the host has it) is on during every step and off again after success, error and
    Cancel; 0.3.64 has no switch and nothing is added."""
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(_in_training())

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        train(model, steps=2)
        expect = None if _in_training() is None else True
        assert seen == [expect, expect] and _in_training() in (None, False)

        def failing(value, total, preview, node_id=None):
            raise RuntimeError("progress hook failed")

        comfy.utils.set_progress_bar_global_hook(failing)
        with pytest.raises(RuntimeError, match="progress hook failed"):
            train(model, steps=2)
        assert _in_training() in (None, False)
        with cancelled():
            train(model, steps=5)
        assert _in_training() in (None, False)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


def test_block_swap_is_left_to_the_host_when_it_streams_weights(model, monkeypatch):
    """ComfyUI's dynamic VRAM streams the weights itself; the trainer then swaps no block of its own (the
    BlockRunner it builds, recorded by a subclass, is asked for none). A CPU run cannot build a streaming patcher
    (ComfyUI falls back to a plain one), so the capability is stood in for here; training is otherwise the same."""
    from ffprop.nodes.lora_edit import trainer
    from ffprop.nodes.lora_edit.lora import attach_hooks, create_lora
    from ffprop.nodes.lora_edit.lowvram import MemorySettings

    swapped = []

    class Recording(trainer.BlockRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            swapped.append(len(self.swapped))

    class Streaming(ComfyWan):
        def streams_weights(self):
            return True

    monkeypatch.setattr(trainer, "BlockRunner", Recording)
    samples = [trainer.TrainSample(torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4)),
                                   probe_cond())]
    loras = []

    def clone():            # as the trainer node does: a compute dtype makes ComfyUI cast (copy) the weights
        out = model.clone()
        out.set_model_compute_dtype(torch.bfloat16)
        return out

    with torch.inference_mode(False):
        for adapter in (ComfyWan(clone()), Streaming(clone())):
            lora = create_lora(adapter, 2, "all_linears", 0)
            trainer.train_lora_edit(adapter, samples, trainer.TrainSettings(steps=2, rank=2),
                                    memory=MemorySettings(swap_fraction=1.0), lora=lora,
                                    attach=lambda lo, a=adapter: attach_hooks(a, lo))
            loras.append(lora)
    assert swapped == [2, 0]
    for (_, a), (_, b) in zip(loras[0].items(), loras[1].items()):
        assert torch.equal(a.up, b.up) and float(a.up.abs().max()) > 0


def test_memory_node_stage2_and_windows(model):
    mem = FFPLoRAEditMemory.execute(True, 1.0, 5, 4, "fp32").args[0]
    src, _ = clip_and_mask()
    keys = src[[4]].clone()
    _, lora, loss = train(model, memory=mem, keyframes=keys, keyframe_frames="5", steps=2, steps_stage2=3)
    assert len(lora.paths) == 20 and loss.shape[0] == 1
    with pytest.raises(ValueError, match="outside the clip"):
        train(model, keyframes=keys, keyframe_frames="12", steps=1, steps_stage2=1)


def test_memory_node_activation_offload_trains_comfy_blocks(model):
    mem = FFPLoRAEditMemory.execute(True, 1.0, 0, 4, "fp32", True).args[0]
    assert mem.offload_activations and FFPLoRAEditMemory.execute(True, 0.0, 0, 4, "auto").args[0].offload_activations is False
    _, lora, loss = train(model, memory=mem, steps=2)
    assert len(lora.paths) == 20 and loss.shape[0] == 1
    assert all(float(layer.up.abs().max()) > 0 for _, layer in lora.items())   # gradients reached every layer
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        FFPLoRAEditMemory.execute(False, 0.0, 0, 4, "auto", True)


def test_memory_node_split_blocks_trains_comfy_blocks_like_plain(model):
    """split_blocks on ComfyUI's own WanAttentionBlock: the same losses as plain checkpointing (fp32)."""
    plain = FFPLoRAEditMemory.execute(True, 0.0, 0, 4, "fp32", False, False).args[0]
    split = FFPLoRAEditMemory.execute(True, 1.0, 0, 4, "fp32", True, True).args[0]
    assert split.split_blocks and not plain.split_blocks
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *a, **k):
        calls.append(fn)
        return real(fn, *a, **k)

    torch.utils.checkpoint.checkpoint = counting
    try:
        results = [train(model, memory=plain, steps=3)]
        n_plain = len(calls)
        results.append(train(model, memory=split, steps=3))
    finally:
        torch.utils.checkpoint.checkpoint = real
    n_split = len(calls) - n_plain
    # 2 blocks x (self-attention, cross-attention, FFN chunks) nested inside the block checkpoints
    assert n_split >= 3 * n_plain, f"split_blocks checkpointed {n_split} times vs {n_plain} for whole blocks"
    (_, lora_a, _), (_, lora_b, _) = results
    for (name, a), (_, b) in zip(lora_a.items(), lora_b.items()):
        assert torch.allclose(a.up, b.up, rtol=1e-4, atol=1e-6), name   # same training trajectory
    assert all(float(layer.up.abs().max()) > 0 for _, layer in lora_b.items())
    with pytest.raises(ValueError, match="split_blocks needs gradient_checkpointing"):
        FFPLoRAEditMemory.execute(False, 0.0, 0, 4, "auto", False, True)


def test_cancel_and_bad_input(model):
    with cancelled():
        train(model, steps=50)
    with torch.inference_mode():
        t2v = load_tiny_comfy_wan("t2v")
    with pytest.raises(ValueError, match="text-to-video"):
        train(t2v)
    with pytest.raises(ValueError, match="unconnected"):
        train(model, edit_mask=torch.zeros(T, H, W))
    with pytest.raises(ValueError, match="4k\\+1"):
        train(model, source_video=torch.rand(8, H, W, 3), edit_mask=None, frame_policy="error")


def test_trains_an_fp8_model_in_bf16_compute():
    from comfy_support import tiny_wan_state_dict

    with torch.inference_mode():
        fp8 = comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict("i2v"),
                                                        model_options={"dtype": torch.float8_e4m3fn})
    assert fp8.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    x, cond = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2)), probe_cond()
    before = predict(fp8, x, cond)
    patched, lora, _ = train(fp8, steps=2)
    assert fp8.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn   # not converted
    assert not torch.equal(predict(patched, x, cond), before) and torch.equal(predict(fp8, x, cond), before)
