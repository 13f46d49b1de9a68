"""Carry a first-frame edit through a clip with chained optical flow.

For every frame t we track where each pixel came from in frame 0 (backward flow t -> t-1 composed down the
chain, forward-backward checks marking occlusions, optionally re-anchored to frame 0 by a direct flow
seeded with the chain), then carry the edit along that map and composite: pixels outside the propagated
edit region are bit-identical to the source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch

from ..common import OnStep, ShouldStop, log, report
from ..video.frames import check_mask, check_video, fit_to_frame, to_uint8
from .dis import DenseFlow, identity_grid, inside, sample, to_gray

MODES = ("delta", "pixels")


@dataclass(frozen=True)
class FlowSettings:
    """mode 'delta' adds the edit's change to each source frame (keeps the source's lighting);
    'pixels' pastes the warped edited pixels. quality: DIS preset. mask_threshold: colour difference
    (0..1) that counts as edited when no mask is given. mask_grow/feather: pixels. anchor_refine: re-anchor
    each frame's track to frame 0 with a direct flow (less drift on long clips)."""

    mode: str = "delta"
    quality: str = "medium"
    mask_threshold: float = 0.08
    mask_grow: int = 4
    feather: int = 3
    anchor_refine: bool = True
    match_tolerance: float = 0.06

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; use one of {MODES}.")
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in (0, 1); got {self.mask_threshold}.")
        if self.mask_grow < 0 or self.feather < 0:
            raise ValueError(f"mask_grow and feather must be >= 0; got {self.mask_grow}, {self.feather}.")


@dataclass(frozen=True)
class Track:
    """coords [H, W, 2]: where pixel (x, y) of frame t lies in frame 0; valid [H, W]: tracked without occlusion."""

    coords: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class Propagation:
    """video [T, H, W, 3] and mask [T, H, W] (1 = edit region, soft at the feathered edge); notes: what was
    fixed or derived on the way (size policy, derived mask)."""

    video: torch.Tensor
    mask: torch.Tensor
    notes: tuple[str, ...] = ()


def track_to_first(frames: np.ndarray, quality: str = "medium", anchor_refine: bool = True,
                   match_tolerance: float = 0.06, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None) -> Iterator[Track]:
    """frames: uint8 [T, H, W, 3]. Yields one Track per frame, frame 0 first (identity).

    Each frame: chain the previous map along the backward flow t -> t-1; then, per pixel, keep the best of
    (chained, displacement filled in from trusted neighbours, direct flow t -> 0 seeded with the chain) by
    how well the local patch matches frame 0. A pixel is trusted (valid) when that patch error is below
    match_tolerance (0..1 grey levels): drift-free, and occluders fail it."""
    t_len, h, w = frames.shape[:3]
    dis = DenseFlow(quality)
    grid = identity_grid(h, w)
    gray0 = prev = to_gray(frames[0])
    rgb0 = frames[0].astype(np.float32) / 255.0
    coords, valid = grid.copy(), np.ones((h, w), bool)
    yield Track(coords, valid)
    for t in range(1, t_len):
        gray, rgb = to_gray(frames[t]), frames[t].astype(np.float32) / 255.0
        coords = _compose(coords, grid + dis.flow(gray, prev))
        err = _patch_error(rgb, rgb0, coords)
        candidates = [_fill_from_trusted(coords, err < match_tolerance, grid)]
        if anchor_refine:
            candidates.append(grid + dis.flow(gray, gray0, init=coords - grid))
        for cand in candidates:
            cand_err = _patch_error(rgb, rgb0, cand)
            better = cand_err < err
            coords = np.where(better[..., None], cand, coords)
            err = np.where(better, cand_err, err)
        valid = (err < match_tolerance) & inside(coords, h, w)
        prev = gray
        yield Track(coords, valid)
        report(on_step, should_stop, t, t_len - 1)


def _patch_error(frame: np.ndarray, frame0: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """patch_error between frame t [H, W, 3] (float 0..1) and frame 0 seen through coords."""
    return patch_error(frame, sample(frame0, coords))


def patch_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute RGB difference (0..1) over 5x5 patches of two float frames [H, W, 3] -> [H, W].
    Colour, not grey: objects of equal brightness must not match."""
    return cv2.blur(np.abs(a - b).mean(-1), (5, 5))


def _fill_from_trusted(coords: np.ndarray, trusted: np.ndarray, grid: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """Displacement (coords - grid) of untrusted pixels replaced by a Gaussian-weighted average of trusted
    neighbours' displacements (normalised convolution): re-acquires pixels after a passing occluder."""
    weight = trusted.astype(np.float32)
    disp = (coords - grid) * weight[..., None]
    num = cv2.GaussianBlur(disp, (0, 0), sigma)
    den = cv2.GaussianBlur(weight, (0, 0), sigma)[..., None]
    filled = grid + num / np.maximum(den, 1e-6)
    return np.where(trusted[..., None] | (den < 1e-3), coords, filled)


def _compose(coords: np.ndarray, target: np.ndarray) -> np.ndarray:
    """coords_{t-1} looked up at target [H, W, 2] positions: nearest pixel's trajectory plus the sub-pixel
    offset (locally a translation). Unlike bilinear lookup it never blends the trajectories of two objects
    across a motion boundary, so errors at object edges do not spread frame after frame."""
    snapped = np.round(target)
    return sample(coords, snapped, nearest=True) + (target - snapped)


def derive_edit_mask(source_first: torch.Tensor, edited_first: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where the edited first frame differs from the source's: [H, W] in {0, 1}.

    Per-pixel max channel difference, lightly blurred against compression noise, thresholded, opened (drops
    specks) and closed (fills pin-holes). Raises when nothing differs."""
    diff = (edited_first - source_first).abs().amax(-1).numpy().astype(np.float32)
    diff = cv2.GaussianBlur(diff, (5, 5), 0)
    mask = (diff > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    if not mask.any():
        raise ValueError(f"the edited first frame matches the source's frame 1 (largest colour difference "
                         f"{float(diff.max()):.3f} < mask_threshold {threshold}); nothing to propagate. "
                         "Check you connected the edited image, lower mask_threshold, or connect an edit_mask.")
    return torch.from_numpy(mask.astype(np.float32))


def _close(valid: np.ndarray, radius: int) -> np.ndarray:
    """Fill gaps of up to ~2*radius px in the valid map (edge pixels whose patch straddles a motion
    boundary fail the match test although they are tracked): [H, W] bool -> float32."""
    if radius == 0:
        return valid.astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.morphologyEx(valid.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(np.float32)


def soften(mask: np.ndarray, grow: int, feather: int) -> np.ndarray:
    """[H, W] mask in 0..1 -> 1 on the mask, fading to 0 over `grow` + `feather` px outside it."""
    mask = mask.astype(np.float32)
    out = mask
    if grow:
        out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    if feather:
        out = cv2.GaussianBlur(out, (0, 0), feather / 2)
    return np.clip(np.maximum(out, mask), 0, 1)


def propagate_edit(source: torch.Tensor, edited_first: torch.Tensor, edit_mask: torch.Tensor | None = None,
                   settings: FlowSettings = FlowSettings(), size_policy: str = "auto",
                   on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> Propagation:
    """Carry the edit of frame 0 through the clip.

    source: IMAGE [T, H, W, 3]; edited_first: [H', W', 3] or [1, H', W', 3] (fitted to H x W by size_policy);
    edit_mask: None (derived from the difference), [1, H, W] (frame-0 mask, propagated by flow) or [T, H, W]
    (the edit region of every frame, e.g. from SAM2). Returns the edited video and the region used."""
    check_video(source, "source_video")
    t_len, h, w = source.shape[:3]
    edited, fit_note = fit_to_frame(edited_first.float(), h, w, size_policy)
    notes = [fit_note] if fit_note else []
    if edit_mask is None:
        first_mask = derive_edit_mask(source[0], edited, settings.mask_threshold)
        notes.append(f"edit mask derived from the colour difference: {first_mask.mean().item():.1%} of frame 1")
        per_frame = None
    else:
        edit_mask = check_mask(edit_mask.float(), "edit_mask", source)
        if edit_mask.amax() <= 0:
            raise ValueError("edit_mask is empty (all zero): nothing marks the edit region. Paint the edited "
                             "area white, or leave edit_mask unconnected to derive it from the edit.")
        first_mask, per_frame = edit_mask[0], (edit_mask if edit_mask.shape[0] > 1 else None)

    for note in notes:
        log.info("FFP flow: %s", note)
    src8 = to_uint8(source)
    src_f = source.float().numpy()
    edit_np = edited.numpy().astype(np.float32)
    delta = edit_np - src_f[0]
    soft0 = soften(first_mask.numpy(), settings.mask_grow, settings.feather)
    out = np.empty_like(src_f)
    region = np.empty((t_len, h, w), np.float32)
    for t, track in enumerate(track_to_first(src8, settings.quality, settings.anchor_refine,
                                                  settings.match_tolerance, None, should_stop)):
        if settings.mode == "pixels":
            content = sample(edit_np, track.coords)
        else:
            content = np.clip(src_f[t] + sample(delta, track.coords), 0, 1)
        if per_frame is not None:
            region[t] = soften(per_frame[t].numpy(), settings.mask_grow, settings.feather)
        else:
            region[t] = sample(soft0, track.coords) * _close(track.valid, settings.mask_grow)
        out[t] = src_f[t] + region[t][..., None] * (content - src_f[t])
        if on_step is not None:
            on_step(t + 1, t_len, torch.from_numpy(out[t]))
    return Propagation(torch.from_numpy(out), torch.from_numpy(region), tuple(notes))


def propagate_mask(source: torch.Tensor, first_mask: torch.Tensor, quality: str = "medium",
                   match_tolerance: float = 0.06, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None) -> torch.Tensor:
    """Carry a frame-1 mask [H, W] (1 = region) through source [T, H, W, 3] along the flow: [T, H, W] in 0..1.
    Pixels that lose their match with frame 1 (occluded) drop out of the region."""
    check_video(source, "source_video")
    m0 = check_mask(first_mask.float(), "first_mask", source[:1])[0].numpy()
    out = np.empty(source.shape[:3], np.float32)
    tracks = track_to_first(to_uint8(source), quality, True, match_tolerance, on_step, should_stop)
    for t, track in enumerate(tracks):
        out[t] = sample(m0, track.coords) * track.valid
    return torch.from_numpy(out)
