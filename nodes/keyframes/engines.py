"""Span engines: how one span between keyframes is generated (torch-only).

An engine propagates a keyframe forward through a span (`forward`: the keyframe is the span's frame 0); a
backward span is the same engine on the time-reversed span (`run_span`). `between` generates a span whose two
ends are keyframes: the base class uses the first only (the chunk chainer's seam rule: the next span's
keyframe replaces the last frame); FlowEngine blends a forward and a backward propagation by distance with the
engine's tracked region deciding per pixel; LoRAEditEngine puts the later keyframe into V_cond with keep-mask 1
at its frame. `identity` names everything a result depends on besides the tensors (the span cache key)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..common import OnStep, ShouldStop, log


@dataclass(frozen=True)
class SpanResult:
    """video [L, H, W, 3] in 0..1 and mask [L, H, W] (1 = edit region, as far as the engine knows it)."""

    video: Tensor
    mask: Tensor


def unedited(source: Tensor) -> SpanResult:
    """A span whose keyframe changes nothing: the source, bit-identical, and an empty region."""
    return SpanResult(source.clone(), source.new_zeros(source.shape[:3]))


class SpanEngine(ABC):
    """Base: `identity` and `forward` must be provided; `between` falls back to forward from the first keyframe."""

    name = "engine"
    two_ended = False

    @property
    @abstractmethod
    def identity(self) -> str:
        """What the span cache keys this engine by (its code, settings and model)."""

    @abstractmethod
    def forward(self, source: Tensor, key: Tensor, mask: Optional[Tensor], on_step: Optional[OnStep] = None,
                should_stop: Optional[ShouldStop] = None) -> SpanResult:
        """The span from its keyframe `key` at frame 0 onwards."""

    def between(self, source: Tensor, first: Tensor, last: Tensor, mask: Optional[Tensor],
                on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None) -> SpanResult:
        return self.forward(source, first, mask, on_step, should_stop)


def flip(t: Optional[Tensor]) -> Optional[Tensor]:
    """Time-reverse a clip or per-frame mask; a one-frame mask (the region at the keyframe) stays as it is."""
    return t if t is None or t.shape[0] == 1 else t.flip(0)


def backward(engine: SpanEngine, source: Tensor, key: Tensor, mask: Optional[Tensor],
             on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None) -> SpanResult:
    """The engine on the time-reversed span, from the span's last frame (`key`), reversed back."""
    r = engine.forward(source.flip(0), key, flip(mask), on_step, should_stop)
    return SpanResult(r.video.flip(0), r.mask.flip(0))


def run_span(engine: SpanEngine, kind: str, source: Tensor, first: Optional[Tensor], last: Optional[Tensor],
             mask: Optional[Tensor], on_step: Optional[OnStep] = None,
             should_stop: Optional[ShouldStop] = None) -> SpanResult:
    """One span by kind ('backward' from `last`, 'forward' from `first`, 'between' both)."""
    if kind == "backward":
        return backward(engine, source, last, mask, on_step, should_stop)
    if kind == "forward" or source.shape[0] == 1:
        return engine.forward(source, first, mask, on_step, should_stop)
    return engine.between(source, first, last, mask, on_step, should_stop)


def distance_blend(source: Tensor, fwd: SpanResult, bwd: SpanResult) -> SpanResult:
    """Blend a forward [from frame 0] and a backward [from frame L-1] result of one span [L, H, W, 3].

    Weights by distance: w_f = (L-1-t)/(L-1), w_b = t/(L-1). Per pixel, an end whose keyframe has an edit counts
    only where its propagated region is > 0 (elsewhere it lost the pixel: occluded, or off its track), so the other
    end's edit shows there in full; an end with no edit at all (a keyframe equal to its source frame) counts
    everywhere with its zero change, so the edit fades out towards it. Where neither end counts, plain distance
    weights. Frame 0 is the forward result and frame L-1 the backward one, exactly."""
    n = source.shape[0]
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    wf, wb = (n - 1 - t) / (n - 1), t / (n - 1)
    known_f = (fwd.mask > 0).float() if bool(fwd.mask.amax() > 0) else torch.ones_like(fwd.mask)
    known_b = (bwd.mask > 0).float() if bool(bwd.mask.amax() > 0) else torch.ones_like(bwd.mask)
    a, b = wf * known_f, wb * known_b
    lost = (a + b) <= 0
    a, b = torch.where(lost, wf.expand_as(a), a), torch.where(lost, wb.expand_as(b), b)
    den = a + b
    src = source.float()
    change = (a[..., None] * (fwd.video - src) + b[..., None] * (bwd.video - src)) / den[..., None]
    return SpanResult((src + change).clamp(0, 1), (a * fwd.mask + b * bwd.mask) / den)


def _code_hash(*files: Path) -> str:
    """Short hash of source files, so a changed engine invalidates the cache of its old results."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class FlowEngine(SpanEngine):
    """nodes/flow's propagate_edit per span (CPU, no weights). mask per span: None (derived from the keyframe),
    [1, H, W] (the region at the keyframe, tracked) or [L, H, W] (per frame)."""

    name = "flow"
    two_ended = True

    def __init__(self, settings=None):
        from ..flow.engine import FlowSettings

        self.settings = settings or FlowSettings()
        flow_dir = Path(__file__).resolve().parent.parent / "flow"
        self.code = _code_hash(flow_dir / "engine.py", flow_dir / "dis.py")    # once: the code this process runs

    @property
    def identity(self) -> str:
        return f"flow:{self.settings!r}:{self.code}"

    def forward(self, source, key, mask, on_step=None, should_stop=None) -> SpanResult:
        from ..flow.engine import derive_edit_mask, propagate_edit

        if mask is None:
            try:
                mask = derive_edit_mask(source[0], key, self.settings.mask_threshold)[None]
            except ValueError:                                 # the keyframe equals its source frame
                return unedited(source)
        elif float(mask.amax()) <= 0:
            return unedited(source)
        r = propagate_edit(source, key, mask, self.settings, "error", on_step, should_stop)
        return SpanResult(r.video, r.mask)

    def between(self, source, first, last, mask, on_step=None, should_stop=None) -> SpanResult:
        n = source.shape[0]
        half = (lambda off: (lambda i, m, p=None: on_step(off + i, 2 * n, p))) if on_step else (lambda off: None)
        fwd = self.forward(source, first, mask, half(0), should_stop)
        bwd = backward(self, source, last, mask, half(n), should_stop)
        return distance_blend(source, fwd, bwd)


class ChainEngine(SpanEngine):
    """Any generator the chunk chainer drives (nodes/chunks/chain.py Generator): each span is chained from its
    keyframe with `chain_chunks` over a plan of chunk_length chunks (padding and hand-offs as the chainer does);
    two-keyframe spans are generated from their first keyframe, the later keyframe replacing the last frame."""

    name = "chunks"

    def __init__(self, generate, identity: str, chunk_length: int = 81, steps: int = 1, seed: int = 0,
                 drift=None):
        self.generate, self._identity = generate, identity
        self.chunk_length, self.steps, self.seed, self.drift = chunk_length, steps, seed, drift

    @property
    def identity(self) -> str:
        return f"chunks:{self._identity}:L{self.chunk_length}:steps{self.steps}:seed{self.seed}:{self.drift!r}"

    def forward(self, source, key, mask, on_step=None, should_stop=None) -> SpanResult:
        from ..chunks.chain import chain_chunks
        from ..chunks.drift import DriftSettings
        from ..chunks.plan import plan_chunks

        plan = plan_chunks(source.shape[0], min(self.chunk_length, _wan_length(source.shape[0])), 1, "pad_repeat")
        res = chain_chunks(plan, source, key, self.generate, mask, self.drift or DriftSettings(), 1, self.seed,
                           self.steps, "error", on_step, should_stop)
        region = res.edit_mask if res.edit_mask is not None else source.new_zeros(source.shape[:3])
        return SpanResult(res.video, region)


def _wan_length(n: int) -> int:
    """The smallest 4k+1 >= n (at least 5)."""
    return max(5, 4 * ((n - 1 + 3) // 4) + 1)


def end_keyed_condition(source: Tensor, mask: Optional[Tensor], first: Tensor, last: Optional[Tensor]
                        ) -> tuple[Tensor, Tensor]:
    """LoRA-Edit's V_cond [L, H, W, 3] and keep [L, H, W] (nodes/lora_edit masked_condition_video) with, when
    `last` is given, the later keyframe at the last frame and keep-mask 1 there."""
    from ..lora_edit.conditioning import masked_condition_video

    v_cond, keep = masked_condition_video(source, mask, first)
    if last is not None:
        v_cond[-1], keep[-1] = last.to(v_cond), 1.0
    return v_cond, keep


def pad_to_wan(source: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], int]:
    """Pad a span to 4k+1 frames by repeating its last frame (and mask frame): (source, mask, padded count)."""
    n = source.shape[0]
    pad = _wan_length(n) - n
    if not pad:
        return source, mask, 0
    source = torch.cat([source, source[-1:].expand(pad, -1, -1, -1)])
    if mask is not None and mask.shape[0] > 1:
        mask = torch.cat([mask, mask[-1:].expand(pad, -1, -1)])
    return source, mask, pad


class LoRAEditEngine(SpanEngine):
    """LoRA-Edit (nodes/lora_edit) per span on any WanDiT + VAE: a LoRA trained on the span (a backward span:
    on the reversed span), then sampling from V_cond with the first keyframe at frame 0 and, for two-keyframe
    spans, the later keyframe at the last frame, both with keep-mask 1. Spans are padded to 4k+1 frames by
    repeating their last frame (the later keyframe then sits on the last padded frame) and trimmed.

    world: nodes/evaluate/bench.py WanWorld (dit, encode, decode, context); model_id: names the weights (cache)."""

    name = "lora_edit"
    two_ended = True

    def __init__(self, world, model_id: str, train=None, sampling=None, memory=None):
        from ..lora_edit.lowvram import MemorySettings
        from ..lora_edit.pipeline import SampleSettings
        from ..lora_edit.trainer import TrainSettings

        self.world, self.model_id = world, model_id
        self.train = train or TrainSettings()
        self.sampling = sampling or SampleSettings(cfg=1.0)
        self.memory = memory or MemorySettings(False)

    @property
    def identity(self) -> str:
        return f"lora_edit:{self.model_id}:{self.train!r}:{self.sampling!r}:{self.memory!r}"

    def forward(self, source, key, mask, on_step=None, should_stop=None) -> SpanResult:
        return self._run(source, key, None, mask, on_step, should_stop)

    def between(self, source, first, last, mask, on_step=None, should_stop=None) -> SpanResult:
        return self._run(source, first, last, mask, on_step, should_stop)

    def _run(self, source, first, last, mask, on_step, should_stop) -> SpanResult:
        from ..host.sampling import sample
        from ..lora_edit.conditioning import wan_cond
        from ..lora_edit.lora import attach_hooks
        from ..lora_edit.trainer import build_video_samples, train_lora_edit

        n = source.shape[0]
        src, m, pad = pad_to_wan(source, mask)
        w, steps = self.world, self.train.steps + self.sampling.steps
        stage1 = build_video_samples(src, m, w.encode, w.context, None, self.memory.window_frames,
                                     self.memory.window_stride)
        inner = (lambda off: (lambda i, t, p=None: on_step(off + i, steps))) if on_step else (lambda off: None)
        lora = train_lora_edit(w.dit, stage1, self.train, None, self.memory, on_step=inner(0),
                               should_stop=should_stop).lora
        v_cond, keep = end_keyed_condition(src, m, first[None], last)
        with torch.no_grad():
            cond = wan_cond(w.encode(v_cond), keep, w.context)
        x1 = stage1[0].target
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(self.sampling.seed)).to(x1)
        detach = attach_hooks(w.dit, lora)
        try:
            with torch.no_grad():
                latent = sample(w.dit, cond, noise, self.sampling.steps, self.sampling.shift, inner(self.train.steps),
                                should_stop)
                frames = w.decode(latent).float().cpu().clamp(0, 1)[:n]
        finally:
            detach()
        log.info("FFP keyframes: LoRA-Edit span of %d frames (%d padded)%s", n, pad,
                 ", two-ended" if last is not None else "")
        region = torch.ones(n, *source.shape[1:3]) if mask is None else mask.float().expand(n, -1, -1).clone()
        return SpanResult(frames, region)
