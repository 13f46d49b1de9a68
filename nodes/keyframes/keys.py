"""A set of edited keyframes checked against their clip: indices in range and unique, frames fitted to the clip's
size (the policy of the first-frame edit), edits inside the edit mask. Torch-only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..common import log
from ..video.frames import check_mask, check_video, fit_to_frame

OUTSIDE_TOLERANCE = 0.1
OUTSIDE_MARGIN = 3
OUTSIDE_MIN_PX = 16
"""Largest share of a keyframe's changed pixels that may lie more than OUTSIDE_MARGIN px outside the edit mask
(compression noise, soft edges, a tight box); more means the mask and the edit disagree, and the part outside
would be dropped. Fewer than OUTSIDE_MIN_PX such pixels are only noted, whatever their share (the soft fringe of
a small edit: 3 of 26 px on a 64x64 world scene)."""


@dataclass(frozen=True)
class Keyframes:
    """indices: increasing frame numbers (0-based); frames [K, H, W, 3] fitted to the clip; edited[k]: whether
    keyframe k differs from its source frame at all (False: an anchor that says "this frame stays as it is");
    notes: what was fixed on the way (fits); threshold: the colour difference that counted as edited."""

    indices: tuple[int, ...]
    frames: Tensor
    edited: tuple[bool, ...]
    notes: tuple[str, ...] = ()
    threshold: float = 0.08

    def __len__(self) -> int:
        return len(self.indices)

    def frame(self, index: int) -> Tensor:
        """The keyframe at clip frame `index` [H, W, 3]."""
        return self.frames[self.indices.index(index)]


def parse_indices(text: str) -> list[int]:
    """'0, 24,48' -> [0, 24, 48] (0-based frame numbers as typed in the node); ValueError on anything else."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"frame_indices must be whole numbers separated by commas, e.g. '0, 48'; got '{text}'.") from None


def changed_pixels(source_frame: Tensor, keyframe: Tensor, threshold: float) -> Tensor:
    """[H, W] bool: where the keyframe differs from its source frame by more than threshold (max channel)."""
    return (keyframe.float() - source_frame.float()).abs().amax(-1) > threshold


def _grow(region: Tensor, px: int) -> Tensor:
    """[H, W] bool dilated by px (square)."""
    return torch.nn.functional.max_pool2d(region[None, None].float(), 2 * px + 1, 1, px)[0, 0] > 0


def make_keyframes(source: Tensor, frames: Sequence[Tensor], indices: Sequence[int], size_policy: str = "auto",
                   edit_mask: Optional[Tensor] = None, threshold: float = 0.08) -> Keyframes:
    """Check edited keyframes against the clip and fit them to it.

    source [T, H, W, 3]; frames: one [H', W', 3] / [1, H', W', 3] per index (any size: fitted by size_policy as
    the edited first frame is); indices: 0-based, any order (sorted here). edit_mask None, [1, H, W] (the region
    at every keyframe) or [T, H, W]: a keyframe whose changed pixels lie outside it beyond OUTSIDE_TOLERANCE is an
    error (they would be dropped). Raises ValueError with the numbers and what to do."""
    check_video(source, "source_video")
    t_len, h, w = source.shape[:3]
    indices = [int(i) for i in indices]
    if len(frames) != len(indices):
        raise ValueError(f"got {len(frames)} keyframe image(s) for {len(indices)} frame index(es) {indices}; give one "
                         "index per keyframe image (a batch of N images needs N indices).")
    if not indices:
        raise ValueError("no keyframes: connect at least one edited frame (e.g. the edited frame 1 at index 0).")
    bad = [i for i in indices if not 0 <= i < t_len]
    if bad:
        raise ValueError(f"keyframe index(es) {bad} are outside the clip, which has {t_len} frames (0..{t_len - 1}, "
                         "0-based: frame 1 is index 0). Fix the indices or load the whole clip.")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"keyframe index(es) {repeated} are given more than once; keep one edit per frame (drop or "
                         "merge the duplicates).")
    mask = None if edit_mask is None else check_mask(edit_mask.float(), "edit_mask", source)
    order = sorted(range(len(indices)), key=lambda j: indices[j])
    fitted, edited, notes = [], [], []
    for j in order:
        k = indices[j]
        frame, note = fit_to_frame(frames[j].float().cpu(), h, w, size_policy)
        if note:
            notes.append(f"keyframe {k}: {note}")
        changed = changed_pixels(source[k], frame, threshold)
        notes += _outside_mask(k, changed, mask)
        fitted.append(frame)
        edited.append(bool(changed.any()))
    for n in notes:
        log.info("FFP keyframes: %s", n)
    return Keyframes(tuple(indices[j] for j in order), torch.stack(fitted), tuple(edited), tuple(notes), threshold)


def _outside_mask(k: int, changed: Tensor, mask: Optional[Tensor]) -> list[str]:
    """ValueError when more than OUTSIDE_TOLERANCE of keyframe k's changed pixels [H, W] lie outside the mask
    [1 or T, H, W] (grown by OUTSIDE_MARGIN); else the note on what is ignored (if anything)."""
    if mask is None or not changed.any():
        return []
    region = _grow(mask[k if mask.shape[0] > 1 else 0] > 0, OUTSIDE_MARGIN)
    outside = changed & ~region
    share = float(outside.sum()) / float(changed.sum())
    if share > OUTSIDE_TOLERANCE and int(outside.sum()) >= OUTSIDE_MIN_PX:
        raise ValueError(
            f"keyframe {k} changes {int(changed.sum())} px, {share:.0%} of them ({int(outside.sum())} px) "
            f"more than {OUTSIDE_MARGIN} px outside the edit mask{' of that frame' if mask.shape[0] > 1 else ''}: "
            "that part of the edit would be dropped. Grow or redraw the mask so it covers the edit, or leave "
            "edit_mask unconnected to derive the region from each keyframe.")
    if outside.any():
        return [f"keyframe {k}: {int(outside.sum())} changed px outside the edit mask ({share:.1%}) are ignored"]
    return []


def check_against_mask(source: Tensor, keys: Keyframes, mask: Tensor) -> list[str]:
    """The edit-mask check of make_keyframes for keyframes made without that mask (e.g. the mask is connected to
    the propagate node only): ValueError as there; returns the notes. source [T, H, W, 3], mask [1 or T, H, W]."""
    notes = []
    for k, frame in zip(keys.indices, keys.frames):
        notes += _outside_mask(k, changed_pixels(source[k], frame, keys.threshold), mask)
    return notes
