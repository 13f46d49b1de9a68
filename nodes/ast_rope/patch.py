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
from .positions import AlphaHolder, HeadSplit, RopeAlphas, check_alphas, check_latent, heuristic_alphas, position_fn
from .predictor import AlphaPredictor

MODES = ("off", "manual", "heuristic", "learned")
VARIANTS = ("paper", "global", "warped")


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
    """A new adapter with AST-RoPE positions and RoPE application through kernels/ (backend auto/triton/torch).
    The paper variant (alphas.split set) gives each head group its own positions in the same attention call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    check_rope_model(dit)
    heads = dit.dims.num_heads
    if isinstance(alphas, AlphaHolder):
        alphas.heads = heads
        fn = alphas
    else:
        fn = position_fn(check_alphas(alphas), heads)
    return dit.with_fused_rope(backend).with_rope_positions(fn)


def variant_alphas(a: RopeAlphas, variant: str, split: Optional[HeadSplit] = None) -> RopeAlphas:
    """The alphas of one variant from per-step ones: global/paper use the mean alpha_T step (paper also the
    head split, default HeadSplit()); warped keeps them."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if variant == "warped":
        return a
    t = a.alpha_t.mean() if isinstance(a.alpha_t, Tensor) and a.alpha_t.ndim == 1 else a.alpha_t
    return RopeAlphas(a.alpha_s, t, True if variant == "paper" else a.anchor_first,
                      (split or HeadSplit()) if variant == "paper" else None)


def choose_alphas(mode: str, *, latent: Optional[Tensor] = None, alpha_s: float = 1.0, alpha_t: float = 1.0,
                  variant: str = "global", alpha_max: float = 2.0, strength: float = 1.0,
                  predictor: Optional[AlphaPredictor] = None, anchor_first: bool = True,
                  split: Optional[HeadSplit] = None) -> Optional[RopeAlphas]:
    """The alphas a mode uses; None for "off" (no patch at all).

    manual: alpha_s, alpha_t (global; "warped" spreads alpha_t as equal steps, which is the same positions;
    "paper": the per-head-group mapping with `split`). heuristic: warped alpha_T from the source latent's motion
    (positions.heuristic_alphas); "global"/"paper" use the mean step. learned: the predictor on the source
    latent (a per-video alpha_T for "paper"/"global"; a v1 predictor's per-step values for "warped")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if mode == "off":
        return None
    if mode == "manual":
        return check_alphas(variant_alphas(RopeAlphas(float(alpha_s), float(alpha_t), anchor_first), variant, split))
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
    a = variant_alphas(a, variant, split)
    log.info("FFP AST-RoPE: mode %s -> %s", mode, a.describe())
    return check_alphas(a)
