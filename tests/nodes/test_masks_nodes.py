"""Mask nodes executed inside ComfyUI's runtime (folder_paths, ModelPatcher, load_models_gpu) on tiny tensors
with a random-weight SAM2.1 tiny checkpoint (needs COMFYUI_DIR and the sam2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_support import import_comfy

import_comfy()
pytest.importorskip("sam2", reason="the sam2 package is not installed in this Python (see README: SAM2 install step)")

import folder_paths  # noqa: E402
from ffprop.nodes.masks.node import (  # noqa: E402
    FOLDER,
    FFPMaskCombine,
    FFPMaskOps,
    FFPMaskPrompts,
    FFPMaskPropagate,
    FFPSAM2Loader,
    SAM2Handle,
)
from ffprop.nodes.masks.prompts import MaskPrompts  # noqa: E402
from ffprop.nodes.masks.sam2_model import random_checkpoint  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

T, H, W = 5, 48, 64
PROMPTS = json.dumps({"version": 1, "width": W, "height": H, "prompts": [
    {"frame": 0, "object": 1, "points": [[20, 20, 1]], "boxes": [[8, 8, 36, 36]]},
    {"frame": 4, "object": 3, "boxes": [[30, 10, 60, 40]]}]})


@pytest.fixture(autouse=True)
def _comfy_like(tmp_path):
    old_temp = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():                   # as ComfyUI runs nodes
        yield
    torch.set_num_threads(n)
    folder_paths.set_temp_directory(old_temp)


@pytest.fixture
def sam2_dir(tmp_path, monkeypatch):
    folder = tmp_path / "sam2"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors", ".pt"}))
    return folder


@pytest.fixture(scope="module")
def images():
    return synthetic_clip(T, H, W, seed=3).source


def test_prompts_node_parses_and_previews_the_clean_frame(images):
    out = FFPMaskPrompts.execute(images, 2, PROMPTS)
    (prompts,) = out.args
    assert isinstance(prompts, MaskPrompts) and prompts.objects == (1, 3) and prompts.keyframes == (0, 4)
    shown = out.ui.as_dict()["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    with pytest.raises(ValueError, match="frame 5 is out of range"):
        FFPMaskPrompts.execute(images, 5, PROMPTS)
    with pytest.raises(ValueError, match="outside the frame"):
        FFPMaskPrompts.execute(images, 0, json.dumps({"prompts": [{"frame": 0, "points": [[99, 1, 1]]}]}))


def test_loader_and_propagate_with_sam2(images, sam2_dir):
    random_checkpoint(sam2_dir / "sam2.1_hiera_tiny.safetensors", "tiny", "2.1", seed=0)
    (handle,) = FFPSAM2Loader.execute("auto", "auto", "auto", 256).args
    assert isinstance(handle, SAM2Handle) and handle.model.spec.size == "tiny" and handle.model.spec.version == "2.1"
    weights = {k: v.clone() for k, v in handle.model.module.state_dict().items()}
    (prompts,) = FFPMaskPrompts.execute(images, 0, PROMPTS).args
    mask, objects, preview, n = FFPMaskPropagate.execute(images, "sam2", "both", 0, "medium", prompts=prompts,
                                                        sam2=handle).args
    assert mask.shape == (T, H, W) and objects.shape == (2 * T, H, W) and preview.shape == (T, H, W, 3) and n == 2
    assert torch.equal(mask, torch.maximum(objects[:T], objects[T:]))      # object-major layout
    assert all(torch.equal(v, handle.model.module.state_dict()[k]) for k, v in weights.items())


def test_loader_without_checkpoint_falls_back_to_flow(images, sam2_dir):
    (handle,) = FFPSAM2Loader.execute("auto", "auto", "auto", 1024).args
    assert handle.model is None and "sam2.1_hiera_large" in handle.error
    with pytest.raises(ValueError, match="not in models/sam2"):
        FFPSAM2Loader.execute("sam2_hiera_large.pt", "auto", "auto", 1024)
    (prompts,) = FFPMaskPrompts.execute(images, 0, PROMPTS).args
    mask, objects, _, n = FFPMaskPropagate.execute(images, "auto", "both", 0, "medium", prompts=prompts,
                                                  sam2=handle).args
    assert n == 2 and mask.shape == (T, H, W)
    first, third = objects[0], objects[T + 4]                              # object 1 on frame 0, object 3 on 4
    assert first[20, 20] == 1 and first.sum() == first[8:36, 8:36].sum()  # the click, inside its box (GrabCut)
    assert third.sum() > 0 and third.sum() == third[10:40, 30:60].sum()


def test_points_alone_without_sam2(images):
    """workflows/masks_sam2.json without SAM2 weights: one positive click, engine auto, nothing connected."""
    (prompts,) = FFPMaskPrompts.execute(images, 0, json.dumps({"prompts": [{"frame": 0, "points": [[20, 20, 1]]}]})).args
    mask, _, preview, n = FFPMaskPropagate.execute(images, "auto", "both", 0, "medium", prompts=prompts).args
    assert n == 1 and mask.shape == (T, H, W) and preview.shape == (T, H, W, 3)
    assert mask[0, 20, 20] == 1 and 0 < mask[0].mean() < 0.5
    with pytest.raises(ValueError, match="needs a SAM2 model"):
        FFPMaskPropagate.execute(images, "sam2", "both", 0, "medium", prompts=prompts)


def test_mask_input_and_ops_nodes(images):
    m = torch.zeros(1, H, W)
    m[0, 10:30, 10:30] = 1
    mask, objects, _, n = FFPMaskPropagate.execute(images, "flow", "forward", 0, "fast", mask=m).args
    assert n == 1 and torch.equal(mask[0], m[0])
    (box,) = FFPMaskOps.execute(m, "loose_box", 8, 0.1, 50, 3, 0.5).args
    assert box.sum() == 22 * 22
    (grown,) = FFPMaskOps.execute(m, "dilate", 2, 0.1, 50, 3, 0.5).args
    (diff,) = FFPMaskCombine.execute(grown, m, "difference").args
    assert diff.sum() == grown.sum() - m.sum() > 0
    with pytest.raises(ValueError, match="differ in size"):
        FFPMaskCombine.execute(m, torch.zeros(1, H, W + 1), "union")
