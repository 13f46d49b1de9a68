"""The world benchmark's `content_encoder` row (discovered by nodes/evaluate/bench.py as `engines(world, settings)`).

content_encoder: stock I2V from the edited first frame (frames 2..T grey, keep-mask on frame 1) on the world DiT
with the bundled content encoder (weights/world.safetensors, trained on world training seeds only) reading the
source clip; task embedding by edit kind (colour_fill -> the tracking task, removal -> copy_paste, else
mask_fill, as a user would choose it); seeded noise, the benchmark's steps and shift, no CFG.
The row is left out (logged once) when the bundled encoder was trained against other world DiT weights than the
loaded ones: retrain it with RETRAIN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..common import log_once

WEIGHTS = Path(__file__).resolve().parent / "weights" / "world.safetensors"
RETRAIN = ("python -m ffprop.nodes.content_encoder.train --out sce.safetensors --depth 3 --steps 800 --batch 1 "
           "--clips 16 --pairs 48 --lr 5e-4 --mpd-weight 4, then python -m ffprop.nodes.content_encoder.train --init "
           "sce.safetensors --only-mpd --out nodes/content_encoder/weights/world.safetensors --clips 1920 --pairs 3840 "
           "--flow-times 2 --steps 12000 --lr 2e-3 --batch 8 --mpd-weight 1")
TASK_FOR_EDIT = {"colour_fill": "colour_fill", "removal": "copy_paste", "insertion": "copy_paste"}


def task_for(edit: str) -> str:
    return TASK_FOR_EDIT.get(edit, "mask_fill")


def world_dit_digest() -> str | None:
    """sha256 of the world DiT weights the world manifest names (None when it cannot be read)."""
    try:
        from ..world.model import read_manifest

        return read_manifest()["models"]["dit_i2v"]["sha256"]
    except (RuntimeError, KeyError, ImportError):
        return None


def content_encoder_engine(world, settings, path: Path = WEIGHTS, with_mask: bool = False) -> Callable:
    """engine(sample) -> IMAGE [T, H, W, 3] (with_mask: (IMAGE, MPD mask [T, H, W] in 0..1))."""
    from ..evaluate.bench import memo_encode
    from ..host.sampling import sample
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from .attach import attach_diffusers, predict_mask
    from .files import load_encoder
    from .model import upsample_mask

    encoder = load_encoder(path, world.dit)
    encode = memo_encode(world.encode)

    def run(s):
        v_cond, keep = masked_condition_video(s.source, None, s.edited_first)
        cond = wan_cond(encode(v_cond), keep, world.context)
        att, state = attach_diffusers(world.dit, encoder, encode(s.source), task=task_for(s.edit))
        noise = torch.randn(cond.cond_latent.shape, generator=torch.Generator().manual_seed(s.seed))
        with torch.no_grad():
            latent = sample(att, cond, noise.to(cond.cond_latent), settings.sample_steps, settings.shift)
        video = world.decode(latent)
        if not with_mask:
            return video
        logits = predict_mask(att, state, latent, cond, seed=s.seed)
        return video, upsample_mask(logits, *s.source.shape[1:3])

    return run


def true_clip_mpd_mask(world, encoder, sample, seed: int = 0) -> Tensor:
    """The mask decoder alone on a world sample: its mask [T, H, W] in 0..1 when it reads the TRUE edited clip
    (encoded, flow time 0.05) with the source clip in the SCE, the task chosen by `task_for`. world: a WanWorld."""
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from .attach import attach_diffusers, predict_mask
    from .model import upsample_mask

    v_cond, keep = masked_condition_video(sample.source, None, sample.edited_first)
    att, state = attach_diffusers(world.dit, encoder, world.encode(sample.source), task=task_for(sample.edit))
    logits = predict_mask(att, state, world.encode(sample.target), wan_cond(world.encode(v_cond), keep, world.context),
                          seed=seed)
    return upsample_mask(logits, *sample.source.shape[1:3])


def true_clip_mpd_iou(world, encoder, sample, seed: int = 0, threshold: float = 0.5):
    """IoU (the decoder's mask binarised at `threshold`, the true mask at 0.5, all T frames) of
    `true_clip_mpd_mask` against sample.edit_mask; None when both masks are empty."""
    from .model import mask_iou

    return mask_iou((true_clip_mpd_mask(world, encoder, sample, seed) > threshold).float(), sample.edit_mask)


def engines(world, settings) -> dict[str, Callable[..., Tensor]]:
    """{"content_encoder": engine} on the benchmark's WanWorld; {} without world models or a fitting encoder."""
    if world is None:
        return {}
    if not WEIGHTS.is_file():
        log_once("ce-bench-missing", "FFP content encoder: no bundled world encoder at %s; row skipped (train it "
                 "with `%s`).", WEIGHTS, RETRAIN)
        return {}
    from .files import read_encoder_file

    _, _, meta = read_encoder_file(WEIGHTS)
    digest = world_dit_digest()
    if meta.get("world_dit_sha256") and digest and meta["world_dit_sha256"] != digest:
        log_once("ce-bench-stale", "FFP content encoder: %s was trained on other world DiT weights (%s..., now %s...); "
                 "row skipped, retrain it with `%s`.", WEIGHTS.name, meta["world_dit_sha256"][:12], digest[:12],
                 RETRAIN)
        return {}
    return {"content_encoder": content_encoder_engine(world, settings)}
