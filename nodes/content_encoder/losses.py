"""GenProp's training losses (SEED_SPEC 4.3): region-aware loss, finite-difference gradient loss, MPD loss.

    L = L_non-mask + lambda * L_mask + beta * L_grad + gamma * L_MPD,   lambda = 2, beta = 1, gamma = 1.

L_mask / L_non-mask: the flow-matching MSE of the predicted velocity split by the latent mask m~ [1, 1, F, h, w]
(both are means over all elements, so L_mask + L_non-mask = the plain MSE for a binary m~). L_grad: the mean,
over tokens, of m~_token * ||delta f||_2 (channels), delta f = (f(E(V^ + delta)) - f(E(V^))) / eps over the SCE's
injection outputs f, delta = eps * n (.) m~ (noise inside the mask only): zero when the encoder's features do not
depend on the masked part of its input. L_MPD: binary cross-entropy + soft Dice between the MPD's logits and the
instance mask, every pixel of every pixel frame. (GenProp regresses the mask with MSE; on the world's objects,
1-6 % of the frame, an MSE-trained decoder collapsed to a constant near the object's area (IoU 0.00): "nothing"
cost only the area. Dice charges a missed object ~1 whatever its size, BCE keeps the gradient of a confidently
wrong pixel from vanishing in the sigmoid.) Each step's L_MPD is weighted by mpd_time_weight(t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LossWeights:
    mask: float = 2.0        # lambda
    grad: float = 1.0        # beta
    mpd: float = 1.0         # gamma
    eps: float = 1e-3        # the finite-difference step, in latent units


def region_losses(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(L_mask, L_non-mask) for pred/target [B, C, F, h, w] and m~ [B or 1, 1, F, h, w] in 0..1."""
    se = (pred.float() - target.float()) ** 2
    m = mask.float().expand_as(se)
    return (m * se).mean(), ((1 - m) * se).mean()


def probe_delta(mask: Tensor, eps: float, gen: torch.Generator, channels: int = 16) -> Tensor:
    """delta = eps * n (.) m~: Gaussian noise [1, C, F, h, w] restricted to the mask m~ [1, 1, F, h, w]."""
    n = torch.randn((1, channels, *mask.shape[2:]), generator=gen)
    return eps * n.to(mask) * mask


def token_mask(mask: Tensor, patch: tuple[int, int, int] = (1, 2, 2)) -> Tensor:
    """m~ [1, 1, F, h, w] -> per-token weights [1, F*h'*w'] (mean over each patch), token order (t, h, w)."""
    pooled = nn.functional.avg_pool3d(mask.float(), kernel_size=patch, stride=patch)
    return pooled.flatten(1)   # [B, 1, F, h', w'] -> [B, F*h'*w'] in token order


def gradient_loss(base: list[Tensor], moved: list[Tensor], mask: Tensor, eps: float,
                  patch: tuple[int, int, int] = (1, 2, 2)) -> Tensor:
    """L_grad from the SCE's injection outputs without and with the probe (lists of [B, L, D], one per block):
    mean over blocks and tokens of m~_token * ||(moved - base) / eps||_2."""
    if len(base) != len(moved) or not base:
        raise ValueError(f"gradient_loss needs two equal, non-empty feature lists; got {len(base)} and {len(moved)}.")
    w = token_mask(mask, patch).to(base[0].device)
    terms = [(w * torch.linalg.vector_norm((m.float() - b.float()) / eps, dim=-1)).mean() for b, m in zip(base, moved)]
    return torch.stack(terms).mean()


def mpd_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """BCE + soft Dice of MPD logits [B, T, h, w] against the instance mask target [B or 1, T, h, w] in 0..1: mean
    BCE over pixels plus the mean over batch items of 1 - (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid."""
    if logits.shape[1:] != target.shape[1:]:
        raise ValueError(f"MPD logits are {tuple(logits.shape)} but the mask target is {tuple(target.shape)}.")
    x = logits.float()
    t = target.float().to(x.device).expand_as(x)
    bce = nn.functional.binary_cross_entropy_with_logits(x, t)
    p = torch.sigmoid(x).flatten(1)
    t = t.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return bce + dice.mean()


def mpd_time_weight(t: Tensor) -> Tensor:
    """3 (1 - t)^2 (mean 1 over t ~ U(0, 1)): the MPD loss of a step at flow time t counts most where the clip is
    still visible in x_t, as when the mask node runs the decoder (t = 0.05). At high noise a copy-paste pair's
    pasted object is only in the SCE input, and the decoder learned to mark every object it saw there."""
    return 3 * (1 - t.float()) ** 2


def total_loss(l_mask: Tensor, l_non: Tensor, l_grad: Tensor, l_mpd: Tensor, w: LossWeights = LossWeights()) -> Tensor:
    """Eq. 7: L_non-mask + lambda L_mask + beta L_grad + gamma L_MPD."""
    return l_non + w.mask * l_mask + w.grad * l_grad + w.mpd * l_mpd
