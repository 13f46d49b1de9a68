"""Keyframe nodes executed with ComfyUI's real classes (needs COMFYUI_DIR): FFPKeyframes checks and fits,
FFPKeyframePropagate on the flow engine (cache in the temp folder, confidence) and on a tiny real Wan model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from comfy_support import cancelled, import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes._comfy import pack_video  # noqa: E402
from ffprop.nodes.keyframes.node import CACHE_FOLDER, NODES, FFPKeyframePropagate, FFPKeyframes  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_models import random_wan21_vae_state_dict  # noqa: E402

FLOW = dict(engine="flow", chunk_length=81, steps=1, cfg=1.0, seed=0, sampler_name="euler", scheduler="simple")


@pytest.fixture(autouse=True)
def _inference_mode_and_temp(tmp_path):
    old = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    with torch.inference_mode():                   # as ComfyUI runs nodes
        yield
    folder_paths.set_temp_directory(old)


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(num_frames=13, height=64, width=64, seed=2)


def keys(clip, images, indices: str, **kw):
    args = dict(size_policy="auto", mask_threshold=0.08) | kw
    return FFPKeyframes.execute(pack_video(clip.source, 12.0), images, indices, **args)


def test_schema_has_tooltips_and_nodes_are_listed():
    assert [n.__name__ for n in NODES] == ["FFPKeyframes", "FFPKeyframePropagate"]
    for node in NODES:
        schema = node.define_schema()
        assert schema.description and schema.category == "FFP/video"
        for i in schema.inputs + schema.outputs:
            assert i.tooltip, (node.__name__, i.id if hasattr(i, "id") else i)


def test_keyframes_node_checks_merges_and_shows_the_strip(clip):
    out = keys(clip, clip.edited[[0, 12]], "0, 12")
    kf, report = out.args
    assert kf.indices == (0, 12) and "2 keyframe(s) at frame(s) 0, 12 of 13" in report
    strip = out.ui["ffp_keyframes"][0]
    assert strip["frames"] == 13 and strip["indices"] == [0, 12]
    thumbs = {t["frame"] for t in strip["thumbs"]}
    assert {0, 12} <= thumbs and [k["frame"] for k in strip["keys"]] == [0, 12]
    for ref in strip["thumbs"] + strip["keys"]:
        assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), ref["subfolder"], ref["filename"]))
    wide = torch.nn.functional.interpolate(clip.edited[6:7].permute(0, 3, 1, 2), size=(128, 128)).permute(0, 2, 3, 1)
    merged = keys(clip, wide, "6", keyframes=kf).args[0]
    assert merged.indices == (0, 6, 12) and any("64x64 by resize" in n for n in merged.notes)
    with pytest.raises(ValueError, match=r"\[12\] are given more than once"):
        keys(clip, clip.edited[12:13], "12", keyframes=kf)
    with pytest.raises(ValueError, match="outside the clip, which has 13 frames"):
        keys(clip, clip.edited[:1], "13")
    with pytest.raises(ValueError, match="2 keyframe image"):
        keys(clip, clip.edited[:2], "0")
    mask = torch.zeros(1, 64, 64)
    mask[:, :8, :8] = 1
    with pytest.raises(ValueError, match="outside the edit mask"):
        keys(clip, clip.edited[:1], "0", edit_mask=mask)


def test_flow_propagate_node_uses_the_cache_and_reports_confidence(clip):
    kf = keys(clip, clip.edited[[0, 6, 12]], "0,6,12").args[0]
    src = pack_video(clip.source, 12.0)
    video, frames, mask, conf, report = FFPKeyframePropagate.execute(src, kf, **FLOW, use_cache=True,
                                                                     cache_mb=64).args
    assert frames.shape == clip.source.shape and mask.shape == clip.source.shape[:3]
    assert "2 computed, 0 from the cache" in report
    assert conf.shape == clip.source.shape[:3]
    assert [round(float(c), 3) for c in conf[:, 0, 0]] == [round(1 - min(abs(t - k) for k in (0, 6, 12)) / 12, 3)
                                                           for t in range(13)]
    cache = Path(folder_paths.get_temp_directory()) / CACHE_FOLDER
    assert len(list(cache.glob("*.safetensors"))) == 2
    again = FFPKeyframePropagate.execute(src, kf, **FLOW, use_cache=True, cache_mb=64).args
    assert "0 computed, 2 from the cache" in again[4] and torch.equal(again[1], frames)
    kf2 = keys(clip, torch.stack([clip.source[0], clip.edited[6], clip.edited[12]]), "0,6,12").args[0]
    third = FFPKeyframePropagate.execute(src, kf2, **FLOW, use_cache=False, cache_mb=64).args
    assert torch.equal(third[1][6:], frames[6:])              # the spans from keyframe 6 on: unchanged
    assert torch.equal(third[1][0], clip.source[0])          # an unedited keyframe 0 keeps its frame


def test_propagate_node_refuses_keyframes_edited_outside_its_mask(clip):
    """The mask connected to the propagate node only (not to Keyframes): the edit outside it is still refused."""
    kf = keys(clip, clip.edited[:1], "0").args[0]
    corner = torch.zeros(1, 64, 64)
    corner[:, :8, :8] = 1
    with pytest.raises(ValueError, match="outside the edit mask"):
        FFPKeyframePropagate.execute(pack_video(clip.source, 12.0), kf, **FLOW, use_cache=False, cache_mb=64,
                                     edit_mask=corner)


def test_flow_propagate_node_honours_cancel(clip):
    kf = keys(clip, clip.edited[:1], "0").args[0]
    with cancelled():
        FFPKeyframePropagate.execute(pack_video(clip.source, 12.0), kf, **FLOW, use_cache=True, cache_mb=64)
    cache = Path(folder_paths.get_temp_directory()) / CACHE_FOLDER
    assert not list(cache.glob("*.safetensors")) and not list(cache.glob(".*"))


def test_wan_engine_spans_on_a_tiny_real_model():
    """Keyframes 0 and 8 on a tiny real ComfyUI Wan: the span between them is two-ended, so the LoRA-Edit V_cond
    that ComfyUI's VAE encodes holds the later keyframe on the span's last frame and the frames padded after it;
    the host's MODEL is unchanged; a second run comes from the cache."""
    clip = synthetic_clip(num_frames=9, height=32, width=32, seed=2)
    model = load_tiny_comfy_wan("i2v")
    vae = comfy.sd.VAE(sd=random_wan21_vae_state_dict(dtype=torch.float32))
    encoded, encode = [], vae.encode
    vae.encode = lambda pixels: (encoded.append(pixels.clone()), encode(pixels))[1]   # what the conditioning encodes
    g = torch.Generator().manual_seed(0)
    pos, neg = [[torch.randn(1, 8, 4096, generator=g) * 0.1, {}]], [[torch.zeros(1, 8, 4096), {}]]
    kf = keys(clip, torch.stack([clip.edited[0], clip.edited[8]]), "0, 8").args[0]   # one span (the VAE is slow)
    src = pack_video(clip.source, 12.0)
    wan = dict(FLOW, engine="wan", chunk_length=13, steps=1)
    with pytest.raises(ValueError, match="needs model, vae, positive, negative"):
        FFPKeyframePropagate.execute(src, kf, **wan, use_cache=False, cache_mb=64)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    out = FFPKeyframePropagate.execute(src, kf, **wan, use_cache=True, cache_mb=64, model=model, vae=vae,
                                       positive=pos, negative=neg).args
    frames, report = out[1], out[4]
    assert frames.shape == clip.source.shape and bool(torch.isfinite(frames).all())
    assert "frames 0-8 (between keyframes 0 and 8): computed" in report
    (v_cond,) = encoded                                  # one chunk: 9 frames + 3 held + 1 padded
    assert v_cond.shape[0] == 13
    assert torch.equal(v_cond[0], kf.frame(0)) and bool((v_cond[8:] == kf.frame(8)).all())
    assert bool((v_cond[1:8] == 0.5).any())              # between: the edit region is generated
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the host's MODEL must not change"
    again = FFPKeyframePropagate.execute(src, kf, **wan, use_cache=True, cache_mb=64, model=model, vae=vae,
                                         positive=pos, negative=neg).args
    assert "0 computed, 1 from the cache" in again[4] and torch.equal(again[1], frames)
