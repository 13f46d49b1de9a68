"""FreeProp's teacher losses (SEED_SPEC 3.6): L_motion on Gram matrices of pooled block tokens, L_MMD on the drift
scores d_i = MMD^2(P_1, P_i). Zero when student = teacher; positive otherwise, and they fall when the student
follows their gradient."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.ast_rope.teacher import MIN_BANDWIDTH, drift_scores, pooled_tokens, teacher_losses

GRID = (4, 4)


def tokens(seed: int, frames: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 16, 8, generator=g)
    return base + 0.4 * torch.randn(1, frames, 16, 8, generator=g).cumsum(1)    # frames drift from frame 1


def test_zero_at_the_teacher_positive_elsewhere_and_decreasing_under_their_gradient():
    ht = tokens(0)
    lm, ld = teacher_losses(ht.clone(), ht, GRID)
    assert lm.item() == 0.0 and ld.item() == 0.0
    hs = (ht + 0.8 * torch.randn(ht.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    opt = torch.optim.SGD([hs], lr=0.5)
    history = []
    for _ in range(25):
        lm, ld = teacher_losses(hs, ht, GRID)
        history.append((lm.item(), ld.item()))
        opt.zero_grad()
        (5 * lm + ld).backward()
        opt.step()
    assert history[0][0] > 1e-2 and history[0][1] > 1e-3, history[0]
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][1] < 0.5 * history[0][1], (history[0], history[-1])


def test_terms_measure_relations_not_magnitudes_and_drift_grows_with_change():
    ht = tokens(2)
    scaled = ht * (torch.rand(1, 4, 16, 1, generator=torch.Generator().manual_seed(3)) + 0.5)
    lm, ld = teacher_losses(scaled, ht, GRID, k_s=1)
    assert lm.item() < 1e-5 and abs(ld.item()) < 1e-5                  # per-token scale: tokens are normalised
    d, _ = drift_scores(pooled_tokens(tokens(4, frames=5), GRID, 1))
    assert d.shape == (1, 4) and bool((d[0, 1:] >= d[0, :-1] - 1e-4).all()), d   # further from frame 1: more drift


def test_near_parallel_tokens_keep_the_mmd_bandwidth_floored(monkeypatch):
    """Tokens that share one dominant direction (as the small world DiT's do) make every row of S_i almost equal:
    the median heuristic alone picks sigma^2 ~ 5e-6, and a small perturbation of the student then costs an L_MMD
    as large as a whole flow-matching loss (the world row's FM loss rose in training). Floored at MIN_BANDWIDTH
    the same perturbation costs ~1e-5 with a small, nonzero gradient."""
    import ffprop.nodes.ast_rope.teacher as teacher

    g = torch.Generator().manual_seed(5)
    ht = 3 * torch.randn(1, 1, 1, 8, generator=g) + 0.3 * torch.randn(1, 4, 16, 8, generator=g)
    hs = ht + 0.3 * torch.randn(ht.shape, generator=g)

    def mmd(floor: float) -> tuple[float, float, float]:
        monkeypatch.setattr(teacher, "MIN_BANDWIDTH", floor)
        x = hs.clone().requires_grad_(True)
        _, used = drift_scores(pooled_tokens(ht, GRID))
        _, ld = teacher_losses(x, ht, GRID)
        ld.backward()
        return float(torch.stack(used).median()), ld.item(), float(x.grad.norm())

    sigma2, old_loss, old_grad = mmd(1e-6)                 # the median heuristic alone (its old 1e-6 clamp)
    assert sigma2 < 1e-4 and old_loss > 0.1 and old_grad > 0.5, (sigma2, old_loss, old_grad)
    sigma2, loss, grad = mmd(MIN_BANDWIDTH)
    assert sigma2 == MIN_BANDWIDTH and 0 < loss < 1e-3 and 0 < grad < 1e-2, (sigma2, loss, grad)


def test_bad_shapes():
    with pytest.raises(ValueError, match="patch grid"):
        teacher_losses(tokens(0), tokens(0), (3, 4))
    with pytest.raises(ValueError, match="must match"):
        teacher_losses(tokens(0), tokens(0, frames=3), GRID)
