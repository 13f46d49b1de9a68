"""A tiny FreeProp model (LoRA + AST-RoPE predictor in one file) for the e2e server's tiny Wan 2.1 I2V DiT, in
<models>/ast_rope, so workflows/freeprop.json runs on CPU. Trained for real (2 steps of train_freeprop on the
same tiny ComfyUI model on a seeded random pair), so the LoRA is not zero. The tiny DiT has one attention head:
variant global (the paper variant needs a head split). Needs ComfyUI importable (comfy_support.import_comfy)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

FREEPROP_NAME = "ffp_tiny_freeprop_i2v.safetensors"


def write_freeprop_model(models_dir: Path) -> dict[str, float]:
    """Write <models_dir>/ast_rope/FREEPROP_NAME; returns {"freeprop": seconds}."""
    from comfy_support import load_tiny_comfy_wan
    from ffprop.nodes.ast_rope.freeprop import FreePropSettings, save_freeprop, train_freeprop
    from ffprop.nodes.ast_rope.predictor import PredictorConfig
    from ffprop.nodes.ast_rope.train import PredictorSample
    from ffprop.nodes.host.comfy import ComfyWan
    from ffprop.nodes.host.protocol import WanCond

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    f, h, w = 3, 4, 4
    keep = torch.zeros(1, 4, f, h, w)
    keep[:, :, 0] = 1

    def cond() -> WanCond:
        return WanCond(keep, torch.randn(1, 16, f, h, w, generator=g), torch.randn(1, 8, 4096, generator=g),
                       torch.randn(1, 257, 1280, generator=g))
    src = torch.randn(1, 16, f, h, w, generator=g).cumsum(2)
    sample = PredictorSample(src, src + 0.5 * torch.randn(src.shape, generator=g), cond(), src, cond())
    settings = FreePropSettings(steps=2, rank=4, learning_rate=1e-2, backend="torch", variant="global",
                                predictor=PredictorConfig(width=32, depth=1, heads=2, grid=2))
    res = train_freeprop(ComfyWan(load_tiny_comfy_wan("i2v")), [sample], 1, settings)
    save_freeprop(Path(models_dir) / "ast_rope" / FREEPROP_NAME, res.model, {"ffprop_e2e": "tiny FreeProp (test)"})
    return {"freeprop": time.perf_counter() - t0}
