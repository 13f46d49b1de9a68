"""The whole LoRA-Edit recipe on any WanDiT + VAE, torch-only (the CLI's `--engine wan` and tests use it):
train the mask-aware LoRA on the source clip, then sample the edited clip from the edited first frame with the
same mask (30 steps, CFG 5, shift 5: LoRA-Edit's inference settings) and decode it. Sampling runs through the
same BlockRunner as training (no gradients): the preset's swapped blocks stay on the CPU and fp8 block weights
are cast to the compute dtype one block at a time.

Wan 2.2 I2V A14B (`low_noise_dit` given, `dit` = the high-noise expert): one LoRA per expert, each trained on
its own noise range (experts.t_range) from the same samples, one after the other; sampling runs the high-noise
expert for the steps at sigma >= boundary and the low-noise expert for the rest (each through its own
BlockRunner)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from ..common import OnStep, ShouldStop
from ..host.protocol import WanCond
from ..host.sampling import flow_sigmas, sample
from .conditioning import masked_condition_video, wan_cond
from .experts import HIGH, LOW, WAN22_I2V_BOUNDARY, ExpertPair, split_step, t_range
from .lora import attach_hooks
from .lowvram import BlockRunner, MemorySettings
from .trainer import TrainResult, TrainSettings, build_keyframe_samples, build_video_samples, train_lora_edit


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 30
    cfg: float = 5.0
    shift: float = 5.0
    seed: int = 0


@dataclass
class LoRAEditOutput:
    frames: Tensor            # IMAGE [T, H, W, 3]
    latent: Tensor            # [1, 16, F, h, w]
    training: TrainResult     # the (high-noise) expert's LoRA
    training_2: Optional[TrainResult] = None   # the low-noise expert's (Wan 2.2 pair), else None


def lora_edit_video(dit, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], source: Tensor,
                    edit_mask: Optional[Tensor], edited_first_frame: Tensor, context: Tensor,
                    negative_context: Optional[Tensor] = None, clip_tokens: Optional[Tensor] = None,
                    train: TrainSettings = TrainSettings(), memory: MemorySettings = MemorySettings(),
                    sampling: SampleSettings = SampleSettings(), keyframes: Optional[Tensor] = None,
                    keyframe_indices: Optional[list[int]] = None, on_train_step: Optional[OnStep] = None,
                    on_sample_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
                    low_noise_dit=None, boundary: float = WAN22_I2V_BOUNDARY,
                    tail: Optional[Tensor] = None) -> LoRAEditOutput:
    """source IMAGE [T, H, W, 3] (4k+1 frames, multiples of 16), edit_mask MASK or None (global edit),
    edited_first_frame IMAGE [1, H, W, 3] (already fitted). context [1, L, text_dim]; clip_tokens of the
    source's frame 1 for training and of the edited frame at inference are taken as the same tensor here.
    low_noise_dit: the Wan 2.2 low-noise expert (then `dit` is the high-noise one), boundary a sigma in (0, 1).
    tail: IMAGE [J, H, W, 3] or None: a later edited keyframe kept on the last J frames at inference (a span
    generated from both ends; conditioning.masked_condition_video); training is unchanged."""
    pair = ExpertPair(dit, low_noise_dit, boundary) if low_noise_dit is not None else None
    device = dit.module.patch_embedding.weight.device
    stage1 = build_video_samples(source, edit_mask, encode, context, clip_tokens, memory.window_frames,
                                 memory.window_stride)
    stage2 = None
    if keyframes is not None and keyframe_indices:
        stage2 = build_keyframe_samples(source, edit_mask, keyframes, keyframe_indices, encode, context, clip_tokens)
    if pair is None:
        result = train_lora_edit(dit, stage1, train, stage2, memory, on_step=on_train_step, should_stop=should_stop,
                                 device=device)
        result_2 = None
    else:
        per = train.steps + (train.steps_stage2 if stage2 else 0)
        result, result_2 = (
            train_lora_edit(expert, stage1, replace(train, t_range=t_range(role, boundary)), stage2, memory,
                            on_step=_offset(on_train_step, k * per, 2 * per), should_stop=should_stop,
                            device=expert.module.patch_embedding.weight.device)
            for k, (role, expert) in enumerate(((HIGH, dit), (LOW, low_noise_dit))))
    v_cond, keep = masked_condition_video(source, edit_mask, edited_first_frame, tail=tail)
    with torch.no_grad():
        cond = wan_cond(encode(v_cond), keep, context, clip_tokens)
    negative = None if negative_context is None else WanCond(None, None, negative_context, clip_tokens)
    x1 = stage1[0].target
    shape = (1, 16, keep_frames(source.shape[0]), x1.shape[3], x1.shape[4])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(sampling.seed)).to(x1.device, x1.dtype)
    detach = [attach_hooks(dit, result.lora)] + ([attach_hooks(low_noise_dit, result_2.lora)] if pair else [])
    try:
        if pair is None:
            latent = sample_low_vram(dit, memory, cond, noise, sampling, on_sample_step, should_stop, negative)
        else:
            latent = sample_experts(pair, memory, cond, noise, sampling, on_sample_step, should_stop, negative)
    finally:
        for d in detach:
            d()
    return LoRAEditOutput(decode(latent), latent, result, result_2)


def _offset(on_step: Optional[OnStep], done: int, total: int) -> Optional[OnStep]:
    if on_step is None:
        return None
    return lambda i, n, *a: on_step(done + i, total, *a)


def sample_experts(pair: ExpertPair, memory: MemorySettings, cond: WanCond, noise: Tensor, sampling: SampleSettings,
                   on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
                   negative: Optional[WanCond] = None) -> Tensor:
    """The two-expert schedule: the Wan schedule (sampling.steps, shift) split where sigma drops below
    pair.boundary; the high-noise expert integrates the first part, the low-noise expert the rest (one expert's
    BlockRunner installed at a time). A split at 0 or at every step leaves one expert unused (logged by none)."""
    sig = flow_sigmas(sampling.steps, sampling.shift)
    k = split_step(sig, pair.boundary)
    x = noise
    for expert, part, done in ((pair.high, sig[:k + 1], 0), (pair.low, sig[k:], k)):
        if len(part) < 2:
            continue
        x = sample_low_vram(expert, memory, cond, x, sampling, _offset(on_step, done, sampling.steps), should_stop,
                            negative, sigmas=part)
    return x


def sample_low_vram(dit, memory: MemorySettings, cond: WanCond, noise: Tensor, sampling: SampleSettings,
                    on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
                    negative: Optional[WanCond] = None, sigmas: Optional[Tensor] = None) -> Tensor:
    """host.sampling.sample with the preset's block swap (memory.blocks_to_swap of the blocks live on the CPU,
    each brought to the device as it runs, the next one prefetched) and the per-block fp8 upcast."""
    blocks = dit.blocks()
    device = dit.module.patch_embedding.weight.device
    runner = BlockRunner(blocks, device, checkpointing=False, blocks_to_swap=memory.blocks_to_swap(len(blocks)),
                         should_stop=should_stop, inference=True)
    with runner:
        return sample(dit, cond, noise, sampling.steps, sampling.shift, on_step, should_stop, negative,
                      sampling.cfg if negative is not None else 1.0, sigmas=sigmas)


def keep_frames(t: int) -> int:
    return (t - 1) // 4 + 1
