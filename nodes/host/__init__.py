"""Adapters to a Wan DiT: ComfyUI (`ComfyWan`) and diffusers (`DiffusersWan`) behind one `WanDiT` protocol.

Neither host is imported here: `comfy` and `diffusers` load lazily when an adapter is built.
"""

from .comfy import ComfyWan
from .diffusers import DiffusersWan, load_diffusers_wan
from .names import CANONICAL, convert_lora_key, convert_path
from .protocol import WanCond, WanDims, WanDiT, model_input, stock_rope_ids

__all__ = [
    "CANONICAL",
    "ComfyWan",
    "DiffusersWan",
    "WanCond",
    "WanDiT",
    "WanDims",
    "convert_lora_key",
    "convert_path",
    "load_diffusers_wan",
    "model_input",
    "stock_rope_ids",
]
