"""File to file in bounded memory: decode -> flow engine -> encode, one frame at a time.

Holds a few frames (the decoder's, the tracker's look-ahead, frame 1 and its edit), whatever the clip's
length; layer mode decodes the file twice (nodes/flow/layer.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..common import OnStep, ShouldStop, log
from ..video.frames import from_uint8
from ..video.io import VideoReader, VideoWriter
from .engine import Carried, FlowSettings, prepare, run_carry

ESTIMATE_AFTER = 8        # frames timed before a long clip's time estimate is logged
LONG_CLIP = 500           # frames: clips this long get a time estimate


@dataclass(frozen=True)
class StreamResult:
    """frames written, fps, notes (fitted edit, derived mask, mode, resized frames), wall seconds."""

    frames: int
    fps: float
    notes: tuple[str, ...]
    seconds: float


def _composite_u8(frame: np.ndarray, carried: Carried) -> np.ndarray:
    """uint8 [H, W, 3]: frame with the carried edit composited inside its box (untouched elsewhere)."""
    if carried.box is None:
        return frame
    out = frame.copy()
    y0, y1, x0, x1 = carried.box
    s = frame[y0:y1, x0:x1].astype(np.float32) * np.float32(1 / 255)
    r = carried.region[y0:y1, x0:x1, None]
    out[y0:y1, x0:x1] = np.clip((s + r * (carried.content - s)) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def propagate_file(video: str | os.PathLike, edited_first: torch.Tensor, output: str | os.PathLike,
                   edit_mask: torch.Tensor | None = None, settings: FlowSettings = FlowSettings(),
                   size_policy: str = "auto", mask_out: str | os.PathLike | None = None,
                   max_frames: int | None = None, crf: int = 17, keep_audio: bool = True,
                   on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> StreamResult:
    """Carry edited_first (IMAGE [H', W', 3], fitted by size_policy) through the video file `video` into
    `output` (mp4/mov/mkv/webm, written atomically, the source's audio kept), frame by frame.

    edit_mask: None (derived), MASK [1, H, W] or [T, H, W]; mask_out: also write the edit region as a video.
    on_step(i, total): total is the container's frame count (0 when unknown). Memory does not grow with the
    clip; a clip over LONG_CLIP frames logs a time estimate after ESTIMATE_AFTER frames."""
    t0 = time.perf_counter()
    reader = VideoReader(video, max_frames)
    first = next(iter(reader), None)
    if first is None:
        raise ValueError(f"video '{video}' has no decodable frames.")
    h, w = first.shape[:2]
    total = reader.frames
    if edit_mask is not None and edit_mask.ndim == 3 and edit_mask.shape[0] > 1 and total \
            and edit_mask.shape[0] < total:
        raise ValueError(f"edit_mask has {edit_mask.shape[0]} frames but the video has {total}; give one mask "
                         "for frame 1 or one per frame.")
    t_mask = edit_mask.shape[0] if edit_mask is not None and edit_mask.ndim == 3 else 1
    plan, masks, notes = prepare(from_uint8(first), (max(t_mask, 1), h, w), edited_first,
                                 edit_mask if t_mask <= 1 or edit_mask is None else edit_mask[:t_mask],
                                 settings, size_policy)
    for note in notes:
        log.info("FFP flow: %s", note)
    audio = video if keep_audio else None
    count, writers = 0, None

    def open_writers() -> tuple[contextlib.ExitStack, VideoWriter, VideoWriter | None]:
        stack = contextlib.ExitStack()
        out = stack.enter_context(VideoWriter(output, reader.fps, (h, w), crf, audio))
        mout = stack.enter_context(VideoWriter(mask_out, reader.fps, (h, w), crf)) if mask_out else None
        return stack, out, mout

    def sink(t: int, frame: np.ndarray, carried: Carried) -> None:
        nonlocal count, writers
        if t == 0:                                   # the first pass, or auto mode's restart in layer mode
            if writers is not None:
                writers[0].__exit__(_Restart, _Restart(), None)     # the partial files are discarded
            writers = open_writers()
        _, out, mout = writers
        out.write(_composite_u8(frame, carried))
        if mout is not None:
            m = (np.clip(carried.region, 0, 1) * 255 + 0.5).astype(np.uint8)
            mout.write(np.repeat(m[..., None], 3, -1))
        count = t + 1
        if count == ESTIMATE_AFTER and total > LONG_CLIP:
            rate = (time.perf_counter() - t0) / count
            log.warning("FFP flow: %d frames at %.2f s per frame: about %.0f min in all (memory stays "
                        "flat)", total, rate, rate * total / 60)
    try:
        run_carry(lambda: iter(reader), plan, settings, masks, sink, total or None, should_stop,
                  None if on_step is None else (lambda i, n: on_step(i, total, None)))
    except BaseException:
        if writers is not None:
            writers[0].__exit__(*sys.exc_info())
        raise
    writers[0].__exit__(None, None, None)
    notes = list(plan.notes) + list(reader.notes)
    for note in reader.notes:
        log.info("FFP flow: %s", note)
    return StreamResult(count, reader.fps, tuple(notes), time.perf_counter() - t0)


class _Restart(Exception):
    """Closes the writers of a pass that auto mode restarts (their files are discarded)."""
