"""LoRA-Edit training (SEED_SPEC 5.3, 5.5): mask-aware per-video LoRA on any WanDiT, torch-only.

Stage 1 (motion + background lock): condition on the masked source clip (frame 1 kept, edit region grey,
keep-mask 1 outside the edit region), target the source clip. Stage 2 (appearance, optional): each edited
keyframe as a masked still (keep = 0 in its edit region), mixed with the stage-1 samples (x1 each, stills x9
per pass, LoRA-Edit's code). Loss: plain MSE of the velocity, x_t = (1 - t) x1 + t x0, target x0 - x1,
t ~ U(0, 1) with no shift (the model sees t * 1000). AdamW (0.9, 0.99), weight decay 0.01, grad clip 1.0.
A Wan 2.2 expert trains on its own noise range only: settings.t_range = (lo, hi) draws t ~ U(lo, hi)
(experts.t_range; (0, 1) draws exactly the same t as before).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import OnStep, ShouldStop, log, log_once, report
from ..host.protocol import WanCond, host_streams_weights, training_context
from ..video.frames import check_video, frames_to_latent
from .conditioning import _edit_per_frame, masked_condition_video, masked_still, wan_cond
from .lora import LoRA, attach_hooks, create_lora
from .lowvram import BlockRunner, MemorySettings, is_oom, oom_message

Encode = Callable[[Tensor], Tensor]
"""encode(frames IMAGE [T, H, W, 3] 0..1, T = 4k+1 or 1) -> model-space latent [1, 16, F, H/8, W/8]."""

STILL_REPEATS = 9


@dataclass(frozen=True)
class TrainSample:
    """One training example: target latent x1 [1, 16, F, h, w] and its I2V conditioning."""

    target: Tensor
    cond: WanCond
    kind: str = "video"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    steps_stage2: int = 100
    learning_rate: float = 1e-4
    rank: int = 16
    targets: str = "all_linears"
    seed: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    t_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1 (flow time, 1 = noise); got {self.t_range}.")


@dataclass
class TrainResult:
    lora: LoRA
    losses: list[float] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """Start frames of overlapping windows covering [0, frames) (the last one ends at the clip's end)."""
    if window <= 0 or window >= frames:
        return [0]
    frames_to_latent(window)
    if stride < 1:
        raise ValueError(f"window stride must be >= 1; got {stride}.")
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


def build_video_samples(source: Tensor, edit_mask: Optional[Tensor], encode: Encode, context: Tensor,
                        clip_tokens: Optional[Tensor] = None, window_frames: int = 0, window_stride: int = 4
                        ) -> list[TrainSample]:
    """Stage-1 samples: the whole clip, or overlapping windows (each window keeps its own first frame, M = 1:
    SEED_SPEC 11.17). source IMAGE [T, H, W, 3] (T = 4k+1), edit_mask MASK [T or 1, H, W] or None (global)."""
    check_video(source, "source")
    t = source.shape[0]
    frames_to_latent(t)
    if edit_mask is not None:
        edit_mask = _edit_per_frame(edit_mask, source)  # validates (size, count, empty) before any encoding
    samples = []
    for s in window_starts(t, window_frames, window_stride):
        n = t if window_frames <= 0 or window_frames >= t else window_frames
        clip = source[s:s + n]
        mask = None if edit_mask is None else edit_mask[s:s + n]
        v_cond, keep = masked_condition_video(clip, mask, clip[:1], allow_empty=True)  # a window may miss it
        with torch.no_grad():
            target, cond_lat = encode(clip), encode(v_cond)
        samples.append(TrainSample(target, wan_cond(cond_lat, keep, context, clip_tokens), "video"))
    return samples


def parse_indices(text: str, count: int, frames: int) -> list[int]:
    """'12, 40' -> [11, 39]: 1-based frame numbers of the edited keyframes (one per keyframe image)."""
    try:
        idx = [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"keyframe indices must be comma-separated frame numbers like '25, 49'; got '{text}'.") from None
    if len(idx) != count:
        raise ValueError(f"{count} keyframe image(s) but {len(idx)} frame number(s) in '{text}'; give one 1-based "
                         "frame number per keyframe image.")
    bad = [i for i in idx if not 1 <= i <= frames]
    if bad:
        raise ValueError(f"keyframe frame numbers {bad} are outside the clip's 1..{frames} (1-based, frame 1 = the "
                         "first frame).")
    return [i - 1 for i in idx]


def build_keyframe_samples(source: Tensor, edit_mask: Optional[Tensor], keyframes: Tensor, indices: list[int],
                           encode: Encode, context: Tensor, clip_tokens: Optional[Tensor] = None) -> list[TrainSample]:
    """Stage-2 samples: keyframe k (0-based source index) as a still: condition = source frame k with its edit
    region grey and keep 0 there; target = the user's edited frame. keyframes IMAGE [N, H, W, 3]."""
    check_video(keyframes, "keyframes")
    if tuple(keyframes.shape[1:3]) != tuple(source.shape[1:3]):
        raise ValueError(f"keyframes are {keyframes.shape[2]}x{keyframes.shape[1]} but the clip is "
                         f"{source.shape[2]}x{source.shape[1]}; resize them to the clip.")
    if edit_mask is not None:
        edit_mask = _edit_per_frame(edit_mask, source)
    out = []
    for img, k in zip(keyframes, indices):
        v_cond, keep = masked_still(source[k], None if edit_mask is None else edit_mask[k])
        with torch.no_grad():
            target, cond_lat = encode(img[None]), encode(v_cond)
        out.append(TrainSample(target, wan_cond(cond_lat, keep, context, clip_tokens), "still"))
    return out


def _stage2_order(n_video: int, n_still: int, steps: int, gen: torch.Generator) -> list[tuple[str, int]]:
    pool = [("video", i) for i in range(n_video)] + [("still", i) for i in range(n_still) for _ in range(STILL_REPEATS)]
    order: list[tuple[str, int]] = []
    while len(order) < steps:
        order += [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
    return order[:steps]


def flow_loss(dit, sample: TrainSample, gen: torch.Generator, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """MSE between the predicted velocity and x0 - x1 at a uniform random t in t_range (Eq. 2)."""
    x1 = sample.target
    noise = torch.randn(x1.shape, generator=gen, dtype=torch.float32).to(x1.device, x1.dtype)
    lo, hi = t_range
    t = torch.rand(1, generator=gen, dtype=torch.float32)
    if (lo, hi) != (0.0, 1.0):
        top = torch.nextafter(torch.tensor(hi), torch.tensor(0.0)) if hi < 1.0 else torch.tensor(1.0)
        t = (lo + (hi - lo) * t).clamp(lo, float(top))      # [lo, hi) below 1: the boundary is the other expert's
    tt = t.to(x1.device, x1.dtype)
    x_t = (1 - tt) * x1 + tt * noise
    v = dit.predict(x_t, t.to(x1.device), sample.cond)
    return F.mse_loss(v.float(), (noise - x1).float())


def train_lora_edit(dit, stage1: list[TrainSample], settings: TrainSettings = TrainSettings(),
                    stage2: Optional[list[TrainSample]] = None, memory: MemorySettings = MemorySettings(False),
                    attach: Optional[Callable[[LoRA], Callable[[], None]]] = None, lora: Optional[LoRA] = None,
                    on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
                    device: torch.device | str | None = None) -> TrainResult:
    """Train a LoRA on `dit` (a WanDiT) whose base weights stay frozen and bit-identical.

    attach(lora) -> detach(): how the LoRA enters the forward (default: forward hooks, `attach_hooks`).
    Stage 1 cycles through `stage1` (the clip or its windows) for settings.steps steps; stage 2 runs
    settings.steps_stage2 steps over stage1 x1 + each still x9 when `stage2` is given. on_step(i, total, loss)
    after every step; should_stop() is checked after every step and before every block (Cancel within a step).
    """
    check_i2v(dit)
    if not stage1:
        raise ValueError("no stage-1 training samples.")
    device = torch.device(device) if device is not None else stage1[0].target.device
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode; the LoRA must be trainable
        if lora is None:
            lora = create_lora(dit, settings.rank, settings.targets, settings.seed, device=device)
        if any(p.is_inference() for p in lora.parameters()):
            raise RuntimeError("the LoRA was created under torch.inference_mode and cannot be trained; create it "
                               "inside torch.inference_mode(False).")
        lora.requires_grad_(True)
    params = [p for p in lora.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay)
    plan = [(1, ("video", i % len(stage1))) for i in range(settings.steps)]
    if stage2:
        plan += [(2, s) for s in _stage2_order(len(stage1), len(stage2), settings.steps_stage2, gen)]
    total = len(plan)
    result = TrainResult(lora)
    base = dit.module
    frozen = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)
    detach = (attach or (lambda lo: attach_hooks(dit, lo)))(lora)
    if memory.swap_fraction > 0 and host_streams_weights(dit):
        log_once("lora-edit-host-streams", "FFP LoRA-Edit: the host streams this model's weights itself (ComfyUI "
                 "dynamic VRAM); block swap (%.0f %%) is skipped, checkpointing and activation offload stay.",
                 100 * memory.swap_fraction, level=logging.INFO)
        memory = replace(memory, swap_fraction=0.0)
    runner = BlockRunner(dit.blocks(), device, memory.gradient_checkpointing,
                         memory.blocks_to_swap(len(dit.blocks())), should_stop, memory.offload_activations,
                         memory.split_blocks)
    try:
        with torch.inference_mode(False), torch.enable_grad(), training_context(dit):
            runner.install()
            for i, (stage, (kind, j)) in enumerate(plan, 1):
                sample = stage1[j] if kind == "video" else stage2[j]
                loss = flow_loss(dit, sample, gen, settings.t_range)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged at step {i} (loss {loss.item()}); lower the learning rate "
                                       f"(now {settings.learning_rate:g}) or use compute dtype bf16/fp32.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
                result.losses.append(float(loss.detach()))
                result.stages.append(stage)
                report(on_step, should_stop, i, total, result.losses[-1])
    except Exception as e:
        if is_oom(e):
            x = stage1[0].target
            raise RuntimeError(oom_message(memory, 4 * (x.shape[2] - 1) + 1, 8 * x.shape[3], 8 * x.shape[4])) from e
        raise
    finally:
        runner.remove()
        detach()
        for p, r in zip(base.parameters(), frozen):
            if p.requires_grad != r:
                with torch.inference_mode(p.is_inference()):  # ComfyUI's weights may be inference tensors
                    p.requires_grad_(r)
        lora.requires_grad_(False)
    if result.losses:
        log.info("FFP LoRA-Edit: %d steps, loss %.4f -> %.4f", total, result.losses[0], _tail_mean(result.losses))
    return result


def _tail_mean(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (flow-matching losses are noisy: t is random each step)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve_image(losses: list[float], stages: Optional[list[int]] = None, height: int = 256, width: int = 512
                     ) -> Tensor:
    """IMAGE [1, H, W, 3]: raw loss (light) and its 10-step moving average (dark); stage 2 shaded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pad = 24
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)

        def xy(i, v):
            return pad + (width - 2 * pad) * i / n, height - pad - (height - 2 * pad) * (v - lo) / span

        if stages and 2 in stages:
            s = stages.index(2)
            d.rectangle([xy(s, lo)[0], pad, width - pad, height - pad], fill=(235, 240, 255))
        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        d.line([xy(i, v) for i, v in enumerate(smooth(losses))], fill=(20, 60, 160), width=2)
        d.text((pad, 4), f"loss {losses[0]:.4f} -> {_tail_mean(losses):.4f} (mean of last 10), {len(losses)} steps",
               fill=(0, 0, 0))
        d.text((pad, height - pad + 6), f"min {lo:.4f}  max {hi:.4f}", fill=(0, 0, 0))
    d.rectangle([pad, pad, width - pad, height - pad], outline=(0, 0, 0))
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (arr.float() / 255.0)[None]


def check_i2v(dit) -> None:
    """LoRA-Edit needs a Wan 2.1 image-to-video DiT: 36 input channels (16 noise + 4 mask + 16 image)."""
    c = dit.dims.in_channels
    if dit.dims.out_channels == 48:
        from .experts import TI2V_MESSAGE

        raise ValueError(TI2V_MESSAGE)
    if c != 36:
        kind = {16: "a text-to-video (T2V) model", 48: "a Fun-Control model"}.get(c, f"a model with {c} input channels")
        raise ValueError(f"LoRA-Edit trains a Wan 2.1 image-to-video model (36 input channels) but this is {kind}. "
                         "Load an I2V checkpoint, e.g. wan2.1_i2v_480p_14B.")
