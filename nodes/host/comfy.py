"""Wan DiT adapter for a ComfyUI MODEL (a ModelPatcher around `comfy.ldm.wan.model.WanModel`).

The one module outside node.py files that touches ComfyUI (DESIGN.md section 1): `comfy` is imported inside
functions only, so this file imports in a plain Python process. Patches go on a clone, never on the input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..common import log_once
from . import names
from .protocol import (
    RopePositionFn,
    WanCond,
    WanDims,
    apply_position_fn,
    check_clip,
    check_context,
    model_input,
    timesteps,
)

ROPE_OBJECT = "diffusion_model.rope_embedder"


def _wan_model_class():
    try:
        from comfy.ldm.wan.model import WanModel
    except ImportError as e:
        raise RuntimeError(
            f"ComfyWan needs ComfyUI importable in this interpreter (import failed: {e}); "
            "run inside ComfyUI or with its venv and COMFYUI_DIR on sys.path."
        ) from e
    return WanModel


class RopePositionWrapper(nn.Module):
    """Object patch for `diffusion_model.rope_embedder`: ids [1, L, 3] -> inner(fn(ids)) per batch item.

    fn sees float32 ids (EmbedND casts positions to float32 anyway, so the identity is bit-exact)."""

    def __init__(self, inner: nn.Module, fn: RopePositionFn):
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.stack([apply_position_fn(self.fn, i.float()) for i in ids])
        return self.inner(pos)


class ComfyWan:
    """`WanDiT` over a ComfyUI Wan MODEL; linear paths are relative to `model.diffusion_model`."""

    def __init__(self, model_patcher: Any):
        wan_cls = _wan_model_class()
        dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
        if dm is None or not hasattr(model_patcher, "clone"):
            raise ValueError(
                f"ComfyWan needs a ComfyUI MODEL (ModelPatcher), got {type(model_patcher).__name__}. "
                "Connect the MODEL output of 'Load Diffusion Model' with a Wan 2.1 checkpoint."
            )
        if type(dm) is not wan_cls:
            kind = "a Wan variant this pack does not drive" if isinstance(dm, wan_cls) else "not a Wan DiT"
            raise ValueError(
                f"this MODEL's diffusion model is {type(dm).__name__} ({kind}); FFProp needs a plain Wan 2.1 DiT "
                "(comfy.ldm.wan.model.WanModel: I2V 36 ch, T2V 16 ch or Fun-Control 48 ch). Load e.g. "
                "wan2.1_i2v_480p_14B with 'Load Diffusion Model' and connect it here."
            )
        self.patcher = model_patcher
        head_dim = dm.dim // dm.num_heads
        self._dims = WanDims(
            hidden_size=dm.dim,
            num_heads=dm.num_heads,
            head_dim=head_dim,
            num_layers=len(dm.blocks),
            patch_size=tuple(dm.patch_size),
            in_channels=dm.patch_embedding.weight.shape[1],
            out_channels=dm.out_dim,
            text_dim=dm.text_embedding[0].weight.shape[1],
            rope_axes_dim=_axes(head_dim),
            clip_dim=1280 if dm.img_emb is not None else None,
        )

    @property
    def dims(self) -> WanDims:
        return self._dims

    @property
    def module(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    def blocks(self) -> list[nn.Module]:
        return list(self.module.blocks)

    def linear_names(self) -> dict[str, list[str]]:
        return names.block_linear_paths("comfy", self._dims.num_layers, self._dims.clip_dim is not None)

    def predict(self, x_t: Tensor, t: Tensor | float, cond: WanCond) -> Tensor:
        """x_t [B, 16, F, h, w], t [B] in 0..1 (1 = noise) -> velocity [B, 16, F, h, w] in x_t's dtype.

        Loads the patcher (so its object/weight patches apply) and calls the DiT like `BaseModel._apply_model`:
        inputs in the model's compute dtype, timestep t * 1000 in float32, a copy of the patcher's
        transformer_options (block replacements apply; sampling-time wrappers do not)."""
        import comfy.model_management as mm

        dims = self._dims
        x = model_input(x_t, cond, dims)
        b = x.shape[0]
        context = check_context(cond, dims, b)
        clip = check_clip(cond, dims, b)
        if clip is not None and dims.clip_dim is None:
            log_once("comfy-clip-ignored", "FFP host: this Wan model has no image embedder; clip_tokens are ignored.")
            clip = None
        mm.load_models_gpu([self.patcher])
        base = self.patcher.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        device = self.patcher.load_device
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        out = base.diffusion_model(
            x.to(device, dtype),
            timesteps(t, b, device),
            context.to(device, dtype),
            clip_fea=None if clip is None else clip.to(device, dtype),
            transformer_options=options,
        )
        return out.to(x_t.dtype)

    def with_rope_positions(self, fn: RopePositionFn) -> "ComfyWan":
        """A new adapter on `patcher.clone()` with an object patch of `diffusion_model.rope_embedder`.
        Hooks compose: the newest fn sees the stock ids and feeds any hook already on this MODEL."""
        clone = self.patcher.clone()
        clone.add_object_patch(ROPE_OBJECT, RopePositionWrapper(clone.get_model_object(ROPE_OBJECT), fn))
        return ComfyWan(clone)


def _axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE real dims per axis (t, h, w) exactly as WanModel builds its EmbedND."""
    return (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
