"""Tiny model files for the e2e server: tiny random Wan 2.1 DiTs and a random Wan 2.1 VAE, in ComfyUI's format.

The DiTs come from `comfy_support.tiny_wan_state_dict` (ComfyUI's own WanModel class, dim 128, 2 layers).
The VAE cannot be made small: ComfyUI detects a Wan 2.1 VAE by its keys and always builds the fixed
architecture (comfy/sd.py: dim 96, z 16, dim_mult [1, 2, 4, 4]; 126.9M parameters, about 254 MB in fp16),
so it is built once from `comfy.ldm.wan.vae.WanVAE` with explicitly filled weights (comfy ops leave them
uninitialised) and cached. Needs ComfyUI importable (call `comfy_support.import_comfy()` first).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# File names the harness writes into <base>/models; workflows point at them with extra.ffprop_ci.inputs.
WAN_KINDS = ("i2v", "t2v", "fun_control")
VAE_NAME = "ffp_random_wan21_vae.safetensors"
VAE_VERSION = "v1"  # bump when the filling rule changes, so stale cached VAEs are not reused


def tiny_wan_name(kind: str) -> str:
    return f"ffp_tiny_wan21_{kind}.safetensors"


# comfy/sd.py VAE.__init__, Wan 2.1 branch
WAN21_VAE_CONFIG = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                    "temperal_downsample": [False, True, True], "dropout": 0.0}


def random_wan21_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A Wan 2.1 VAE state dict with seeded random weights: conv/linear weights ~ N(0, 1/fan_in), biases 0,
    RMS-norm gammas 1. Keys and shapes are exactly ComfyUI's (so `comfy.sd.VAE` detects a Wan 2.1 VAE)."""
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        model = comfy.ldm.wan.vae.WanVAE(**WAN21_VAE_CONFIG)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("gamma"):
            t = torch.ones(p.shape)
        elif name.endswith("bias") or p.ndim < 2:
            t = torch.zeros(p.shape)
        else:
            fan_in = math.prod(p.shape[1:])
            t = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        sd[name] = t.to(dtype).contiguous()
    return sd


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, note: str) -> Path:
    """Write to a temp name and rename, so an interrupted run never leaves a half-written model behind."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"ffprop_e2e": note})
    os.replace(tmp, path)
    return path


def cached_random_vae(cache_dir: Path, seed: int = 0) -> Path:
    """The random VAE file in cache_dir, built on first use (about 254 MB)."""
    path = Path(cache_dir) / f"ffp_random_wan21_vae_{VAE_VERSION}_s{seed}.safetensors"
    if not path.is_file():
        save_safetensors(random_wan21_vae_state_dict(seed), path, "random Wan 2.1 VAE (test only)")
    return path


def write_models(models_dir: Path, cache_dir: Path) -> dict[str, float]:
    """Fill <models_dir>/diffusion_models and /vae with the tiny test models; return build times in seconds."""
    from comfy_support import tiny_wan_state_dict

    times = {}
    for kind in WAN_KINDS:
        t0 = time.perf_counter()
        sd = tiny_wan_state_dict(kind)
        save_safetensors(sd, Path(models_dir) / "diffusion_models" / tiny_wan_name(kind), f"tiny random Wan 2.1 {kind}")
        times[f"wan_{kind}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vae = cached_random_vae(cache_dir)
    dst = Path(models_dir) / "vae" / VAE_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(vae)
    times["vae"] = time.perf_counter() - t0
    times.update(__import__("e2e_wan22").write_wan22_models(Path(models_dir)))   # Wan 2.2 experts (e2e_wan22.py)
    times.update(__import__("e2e_freeprop").write_freeprop_model(Path(models_dir)))   # FreeProp (e2e_freeprop.py)
    return times


def registered_node_ids() -> list[str]:
    """Node ids in ffprop.nodes.registry.NODES (imports ComfyUI's comfy_api)."""
    from comfy_support import import_comfy

    import_comfy()
    from ffprop.nodes.registry import NODES

    return [n.GET_SCHEMA().node_id for n in NODES]


def in_python(python: str, command: str, *args: str, timeout: float = 600) -> object:
    """Run this module's command with another interpreter (the one that runs the server, COMFY_PYTHON) and
    return its JSON answer; used when the pytest interpreter cannot import ComfyUI itself."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not resolve(): venv pythons are symlinks
        return COMMANDS[command](*args)
    proc = subprocess.run([python, __file__, command, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} {Path(__file__).name} {command} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def templates_dir() -> str | None:
    """Where ComfyUI's bundled workflow templates are, if installed: comfyui_workflow_templates/templates up to
    0.1.x (ComfyUI 0.3.64), comfyui_workflow_templates_json/templates in the multi-bundle 0.11.x (ComfyUI 0.28)."""
    import importlib.util

    for package in ("comfyui_workflow_templates_json", "comfyui_workflow_templates"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            if any((Path(root) / "templates").glob("*.json")):
                return str(Path(root) / "templates")
    return None


SAM2_NAME = "ffp_random_sam2.1_hiera_tiny.safetensors"


def write_sam2(models_dir: Path) -> dict[str, float]:
    """A random-weight SAM2.1 tiny checkpoint (official key layout) in <models_dir>/sam2, so workflows with
    FFPSAM2Loader execute (quality is measured elsewhere). Skipped, with the reason returned, when the server's
    Python lacks the sam2 package: FFPMaskPropagate's engine 'auto' then takes the flow fallback."""
    t0 = time.perf_counter()
    try:
        from ffprop.nodes.masks.sam2_model import random_checkpoint, require_sam2

        require_sam2()
    except (ImportError, RuntimeError) as e:
        return {"skipped": str(e)}
    dst = Path(models_dir) / "sam2" / SAM2_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        random_checkpoint(dst, "tiny", "2.1", seed=0)
    return {"sam2": time.perf_counter() - t0}


COMMANDS = {
    "templates-dir": templates_dir,
    "write-models": lambda models_dir, cache_dir: write_models(Path(models_dir), Path(cache_dir)),
    "registry-ids": registered_node_ids,
    "write-sam2": lambda models_dir: write_sam2(Path(models_dir)),
    "write-world": lambda models_dir, cache_dir: __import__("e2e_world").write_world_models(  # e2e_world.py
        Path(models_dir), Path(cache_dir)),
    "world-vae-check": lambda cache_dir: __import__("e2e_world").world_vae_check(cache_dir),
}

if __name__ == "__main__":  # python e2e_models.py write-models <models_dir> <cache_dir> | registry-ids
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])))
