"""`ffprop train freeprop`: FreeProp (LoRA + AST-RoPE predictor) on a folder of pairs, one process or several.

    ffprop train freeprop --pairs DIR --model world --out fp.safetensors --steps 400
    torchrun --nproc_per_node 4 -m ffprop.nodes.ast_rope.cli freeprop --pairs DIR --model /models/wan-i2v \\
        --vae /models/wan-vae --batch 4 --out fp.safetensors --checkpoint run.pt --resume

Several processes: torchrun + DDP (torch's own engine: no extra dependency, gloo on CPU and nccl on CUDA; the
trainable part is the LoRA and the predictor, small enough that each rank holds the frozen DiT and DDP syncs
only their gradients; FSDP would shard the DiT too, which the LoRA-Edit low-VRAM path does differently).
Pairs are encoded lazily (each step encodes only its batch). `--world-pairs N` first renders N training-seed
pairs of the procedural world into --pairs (never the held-out benchmark seeds).

Memory: --memory-preset picks the LoRA-Edit trainer's presets (gradient checkpointing, block swap, activation
offload, split blocks; auto = 24GB on CUDA, unlimited on CPU); with a --model folder the transformer is loaded
to the CPU (block linears in fp8 with --base-weights fp8, auto on CUDA) and all but the swapped blocks then go
to the GPU. The 8GB preset's 9-frame windows become a 9-frame --max-frames cap (pairs train whole).
Ctrl-C (or SIGINT from torchrun) writes the checkpoint of the last finished step to --checkpoint and exits 130;
the same command with --resume continues from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from ..lora_edit.options import BASE_WEIGHTS, PRESET_ORDER


def add_parser(sub) -> None:
    """Add `freeprop` to a `train` subparsers object."""
    p = sub.add_parser("freeprop", help="train a FreeProp LoRA + AST-RoPE predictor on (source, edited) pairs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="pair folder (nodes/ast_rope/pairs.py layout)")
    p.add_argument("--world-pairs", type=int, default=0, help="first render this many world pairs into --pairs")
    p.add_argument("--model", default="world", help="'world' (the bundled world I2V DiT + VAE) or a diffusers Wan "
                   "transformer folder (I2V 36 ch or Fun-Control 48 ch)")
    p.add_argument("--vae", default=None, help="diffusers Wan VAE folder (with a --model folder)")
    p.add_argument("--out", required=True, help="the FreeProp model file to write (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint path (written every --checkpoint-every "
                   "steps, on Cancel/Ctrl-C and at the end)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=1, help="global batch per step (a multiple of the process count)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (cosine decay)")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank")
    p.add_argument("--variant", choices=("paper", "global", "warped"), default="paper")
    p.add_argument("--spatial-ratio", type=float, default=0.5, help="paper variant: share of spatial heads")
    p.add_argument("--no-ast-rope", action="store_true", help="ablation: LoRA only, stock RoPE")
    p.add_argument("--no-teacher", action="store_true", help="ablation: flow matching only")
    p.add_argument("--max-frames", type=int, default=33)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="RoPE kernel")
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    p.add_argument("--memory-preset", choices=("auto", *PRESET_ORDER), default="auto",
                   help="low-VRAM preset of the LoRA-Edit trainer (auto: 24GB on CUDA, unlimited on CPU)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="compute dtype of a --model folder (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--base-weights", choices=BASE_WEIGHTS, default="auto",
                   help="storage of a --model folder's frozen block linears: fp8 (half of bf16, computed in bf16 "
                        "one block at a time; needs a preset with checkpointing), compute (the --dtype), auto: fp8 "
                        "on CUDA with checkpointing, else compute")


def memory_settings(args, device):
    """The MemorySettings of --memory-preset on `device`."""
    from ..lora_edit.lowvram import preset

    name = args.memory_preset
    if name == "auto":
        name = "24GB" if str(device).startswith("cuda") else "unlimited"
    return preset(name)


def _models(args, device, mem):
    """(dit, encode, context, kind) for --model; a folder's swapped blocks stay on the CPU."""
    import torch

    from ..host.diffusers import load_diffusers_wan
    from ..host.vae import load_diffusers_wan_vae
    from ..lora_edit.lowvram import place_for_swap

    if args.model == "world":
        from ..world.model import load_world_models

        world = load_world_models(device)
        dit, vae, context = world.dit, world.vae, world.context()
    else:
        if not args.vae:
            raise ValueError("--model is a folder: give the matching Wan VAE with --vae.")
        cuda = str(device).startswith("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            args.dtype, torch.bfloat16 if cuda else torch.float32)
        fp8 = args.base_weights == "fp8" or (args.base_weights == "auto" and cuda and mem.gradient_checkpointing)
        if fp8 and (dtype != torch.bfloat16 or not mem.gradient_checkpointing):
            raise ValueError("fp8 base weights compute in bf16 one block at a time: use --dtype bf16 and a memory "
                             "preset with checkpointing (not 'unlimited'), or --base-weights compute.")
        dit = load_diffusers_wan(args.model, dtype=dtype, device="cpu", storage="fp8" if fp8 else None)
        swapped = mem.blocks_to_swap(len(dit.blocks()))
        place_for_swap(dit.module, dit.blocks(), swapped, device)
        print(f"note: {swapped} of {len(dit.blocks())} blocks stay in CPU RAM, base weights "
              f"{'fp8' if fp8 else str(dtype).removeprefix('torch.')}", file=sys.stderr)
        vae = load_diffusers_wan_vae(args.vae, dtype=dtype, device=device)
        context = torch.zeros(1, 1, dit.dims.text_dim, device=device, dtype=dtype)
    kind = {36: "i2v", 48: "fun_control"}.get(dit.dims.in_channels)
    if kind is None:
        raise ValueError(f"FreeProp trains an I2V (36-channel) or Fun-Control (48-channel) Wan; this model takes "
                         f"{dit.dims.in_channels} channels.")
    return dit, vae.encode, context, kind


def run(args) -> int:
    import torch

    from ..common import Cancelled
    from .freeprop import FreePropSettings, pair_sample, save_freeprop, train_freeprop
    from .pairs import PairSet, write_world_pairs
    from .positions import HeadSplit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        if args.world_pairs and rank == 0:
            write_world_pairs(args.pairs, seeds=range(args.seed, args.seed + args.world_pairs))
        if world > 1:
            torch.distributed.barrier()
        mem = memory_settings(args, device)
        frames = args.max_frames
        if mem.window_frames and frames > mem.window_frames:
            frames = mem.window_frames
            print(f"note: the {args.memory_preset} preset trains {frames}-frame clips (--max-frames {frames})",
                  file=sys.stderr)
        pairs = PairSet.from_folder(args.pairs, frames)
        dit, encode, context, kind = _models(args, device, mem)
        if args.variant == "paper" and not args.no_ast_rope:
            try:
                HeadSplit(args.spatial_ratio).groups(dit.dims.num_heads)
            except ValueError as e:
                raise ValueError(f"{e} (this model has {dit.dims.num_heads} heads)") from None

        def get(i: int):
            p = pairs[i]
            s = pair_sample(p.source.to(device), p.edited.to(device), lambda x: encode(x).float(), context.to(device), kind)
            return s

        settings = replace(FreePropSettings(), steps=args.steps, batch=args.batch, learning_rate=args.lr,
                           rank=args.rank, variant=args.variant, split=HeadSplit(args.spatial_ratio),
                           ast_rope=not args.no_ast_rope, teacher=not args.no_teacher, seed=args.seed,
                           backend=args.backend, checkpoint_every=args.checkpoint_every)

        def bar(i: int, n: int, _p=None) -> None:
            if rank == 0 and (i == n or i == 1 or i % max(1, n // 20) == 0):
                print(f"step {i}/{n}", file=sys.stderr, flush=True)

        try:
            res = train_freeprop(dit, get, len(pairs), settings, checkpoint=args.checkpoint, resume=args.resume,
                                 on_step=bar, memory=mem)
        except (Cancelled, KeyboardInterrupt):
            if rank == 0:
                print("cancelled; " + (f"{args.checkpoint} holds the last finished step: run the same command with "
                                       "--resume to continue" if args.checkpoint else
                                       "nothing kept (no --checkpoint)"), file=sys.stderr)
            return 130
        if rank == 0:
            save_freeprop(args.out, res.model, {"steps": res.step, "pairs": len(pairs), "kind_base": kind})
            last = res.parts[-1] if res.parts else {}
            print(f"wrote {args.out}: {res.step} steps ({len(res.losses)} this run), loss {res.losses[0]:.4g} -> "
                  f"{res.losses[-1]:.4g} ({', '.join(f'{k} {v:.4g}' for k, v in last.items())})" if res.losses
                  else f"wrote {args.out}")
        return 0
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    """`python -m ffprop.nodes.ast_rope.cli freeprop ...` (torchrun entry point)."""
    parser = argparse.ArgumentParser(prog="ffprop train")
    add_parser(parser.add_subparsers(dest="what", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
