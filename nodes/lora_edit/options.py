"""The command-line options of `ffprop propagate --engine wan` (torch-free, so `ffprop --help` and argument
errors need no torch): the preset names, the base-weight storages and the argparse group."""

from __future__ import annotations

import argparse

from ..video.formats import FRAME_POLICIES, SIZE_POLICIES

PRESET_ORDER = ("unlimited", "24GB", "16GB", "12GB", "8GB")     # lowvram.PRESETS, largest budget first
BASE_WEIGHTS = ("auto", "fp8", "compute")


def add_wan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine wan (LoRA-Edit on a diffusers-format Wan2.1 I2V model)")
    g.add_argument("--model", help="diffusers-format Wan2.1 I2V directory (transformer/ and vae/)")
    g.add_argument("--prompt-embeds", help="safetensors with prompt_embeds [L, 4096] (+ negative_prompt_embeds); "
                                           "default: zero text context, CFG off")
    g.add_argument("--image-embeds", help="safetensors with image_embeds [1, 257, 1280] (CLIP-vision-H)")
    g.add_argument("--train-steps", type=int, default=100, help="LoRA training steps (paper: 100)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (paper: 1e-4)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (code: 16)")
    g.add_argument("--memory-preset", choices=PRESET_ORDER, default="24GB", help="low-VRAM preset")
    g.add_argument("--steps", type=int, default=30, help="sampling steps (30)")
    g.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance (5; needs --prompt-embeds)")
    g.add_argument("--shift", type=float, default=5.0, help="flow schedule shift (5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, training noise and sampling noise")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights/compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--base-weights", choices=BASE_WEIGHTS, default="auto",
                   help="storage of the frozen base weights: fp8 (float8_e4m3fn block linears, half of bf16: the 14B's "
                        "blocks take ~14 GB of CPU RAM, not ~28; computed in bf16 one block at a time), compute (the "
                        "--dtype), auto: fp8 on CUDA (presets with checkpointing), compute on CPU")
    g.add_argument("--frame-policy", choices=FRAME_POLICIES, default="trim", help="fix non-4k+1 frame counts")
    g.add_argument("--crop-policy", choices=SIZE_POLICIES, default="crop", help="fix sizes not multiple of 16")
    g.add_argument("--save-lora", help="also write the trained LoRA (ComfyUI key format) here")
