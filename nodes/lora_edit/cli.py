"""`ffprop propagate --engine wan --model DIR`: LoRA-Edit on a diffusers-format Wan2.1 I2V directory.

Text: the pack has no T5 encoder outside ComfyUI. `--prompt-embeds FILE.safetensors` supplies UMT5 outputs
(`prompt_embeds` [L, 4096] or [1, L, 4096], optional `negative_prompt_embeds`), e.g. saved from diffusers'
`WanImageToVideoPipeline.encode_prompt`. Without it the text context is zeros: the per-video LoRA still learns
the clip's motion and the edited first frame still drives the result, but no prompt steers it and CFG is off.
CLIP: `--image-embeds FILE.safetensors` (`image_embeds` [1, 257, 1280], CLIP-vision-H penultimate tokens of
the edited frame); without it a model with an image embedder gets zeros (documented, logged).

Memory: the transformer is loaded to the CPU (tensor by tensor, block linears in fp8 with --base-weights fp8),
then everything but the preset's swapped blocks goes to the GPU; training and sampling both run the blocks
through the BlockRunner (swap + prefetch, fp8 -> bf16 per block at use). The diffusers package is needed:
without it `run_wan` raises a RuntimeError that says how to install it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..common import log
from .lowvram import MemorySettings, place_for_swap, preset


def _tensor(path: str, key: str, required: bool, dims: int):
    from safetensors.torch import load_file

    data = load_file(path)
    if key not in data:
        if required:
            raise ValueError(f"'{path}' has no '{key}' tensor (keys: {sorted(data)[:6]}).")
        return None
    t = data[key].float()
    return t[None] if t.ndim == dims - 1 else t


def require_diffusers() -> None:
    """RuntimeError (what is missing + how to install it) unless diffusers and its Wan classes import."""
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError("--engine wan needs the 'diffusers' package (>= 0.33) for the Wan2.1 transformer and VAE: "
                           f"pip install 'diffusers>=0.33' (or use --engine flow, which needs nothing more). ({e})"
                           ) from None
    try:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(f"--engine wan: diffusers {getattr(diffusers, '__version__', '?')} is installed but its Wan "
                           f"classes do not import ({e}); pip install -U 'diffusers>=0.33' and matching torch "
                           "builds.") from None


@dataclass
class WanModel:
    """A diffusers Wan2.1 I2V directory loaded for LoRA-Edit: the DiT (blocks placed for the memory preset's swap),
    the VAE, encode (IMAGE -> model-space latent on the compute device), the text context (+ negative) and the
    CLIP-vision tokens (None for a model without an image embedder), as `ffprop propagate --engine wan` gives them."""

    dit: object
    vae: object
    encode: Callable[[torch.Tensor], torch.Tensor]
    context: torch.Tensor
    negative: Optional[torch.Tensor]
    clip: Optional[torch.Tensor]
    memory: MemorySettings


def load_wan(args) -> WanModel:
    """--model DIR with the --engine wan options (--dtype, --memory-preset, --base-weights, --prompt-embeds,
    --image-embeds); prints what it chose. The one loader of `run_wan` and of keyframe propagation."""
    require_diffusers()
    from ..host.diffusers import load_diffusers_wan
    from ..host.vae import load_diffusers_wan_vae

    if not args.model:
        raise ValueError("--engine wan needs --model DIR (a diffusers-format Wan2.1 I2V directory).")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model '{args.model}' is not a directory.")
    mem = preset(args.memory_preset)
    fp8 = args.base_weights == "fp8" or (args.base_weights == "auto" and device.type == "cuda"
                                         and mem.gradient_checkpointing)   # fp8 training needs checkpointing
    if fp8 and dtype != torch.bfloat16:
        raise ValueError(f"fp8 base weights are computed in bf16, but --dtype is {args.dtype}; use --dtype bf16 or "
                         "--base-weights compute.")
    dit = load_diffusers_wan(args.model, dtype=dtype, device="cpu", storage="fp8" if fp8 else None)
    swapped = mem.blocks_to_swap(len(dit.blocks()))
    place_for_swap(dit.module, dit.blocks(), swapped, device)   # the swapped blocks never visit the GPU at once
    print(f"note: {swapped} of {len(dit.blocks())} blocks stay in CPU RAM ({args.memory_preset} preset), base "
          f"weights {'fp8' if fp8 else str(dtype).removeprefix('torch.')}")
    vae = load_diffusers_wan_vae(args.model, dtype=dtype, device=device)
    if dit.dims.in_channels != 36:
        raise ValueError(f"'{args.model}' is not a Wan2.1 I2V model ({dit.dims.in_channels} input channels, I2V has "
                         "36); LoRA-Edit needs an image-to-video model.")
    text_dim = dit.dims.text_dim
    if args.prompt_embeds:
        context = _tensor(args.prompt_embeds, "prompt_embeds", True, 3)
        negative = _tensor(args.prompt_embeds, "negative_prompt_embeds", False, 3)
    else:
        print("note: no --prompt-embeds: zero text context, CFG off (see `ffprop propagate --help`)")
        context, negative = torch.zeros(1, 1, text_dim), None
    if context.shape[-1] != text_dim:
        raise ValueError(f"prompt_embeds has width {context.shape[-1]} but the model's text_dim is {text_dim}.")
    clip = None
    if dit.dims.clip_dim is not None:
        if args.image_embeds:
            clip = _tensor(args.image_embeds, "image_embeds", True, 3)
        else:
            print("note: no --image-embeds: zero CLIP-vision tokens for the image embedder")
            clip = torch.zeros(1, 257, 1280)
    to = {"device": device, "dtype": dtype}
    return WanModel(dit, vae, lambda x: vae.encode(x).to(**to), context.to(**to),
                    negative.to(**to) if negative is not None else None, clip.to(**to) if clip is not None else None,
                    mem)


def run_wan(args, source: torch.Tensor, fps: float, edited: torch.Tensor, mask, bar_factory) -> torch.Tensor:
    """Returns the edited clip IMAGE [T, H, W, 3]; prints what it did."""
    from ..video.frames import fit_to_frame
    from .conditioning import prepare_clip
    from .lora import save_lora
    from .pipeline import SampleSettings, lora_edit_video
    from .trainer import TrainSettings

    w = load_wan(args)
    source, mask, notes = prepare_clip(source, mask, args.frame_policy, args.crop_policy)
    edited, note = fit_to_frame(edited, source.shape[1], source.shape[2], args.size_policy)
    for n in notes + ([note] if note else []):
        print(f"note: {n}")
    train_bar, sample_bar = bar_factory("training LoRA"), bar_factory("sampling")
    out = lora_edit_video(
        w.dit, w.encode, w.vae.decode, source, mask, edited[None], w.context, w.negative, w.clip,
        TrainSettings(steps=args.train_steps, learning_rate=args.lr, rank=args.rank, seed=args.seed), w.memory,
        SampleSettings(args.steps, args.cfg, args.shift, args.seed), on_train_step=train_bar,
        on_sample_step=sample_bar)
    train_bar.close()
    sample_bar.close()
    losses = out.training.losses
    print(f"LoRA: {len(losses)} steps, loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of last 10)")
    if args.save_lora:
        print(f"wrote {save_lora(out.training.lora, args.save_lora, metadata={'ffprop': 'lora_edit'})}")
    log.info("FFP LoRA-Edit CLI: %d frames at %dx%d", out.frames.shape[0], out.frames.shape[2], out.frames.shape[1])
    return out.frames
