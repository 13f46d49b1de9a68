"""Gradients reach the AST-RoPE predictor on every RoPE backend that runs here (issue 14's defect: the Triton
kernel returned no gradient for positions, so on a GPU the predictor never learned).

Backends: "torch" always; "triton" through Triton's interpreter on CPU (TRITON_INTERPRET=1, set here before
triton is imported when no GPU is present), or the compiled kernel on CUDA. Same seed, same data: the Triton
path must train like the torch path, for flow matching alone, with the self-distillation terms, and for the
joint LoRA + alpha path.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401  (the skip below: the class must import)
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers' WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.kernels import triton_status  # noqa: E402
from ffprop.nodes.ast_rope.patch import apply_ast_rope  # noqa: E402
from ffprop.nodes.ast_rope.positions import AlphaHolder, RopeAlphas  # noqa: E402
from ffprop.nodes.ast_rope.predictor import PredictorConfig  # noqa: E402
from ffprop.nodes.ast_rope.train import PredictorSample, PredictorTrainSettings, train_predictor  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from tiny_wan import seeded_tiny_wan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TRITON_OK, TRITON_WHY = triton_status("cuda" if DEVICE == "cuda" else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY))]
SMALL = dict(width=32, depth=1, heads=2, grid=2, alpha_max=2.0)
F, H, W = 3, 4, 4


def tiny(seed: int = 0) -> DiffusersWan:
    return seeded_tiny_wan(seed, device=DEVICE)


def sample(seed: int = 1, pair: bool = False) -> PredictorSample:
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, 16, F, H, W, generator=g).cumsum(2).to(DEVICE)     # a drifting (moving) latent
    keep = torch.zeros(1, 4, F, H, W, device=DEVICE)
    keep[:, :, 0] = 1
    c = WanCond(keep, torch.randn(1, 16, F, H, W, generator=g).to(DEVICE), torch.randn(1, 8, 32, generator=g).to(DEVICE))
    if not pair:
        return PredictorSample(src, src, c)
    edited = src + 0.5 * torch.randn(src.shape, generator=g).to(DEVICE)
    return PredictorSample(src, edited, c, src, WanCond(keep, src.roll(1, 1), c.context))


@pytest.fixture(scope="module")
def wan() -> DiffusersWan:
    return tiny()


def run(wan, backend: str, distill: bool = False, variant: str = "warped"):
    settings = PredictorTrainSettings(steps=4, learning_rate=5e-2, backend=backend, self_distill=distill, seed=3,
                                      variant=variant)
    config = PredictorConfig(**SMALL, arch="paper" if variant == "paper" else "frames")
    return train_predictor(wan, [sample(pair=distill)], settings, config=config)


@pytest.mark.parametrize("distill,variant", [(False, "warped"), (True, "warped"), (False, "paper")],
                         ids=["flow_matching", "self_distill", "paper_heads"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_predictor_learns_on_every_backend(wan, backend, distill, variant):
    res = run(wan, backend, distill, variant)
    moved = float((res.alphas.alpha_t - 1).abs().max())
    assert moved > 1e-3, f"{backend}: alpha_T stayed at 1 ({res.alphas.describe()}): no gradient reached the predictor"
    if backend != "torch":                              # the same training as the reference path
        ref = run(wan, "torch", distill, variant)
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.alphas.alpha_t, ref.alphas.alpha_t, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_lora_and_alpha_get_gradients(wan, backend):
    """The joint path (LoRA-Edit's LoRA on the DiT + a trainable alpha through AlphaHolder): one backward gives
    both a gradient, equal to the torch path's."""
    from ffprop.nodes.lora_edit.lora import attach_hooks, create_lora

    def grads(bk: str):
        s = sample(seed=5)
        lora = create_lora(wan, rank=2, seed=1, device=DEVICE)
        with torch.no_grad():
            for layer in lora.layers:                    # up != 0 so the LoRA's down matrices also get gradient
                layer.up.copy_(0.01 * torch.ones_like(layer.up))
        detach = attach_hooks(wan, lora)
        try:
            holder = AlphaHolder()
            hooked = apply_ast_rope(wan, holder, bk)
            log_a = torch.zeros(2, device=DEVICE, requires_grad=True)
            holder.alphas = RopeAlphas(log_a[0].exp(), log_a[1].exp())
            noise = torch.randn(s.target.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
            v = hooked.predict(0.5 * s.target + 0.5 * noise, 0.5, s.cond)
            (v - (noise - s.target)).pow(2).mean().backward()
        finally:
            detach()
        lora_grad = torch.stack([layer.down.grad.norm() for layer in lora.layers]).norm()
        return log_a.grad, lora_grad

    a_grad, l_grad = grads(backend)
    assert a_grad is not None and bool((a_grad.abs() > 1e-6).all()), f"{backend}: alpha gradient {a_grad}"
    assert float(l_grad) > 1e-6
    if backend != "torch":
        ref_a, ref_l = grads("torch")
        torch.testing.assert_close(a_grad, ref_a, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(l_grad, ref_l, rtol=1e-4, atol=1e-7)
