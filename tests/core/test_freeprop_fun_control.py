"""The FreeProp teacher on a Fun-Control base (48 input channels: the world's Fun-Control DiT, real VAE encodes
through pair_sample): L_motion = L_MMD = 0 when the student's inputs are the teacher's (the edited clip is the
source), positive when they differ; the LoRA trains and the DiT stays frozen."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers", reason="the world models need diffusers")

from ffprop.nodes.ast_rope.freeprop import FreePropSettings, pair_sample, train_freeprop  # noqa: E402
from ffprop.nodes.ast_rope.predictor import PredictorConfig  # noqa: E402

SETTINGS = FreePropSettings(steps=3, rank=4, learning_rate=1e-2, backend="torch", variant="global",
                            predictor=PredictorConfig(width=32, depth=1, heads=2, grid=2))


@pytest.fixture(scope="module")
def world():
    try:
        from ffprop.nodes.world.model import load_fun_control, load_world_models

        return load_world_models(), load_fun_control()
    except Exception as e:  # noqa: BLE001 - the world engineer may be replacing the weights
        pytest.skip(f"world models unavailable: {e}")


def clips() -> tuple[torch.Tensor, torch.Tensor]:
    """A 5-frame 32x32 clip with a square moving right, and the same clip with the square recoloured."""
    src = torch.full((5, 32, 32, 3), 0.3)
    src[..., 2] = torch.linspace(0.2, 0.8, 32)
    edited = src.clone()
    for i in range(5):
        src[i, 8:20, 2 + 2 * i:14 + 2 * i] = torch.tensor([0.9, 0.7, 0.1])
        edited[i, 8:20, 2 + 2 * i:14 + 2 * i] = torch.tensor([0.1, 0.3, 0.9])
    return src, edited


def test_fun_control_teacher_is_zero_for_equal_inputs_and_positive_otherwise(world):
    models, fun = world
    assert fun.dims.in_channels == 48
    src, edited = clips()
    context = torch.zeros(1, 1, fun.dims.text_dim)
    same = pair_sample(src, src, models.vae.encode, context, "fun_control")
    assert torch.equal(same.cond.cond_latent, same.teacher_cond.cond_latent)
    assert same.cond.cond_latent.shape[1] == 32 and same.cond.keep_mask is None
    res = train_freeprop(fun, [same], 1, replace(SETTINGS, steps=2))
    assert all(p["motion"] == 0.0 and p["mmd"] == 0.0 for p in res.parts), res.parts

    diff = pair_sample(src, edited, models.vae.encode, context, "fun_control")
    ctrl = diff.cond.cond_latent[:, :16]
    assert torch.equal(ctrl, diff.source_latent) and torch.equal(diff.teacher_cond.cond_latent[:, :16], diff.target)
    before = {k: v.clone() for k, v in fun.model.state_dict().items()}
    res = train_freeprop(fun, [diff], 1, SETTINGS)
    assert min(p["motion"] for p in res.parts) > 0 and min(p["mmd"] for p in res.parts) > 0, res.parts
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert max(float(la.up.detach().abs().max()) for _, la in res.model.lora.items()) > 0
    assert all(torch.equal(v, before[k]) for k, v in fun.model.state_dict().items()), "the DiT stays frozen"
    with pytest.raises(ValueError, match="must match the source clip"):
        pair_sample(src, edited[:, :16], models.vae.encode, context, "fun_control")
