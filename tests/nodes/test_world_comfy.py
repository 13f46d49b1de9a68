"""ComfyUI's own loaders (core's UNETLoader and VAELoader nodes) load the small trained world models, converted by
nodes/world/convert.py (with its latent-scale fold, as tests/e2e/e2e_world.py installs them), and reproduce the
diffusers forward. Needs COMFYUI_DIR. The VAE is the file a user of this host loads: the world VAE at its own
width where the host reads the width from the weights (0.28), else (0.3.64 builds every Wan 2.1 VAE at width 96)
the width-96 zero-padded float16 file of `python -m ffprop.nodes.world.convert DIR --vae-width 96` (e2e_world's
`world_vae_file` picks it by asking the host's comfy.sd.VAE; about 254 MB, cached in FFP_E2E_CACHE_DIR when set).
"""

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
from e2e_world import (  # noqa: E402
    DIT_NAME,
    VAE_NAME,
    comfy_loads_world_vae,
    comfy_world_state_dicts,
    load_world,
    world_vae_file,
)
from ffprop.nodes.host.comfy import ComfyWan, check_wan_model  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.world.convert import comfy_vae_state_dict  # noqa: E402

import nodes  # noqa: E402

try:
    WORLD = load_world()
except (ImportError, RuntimeError) as e:
    pytest.skip(f"the bundled world models are not loadable here: {e}", allow_module_level=True)
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The converted world DiT and the world VAE this host loads (world_vae_file) in folders ComfyUI's loaders
    search (restored afterwards). Yields (VAE state dict as installed, "own width" | "padded to 96")."""
    import os

    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("world_models")
    keep = os.environ.get("FFP_E2E_CACHE_DIR")
    cache = Path(keep) if keep else tmp_path_factory.mktemp("world_vae_cache")
    cache.mkdir(parents=True, exist_ok=True)
    dit = comfy_world_state_dicts(WORLD)[0]
    vae, why = world_vae_file(cache, WORLD)
    save_safetensors(dit, root / "diffusion_models" / DIT_NAME, "world DiT (test)")
    if isinstance(vae, Path):
        (root / "vae").mkdir(parents=True, exist_ok=True)
        (root / "vae" / VAE_NAME).symlink_to(vae.resolve())
        installed, kind = load_file(str(vae)), "padded to 96"
    elif vae is not None:
        save_safetensors(vae, root / "vae" / VAE_NAME, "world VAE (test)")
        installed, kind = vae, "own width"
    else:
        installed, kind = None, why
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("diffusion_models", "vae")}
    for k in saved:
        folder_paths.folder_names_and_paths[k] = ([str(root / k)], {".safetensors"})
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    yield installed, kind
    folder_paths.folder_names_and_paths.update(saved)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    if not keep:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


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


# Largest |ComfyUI - diffusers| allowed (latent in normalised units, frames on 0..1) per installed VAE. The world
# VAE's own float32 weights compute what diffusers does (measured on 0.28: 7.2e-7 / 3.9e-7); the width-96 file
# holds float16 weights (the padding is exact, the rounding is not: measured on 0.3.64 8.7e-4 / 1.5e-4).
TOLERANCE = {"own width": (1e-4, 1e-4), "padded to 96": (5e-3, 1e-3)}


def test_vae_loader_loads_the_world_vae_on_comfys_latent_scale(files):
    """ComfyUI's VAE latent, after ComfyUI's own Wan21 process_in, is the world's normalised latent; decoding
    ComfyUI's process_out of it gives the diffusers decode."""
    installed, kind = files
    if installed is None:
        pytest.skip(kind)
    assert comfy_loads_world_vae(installed) is None
    (vae,) = nodes.VAELoader().load_vae(VAE_NAME)
    width = int(installed["decoder.head.0.gamma"].shape[0])
    assert width == (int(WORLD.vae.vae.config.base_dim) if kind == "own width" else 96), (kind, width)
    cli = comfy_vae_state_dict(WORLD.vae.vae, None if kind == "own width" else width)   # what the CLI writes
    assert set(cli) == set(installed) and all(torch.equal(cli[k], installed[k]) for k in cli), \
        "the installed world VAE is not the convert CLI's file (a stale FFP_E2E_CACHE_DIR? delete it)"
    lat_tol, px_tol = TOLERANCE[kind]
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=5)
    fmt = comfy.latent_formats.Wan21()
    want = WORLD.vae.encode(s.source)
    got = fmt.process_in(vae.encode(s.source).float())
    frames = vae.decode(fmt.process_out(want)).reshape(s.source.shape).float()
    ref = WORLD.vae.decode(want)
    print(f"world VAE in ComfyUI ({kind}, width {width}): latent max err {(got - want).abs().max():.2e}, "
          f"decode max err {(frames - ref).abs().max():.2e}")
    assert want.std() > 0.3 and torch.allclose(got, want, atol=lat_tol), (got - want).abs().max()
    assert torch.allclose(frames, ref, atol=px_tol), (frames - ref).abs().max()
    recon = 10 * torch.log10(1 / ((frames - s.source) ** 2).mean())
    assert recon > 15, f"round trip {recon:.1f} dB: the world VAE did not reconstruct the scene"
