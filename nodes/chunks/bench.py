"""The world benchmark's `chunks` row (discovered by nodes/evaluate/bench.py): long world scenes through the chunk
chainer with the world models.

A case is rendered at LONG_FRAMES (49 = 3 chunks of 17, the length the world DiT was trained on, overlap 1).
The recipe is the long_clip workflow's: a LoRA-Edit stage-1 LoRA trained on the long source clip in 17-frame
windows (the world's loose-box masks, as the lora_edit row), then every chunk sampled with that LoRA and the
lora_edit conditioning (its own source slice outside the mask; chunk 1 starts from the edited first frame,
later chunks from the previous chunk's last frame), with the chainer's default drift control.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..evaluate.bench import BenchSettings, Engine, WanWorld, WorldSample, loose_mask, memo_encode
from .chain import ChainResult, Generator, chain_chunks, wan_generator
from .drift import DriftSettings
from .plan import plan_chunks

LONG_FRAMES = 49
CHUNK_FRAMES = 17
OVERLAP = 1


def train_world_lora(world: WanWorld, source: Tensor, mask: Optional[Tensor], settings: BenchSettings, seed: int,
                     encode=None, window: int = CHUNK_FRAMES):
    """LoRA-Edit stage 1 on `source` [T, H, W, 3] in `window`-frame windows, one per chunk -> the trained LoRA."""
    from ..lora_edit.trainer import TrainSettings, build_video_samples, train_lora_edit

    samples = build_video_samples(source, mask, encode or world.encode, world.context, None, window, window - 1)
    with torch.enable_grad():
        return train_lora_edit(world.dit, samples, TrainSettings(steps=settings.train_steps,
                                                                 learning_rate=settings.lora_lr,
                                                                 rank=settings.lora_rank, seed=seed)).lora


def chain_world(world: WanWorld, s: WorldSample, settings: BenchSettings, generate: Optional[Generator] = None,
                lora: bool = True, drift: DriftSettings = DriftSettings(), encode=None,
                chunk_frames: int = CHUNK_FRAMES, edit_mask: Optional[Tensor] = None) -> ChainResult:
    """One long sample through chain_chunks (chunk_frames chunks, OVERLAP); generate: default the world DiT with
    lora_edit conditioning (with the trained stage-1 LoRA attached when `lora`). edit_mask [T, H, W]: default
    the world's loose boxes (evaluate.bench.loose_mask)."""
    from ..lora_edit.lora import attach_hooks

    encode = encode or world.encode
    mask = loose_mask(s) if edit_mask is None else edit_mask
    plan = plan_chunks(s.source.shape[0], chunk_frames, OVERLAP)
    detach = None
    if generate is None:
        generate = wan_generator(world.dit, encode, world.decode, world.context, settings.sample_steps,
                                 settings.shift, kind="lora_edit")
        if lora:
            detach = attach_hooks(world.dit, train_world_lora(world, s.source, mask, settings, s.seed, encode,
                                                                chunk_frames))
    try:
        return chain_chunks(plan, s.source, s.edited_first, generate, mask, drift, seed=s.seed)
    finally:
        if detach is not None:
            detach()


def engines(world: Optional[WanWorld], settings: BenchSettings) -> dict[str, Engine]:
    """{'chunks': engine on LONG_FRAMES-frame cases}; {} without the world models (the row needs them)."""
    if world is None:
        return {}
    encode = memo_encode(world.encode)

    def chunks(s: WorldSample) -> Tensor:
        return chain_world(world, s, settings, encode=encode).video

    chunks.frames = LONG_FRAMES
    return {"chunks": chunks}
