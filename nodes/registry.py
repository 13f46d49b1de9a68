"""The V3 extension ComfyUI loads: every FFP node of every room. Imports ComfyUI (layering rule).

Each room's node.py lists its nodes in NODES; ROOMS is the menu order."""

from __future__ import annotations

import importlib
import importlib.util

from ._comfy import ComfyExtension, io
from .masks import routes as _mask_routes  # noqa: F401  (registers GET /ffprop/frame for the web editor)

ROOMS = ("flow", "evaluate", "masks", "lora_edit", "ast_rope", "chunks", "keyframes", "content_encoder")


def room_nodes(room: str) -> list[type[io.ComfyNode]]:
    """The NODES of nodes/<room>/node.py; [] for a room this checkout does not have yet."""
    if importlib.util.find_spec(f"{__package__}.{room}") is None or \
            importlib.util.find_spec(f"{__package__}.{room}.node") is None:
        return []
    return list(importlib.import_module(f"{__package__}.{room}.node").NODES)


NODES: list[type[io.ComfyNode]] = [node for room in ROOMS for node in room_nodes(room)]


class FFPropExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
