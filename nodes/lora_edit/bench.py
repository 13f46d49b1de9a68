"""The world benchmark's `lora_edit_wan22` row (nodes/evaluate/bench.py discovers `engines`): LoRA-Edit on a Wan
2.2-style expert pair built from the small world DiT.

No Wan 2.2 world model exists, so the pair is: high-noise expert = the world DiT as trained; low-noise expert = a
short fine-tune of it on the low-noise range only (a rank-16 LoRA trained with stock I2V conditioning on
`LOW_NOISE_CLIPS` training scenes, t in [0, boundary), merged into a copy). It exercises the two-expert path
(one LoRA-Edit LoRA per expert on its own range, the split schedule); it is not a claim about Wan 2.2 quality.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .experts import LOW, WAN22_I2V_BOUNDARY, t_range

LOW_NOISE_CLIPS = 8
LOW_NOISE_SEED = 500_000          # training scenes 500000.. (nodes/world/scenes.TRAIN_SEEDS), never held-out ones
LOW_NOISE_LR = 5e-4


@dataclass
class _Cache:
    low: object = None


def low_noise_expert(world, steps: int, boundary: float = WAN22_I2V_BOUNDARY, size=(64, 64), frames: int = 17):
    """A copy of world.dit fine-tuned for `steps` steps on t in [0, boundary) (stock I2V samples of training
    scenes, a merged rank-16 LoRA); world.dit is unchanged."""
    from ..world.scenes import render_clip
    from .lora import _host_paths
    from .trainer import TrainSettings, build_video_samples, train_lora_edit

    samples = [s for k in range(LOW_NOISE_CLIPS)
               for s in build_video_samples(render_clip(LOW_NOISE_SEED + k, size=size, frames=frames), None,
                                            world.encode, world.context)]
    low = copy.deepcopy(world.dit)
    result = train_lora_edit(low, samples, TrainSettings(steps=steps, steps_stage2=0, learning_rate=LOW_NOISE_LR,
                                                         rank=16, seed=LOW_NOISE_SEED,
                                                         t_range=t_range(LOW, boundary)))
    paths = _host_paths(low, result.lora)
    with torch.no_grad():
        for path, layer in result.lora.items():
            weight = low.module.get_submodule(paths[path]).weight
            weight.copy_(layer(weight))
    return low


def engines(world, settings) -> dict:
    """{'lora_edit_wan22': engine} on the world models, {} without them (the row needs a Wan model)."""
    if world is None:
        return {}
    from ..evaluate.bench import loose_mask, memo_encode
    from .pipeline import SampleSettings, lora_edit_video
    from .trainer import TrainSettings

    encode = memo_encode(world.encode)
    cache = _Cache()

    def lora_edit_wan22(s):
        if cache.low is None:
            cache.low = low_noise_expert(world, 2 * settings.train_steps, size=tuple(s.source.shape[1:3]),
                                         frames=s.source.shape[0])
        out = lora_edit_video(world.dit, encode, world.decode, s.source, loose_mask(s), s.edited_first[None],
                              world.context,
                              train=TrainSettings(steps=settings.train_steps, learning_rate=settings.lora_lr,
                                                  rank=settings.lora_rank, seed=s.seed),
                              sampling=SampleSettings(steps=settings.sample_steps, cfg=1.0, shift=settings.shift,
                                                      seed=s.seed),
                              low_noise_dit=cache.low, boundary=WAN22_I2V_BOUNDARY)
        return out.frames

    return {"lora_edit_wan22": lora_edit_wan22}
