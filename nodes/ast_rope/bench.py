"""FreeProp rows of the world benchmark (nodes/evaluate/bench.py discovers `engines`).

freeprop: a LoRA + AST-RoPE predictor trained with flow matching and the identity teacher on world pairs of
TRAINING seeds (nodes/world/scenes.py TRAIN_SEEDS: seeds 0..PAIRS-1, never the held-out ones), then stock
I2V sampling from the edited first frame with the LoRA and the predicted alphas. freeprop_no_ast_rope: the same
training without the predictor (stock RoPE); freeprop_no_teacher: without the relation terms (the paper's
ablation). Each row trains once, on its first case, for settings.train_steps steps (batch 1, rank
settings.lora_rank, lr LR). The world DiT has one attention head, so the paper variant's head split cannot
apply: the rows use variant "global" (one alpha pair for all heads), stated in the row's log line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from ..common import log

PAIRS = 16
LR = 5e-4


def engines(world, settings) -> dict[str, Callable]:
    """{"freeprop", "freeprop_no_ast_rope", "freeprop_no_teacher"} -> Engine; {} without the world models."""
    if world is None:
        return {}
    return {name: _engine(world, settings, **opts) for name, opts in (
        ("freeprop", {}), ("freeprop_no_ast_rope", {"ast_rope": False}), ("freeprop_no_teacher", {"teacher": False}))}


def _engine(world, settings, **opts) -> Callable:
    from ..host.sampling import sample
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from ..video.frames import latent_shape
    from ..world.scenes import EDITS, render_sample
    from .freeprop import FreePropFile, FreePropSettings, freeprop_model, pair_sample, train_freeprop
    from .positions import HeadSplit
    from .predictor import PredictorConfig

    state: dict = {}

    def trained() -> FreePropFile:
        if "file" not in state:
            size, frames = settings.size, settings.frames
            ctx = world.context

            def get(i: int):
                s = render_sample(i, EDITS[i % len(EDITS)], size=size, frames=frames)
                return pair_sample(s.source, s.target, world.encode, ctx, "i2v")
            st = replace(FreePropSettings(), steps=settings.train_steps, rank=settings.lora_rank, learning_rate=LR,
                         variant="global", backend="torch", predictor=PredictorConfig(width=64, depth=2, heads=2),
                         **opts)
            res = train_freeprop(world.dit, get, PAIRS, st)
            last = res.parts[-1]
            log.info("FFP bench freeprop%s: %d steps on %d training-seed world pairs, variant global (1 head), "
                     "loss %.4g -> %.4g, last %s", "".join(f" {k}={v}" for k, v in opts.items()), res.step, PAIRS,
                     res.losses[0], res.losses[-1], last)
            m = res.model
            state["file"] = FreePropFile(m.lora, m.predictor.eval() if m.predictor is not None else None, "global",
                                         HeadSplit())
        return state["file"]

    def run(s) -> Tensor:
        loaded = trained()
        first = s.edited_first
        h, w, _ = first.shape
        v_cond, keep = masked_condition_video(first[None].expand(settings.frames, h, w, 3), None, first)
        cond = wan_cond(world.encode(v_cond), keep, world.context)
        noise = torch.randn(latent_shape(settings.frames, h, w), generator=torch.Generator().manual_seed(s.seed))
        with torch.no_grad(), freeprop_model(world.dit, loaded, world.encode(s.source), "torch") as dit:
            out = sample(dit, cond, noise, settings.sample_steps, settings.shift)
        return world.decode(out).clamp(0, 1)

    return run
