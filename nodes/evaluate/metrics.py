"""Scores for any engine's output (DESIGN.md 4.7): frame-1 fidelity, background preservation, temporal
consistency, edit persistence, seam jumps. Frames: IMAGE [T, H, W, 3] in 0..1; masks [T, H, W], 1 = edit."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from ..flow.dis import DenseFlow, consistent, identity_grid, sample, to_gray
from ..video.frames import check_mask, check_video, to_uint8


def psnr(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """PSNR in dB of a vs b ([..., H, W, 3] in 0..1) over pixels with weight [..., H, W] > 0 (all if None)."""
    se = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(-1)
    mse = se.mean() if weight is None else (se * weight).sum() / max(weight.sum(), 1e-12)
    return math.inf if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Mean grey-level SSIM (Gaussian window, sigma 1.5) of two frames [H, W, 3] over weight [H, W] > 0."""
    x, y = (cv2.cvtColor(v.astype(np.float32), cv2.COLOR_RGB2GRAY).astype(np.float64) for v in (a, b))
    blur = lambda v: cv2.GaussianBlur(v, (11, 11), 1.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(smap.mean() if weight is None else (smap * weight).sum() / max(weight.sum(), 1e-12))


def background_weight(masks: np.ndarray, margin: int) -> np.ndarray:
    """[T, H, W] 1 where a pixel is at least `margin` px away from the edit region (mask > 0.01)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return np.stack([1.0 - cv2.dilate((m > 0.01).astype(np.uint8), kernel) for m in masks]).astype(np.float64)


def warp_error(frames8: np.ndarray, quality: str = "fast") -> float:
    """Flow-warping error: mean |frame_t - frame_{t+1} warped back| (0..1) over forward-backward consistent
    pixels, averaged over t. frames8: uint8 [T, H, W, 3]. Lower = steadier."""
    if len(frames8) < 2:
        return 0.0
    dis, grid = DenseFlow(quality), identity_grid(*frames8.shape[1:3])
    errs = []
    for a, b in zip(frames8[:-1], frames8[1:]):
        ga, gb = to_gray(a), to_gray(b)
        fwd, back = dis.flow(ga, gb), dis.flow(gb, ga)
        ok = consistent(back, fwd)                      # pixels of a that are visible in b
        warped = sample(b.astype(np.float32), grid + fwd)
        diff = np.abs(warped - a.astype(np.float32)).mean(-1) / 255.0
        errs.append(float(diff[ok].mean()) if ok.any() else 0.0)
    return float(np.mean(errs))


def edit_persistence(output: np.ndarray, source: np.ndarray, edited_first: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[T] mean |output - source| inside each frame's edit region, relative to the edit's own strength
    (mean |edited_first - source_0| in frame 0's region): 1 = as strong as the edit, 0 = vanished.
    NaN where a region is empty or the edit changes nothing."""
    ref_mask = masks[0]
    ref = (np.abs(edited_first - source[0]).mean(-1) * ref_mask).sum() / max(ref_mask.sum(), 1e-12)
    diff = np.abs(output - source).mean(-1)
    strength = np.array([(d * m).sum() / m.sum() if m.sum() > 0 else np.nan for d, m in zip(diff, masks)])
    return strength / ref if ref > 0 else np.full_like(strength, np.nan)


def frame_jumps(frames: np.ndarray) -> np.ndarray:
    """[T-1] mean |frame_t - frame_{t-1}| relative to the median of all consecutive differences."""
    d = np.abs(np.diff(frames, axis=0)).mean((1, 2, 3))
    return d / max(float(np.median(d)), 1e-8)


def evaluate(source: torch.Tensor, output: torch.Tensor, edited_first: torch.Tensor, masks: torch.Tensor,
             seams: tuple[int, ...] = (), margin: int = 4) -> dict:
    """All metrics as a flat dict of floats (JSON-ready). masks: [T, H, W] edit regions (or [1, H, W]);
    seams: first frame index of each chunk after the first (chunked outputs); margin: px around the edit
    region left out of the background scores."""
    check_video(source, "source_video")
    check_video(output, "output_video")
    if output.shape != source.shape:
        raise ValueError(f"output video is {tuple(output.shape)} but the source is {tuple(source.shape)} "
                         "([T, H, W, 3]); score the output against the clip it was made from.")
    masks = check_mask(masks.float(), "edit_mask", source).expand(source.shape[:3])
    bad = [s for s in seams if not 0 < s < source.shape[0]]
    if bad:
        raise ValueError(f"seam frames {bad} are outside 1..{source.shape[0] - 1}.")
    src, out = source.numpy().astype(np.float64), output.numpy().astype(np.float64)
    edit = edited_first.reshape(source.shape[1:]).numpy().astype(np.float64)
    m = masks.numpy().astype(np.float64)
    bg = background_weight(m, margin)
    persistence = edit_persistence(out, src, edit, m)
    jumps = frame_jumps(out)
    src_warp = warp_error(to_uint8(source))
    out_warp = warp_error(to_uint8(output))
    return {
        "frames": int(source.shape[0]),
        "frame1_psnr": psnr(out[0], edit),
        "frame1_ssim": ssim(out[0], edit),
        "background_psnr": psnr(out, src, bg),
        "background_ssim": float(np.mean([ssim(o, s, w) for o, s, w in zip(out, src, bg)])),
        "background_fraction": float(bg.mean()),
        "warp_error": out_warp,
        "warp_error_source": src_warp,
        "warp_error_ratio": out_warp / src_warp if src_warp > 0 else math.nan,
        "edit_persistence_mean": float(np.nanmean(persistence)) if np.isfinite(persistence).any() else math.nan,
        "edit_persistence_min": float(np.nanmin(persistence)) if np.isfinite(persistence).any() else math.nan,
        "edit_persistence_last": float(persistence[-1]),
        "max_frame_jump": float(jumps.max()) if len(jumps) else 0.0,
        "seam_jump_max": float(max(jumps[s - 1] for s in seams)) if seams else math.nan,
    }


def format_table(rows: dict[str, dict]) -> str:
    """Metrics of several runs as a fixed-width text table: one row per run."""
    keys = ["frame1_psnr", "background_psnr", "background_ssim", "warp_error_ratio", "edit_persistence_mean",
            "edit_persistence_last", "max_frame_jump"]
    short = ["f1 PSNR", "bg PSNR", "bg SSIM", "warp x src", "persist", "persist@T", "max jump"]
    name_w = max([len("run")] + [len(k) for k in rows])
    lines = ["run".ljust(name_w) + "".join(s.rjust(11) for s in short)]
    for name, r in rows.items():
        lines.append(name.ljust(name_w) + "".join(f"{r[k]:11.3f}" if math.isfinite(r[k]) else f"{'inf' if r[k] > 0 else 'nan':>11}"
                                                 for k in keys))
    return "\n".join(lines)
