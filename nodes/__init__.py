"""Capability rooms. Every module except `*/node.py`, `registry.py`, `_comfy.py` and `host/comfy.py` is
torch-only and imports without ComfyUI (DESIGN.md section 1)."""
