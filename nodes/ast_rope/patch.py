"""Apply AST-RoPE to a Wan DiT behind the host protocol (ComfyUI or diffusers), and pick the alphas.

`apply_ast_rope(dit, alphas, backend)` returns a new adapter: the self-attentions apply RoPE through
kernels/ (`with_fused_rope`) and the position hook remaps ids per positions.py (`with_rope_positions`).
The input adapter and its model are untouched (ComfyUI: object patches on a clone).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...kernels import BACKENDS, rope_split
from ..common import log
from ..host.protocol import WanDiT
from .positions import AlphaHolder, RopeAlphas, check_alphas, check_latent, heuristic_alphas, position_fn
from .predictor import AlphaPredictor

MODES = ("off", "manual", "heuristic", "learned")
VARIANTS = ("global", "warped")


def check_rope_model(dit: WanDiT) -> None:
    """ValueError unless the DiT's head_dim splits into Wan's t/h/w rope axes."""
    dims = dit.dims
    try:
        split = rope_split(dims.head_dim)
    except ValueError as e:
        raise ValueError(f"AST-RoPE cannot patch this model: {e}") from e
    if tuple(dims.rope_axes_dim) != split:
        raise ValueError(
            f"AST-RoPE expects Wan's rope split {split} for head_dim {dims.head_dim}, but this model uses "
            f"{tuple(dims.rope_axes_dim)}. Is this a Wan 2.1 DiT?"
        )


def apply_ast_rope(dit: WanDiT, alphas: RopeAlphas | AlphaHolder, backend: str = "auto") -> WanDiT:
    """A new adapter with AST-RoPE positions and RoPE application through kernels/ (backend auto/triton/torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    check_rope_model(dit)
    fn = alphas if isinstance(alphas, AlphaHolder) else position_fn(check_alphas(alphas))
    return dit.with_fused_rope(backend).with_rope_positions(fn)


def choose_alphas(mode: str, *, latent: Optional[Tensor] = None, alpha_s: float = 1.0, alpha_t: float = 1.0,
                  variant: str = "global", alpha_max: float = 2.0, strength: float = 1.0,
                  predictor: Optional[AlphaPredictor] = None, anchor_first: bool = True) -> Optional[RopeAlphas]:
    """The alphas a mode uses; None for "off" (no patch at all).

    manual: alpha_s, alpha_t (global; "warped" spreads alpha_t as equal steps, which is the same positions).
    heuristic: warped alpha_T from the source latent's motion (positions.heuristic_alphas); "global" uses the
    mean step. learned: the predictor on the source latent ("global" uses the mean step)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if mode == "off":
        return None
    if mode == "manual":
        return check_alphas(RopeAlphas(float(alpha_s), float(alpha_t), anchor_first))
    if latent is None:
        raise ValueError(f"mode '{mode}' needs the source video: connect source_latent, or source_images and a VAE.")
    latent = check_latent(latent, "source latent")
    if mode == "heuristic":
        a = heuristic_alphas(latent, alpha_max=alpha_max, alpha_s=alpha_s, strength=strength, anchor_first=anchor_first)
    else:
        if predictor is None:
            raise ValueError("mode 'learned' needs a predictor: pick a file in models/ast_rope or connect one.")
        with torch.no_grad():
            p_s, p_t = predictor(latent.to(next(predictor.parameters()).device))
        a = RopeAlphas(p_s[0].float().cpu(), p_t[0].float().cpu(), anchor_first)
    if variant == "global":
        a = RopeAlphas(a.alpha_s, a.alpha_t.mean() if isinstance(a.alpha_t, Tensor) else a.alpha_t, anchor_first)
    log.info("FFP AST-RoPE: mode %s -> %s", mode, a.describe())
    return check_alphas(a)
