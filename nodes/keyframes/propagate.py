"""Propagate a set of keyframes through a clip, span by span, with the span cache (torch-only).

Each span (spans.py) is looked up in the cache by its content key and computed only on a miss, so after a
re-edit of one keyframe only the spans that touch it run again. Progress counts span frames across the whole
job (a cached span jumps ahead at once); Cancel is honoured inside each span and between spans, and a cancelled
span writes nothing (the cache keeps only finished spans)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..common import Cancelled, OnStep, ShouldStop, log
from ..video.frames import check_mask, check_video
from .cache import SpanCache, span_key
from .engines import SpanEngine, run_span
from .keys import Keyframes, check_against_mask
from .spans import Span, confidence, keyframe_distance, plan_spans


@dataclass(frozen=True)
class SpanRun:
    """One span of a run: computed (False = from the cache) and wall seconds."""

    span: Span
    computed: bool
    seconds: float


@dataclass(frozen=True)
class KeyframeResult:
    """video [T, H, W, 3], mask [T, H, W] (the engine's edit region), confidence [T] (spans.confidence),
    distance [T] (frames to the nearest keyframe), runs: per span, notes: what was fixed or derived."""

    video: Tensor
    mask: Tensor
    confidence: Tensor
    distance: Tensor
    runs: list[SpanRun] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    def report(self) -> str:
        """Spans (computed or cached, seconds), where the farthest frame from a keyframe is, and the notes."""
        lines = [f"{len(self.runs)} span(s), {sum(r.computed for r in self.runs)} computed, "
                 f"{sum(not r.computed for r in self.runs)} from the cache"]
        lines += [f"  {r.span}: {'computed' if r.computed else 'cached'} in {r.seconds:.1f} s" for r in self.runs]
        far = int(self.distance.argmax())
        lines.append(f"farthest from a keyframe: frame {far} (0-based; {int(self.distance[far])} frames away, "
                     f"confidence {float(self.confidence[far]):.2f}): add a keyframe there if it drifts")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _slice_mask(mask: Optional[Tensor], span: Span) -> Optional[Tensor]:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[span.start:span.stop + 1]


def propagate_keyframes(source: Tensor, keys: Keyframes, engine: SpanEngine, edit_mask: Optional[Tensor] = None,
                        cache: Optional[SpanCache] = None, on_step: Optional[OnStep] = None,
                        should_stop: Optional[ShouldStop] = None) -> KeyframeResult:
    """source [T, H, W, 3]; keys from make_keyframes (fitted, checked); edit_mask None / [1, H, W] / [T, H, W]
    (keyframes edited outside it are refused here too, as make_keyframes does: they may come without the mask).
    Returns the assembled clip (see spans.py for which span owns a shared keyframe frame)."""
    check_video(source, "source_video")
    t_len, h, w = source.shape[:3]
    if tuple(keys.frames.shape[1:3]) != (h, w):
        raise ValueError(f"keyframes are {keys.frames.shape[2]}x{keys.frames.shape[1]} but the clip is {w}x{h}; "
                         "make them with make_keyframes for this clip.")
    if keys.indices[-1] >= t_len:
        raise ValueError(f"keyframe(s) {[k for k in keys.indices if k >= t_len]} lie past the clip's end ({t_len} frames, "
                         f"0..{t_len - 1}); connect the clip the keyframes were checked against.")
    mask = None if edit_mask is None else check_mask(edit_mask.float().cpu(), "edit_mask", source)
    source = source.float().cpu()
    notes = keys.notes if mask is None else keys.notes + tuple(n for n in check_against_mask(source, keys, mask)
                                                               if n not in keys.notes)
    spans = plan_spans(t_len, keys.indices)
    total = sum(s.length for s in spans)
    out, region = torch.empty(t_len, h, w, 3), torch.zeros(t_len, h, w)
    runs, done = [], 0
    for span in spans:
        src = source[span.start:span.stop + 1]
        first = keys.frame(span.start) if span.kind != "backward" else None
        last = keys.frame(span.stop) if span.kind != "forward" else None
        if span.kind == "between" and not engine.two_ended:
            last = None                                  # generated from its start: the key must not depend on it
        m = _slice_mask(mask, span)
        key = span_key(engine.identity, span.kind if span.length > 1 else "forward", [src, first, last, m])
        t0 = time.perf_counter()
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            def inner(i: int, n: int, preview=None, _done=done, _len=span.length) -> None:
                if on_step is not None:
                    on_step(_done + min(_len, round(_len * i / max(n, 1))), total, preview)

            res = run_span(engine, span.kind, src, first, last, m, inner, should_stop)
            video, vmask = res.video.float().cpu(), res.mask.float().cpu()
            if video.shape != src.shape or vmask.shape != src.shape[:3]:
                raise RuntimeError(f"engine '{engine.name}' returned {tuple(video.shape)} / {tuple(vmask.shape)} for "
                                   f"{span}; expected {tuple(src.shape)}.")
            if cache is not None:
                cache.put(key, {"video": video, "mask": vmask})
        else:
            video, vmask = hit["video"], hit["mask"]
        if span.kind == "between" and not engine.two_ended and span.stop == t_len - 1:
            video = torch.cat([video[:-1], keys.frame(span.stop)[None]])   # the seam rule at the clip's end
        runs.append(SpanRun(span, hit is None, time.perf_counter() - t0))
        log.info("FFP keyframes: %s %s", span, "computed" if hit is None else "from the cache")
        out[span.start:span.stop + 1], region[span.start:span.stop + 1] = video, vmask
        done += span.length
        if on_step is not None:
            on_step(done, total, out[span.stop])
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled after {span}")
    dist = keyframe_distance(t_len, keys.indices)
    return KeyframeResult(out, region, torch.tensor(confidence(t_len, keys.indices)), torch.tensor(dist), runs,
                          notes)
