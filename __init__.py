"""FFProp: first-frame propagation video editing for ComfyUI.

Loaded two ways:
- by ComfyUI from custom_nodes/<any folder name>/: `comfy_entrypoint()` returns the V3 extension and
  `WEB_DIRECTORY` serves the frontend widgets;
- as the plain Python package `ffprop` (CLI, tests): nothing here imports ComfyUI until ComfyUI calls
  `comfy_entrypoint()`, so `import ffprop` works without it.
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point (nodes.py `load_custom_node`)."""
    from .nodes.registry import FFPropExtension

    return FFPropExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__"]
