"""The harness' UI -> API conversion (comfy-cli's, as `comfy run --workflow` does it) against a canned /object_info
excerpt: the shapes our workflows use convert as the frontend would send them (no server; needs comfy-cli, else
skipped with the reason), and the CI overrides (run anywhere)."""

from __future__ import annotations

import pytest
from e2e_workflow import WorkflowFormatError, apply_ci_overrides, comfy_cli_converter, ui_to_api, workflow_format

_CONVERT, _WHY = comfy_cli_converter()
needs_comfy_cli = pytest.mark.skipif(_CONVERT is None, reason=_WHY)

# Shapes as ComfyUI 0.3.64 serves them (V1 and V3 nodes; trimmed to what the converter reads).
OBJECT_INFO = {
    "LoadImage": {
        "input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
            "cfg": ["FLOAT", {}], "sampler_name": [["euler", "dpmpp_2m"], {}], "scheduler": [["simple"], {}],
            "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
    },
    "LoadVideo": {
        "input": {"required": {"file": ["COMBO", {"options": ["clip.mp4"], "video_upload": True}]}},
        "input_order": {"required": ["file"]},
    },
    "ImageInvert": {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]}},
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
    },
    "Mixed": {
        "input": {"required": {"count": ["INT", {"forceInput": True}], "strength": ["FLOAT", {}]},
                  "optional": {"flag": ["BOOLEAN", {}], "noise_seed": ["INT", {}], "mode": [["a", "b"], {}]}},
        "input_order": {"required": ["count", "strength"], "optional": ["flag", "noise_seed", "mode"]},
    },
}


def node(nid, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    n = {"id": nid, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": list(outputs)}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def ui(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "nodes": nodes, "links": links, "version": 0.4, "extra": {}}


def one(type_, widgets):
    """The API inputs of a one-node workflow."""
    return ui_to_api(ui([node(1, type_, widgets)], []), OBJECT_INFO)["1"]["inputs"]


@needs_comfy_cli
def test_widgets_skip_control_and_upload_values():
    assert one("KSampler", [7, "randomize", 20, 8.0, "euler", "simple", 1.0]) == {
        "seed": 7, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    assert one("LoadImage", ["a.png", "image"]) == {"image": "a.png"}
    assert one("LoadVideo", ["clip.mp4", "video"]) == {"file": "clip.mp4"}
    # forceInput is not a widget; optional widgets follow required ones; a seed-like name takes a control value
    assert one("Mixed", [0.5, True, 3, "fixed", "b"]) == {"strength": 0.5, "flag": True, "noise_seed": 3, "mode": "b"}
    assert one("SaveImage", ["x"]) == {"filename_prefix": "x"}


@needs_comfy_cli
def test_links_reroute_primitive_note_mute_bypass():
    nodes = [
        node(1, "LoadImage", ["a.png", "image"], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}]),
        node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "IMAGE", "links": [2]}]),
        node(3, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": 2}],
             outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [3]}], mode=4),  # bypassed
        # the frontend keeps a primitive's target widget equal to the primitive (comfy-cli reads the target's)
        node(4, "SaveImage", ["from_primitive"], inputs=[
            {"name": "images", "type": "IMAGE", "link": 3},
            {"name": "filename_prefix", "type": "STRING", "link": 4, "widget": {"name": "filename_prefix"}}]),
        node(5, "PrimitiveNode", ["from_primitive"], outputs=[{"type": "STRING", "links": [4]}]),
        node(6, "Note", ["a comment"]),
        node(7, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": None}], mode=2),  # muted
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
             {"id": 4, "origin_id": 5, "origin_slot": 0, "target_id": 4, "target_slot": 1, "type": "STRING"}]
    api = ui_to_api(ui(nodes, links), OBJECT_INFO)
    assert set(api) == {"1", "4"}
    assert api["1"]["inputs"] == {"image": "a.png"}
    assert api["4"]["inputs"] == {"images": ["1", 0], "filename_prefix": "from_primitive"}
    assert api["4"]["class_type"] == "SaveImage"


@needs_comfy_cli
def test_formats_and_clear_errors():
    api = {"1": {"class_type": "SaveImage", "inputs": {}}}
    assert workflow_format(api) == "api" and ui_to_api(api, OBJECT_INFO) == api
    with pytest.raises(WorkflowFormatError, match="UI format"):
        ui_to_api({"hello": 1}, OBJECT_INFO)
    with pytest.raises(WorkflowFormatError, match="'NoSuchNode'.*custom node pack"):
        ui_to_api(ui([node(1, "NoSuchNode", [])], []), OBJECT_INFO)
    # a type used only inside a subgraph definition is checked too
    sub = {"id": "0b3a5c9e-1111-4222-8333-944455556666", "nodes": [node(1, "NoSuchNode", [])], "links": []}
    with pytest.raises(WorkflowFormatError, match="'NoSuchNode'"):
        ui_to_api({**ui([node(1, "SaveImage", ["x"])], []), "definitions": {"subgraphs": [sub]}}, OBJECT_INFO)


def test_ci_overrides():
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
           "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a cat"}},
           "3": {"class_type": "CLIPLoader", "inputs": {}}}
    out = apply_ci_overrides(api, {"inputs": {"1": {"image": "b.png"}},
                                   "replace": {"2": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 4}}},
                                   "remove": ["3"], "files": {"b.png": "synthetic_edit_png"}})
    assert out["1"]["inputs"] == {"image": "b.png"}
    assert out["2"]["class_type"] == "E2EWanTextConditioning" and "3" not in out
    assert api["1"]["inputs"]["image"] == "a.png"  # the input is not modified
    with pytest.raises(WorkflowFormatError, match="node '9'"):
        apply_ci_overrides(api, {"inputs": {"9": {"x": 1}}})
    with pytest.raises(WorkflowFormatError, match="unknown keys"):
        apply_ci_overrides(api, {"input": {}})
