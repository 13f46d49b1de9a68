"""GenProp's synthetic training pairs (SEED_SPEC 4.1, 4.4) from any clips with instance masks.

A `Clip` is frames [T, H, W, 3] in 0..1 with instance masks [K, T, H, W] (1 = the object). Each augmentation
makes a `Pair`: what the SCE reads (`sce_video`), the first frame the generator is conditioned on
(`first_frame`), the clip it must produce (`target`) and the edited region (`mask`, 1 = changed):
  copy_paste  (0.5):   an object of another clip pasted in (alpha = its mask):  sce = pasted,  first = real[0],
                       target = real. The SCE sees an object the first frame lacks: teaches removal (and, read
                       the other way, insertion).
  mask_fill   (0.375): the object's region inpainted (OpenCV Telea, per frame, over the mask dilated by 1 px):
                       sce = filled, first = real[0], target = real: teaches carrying the first frame's content
                       into a region whose source content differs.
  colour_fill (0.125): the object's region set to one solid colour (alpha = its mask): sce = real,
                       first = filled[0], target = filled: the tracking task ("track colored regions").
The generator never sees a synthetic frame except colour fill's first frame (GenProp's rule).
Clips come from a folder (`load_folder`: <name>.mp4 + <name>_mask.mp4, white = object) or from the world
(`world_clip`: nodes/world/scenes.py, the visible masks of the moving objects).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .model import TASKS

RATIOS = (0.5, 0.375, 0.125)   # copy_paste, mask_fill, colour_fill (GenProp)
MIN_OBJECT_PIXELS = 4          # per clip: instances smaller than this in every frame are not used


@dataclass(frozen=True)
class Clip:
    frames: Tensor   # [T, H, W, 3] in 0..1
    masks: Tensor    # [K, T, H, W] in 0..1, one per instance
    name: str = ""

    def __post_init__(self):
        f, m = self.frames, self.masks
        if f.ndim != 4 or f.shape[-1] != 3 or m.ndim != 4 or tuple(m.shape[1:]) != tuple(f.shape[:3]):
            raise ValueError(f"clip '{self.name}': frames must be [T, H, W, 3] and masks [K, T, H, W] of the same T, H, "
                             f"W; got {tuple(f.shape)} and {tuple(m.shape)}.")


@dataclass(frozen=True)
class Pair:
    sce_video: Tensor    # [T, H, W, 3]: what the SCE reads
    first_frame: Tensor  # [H, W, 3]: the generator's conditioning frame
    target: Tensor       # [T, H, W, 3]: what the generator must produce
    mask: Tensor         # [T, H, W]: the edited region (1 = changed)
    task: str


def _objects(clip: Clip) -> list[int]:
    ok = [k for k in range(clip.masks.shape[0]) if float((clip.masks[k] > 0.5).sum()) >= MIN_OBJECT_PIXELS]
    if not ok:
        raise ValueError(f"clip '{clip.name}' has no instance mask with at least {MIN_OBJECT_PIXELS} pixels over 0.5; "
                         "give each clip a mask of the object (white = object).")
    return ok


def _pick(seq: Sequence, gen: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=gen))]


def copy_paste(base: Clip, donor: Clip, gen: torch.Generator) -> Pair:
    """Paste a random object of `donor` (same size and length as `base`) into `base`."""
    if donor.frames.shape != base.frames.shape:
        raise ValueError(f"copy_paste needs clips of one size and length; got {tuple(base.frames.shape)} and "
                         f"{tuple(donor.frames.shape)}.")
    m = donor.masks[_pick(_objects(donor), gen)].float()
    pasted = base.frames * (1 - m[..., None]) + donor.frames * m[..., None]
    return Pair(pasted, base.frames[0], base.frames, m, "copy_paste")


def inpaint(frames: Tensor, mask: Tensor) -> Tensor:
    """Fill the mask (> 0.5, dilated by 1 px) of each frame [T, H, W, 3] from its surroundings (OpenCV Telea)."""
    import cv2

    from ..video.frames import from_uint8, to_uint8

    imgs = to_uint8(frames)
    holes = (mask.numpy() > 0.5).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    out = [cv2.inpaint(img, cv2.dilate(h, kernel), 3, cv2.INPAINT_TELEA) for img, h in zip(imgs, holes)]
    return from_uint8(np.stack(out))


def mask_fill(clip: Clip, gen: torch.Generator) -> Pair:
    """Inpaint a random object's region; the target is the real clip."""
    m = clip.masks[_pick(_objects(clip), gen)].float()
    region = torch.from_numpy(np.stack([_dilate(x) for x in (m.numpy() > 0.5)])).float()
    return Pair(inpaint(clip.frames, m), clip.frames[0], clip.frames, torch.maximum(m, region), "mask_fill")


def _dilate(mask: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)


def colour_fill(clip: Clip, gen: torch.Generator) -> Pair:
    """Fill a random object's region with one saturated colour; the SCE reads the real clip."""
    m = clip.masks[_pick(_objects(clip), gen)].float()
    colour = torch.rand(3, generator=gen)
    colour = (colour - colour.min()) / (colour.max() - colour.min() + 1e-6)   # saturated: one channel 0, one 1
    filled = clip.frames * (1 - m[..., None]) + colour * m[..., None]
    return Pair(clip.frames, filled[0], filled, m, "colour_fill")


def make_pair(clips: Sequence[Clip], index: int, seed: int = 0) -> Pair:
    """Training pair `index` (deterministic in (seed, index)): an augmentation drawn with RATIOS, a random clip
    (and a random donor clip of the same shape for copy-paste; a single clip donates its mirror image)."""
    if not clips:
        raise ValueError("no training clips.")
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    r = float(torch.rand(1, generator=gen))
    task = TASKS[0] if r < RATIOS[0] else TASKS[1] if r < RATIOS[0] + RATIOS[1] else TASKS[2]
    base = _pick(clips, gen)
    if task == "copy_paste":
        donors = [c for c in clips if c is not base and c.frames.shape == base.frames.shape] or [mirrored(base)]
        return copy_paste(base, _pick(donors, gen), gen)
    return mask_fill(base, gen) if task == "mask_fill" else colour_fill(base, gen)


def mirrored(clip: Clip) -> Clip:
    """The clip flipped left-right: the donor of copy-paste when a clip is trained alone (its object elsewhere)."""
    return Clip(clip.frames.flip(2), clip.masks.flip(3), f"{clip.name}_mirrored")


def world_clip(seed: int, size: tuple[int, int] = (64, 64), frames: int = 17) -> Clip:
    """A world scene (nodes/world/scenes.py) as a Clip: the source render and its moving objects' visible masks.
    Training seeds only: HELDOUT_SEEDS are refused."""
    from ..world.scenes import HELDOUT_SEEDS, make_scene, render_scene

    if seed in HELDOUT_SEEDS:
        raise ValueError(f"seed {seed} is a held-out benchmark seed ({HELDOUT_SEEDS.start}..{HELDOUT_SEEDS.stop - 1}); "
                         "train on other seeds.")
    scene = make_scene(seed, size, frames)
    video, visible = render_scene(scene)
    movers = [o.oid for o in scene.objects if o.shape != "post"]
    return Clip(video, torch.stack([visible[o] for o in movers]), f"world_{seed}")


def load_folder(folder: str | Path, max_frames: int | None = None) -> list[Clip]:
    """Every <name>.mp4 (or .webm/.mov/.mkv) in `folder` with its <name>_mask.<ext> (white = object, > 0.5) as a
    one-instance Clip."""
    from ..video.io import read_video

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"training folder '{root}' does not exist or is not a folder.")
    exts = (".mp4", ".webm", ".mov", ".mkv")
    clips, missing = [], []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in exts and not p.stem.endswith("_mask")):
        masks = [m for m in (path.with_name(f"{path.stem}_mask{e}") for e in exts) if m.is_file()]
        if not masks:
            missing.append(path.name)
            continue
        frames, _ = read_video(path, max_frames)
        mask, _ = read_video(masks[0], max_frames)
        if mask.shape[:3] != frames.shape[:3]:
            raise ValueError(f"'{masks[0].name}' is {tuple(mask.shape[:3])} (T, H, W) but '{path.name}' is "
                             f"{tuple(frames.shape[:3])}; a mask video must match its clip frame for frame.")
        clips.append(Clip(frames, (mask.mean(-1) > 0.5).float()[None], path.stem))
    if not clips:
        raise ValueError(f"no training clips in '{root}': each clip needs <name>.mp4 and <name>_mask.mp4 (white = "
                         f"object){'; clips without a mask: ' + ', '.join(missing[:5]) if missing else ''}.")
    return clips
