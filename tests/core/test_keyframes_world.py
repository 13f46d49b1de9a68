"""Two-ended LoRA-Edit spans on the bundled world models (nodes/world): the later keyframe enters V_cond with
keep-mask 1 at the span's end, so the generated span ends nearer that keyframe than the one-ended span does."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.evaluate.bench import WanWorld, loose_mask, weighted_psnr
from ffprop.nodes.keyframes.engines import LoRAEditEngine
from ffprop.nodes.lora_edit.pipeline import SampleSettings
from ffprop.nodes.lora_edit.trainer import TrainSettings
from ffprop.nodes.world.model import load_world_models
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample


@pytest.fixture(scope="module")
def world():
    w = load_world_models()
    return WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context())


def test_two_ended_lora_edit_span_ends_near_the_later_keyframe(world):
    """Held-out recolour scene, span = frames 8..16 between the true edited frames 8 and 16 (same LoRA seed and
    noise both ways): inside the object, the span's last frame is closer to keyframe 16 with it as tail."""
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=17)
    engine = LoRAEditEngine(world, "world", TrainSettings(steps=30, learning_rate=1e-4, rank=16, seed=0),
                            SampleSettings(steps=8, cfg=1.0, shift=3.0, seed=0))
    src, mask = s.source[8:], loose_mask(s)[8:]
    with torch.no_grad():
        one = engine.forward(src, s.target[8], mask)
        two = engine.between(src, s.target[8], s.target[16], mask)
    region = s.edit_mask[16]
    p_one, p_two = weighted_psnr(one.video[-1], s.target[16], region), weighted_psnr(two.video[-1], s.target[16], region)
    assert p_two > p_one + 0.5, (p_one, p_two)
    assert two.video.shape == src.shape and torch.equal(two.mask, one.mask)
