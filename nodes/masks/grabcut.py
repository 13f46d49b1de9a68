"""Click segmentation without SAM2: OpenCV GrabCut seeded by the clicks, a box and the object's motion
(numpy/OpenCV only). The flow fallback of mask propagation needs a keyframe mask; this makes one from the Mask
Prompts editor's points and boxes.

Seeds (frame pixels): a disc around each positive point is sure object, around each negative point sure background,
and the negative point's colour-connected surroundings (flood fill within FLOOD) probable background.
- A box: outside it sure background, inside it probably object (GrabCut's rectangle mode).
- Points only, with a neighbouring frame (the video's own motion): DIS flow keyframe -> neighbour; the background's
  motion is a RANSAC affine fit to the whole flow (camera pan/zoom), the clicked object's motion the median flow
  under the positive clicks. The motion mask is the connected region around the clicks that moves like the clicks
  and not like the background. Its bounding box (grown by BOX_MARGIN) is GrabCut's box, the motion mask its
  probable object. When GrabCut keeps under SEPARATES of the motion mask's area, the object's colours do not
  separate it from its surroundings and the motion mask is the answer.
- Points only, no usable motion (a still object, a single frame, or frames under MIN_MOTION_SIDE pixels where DIS
  flow is unreliable): a square window of half-size WINDOW x the long side around the clicks is probably object,
  the rest probably background.
Of the result only the connected parts holding a positive point are kept (for a box without points, the largest
part in each box).

Frames are segmented at most MAX_SIDE pixels on the long side and the mask scaled back. Same input, same output
(cv2.setRNGSeed before GrabCut's k-means; DIS and RANSAC run with OpenCV's fixed seeds)."""

from __future__ import annotations

import cv2
import numpy as np

from ..flow.dis import DenseFlow, identity_grid, to_gray

MAX_SIDE = 480
ITERATIONS = 5
SEED_RADIUS = 0.012     # seed disc radius, share of the long side (480 px frame: 6 px)
WINDOW = 0.12           # half-size of the probable-object window around the clicks without motion (share of long side)
BOX_MARGIN = 0.15       # the motion mask's bounding box grows by this share of its size on each side
MIN_SEPARATION = 1.0    # px per frame: the clicked object must move at least this much relative to the background
MIN_MOTION_SIDE = 96
SEPARATES = 0.3
FLOOD = 16              # a negative click also marks its colour-connected surroundings (within this much per
#                         channel, 0..255, of the clicked colour) as probable background


def check_clicks(points, boxes, width: int, height: int) -> None:
    """Raise ValueError, with the numbers and what to do, for a point or box corner outside the frame of
    width x height (pixels; x in 0..width, y in 0..height)."""
    corners = [(p[0], p[1], "point") for p in points] + [(c[0], c[1], "box corner") for b in boxes
                                                         for c in ((b[0], b[1]), (b[2], b[3]))]
    for x, y, what in corners:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"{what} ({x:g}, {y:g}) is outside the frame of {width}x{height} (WxH; x in 0..{width}, "
                             f"y in 0..{height}). Re-place it in the Mask Prompts editor on this clip.")


def grabcut_labels(image: np.ndarray, labels: np.ndarray, iterations: int = ITERATIONS,
                   fg_model: np.ndarray | None = None) -> np.ndarray:
    """GrabCut from an initial label map (cv2.GC_*) -> bool object mask. A map with no possible object or no
    possible background returns the sure-object pixels (GrabCut needs both). fg_model: the object's colours
    as GrabCut's 1x65 GMM, kept frozen (the background's are learnt from the map, then one frozen pass;
    `iterations` unused)."""
    fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    if fg.all() or not fg.any():
        return labels == cv2.GC_FGD
    cv2.setRNGSeed(0)
    mask = labels.copy()
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if fg_model is None:
        cv2.grabCut(image, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    else:
        cv2.grabCut(image, mask, None, bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)     # learns the background model only
        fgd = fg_model.copy()
        cv2.grabCut(image, mask, None, bgd, fgd, 1, cv2.GC_EVAL_FREEZE_MODEL)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _keep_clicked(fg: np.ndarray, positives: list[tuple[int, int]], boxes=()) -> np.ndarray:
    """The connected parts of fg holding a positive point; with none, the largest part inside each box."""
    _, comp = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    keep = {int(comp[y, x]) for x, y in positives} - {0}
    if not positives:
        for x0, y0, x1, y1 in boxes:
            ids, counts = np.unique(comp[y0:y1, x0:x1], return_counts=True)
            counts[ids == 0] = 0
            if counts.max() > 0:
                keep.add(int(ids[counts.argmax()]))
    return np.isin(comp, sorted(keep))


def motion_mask(frame: np.ndarray, neighbour: np.ndarray, seeds: np.ndarray,
                positives: list[tuple[int, int]]) -> np.ndarray | None:
    """The region around the positive clicks that moves like them and unlike the background, between frame and
    neighbour (uint8 [H, W, 3]); seeds [H, W] bool = the click discs. None when the clicked object does not move
    relative to the background (by MIN_SEPARATION px) or the region covers half the frame."""
    h, w = frame.shape[:2]
    flow = DenseFlow("medium").flow(to_gray(frame), to_gray(neighbour))
    grid = identity_grid(h, w)
    step = max(1, min(h, w) // 60)
    src = grid[::step, ::step].reshape(-1, 2)
    affine, _ = cv2.estimateAffine2D(src, src + flow[::step, ::step].reshape(-1, 2), method=cv2.RANSAC,
                                     ransacReprojThreshold=1.0)
    if affine is None:
        return None
    background = cv2.transform(grid.reshape(-1, 1, 2), affine).reshape(h, w, 2) - grid
    clicked = np.median(flow[seeds], 0)
    separation = float(np.linalg.norm(clicked - np.median(background[seeds], 0)))
    if separation < MIN_SEPARATION:
        return None
    off_background = np.linalg.norm(flow - background, axis=-1)
    moving = (np.linalg.norm(flow - clicked, axis=-1) < off_background) & (off_background > max(1.0, 0.3 * separation))
    region = _keep_clicked(moving | seeds, positives)
    return region if region.mean() < 0.5 else None


def segment_clicks(frame: np.ndarray, points, boxes=(), neighbour: np.ndarray | None = None) -> np.ndarray:
    """frame uint8 [H, W, 3] RGB; points ((x, y, label), ...) label 1 = object, 0 = not; boxes ((x0, y0, x1, y1),
    ...) around the object, in the frame's pixels; neighbour: an adjacent frame of the clip (uint8 [H, W, 3]) for
    the motion cue, or None. -> bool [H, W] object mask.

    Raises ValueError for a point/box outside the frame, prompts with neither a positive point nor a box, and a
    neighbour of another size."""
    h, w = frame.shape[:2]
    check_clicks(points, boxes, w, h)
    if not boxes and not any(p[2] == 1 for p in points):
        raise ValueError(f"only negative points ({len(points)}) and no box: nothing says where the object is. Add a "
                         "positive click (left click) on it, or drag a box around it.")
    if neighbour is not None and neighbour.shape != frame.shape:
        raise ValueError(f"the neighbouring frame is {neighbour.shape[1]}x{neighbour.shape[0]}, the keyframe "
                         f"{w}x{h}: every frame of the clip must have one size.")
    scale = min(1.0, MAX_SIDE / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    shrink = lambda a: cv2.resize(a, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 else a   # noqa: E731
    image = np.ascontiguousarray(shrink(frame))
    px = lambda v, n: int(np.clip(np.floor(v * scale), 0, n - 1))                                    # noqa: E731
    pos = [(px(p[0], sw), px(p[1], sh)) for p in points if p[2] == 1]
    neg = [(px(p[0], sw), px(p[1], sh)) for p in points if p[2] == 0]
    sboxes = [(px(b[0], sw), px(b[1], sh), max(px(b[0], sw) + 1, min(sw, int(np.ceil(b[2] * scale)))),
               max(px(b[1], sh) + 1, min(sh, int(np.ceil(b[3] * scale))))) for b in boxes]
    radius = max(2, round(SEED_RADIUS * max(sh, sw)))
    seeds = np.zeros((sh, sw), np.uint8)
    for x, y in pos:
        cv2.circle(seeds, (x, y), radius, 1, -1)

    flooded = np.zeros((sh, sw), bool)
    smooth = cv2.GaussianBlur(image, (0, 0), 1.0)
    for x, y in neg:
        fill = np.zeros((sh + 2, sw + 2), np.uint8)
        cv2.floodFill(smooth.copy(), fill, (x, y), 0, (FLOOD,) * 3, (FLOOD,) * 3,
                      4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
        flooded |= fill[1:-1, 1:-1] > 0

    def labels(outside: int, windows=(), probable: np.ndarray | None = None) -> np.ndarray:
        lab = np.full((sh, sw), outside, np.uint8)
        for x0, y0, x1, y1 in windows:
            lab[y0:y1, x0:x1] = cv2.GC_PR_FGD if probable is None else cv2.GC_PR_BGD
        if probable is not None:
            lab[probable] = cv2.GC_PR_FGD
        lab[flooded] = cv2.GC_PR_BGD
        lab[seeds > 0] = cv2.GC_FGD
        for x, y in neg:
            cv2.circle(lab, (x, y), radius, int(cv2.GC_BGD), -1)
        return lab

    moving = None
    if not sboxes and neighbour is not None and min(sh, sw) >= MIN_MOTION_SIDE:
        moving = motion_mask(image, np.ascontiguousarray(shrink(neighbour)), seeds > 0, pos)
    if sboxes:
        fg = grabcut_labels(image, labels(cv2.GC_BGD, sboxes))
    elif moving is not None:
        ys, xs = np.nonzero(moving)
        mx, my = BOX_MARGIN * (xs.max() - xs.min() + 1), BOX_MARGIN * (ys.max() - ys.min() + 1)
        box = (max(0, int(xs.min() - mx)), max(0, int(ys.min() - my)), min(sw, int(np.ceil(xs.max() + 1 + mx))),
               min(sh, int(np.ceil(ys.max() + 1 + my))))
        fg = _keep_clicked(grabcut_labels(image, labels(cv2.GC_BGD, [box], moving)), pos)
        if fg.sum() < SEPARATES * moving.sum():
            fg = moving
    else:
        half = WINDOW * max(sh, sw)
        xs, ys = [p[0] for p in pos], [p[1] for p in pos]
        window = (max(0, int(min(xs) - half)), max(0, int(min(ys) - half)), min(sw, int(np.ceil(max(xs) + half))),
                  min(sh, int(np.ceil(max(ys) + half))))
        fg = grabcut_labels(image, labels(cv2.GC_PR_BGD, [window]))
    fg = _keep_clicked(fg, pos, sboxes)
    if scale < 1:
        fg = cv2.resize(fg.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    return fg
