"""The small trained Wan world in the e2e server: its models in ComfyUI's layout, a world scene as input files,
and the output scored against the scene's ground truth.

`comfy_world_state_dicts()`: the bundled world VAE and I2V DiT (nodes/world/model.py) converted to ComfyUI's key
layout by nodes/world/convert.py, with the world's latent normalisation folded into the VAE's quant convs
(`convert.fold_latent_format`: ComfyUI normalises every Wan 2.1 latent with the REAL Wan 2.1 statistics, the
world DiT was trained on the world VAE's own), so ComfyUI's process_in(z) is the world's normalised latent
exactly. ComfyUI 0.28 infers the VAE width from `decoder.head.0.gamma`; 0.3.64 builds width 96 whatever the
weights, so there the harness installs the world VAE zero-padded to width 96 (`convert.pad_vae_width`, the same
function; `wide_world_vae`: the tensors of `python -m ffprop.nodes.world.convert DIR --vae-width 96`, the file a
0.3.64 user loads, about 254 MB in float16, cached per world-VAE sha256). Which one is picked by building each with
the host's own comfy.sd.VAE (`world_vae_file`), never by version.

`world_case(...)`: a held-out world scene written as the workflow's input files (source mp4, the ground-truth
edited first frame png, the frame-1 edit mask png), with the scores `score_video` compares an output against.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
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


def comfy_world_state_dicts(world=None, vae_width: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, torch.Tensor]]:
    """(DiT state dict in ComfyUI WanModel keys, float32; VAE state dict as `python -m ffprop.nodes.world.convert`
    writes it: convert.comfy_vae_state_dict, ComfyUI WanVAE keys with the world's latent normalisation folded in)
    of `world` (default: load_world()). vae_width: the VAE zero-padded to that base width, float16 (the CLI's
    `--vae-width` file)."""
    from ffprop.nodes.world.convert import comfy_vae_state_dict, dit_to_comfy

    world = world or load_world()
    vae = comfy_vae_state_dict(world.vae.vae, vae_width)
    dit = {k: v.detach().clone().float().contiguous() for k, v in dit_to_comfy(world.dit.model.state_dict()).items()}
    return dit, {k: v.detach().contiguous() for k, v in vae.items()}


def comfy_loads_world_vae(sd: dict[str, torch.Tensor]) -> str | None:
    """None when this ComfyUI builds a VAE that fits the VAE weights `sd` (ComfyUI layout); else why not (0.3.64:
    the Wan 2.1 VAE width is fixed at 96, the world VAE is 12 wide)."""
    import comfy.sd

    try:
        vae = comfy.sd.VAE(sd=dict(sd))
        vae.throw_exception_if_invalid()
    except (RuntimeError, ValueError) as e:
        width = int(sd["decoder.head.0.gamma"].shape[0])
        return (f"this ComfyUI cannot load the world VAE (decoder width {width}): its Wan 2.1 VAE loader builds a "
                f"fixed architecture ({str(e).splitlines()[0][:200]})")
    return None


def wide_world_vae(cache_dir: Path, world=None) -> Path:
    """The world VAE zero-padded to width WAN21_VAE_CONFIG['dim'] (96, what a ComfyUI without width inference
    builds, e.g. 0.3.64), float16 (about 254 MB): the tensors of the CLI's `--vae-width 96` file
    (convert.comfy_vae_state_dict), cached in cache_dir under the world VAE's sha256 (a new world VAE gets a new
    file)."""
    from e2e_models import WAN21_VAE_CONFIG, save_safetensors
    from ffprop.nodes.world.model import read_manifest

    width = WAN21_VAE_CONFIG["dim"]
    digest = read_manifest()["models"]["vae"]["sha256"]
    path = Path(cache_dir) / f"ffp_world_wan21_vae_w{width}_{digest[:16]}.safetensors"
    if not path.is_file():
        sd = comfy_world_state_dicts(world, vae_width=width)[1]
        save_safetensors(sd, path, f"world Wan 2.1 VAE zero-padded to width {width}, ComfyUI latent scale "
                                   "(nodes/world)")
    return path


def world_vae_file(cache_dir: Path, world=None) -> tuple[dict[str, torch.Tensor] | Path | None, str | None]:
    """(what to install as the world VAE, None) for this ComfyUI (COMFYUI_DIR, imported): the world VAE's own
    state dict when the host infers the Wan 2.1 VAE width from the weights (0.28), else the width-96 padded
    file (`wide_world_vae`) when the host loads that; (None, why) when neither loads. Capability checks only:
    each candidate is built by the host's own comfy.sd.VAE."""
    from safetensors.torch import load_file

    small = comfy_world_state_dicts(world)[1]
    why = comfy_loads_world_vae(small)
    if why is None:
        return small, None
    wide = wide_world_vae(cache_dir, world)
    why_wide = comfy_loads_world_vae(load_file(str(wide)))
    return (wide, None) if why_wide is None else (None, f"{why}; the width-96 padded VAE fails too: {why_wide}")


def world_vae_check(cache_dir: str | Path) -> dict:
    """{"vae": "own width" | "padded to 96"} when this ComfyUI loads the world VAE (building and caching the
    padded file if it needs it), else {"skipped": why}."""
    from comfy_support import import_comfy

    import_comfy()
    vae, why = world_vae_file(Path(cache_dir))
    if why:
        return {"skipped": why}
    return {"vae": "padded to 96" if isinstance(vae, Path) else "own width"}


def write_world_models(models_dir: Path, cache_dir: Path) -> dict:
    """Write the world DiT and VAE (ComfyUI layout) into <models_dir>/diffusion_models and /vae (the VAE as
    `world_vae_file` picks it: its own width, or a link to the cached width-96 file); returns build seconds and
    which VAE, or {"skipped": why} when this ComfyUI loads neither."""
    from comfy_support import import_comfy
    from e2e_models import save_safetensors

    import_comfy()
    t0 = time.perf_counter()
    vae, why = world_vae_file(Path(cache_dir))
    if why:
        return {"skipped": why}
    dit = comfy_world_state_dicts()[0]
    save_safetensors(dit, Path(models_dir) / "diffusion_models" / DIT_NAME, "world Wan 2.1 I2V DiT (nodes/world)")
    dst = Path(models_dir) / "vae" / VAE_NAME
    if isinstance(vae, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        dst.symlink_to(vae.resolve())
    else:
        save_safetensors(vae, dst, "world Wan 2.1 VAE, ComfyUI latent scale (nodes/world)")
    return {"world": time.perf_counter() - t0, "vae": "padded to 96" if isinstance(vae, Path) else "own width"}


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
    keys: dict[int, str] = field(default_factory=dict)   # 0-based frame -> the true edited frame's png


def world_case(input_dir: Path, seed_index: int = 0, edit: str = "recolour", frames: int = 17,
               size: tuple[int, int] = (64, 64), tag: str = "world", keys: tuple[int, ...] = ()) -> WorldCase:
    """Write HELDOUT_SEEDS[seed_index]'s `edit` sample as <tag>_clip.mp4, <tag>_edit.png (the true edited
    frame 1), <tag>_mask.png (frame 1's edit mask, white = edit), <tag>_masks.mp4 (every frame's) and
    <tag>_key_<k>.png (the true edited frame k, 0-based) for each k in `keys`."""
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
    key_files = {}
    for k in keys:
        key_files[k] = f"{tag}_key_{k}.png"
        Image.fromarray(to8(s.target[k])).save(input_dir / key_files[k])
    return WorldCase(s, f"{tag}_clip.mp4", f"{tag}_edit.png", f"{tag}_mask.png", f"{tag}_masks.mp4", box, key_files)


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

@dataclass(frozen=True)
class WorldRun:
    """A shipped workflow on a held-out world scene: workflows/<workflow>.json, HELDOUT_SEEDS[seed_index]'s `edit`
    sample of `frames` frames; engine "wan": a keyframes workflow switched to its wan engine on the world DiT."""

    workflow: str
    frames: int = 17
    edit: str = "recolour"
    seed_index: int = 0
    engine: str | None = None


WORLD_WORKFLOWS = {
    "lora_edit": WorldRun("lora_edit"),
    "ast_rope": WorldRun("ast_rope"),
    "long_clip": WorldRun("long_clip", 33),                       # 2 chunks of 17
    "keyframes": WorldRun("keyframes"),                           # as shipped: the flow engine, no model
    "keyframes_wan": WorldRun("keyframes", engine="wan"),         # its wan engine on the world DiT
    # a removal scene of the benchmark's world_cases(2) (GenProp's copy_paste task; colour_fill scenes stay at
    # about 9-11 dB inside the edit for every method here, the source and repeating frame 1 included)
    "content_encoder": WorldRun("content_encoder", edit="removal", seed_index=12),
}
SAMPLE_STEPS = 10
SHIFT = 3.0
LORA_STEPS = 100                 # the shipped lora_edit.json stage-1 steps (stage 2 off)
CONTENT_ENCODER = Path(__file__).resolve().parents[2] / "nodes" / "content_encoder" / "weights" / "world.safetensors"
CONTENT_ENCODER_NAME = "ffp_world_content_encoder.safetensors"


def keyframe_indices(api: dict) -> tuple[int, ...]:
    """Every frame index an FFPKeyframes node of the prompt names (its frame_indices)."""
    out: set[int] = set()
    for node in api.values():
        if node["class_type"] == "FFPKeyframes":
            out |= {int(x) for x in str(node["inputs"]["frame_indices"]).split(",") if x.strip()}
    return tuple(sorted(out))


def install_content_encoder(models_dir: Path) -> str:
    """The bundled world content encoder (nodes/content_encoder/weights/world.safetensors, trained on world
    training seeds against the world DiT) linked into <models_dir>/ffprop_content_encoder; returns its name."""
    dst = Path(models_dir) / "ffprop_content_encoder" / CONTENT_ENCODER_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    dst.symlink_to(CONTENT_ENCODER)
    return CONTENT_ENCODER_NAME


def world_overrides(api: dict, case: WorldCase, steps: int = SAMPLE_STEPS, run: WorldRun | None = None) -> dict:
    """The CI-sized API prompt of a sampling workflow, pointed at the world: the world DiT and VAE for every
    loader, the world scene's files for LoadVideo / LoadImage / LoadImageMask, frame 1's edit box as the mask
    prompt; FFPMaskOps (the loose box) gets the world's per-frame edit masks (oracle masks, as the benchmark's
    lora_edit row: click segmentation is the masks room's to measure), min area 4 px; the world's render size and
    length, `steps` Euler steps at shift 3 and cfg 1 (the world DiT ignores
    text), stage-1 LoRA training of LORA_STEPS at LoRA-Edit's rate. Keyframes: each FFPKeyframes node's image is
    the true edited frame at its frame_indices (case.keys); run.engine "wan": `wan_keyframes`. Content encoder:
    'Train Content Encoder' becomes 'Load Content Encoder' with the bundled world encoder (install_content_encoder;
    the workflow's note says to do so the next time; the trainer node itself runs in test_workflow_runs, on the
    tiny models at its CI size of 2 steps: plumbing, not quality), its loss preview goes, and Apply uses the task a user would pick for the edit (nodes/content_encoder/bench.py task_for,
    as the benchmark row). Changes `api` in place and returns it."""
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
        elif kind == "FFPApplyContentEncoder":
            from ffprop.nodes.content_encoder.bench import task_for

            inputs["task"] = task_for(case.sample.edit)
        if kind == "FFPChunkSample" and not any(n["class_type"] == "ModelSamplingSD3" for n in api.values()):
            api["world_shift"] = {"class_type": "ModelSamplingSD3",
                                  "inputs": {"model": inputs["model"], "shift": SHIFT},
                                  "_meta": {"title": "ModelSamplingSD3 (world: shift 3)"}}
            inputs["model"] = ["world_shift", 0]
    for nid, node in list(api.items()):
        if node["class_type"] == "FFPKeyframes":               # after the LoadImage defaults above
            (k,) = keyframe_indices({nid: node})                # one image per Keyframes node in these workflows
            image = api[node["inputs"]["images"][0]]
            if image["class_type"] != "LoadImage":
                raise ValueError(f"FFPKeyframes reads its image from {image['class_type']}, not LoadImage")
            image["inputs"]["image"] = case.keys[k] if k else case.edited
        if node["class_type"] == "FFPTrainContentEncoder":
            api[nid] = {"class_type": "FFPContentEncoderLoader", "_meta": {"title": "Load Content Encoder (world)"},
                        "inputs": {"model": node["inputs"]["model"], "encoder_name": CONTENT_ENCODER_NAME}}
            for other, n in list(api.items()):      # the loss preview: the loader has only the encoder output
                if any(isinstance(v, list) and v[:1] == [nid] and v[1:] != [0] for v in n["inputs"].values()):
                    del api[other]
    if run is not None and run.engine == "wan":
        wan_keyframes(api, steps)
    return api


def wan_keyframes(api: dict, steps: int = SAMPLE_STEPS) -> dict:
    """FFPKeyframePropagate switched to engine 'wan' on the world models: the world DiT (shift 3) and VAE, the
    test pack's zero text conditioning (the world DiT ignores text), chunk_length 17, `steps` Euler steps at cfg
    1. No LoRA (the keyframes workflow trains none) and no edit mask (as shipped: derived from the keyframes)."""
    api["world_dit"] = {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_NAME, "weight_dtype": "default"}}
    api["world_dit_shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["world_dit", 0], "shift": SHIFT}}
    api["world_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}}
    api["world_text"] = {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 0, "scale": 0.0}}
    for node in api.values():
        if node["class_type"] == "FFPKeyframePropagate":
            node["inputs"].update(engine="wan", chunk_length=17, steps=steps, cfg=1.0, sampler_name="euler",
                                  scheduler="simple", model=["world_dit_shift", 0], vae=["world_vae", 0],
                                  positive=["world_text", 0], negative=["world_text", 0])
    return api


