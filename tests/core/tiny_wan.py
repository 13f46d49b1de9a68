"""A tiny diffusers Wan 2.1 I2V DiT for core tests whose weights come from a local generator, so every process
(a gloo rank, a re-run) builds the same model. Import it after the test module's diffusers skip."""

from __future__ import annotations

import torch


def seeded_tiny_wan(seed: int = 0, heads: int = 2, device: str | torch.device = "cpu"):
    """DiffusersWan over WanTransformer3DModel (2 layers, `heads` x 12, 36 input channels), weights N(0, 0.2^2)."""
    from diffusers import WanTransformer3DModel
    from ffprop.nodes.host.diffusers import DiffusersWan

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12,
                                      in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48,
                                      num_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return DiffusersWan(model.eval().to(device))
