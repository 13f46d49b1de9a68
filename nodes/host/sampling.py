"""Flow-matching Euler sampler over any `WanDiT` (ComfyUI's or diffusers'), torch-only.

Wan convention: x_t = (1 - t) * x_0 + t * noise, t = 1 is pure noise, the DiT predicts the velocity
v = noise - x_0. Wan's shifted schedule maps uniform s in 1..0 to sigma = shift * s / (1 + (shift - 1) * s)
(ComfyUI's ModelSamplingDiscreteFlow / diffusers' FlowMatchEulerDiscreteScheduler with `shift`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import OnStep, ShouldStop, report
from .protocol import LATENT_CHANNELS, WanCond, WanDiT


def shifted_sigma(u, shift: float):
    """Wan's flow schedule: uniform time u in 0..1 (a float or a Tensor) -> sigma = shift u / (1 + (shift - 1) u)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (Wan uses 5 for 480p, 3 for low res, ComfyUI's default 8); got {shift}.")
    return shift * u / (1 + (shift - 1) * u)


def flow_sigmas(steps: int, shift: float = 5.0) -> Tensor:
    """[steps + 1] float64 sigmas from 1 to 0 on Wan's shifted schedule."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}.")
    return shifted_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def sample(dit: WanDiT, cond: WanCond, noise: Tensor, steps: int, shift: float = 5.0,
           on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
           negative: Optional[WanCond] = None, cfg: float = 1.0, sigmas: Optional[Tensor] = None) -> Tensor:
    """Euler-integrate from noise [1, 16, F, h, w] (t = 1) to a clean latent (t = 0); returns it in noise's dtype.

    cond: the positive conditioning; negative + cfg > 1: classifier-free guidance v = v_neg + cfg (v_pos - v_neg)
    (negative shares the positive's keep_mask/cond_latent when its own are None). sigmas: an explicit
    [steps + 1] schedule from 1 to 0 overrides steps/shift. on_step(i, steps) after each step; should_stop()
    -> True raises Cancelled."""
    if noise.ndim != 5 or noise.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"noise must be a Wan latent [B, 16, F, h, w]; got shape {tuple(noise.shape)}.")
    sig = flow_sigmas(steps, shift) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if sig.ndim != 1 or len(sig) < 2 or float(sig[0]) > 1 or float(sig[-1]) < 0 or bool((sig[1:] > sig[:-1]).any()):
        raise ValueError(f"sigmas must decrease within 1..0 (got {sig.tolist()[:4]}...).")
    use_cfg = negative is not None and cfg != 1.0
    if use_cfg and (negative.keep_mask is None or negative.cond_latent is None):
        negative = WanCond(negative.keep_mask if negative.keep_mask is not None else cond.keep_mask,
                           negative.cond_latent if negative.cond_latent is not None else cond.cond_latent,
                           negative.context, negative.clip_tokens if negative.clip_tokens is not None
                           else cond.clip_tokens)
    x = noise.float()
    total = len(sig) - 1
    for i in range(total):
        t, t_next = float(sig[i]), float(sig[i + 1])
        v = dit.predict(x, t, cond).float()
        if use_cfg:
            v_neg = dit.predict(x, t, negative).float()
            v = v_neg + cfg * (v - v_neg)
        x = x + (t_next - t) * v
        report(on_step, should_stop, i + 1, total)
    return x.to(noise.dtype)
