"""The small trained Wan world in the e2e server: its models in ComfyUI's layout, a world scene as input files,
and the output scored against the scene's ground truth.

`comfy_world_state_dicts()`: the bundled world VAE and I2V DiT (nodes/world/model.py) converted to ComfyUI's key
layout by nodes/world/convert.py, plus one change ComfyUI needs: ComfyUI normalises every Wan 2.1 latent with the
REAL Wan 2.1 VAE's per-channel latents_mean/std (comfy.latent_formats.Wan21), while the world DiT was trained on
latents normalised with the world VAE's own statistics (its config). The per-channel affine map between the two,
z_comfy = wan_mean + wan_std / world_std * (z_world - world_mean), is folded into the VAE's 1x1x1 quant convs
(`conv1`, the posterior mean half, and `conv2`), so ComfyUI's process_in(z_comfy) is the world's normalised latent
exactly and the decoder undoes it. ComfyUI 0.28 infers the VAE width from `decoder.head.0.gamma`; 0.3.64 builds
width 96 whatever the weights, so the world VAE (width 12) does not load there (`comfy_loads_world_vae` says so).

`world_case(...)`: a held-out world scene written as the workflow's input files (source mp4, the ground-truth
edited first frame png, the frame-1 edit mask png), with the scores `score_video` compares an output against.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIT_NAME = "ffp_world_wan21_i2v.safetensors"
VAE_NAME = "ffp_world_wan21_vae.safetensors"
FPS = 8


def load_world():
    """nodes/world/model.py's load_world_models(), importing diffusers with the repo root off sys.path: `python -m
    pytest` from the root puts it there, and this repo's kernels/ then shadows the Hugging Face `kernels` package
    that transformers (pulled in by diffusers' Wan VAE) probes for, failing the import."""
    import sys

    root = Path(__file__).resolve().parents[2]
    hidden = [p for p in sys.path if Path(p or ".").resolve() == root]
    sys.path[:] = [p for p in sys.path if p not in hidden]
    try:
        import diffusers.models.autoencoders.autoencoder_kl_wan  # noqa: F401
        from ffprop.nodes.world.model import load_world_models

        return load_world_models()
    finally:
        sys.path[:0] = hidden


def comfy_world_state_dicts(world=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(DiT state dict in ComfyUI WanModel keys, VAE state dict in ComfyUI WanVAE keys with the latent
    normalisation folded in), float32, of `world` (default: load_world())."""
    from ffprop.nodes.world.convert import dit_to_comfy, vae_to_comfy

    world = world or load_world()
    vae = world.vae.vae
    sd = {k: v.detach().clone().float() for k, v in vae_to_comfy(vae.state_dict(), vae.config.num_res_blocks).items()}
    world_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    world_std = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    wan_mean, wan_std = wan21_latent_stats()
    a = wan_std / world_std                      # z_comfy = a * z_world + b
    b = wan_mean - a * world_mean
    z = len(a)
    w1, b1 = sd["conv1.weight"].double(), sd["conv1.bias"].double()      # [2z, 2z, 1, 1, 1]: mean, then log-var
    w1[:z] *= a.view(z, 1, 1, 1, 1)
    b1[:z] = a * b1[:z] + b
    w2, b2 = sd["conv2.weight"].double(), sd["conv2.bias"].double()      # [z, z, 1, 1, 1] on z_world
    inv = (1 / a).view(1, z, 1, 1, 1)
    b2 = b2 - (w2 * inv * b.view(1, z, 1, 1, 1)).sum((1, 2, 3, 4))
    w2 = w2 * inv
    sd.update({"conv1.weight": w1.float(), "conv1.bias": b1.float(), "conv2.weight": w2.float(),
               "conv2.bias": b2.float()})
    dit = {k: v.detach().clone().float().contiguous() for k, v in dit_to_comfy(world.dit.model.state_dict()).items()}
    return dit, {k: v.contiguous() for k, v in sd.items()}


def wan21_latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """The real Wan 2.1 VAE's per-channel latents_mean and latents_std, as ComfyUI's Wan21 latent format has them."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    return fmt.latents_mean.flatten().double(), fmt.latents_std.flatten().double()


def comfy_loads_world_vae(sd: dict[str, torch.Tensor]) -> str | None:
    """None when this ComfyUI builds a VAE that fits the world VAE's weights; else what is missing (0.3.64: the
    Wan 2.1 VAE width is fixed at 96 and the world VAE is 12 wide)."""
    import comfy.sd

    try:
        vae = comfy.sd.VAE(sd=dict(sd))
        vae.throw_exception_if_invalid()
    except (RuntimeError, ValueError) as e:
        width = int(sd["decoder.head.0.gamma"].shape[0])
        return (f"this ComfyUI cannot load the world VAE (decoder width {width}): its Wan 2.1 VAE loader builds a "
                f"fixed architecture ({str(e).splitlines()[0][:200]}); it needs ComfyUI's width inference from "
                "decoder.head.0.gamma (ComfyUI 0.28 has it)")
    return None


def world_vae_check() -> dict:
    """{} when this ComfyUI (COMFYUI_DIR) loads the world VAE, else {"skipped": what is missing}."""
    from comfy_support import import_comfy

    import_comfy()
    why = comfy_loads_world_vae(comfy_world_state_dicts()[1])
    return {"skipped": why} if why else {}


def write_world_models(models_dir: Path) -> dict:
    """Write the world DiT and VAE (ComfyUI layout) into <models_dir>/diffusion_models and /vae; returns build
    seconds, or {"skipped": why} when this ComfyUI cannot load the world VAE."""
    from comfy_support import import_comfy
    from e2e_models import save_safetensors

    import_comfy()
    t0 = time.perf_counter()
    dit, vae = comfy_world_state_dicts()
    why = comfy_loads_world_vae(vae)
    if why:
        return {"skipped": why}
    save_safetensors(dit, Path(models_dir) / "diffusion_models" / DIT_NAME, "world Wan 2.1 I2V DiT (nodes/world)")
    save_safetensors(vae, Path(models_dir) / "vae" / VAE_NAME, "world Wan 2.1 VAE, ComfyUI latent scale (nodes/world)")
    return {"world": time.perf_counter() - t0}


# ---- a world scene as workflow inputs, and the scores of an output ------------------------------------------

@dataclass
class WorldCase:
    """One held-out world scene and the names of its input files (in the server's input dir)."""

    sample: object            # nodes.world.scenes.WorldSample
    video: str
    edited: str
    mask: str
    mask_video: str           # the per-frame edit masks as a video (white = edit)
    box: list[int]            # frame-1 edit region's bounding box [x0, y0, x1, y1] (px, x1/y1 exclusive)


def world_case(input_dir: Path, seed_index: int = 0, edit: str = "recolour", frames: int = 17,
               size: tuple[int, int] = (64, 64), tag: str = "world") -> WorldCase:
    """Write HELDOUT_SEEDS[seed_index]'s `edit` sample as <tag>_clip.mp4, <tag>_edit.png (the true edited
    frame 1), <tag>_mask.png (frame 1's edit mask, white = edit) and <tag>_masks.mp4 (every frame's)."""
    from e2e_media import write_mp4
    from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample
    from PIL import Image

    s = render_sample(HELDOUT_SEEDS[seed_index], edit, size=size, frames=frames)
    to8 = lambda x: (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    input_dir = Path(input_dir)
    write_mp4(input_dir / f"{tag}_clip.mp4", to8(s.source), FPS)
    Image.fromarray(to8(s.edited_first)).save(input_dir / f"{tag}_edit.png")
    write_mp4(input_dir / f"{tag}_masks.mp4", to8((s.edit_mask > 0.5).float()[..., None].expand(-1, -1, -1, 3)), FPS)
    m = s.edit_mask[0] > 0.5
    Image.fromarray((m.numpy() * 255).astype(np.uint8)).convert("RGB").save(input_dir / f"{tag}_mask.png")
    ys, xs = np.nonzero(m.numpy())
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else [0, 0, *size[::-1]]
    return WorldCase(s, f"{tag}_clip.mp4", f"{tag}_edit.png", f"{tag}_mask.png", f"{tag}_masks.mp4", box)


def read_video(path: Path) -> torch.Tensor:
    """A video file -> IMAGE [T, H, W, 3] float in 0..1 (PyAV)."""
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).float() / 255


def score_video(video: torch.Tensor, case: WorldCase) -> dict[str, float]:
    """Scores of an output [T, H, W, 3] vs the ground truth over frames 2..T (psnr, edit_psnr inside the true
    edit masks, bg_psnr outside), and the same scores of two broken answers: the untouched source and the edited
    first frame repeated."""
    from ffprop.nodes.evaluate.bench import weighted_psnr as psnr

    s = case.sample
    if tuple(video.shape) != tuple(s.target.shape):
        raise AssertionError(f"output is {tuple(video.shape)}; the world scene is {tuple(s.target.shape)}")
    truth, m = s.target[1:], s.edit_mask[1:]

    def scores(x):
        return {"psnr": psnr(x, truth), "edit_psnr": psnr(x, truth, m), "bg_psnr": psnr(x, truth, 1 - m)}

    return {"output": scores(video[1:]), "source": scores(s.source[1:]),
            "repeat_first_frame": scores(s.edited_first[None].expand_as(truth))}


# ---- a shipped sampling workflow on the world ----------------------------------------------------------------

WORLD_WORKFLOWS = {"lora_edit": 17, "ast_rope": 17, "long_clip": 33}   # workflow -> scene frames (long: 2 chunks)
SAMPLE_STEPS = 10
SHIFT = 3.0
LORA_STEPS = 20


def world_overrides(api: dict, case: WorldCase, steps: int = SAMPLE_STEPS) -> dict:
    """The CI-sized API prompt of a sampling workflow, pointed at the world: the world DiT and VAE for every
    loader, the world scene's files for LoadVideo / LoadImage / LoadImageMask, frame 1's edit box as the mask
    prompt; FFPMaskOps (the loose box) gets the world's per-frame edit masks (oracle masks, as the benchmark's
    lora_edit row: click segmentation is the masks room's to measure), min area 4 px; the world's render size and
    length, `steps` Euler steps at shift 3 and cfg 1 (the world DiT ignores
    text), stage-1 LoRA training of LORA_STEPS at LoRA-Edit's rate. Changes `api` in place and returns it."""
    t, h, w = case.sample.source.shape[:3]
    for node in list(api.values()):
        inputs, kind = node["inputs"], node["class_type"]
        if "unet_name" in inputs:
            inputs["unet_name"] = DIT_NAME
        if "vae_name" in inputs:
            inputs["vae_name"] = VAE_NAME
        if kind == "LoadVideo":
            inputs["file"] = case.video
        elif kind == "LoadImage":
            inputs["image"] = case.edited
        elif kind == "LoadImageMask":
            inputs.update(image=case.mask, channel="red")
        elif kind == "FFPMaskPrompts":
            inputs["prompts"] = json.dumps({"version": 1, "width": w, "height": h, "prompts": [
                {"frame": 0, "object": 1, "points": [], "boxes": [case.box]}]})
        elif kind == "WanImageToVideo":
            inputs.update(width=w, height=h, length=t)
        elif kind == "ModelSamplingSD3":
            inputs["shift"] = SHIFT
        elif kind in ("KSampler", "FFPChunkSample"):
            inputs.update(steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple")
        elif kind == "FFPChunkPlan":
            inputs.update(chunk_length=17, overlap_frames=1, last_chunk="pad_repeat")
        elif kind == "FFPMaskOps":
            api["world_masks"] = {"class_type": "LoadVideo", "inputs": {"file": case.mask_video}}
            api["world_masks_frames"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["world_masks", 0]}}
            api["world_masks_mask"] = {"class_type": "ImageToMask",
                                       "inputs": {"image": ["world_masks_frames", 0], "channel": "red"}}
            inputs.update(mask=["world_masks_mask", 0], min_area=4)
        elif kind == "FFPTrainLoRAEdit":
            inputs.update(steps=LORA_STEPS, steps_stage2=0, learning_rate=1e-4, rank=16)
        if kind == "FFPChunkSample" and not any(n["class_type"] == "ModelSamplingSD3" for n in api.values()):
            api["world_shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": inputs["model"], "shift": SHIFT},
                                  "_meta": {"title": "ModelSamplingSD3 (world: shift 3)"}}
            inputs["model"] = ["world_shift", 0]
    return api


