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

from ..video.metrics import frame_jumps

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


def seam_jumps(frames: torch.Tensor, seams: tuple[int, ...]) -> list[float]:
    """Jump at each seam s: mean |frame_s - frame_{s-1}| relative to the clip's median consecutive difference
    (nodes/video/metrics.frame_jumps; 1 = an ordinary frame step)."""
    if not seams:
        return []
    jumps = frame_jumps(frames.float().numpy())
    return [float(jumps[s - 1]) for s in seams]


def region_seam_jumps(frames: torch.Tensor, mask: torch.Tensor, seams: tuple[int, ...]) -> list[float]:
    """Seam jumps inside the edit region: mean |frame_t - frame_{t-1}| over pixels in either frame's region
    (mask [T, H, W] > 0.5), relative to the median of that quantity over the clip. NaN where the region is empty.
    A small edit hides in the whole-frame jump; this one shows it."""
    if not seams:
        return []
    m = mask.float() > 0.5
    both = m[1:] | m[:-1]
    diff = (frames[1:].float() - frames[:-1].float()).abs().mean(-1)
    count = both.sum((1, 2))
    d = torch.where(count > 0, (diff * both).sum((1, 2)) / count.clamp_min(1), torch.full_like(count, float("nan"),
                                                                                                 dtype=diff.dtype))
    finite = d[torch.isfinite(d)]
    med = float(finite.median()) if len(finite) else float("nan")
    return [float(d[s - 1]) / max(med, 1e-8) for s in seams]


def color_drift(output: torch.Tensor, source: torch.Tensor, edit_mask: torch.Tensor | None,
                ranges: list[range]) -> dict[str, list[float]]:
    """Per chunk (ranges of output frames): 'background' = mean over frames of the L2 distance (in 0..255 RGB)
    between the background mean colour of output and source; 'edit' = distance of the edit region's mean
    colour from chunk 1's (without a mask: the whole frame's mean colour vs chunk 1's)."""
    bg_drift, edit_drift = [], []
    if edit_mask is None:
        mean, _, _ = weighted_stats(output.float(), torch.ones(output.shape[:3]))
        ref = mean[ranges[0].start:ranges[0].stop].mean(0)
        for r in ranges:
            src_mean, _, _ = weighted_stats(source[r.start:r.stop].float(), torch.ones((len(r),) + output.shape[1:3]))
            bg_drift.append(float(((mean[r.start:r.stop] - src_mean).norm(dim=1) * 255).mean()))
            edit_drift.append(float((mean[r.start:r.stop] - ref).norm(dim=1).mean() * 255))
        return {"background": bg_drift, "edit": edit_drift}
    m = edit_mask.float()
    o_bg, _, w_bg = weighted_stats(output.float(), 1 - m)
    s_bg, _, _ = weighted_stats(source.float(), 1 - m)
    o_ed, _, w_ed = weighted_stats(output.float(), m)
    ok_bg, ok_ed = w_bg >= MIN_PIXELS, w_ed >= MIN_PIXELS
    first = [i for i in ranges[0] if ok_ed[i]]
    ref = o_ed[first].mean(0) if first else None
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
