"""Helpers for tests that need ComfyUI (tiers nodes/e2e): import it as a library, build tiny random Wan models.

Usage: `from comfy_support import import_comfy, load_tiny_comfy_wan` (tests/ is on sys.path via conftest).
"""

from __future__ import annotations

import contextlib
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
            f"COMFYUI_DIR={root} <its venv>/bin/python -m pytest tests/nodes",
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
    return random_state_dict(model, seed)


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for any ComfyUI model built with `disable_weight_init` layers (which leave their
    weights uninitialised): norm weights 1 + noise, everything else N(0, 0.02^2), drawn in sorted key order."""
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


UNSUPPORTED_KINDS = {
    # kind: ComfyUI config class the host detects it as (models FFProp must refuse with a clear error)
    "ti2v_5b": "WAN22_T2V",
    "vace": "WAN21_Vace",
    "animate": "WAN22_Animate",
    "flux": "FluxSchnell",
}


def tiny_unsupported_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny weights, built from the host's own classes, for a model ComfyUI loads but FFProp does not drive:
    Wan 2.2 TI2V-5B (48-channel latent), Wan VACE, Wan 2.2 Animate (5 layers: its face adapter has
    num_layers // 5 blocks) or Flux. Skips the calling test when this host lacks the class."""
    import_comfy()
    import dataclasses

    import comfy.ops

    ops = comfy.ops.disable_weight_init
    wan = dict(dim=128, ffn_dim=256, num_heads=1, text_dim=4096, out_dim=16, device="cpu", dtype=torch.float32,
               operations=ops)
    try:
        if kind == "ti2v_5b":
            from comfy.ldm.wan.model import WanModel

            model = WanModel(model_type="t2v", in_dim=48, num_layers=2, **{**wan, "out_dim": 48})
        elif kind == "vace":
            from comfy.ldm.wan.model import VaceWanModel

            model = VaceWanModel(in_dim=16, num_layers=2, vace_layers=1, vace_in_dim=96, **wan)
        elif kind == "animate":
            from comfy.ldm.wan.model_animate import AnimateWanModel

            model = AnimateWanModel(in_dim=36, num_layers=5, **wan)
        elif kind == "flux":
            from comfy.ldm.flux.model import Flux, FluxParams

            params = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                          mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                          theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False, txt_ids_dims=[])
            known = {f.name for f in dataclasses.fields(FluxParams)}
            model = Flux(device="cpu", dtype=torch.float32, operations=ops,
                         **{k: v for k, v in params.items() if k in known})
        else:
            raise ValueError(f"unknown unsupported kind '{kind}'; use one of {sorted(UNSUPPORTED_KINDS)}")
    except ImportError as e:
        pytest.skip(f"this ComfyUI has no {kind} model class ({e})")
    return random_state_dict(model, seed)


def load_tiny_comfy_wan(kind: str = "i2v", **kwargs):
    """A ComfyUI MODEL (ModelPatcher) for tiny_wan_state_dict(kind, **kwargs), loaded the way ComfyUI does;
    kinds in UNSUPPORTED_KINDS load tiny_unsupported_state_dict(kind) instead."""
    import_comfy()
    import comfy.sd

    if kind not in UNSUPPORTED_KINDS:
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(tiny_wan_state_dict(kind, **kwargs)))
    else:
        try:
            patcher = comfy.sd.load_diffusion_model_state_dict(dict(tiny_unsupported_state_dict(kind, **kwargs)))
        except RuntimeError as e:   # e.g. 0.3.64 builds Flux with a fixed hidden size 3072, whatever the weights
            pytest.skip(f"this ComfyUI cannot load a tiny {kind} model: {str(e).splitlines()[0][:160]}")
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the tiny '{kind}' state dict as any model")
    return patcher


@contextlib.contextmanager
def cancelled():
    """Run the block with ComfyUI's Cancel flag set (what POST /interrupt sets) and expect it to stop with
    InterruptProcessingException; the flag is cleared afterwards."""
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            yield
    finally:
        mm.interrupt_current_processing(False)


class FakeVAE:
    """vae.encode(IMAGE [T, H, W, 3]) -> [1, 16, F, H/8, W/8] like ComfyUI's Wan VAE (a deterministic toy; no ComfyUI needed)."""

    def __init__(self):
        self.proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))

    def encode(self, frames):
        x = frames.permute(0, 3, 1, 2) * 2 - 1
        groups = [x[:1]] + [x[i:i + 4].mean(0, keepdim=True) for i in range(1, x.shape[0], 4)]
        x = torch.nn.functional.avg_pool2d(torch.cat(groups), 8)
        return torch.einsum("oc,fchw->ofhw", self.proj, x)[None]


def clip_and_mask(frames: int = 9, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random clip IMAGE [T, H, W, 3] and a square object MASK [T, H, W] (rows/cols 8:24) for the
    trainer node tests."""
    g = torch.Generator().manual_seed(0)
    src = torch.rand(frames, height, width, 3, generator=g)
    mask = torch.zeros(frames, height, width)
    mask[:, 8:24, 8:24] = 1
    return src, mask
