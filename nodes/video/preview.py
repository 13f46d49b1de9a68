"""Pictures people would rather look at than read: side-by-side videos and before/after grids."""

from __future__ import annotations

import cv2
import numpy as np
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


def caption(texts: list[str], width: int, height: int) -> torch.Tensor:
    """A white strip [height, len(texts) * width, 3] with texts[i] in black at the left of column i."""
    strip = np.full((height, len(texts) * width, 3), 255, np.uint8)
    scale = height / 34
    for i, text in enumerate(texts):
        cv2.putText(strip, text, (i * width + height // 3, round(height * 0.72)), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (0, 0, 0), max(1, round(scale * 1.5)), cv2.LINE_AA)
    return torch.from_numpy(strip).float() / 255.0


COLUMNS = ("source", "output", "edit region (tinted)")


def comparison_grid(source: torch.Tensor, output: torch.Tensor, masks: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """A before/after picture: `rows` evenly spaced frames, each row source | output | output with the mask
    region tinted, under a caption naming the column and the frame (1-based). -> IMAGE [1, H', W', 3]."""
    t, h, w = source.shape[:3]
    idx = sorted({round(i * (t - 1) / max(rows - 1, 1)) for i in range(rows)})
    masks = masks.expand(source.shape[:3])
    label_h = max(16, h // 14)
    lines = []
    for i in idx:
        lines.append(caption([f"{name}, frame {i + 1}/{t}" for name in COLUMNS], w, label_h))
        lines.append(torch.cat([source[i], output[i], overlay(output[i:i + 1], masks[i:i + 1])[0]], 1))
    return torch.cat(lines, 0)[None]
