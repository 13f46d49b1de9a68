"""ComfyUI glue shared by every node.py: the V3 API import, custom wire types, progress/cancel binding.

Imports ComfyUI; only node.py files and registry.py import this module (the layering rule)."""

from __future__ import annotations

from typing import Any

import comfy.model_management
import comfy.utils
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401  (re-exported for node.py files)

# Custom wire types, declared once (STYLE.md 5.2).
EvalReport = io.Custom("FFP_EVAL_REPORT")


def progress(total: int, node_id: str | None = None):
    """Return (on_step, should_stop) bound to ComfyUI's ProgressBar and interrupt flag."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(i: int, n: int, preview: Any = None) -> None:
        bar.update_absolute(i, n, ("JPEG", preview, 512) if preview is not None else None)

    def should_stop() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    return on_step, should_stop
