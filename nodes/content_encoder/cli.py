"""`ffprop train content-encoder`: train a GenProp content encoder from the command line (the lead wires
`add_parser` into __main__.py's `train` subcommands). Imports no torch until `run`, so --help stays fast.

    ffprop train content-encoder --out enc.safetensors                      # the world models' synthetic pairs
    ffprop train content-encoder --out enc.safetensors --folder CLIPS      # <name>.mp4 + <name>_mask.mp4 clips
    python -m torch.distributed.run --nproc_per_node 2 -m ffprop.nodes.content_encoder.train --out enc.safetensors
"""

from __future__ import annotations

import argparse


def arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--depth", type=int, default=3, help="N, the SCE's blocks (default 3 of the world DiT's 4)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--batch", type=int, default=1, help="pairs per step over all processes (default 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate after 20 warm-up steps, cosine decay "
                                                          "(GenProp: 5e-5)")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the saved weights (default 0.99)")
    p.add_argument("--mpd-weight", type=float, default=1.0, help="gamma, the mask decoder loss's weight (GenProp: 1; "
                                                                 "the bundled world encoder: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers, pairs, noise and t (default 0)")
    p.add_argument("--clips", type=int, default=16, help="world training scenes: seeds 0..N-1 (default 16; never "
                                                         "the benchmark's held-out seeds)")
    p.add_argument("--pairs", type=int, default=48, help="distinct synthetic pairs drawn from the clips (default 48)")
    p.add_argument("--init", default=None, help="start from this encoder file instead of a fresh copy of the DiT's "
                                                "blocks (a format-1 file only with --only-mpd)")
    p.add_argument("--only-mpd", action="store_true", help="train only the mask decoder of the --init encoder (a new "
                                                          "pixel-resolution head; the SCE and so the video stay as "
                                                          "they are); its inputs are computed once, so use --batch 8")
    p.add_argument("--flow-times", type=int, default=4, help="--only-mpd: cached decoder inputs per pair, the first at "
                                                              "t = 0.05, the rest t ~ U(0, 1) (default 4)")
    p.add_argument("--folder", default=None, help="train on <name>.mp4 + <name>_mask.mp4 clips in this folder instead "
                                                  "of the world (the generator is still the world DiT)")
    return p


def add_parser(sub) -> None:
    """Add `content-encoder` to a subparsers object (e.g. `ffprop train`'s)."""
    arguments(sub.add_parser("content-encoder", help="train a GenProp content encoder (SCE + mask decoder)",
                             description="Train a GenProp content encoder on the bundled world models: synthetic "
                                         "copy-paste / mask-and-fill / colour-fill pairs (0.5 / 0.375 / 0.125), "
                                         "region-aware + gradient + mask losses, EMA. Runs under torchrun too."))


def run(args) -> int:
    from .train import run as train

    return train(args)
