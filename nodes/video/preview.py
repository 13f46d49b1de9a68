"""Pictures people would rather look at than read: side-by-side videos and before/after grids."""

from __future__ import annotations

import torch


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """[T, H, W, 3] x 2 -> [T, H, 2W + gap, 3] with a white gap (before | after)."""
    white = torch.ones(left.shape[0], left.shape[1], gap, 3)
    return torch.cat([left, white, right], 2)


def overlay(frames: torch.Tensor, masks: torch.Tensor, color=(1.0, 0.1, 0.6), alpha: float = 0.45) -> torch.Tensor:
    """Tint the mask region: frames [T, H, W, 3], masks [T, H, W] -> [T, H, W, 3]."""
    tint = torch.tensor(color).view(1, 1, 1, 3)
    a = alpha * masks.clamp(0, 1)[..., None]
    return frames * (1 - a) + tint * a


def comparison_grid(source: torch.Tensor, output: torch.Tensor, masks: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """A before/after picture: `rows` evenly spaced frames, each row source | output | mask overlay.
    -> IMAGE [1, H', W', 3]."""
    t = source.shape[0]
    idx = sorted({round(i * (t - 1) / max(rows - 1, 1)) for i in range(rows)})
    masks = masks.expand(source.shape[:3])
    lines = [torch.cat([source[i], output[i], overlay(output[i:i + 1], masks[i:i + 1])[0]], 1) for i in idx]
    gap = torch.ones(4, lines[0].shape[1], 3)
    grid = torch.cat([x for line in lines for x in (line, gap)][:-1], 0)
    return grid[None]
