"""Load the small trained Wan world models bundled in nodes/world/weights/ (see train.py for how they were made).

    world = load_world_models(device="cpu")
    world.vae   # host.vae.DiffusersWanVAE over a diffusers AutoencoderKLWan (encode IMAGE -> model-space latent)
    world.dit   # host.diffusers.DiffusersWan over a diffusers WanTransformer3DModel (I2V, 36 input channels)
    world.context(batch)  # the text context to pass: zeros [batch, 1, 4096] (the DiT ignores its text)
    fun = load_fun_control()   # the Fun-Control DiT (48 input channels: x_t, control latent, start-image latent)

Every file is checked against weights/manifest.json before use (present, sha256, config builds the class and
the weights fit it exactly); a failed check raises with the file's path and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

WEIGHTS = Path(__file__).resolve().parent / "weights"
FILES = {"vae": "vae.safetensors", "dit_i2v": "dit_i2v.safetensors", "dit_fun_control": "dit_fun_control.safetensors"}
RETRAIN = {
    "vae": "python -m ffprop.nodes.world.train vae --steps N --out DIR",
    "dit_i2v": "python -m ffprop.nodes.world.train dit --steps N --out DIR",
    "dit_fun_control": "python -m ffprop.nodes.world.train fun --init DIR --steps N --out DIR",
}


def _fix(name: str, folder: Path) -> str:
    paths = sorted({str(folder / FILES.get(name, name)), str(folder / "manifest.json")})
    return (f"restore it from git (git checkout -- {' '.join(paths)}) "
            f"or retrain it with `{RETRAIN.get(name, 'python -m ffprop.nodes.world.train')}` (the manifest's "
            "'command' is the exact one) and point the loader at DIR.")


def read_manifest(folder: Union[str, Path] = WEIGHTS) -> dict[str, Any]:
    """weights/manifest.json as a dict; RuntimeError naming the file when it is missing or unreadable."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise RuntimeError(f"world model manifest not found: {path}. " + _fix("manifest.json", Path(folder)))
    try:
        manifest = json.loads(path.read_text())
        manifest["models"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"world model manifest {path} is not valid ({e}). " + _fix("manifest.json", Path(folder))) from e
    return manifest


def _state(name: str, folder: Path, manifest: dict) -> tuple[dict[str, Tensor], dict]:
    """Verified (state_dict, config) of manifest entry `name`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .train import sha256

    entry = manifest["models"].get(name)
    if entry is None:
        raise RuntimeError(f"{folder / 'manifest.json'} has no entry '{name}' (has {sorted(manifest['models'])}). "
                           + _fix(name, folder))
    path = folder / entry["file"]
    if not path.is_file():
        raise RuntimeError(f"world model file missing: {path}. " + _fix(name, folder))
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise RuntimeError(f"world model file {path} is corrupt or was changed: sha256 {digest[:12]}... but the "
                           f"manifest says {entry['sha256'][:12]}.... " + _fix(name, folder))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RuntimeError(f"world model file {path} cannot be read as safetensors ({e}). " + _fix(name, folder)) from e
    return state, entry["config"]


def _build(cls, name: str, folder: Path, state: dict[str, Tensor], config: dict):
    """cls.from_config(config) with `state` loaded strictly; ValueError naming the file when they disagree."""
    try:
        model = cls.from_config(config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise ValueError(
            f"the config in {folder / 'manifest.json'} ('{name}') does not match the weights in "
            f"{folder / FILES.get(name, name)}: {' '.join(first[:3])[:400]}. The manifest and the file must come "
            "from the same training run: " + _fix(name, folder)
        ) from e
    return model.eval()


def load_vae_file(folder: Union[str, Path] = WEIGHTS):
    """The verified diffusers AutoencoderKLWan of folder/vae.safetensors (raw module, float32, CPU)."""
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    state, config = _state("vae", folder, read_manifest(folder))
    return _build(AutoencoderKLWan, "vae", folder, state, config)


def load_dit_file(folder: Union[str, Path] = WEIGHTS, name: str = "dit_i2v"):
    """The verified diffusers WanTransformer3DModel of a manifest entry (raw module, float32, CPU)."""
    from diffusers import WanTransformer3DModel

    folder = Path(folder)
    state, config = _state(name, folder, read_manifest(folder))
    return _build(WanTransformer3DModel, name, folder, state, config)


@dataclass
class WorldModels:
    """The bundled world models behind the repo's own host adapters (see the module docstring)."""

    vae: Any        # host.vae.DiffusersWanVAE
    dit: Any        # host.diffusers.DiffusersWan
    manifest: dict

    def context(self, batch: int = 1) -> Tensor:
        """Text context for `dit.predict`: zeros [batch, 1, text_dim] (the DiT's cross-attention output is zero,
        so any context gives the same velocity)."""
        dims = self.dit.dims
        return torch.zeros(batch, 1, dims.text_dim, device=self.dit.model.patch_embedding.weight.device)


def load_world_models(device: Union[str, torch.device] = "cpu", folder: Union[str, Path] = WEIGHTS) -> WorldModels:
    """Load and verify the world VAE and I2V DiT from `folder` (default: the bundled weights) onto `device`."""
    from ..host.diffusers import DiffusersWan
    from ..host.vae import DiffusersWanVAE

    folder = Path(folder)
    manifest = read_manifest(folder)
    vae = load_vae_file(folder).to(device)
    dit = load_dit_file(folder).to(device)
    return WorldModels(vae=DiffusersWanVAE(vae), dit=DiffusersWan(dit), manifest=manifest)


def load_fun_control(device: Union[str, torch.device] = "cpu", folder: Union[str, Path] = WEIGHTS):
    """The verified Fun-Control DiT of `folder` behind host.diffusers.DiffusersWan (48 input channels; pass
    WanCond(keep_mask=None, cond_latent=cat([control latent, start-image latent]) [B, 32, F, h, w], context))."""
    from ..host.diffusers import DiffusersWan

    return DiffusersWan(load_dit_file(folder, "dit_fun_control").to(device))


@torch.no_grad()
def generate_i2v(world: WorldModels, first: Tensor, frames: int = 17, steps: int = 20, shift: float = 3.0,
                 seed: int = 0) -> Tensor:
    """Stock I2V with the world models: first frame IMAGE [H, W, 3] (0..1) -> clip [frames, H, W, 3] in 0..1.

    Conditioning as lora_edit's stock I2V (frame 1 kept, the rest grey 0.5, keep-mask 0 there); the repo's
    flow-matching Euler sampler (host.sampling.sample) from seeded noise."""
    from ..host.sampling import sample
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from ..video.frames import latent_shape

    h, w, _ = first.shape
    v_cond, keep = masked_condition_video(first[None].expand(frames, h, w, 3), None, first)
    cond = wan_cond(world.vae.encode(v_cond), keep, world.context(1))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent_shape(frames, h, w), generator=gen)
    return world.vae.decode(sample(world.dit, cond, noise, steps, shift))


@torch.no_grad()
def reference_forward(world: WorldModels, fun=None) -> dict[str, Tensor]:
    """Fixed seeded inputs through the models (weights/reference.safetensors stores these outputs): VAE encode
    of [5, 32, 32, 3] uniform frames, VAE decode of that latent, I2V DiT velocity at t = 0.6, and with `fun`
    (the Fun-Control WanDiT) its velocity at t = 0.6 for a seeded 32-channel condition."""
    from ..host.protocol import WanCond

    gen = torch.Generator().manual_seed(1234)
    frames = torch.rand(5, 32, 32, 3, generator=gen)
    latent = world.vae.encode(frames)
    x_t = torch.randn(1, 16, 5, 4, 4, generator=gen)
    keep = torch.zeros(1, 4, 5, 4, 4)
    keep[:, :, 0] = 1
    cond = torch.randn(1, 16, 5, 4, 4, generator=gen)
    velocity = world.dit.predict(x_t, 0.6, WanCond(keep, cond, world.context(1)))
    out = {"vae_latent": latent, "vae_decoded": world.vae.decode(latent), "dit_velocity": velocity.float()}
    if fun is not None:
        control = torch.randn(1, 32, 5, 4, 4, generator=gen)
        out["fun_velocity"] = fun.predict(x_t, 0.6, WanCond(None, control, world.context(1))).float()
    return out
