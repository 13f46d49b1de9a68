"""FreeProp's identity-propagation teacher losses as the CVPR 2026 notes describe them (SEED_SPEC 3.6).

Student and teacher are the same model; the teacher is given the target video in the source slot and its own
first frame (identity propagation). From the tokens of block l, [B, F, N = h * w, d] per side:
  z        = tokens average-pooled spatially by K_S (VideoREPA), then L2-normalised per token -> [B, F, n, d]
  L_motion = 1 / (F (F - 1)) sum_{i != j} mean | G_ij - G^_ij |,   G_ij = z_i z_j^T  (n x n Gram block)
  L_MMD    = sum_{i = 2..F} | d_i - d^_i |,   d_i = MMD^2(P_1, P_i),   P_i = rows of S_i = z_1 z_i^T
with an RBF kernel whose bandwidth is the median heuristic on the teacher's rows (detached; the notes give none),
floored at MIN_BANDWIDTH: on near-parallel tokens (the world DiT's pooled tokens: median sigma^2 1e-5, a tenth
of them at the old 1e-6 clamp) the kernel saturates and L_MMD's gradient (~1 / sigma^2) swamps L_FM (FreeProp's
world row: validation FM loss 0.973, above its untrained base 0.894; floored at 0.1: 0.558, at 1.0: 0.514).
Weights in the total loss: L = L_FM + 5 L_motion + 1 L_MMD. Both are exactly 0 when the two sides are equal.
The earlier reading (SEED_SPEC 3.4) stays in train.py (motion_loss / drift_loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

LAMBDA_MOTION = 5.0
LAMBDA_MMD = 1.0
MIN_BANDWIDTH = 1.0     # sigma^2 floor of the RBF kernel (rows of S_i hold cosine similarities, entries in [-1, 1])


def pooled_tokens(h: Tensor, grid: tuple[int, int], k_s: int = 2) -> Tensor:
    """Block tokens [B, F, N, d] on an h x w grid (N = h * w) -> normalised tokens [B, F, n, d], average-pooled
    by k_s (ceil mode: a grid smaller than k_s pools to one token)."""
    b, f, n, d = h.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"{n} tokens per frame do not form the {gh}x{gw} patch grid.")
    if k_s < 1:
        raise ValueError(f"K_S (spatial downsampling of the relation tokens) must be >= 1; got {k_s}.")
    x = rearrange(h.float(), 'b f (gh gw) d -> (b f) d gh gw', gh=gh)
    if k_s > 1:
        x = F.avg_pool2d(x, k_s, ceil_mode=True)
    return F.normalize(rearrange(x, '(b f) d gh gw -> b f (gh gw) d', b=b), dim=-1)


def motion_loss(zs: Tensor, zt: Tensor) -> Tensor:
    """L_motion between student and teacher pooled tokens [B, F, n, d] (teacher zt without grad)."""
    f = zs.shape[1]
    if f < 2:
        return zs.new_zeros(())
    gs = torch.einsum("bind,bjmd->bijnm", zs, zs)
    gt = torch.einsum("bind,bjmd->bijnm", zt, zt)
    off = ~torch.eye(f, dtype=torch.bool, device=zs.device)
    return (gs - gt).abs().mean(dim=(-1, -2))[:, off].mean()


def _mmd2(p: Tensor, q: Tensor, sigma2: Tensor) -> Tensor:
    """V-statistic MMD^2 between row sets p [n, m] and q [n, m] with an RBF kernel of bandwidth sigma2."""
    k = lambda a, c: torch.exp(-torch.cdist(a, c).pow(2) / (2 * sigma2))  # noqa: E731
    return k(p, p).mean() + k(q, q).mean() - 2 * k(p, q).mean()


def _bandwidth(p: Tensor, q: Tensor) -> Tensor:
    d2 = torch.cdist(torch.cat([p, q]), torch.cat([p, q])).pow(2).detach()
    pos = d2[d2 > 0]
    return pos.median().clamp_min(MIN_BANDWIDTH) if pos.numel() else d2.new_tensor(MIN_BANDWIDTH)


def drift_scores(z: Tensor, bandwidths: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Per-frame drift d_i = MMD^2(P_1, P_i) for i = 2..F of pooled tokens z [B, F, n, d] -> ([B, F-1], the
    bandwidths used: given, or the median heuristic of these rows)."""
    b, f = z.shape[:2]
    rows = torch.einsum("bnd,bfmd->bfnm", z[:, 0], z)                 # S_i = z_1 z_i^T, rows = P_i
    out, used = [], []
    for bi in range(b):
        di = []
        for i in range(1, f):
            k = bi * (f - 1) + i - 1
            sigma2 = bandwidths[k] if bandwidths is not None else _bandwidth(rows[bi, 0], rows[bi, i])
            used.append(sigma2)
            di.append(_mmd2(rows[bi, 0], rows[bi, i], sigma2))
        out.append(torch.stack(di) if di else z.new_zeros(0))
    return torch.stack(out), used


def mmd_loss(zs: Tensor, zt: Tensor) -> Tensor:
    """L_MMD = sum_i |d_i - d^_i| (mean over the batch); the teacher's bandwidths serve both sides."""
    if zs.shape[1] < 2:
        return zs.new_zeros(())
    dt, bw = drift_scores(zt)
    ds, _ = drift_scores(zs, bw)
    return (ds - dt.detach()).abs().sum(dim=1).mean()


def teacher_losses(hs: Tensor, ht: Tensor, grid: tuple[int, int], k_s: int = 2) -> tuple[Tensor, Tensor]:
    """(L_motion, L_MMD) of student block tokens hs and teacher block tokens ht, [B, F, N, d] each."""
    if hs.shape != ht.shape:
        raise ValueError(f"student tokens {tuple(hs.shape)} and teacher tokens {tuple(ht.shape)} must match.")
    zs, zt = pooled_tokens(hs, grid, k_s), pooled_tokens(ht.detach(), grid, k_s)
    return motion_loss(zs, zt), mmd_loss(zs, zt)
