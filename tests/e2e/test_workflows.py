"""Every shipped workflows/*.json runs on the real server, CPU-sized through its `extra.ffprop_ci` overrides:

    "extra": {"ffprop_ci": {
        "inputs":  {"<node id>": {"<input name>": value}},       # e.g. smaller sizes, tiny model file names
        "files":   {"<name in input/>": "<generator>"},           # synthetic_clip_mp4 | synthetic_edit_png | synthetic_mask_png
        "replace": {"<node id>": {"class_type": ..., "inputs": {...}}},  # e.g. text encoder -> E2EWanTextConditioning
        "remove":  ["<node id>"],                                 # e.g. a loader nothing uses any more
        "timeout_s": 300}}

Tiny model file names: ffp_tiny_wan21_{i2v,t2v,fun_control}.safetensors (diffusion_models/) and
ffp_random_wan21_vae.safetensors (vae/). The file is converted as `comfy run --workflow` converts it (comfy-cli),
then the overrides are applied. FFP_E2E_WORKFLOWS runs another folder or file. Every output file is opened and checked (videos with PyAV, images
with PIL); a workflow must produce at least one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from e2e_media import check_output_file, make_input_file
from e2e_server import TIMINGS, env_seconds
from e2e_workflow import apply_ci_overrides, comfy_cli_converter, ui_to_api

# FFP_E2E_WORKFLOWS: another folder (or one file) to run instead of the repo's workflows/ (trying a draft).
_WHERE = Path(os.environ.get("FFP_E2E_WORKFLOWS") or Path(__file__).resolve().parents[2] / "workflows")
WORKFLOWS = [_WHERE] if _WHERE.is_file() else sorted(_WHERE.glob("*.json"))
PARAMS = [pytest.param(p, id=p.stem) for p in WORKFLOWS] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"no *.json in {_WHERE}"))]


@pytest.mark.parametrize("workflow", PARAMS)
def test_workflow_runs(workflow: Path, comfy_server, object_info, tiny_models):
    if comfy_cli_converter()[0] is None:  # the UI -> API conversion is comfy-cli's (what `comfy run` does)
        pytest.skip(comfy_cli_converter()[1])
    data = json.loads(workflow.read_text())
    ci = (data.get("extra") or {}).get("ffprop_ci") if isinstance(data.get("extra"), dict) else None
    for name, generator in ((ci or {}).get("files") or {}).items():
        make_input_file(comfy_server.input_dir, name, generator)
    api = apply_ci_overrides(ui_to_api(data, object_info), ci)
    timeout = float((ci or {}).get("timeout_s") or env_seconds("FFP_E2E_PROMPT_TIMEOUT", 300))
    res = comfy_server.run_prompt(api, timeout=timeout, label=workflow.name)
    TIMINGS[f"workflow {workflow.name}"] = res.seconds
    outputs = res.history.get("outputs") or {}
    silent = [f"{nid} ({n['class_type']})" for nid, n in api.items()
              if object_info[n["class_type"]].get("output_node") and nid not in outputs]
    assert not silent, f"{workflow.name}: output nodes that reported nothing: {silent}"
    assert res.files, f"{workflow.name} produced no output files: {outputs}"
    for f in res.files:
        print(check_output_file(f))
