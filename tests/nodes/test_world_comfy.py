"""ComfyUI's own loaders (core's UNETLoader and VAELoader nodes) load the small trained world models, converted by
nodes/world/convert.py (with its latent-scale fold, as tests/e2e/e2e_world.py installs them), and reproduce the diffusers forward.
Needs COMFYUI_DIR; on a ComfyUI whose Wan 2.1 VAE loader cannot build the world VAE (0.3.64: width fixed at 96)
the VAE tests skip with what is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from comfy_support import import_comfy

import_comfy()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import comfy.latent_formats  # noqa: E402
import folder_paths  # noqa: E402
from e2e_models import save_safetensors  # noqa: E402
from e2e_world import DIT_NAME, VAE_NAME, comfy_loads_world_vae, comfy_world_state_dicts, load_world  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan, check_wan_model  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402

import nodes  # noqa: E402

try:
    WORLD = load_world()
except (ImportError, RuntimeError) as e:
    pytest.skip(f"the bundled world models are not loadable here: {e}", allow_module_level=True)
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The converted world DiT and VAE in folders ComfyUI's loaders search (restored afterwards)."""
    root = tmp_path_factory.mktemp("world_models")
    dit, vae = comfy_world_state_dicts(WORLD)
    save_safetensors(dit, root / "diffusion_models" / DIT_NAME, "world DiT (test)")
    save_safetensors(vae, root / "vae" / VAE_NAME, "world VAE (test)")
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("diffusion_models", "vae")}
    for kind in saved:
        folder_paths.folder_names_and_paths[kind] = ([str(root / kind)], {".safetensors"})
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    yield vae
    folder_paths.folder_names_and_paths.update(saved)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def test_unet_loader_loads_the_world_dit_and_matches_the_diffusers_velocity(files):
    (patcher,) = nodes.UNETLoader().load_unet(DIT_NAME, "default")
    assert check_wan_model(patcher) == "i2v"
    comfy = ComfyWan(patcher)
    g = torch.Generator().manual_seed(0)
    x, cond_latent = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 16, 3, 4, 6, generator=g)
    keep = torch.zeros(1, 4, 3, 4, 6)
    keep[:, :, 0] = 1
    for t in (0.9, 0.3):
        cond = WanCond(keep, cond_latent, WORLD.context(1))
        want = WORLD.dit.predict(x, t, cond)
        got = comfy.predict(x, t, cond)
        assert want.abs().mean() > 0.05                      # a real velocity, not zeros
        assert torch.allclose(got.float(), want.float(), atol=2e-4, rtol=1e-3), (got - want).abs().max()


def _comfy_vae(sd):
    why = comfy_loads_world_vae(sd)
    if why:
        pytest.skip(why)
    (vae,) = nodes.VAELoader().load_vae(VAE_NAME)
    return vae


def test_vae_loader_loads_the_world_vae_on_comfys_latent_scale(files):
    """ComfyUI's VAE latent, after ComfyUI's own Wan21 process_in, is the world's normalised latent; decoding
    ComfyUI's process_out of it gives the diffusers decode."""
    vae = _comfy_vae(files)
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=5)
    fmt = comfy.latent_formats.Wan21()
    want = WORLD.vae.encode(s.source)
    got = fmt.process_in(vae.encode(s.source).float())
    assert want.std() > 0.3 and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    frames = vae.decode(fmt.process_out(want)).reshape(s.source.shape).float()
    ref = WORLD.vae.decode(want)
    assert torch.allclose(frames, ref, atol=1e-4), (frames - ref).abs().max()
    recon = 10 * torch.log10(1 / ((frames - s.source) ** 2).mean())
    assert recon > 15, f"round trip {recon:.1f} dB: the world VAE did not reconstruct the scene"
