"""FFPFlowPropagate inside ComfyUI's runtime (folder_paths, ModelPatcher, model management) on tiny clips: the
default DIS path, and RAFT as the flow backend from the host's OPTICAL_FLOW (ComfyUI 0.28's Load Optical Flow
Model; a plain ModelPatcher on hosts without it) or from a models/optical_flow file. Random-weight RAFT: these
check the plumbing (the node uses the backend it was given, exactly as the engine does), not flow accuracy."""

from __future__ import annotations

import pytest
import torch
from comfy_support import import_comfy

import_comfy()
pytest.importorskip("torchvision", reason="RAFT needs torchvision (in ComfyUI's requirements)")

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes._comfy import pack_video  # noqa: E402
from ffprop.nodes.flow.engine import FlowSettings, propagate_edit  # noqa: E402
from ffprop.nodes.flow.node import DIS, FOLDER, FFPFlowPropagate, flow_files  # noqa: E402
from ffprop.nodes.flow.raft import RaftFlow, load_raft, random_raft  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

T, H, W = 4, 40, 56
ITERS = 1
ARGS = dict(mode="auto", size_policy="auto", flow_quality="ultrafast", mask_threshold=0.08, mask_grow=2, feather=2,
            match_tolerance=0.06, light_tolerant=True)


@pytest.fixture(autouse=True)
def _comfy_like():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():                   # as ComfyUI runs nodes
        yield
    torch.set_num_threads(n)


@pytest.fixture
def flow_dir(tmp_path, monkeypatch):
    folder = tmp_path / FOLDER
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors", ".pth"}))
    return folder


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(T, H, W, seed=4)


def run(clip, **kw):
    out = FFPFlowPropagate.execute(pack_video(clip.source, clip.fps), clip.edited[:1], **ARGS, **kw)
    return out.result[1], out.result[2]


def engine(clip, flow=None):
    res = propagate_edit(clip.source, clip.edited[:1], None,
                         FlowSettings(quality="ultrafast", mask_grow=2, feather=2, flow=flow))
    return res.video, res.mask


def test_schema_declares_the_optional_optical_flow_input_and_lists_the_folder(flow_dir):
    random_raft(flow_dir / "tiny_raft.safetensors", "raft_small")
    inputs = {i.id: i for i in FFPFlowPropagate.GET_SCHEMA().inputs}
    assert inputs["optical_flow"].io_type == "OPTICAL_FLOW" and inputs["optical_flow"].optional
    assert inputs["flow_model"].options == [DIS, "tiny_raft.safetensors"] and inputs["flow_model"].default == DIS
    assert flow_files() == ["tiny_raft.safetensors"]


def test_without_a_flow_model_the_node_is_the_dis_engine(clip):
    video, mask = run(clip)
    want_video, want_mask = engine(clip)
    assert torch.equal(video, want_video) and torch.equal(mask, want_mask)


def test_a_models_optical_flow_file_is_the_backend(clip, flow_dir):
    path = random_raft(flow_dir / "tiny_raft.safetensors", "raft_small", seed=3)
    video, mask = run(clip, flow_model="tiny_raft.safetensors", raft_iters=ITERS)
    want_video, want_mask = engine(clip, RaftFlow(load_raft(path), "fp32", ITERS))
    assert torch.equal(video, want_video) and torch.equal(mask, want_mask)
    dis_video, _ = engine(clip)
    assert not torch.equal(video, dis_video)                                # it did not fall back to DIS
    outside = (mask == 0)[..., None].expand_as(video)
    assert torch.equal(video[outside], clip.source[outside])


def host_optical_flow(flow_dir):
    """The host's OPTICAL_FLOW for a random raft_large file: ComfyUI 0.28's own loader node where the host has
    it, else (older hosts) a ModelPatcher around the same module, as a custom loader would wire it."""
    path = random_raft(flow_dir / "raft_large.pth", "raft_large", seed=5)
    try:
        from comfy_extras.nodes_void import OpticalFlowLoader
    except ImportError as e:
        print(f"this host has no OpticalFlowLoader ({e}): a plain ModelPatcher stands in for it")
        return path, comfy.model_patcher.ModelPatcher(load_raft(path), load_device=mm.get_torch_device(),
                                                      offload_device=mm.unet_offload_device())
    return path, OpticalFlowLoader.execute("raft_large.pth").result[0]


def test_the_hosts_optical_flow_is_the_backend_and_is_left_unchanged(clip, flow_dir):
    path, patcher = host_optical_flow(flow_dir)
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    video, mask = run(clip, optical_flow=patcher, flow_model="raft_large.pth", raft_iters=ITERS)
    want_video, want_mask = engine(clip, RaftFlow(load_raft(path), "fp32", ITERS))
    assert torch.equal(video, want_video) and torch.equal(mask, want_mask)
    after = patcher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_an_optical_flow_that_is_not_raft_is_refused(clip):
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    with pytest.raises(ValueError, match="not torchvision's RAFT"):
        run(clip, optical_flow=patcher)


def test_a_frame_1_mask_lost_on_a_pan_is_followed_inside_the_host():
    """The motion follower's synthetic pan (tests/core/test_masks_motion.py) with only a frame-1 mask: inside
    ComfyUI's runtime the node restarts with the follower's per-frame masks (auto_follow), and its output is
    the engine's run on those masks given per frame, bit for bit."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    from ffprop.nodes.masks.flow_track import track_masks
    from ffprop.nodes.video.frames import from_uint8
    from test_masks_motion import panning_clip

    video, masks = panning_clip()
    source = from_uint8(video)
    edited = from_uint8(np.where(masks[0][..., None], video[0][..., [2, 0, 1]], video[0]))
    args = ARGS | {"flow_quality": "medium"}
    out = FFPFlowPropagate.execute(pack_video(source, 24.0), edited[None], **args,
                                   edit_mask=torch.from_numpy(masks[:1].astype(np.float32)))
    given = np.stack([m[0] for m in track_masks(video, [masks[0]], method="motion")])
    want = propagate_edit(source, edited, torch.from_numpy(given.astype(np.float32)),
                          FlowSettings(quality="medium", mask_grow=2, feather=2))
    assert torch.equal(out.result[1], want.video) and torch.equal(out.result[2], want.mask)
