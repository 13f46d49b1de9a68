"""Point/box prompts for mask propagation: the JSON the web editor writes, parsed and validated (torch-free).

JSON (coordinates in SOURCE pixels of the connected images, origin top-left, x right, y down):

    {"version": 1, "width": W, "height": H,
     "prompts": [{"frame": 0, "object": 1, "points": [[x, y, 1], [x, y, 0]], "boxes": [[x0, y0, x1, y1]]}]}

label 1 = positive, 0 = negative; `object` an int >= 1. Several entries may share a frame or an object
(keyframes = several frames); entries for the same (frame, object) are merged. Empty text or
{"prompts": []} = no prompts. `width`/`height` are the size the editor saw: when they differ from the
images' size the coordinates are scaled (and logged); when absent the images' size is assumed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger("ffp")

VERSION = 1
MAX_OBJECTS = 64


@dataclass(frozen=True)
class FramePrompt:
    """Prompts for one object on one frame. points: ((x, y, label), ...) with label 1 = positive, 0 = negative;
    boxes: ((x0, y0, x1, y1), ...). Pixel coordinates of the video (floats)."""

    frame: int
    object: int
    points: tuple[tuple[float, float, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass(frozen=True)
class MaskPrompts:
    """All prompts for one clip of num_frames x height x width (immutable; the FFP_MASK_PROMPTS wire type).
    entries are sorted by (frame, object), one per pair."""

    num_frames: int
    height: int
    width: int
    entries: tuple[FramePrompt, ...] = ()

    @property
    def objects(self) -> tuple[int, ...]:
        return tuple(sorted({e.object for e in self.entries}))

    @property
    def keyframes(self) -> tuple[int, ...]:
        return tuple(sorted({e.frame for e in self.entries}))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def describe(self) -> str:
        n_pts = sum(len(e.points) for e in self.entries)
        n_box = sum(len(e.boxes) for e in self.entries)
        return (f"{len(self.objects)} object(s), {n_pts} point(s), {n_box} box(es) on keyframe(s) "
                f"{list(self.keyframes)}")


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number; got {value!r}.")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite; got {value!r}.")
    return float(value)


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{what} must be an integer; got {value!r}.")
    return int(value)


def _check_xy(x: float, y: float, width: int, height: int, what: str) -> None:
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"{what} ({x:g}, {y:g}) is outside the frame of {width}x{height} (WxH; x in 0..{width}, "
                         f"y in 0..{height}). Re-place it in the prompt editor, or check that the prompts were "
                         "made on this video.")


def parse_prompts(text: str | None, num_frames: int, height: int, width: int) -> MaskPrompts:
    """Parse and validate the prompt JSON for a clip of num_frames frames of width x height -> MaskPrompts.

    Raises ValueError naming the problem: bad JSON, unknown version, frame index out of range, a point or box
    outside the frame (after scaling from the editor's size), a box with x1 <= x0 or y1 <= y0, bad labels."""
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"the video is empty ({num_frames} frames of {width}x{height}).")
    empty = MaskPrompts(num_frames, height, width)
    if text is None or not text.strip():
        return empty
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}). Clear the "
                         "prompt editor or fix the text; expected {\"version\": 1, \"prompts\": [...]}.") from e
    if isinstance(data, list):
        data = {"prompts": data}
    if not isinstance(data, dict):
        raise ValueError(f"prompts JSON must be an object {{\"version\": 1, \"prompts\": [...]}}; got "
                         f"{type(data).__name__}.")
    version = data.get("version", VERSION)
    if version != VERSION:
        raise ValueError(f"unknown prompts version {version!r}; this FFProp reads version {VERSION}. "
                         "Update FFProp or re-create the prompts in the editor.")
    sx = sy = 1.0
    if "width" in data or "height" in data:
        src_w = _number(data.get("width", width), "prompts width")
        src_h = _number(data.get("height", height), "prompts height")
        if src_w <= 0 or src_h <= 0:
            raise ValueError(f"prompts width/height must be > 0; got {src_w:g}x{src_h:g}.")
        if (src_w, src_h) != (width, height):
            sx, sy = width / src_w, height / src_h
            log.info("FFP masks: prompts were placed on %gx%g, the images are %dx%d: coordinates scaled by "
                     "(%.4g, %.4g)", src_w, src_h, width, height, sx, sy)
            width_src, height_src = src_w, src_h
        else:
            width_src, height_src = width, height
    else:
        width_src, height_src = width, height
    items = data.get("prompts", [])
    if not isinstance(items, list):
        raise ValueError(f"\"prompts\" must be a list of {{frame, object, points, boxes}}; got {type(items).__name__}.")

    merged: dict[tuple[int, int], tuple[list, list]] = {}
    for i, item in enumerate(items):
        where = f"prompt #{i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object with frame/object/points/boxes; got {item!r}.")
        frame = _integer(item.get("frame", 0), f"{where} frame")
        if not 0 <= frame < num_frames:
            raise ValueError(f"{where} is on frame {frame}, but the video has {num_frames} frames (0..{num_frames - 1}). "
                             "Move the prompt to an existing frame or connect the full clip.")
        obj = _integer(item.get("object", 1), f"{where} object")
        if not 1 <= obj <= MAX_OBJECTS:
            raise ValueError(f"{where} object id must be in 1..{MAX_OBJECTS}; got {obj}.")
        points, boxes = merged.setdefault((frame, obj), ([], []))
        raw_points = item.get("points", []) or []
        raw_boxes = item.get("boxes", []) or []
        if not isinstance(raw_points, list) or not isinstance(raw_boxes, list):
            raise ValueError(f"{where}: points and boxes must be lists.")
        for j, p in enumerate(raw_points):
            if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
                raise ValueError(f"{where} point #{j} must be [x, y, label]; got {p!r}.")
            x = _number(p[0], f"{where} point #{j} x")
            y = _number(p[1], f"{where} point #{j} y")
            label = _integer(p[2], f"{where} point #{j} label") if len(p) == 3 else 1
            if label not in (0, 1):
                raise ValueError(f"{where} point #{j} label must be 1 (positive) or 0 (negative); got {label}.")
            _check_xy(x, y, width_src, height_src, f"{where} point #{j} on frame {frame}")
            points.append((x * sx, y * sy, label))
        for j, b in enumerate(raw_boxes):
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise ValueError(f"{where} box #{j} must be [x0, y0, x1, y1]; got {b!r}.")
            x0, y0, x1, y1 = (_number(v, f"{where} box #{j}") for v in b)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"{where} box #{j} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty: it needs x1 > x0 and "
                                 "y1 > y0 (top-left corner first). Drag the box again.")
            _check_xy(x0, y0, width_src, height_src, f"{where} box #{j} corner on frame {frame}")
            _check_xy(x1, y1, width_src, height_src, f"{where} box #{j} corner on frame {frame}")
            boxes.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))

    entries = tuple(FramePrompt(f, o, tuple(p), tuple(b)) for (f, o), (p, b) in sorted(merged.items()) if p or b)
    return MaskPrompts(num_frames, height, width, entries)


def prompts_to_json(prompts: MaskPrompts) -> str:
    """The inverse of parse_prompts (version 1, the video's own size)."""
    return json.dumps({
        "version": VERSION, "width": prompts.width, "height": prompts.height,
        "prompts": [{"frame": e.frame, "object": e.object, "points": [list(p) for p in e.points],
                     "boxes": [list(b) for b in e.boxes]} for e in prompts.entries],
    })
