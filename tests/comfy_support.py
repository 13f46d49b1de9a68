"""Helpers for tests that need ComfyUI (tiers nodes/e2e): import it as a library, build tiny random Wan models.

Usage: `from comfy_support import import_comfy, load_tiny_comfy_wan` (tests/ is on sys.path via conftest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TINY_KINDS = {
    # kind: (model_type, in_dim, ComfyUI config class it must be detected as)
    "i2v": ("i2v", 36, "WAN21_I2V"),
    "t2v": ("t2v", 16, "WAN21_T2V"),
    "fun_control": ("i2v", 48, "WAN21_FunControl2V"),
}


def comfyui_dir() -> Path | None:
    """The ComfyUI source tree named by COMFYUI_DIR, or None when unset."""
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser().resolve() if value else None


def import_comfy() -> None:
    """Make ComfyUI importable as a CPU-only library, or skip the calling test/module with the reason."""
    root = comfyui_dir()
    if root is None:
        pytest.skip("COMFYUI_DIR is not set; set it to a ComfyUI checkout to run tier nodes/e2e tests",
                    allow_module_level=True)
    if not (root / "comfy" / "model_management.py").is_file():
        pytest.skip(f"COMFYUI_DIR={root} is not a ComfyUI checkout (no comfy/model_management.py)",
                    allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as e:
        pytest.skip(
            f"ComfyUI at {root} cannot be imported with {sys.executable} ({e}); run with the ComfyUI venv, e.g. "
            f"COMFYUI_DIR={root} /work/comfy-venv/bin/python -m pytest tests/nodes",
            allow_module_level=True,
        )


def tiny_wan_state_dict(kind: str = "i2v", dim: int = 128, num_layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's own WanModel in raw diffusion-model keys (`head.modulation`, `blocks.0...`).

    kind: "i2v" (in_dim 36, img_emb), "t2v" (in_dim 16) or "fun_control" (in_dim 48, img_emb). dim must be a
    multiple of 128 (ComfyUI derives num_heads = dim // 128); text_dim is 4096 as ComfyUI always builds it.
    Norm weights are 1 + noise, everything else N(0, 0.02^2), drawn from one seeded generator."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny Wan kind '{kind}'; use one of {sorted(TINY_KINDS)}")
    if dim % 128:
        raise ValueError(f"dim must be a multiple of 128 (ComfyUI detects num_heads = dim // 128); got {dim}")
    model_type, in_dim, _ = TINY_KINDS[kind]
    model = WanModel(
        model_type=model_type, in_dim=in_dim, dim=dim, ffn_dim=2 * dim, num_heads=dim // 128,
        num_layers=num_layers, text_dim=4096, out_dim=16, device="cpu", dtype=torch.float32,
        operations=comfy.ops.disable_weight_init,
    )
    norm_weights = {
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(mod).__name__ == "RMSNorm"
    }
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(model.state_dict().items()):
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float32) * 0.02
        out[key] = (noise + 1.0 if key in norm_weights else noise).contiguous()
    return out


def load_tiny_comfy_wan(kind: str = "i2v", **kwargs):
    """A ComfyUI MODEL (ModelPatcher) for tiny_wan_state_dict(kind, **kwargs), loaded the way ComfyUI does."""
    import_comfy()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(tiny_wan_state_dict(kind, **kwargs)))
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the tiny '{kind}' Wan state dict as any model")
    return patcher
