"""Scores for any engine's output (DESIGN.md 4.7): frame-1 fidelity, background preservation, temporal
consistency, edit persistence, seam jumps. Frames: IMAGE [T, H, W, 3] in 0..1; masks [T, H, W], 1 = edit.

Streamed: one frame at a time in float32 (float64 only for the running sums), so the memory it adds to its
inputs does not grow with clip length. The source's own flow-warping error is cached per source clip, so
scoring several outputs of one source computes the source's flow once. The report is strict JSON: a score
that has no finite value is null, and `notes` says why."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Iterable

import cv2
import numpy as np
import torch

from ..common import OnStep, ShouldStop, report
from ..flow.dis import DenseFlow, consistent, identity_grid, sample, to_gray
from ..video.frames import check_mask, check_video, to_uint8

WARP_QUALITY = "fast"

# What each column of format_table means, printed under the table (and the README's definitions).
LEGEND = {
    "f1 PSNR": "frame 1 of the output vs your edited frame, dB (higher = closer; '-' = identical)",
    "bg PSNR": "outside the edit region (and `margin` px around it) vs the source, dB, all frames",
    "bg SSIM": "structural similarity there, mean over frames (1 = unchanged)",
    "warp x src": "flicker: the output's flow-warping error / the source's (1 = as steady as the source, "
                  "above 1 = more flicker)",
    "persist": "edit strength in each frame's edit region relative to frame 1's, mean over frames (1 = as "
               "strong as your edit, 0 = faded out; above 1 = the output differs from the source there more "
               "than your edit did)",
    "persist@T": "the same in the last frame",
    "max jump": "largest frame-to-frame change / the clip's median change (1 = an ordinary step; a pop or a "
                "chunk seam shows as several times that)",
}
COLUMNS = {"f1 PSNR": "frame1_psnr", "bg PSNR": "background_psnr", "bg SSIM": "background_ssim",
           "warp x src": "warp_error_ratio", "persist": "edit_persistence_mean",
           "persist@T": "edit_persistence_last", "max jump": "max_frame_jump"}


def psnr(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """PSNR in dB of a vs b ([..., H, W, 3] in 0..1) over pixels with weight [..., H, W] > 0 (all if None).
    inf when they are identical there."""
    se, total = _squared_error(a, b, weight)
    mse = se / max(total, 1e-12)
    return math.inf if mse == 0 else float(10 * np.log10(1.0 / mse))


_MEAN_RGB = np.full((1, 3), 1 / 3, np.float32)


def _rgb_mean(x: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] -> [H, W]: the mean over the colour channels."""
    return cv2.transform(x, _MEAN_RGB)


def _total(x: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Sum of float32 [H, W] (times weight [H, W], any real or bool dtype), accumulated in float64."""
    x = np.asarray(x, np.float32)
    return cv2.sumElems(x if weight is None else cv2.multiply(x, np.asarray(weight, np.float32)))[0]


def _squared_error(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None) -> tuple[float, float]:
    """(sum of weighted per-pixel mean squared RGB error, sum of weights): float32 maths, float64 sums.
    a, b: [H, W, 3] (or [T, H, W, 3], one frame at a time); weight: [H, W] (or [T, H, W])."""
    if a.ndim == 4:
        parts = zip(*(_squared_error(x, y, w) for x, y, w in zip(a, b, [None] * len(a) if weight is None else weight)))
        return tuple(map(sum, parts))
    d = cv2.subtract(np.asarray(a, np.float32), np.asarray(b, np.float32))
    se = _rgb_mean(cv2.multiply(d, d))
    return _total(se, weight), float(se.size) if weight is None else _total(weight)


def ssim(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Mean grey-level SSIM (Gaussian window, sigma 1.5) of two frames [H, W, 3] over weight [H, W] > 0.
    The local statistics are taken around the frame's mean grey level, so float32 loses nothing to
    cancellation. NaN when the weight is empty."""
    x, y = (cv2.cvtColor(np.asarray(v, np.float32), cv2.COLOR_RGB2GRAY) for v in (a, b))
    shift = np.float32(0.5 * (x.mean() + y.mean()))
    blur = lambda v: cv2.GaussianBlur(v, (11, 11), 1.5)  # noqa: E731
    xs, ys = x - shift, y - shift
    mxs, mys = blur(xs), blur(ys)
    vx, vy, cxy = blur(xs * xs) - mxs * mxs, blur(ys * ys) - mys * mys, blur(xs * ys) - mxs * mys
    mx, my = mxs + shift, mys + shift
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if weight is None:
        return float(smap.mean(dtype=np.float64))
    total = float(weight.sum(dtype=np.float64))
    return float((smap * weight).sum(dtype=np.float64) / total) if total > 0 else math.nan


def background_weight(mask: np.ndarray, margin: int) -> np.ndarray:
    """One frame's mask [H, W] -> float32 [H, W]: 1 where a pixel is at least `margin` px away from the edit
    region (mask > 0.01)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return 1.0 - cv2.dilate((mask > 0.01).astype(np.uint8), kernel).astype(np.float32)


def frame_step(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| over the pixels and channels of two float frames [H, W, 3] (float64 sum)."""
    return _total(_rgb_mean(cv2.absdiff(np.asarray(a, np.float32), np.asarray(b, np.float32)))) / (a.size // 3)


def relative_jumps(steps: list[float] | np.ndarray) -> np.ndarray:
    """Frame steps relative to their median (1 = an ordinary step)."""
    steps = np.asarray(steps, np.float64)
    return steps / max(float(np.median(steps)), 1e-8) if len(steps) else steps


def frame_jumps(frames: np.ndarray) -> np.ndarray:
    """[T-1] mean |frame_t - frame_{t-1}| of frames [T, H, W, 3] relative to the median of all consecutive steps."""
    return relative_jumps([frame_step(b, a) for a, b in zip(frames[:-1], frames[1:])])


class WarpError:
    """Flow-warping error, fed one uint8 frame [H, W, 3] at a time: per consecutive pair, the mean |frame_t -
    frame_{t+1} warped back| (0..1) over forward-backward consistent pixels. `pairs` holds one value per
    pair; their mean is the clip's warp error. Lower = steadier."""

    def __init__(self, quality: str = WARP_QUALITY):
        self.dis, self.grid, self.prev, self.pairs = DenseFlow(quality), None, None, []

    def add(self, frame8: np.ndarray) -> None:
        gray = to_gray(frame8)
        if self.prev is not None:
            a, ga = self.prev
            fwd, back = self.dis.flow(ga, gray), self.dis.flow(gray, ga)
            ok = consistent(back, fwd)                          # pixels of a that are visible in b
            warped = sample(frame8.astype(np.float32), self.grid + fwd)
            diff = _rgb_mean(cv2.absdiff(warped, a.astype(np.float32)))
            self.pairs.append(cv2.mean(diff, ok.view(np.uint8))[0] / 255.0 if ok.any() else 0.0)
        elif self.grid is None:
            self.grid = identity_grid(*frame8.shape[:2])
        self.prev = (frame8, gray)

    @property
    def value(self) -> float:
        return float(np.mean(self.pairs)) if self.pairs else 0.0


_SOURCE_WARP: OrderedDict[str, tuple[float, ...]] = OrderedDict()   # source digest -> per-pair warp errors
_SOURCE_WARP_KEEP = 4


def _digest(frames: Iterable[torch.Tensor]) -> str:
    """A clip's identity for the source cache: hash of its frames' bytes (and the flow preset)."""
    h = hashlib.blake2b(WARP_QUALITY.encode(), digest_size=16)
    for f in frames:
        h.update(np.ascontiguousarray(f.float().numpy()).data)
    return h.hexdigest()


def _finite(x: torch.Tensor) -> bool:
    """All of x finite: its float64 sum cannot overflow, and any inf/NaN in x makes it non-finite."""
    return math.isfinite(float(x.float().numpy().sum(dtype=np.float64)))


def _check_masks(masks: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """check_mask against the source, frame by frame -> [T, H, W] (a view: one mask is expanded)."""
    masks = masks[None] if masks.ndim == 2 else masks
    check_mask(masks[:1], "edit_mask", source)
    if masks.shape[0] not in (1, source.shape[0]):
        check_mask(masks, "edit_mask", source)                # raises the frame-count error
    if not all(_finite(m) for m in masks):
        raise ValueError("edit_mask has NaN/inf values.")
    return masks.expand(source.shape[:3])


def evaluate(source: torch.Tensor, output: torch.Tensor, edited_first: torch.Tensor, masks: torch.Tensor,
             seams: tuple[int, ...] = (), margin: int = 4, on_step: OnStep | None = None,
             should_stop: ShouldStop | None = None) -> dict:
    """All metrics as a flat JSON-ready dict (README "Evaluation" defines each). masks: [T, H, W] edit
    regions (or [1, H, W]); seams: first frame index of each chunk after the first (chunked outputs);
    margin: px around the edit region left out of the background scores. Scores without a finite value are
    None, with the reason under "notes". on_step(t, T) after each frame."""
    check_video(source, "source_video")
    check_video(output, "output_video")
    if output.shape != source.shape:
        raise ValueError(f"output video is {tuple(output.shape)} but the source is {tuple(source.shape)} "
                         "([T, H, W, 3]); score the output against the clip it was made from.")
    masks = _check_masks(masks, source)
    t_len = source.shape[0]
    bad = [s for s in seams if not 0 < s < t_len]
    if bad:
        raise ValueError(f"seam frames {bad} are outside 1..{t_len - 1}.")
    key = _digest(source)
    cached = _SOURCE_WARP.get(key)
    src_warp = None if cached is not None else WarpError()
    out_warp = WarpError()
    edit = np.ascontiguousarray(edited_first.reshape(source.shape[1:]).float().numpy())
    frame = lambda video, t: np.ascontiguousarray(video[t].float().numpy())  # noqa: E731
    ref_mask = frame(masks, 0)
    ref = _total(_rgb_mean(cv2.absdiff(edit, frame(source, 0))), ref_mask) / max(_total(ref_mask), 1e-12)
    bg_se = bg_total = bg_pixels = 0.0
    bg_ssim, strength, steps = [], [], []
    prev = None
    for t in range(t_len):
        src, out, m = frame(source, t), frame(output, t), frame(masks, t)
        bg = background_weight(m, margin)
        se, total = _squared_error(out, src, bg)
        bg_se, bg_total, bg_pixels = bg_se + se, bg_total + total, bg_pixels + bg.size
        if total > 0:
            bg_ssim.append(ssim(out, src, bg))
        area = _total(m)
        strength.append(_total(_rgb_mean(cv2.absdiff(out, src)), m) / area if area > 0 else math.nan)
        if prev is not None:
            steps.append(frame_step(out, prev))
        prev = out
        out_warp.add(to_uint8(output[t]))
        if src_warp is not None:
            src_warp.add(to_uint8(source[t]))
        report(on_step, should_stop, t + 1, t_len)
    if src_warp is not None:
        cached = _SOURCE_WARP[key] = tuple(src_warp.pairs)
        while len(_SOURCE_WARP) > _SOURCE_WARP_KEEP:
            _SOURCE_WARP.popitem(last=False)
    _SOURCE_WARP.move_to_end(key)
    source_warp = float(np.mean(cached)) if cached else 0.0
    persistence = np.array(strength) / ref if ref > 0 else np.full(t_len, math.nan)
    jumps = relative_jumps(steps)
    finite = np.isfinite(persistence).any()
    raw = {
        "frames": t_len,
        "frame1_psnr": psnr(output[0].numpy(), edit),
        "frame1_ssim": ssim(output[0].numpy(), edit),
        "background_psnr": (math.inf if bg_se == 0 else float(10 * np.log10(bg_total / bg_se)))
        if bg_total > 0 else math.nan,
        "background_ssim": float(np.mean(bg_ssim)) if bg_ssim else math.nan,
        "background_fraction": bg_total / bg_pixels,
        "warp_error": out_warp.value,
        "warp_error_source": source_warp,
        "warp_error_ratio": out_warp.value / source_warp if source_warp > 0 else math.nan,
        "edit_persistence_mean": float(np.nanmean(persistence)) if finite else math.nan,
        "edit_persistence_min": float(np.nanmin(persistence)) if finite else math.nan,
        "edit_persistence_last": float(persistence[-1]),
        "max_frame_jump": float(jumps.max()) if len(jumps) else 0.0,
        "seam_jump_max": float(max(jumps[s - 1] for s in seams)) if seams else math.nan,
    }
    return json_ready(raw, _reasons(ref, strength, bg_total))


def _reasons(ref: float, strength: list[float], bg_total: float) -> dict[str, str]:
    """Why each score that can be non-finite has no value, in the words `notes` carries."""
    identical = "identical: no pixel differs, so PSNR is unbounded (reported as null)"
    no_bg = "no background pixels: the edit region plus the margin covers every frame"
    no_edit = ("the edit changes nothing inside frame 1's edit region" if ref <= 0 else
               "the edit region is empty in every frame")
    return {
        "frame1_psnr": identical,
        "background_psnr": identical if bg_total > 0 else no_bg,
        "background_ssim": no_bg,
        "warp_error_ratio": "the source has no measurable warp error (static or single-frame clip)",
        "edit_persistence_mean": no_edit,
        "edit_persistence_min": no_edit,
        "edit_persistence_last": no_edit if ref <= 0 or not any(map(math.isfinite, strength))
        else "the edit region is empty in the last frame",
        "seam_jump_max": "no seam frames given (a single-chunk output)",
    }


def json_ready(metrics: dict, reasons: dict[str, str] | None = None) -> dict:
    """metrics with every inf/NaN float replaced by None (strict JSON: JSON.parse rejects Infinity/NaN) and a
    "notes" entry {key: why it is null} for each; reasons gives the words (default: "not finite (value)").
    Nested dicts (and lists of them) are made ready the same way, each with its own notes."""
    out, notes = {}, dict(metrics.get("notes") or {})
    for k, v in metrics.items():
        if k == "notes":
            continue
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            notes[k] = (reasons or {}).get(k) or f"not finite ({v})"
        elif isinstance(v, dict):
            out[k] = json_ready(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [json_ready(x) if isinstance(x, dict) else None if isinstance(x, float) and not math.isfinite(x)
                      else x for x in v]
        else:
            out[k] = v
    if notes:
        out["notes"] = notes
    return out


def format_table(rows: dict[str, dict], legend: bool = True) -> str:
    """Metrics of several runs as a fixed-width text table (one row per run), with the meaning of every
    column under it; '-' marks a null score (see the report's notes)."""
    name_w = max([len("run")] + [len(k) for k in rows])
    lines = ["run".ljust(name_w) + "".join(s.rjust(11) for s in COLUMNS)]
    for name, r in rows.items():
        cells = [r.get(k) for k in COLUMNS.values()]
        lines.append(name.ljust(name_w) + "".join(
            f"{v:11.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>11}" for v in cells))
    if legend:
        lines += [""] + [f"  {s:<10}  {text}" for s, text in LEGEND.items()]
    return "\n".join(lines)
