"""Video mask propagation from point/box/mask prompts on keyframes: SAM2 (bounded memory) or optical flow.

Shapes: images IMAGE [T, H, W, 3] in 0..1 (or any frame source with len(), .height, .width and
source[i] -> [H, W, 3]); masks [T, H, W] in 0..1, 1 = object. Per-object masks [N, T, H, W], objects in
ascending id order.

SAM2 memory stays bounded in the clip length: frames are resized to the model's input size one at a time
when the model asks for them (never all at once), and per-frame tracking outputs older than the model's
memory window (num_maskmem frames, max_obj_ptrs_in_encoder object pointers) are dropped as tracking moves on,
except those next to a keyframe (the backward pass reads them, as SAM2's own demo does). Dropping them does
not change the result (tests/core/test_masks_sam2.py checks it)."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..common import OnStep, ShouldStop, log, log_once, report
from ..video.frames import check_mask, check_video
from .prompts import MAX_OBJECTS, FramePrompt, MaskPrompts
from .sam2_model import SAM2Model

ENGINES = ("auto", "sam2", "flow")
DIRECTIONS = ("both", "forward", "backward")
# Flow fallback: how closely (0..1 mean colour difference of a 5x5 patch) a tracked pixel must still match to stay
# in the mask (nodes/masks/flow_track.py). Looser than the edit compositor's 0.06: objects change appearance as
# they move (DAVIS bmx-trees mean IoU: 0.166 at 0.12, 0.144 at 0.08, 0.118 at 0.16; tests/core/test_masks_flow.py).
FLOW_TOLERANCE = 0.12
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@dataclass(frozen=True)
class KeyMask:
    """A mask prompt: object `object` is `mask` ([H, W] bool tensor) on frame `frame`."""

    frame: int
    object: int
    mask: torch.Tensor


@dataclass(frozen=True)
class MaskResult:
    """mask [T, H, W] float {0, 1}: union of all objects; objects [N, T, H, W] float {0, 1}; object_ids (N,);
    engine: what ran ('sam2' or 'flow'); notes: fallbacks and fixes on the way."""

    mask: torch.Tensor
    objects: torch.Tensor
    object_ids: tuple[int, ...]
    engine: str
    notes: tuple[str, ...] = ()


def _frames_info(source) -> tuple[int, int, int]:
    if isinstance(source, torch.Tensor):
        check_video(source, "images")
        return source.shape[0], source.shape[1], source.shape[2]
    return len(source), int(source.height), int(source.width)


class _SamFrames:
    """What SAM2 indexes as inference_state["images"]: frame i resized to size x size and normalised, computed
    on demand from the source (one frame cached), so the whole resized clip never exists at once."""

    def __init__(self, source, size: int):
        self.source, self.size = source, size
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        frame = torch.as_tensor(self.source[i]).float().permute(2, 0, 1)[None].clamp(0, 1)   # [1, 3, H, W]
        frame = F.interpolate(frame, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        frame = (frame - _MEAN) / _STD
        self._cache = (i, frame)
        return frame


def _new_state(model: torch.nn.Module, source, num_frames: int, height: int, width: int,
               device: torch.device) -> dict:
    """SAM2's inference_state (as SAM2VideoPredictor.init_state builds it) over an in-memory frame source."""
    return {
        "images": _SamFrames(source, model.image_size), "num_frames": num_frames,
        "offload_video_to_cpu": True, "offload_state_to_cpu": False,
        "video_height": height, "video_width": width, "device": device, "storage_device": device,
        "point_inputs_per_obj": {}, "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
        "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
        "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
    }


def _memory_window(model: torch.nn.Module) -> int:
    """How many frames back (in tracking order) SAM2 reads non-conditioning outputs from."""
    stride = max(1, int(getattr(model, "memory_temporal_stride_for_eval", 1)))
    return max(model.num_maskmem * stride, int(getattr(model, "max_obj_ptrs_in_encoder", 16))) + 1


def _prune(state: dict, current: int, reverse: bool, window: int, keyframes: tuple[int, ...]) -> None:
    """Drop per-frame outputs SAM2 will not read again: more than `window` frames behind the current one in
    tracking order, and not within `window` of a keyframe (the other pass starts there)."""
    for out in state["output_dict_per_obj"].values():
        non_cond = out["non_cond_frame_outputs"]
        for t in list(non_cond):
            behind = (t - current) if reverse else (current - t)
            if behind > window and all(abs(t - k) > window for k in keyframes):
                del non_cond[t]


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _add_prompts(model, state, entries: tuple[FramePrompt, ...], key_masks: tuple[KeyMask, ...]) -> None:
    for km in key_masks:
        model.add_new_mask(state, km.frame, km.object, km.mask.bool())
    for e in entries:
        if len(e.boxes) > 1:
            raise ValueError(f"object {e.object} has {len(e.boxes)} boxes on frame {e.frame}; SAM2 takes one box per "
                             "object and frame. Give each box its own object id.")
        points = torch.tensor([p[:2] for p in e.points], dtype=torch.float32) if e.points else None
        labels = torch.tensor([p[2] for p in e.points], dtype=torch.int32) if e.points else None
        box = torch.tensor(e.boxes[0], dtype=torch.float32) if e.boxes else None
        model.add_new_points_or_box(state, e.frame, e.object, points=points, labels=labels, box=box)


def _passes(keyframes: tuple[int, ...], num_frames: int, direction: str) -> list[tuple[int, bool, int]]:
    """(start frame, reverse, frames visited) per tracking pass."""
    first, last = keyframes[0], keyframes[-1]
    passes = []
    if direction in ("both", "forward"):
        passes.append((first, False, num_frames - first))
    if direction == "both" and first > 0:
        passes.append((first, True, first + 1))
    if direction == "backward":
        passes.append((last, True, last + 1))
    return passes


def track_sam2(model: SAM2Model, source, entries: tuple[FramePrompt, ...] = (), key_masks: tuple[KeyMask, ...] = (),
               direction: str = "both", prune: bool = True, on_step: OnStep | None = None,
               should_stop: ShouldStop | None = None) -> Iterator[tuple[int, tuple[int, ...], torch.Tensor]]:
    """Run SAM2 over the clip; yields (frame index, object ids, masks [N, H, W] bool on CPU) in tracking order
    (a frame can come twice: keyframes start both passes). State lives only inside this generator."""
    module = model.module
    num_frames, height, width = _frames_info(source)
    device = next(module.parameters()).device
    keyframes = tuple(sorted({e.frame for e in entries} | {k.frame for k in key_masks}))
    if not keyframes:
        raise ValueError("no prompts to track: add points/boxes in the Mask Prompts editor or connect a mask.")
    window = _memory_window(module)
    passes = _passes(keyframes, num_frames, direction)
    _tqdm_off()
    total, done = sum(n for _, _, n in passes), 0
    with torch.inference_mode(), _autocast(device):
        state = _new_state(module, source, num_frames, height, width, device)
        _add_prompts(module, state, entries, key_masks)
        for start, reverse, _ in passes:
            for frame_idx, obj_ids, logits in module.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                if prune:
                    _prune(state, frame_idx, reverse, window, keyframes)
                done += 1
                yield frame_idx, tuple(obj_ids), (logits[:, 0] > 0).cpu()
                report(on_step, should_stop, done, total)


def _tqdm_off() -> None:
    """SAM2's propagate_in_video prints a tqdm bar to stderr; progress goes through on_step instead."""
    try:
        import sam2.sam2_video_predictor as svp

        if not getattr(svp, "_ffp_quiet", False):
            from functools import partial

            svp.tqdm = partial(svp.tqdm, disable=True)
            svp._ffp_quiet = True
    except ImportError:
        pass


def _flow_masks(images: torch.Tensor, obj_keys: dict[int, dict[int, torch.Tensor]], direction: str, quality: str,
                tolerance: float, on_step: OnStep | None, should_stop: ShouldStop | None,
                follower: str = "auto") -> torch.Tensor:
    """Flow engine: each object's keyframe masks carried forward to the next keyframe and backward to the
    previous one (before the first keyframe only for direction 'both') by the optical-flow mask tracker
    (flow_track.py). Objects keyed on the same frame are tracked together in one pass over the union of their
    spans, so each frame's flows are computed once for all of them. follower: track_masks' method ('auto' picks
    the motion follower when the camera pans past a moving object, else the patch tracker). -> [N, T, H, W]
    float {0, 1}."""
    from ..video.frames import to_uint8
    from .flow_track import track_masks

    t_len, h, w = images.shape[:3]
    out = torch.zeros(len(obj_keys), t_len, h, w)
    groups: dict[tuple[int, bool], list[tuple[int, int, int]]] = {}   # (keyframe, backward) -> [(n, start, stop)]
    for n, keys in enumerate(obj_keys.values()):
        ks = sorted(keys)
        for i, k in enumerate(ks):
            if direction in ("both", "forward"):
                groups.setdefault((k, False), []).append((n, k, ks[i + 1] if i + 1 < len(ks) else t_len))
            if direction == "backward" or (direction == "both" and i == 0):
                groups.setdefault((k, True), []).append((n, ks[i - 1] + 1 if i > 0 else 0, k + 1))
    spans = {g: (min(m[1] for m in ms), max(m[2] for m in ms)) for g, ms in groups.items()}
    total, done, ids = sum(stop - start for start, stop in spans.values()), 0, list(obj_keys)
    for (k, backward), members in groups.items():
        start, stop = spans[(k, backward)]
        frames = to_uint8(images[start:stop])
        order = range(stop - 1, start - 1, -1) if backward else range(start, stop)
        keys = [obj_keys[ids[n]][k].bool().numpy() for n, _, _ in members]
        tracked = track_masks(frames[::-1] if backward else frames, keys, quality, tolerance, should_stop=should_stop,
                              method=follower)
        for t, masks in zip(order, tracked):
            for (n, first, end), m in zip(members, masks):
                if first <= t < end:                      # a shorter span is a prefix of the group's pass
                    out[n, t] = torch.from_numpy(m).float()
            done += 1
            report(on_step, should_stop, done, total)
    return out


def _click_masks(entries: tuple[FramePrompt, ...], images: torch.Tensor) -> dict[int, dict[int, torch.Tensor]]:
    """Keyframe masks for the flow engine from point/box prompts: GrabCut seeded by the clicks, the boxes and the
    motion to the next frame (the previous one on the last frame); see grabcut.py. A box in which GrabCut finds
    nothing stays a filled rectangle."""
    from ..video.frames import to_uint8
    from .grabcut import segment_clicks

    t_len, h, w = images.shape[:3]
    out: dict[int, dict[int, torch.Tensor]] = {}
    for e in entries:
        near = e.frame + 1 if e.frame + 1 < t_len else e.frame - 1
        frame = to_uint8(images[e.frame])
        neighbour = to_uint8(images[near]) if 0 <= near < t_len else None
        try:
            m = torch.from_numpy(segment_clicks(frame, e.points, e.boxes, neighbour))
        except ValueError as err:
            raise ValueError(f"object {e.object} on frame {e.frame}: {err}") from None
        if not m.any():
            for x0, y0, x1, y1 in e.boxes:
                m[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        out.setdefault(e.object, {})[e.frame] = m
    return out


def key_masks_from(mask: torch.Tensor | None, frame: int, images: torch.Tensor, prompts: MaskPrompts | None,
                   threshold: float = 0.5) -> tuple[KeyMask, ...]:
    """MASK [N, H, W] (or [H, W]) = N objects on keyframe `frame` -> KeyMasks with ids 1..N. Empty objects are
    an error; an object that also has point/box prompts on the same frame is an error (SAM2 would drop one)."""
    if mask is None:
        return ()
    mask = check_mask(mask.float().cpu(), "mask", images[:1])
    t_len = images.shape[0]
    if not 0 <= frame < t_len:
        raise ValueError(f"mask_frame {frame} is out of range: the video has {t_len} frames (0..{t_len - 1}).")
    if mask.shape[0] > MAX_OBJECTS:
        raise ValueError(f"mask has {mask.shape[0]} masks; this input takes one mask per object on mask_frame (at most "
                         f"{MAX_OBJECTS}), not one per video frame. Connect a single keyframe mask.")
    prompted = {(e.frame, e.object) for e in prompts.entries} if prompts else set()
    keys = []
    for n in range(mask.shape[0]):
        m = mask[n] >= threshold
        if not m.any():
            raise ValueError(f"mask #{n} (object {n + 1}) is empty on frame {frame}: nothing to track. Paint the "
                             "object white, or remove the mask.")
        if (frame, n + 1) in prompted:
            raise ValueError(f"object {n + 1} has both a mask and point/box prompts on frame {frame}; SAM2 takes one "
                             "or the other per frame. Use another object id in the editor or remove the mask.")
        keys.append(KeyMask(frame, n + 1, m))
    return tuple(keys)


def _check_prompts(prompts: MaskPrompts | None, t_len: int, h: int, w: int) -> MaskPrompts | None:
    if prompts is None:
        return None
    if prompts.num_frames != t_len or (prompts.height, prompts.width) != (h, w):
        raise ValueError(f"the prompts were made for {prompts.num_frames} frames of {prompts.width}x{prompts.height}, "
                         f"but the images are {t_len} frames of {w}x{h}. Connect the same images to Mask Prompts "
                         "and Mask Propagate.")
    return prompts


def propagate_masks(images: torch.Tensor, prompts: MaskPrompts | None = None, mask: torch.Tensor | None = None,
                    mask_frame: int = 0, model: SAM2Model | None = None, engine: str = "auto",
                    direction: str = "both", flow_quality: str = "medium", model_error: str = "",
                    flow_tolerance: float = FLOW_TOLERANCE, on_step: OnStep | None = None,
                    should_stop: ShouldStop | None = None, follower: str = "auto") -> MaskResult:
    """Track the prompted objects through images [T, H, W, 3].

    engine 'sam2' needs `model`; 'flow' carries keyframe masks (the input mask, or points/boxes segmented by
    GrabCut, grabcut.py) along the optical flow; 'auto' = SAM2 when a model is given, else flow with a logged
    reason (`model_error`). follower: the flow engine's tracker (flow_track.track_masks' method: auto, patch,
    motion).
    Raises ValueError for bad input (no prompts, sizes, frame indices)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; use one of {ENGINES}.")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'; use one of {DIRECTIONS}.")
    check_video(images, "images")
    t_len, h, w = images.shape[:3]
    prompts = _check_prompts(prompts, t_len, h, w)
    entries = prompts.entries if prompts else ()
    key_masks = key_masks_from(mask, mask_frame, images, prompts)
    if not entries and not key_masks:
        raise ValueError("no prompts: click points or drag a box on the Mask Prompts node (its 'prompts' is empty), "
                         "or connect a keyframe mask to 'mask'.")
    notes = []
    if engine == "sam2" and model is None:
        raise ValueError(f"engine 'sam2' needs a SAM2 model: connect SAM2 Loader. {model_error}".strip())
    use_sam2 = model is not None and engine != "flow"
    if engine == "auto" and model is None:
        reason = f"no SAM2 model ({model_error or 'nothing connected'}); using the optical-flow fallback"
        log_once(f"masks-auto-flow:{model_error}", "FFP masks: %s", reason)
        notes.append(reason)
    if use_sam2:
        ids = tuple(sorted({e.object for e in entries} | {k.object for k in key_masks}))
        objects = torch.zeros(len(ids), t_len, h, w)
        for frame_idx, obj_ids, masks in track_sam2(model, images, entries, key_masks, direction,
                                                    on_step=on_step, should_stop=should_stop):
            for j, oid in enumerate(obj_ids):
                objects[ids.index(oid), frame_idx] = masks[j].float()
        log.info("FFP masks: SAM2 (%s) tracked %d object(s) over %d frames", model.describe(), len(ids), t_len)
        return MaskResult(objects.amax(0), objects, ids, "sam2", tuple(notes))
    if entries:
        notes.append(f"no SAM2: {len(entries)} point/box prompt(s) segmented with GrabCut (clicks, boxes, motion)")
        log.info("FFP masks: %s", notes[-1])
    keys = _click_masks(entries, images)
    for km in key_masks:
        keys.setdefault(km.object, {})[km.frame] = km.mask
    ids = tuple(sorted(keys))
    objects = _flow_masks(images, {i: keys[i] for i in ids}, direction, flow_quality, flow_tolerance, on_step,
                          should_stop, follower)
    return MaskResult(objects.amax(0), objects, ids, "flow", tuple(notes))
