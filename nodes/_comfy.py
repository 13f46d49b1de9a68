"""ComfyUI glue shared by every node.py: the V3 API import, custom wire types, progress/cancel binding.

Imports ComfyUI; only node.py files and registry.py import this module (the layering rule)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import ComfyExtension, InputImpl, Types, io, ui  # noqa: F401  (re-exported)
from PIL import Image

# Custom wire types, declared once (STYLE.md 5.2).
EvalReport = io.Custom("FFP_EVAL_REPORT")


def progress(total: int, node_id: str | None = None):
    """Return (on_step, should_stop) bound to ComfyUI's ProgressBar and interrupt flag."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(i: int, n: int, preview: Any = None) -> None:
        if isinstance(preview, torch.Tensor):                 # IMAGE frame [H, W, 3] -> PIL
            preview = Image.fromarray((preview.clamp(0, 1) * 255).byte().cpu().numpy())
        bar.update_absolute(i, n, ("JPEG", preview, 512) if preview is not None else None)

    def should_stop() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    return on_step, should_stop


def unpack_video(video) -> tuple[torch.Tensor, float, Any]:
    """VIDEO -> (IMAGE [T, H, W, 3] float on CPU, fps, audio or None)."""
    parts = video.get_components()
    return parts.images.float().cpu(), float(parts.frame_rate), parts.audio


def pack_video(frames: torch.Tensor, fps: float, audio: Any = None):
    """IMAGE [T, H, W, 3] + fps (+ audio) -> VIDEO (in memory; SaveVideo encodes it)."""
    rate = Fraction(fps).limit_denominator(1001)
    return InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, frame_rate=rate, audio=audio))
