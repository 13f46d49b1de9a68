"""Tiny Wan 2.2 checkpoints in ComfyUI's layout, built from ComfyUI's own WanModel class: the two I2V A14B experts
(Wan 2.1 blocks, 36 input channels, no CLIP image embedder, so ComfyUI detects them as WAN21_T2V and its
concat_cond still builds mask + image) and a TI2V-5B (48-channel Wan 2.2 latent) that FFProp must refuse.

The real experts differ only in their weights (the low-noise one is fine-tuned for sigma < 0.9); here the two
are drawn from different seeds. File names follow ComfyUI's repackaged files
(wan2.2_i2v_high_noise_14B_fp16.safetensors), so name-based expert detection sees them as users' files.
Needs ComfyUI importable (`comfy_support.import_comfy()`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

WAN22_EXPERTS = {"high_noise": "ffp_tiny_wan2.2_i2v_high_noise.safetensors",
                 "low_noise": "ffp_tiny_wan2.2_i2v_low_noise.safetensors"}
TI2V_NAME = "ffp_tiny_wan2.2_ti2v_5B.safetensors"
SEEDS = {"high_noise": 20, "low_noise": 21}


def tiny_wan22_expert_state_dict(role: str, dim: int = 128, num_layers: int = 2) -> dict[str, torch.Tensor]:
    """Random weights of one Wan 2.2 I2V A14B-layout expert (model_type t2v + in_dim 36, no img_emb)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    from comfy_support import random_state_dict

    if role not in SEEDS:
        raise ValueError(f"unknown expert '{role}'; use one of {sorted(SEEDS)}")
    model = WanModel(model_type="t2v", in_dim=36, dim=dim, ffn_dim=2 * dim, num_heads=dim // 128,
                     num_layers=num_layers, text_dim=4096, out_dim=16, device="cpu", dtype=torch.float32,
                     operations=comfy.ops.disable_weight_init)
    return random_state_dict(model, SEEDS[role])


def write_wan22_models(models_dir: Path) -> dict[str, float]:
    """Write both tiny experts and the tiny TI2V-5B into <models_dir>/diffusion_models; returns build seconds."""
    from comfy_support import tiny_unsupported_state_dict
    from e2e_models import save_safetensors

    t0 = time.perf_counter()
    folder = Path(models_dir) / "diffusion_models"
    for role, name in WAN22_EXPERTS.items():
        save_safetensors(tiny_wan22_expert_state_dict(role), folder / name, f"tiny random Wan 2.2 I2V {role} expert")
    save_safetensors(tiny_unsupported_state_dict("ti2v_5b"), folder / TI2V_NAME, "tiny random Wan 2.2 TI2V-5B")
    return {"wan22": time.perf_counter() - t0}
