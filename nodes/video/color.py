"""Colour-statistics matching: pull a frame's per-channel statistics towards a reference's."""

from __future__ import annotations

import torch


def match_color(frames: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None,
                strength: float = 1.0) -> torch.Tensor:
    """Match per-channel mean and std of each frame to the reference (Reinhard transfer in RGB).

    frames: [T, H, W, 3]; reference: [H, W, 3]; mask: [T, H, W] or [H, W] weights (1 = use for statistics,
    e.g. unedited background) applied to both. strength 0 returns frames unchanged. Output clipped to 0..1."""
    if strength == 0:
        return frames
    w = torch.ones(frames.shape[:3]) if mask is None else mask.expand(frames.shape[:3]).float()
    w_ref = w[0] if mask is None or mask.ndim == 2 or mask.shape[0] == 1 else w.mean(0)
    if w.flatten(1).sum(1).min() < 16 or w_ref.sum() < 16:
        raise ValueError("colour matching needs at least 16 pixels inside the statistics mask; the mask is "
                         "(almost) empty. Invert it or leave it unconnected.")

    def stats(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wsum = weight.sum((-2, -1))[..., None]                       # [..., 1]
        mean = (x * weight[..., None]).sum((-3, -2)) / wsum          # [..., 3]
        var = ((x - mean[..., None, None, :]) ** 2 * weight[..., None]).sum((-3, -2)) / wsum
        return mean, var.clamp_min(1e-8).sqrt()

    mean, std = stats(frames.float(), w)
    ref_mean, ref_std = stats(reference.float()[None], w_ref[None])
    matched = (frames - mean[:, None, None]) / std[:, None, None] * ref_std[:, None, None] + ref_mean[:, None, None]
    return (frames + strength * (matched - frames)).clamp(0, 1)
