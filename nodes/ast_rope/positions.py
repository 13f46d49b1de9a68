"""AST-RoPE position remap: FreeProp's per-head-group mapping (SEED_SPEC 3.6) and two earlier readings (3.3).

global / warped (3.3, one position set for all heads): a token at stock position (f, y, x) gets
p' = (tau(f), alpha_S * y, alpha_S * x):
  global (variant A):  tau(f) = alpha_T * f
  warped (variant B):  tau(0) = 0, tau(f) = sum_{k=1..f} alpha_T(k)  (one step per latent frame)
paper (3.6, the default): the heads are split statically into spatial heads (the first `spatial_ratio` of
them) and temporal heads (the rest); height/width positions are unchanged in both:
  temporal heads:  time [0, 1, ..., F-1] -> [0, alpha_T, ..., alpha_T (F-1)]
  spatial heads:   only the first latent frame moves, from 0 to (1 - alpha_S) * F'  ("shifted", default) or to
                   alpha_S * F' ("literal", the notes' wording, which is the stock model at alpha_S = 0, not 1);
                   F' = F - 1 (the last latent frame) unless given. With alpha_S < 1 frame 0 sits closer to the
                   late frames, as the notes say; "shifted" keeps alpha = 1 = the stock model.
The paper mapping returns positions per head group, [G, L, 3] (kernels/ rotates each group's heads with its own
rows): G = H / gcd(H, H_S) equal groups, group 0..G_S-1 spatial, the rest temporal.
Positions stay real numbers (no integer table). RoPE attention depends only on position differences, so the
origin matters only where the id grid does not start at 0: with `anchor_first` the remap is taken relative to
the first latent frame of the grid (that frame keeps its stock position, e.g. under a t_start offset); without
it, positions are scaled about 0. alpha = 1 returns the ids unchanged (bit-identical to the stock model).

Everything here is differentiable in the alphas (the predictor trainer backpropagates through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..common import log_once
from ..host.protocol import RopePositionFn

ALPHA_MIN, ALPHA_MAX = 0.05, 20.0
FIRST_FRAME = ("shifted", "literal")
"""Accepted range of every alpha (outside it RoPE angles collapse or alias; ValueError)."""

Alpha = Union[float, Tensor]


@dataclass(frozen=True)
class HeadSplit:
    """The paper variant's static head split and first-frame mapping (SEED_SPEC 3.6; the notes give neither).

    spatial_ratio: share of heads that are spatial (the first ones). f_prime: F' of the spatial heads' first
    frame index; None = F - 1 of the clip. first_frame: "shifted" ((1 - alpha_S) F') or "literal" (alpha_S F')."""

    spatial_ratio: float = 0.5
    f_prime: Optional[float] = None
    first_frame: str = "shifted"

    def groups(self, heads: int) -> tuple[int, int]:
        """(G, G_S): equal head groups, the first G_S of them spatial; ValueError when the split is not whole."""
        n_s = self.spatial_ratio * heads
        if self.first_frame not in FIRST_FRAME:
            raise ValueError(f"first_frame must be one of {FIRST_FRAME}; got {self.first_frame!r}.")
        if not 0.0 <= self.spatial_ratio <= 1.0 or abs(n_s - round(n_s)) > 1e-6:
            raise ValueError(
                f"spatial_ratio {self.spatial_ratio} of {heads} attention heads is {n_s:g} heads, not a whole number "
                f"(heads not divisible by the split); pick a ratio k/{heads} (0.5 needs an even head count) or the "
                "variant 'global'."
            )
        g = heads // math.gcd(heads, int(round(n_s))) if round(n_s) else 1
        return g, int(round(n_s)) * g // heads


@dataclass(frozen=True)
class RopeAlphas:
    """alpha_s: spatial scale (float or 0-d tensor). alpha_t: a float / 0-d tensor (global, variant A) or a
    1-d tensor of F-1 per-step scales (warped, variant B: step k goes from latent frame k-1 to k).
    split: a HeadSplit for the paper variant (per-head-group positions; alpha_t must be one number)."""

    alpha_s: Alpha = 1.0
    alpha_t: Alpha = 1.0
    anchor_first: bool = True
    split: Optional[HeadSplit] = None

    @property
    def warped(self) -> bool:
        return isinstance(self.alpha_t, Tensor) and self.alpha_t.ndim == 1

    def is_identity(self) -> bool:
        """Every alpha exactly 1 and none being trained (a trainable alpha = 1 still needs the graph)."""
        vals = [self.alpha_s, self.alpha_t]
        if any(isinstance(v, Tensor) and v.requires_grad for v in vals):
            return False
        return all(bool((torch.as_tensor(v) == 1).all()) for v in vals)

    def describe(self) -> str:
        """One line for the UI: alpha_S and alpha_T (per-step values when warped)."""
        s = float(torch.as_tensor(self.alpha_s).detach().reshape(-1)[0])
        if self.warped:
            steps = ", ".join(f"{v:.3f}" for v in self.alpha_t.detach().float().tolist())
            tau = torch.cat([torch.zeros(1), self.alpha_t.detach().float().cpu().cumsum(0)])
            return (f"alpha_S={s:.3f}; alpha_T per step (warped)=[{steps}]; "
                    f"tau(f)=[{', '.join(f'{v:.2f}' for v in tau.tolist())}]")
        t = float(torch.as_tensor(self.alpha_t).detach())
        if self.split is not None:
            return (f"alpha_S={s:.3f}; alpha_T={t:.3f} (paper: {self.split.spatial_ratio:g} of heads spatial, "
                    f"first frame {self.split.first_frame})")
        return f"alpha_S={s:.3f}; alpha_T={t:.3f} (global)"


def check_alphas(alphas: RopeAlphas) -> RopeAlphas:
    """ValueError when an alpha is outside [ALPHA_MIN, ALPHA_MAX] or not finite."""
    for name, v in (("alpha_S", alphas.alpha_s), ("alpha_T", alphas.alpha_t)):
        t = torch.as_tensor(v).detach().float()
        if t.ndim > 1 or (name == "alpha_S" and t.numel() != 1) or t.numel() == 0:
            raise ValueError(f"{name} must be one number{' or one per latent-frame step' if name == 'alpha_T' else ''}; "
                             f"got shape {tuple(t.shape)}.")
        if not torch.isfinite(t).all() or bool(((t < ALPHA_MIN) | (t > ALPHA_MAX)).any()):
            raise ValueError(
                f"{name} must be finite and in [{ALPHA_MIN}, {ALPHA_MAX}]; got {t.tolist()}. 1 = the stock model; "
                "values below 1 pull positions together (alpha_T < 1: frames closer to the edited frame 0)."
            )
    if alphas.split is not None and (alphas.warped or not alphas.anchor_first):
        raise ValueError("the paper variant takes one alpha_T (not per-step values) and remaps relative to the "
                         "first latent frame (anchor_first=True).")
    return alphas


def tau(frames: Tensor, alpha_t: Alpha) -> Tensor:
    """Remapped time for (possibly fractional) frame offsets `frames` >= 0 (float tensor).

    Global: alpha_t * f. Warped: piecewise-linear cumulative sum of the steps; frames beyond the last step
    continue with the last step (logged once), e.g. when the model samples more latent frames than the
    source had."""
    if not (isinstance(alpha_t, Tensor) and alpha_t.ndim == 1):
        return frames * alpha_t
    steps = alpha_t.to(frames.dtype)
    need = int(math.ceil(float(frames.max()))) if frames.numel() else 0
    if need > steps.numel():
        log_once("ast-rope-extend", "FFP AST-RoPE: %d latent frames but %d warped alpha_T steps; repeating the last "
                 "step for the extra frames.", need + 1, steps.numel())
        steps = torch.cat([steps, steps[-1:].expand(need - steps.numel())])
    table = torch.cat([steps.new_zeros(1), steps.cumsum(0)])                 # tau at integer frames 0..n
    lo = frames.floor().clamp(0, table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = frames - lo
    return table[lo.long()] * (1 - w) + table[hi.long()] * w


def paper_positions(ids: Tensor, alphas: RopeAlphas, heads: int) -> Tensor:
    """ids [L, 3] -> per-head-group positions [G, L, 3] of the paper variant (module docstring)."""
    g, g_s = alphas.split.groups(heads)
    t = ids[:, 0]
    origin = t.min()
    a_s = torch.as_tensor(alphas.alpha_s, dtype=ids.dtype, device=ids.device)
    a_t = torch.as_tensor(alphas.alpha_t, dtype=ids.dtype, device=ids.device)
    f_prime = alphas.split.f_prime if alphas.split.f_prime is not None else t.max() - origin
    first = (1 - a_s) * f_prime if alphas.split.first_frame == "shifted" else a_s * f_prime
    spatial = ids.clone()
    spatial[:, 0] = torch.where(t == origin, origin + first, t)
    temporal = ids.clone()
    temporal[:, 0] = origin + a_t * (t - origin)
    return torch.stack([spatial] * g_s + [temporal] * (g - g_s))


def remap_positions(ids: Tensor, alphas: RopeAlphas, heads: Optional[int] = None) -> Tensor:
    """ids [L, 3] (t, h, w) -> p' [L, 3] per the module docstring, or [G, L, 3] for the paper variant (needs the
    model's head count). Exact identity (the same tensor) when every alpha is 1."""
    if alphas.is_identity():
        return ids
    if alphas.split is not None:
        if heads is None:
            raise ValueError("the paper variant needs the model's attention head count to split its heads.")
        return paper_positions(ids, alphas, heads)
    t, y, x = ids.unbind(-1)
    a_s = torch.as_tensor(alphas.alpha_s, dtype=ids.dtype, device=ids.device) if not isinstance(alphas.alpha_s, Tensor) \
        else alphas.alpha_s.to(ids.device, ids.dtype)
    a_t = alphas.alpha_t.to(ids.device, ids.dtype) if isinstance(alphas.alpha_t, Tensor) else alphas.alpha_t
    origin = t.min() if alphas.anchor_first else t.new_zeros(())
    rel = t - origin
    if isinstance(a_t, Tensor) and a_t.ndim == 1 and bool((rel < 0).any()):
        raise ValueError("warped alpha_T needs non-negative frame positions; use anchor_first=True.")
    new_t = origin + tau(rel, a_t)
    return torch.stack([new_t, a_s * y, a_s * x], dim=-1)


def position_fn(alphas: RopeAlphas, heads: Optional[int] = None) -> RopePositionFn:
    """The hook the host adapters take (`WanDiT.with_rope_positions`): ids [L, 3] -> remapped ids ([G, L, 3] per
    head group for the paper variant). Marked `static` (same ids -> same positions) unless an alpha is being
    trained, so hosts may cache the tables."""
    check_alphas(alphas)
    if alphas.split is not None:
        if not heads:
            raise ValueError("the paper variant needs the model's attention head count to split its heads.")
        alphas.split.groups(heads)

    def fn(ids: Tensor) -> Tensor:
        return remap_positions(ids, alphas, heads)
    fn.static = not any(isinstance(v, Tensor) and v.requires_grad for v in (alphas.alpha_s, alphas.alpha_t))
    return fn


class AlphaHolder:
    """A mutable slot read by a position hook at every forward: set `.alphas` between steps (training), so
    one hooked model serves all steps. Differentiable when the alphas carry grad."""

    def __init__(self, alphas: Optional[RopeAlphas] = None, heads: Optional[int] = None):
        self.alphas = alphas or RopeAlphas()
        self.heads = heads           # the model's head count (paper variant); set by apply_ast_rope

    def __call__(self, ids: Tensor) -> Tensor:
        return remap_positions(ids, self.alphas, self.heads)


# ---- training-free heuristic -------------------------------------------------------------------------------

HEURISTIC_REF_MOTION = 0.25
HEURISTIC_GAIN = 4.0


def latent_motion(latent: Tensor) -> Tensor:
    """Source latent [B, 16, F, h, w] or [16, F, h, w] -> motion energy [F-1] per step k (frame k-1 -> k):
    mean |z_k - z_{k-1}| / std(z), averaged over the batch (dimensionless; 0 = static)."""
    z = check_latent(latent, "source latent").float()
    if z.shape[2] < 2:
        raise ValueError(f"the source latent has {z.shape[2]} latent frame; motion needs at least 2 (5 video frames).")
    scale = z.std().clamp_min(1e-6)
    return (z[:, :, 1:] - z[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4)) / scale


def heuristic_alphas(latent: Tensor, alpha_max: float = 2.0, alpha_s: float = 1.0, strength: float = 1.0,
                     anchor_first: bool = True) -> RopeAlphas:
    """Warped alpha_T from the source latent's motion: step k = alpha_max ** tanh(gain * strength * (m_k - m_ref)).

    Monotone in the motion m_k of step k (latent_motion), bounded in [1/alpha_max, alpha_max]: a static step
    (m = 0) shrinks toward frame 0 (stronger first-frame anchoring), a step moving more than m_ref = 0.25
    stretches time. strength 0 gives alpha_T = 1. alpha_S is passed through (not estimated)."""
    if not 1.0 <= alpha_max <= ALPHA_MAX:
        raise ValueError(f"alpha_max must be in [1, {ALPHA_MAX}]; got {alpha_max}.")
    m = latent_motion(latent)
    steps = torch.exp(torch.tanh(HEURISTIC_GAIN * strength * (m - HEURISTIC_REF_MOTION)) * math.log(alpha_max))
    return check_alphas(RopeAlphas(alpha_s=float(alpha_s), alpha_t=steps, anchor_first=anchor_first))


def check_latent(latent: Tensor, name: str = "latent") -> Tensor:
    """[16, F, h, w] or [B, 16, F, h, w] -> [B, 16, F, h, w]; ValueError otherwise."""
    if isinstance(latent, Tensor) and latent.ndim == 4:
        latent = latent[None]
    if not isinstance(latent, Tensor) or latent.ndim != 5 or latent.shape[1] != 16:
        got = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
        raise ValueError(
            f"{name} must be a Wan 2.1 video latent [B, 16, F, H/8, W/8]; got {got}. Encode the source video with "
            "the Wan VAE (VAE Encode) or connect the source IMAGE frames and the VAE instead."
        )
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name} contains NaN or inf values; re-encode the source video.")
    return latent
