"""Content-encoder nodes with ComfyUI's real Wan classes (needs COMFYUI_DIR): a zero-init encoder samples exactly the
stock model through the real sampler, the cached MODEL stays untouched, training saves a file that loads back,
Cancel stops it, the mask node gives a MASK, composition with LoRA patches and AST-RoPE, bad input."""

from __future__ import annotations

import pytest
import torch
from comfy_support import FakeVAE, cancelled, import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes.content_encoder.files import save_encoder  # noqa: E402
from ffprop.nodes.content_encoder.model import build_encoder  # noqa: E402
from ffprop.nodes.content_encoder.node import (  # noqa: E402
    FOLDER,
    FFPApplyContentEncoder,
    FFPContentEncoderLoader,
    FFPContentEncoderMask,
    FFPTrainContentEncoder,
)
from ffprop.nodes.host.comfy import ComfyWan  # noqa: E402

T, H, W = 9, 32, 32



def clip_and_mask(seed=0):
    src = torch.rand(T, H, W, 3, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(T, H, W)
    mask[:, 8:20, 6:18] = 1
    return src, mask


def i2v_positive(vae, src, seed=3):
    from ffprop.nodes.lora_edit.conditioning import comfy_concat_mask, masked_condition_video

    v_cond, keep = masked_condition_video(src, None, src[0])
    lat = vae.encode(v_cond)
    ctx = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(seed))
    return [[ctx, {"concat_latent_image": lat, "concat_mask": comfy_concat_mask(keep).to(lat)}]]


def trained_like(enc, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [enc.fusion.weight, enc.task_embed, *[m.fc2.weight for m in enc.inject]]:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return enc


def sample(model, positive, seed=11, steps=3):
    latent = torch.zeros(1, 16, (T - 1) // 4 + 1, H // 8, W // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=seed)


def state(model):
    dm = model.model.diffusion_model
    own = getattr(dm.forward_orig, "__func__", None) is type(dm).forward_orig   # ComfyUI restores the bound method
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}, not own


@pytest.fixture(scope="module")
def model():
    with torch.inference_mode():
        return load_tiny_comfy_wan("i2v", num_layers=3)


@pytest.fixture()
def encoder_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def test_zero_init_encoder_samples_the_stock_model_bit_for_bit_and_leaves_the_model_alone(model):
    vae, (src, _) = FakeVAE(), clip_and_mask()
    positive = i2v_positive(vae, src)
    before, _ = state(model)
    stock = sample(model, positive)
    enc = build_encoder(ComfyWan(model), 2)
    patched = FFPApplyContentEncoder.execute(model, vae, enc, src, 1.0, "mask_fill").args[0]
    assert patched is not model and not model.object_patches
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert torch.equal(sample(patched, positive), stock)
    trained_like(enc)
    assert (sample(patched, positive) - stock).abs().max() > 1e-4
    off = FFPApplyContentEncoder.execute(model, vae, enc, src, 0.0, "mask_fill").args[0]
    assert torch.equal(sample(off, positive), stock)
    assert torch.equal(sample(model, positive), stock)            # the cached MODEL samples as before
    after, patched_left = state(model)
    assert not patched_left and all(torch.equal(before[k], after[k]) for k in before)


def test_train_node_saves_a_file_that_loads_back_and_keeps_the_base(model, encoder_folder):
    vae, (src, mask) = FakeVAE(), clip_and_mask()
    positive = i2v_positive(vae, src)
    before, _ = state(model)
    with torch.inference_mode():      # as the server runs nodes
        enc, loss, name = FFPTrainContentEncoder.execute(model, vae, src, mask, positive, 2, 3, 1e-3, 3, 0.9, 0,
                                                         "24GB", "ce_test").args   # the default: bf16 compute
    after, _ = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert name == "ce_test.safetensors" and (encoder_folder / name).is_file()
    assert not [p for p in encoder_folder.iterdir() if p.name.startswith(".")]   # no temp file left
    assert loss.shape[0] == 1 and loss.shape[-1] == 3
    with torch.inference_mode():
        back = FFPContentEncoderLoader.execute(model, name).args[0]
    a, b = enc.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - v).abs().max().item() for k, v in build_encoder(ComfyWan(model), 2).state_dict().items()) > 0
    patched = FFPApplyContentEncoder.execute(model, vae, back, src, 1.0, "copy_paste").args[0]
    out = sample(patched, positive)
    mask_out = FFPContentEncoderMask.execute(patched, positive, {"samples": out}, 0.05, 0).args[0]
    assert tuple(mask_out.shape) == (T, H, W) and 0 <= float(mask_out.min()) and float(mask_out.max()) <= 1


def test_cancel_stops_training_and_writes_nothing(model, encoder_folder):
    vae, (src, mask) = FakeVAE(), clip_and_mask()
    with cancelled():
        FFPTrainContentEncoder.execute(model, vae, src, mask, i2v_positive(vae, src), 1, 50, 1e-3, 1, 0.9, 0,
                                       "unlimited", "never")
    assert not list(encoder_folder.iterdir())
    assert not model.object_patches


def test_composes_with_lora_patches_and_ast_rope(model):
    from ffprop.nodes.ast_rope.node import NONE, FFPASTRoPE
    from ffprop.nodes.lora_edit.lora import create_lora
    from ffprop.nodes.lora_edit.node import apply_lora

    vae, (src, _) = FakeVAE(), clip_and_mask()
    positive = i2v_positive(vae, src)
    with torch.inference_mode(False):
        lora = create_lora(ComfyWan(model), 4, "all_linears", seed=1)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    styled = FFPASTRoPE.execute(apply_lora(model, lora), mode="manual", variant="global", alpha_s=0.8, alpha_t=0.9,
                                alpha_max=2.0, strength=1.0, anchor_first=True, backend="auto",
                                predictor=NONE).args[0]
    reference = sample(styled, positive)
    assert (reference - sample(model, positive)).abs().max() > 1e-4
    enc = build_encoder(ComfyWan(model), 2)
    assert torch.equal(sample(FFPApplyContentEncoder.execute(styled, vae, enc, src, 1.0, "mask_fill").args[0],
                              positive), reference)
    trained_like(enc)
    plain = sample(FFPApplyContentEncoder.execute(model, vae, enc, src, 1.0, "mask_fill").args[0], positive)
    both = sample(FFPApplyContentEncoder.execute(styled, vae, enc, src, 1.0, "mask_fill").args[0], positive)
    assert (both - plain).abs().max() > 1e-4                     # LoRA + AST-RoPE still act under the encoder


def test_bad_input_gets_clear_errors(model, encoder_folder):
    vae, (src, mask) = FakeVAE(), clip_and_mask()
    t2v = load_tiny_comfy_wan("t2v", num_layers=3)
    enc = build_encoder(ComfyWan(model), 2)
    with pytest.raises(ValueError, match=r"text-to-video \(T2V\)"):
        FFPApplyContentEncoder.execute(t2v, vae, enc, src, 1.0, "mask_fill")
    with pytest.raises(ValueError, match=r"text-to-video \(T2V\)"):
        FFPTrainContentEncoder.execute(t2v, vae, src, mask, i2v_positive(vae, src), 1, 1, 1e-3, 1, 0.9, 0,
                                       "unlimited", "x")
    with pytest.raises(ValueError, match="depth N = 4 is larger than the generator's 3 blocks"):
        FFPTrainContentEncoder.execute(model, vae, src, mask, i2v_positive(vae, src), 4, 1, 1e-3, 1, 0.9, 0,
                                       "unlimited", "x")
    patched = FFPApplyContentEncoder.execute(model, vae, enc, src[:5], 1.0, "mask_fill").args[0]
    with pytest.raises(ValueError, match="same length and size as the generated video"):
        sample(patched, i2v_positive(vae, src))
    narrow = FFPApplyContentEncoder.execute(model, vae, enc, src[:, :, :16], 1.0, "mask_fill").args[0]   # 16x32
    with pytest.raises(ValueError, match="same length and size as the generated video"):
        sample(narrow, i2v_positive(vae, src))                                                      # sampled 32x32
    with pytest.raises(ValueError, match="4k\\+1|multiples of 16"):
        FFPApplyContentEncoder.execute(model, vae, enc, src[:, :24], 1.0, "mask_fill")
    other = load_tiny_comfy_wan("i2v", num_layers=2)
    save_encoder(build_encoder(ComfyWan(model), 2), encoder_folder / "three.safetensors")
    with pytest.raises(ValueError, match="generator depth 3 but this model needs 2"):
        FFPContentEncoderLoader.execute(other, "three.safetensors")
    wide = load_tiny_comfy_wan("i2v", num_layers=3, dim=256)
    with pytest.raises(ValueError, match=r"width \(hidden size\) 128 but this model needs 256"):
        FFPContentEncoderLoader.execute(wide, "three.safetensors")
    with pytest.raises(ValueError, match="no content encoder"):
        FFPContentEncoderMask.execute(model, i2v_positive(vae, src), {"samples": torch.zeros(1, 16, 3, 4, 4)}, 0.05, 0)
    with pytest.raises(ValueError, match="sample at the source clip's size"):
        FFPContentEncoderMask.execute(patched, i2v_positive(vae, src), {"samples": torch.zeros(1, 16, 3, 4, 4)}, 0.05, 0)
    assert "no '..'" in FFPTrainContentEncoder.validate_inputs("../x") or "'..'" in FFPTrainContentEncoder.validate_inputs("../x")


@pytest.mark.parametrize("kind", ["linear", "flux"])
def test_non_wan_models_are_refused_by_every_model_node(model, encoder_folder, kind):
    """A MODEL that is not a Wan DiT (a bare module, or Flux built from this host's own classes): each node says what
    it got and what it needs, before any work."""
    import comfy.model_patcher

    if kind == "linear":
        cpu, holder = torch.device("cpu"), torch.nn.Module()
        holder.diffusion_model = torch.nn.Linear(4, 4)
        other = comfy.model_patcher.ModelPatcher(holder, load_device=cpu, offload_device=cpu)
        expect = "MODEL is Linear, not a Wan DiT"
    else:
        other = load_tiny_comfy_wan("flux")
        expect = "Flux, not a Wan"
    vae, (src, mask) = FakeVAE(), clip_and_mask()
    save_encoder(build_encoder(ComfyWan(model), 2), encoder_folder / "enc.safetensors")
    enc = build_encoder(ComfyWan(model), 2)
    calls = [lambda: FFPContentEncoderLoader.execute(other, "enc.safetensors"),
             lambda: FFPApplyContentEncoder.execute(other, vae, enc, src, 1.0, "mask_fill"),
             lambda: FFPTrainContentEncoder.execute(other, vae, src, mask, i2v_positive(vae, src), 1, 1, 1e-3, 1, 0.9,
                                                    0, "unlimited", "x")]
    for call in calls:
        with pytest.raises(ValueError, match=expect):
            call()
    assert not list(encoder_folder.glob("x*.safetensors"))
