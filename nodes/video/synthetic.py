"""Synthetic clips with known motion and a known edit: the demo's footage and the tests' ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class SyntheticClip:
    """source/edited: IMAGE [T, H, W, 3] (edited = the ground-truth propagation: the disc recoloured in every
    frame); mask: [T, H, W] the disc; fps."""

    source: torch.Tensor
    edited: torch.Tensor
    mask: torch.Tensor
    fps: float = 12.0


def texture(h: int, w: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth colourful noise [h, w, 3] float32 in 0..1 (trackable, like real surfaces)."""
    noise = rng.random((h, w, 3), dtype=np.float32)
    out = cv2.GaussianBlur(noise, (0, 0), scale) + 0.35 * cv2.GaussianBlur(noise, (0, 0), 1.0)
    lo, hi = out.min((0, 1)), out.max((0, 1))
    return (out - lo) / (hi - lo)


def _paste(frame: np.ndarray, patch: np.ndarray, shape: np.ndarray, x: float, y: float) -> np.ndarray:
    """Place patch [s, s, 3] with alpha shape [s, s] at subpixel top-left (x, y). Returns the coverage [H, W]."""
    h, w = frame.shape[:2]
    m = np.float32([[1, 0, x], [0, 1, y]])
    moved = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(shape, m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    frame *= 1 - alpha
    frame += alpha * moved
    return alpha[..., 0]


def synthetic_clip(num_frames: int = 49, height: int = 288, width: int = 512, seed: int = 0) -> SyntheticClip:
    """A panning textured background with a moving textured disc (the edited object) and a moving square
    that passes in front of it (an occluder; about frame 34). Speeds are per frame, so short clips show
    the start of the 49-frame motion. The edit recolours the disc."""
    rng = np.random.default_rng(seed)
    pan = np.array([1.1, 0.35])                                   # background px / frame
    margin = int(np.ceil(np.abs(pan).max() * num_frames)) + 2
    bg = texture(height + 2 * margin, width + 2 * margin, rng, 3.0)
    s = height // 3
    disc_tex = texture(s, s, rng, 2.0) * 0.8 + 0.1
    disc_edit = np.ascontiguousarray(disc_tex[..., ::-1]) * 0.5 + np.array([0.5, 0.0, 0.1], np.float32)
    yy, xx = np.mgrid[:s, :s]
    disc = ((xx - s / 2 + 0.5) ** 2 + (yy - s / 2 + 0.5) ** 2 <= (s / 2 - 1) ** 2).astype(np.float32)
    disc = cv2.GaussianBlur(disc, (3, 3), 0)
    q = s * 2 // 3
    square_tex = texture(q, q, rng, 1.5)
    square = np.ones((q, q), np.float32)
    src, edt, msk = [], [], []
    for t in range(num_frames):
        ox, oy = margin + pan[0] * t, margin + pan[1] * t
        m = np.float32([[1, 0, -ox], [0, 1, -oy]])
        base = cv2.warpAffine(bg, m, (width, height), flags=cv2.INTER_LINEAR)
        frames = [base.copy(), base.copy()]
        dx = width * 0.15 + t * (width * 0.45 / 48)
        dy = height * 0.3 + height * 0.12 * np.sin(t / 6)
        for frame, tex in zip(frames, (disc_tex, disc_edit)):
            cover = _paste(frame, tex, disc, dx, dy)
        sx = width * 0.85 - t * (width * 0.5 / 48)
        for frame in frames:
            hidden = _paste(frame, square_tex, square, sx, height * 0.45)
        src.append(frames[0])
        edt.append(frames[1])
        msk.append(cover * (1 - hidden))
    as_t = lambda a: torch.from_numpy(np.clip(np.stack(a), 0, 1).astype(np.float32))  # noqa: E731
    return SyntheticClip(as_t(src), as_t(edt), as_t(msk))
