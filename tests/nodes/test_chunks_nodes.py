"""Chunk chainer nodes executed with ComfyUI's real Wan model class, VAE and sampler (needs COMFYUI_DIR)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from comfy_support import import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
from ffprop.nodes._comfy import pack_video  # noqa: E402
from ffprop.nodes.chunks.node import FFPChunkFlowPropagate, FFPChunkPlan, FFPChunkSample  # noqa: E402
from ffprop.nodes.chunks.plan import plan_chunks  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_models import random_wan21_vae_state_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():                   # as ComfyUI runs nodes
        yield


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(num_frames=13, height=64, width=64, seed=2)


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd=random_wan21_vae_state_dict(dtype=torch.float32))


def cond(seed: int = 0, n: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 4096, generator=g) * 0.1, {}] for _ in range(n)]


DRIFT = dict(match_background=True, match_edit=True, crossfade=True, drift_strength=1.0)


def test_plan_node_outputs_plan_and_summary(clip):
    out = FFPChunkPlan.execute(pack_video(clip.source, 12.0), 9, 1, "shorten")
    plan, n, text = out.args
    assert n == len(plan) == 2 and plan.chunks[1].length == 5
    assert "chunk 2: frames 9-13" in text and out.ui.as_dict() == {"text": (text,)}
    assert FFPChunkPlan.validate_inputs(9, 1, "pad_repeat") is True
    assert "4k+1" in FFPChunkPlan.validate_inputs(10, 1, "pad_repeat")
    assert "overlap" in FFPChunkPlan.validate_inputs(9, 9, "pad_repeat")


def test_flow_chunk_node_runs_the_plan(clip):
    plan = plan_chunks(13, 5, 1)
    video, frames, mask, report = FFPChunkFlowPropagate.execute(pack_video(clip.source, 12.0), clip.edited[:1], plan,
                                                                **DRIFT).args
    assert frames.shape == clip.source.shape and mask.shape == clip.source.shape[:3]
    assert video.get_components().images.shape[0] == 13
    assert "seam at frame 6" in report and "seam at frame 10" in report


def test_chunk_sample_i2v_three_chunks_and_base_weights_untouched(clip, vae):
    model = load_tiny_comfy_wan("i2v")
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    plan = plan_chunks(13, 5, 1)
    out = FFPChunkSample.execute(model, vae, cond(1), cond(2), pack_video(clip.source, 12.0), clip.edited[:1], plan,
                                 "i2v", 0, 2, 1.0, "euler", "simple", **DRIFT, size_policy="auto")
    video, frames, report = out.args
    assert frames.shape == clip.source.shape and bool(torch.isfinite(frames).all())
    assert "seam at frame 6" in report and "chunk 3" in report
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the host's MODEL must not change"


def test_chunk_sample_per_chunk_prompts_and_count_errors(clip, vae):
    model = load_tiny_comfy_wan("i2v")
    plan = plan_chunks(13, 9, 1, "shorten")                            # 2 chunks
    src = pack_video(clip.source, 12.0)
    args = ("i2v", 0, 1, 1.0, "euler", "simple")
    with pytest.raises(ValueError, match="3 prompts for 2 chunks"):
        FFPChunkSample.execute(model, vae, cond(1, 3), cond(2), src, clip.edited[:1], plan, *args, **DRIFT,
                               size_policy="auto")
    with pytest.raises(ValueError, match="negative"):
        FFPChunkSample.execute(model, vae, cond(1, 2), cond(2, 3), src, clip.edited[:1], plan, *args, **DRIFT,
                               size_policy="auto")
    with pytest.raises(ValueError, match="edit_mask has 4 frames"):
        FFPChunkSample.execute(model, vae, cond(1), cond(2), src, clip.edited[:1], plan, *args, **DRIFT,
                               size_policy="auto", edit_mask=clip.mask[:4])
    frames = FFPChunkSample.execute(model, vae, cond(1, 2), cond(2), src, clip.edited[:1], plan, *args, **DRIFT,
                                    size_policy="auto").args[1]
    assert frames.shape == clip.source.shape


def test_chunk_sample_fun_control_and_lora_edit(clip, vae):
    plan = plan_chunks(13, 9, 1, "shorten")
    src = pack_video(clip.source, 12.0)
    fun = load_tiny_comfy_wan("fun_control")
    frames = FFPChunkSample.execute(fun, vae, cond(1), cond(2), src, clip.edited[:1], plan, "fun_control", 0, 1, 1.0,
                                    "euler", "simple", **DRIFT, size_policy="auto").args[1]
    assert frames.shape == clip.source.shape
    pytest.importorskip("ffprop.nodes.lora_edit.node")
    i2v = load_tiny_comfy_wan("i2v")
    frames = FFPChunkSample.execute(i2v, vae, cond(1), cond(2), src, clip.edited[:1], plan, "lora_edit", 0, 1, 1.0,
                                    "euler", "simple", **DRIFT, size_policy="auto", edit_mask=clip.mask).args[1]
    assert frames.shape == clip.source.shape


class SpyVAE:
    """The real ComfyUI VAE, recording every batch of frames it encodes (the conditioning videos)."""

    def __init__(self, vae):
        self.vae, self.encoded = vae, []

    def encode(self, frames):
        self.encoded.append(frames.clone())
        return self.vae.encode(frames)

    def decode(self, latent):
        return self.vae.decode(latent)


def test_default_conditioning_keeps_each_chunks_source_outside_the_mask(vae, monkeypatch):
    from ffprop.nodes.chunks.node import conditioning_note
    from ffprop.nodes.lora_edit.conditioning import comfy_concat_mask

    clip = synthetic_clip(num_frames=13, height=32, width=32, seed=4)

    default = next(i for i in FFPChunkSample.define_schema().inputs if i.id == "conditioning").default
    model = load_tiny_comfy_wan("i2v")
    plan = plan_chunks(13, 9, 1, "shorten")                               # chunk 2 = frames 9-13 (5 frames)
    real_sample, sampled = comfy.sample.sample, []

    def recording_sample(model, noise, steps, cfg, sampler, scheduler, positive, *a, **k):
        sampled.append(positive[0][1])
        return real_sample(model, noise, steps, cfg, sampler, scheduler, positive, *a, **k)

    monkeypatch.setattr(comfy.sample, "sample", recording_sample)
    spy = SpyVAE(vae)
    mask = torch.zeros(13, 32, 32)
    mask[:, 8:24, 10:26] = 1
    video, frames, report = FFPChunkSample.execute(model, spy, cond(1), cond(2), pack_video(clip.source, 12.0),
                                                   clip.edited[:1], plan, default, 0, 1, 1.0, "euler", "simple",
                                                   **DRIFT, size_policy="auto", edit_mask=mask).args
    assert len(spy.encoded) == len(sampled) == 2
    c2 = plan.chunks[1]
    v_cond, src, m = spy.encoded[1], clip.source[c2.start:c2.stop], mask[c2.start:c2.stop] > 0.5
    assert torch.equal(v_cond[0], frames[c2.start]), "chunk 2 starts from chunk 1's last frame"
    assert torch.equal(v_cond[1:][~m[1:]], src[1:][~m[1:]]), "chunk 2 sees its own source outside the mask"
    assert bool((v_cond[1:][m[1:]] == 0.5).all())
    keep = (~m).float()
    keep[0] = 1
    assert torch.equal(sampled[1]["concat_mask"], comfy_concat_mask(keep).to(sampled[1]["concat_mask"]))
    assert sampled[1]["concat_latent_image"].shape == (1, 16, 2, 4, 4)
    assert report.splitlines()[0].startswith("conditioning: lora_edit (every chunk keeps its source slice")
    assert "no LoRA patch" in report.splitlines()[0], "a stock model is told it needs the clip's LoRA"
    assert "without edit_mask: no source frames kept" in conditioning_note(default, False, True)
    assert "no LoRA" not in conditioning_note(default, True, True)


def test_lora_edit_chunk_the_object_has_left_is_sampled(vae):
    """A mask validated on the whole clip may be empty in a later chunk (the object left the frame): that chunk
    keeps its whole source and is still sampled (it raised 'edit_mask is empty' before)."""
    clip = synthetic_clip(num_frames=13, height=32, width=32, seed=4)
    plan = plan_chunks(13, 9, 1, "shorten")                               # chunk 2 = frames 9-13
    mask = torch.zeros(13, 32, 32)
    mask[:6, 8:24, 10:26] = 1                                             # gone from frame 6 on
    spy = SpyVAE(vae)
    video, frames, report = FFPChunkSample.execute(load_tiny_comfy_wan("i2v"), spy, cond(1), cond(2),
                                                   pack_video(clip.source, 12.0), clip.edited[:1], plan, "lora_edit",
                                                   0, 1, 1.0, "euler", "simple", **DRIFT, size_policy="auto",
                                                   edit_mask=mask).args
    assert frames.shape == clip.source.shape and len(spy.encoded) == 2
    c2 = plan.chunks[1]
    assert torch.equal(spy.encoded[1][1:], clip.source[c2.start + 1:c2.stop]), "an empty chunk keeps its source"
