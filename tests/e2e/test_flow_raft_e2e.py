"""The real ComfyUI server, RAFT as FFPFlowPropagate's flow through POST /prompt, against the same graph on DIS: a
random-weight raft_large file in the server's models/optical_flow, picked by the node's flow_model (every host)
and loaded by ComfyUI's own Load Optical Flow Model into the optical_flow input (0.28+; skipped with the reason
on hosts without it). Random weights: this checks the wiring (the flow reaches the engine), not accuracy."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from e2e_media import check_output_file, make_input_file
from e2e_server import TIMINGS, env_seconds

RAFT_FILE = "ffp_random_raft_large.pth"


def options(spec: list) -> list:
    """A combo's choices in /object_info: [[choices], {...}] (older) or ["COMBO", {"options": [...]}]."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def graph(prefix: str, optical_flow: bool = False, flow_model: str | None = None) -> dict:
    flow = {"source_video": ["1", 0], "edited_first_frame": ["2", 0], "mode": "auto", "size_policy": "auto",
            "flow_quality": "ultrafast", "mask_threshold": 0.08, "mask_grow": 2, "feather": 2,
            "match_tolerance": 0.06, "light_tolerant": True, "raft_iters": 1}
    api = {"1": {"class_type": "LoadVideo", "inputs": {"file": "e2e_flow_raft.mp4"}},
           "2": {"class_type": "LoadImage", "inputs": {"image": "e2e_flow_raft_edit.png"}},
           "4": {"class_type": "FFPFlowPropagate", "inputs": flow},
           "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": prefix,
                                                       "format": "auto", "codec": "auto"}}}
    if optical_flow:
        api["3"] = {"class_type": "OpticalFlowLoader", "inputs": {"model_name": RAFT_FILE}}
        flow["optical_flow"] = ["3", 0]
    if flow_model:
        flow["flow_model"] = flow_model
    return api


def run(server, name: str, api: dict) -> str:
    """Run the graph; the sha256 of the video it saved."""
    res = server.run_prompt(api, timeout=env_seconds("FFP_E2E_PROMPT_TIMEOUT", 300), label=f"flow {name}")
    TIMINGS[f"prompt: LoadVideo -> FFPFlowPropagate ({name}) -> SaveVideo"] = res.seconds
    (video,) = [p for p in res.files if p.suffix == ".mp4"]
    check_output_file(video)
    return hashlib.sha256(video.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dis_output(comfy_server, comfy_python) -> str:
    """A random raft_large file in the server's models/optical_flow, the inputs, and the DIS run's video hash."""
    folder = comfy_server.models_dir / "optical_flow"
    subprocess.run([comfy_python, "-c", "import sys; from ffprop.nodes.flow.raft import random_raft; "
                    "random_raft(sys.argv[1], 'raft_large', seed=0)", str(folder / RAFT_FILE)], check=True,
                   timeout=300)
    make_input_file(comfy_server.input_dir, "e2e_flow_raft.mp4", "synthetic_clip_mp4")
    make_input_file(comfy_server.input_dir, "e2e_flow_raft_edit.png", "synthetic_edit_png")
    return run(comfy_server, "dis", graph("e2e/flow_dis"))


def test_a_models_optical_flow_file_drives_the_flow_node(comfy_server, dis_output):
    ours = comfy_server.get("/object_info/FFPFlowPropagate")["FFPFlowPropagate"]["input"]["optional"]
    assert ours["optical_flow"][0] == "OPTICAL_FLOW" and RAFT_FILE in options(ours["flow_model"])
    assert run(comfy_server, "flow_model file", graph("e2e/flow_file", flow_model=RAFT_FILE)) != dis_output
    assert f"frame-to-frame flow by RAFT ({RAFT_FILE})" in comfy_server.log_text()


def test_the_hosts_optical_flow_loader_drives_the_flow_node(comfy_server, object_info, dis_output):
    if "OpticalFlowLoader" not in object_info:
        pytest.skip("this ComfyUI has no OpticalFlowLoader / OPTICAL_FLOW (added in 0.28): there the flow node "
                    "takes RAFT from a models/optical_flow file (flow_model)")
    info = comfy_server.get("/object_info/OpticalFlowLoader")["OpticalFlowLoader"]
    assert RAFT_FILE in options(info["input"]["required"]["model_name"])
    assert run(comfy_server, "OpticalFlowLoader", graph("e2e/flow_raft", optical_flow=True)) != dis_output
    assert "frame-to-frame flow by RAFT (optical_flow input)" in comfy_server.log_text()
