"""Span planning between keyframes and the per-frame distance to the nearest keyframe. Torch-free.

Keyframes k_0 < ... < k_n split a T-frame clip into spans that share their end frames:
  [0, k_0]         'backward'  (only when k_0 > 0): the engine on the time-reversed span, from k_0;
  [k_i, k_{i+1}]   'between'   from both ends where the engine can (else from k_i, the chainer's seam rule);
  [k_n, T-1]       'forward'   (only when k_n < T-1).
Assembly: spans in order, each overwriting the frame it shares with the one before, so a keyframe's own frame
always comes from the span that starts at it (or, for the last keyframe at T-1, the span ending at it)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("backward", "between", "forward")


@dataclass(frozen=True)
class Span:
    """Clip frames [start, stop] (inclusive: both ends are keyframes or clip ends); kind: see the module."""

    start: int
    stop: int
    kind: str

    @property
    def length(self) -> int:
        return self.stop - self.start + 1

    def __str__(self) -> str:
        how = {"backward": f"backward from keyframe {self.stop}", "forward": f"forward from keyframe {self.start}",
               "between": f"between keyframes {self.start} and {self.stop}"}[self.kind]
        return f"frames {self.start}-{self.stop} ({how})"


def plan_spans(num_frames: int, indices: tuple[int, ...]) -> list[Span]:
    """The spans of a clip of num_frames with keyframes at sorted unique `indices` (see the module)."""
    if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= num_frames:
        raise ValueError(f"keyframe indices must be sorted, unique and in 0..{num_frames - 1}; got {indices}.")
    spans = []
    if indices[0] > 0:
        spans.append(Span(0, indices[0], "backward"))
    spans += [Span(a, b, "between") for a, b in zip(indices[:-1], indices[1:])]
    if indices[-1] < num_frames - 1:
        spans.append(Span(indices[-1], num_frames - 1, "forward"))
    if not spans:                                        # one frame, one keyframe
        spans.append(Span(0, 0, "forward"))
    return spans


def keyframe_distance(num_frames: int, indices: tuple[int, ...]) -> list[int]:
    """Per frame: how many frames away the nearest keyframe is (0 on a keyframe)."""
    return [min(abs(t - k) for k in indices) for t in range(num_frames)]


def confidence(num_frames: int, indices: tuple[int, ...]) -> list[float]:
    """Per frame 1 - distance / (T - 1): 1 on a keyframe, 0 at the far end of a clip with one keyframe at
    the other end. The frame with the lowest value is where the next keyframe helps most."""
    scale = max(num_frames - 1, 1)
    return [1.0 - d / scale for d in keyframe_distance(num_frames, indices)]
