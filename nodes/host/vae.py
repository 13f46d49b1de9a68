"""Wan 2.1 VAE adapter for diffusers' `AutoencoderKLWan` (optional dependency, imported lazily).

encode(IMAGE [T, H, W, 3] in 0..1, T = 4k+1 or 1) -> model-space latent [1, 16, F, H/8, W/8]
(normalised with the config's latents_mean/latents_std, like ComfyUI's `Wan21.process_in`); decode is the
inverse. The latent `mode()` is used (no sampling), as ComfyUI does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from ..video.frames import check_video, frames_to_latent
from .diffusers import load_from_shards


class DiffusersWanVAE:
    def __init__(self, vae: nn.Module):
        try:
            from diffusers import AutoencoderKLWan
        except (ImportError, RuntimeError) as e:
            raise RuntimeError(f"the diffusers Wan VAE needs diffusers >= 0.33 importable here ({e}).") from e
        if not isinstance(vae, AutoencoderKLWan):
            raise ValueError(f"DiffusersWanVAE needs a diffusers AutoencoderKLWan, got {type(vae).__name__}.")
        if vae.config.z_dim != 16:
            raise ValueError(f"this Wan VAE has {vae.config.z_dim} latent channels; Wan 2.1 uses 16 (a 48-channel VAE "
                             "is Wan 2.2's, which this pack does not drive).")
        self.vae = vae
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, 16, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, 16, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """IMAGE [T, H, W, 3] 0..1 -> [1, 16, F, H/8, W/8] float32 model-space latent."""
        check_video(frames, "frames")
        frames_to_latent(frames.shape[0])
        if frames.shape[1] % 8 or frames.shape[2] % 8:
            raise ValueError(f"the Wan VAE needs sizes that are multiples of 8; got {frames.shape[2]}x{frames.shape[1]}.")
        x = (rearrange(frames, 't h w c -> 1 c t h w') * 2 - 1).to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode().float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """[1, 16, F, h, w] model-space latent -> IMAGE [T, 8h, 8w, 3] in 0..1 (T = 4(F-1)+1), float32 on CPU."""
        if latent.ndim != 5 or latent.shape[1] != 16:
            raise ValueError(f"latent must be [1, 16, F, h, w]; got {tuple(latent.shape)}.")
        z = latent.float() * self.std.to(latent.device) + self.mean.to(latent.device)
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float()
        return ((rearrange(x[0], 'c t h w -> t h w c') + 1) / 2).clamp(0, 1).cpu()


def load_diffusers_wan_vae(path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                           device: Union[str, torch.device, None] = "cpu") -> DiffusersWanVAE:
    """Load a local diffusers-format AutoencoderKLWan (a dir with config.json, or a pipeline dir with vae/)."""
    try:
        from diffusers import AutoencoderKLWan
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(f"the diffusers Wan VAE needs diffusers >= 0.33 importable here: pip install "
                           f"'diffusers>=0.33' ({e}).") from e

    root = Path(path).expanduser()
    folder = root if (root / "config.json").is_file() else root / "vae"
    if not (folder / "config.json").is_file():
        raise ValueError(f"no diffusers Wan VAE at '{root}': expected vae/config.json + "
                         "diffusion_pytorch_model.safetensors (a diffusers-format Wan2.1 I2V directory).")
    vae = load_from_shards(AutoencoderKLWan, folder)
    vae = vae.to(device=device, dtype=dtype) if dtype is not None else vae.to(device)
    return DiffusersWanVAE(vae.eval())
