"""The real server: the pack loads under another folder name, serves every FFP node with full docs, and
POST /prompt runs core graphs (a UI-format one through the converter, and Wan 2.1 on the tiny models)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from e2e_media import check_output_file, make_input_file
from e2e_server import PACK_FOLDER, TEST_PACK_FOLDER, TIMINGS, env_seconds
from e2e_workflow import comfy_cli_converter, ui_to_api

PACK_MODULE = f"custom_nodes.{PACK_FOLDER}"


def test_pack_imports_cleanly(comfy_server, object_info):
    log = comfy_server.log_text()
    pack_lines = [ln for ln in log.splitlines() if PACK_FOLDER in ln or TEST_PACK_FOLDER in ln]
    bad = [ln for ln in pack_lines if re.search(r"IMPORT FAILED|Cannot import|Error while calling|Skip ", ln)]
    assert not bad, "a node pack failed to load:\n" + "\n".join(bad)
    assert any("seconds" in ln and PACK_FOLDER in ln for ln in pack_lines), "the pack is not in the import-times list"
    assert object_info["E2EWanTextConditioning"]["python_module"] == f"custom_nodes.{TEST_PACK_FOLDER}"


def test_every_ffp_node_is_served(object_info, registered_ids):
    expected = registered_ids
    assert expected, "ffprop.nodes.registry.NODES is empty"
    served = {k for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    missing = sorted(set(expected) - set(object_info))
    assert not missing, f"registered but not in /object_info: {missing}"
    assert served == set(expected), f"served by {PACK_FOLDER} but not in the registry: {sorted(served - set(expected))}"
    stray = sorted(k for k in object_info if k.startswith("FFP") and k not in expected)
    assert not stray, f"FFP* ids in /object_info that the pack's registry does not list: {stray}"


def test_ffp_nodes_are_documented(object_info, registered_ids):
    problems = []
    for nid in registered_ids:
        info = object_info[nid]
        if not (info.get("description") or "").strip():
            problems.append(f"{nid}: no description")
        if not str(info.get("category", "")).startswith("FFP/"):
            problems.append(f"{nid}: category {info.get('category')!r} is not under 'FFP/'")
        for section in ("required", "optional"):
            for name, spec in (info.get("input", {}).get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not (opts.get("tooltip") or "").strip():
                    problems.append(f"{nid}: input {name!r} has no tooltip")
        tips = info.get("output_tooltips") or []
        for i, name in enumerate(info.get("output_name") or []):
            if i >= len(tips) or not (tips[i] or "").strip():
                problems.append(f"{nid}: output {name!r} has no tooltip")
    assert not problems, "\n".join(problems)


def test_core_ui_workflow_converts_and_runs(comfy_server, object_info, comfy_python, tmp_path):
    """LoadImage -> ImageInvert -> SaveImage, saved in the frontend's UI format: through the harness' conversion, and
    through `comfy run --workflow` itself."""
    make_input_file(comfy_server.input_dir, "e2e_edit.png", "synthetic_edit_png")
    ui = {
        "last_node_id": 3, "last_link_id": 2, "version": 0.4, "extra": {}, "groups": [], "config": {},
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["e2e_edit.png", "image"],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK"}]},
            {"id": 2, "type": "ImageInvert", "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]},
            {"id": 3, "type": "SaveImage", "mode": 0, "widgets_values": ["e2e/invert"],
             "inputs": [{"name": "images", "type": "IMAGE", "link": 2}]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    }
    api = ui_to_api(ui, object_info)
    assert api["3"]["inputs"] == {"images": ["2", 0], "filename_prefix": "e2e/invert"}
    res = comfy_server.run_prompt(api, timeout=60, label="core UI workflow")
    TIMINGS["prompt: core LoadImage->ImageInvert->SaveImage"] = res.seconds
    assert len(res.files) == 1, res.history.get("outputs")
    assert "64x64" in check_output_file(res.files[0])

    # the same file as a user runs it: `comfy run --workflow <ui.json> --wait` (comfy-cli converts and submits)
    if comfy_cli_converter()[0] is None:
        pytest.skip(comfy_cli_converter()[1])
    ui["nodes"][2]["widgets_values"] = ["e2e/invert_cli"]
    path = tmp_path / "core_ui.json"
    path.write_text(json.dumps(ui))
    home = tmp_path / "home"  # comfy-cli keeps its config and job journal there, not in the user's home
    t0 = time.perf_counter()
    proc = subprocess.run([comfy_python, "-m", "comfy_cli", "--skip-prompt", "run", "--workflow", str(path), "--wait",
                           "--host", "127.0.0.1", "--port", str(comfy_server.port), "--timeout", "60"],
                          capture_output=True, text=True, timeout=180, check=False,
                          env=dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config")))
    TIMINGS["comfy run --workflow (core UI workflow)"] = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (saved,) = (comfy_server.output_dir / "e2e").glob("invert_cli_*.png")
    assert "64x64" in check_output_file(saved)


def _input_spec(info: dict, name: str) -> tuple | None:
    """(type, options) of a node's required or optional input, from /object_info; None if it has no such input."""
    for section in ("required", "optional"):
        spec = info.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return None


def _value_fits(typ, opts: dict, value) -> bool:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return True  # a link
    if isinstance(typ, list) or typ == "COMBO":
        return isinstance(value, (str, int, float))
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "BOOLEAN": lambda v: isinstance(v, bool), "STRING": lambda v: isinstance(v, str)}
    return checks.get(typ, lambda v: True)(value)


CORE_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _not_claimed(ui: dict, object_info: dict) -> str | None:
    """Why a loadable template is outside what the harness claims to convert (None: it is claimed).

    Claimed: the features our workflows use. Not claimed: subgraphs and V3 dynamic inputs (autogrow, dynamic combo;
    comfy-cli expands them, but promoted subgraph widgets come out shifted in some 0.28 templates); files saved by
    old frontends with a boolean control_after_generate (comfy-cli maps it as the next widget's value);
    LoadImageOutput (comfy-cli drops it as UI-only, but 0.3.64 serves it)."""
    from e2e_workflow import node_types

    if (ui.get("definitions") or {}).get("subgraphs"):
        return "subgraphs"
    for t in node_types(ui):
        for spec in (object_info.get(t, {}).get("input", {}).get(s) or {} for s in ("required", "optional")):
            if any(isinstance(v[0], str) and v[0].startswith("COMFY_") for v in spec.values()):
                return "V3 dynamic inputs"
    if any(n.get("type") == "LoadImageOutput" for n in ui["nodes"]):
        return "LoadImageOutput"
    for n in ui["nodes"]:
        if any(isinstance(v, bool) for v in (n.get("widgets_values") or [])[1:2]) and "seed" in str(
                object_info.get(n.get("type"), {}).get("input_order", {})):
            return "boolean control_after_generate (old frontend)"
    return None


def test_converter_on_bundled_templates(object_info, comfy_python):
    """Real frontend-saved workflows: ComfyUI's own templates (a ComfyUI requirement). Every template whose nodes
    this server has (subgraph interiors included) and that uses only what our workflows use converts with comfy-cli
    (the harness' converter, `comfy run`'s) with every required input present and well-typed widget values; the
    ones outside the claim are counted by reason (printed), the claim must cover at least 40 templates."""
    from e2e_models import in_python
    from e2e_workflow import UI_ONLY_TYPES, comfy_cli_converter, node_types, workflow_format

    if comfy_cli_converter()[0] is None:
        pytest.skip(comfy_cli_converter()[1])
    where = in_python(comfy_python, "templates-dir")
    if where is None:
        pytest.skip(f"ComfyUI's workflow templates are not installed for {comfy_python}")
    # input types no node outputs and the frontend draws as its own widget (RecordAudio's AUDIO_RECORD: the user
    # records first; a template saves no value)
    outputs = {o for i in object_info.values() for o in i.get("output", [])}
    frontend_only = {spec[0] for i in object_info.values() for spec in i.get("input", {}).get("required", {}).values()
                     if isinstance(spec[0], str) and spec[0] not in CORE_WIDGET_TYPES | outputs}
    counts: dict[str, int] = {}
    converted, problems = 0, []
    for f in sorted(Path(where).glob("*.json")):
        data = json.loads(f.read_text())
        if workflow_format(data) != "ui":
            continue
        if node_types(data) - UI_ONLY_TYPES - set(object_info):
            counts["nodes not loaded here"] = counts.get("nodes not loaded here", 0) + 1
            continue
        if why := _not_claimed(data, object_info):
            counts[why] = counts.get(why, 0) + 1
            continue
        api = ui_to_api(data, object_info)
        converted += 1
        for nid, node in api.items():
            info = object_info[node["class_type"]]
            for name, spec in info["input"].get("required", {}).items():
                if name not in node["inputs"] and spec[0] not in frontend_only:
                    problems.append(f"{f.name} node {nid} ({node['class_type']}): required input {name!r} missing")
            for name, value in node["inputs"].items():
                spec = _input_spec(info, name)
                if spec is not None and not _value_fits(*spec, value):
                    problems.append(f"{f.name} node {nid} ({node['class_type']}): {name}={value!r} is not {spec[0]}")
    print(f"templates in {where}: {converted} converted and checked; not claimed: {counts}")
    assert converted >= 40, f"only {converted} templates in the claim ({counts})"
    assert not problems, "\n".join(problems[:40])


def test_prompt_validation_error_is_readable(comfy_server):
    from e2e_server import ServerError

    api = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    with pytest.raises(ServerError, match=r"node 1 \(SaveImage\).*images"):
        comfy_server.run_prompt(api, timeout=30)


def wan_graph(models: dict[str, str], kind: str) -> dict[str, dict]:
    """Core-only Wan 2.1 graph on the tiny models: 64x64, 9 frames, 2 steps, saved as an animated WEBP."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models[kind], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 1, "scale": 0.5}},
        "4": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 0, "scale": 0.0}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "e2e_edit.png"}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["6", 2], "seed": 3,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 0]}},
        "9": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["8", 0], "filename_prefix": f"e2e/wan_{kind}", "fps": 8.0, "lossless": False,
            "quality": 80, "method": "default"}},
    }
    size = {"width": 64, "height": 64, "length": 9, "batch_size": 1}
    cond = {"positive": ["3", 0], "negative": ["4", 0], "vae": ["2", 0]}
    if kind == "i2v":
        g["6"] = {"class_type": "WanImageToVideo", "inputs": {**cond, **size, "start_image": ["5", 0]}}
    elif kind == "fun_control":
        g["6"] = {"class_type": "WanFunControlToVideo",
                  "inputs": {**cond, **size, "start_image": ["5", 0], "control_video": ["5", 0]}}
    else:  # t2v: the conditioning passes through, the latent comes from an empty 16-channel video latent
        g["6"] = {"class_type": "WanImageToVideo", "inputs": {**cond, **size}}
    return g


@pytest.mark.parametrize("kind", ["i2v", "t2v", "fun_control"])
def test_tiny_wan_generates_through_prompt(comfy_server, tiny_models, kind):
    """The tiny checkpoints, the random VAE and the test pack's conditioning run a real Wan 2.1 graph."""
    make_input_file(comfy_server.input_dir, "e2e_edit.png", "synthetic_edit_png")
    res = comfy_server.run_prompt(wan_graph(tiny_models, kind), timeout=env_seconds("FFP_E2E_PROMPT_TIMEOUT", 300),
                                  label=f"tiny Wan {kind}")
    TIMINGS[f"prompt: core Wan 2.1 {kind} 64x64x9, 2 steps"] = res.seconds
    assert len(res.files) == 1, res.history.get("outputs")
    desc = check_output_file(res.files[0])
    assert "64x64" in desc and "9 frame(s)" in desc, desc
