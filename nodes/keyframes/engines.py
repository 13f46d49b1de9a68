"""Span engines: how one span between keyframes is generated (torch-only).

An engine propagates a keyframe forward through a span (`forward`: the keyframe is the span's frame 0); a
backward span is the same engine on the time-reversed span (`run_span`). `between` generates a span whose two
ends are keyframes: the base class uses the first only (the chunk chainer's seam rule: the next span's
keyframe replaces the last frame); FlowEngine blends a forward and a backward propagation by distance with the
engine's tracked region deciding per pixel; LoRAEditEngine (and ChainEngine over a generator that keeps the
source, e.g. ComfyUI's Wan with LoRA-Edit conditioning) puts the later keyframe into V_cond with keep-mask 1 at
its frame. `identity` names everything a result depends on besides the tensors (the span cache key)."""

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


def _tensor_hash(*tensors: Optional[Tensor]) -> str:
    """Short hash of tensors' shapes, dtypes and values (None counts too), for cache identities."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        c = t.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)}:{c.dtype};".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()[:16]


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


TAIL_PAD = 3
"""A two-ended span is padded by at least 3 frames so its later keyframe fills the whole last latent frame
(4 pixel frames: keep-mask 1 on all four, as the LoRA learned for kept source pixels) besides its own frame."""


class ChainEngine(SpanEngine):
    """Any generator the chunk chainer drives (nodes/chunks/chain.py Generator): each span is chained from its
    keyframe with `chain_chunks` over a plan of chunk_length chunks (padding and hand-offs as the chainer does).

    keeps_source=False: two-keyframe spans are generated from their first keyframe, the later keyframe replacing
    the last frame (the chainer's seam rule). keeps_source=True, for generators that keep each chunk's source
    outside its edit mask (chunks conditioning 'lora_edit'): two-ended, the later keyframe held on the span's
    last frame and TAIL_PAD frames after it (fewer where the last chunk would hold nothing else) with the mask
    cleared there (hold_tail), which is LoRA-Edit's V_cond with that keyframe at keep-mask 1
    (masked_condition_video's tail) in the span's last chunk."""

    name = "chunks"

    def __init__(self, generate, identity: str, chunk_length: int = 81, steps: int = 1, seed: int = 0,
                 drift=None, keeps_source: bool = False):
        self.generate, self._identity = generate, identity
        self.chunk_length, self.steps, self.seed, self.drift = chunk_length, steps, seed, drift
        self.two_ended = keeps_source

    @property
    def identity(self) -> str:
        return (f"chunks:{self._identity}:L{self.chunk_length}:steps{self.steps}:seed{self.seed}:{self.drift!r}"
                f"{':two-ended' if self.two_ended else ''}")

    def _plan(self, n: int):
        from ..chunks.plan import plan_chunks

        return plan_chunks(n, min(self.chunk_length, _wan_length(n)), 1, "pad_repeat")

    def forward(self, source, key, mask, on_step=None, should_stop=None) -> SpanResult:
        from ..chunks.chain import chain_chunks
        from ..chunks.drift import DriftSettings

        plan = self._plan(source.shape[0])
        res = chain_chunks(plan, source, key, self.generate, mask, self.drift or DriftSettings(), 1, self.seed,
                           self.steps, "error", on_step, should_stop)
        region = res.edit_mask if res.edit_mask is not None else source.new_zeros(source.shape[:3])
        return SpanResult(res.video, region)

    def between(self, source, first, last, mask, on_step=None, should_stop=None) -> SpanResult:
        if not self.two_ended:
            return self.forward(source, first, mask, on_step, should_stop)
        n = source.shape[0]
        extra = next(e for e in range(TAIL_PAD, -1, -1) if self._plan(n + e).chunks[-1].start < n - 1)
        src, held = hold_tail(source, mask, last, extra)    # (no chunk made of held frames only: nothing to make)
        r = self.forward(src, first, held, on_step, should_stop)
        region = torch.ones(n, *source.shape[1:3]) if mask is None else (mask.float() > 0.5).float().expand(
            n, -1, -1).clone()                          # the user's region (the held frames' mask was cleared)
        return SpanResult(r.video[:n], region)


def hold_tail(source: Tensor, mask: Optional[Tensor], tail: Tensor, extra: int) -> tuple[Tensor, Tensor]:
    """A span [L, H, W, 3] with its later keyframe `tail` [H, W, 3] held: frames L-1..L-1+extra are the tail and
    the per-frame mask [L + extra, H, W] is 0 there, elsewhere the given mask (None: 1, LoRA-Edit's global edit).
    LoRA-Edit's conditioning of the result equals masked_condition_video(source, mask, head, tail=...) with the
    tail on those frames (tested), so a chained generator that keeps the source sees the keyframe there."""
    n, h, w = source.shape[:3]
    m = torch.ones(n, h, w) if mask is None else mask.float().expand(n, h, w)
    src = torch.cat([source[:-1], tail.to(source)[None].expand(extra + 1, -1, -1, -1)])
    return src, torch.cat([m[:-1], m.new_zeros(extra + 1, h, w)])


def _wan_length(n: int) -> int:
    """The smallest 4k+1 >= n (at least 5)."""
    return max(5, 4 * ((n - 1 + 3) // 4) + 1)


def pad_to_wan(source: Tensor, mask: Optional[Tensor], at_least: int = 0) -> tuple[Tensor, Optional[Tensor], int]:
    """Pad a span to 4k+1 frames (at least `at_least` more) by repeating its last frame (and mask frame):
    (source, mask, padded count)."""
    n = source.shape[0]
    pad = _wan_length(n + at_least) - n
    if not pad:
        return source, mask, 0
    source = torch.cat([source, source[-1:].expand(pad, -1, -1, -1)])
    if mask is not None and mask.shape[0] > 1:
        mask = torch.cat([mask, mask[-1:].expand(pad, -1, -1)])
    return source, mask, pad


class LoRAEditEngine(SpanEngine):
    """LoRA-Edit (nodes/lora_edit lora_edit_video) per span on any WanDiT + VAE: a LoRA trained on the span (a
    backward span: on the reversed span), then sampling from V_cond with the first keyframe at frame 0 and, for
    two-keyframe spans, the later keyframe (masked_condition_video's tail) on the span's last frame and the
    padding after it, all with keep-mask 1. Spans are padded to 4k+1 frames by repeating their last frame (two-
    ended: at least TAIL_PAD frames, so the keyframe fills the last latent frame) and trimmed.

    world: nodes/evaluate/bench.py WanWorld (dit, encode, decode, context); model_id: names the weights (cache);
    negative / clip: the negative text context and CLIP-vision tokens of a real Wan (None: none; the world DiT
    ignores text). The span cache key holds a hash of context, negative and clip."""

    name = "lora_edit"
    two_ended = True

    def __init__(self, world, model_id: str, train=None, sampling=None, memory=None,
                 negative: Optional[Tensor] = None, clip: Optional[Tensor] = None):
        from ..lora_edit.lowvram import MemorySettings
        from ..lora_edit.pipeline import SampleSettings
        from ..lora_edit.trainer import TrainSettings

        self.world, self.model_id, self.negative, self.clip = world, model_id, negative, clip
        self.text = _tensor_hash(world.context, negative, clip)
        self.train = train or TrainSettings()
        self.sampling = sampling or SampleSettings(cfg=1.0)
        self.memory = memory or MemorySettings(False)
        lora_dir = Path(__file__).resolve().parent.parent / "lora_edit"
        self.code = _code_hash(Path(__file__).resolve(), *(lora_dir / f"{m}.py" for m in
                                                          ("conditioning", "pipeline", "trainer", "lora")))

    @property
    def identity(self) -> str:
        return (f"lora_edit:{self.model_id}:{self.train!r}:{self.sampling!r}:{self.memory!r}:text{self.text}:"
                f"{self.code}")

    def forward(self, source, key, mask, on_step=None, should_stop=None) -> SpanResult:
        return self._run(source, key, None, mask, on_step, should_stop)

    def between(self, source, first, last, mask, on_step=None, should_stop=None) -> SpanResult:
        return self._run(source, first, last, mask, on_step, should_stop)

    def _run(self, source, first, last, mask, on_step, should_stop) -> SpanResult:
        from ..lora_edit.pipeline import lora_edit_video

        n = source.shape[0]
        src, m, pad = pad_to_wan(source, mask, 0 if last is None else TAIL_PAD)
        tail = None if last is None else last[None].expand(pad + 1, -1, -1, -1)   # the keyframe and its padding
        steps = self.train.steps + self.sampling.steps
        inner = (lambda off: (lambda i, t, p=None: on_step(off + i, steps))) if on_step else (lambda off: None)
        w = self.world
        out = lora_edit_video(w.dit, w.encode, w.decode, src, m, first[None], w.context, self.negative, self.clip,
                              train=self.train, memory=self.memory, sampling=self.sampling, on_train_step=inner(0),
                              on_sample_step=inner(self.train.steps), should_stop=should_stop, tail=tail)
        log.info("FFP keyframes: LoRA-Edit span of %d frames (%d padded)%s", n, pad,
                 ", two-ended" if last is not None else "")
        region = torch.ones(n, *source.shape[1:3]) if mask is None else mask.float().expand(n, -1, -1).clone()
        return SpanResult(out.frames.float().cpu().clamp(0, 1)[:n], region)


def world_model_id() -> str:
    """The bundled world weights' identity (nodes/world/model.py): a hash of their manifest, which holds every
    file's sha256, so retrained weights are a new model for the span cache."""
    import json

    from ..world.model import read_manifest

    return "world:" + hashlib.sha256(json.dumps(read_manifest(), sort_keys=True).encode()).hexdigest()[:16]
