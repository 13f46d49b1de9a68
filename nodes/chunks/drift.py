"""Drift control for chained chunks, anchored to the edited first frame, and the drift metrics.

Why chunks drift: with Wan 2.1 every join goes through the VAE. A chunk's conditioning latent frame 0 must
be the encoding of ONE pixel frame alone (the causal VAE encodes pixel frame 0 by itself, then 4 frames per
latent frame with a cache of the previous frames), while the previous chunk's last latent frame encodes its
last 4 generated frames with their causal context. So the tail latent cannot be reused as the next chunk's
first latent: the hand-off frame is decoded once and encoded once as a single frame (the only round trip;
the output never holds the re-decoded copy: overlap frames come from the chunk that generated them first).
Each round trip and each generation nudges colour a little and the error compounds. The controls below
pull every chunk back to fixed anchors BEFORE its last frame is handed off, so corrections carry forward
instead of accumulating:

- background: colour statistics (per-channel mean/std) of the unedited region of every frame matched to the
  same frame of the source clip (the truth for that region);
- edit region: colour statistics of the edit region matched to those of chunk 1 (generated from the user's
  edited first frame; without a mask the whole frame is matched to chunk 1's statistics);
- cross-fade over overlapping frames (overlap > 1): a linear blend from the previous chunk to this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_PIXELS = 16


@dataclass(frozen=True)
class DriftSettings:
    """Each control switchable; strength in 0..1 for the colour matches (1 = full match)."""

    match_background: bool = True
    match_edit: bool = True
    crossfade: bool = True
    strength: float = 1.0

    def __post_init__(self):
        if not 0 <= self.strength <= 1:
            raise ValueError(f"drift strength must be in 0..1; got {self.strength}.")

    @property
    def off(self) -> bool:
        return not (self.match_background or self.match_edit or self.crossfade) or self.strength == 0


NO_DRIFT_CONTROL = DriftSettings(False, False, False)


def weighted_stats(frames: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frames [T, H, W, 3], weight [T, H, W] -> per-frame (mean [T, 3], std [T, 3], weight sum [T])."""
    w = weight.float()
    wsum = w.sum((1, 2))
    denom = wsum.clamp_min(1e-8)[:, None]
    mean = (frames * w[..., None]).sum((1, 2)) / denom
    var = ((frames - mean[:, None, None]) ** 2 * w[..., None]).sum((1, 2)) / denom
    return mean, var.clamp_min(1e-10).sqrt(), wsum


def _transfer(frames: torch.Tensor, weight: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor,
              strength: float) -> torch.Tensor:
    """Move the weighted statistics of each frame to ref (per-frame [T, 3]); only where weight > 0 changes."""
    mean, std, wsum = weighted_stats(frames, weight)
    ok = (wsum >= MIN_PIXELS)[:, None, None, None]
    gain = (ref_std / std).clamp(0.5, 2.0)                    # guard against a degenerate (flat) region
    matched = (frames - mean[:, None, None]) * gain[:, None, None] + ref_mean[:, None, None]
    delta = strength * (matched - frames) * weight[..., None] * ok
    return frames + delta


@dataclass(frozen=True)
class EditAnchor:
    """Colour statistics of the edit region (or whole frame without a mask) in chunk 1: mean [3], std [3]."""

    mean: torch.Tensor
    std: torch.Tensor


def edit_anchor(frames: torch.Tensor, edit_mask: torch.Tensor | None) -> EditAnchor | None:
    """Anchor from chunk 1's output frames [T, H, W, 3] and edit masks [T, H, W] (None = whole frame)."""
    weight = torch.ones(frames.shape[:3]) if edit_mask is None else edit_mask.float()
    mean, std, wsum = weighted_stats(frames, weight)
    good = wsum >= MIN_PIXELS
    if not bool(good.any()):
        return None
    w = wsum[good][:, None]
    return EditAnchor((mean[good] * w).sum(0) / w.sum(), (std[good] * w).sum(0) / w.sum())


def correct_chunk(frames: torch.Tensor, source: torch.Tensor, edit_mask: torch.Tensor | None,
                  anchor: EditAnchor | None, settings: DriftSettings, first_fixed: int = 0) -> torch.Tensor:
    """Colour-correct a generated chunk [L, H, W, 3] against its source slice [L, H, W, 3] (background) and the
    chunk-1 anchor (edit region). edit_mask [L, H, W] 1 = edit, or None (then only the whole-frame anchor
    applies). The first `first_fixed` frames (handed off, already corrected) are returned unchanged."""
    if settings.off or settings.strength == 0:
        return frames
    out = frames.float().clone()
    tail = slice(first_fixed, None)
    x = out[tail]
    if edit_mask is not None:
        m = edit_mask[tail].float().clamp(0, 1)
        if settings.match_background:
            bg = 1 - m
            s_mean, s_std, _ = weighted_stats(source[tail].float(), bg)
            x = _transfer(x, bg, s_mean, s_std, settings.strength)
        if settings.match_edit and anchor is not None:
            x = _transfer(x, m, anchor.mean.expand(len(x), 3), anchor.std.expand(len(x), 3), settings.strength)
    elif settings.match_edit and anchor is not None:
        x = _transfer(x, torch.ones(x.shape[:3]), anchor.mean.expand(len(x), 3), anchor.std.expand(len(x), 3),
                      settings.strength)
    out[tail] = x.clamp(0, 1)
    return out


def crossfade(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Blend the overlapping frames [o, H, W, 3]: frame 0 is all previous (the hand-off), the last is mostly current."""
    o = previous.shape[0]
    w = torch.arange(o, dtype=torch.float32)[:, None, None, None] / o
    return previous * (1 - w) + current * w


# ---- metrics ------------------------------------------------------------------------------------------------


def _frame_steps(frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[T-1] float64: mean |frame_t - frame_{t-1}| (over pixels in either frame's mask > 0.5 when given; NaN where
    that is empty). One frame at a time, so memory does not grow with the clip."""
    out = torch.empty(max(frames.shape[0] - 1, 0), dtype=torch.float64)
    for t in range(1, frames.shape[0]):
        diff = (frames[t].float() - frames[t - 1].float()).abs()
        if mask is None:
            out[t - 1] = diff.mean(dtype=torch.float64)
        else:
            sel = (mask[t] > 0.5) | (mask[t - 1] > 0.5)
            n = int(sel.sum())
            out[t - 1] = diff.mean(-1)[sel].mean(dtype=torch.float64) if n else float("nan")
    return out


def _relative(steps: torch.Tensor, seams: tuple[int, ...]) -> list[float]:
    finite = steps[torch.isfinite(steps)]
    med = max(float(finite.median()), 1e-8) if len(finite) else float("nan")
    return [float(steps[s - 1]) / med for s in seams]


def seam_jumps(frames: torch.Tensor, seams: tuple[int, ...]) -> list[float]:
    """Jump at each seam s: mean |frame_s - frame_{s-1}| relative to the clip's median consecutive difference
    (the definition of nodes/evaluate/metrics.frame_jumps, computed frame by frame; 1 = an ordinary frame step)."""
    return _relative(_frame_steps(frames), seams) if seams else []


def region_seam_jumps(frames: torch.Tensor, mask: torch.Tensor, seams: tuple[int, ...]) -> list[float]:
    """Seam jumps inside the edit region: mean |frame_t - frame_{t-1}| over pixels in either frame's region
    (mask [T, H, W] > 0.5), relative to the median of that quantity over the clip. NaN where the region is empty.
    A small edit hides in the whole-frame jump; this one shows it."""
    return _relative(_frame_steps(frames, mask), seams) if seams else []


def _frame_means(frames: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame weighted mean colour [T, 3] and weight sum [T], one frame at a time."""
    means = torch.empty(frames.shape[0], 3, dtype=torch.float64)
    sums = torch.empty(frames.shape[0], dtype=torch.float64)
    for t in range(frames.shape[0]):
        f = frames[t].float().reshape(-1, 3)
        if weight is None:
            means[t], sums[t] = f.mean(0, dtype=torch.float64), f.shape[0]
        else:
            w = weight[t].float().reshape(-1)
            sums[t] = w.sum(dtype=torch.float64)
            means[t] = (w @ f).double() / max(float(sums[t]), 1e-8)
    return means, sums


def color_drift(output: torch.Tensor, source: torch.Tensor, edit_mask: torch.Tensor | None,
                ranges: list[range]) -> dict[str, list[float]]:
    """Per chunk (ranges of output frames): 'background' = mean over frames of the L2 distance (in 0..255 RGB)
    between the background mean colour of output and source; 'edit' = distance of the edit region's mean
    colour from chunk 1's (without a mask: the whole frame's mean colour vs chunk 1's)."""
    if edit_mask is None:
        o_bg, _ = _frame_means(output, None)
        s_bg, _ = _frame_means(source, None)
        o_ed, w_ed = o_bg, torch.full((output.shape[0],), float(MIN_PIXELS))
        w_bg = w_ed
    else:
        m = edit_mask.float().clamp(0, 1)
        bg = 1 - m
        o_bg, w_bg = _frame_means(output, bg)
        s_bg, _ = _frame_means(source, bg)
        o_ed, w_ed = _frame_means(output, m)
    ok_bg, ok_ed = w_bg >= MIN_PIXELS, w_ed >= MIN_PIXELS
    first = [i for i in ranges[0] if ok_ed[i]]
    ref = o_ed[first].mean(0) if first else None
    bg_drift, edit_drift = [], []
    for r in ranges:
        ib = [i for i in r if ok_bg[i]]
        bg_drift.append(float((o_bg[ib] - s_bg[ib]).norm(dim=1).mean() * 255) if ib else float("nan"))
        ie = [i for i in r if ok_ed[i]]
        edit_drift.append(float((o_ed[ie] - ref).norm(dim=1).mean() * 255) if ie and ref is not None else float("nan"))
    return {"background": bg_drift, "edit": edit_drift}


def format_report(seams: tuple[int, ...], jumps: list[float], drift: dict[str, list[float]], settings: DriftSettings,
                  notes: tuple[str, ...] = (), region_jumps: list[float] | None = None) -> str:
    """Human-readable report: seam jumps and colour drift per chunk."""
    on = [n for n, v in (("background", settings.match_background), ("edit", settings.match_edit),
                         ("crossfade", settings.crossfade)) if v] if not settings.off else []
    lines = [f"drift control: {', '.join(on) if on else 'off'} (strength {settings.strength:g})"]
    for i, (s, j) in enumerate(zip(seams, jumps)):
        extra = f", in the edit region {region_jumps[i]:.2f}" if region_jumps else ""
        lines.append(f"seam at frame {s + 1}: jump {j:.2f} x median frame step{extra}")
    lines.append("colour drift per chunk (mean RGB distance, 0..255): background vs source | edit vs chunk 1")
    for i, (b, e) in enumerate(zip(drift["background"], drift["edit"])):
        lines.append(f"chunk {i + 1}: {b:6.2f} | {e:6.2f}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def finite_max(values: list[float]) -> float:
    arr = np.array(values, dtype=np.float64)
    return float(np.nanmax(arr)) if np.isfinite(arr).any() else float("nan")
