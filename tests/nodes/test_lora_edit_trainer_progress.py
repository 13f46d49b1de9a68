"""The three trainer nodes (Train LoRA-Edit, Train FreeProp Model, Train Content Encoder) share nodes/lora_edit/node.py's
loss_progress (the live loss curve as ComfyUI's progress preview) and trained_alone (clones unloaded before and
after training): every trainer's progress hook gets a loss-curve image at its last step, and after training, an
error or Cancel no loaded model is a clone of the trained one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_support import FakeVAE, cancelled, clip_and_mask, import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes.ast_rope.node import FFPASTRoPETrain, FFPFreePropTrain  # noqa: E402
from ffprop.nodes.content_encoder.node import FOLDER, FFPTrainContentEncoder  # noqa: E402
from ffprop.nodes.lora_edit.conditioning import comfy_concat_mask, masked_condition_video  # noqa: E402
from ffprop.nodes.lora_edit.lowvram import preset  # noqa: E402
from ffprop.nodes.lora_edit.node import FFPTrainLoRAEdit, loss_progress, trained_alone, trainer_clone  # noqa: E402
from ffprop.nodes.lora_edit.options import PRESET_ORDER  # noqa: E402
from PIL import Image  # noqa: E402

T, H, W = 9, 32, 32


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for name in ("ast_rope", FOLDER):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], {".safetensors"}))
    return tmp_path


@pytest.fixture
def hook():
    """Every ProgressBar update as (value, total, preview)."""
    calls: list[tuple] = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             calls.append((value, total, preview)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(old)


def context():
    return torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(3))


def run_lora_edit(model, steps):
    src, mask = clip_and_mask()
    return FFPTrainLoRAEdit.execute(model, FakeVAE(), src, [[context(), {}]], steps, 0, 1e-2, 4, "all_linears", 0,
                                    "unlimited", "trim", "crop", edit_mask=mask).args[2]


def run_freeprop(model, steps):
    src, _ = clip_and_mask()
    return FFPFreePropTrain.execute(model, FakeVAE(), [[context(), {}]], src, (src * 0.5).clamp(0, 1), steps, 1e-2, 4,
                                    "global", 0.5, False, "unlimited", 0, "fp_progress").args[1]


def run_content_encoder(model, steps):
    src, mask = clip_and_mask()
    vae = FakeVAE()
    v_cond, keep = masked_condition_video(src, None, src[0])
    lat = vae.encode(v_cond)
    positive = [[context(), {"concat_latent_image": lat, "concat_mask": comfy_concat_mask(keep).to(lat)}]]
    return FFPTrainContentEncoder.execute(model, vae, src, mask, positive, 2, steps, 1e-3, 2, 0.9, 0, "unlimited",
                                          "ce_progress").args[1]


TRAINERS = {"lora_edit": run_lora_edit, "freeprop": run_freeprop, "content_encoder": run_content_encoder}


@pytest.fixture(scope="module")
def model():
    with torch.inference_mode():   # the server loads models under inference mode
        return load_tiny_comfy_wan("i2v", num_layers=2)


def loaded_clones(model) -> int:
    return sum(1 for m in mm.current_loaded_models if m.model is not None and m.model.is_clone(model))


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_shows_the_loss_curve_while_it_trains(name, model, folders, hook):
    """12 steps: the bar moves up to 12 of 12 (ComfyUI throttles plain updates by time, never previews), the
    preview is the loss curve (a JPEG of a PIL image, as ComfyUI sends it) at step 10 and at the last step and
    nothing in between; afterwards no clone of the model stays loaded."""
    with torch.inference_mode():   # as the server runs nodes
        loss = TRAINERS[name](model, 12)
    values = [v for v, _, _ in hook]
    assert values == sorted(set(values)) and values[0] == 1 and values[-1] == 12 and {t for _, t, _ in hook} == {12}
    shown = [v for v, _, p in hook if p is not None]
    assert shown == [10, 12]
    kind, image, size = hook[-1][2]
    assert kind == "JPEG" and size == 512 and isinstance(image, Image.Image)
    # the last preview is the curve the node returns as its `loss` output (LoRA-Edit's also marks its stages)
    shown_curve = torch.from_numpy(np.array(image)).float() / 255
    assert shown_curve.shape == loss[0].shape and float((shown_curve - loss[0]).abs().mean()) < 0.05
    assert float(shown_curve.std()) > 0.05                                   # a drawn curve, not a blank image
    assert loaded_clones(model) == 0


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_cancel_leaves_no_clone_loaded(name, model, folders):
    with cancelled(), torch.inference_mode():
        TRAINERS[name](model, 30)
    assert loaded_clones(model) == 0


def test_trained_alone_unloads_clones_before_and_after_an_error(model):
    other = model.clone()
    mm.load_models_gpu([other])
    assert loaded_clones(model) >= 1
    trainer = trainer_clone(model, preset(PRESET_ORDER[-1]))
    with pytest.raises(RuntimeError, match="boom"), trained_alone(trainer):
        assert loaded_clones(model) == 0
        mm.load_models_gpu([trainer])
        assert loaded_clones(model) == 1
        raise RuntimeError("boom")
    assert loaded_clones(model) == 0


def test_loss_progress_without_a_loss_moves_the_bar_only(hook):
    on_step = loss_progress(comfy.utils.ProgressBar(4), done=2, total=6)
    on_step(1, 4)
    on_step(4, 4, 0.5)
    assert [(v, t) for v, t, _ in hook] == [(3, 6), (6, 6)]        # the first and the final update are never throttled
    assert hook[0][2] is None and hook[1][2][0] == "JPEG"


def test_predictor_trainer_shows_the_loss_curve_too(model, folders, hook):
    """Train AST-RoPE Predictor (the same loss_progress, trained_alone) under inference mode, as the server runs it."""
    src, _ = clip_and_mask()
    with torch.inference_mode():
        text = FFPASTRoPETrain.execute(model, FakeVAE(), [[context(), {}]], src, 10, 1e-3, "global", 2.0, 16, 1,
                                       False, 1.0, 1.0, 0, "pred_progress").args[2]
    assert "over 10 steps" in text
    assert [v for v, _, p in hook if p is not None] == [10] and isinstance(hook[-1][2][1], Image.Image)
    assert loaded_clones(model) == 0
