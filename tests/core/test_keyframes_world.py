"""Two-ended LoRA-Edit spans on the bundled world models (nodes/world): the later keyframe enters V_cond with
keep-mask 1 on the span's last frame and the frames padded after it (a whole latent frame), and the world DiT with
the span's LoRA honours it: the kept frames come out as the keyframe. Whether the generated frames before it get
closer to the truth is a benchmark question, not a unit check: on the 7 quick world scenes they do not (mean -0.1
dB inside the edit over frames 1-7 of the span 0-8; see the keyframes section of the README)."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.evaluate.bench import WanWorld, loose_mask, weighted_psnr
from ffprop.nodes.keyframes.engines import TAIL_PAD, pad_to_wan
from ffprop.nodes.lora_edit.pipeline import SampleSettings, lora_edit_video
from ffprop.nodes.lora_edit.trainer import TrainSettings
from ffprop.nodes.world.model import load_world_models
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample


@pytest.fixture(scope="module")
def world():
    w = load_world_models()
    return WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context())


def test_the_kept_tail_comes_out_as_the_later_keyframe(world):
    """Held-out recolour scene, span 0..8 padded as LoRAEditEngine pads a two-ended span (13 frames, frames 8-12 =
    keyframe 8 at keep 1), the same LoRA seed and noise with and without the tail: inside the object, the last
    (kept) frame is far closer to keyframe 8 (through the world VAE, whose round trip is the ceiling) with it."""
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=17)
    src, mask, pad = pad_to_wan(s.source[:9], loose_mask(s)[:9], TAIL_PAD)
    key = s.target[8]
    runs = {}
    for name, tail in (("one", None), ("two", key[None].expand(pad + 1, -1, -1, -1))):
        with torch.no_grad():
            runs[name] = lora_edit_video(world.dit, world.encode, world.decode, src, mask, s.target[:1],
                                         world.context, train=TrainSettings(steps=20, seed=0),
                                         sampling=SampleSettings(steps=6, cfg=1.0, shift=3.0, seed=0),
                                         tail=tail).frames.float().clamp(0, 1)
    region = s.edit_mask[8]
    with torch.no_grad():                                 # the keyframe as the world VAE can show it at best
        shown = world.decode(world.encode(key[None])).float().clamp(0, 1)[0]
    p_one, p_two = (weighted_psnr(runs[n][-1], shown, region) for n in ("one", "two"))
    assert p_two > p_one + 2, (p_one, p_two)              # 22.96 -> 26.50 dB here
    assert runs["two"].shape == src.shape
