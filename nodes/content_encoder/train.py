"""Train a content encoder (SEED_SPEC 4.1, 4.3, 4.5) on any WanDiT; the generator stays frozen and bit-identical.

Each step: a synthetic pair (data.py) encoded to latents; the SCE reads the pair's `sce_video`, the generator is
conditioned on the pair's first frame (stock I2V: frame 1 kept, the rest grey) and must produce its `target`.
Flow matching (x_t = (1 - t) x1 + t noise, t ~ U(0, 1), target velocity noise - x1); loss = L_non-mask +
2 L_mask + L_grad + L_MPD (losses.py). AdamW at 5e-5 with warm-up + cosine decay, grad clip, EMA of the
encoder's weights (the result). Memory: the LoRA-Edit BlockRunner (checkpointing / block swap / activation
offload / split blocks) on the generator's blocks and (checkpointing only) on the encoder's copied blocks.
`train_mask_decoder` (the CLI's --only-mpd) trains the mask decoder alone: with the SCE frozen its inputs never
change, so they are computed once per (pair, flow time) and each step runs only the decoder, on a batch.

Distributed: `python -m torch.distributed.run --nproc_per_node K -m ffprop.nodes.content_encoder.train ...`
(torchrun; DDP, gloo on CPU, nccl on CUDA). Step s uses global pairs s*B .. s*B+B-1 (B = batch), each with its
own noise and t drawn from (seed, pair index); rank r takes every K-th of them, so K processes compute the
same mean gradient as one process with the whole batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..common import OnStep, ShouldStop, log, report
from ..host.protocol import WanCond, training_context
from .data import Pair
from .losses import LossWeights, gradient_loss, mpd_loss, mpd_time_weight, probe_delta, region_losses, total_loss
from .model import TASKS, ContentEncoder, pixel_mask_to_latent, pixel_mask_to_mpd

Encode = Callable[[Tensor], Tensor]
Attach = Callable[[ContentEncoder], tuple[object, object]]
"""attach(encoder) -> (WanDiT with the encoder attached, its Injection) (attach.attach_diffusers / attach_comfy)."""


@dataclass(frozen=True)
class LatentPair:
    """A Pair in latent space: sce [1, 16, F, h, w], cond (the generator's I2V conditioning), target x1
    [1, 16, F, h, w], mask m~ [1, 1, F, h, w], mpd_target [1, T, H, W] (pixel resolution), task index."""

    sce: Tensor
    cond: WanCond
    target: Tensor
    mask: Tensor
    mpd_target: Tensor
    task: int


def encode_pair(pair: Pair, encode: Encode, context: Tensor, clip_tokens: Optional[Tensor] = None) -> LatentPair:
    """Encode a pixel Pair with the VAE; the generator's conditioning is stock I2V from pair.first_frame."""
    from ..lora_edit.conditioning import masked_condition_video, wan_cond

    v_cond, keep = masked_condition_video(pair.target, None, pair.first_frame)
    with torch.no_grad():
        sce, target, cond_lat = encode(pair.sce_video), encode(pair.target), encode(v_cond)
    dev = target.device
    return LatentPair(sce, wan_cond(cond_lat, keep, context, clip_tokens), target,
                      pixel_mask_to_latent(pair.mask).to(dev), pixel_mask_to_mpd(pair.mask).to(dev),
                      TASKS.index(pair.task))


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    learning_rate: float = 5e-5
    batch: int = 1
    ema_decay: float = 0.99
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    only_mpd: bool = False   # train only the mask decoder (mpd_*): the SCE, hence the generated video, stays as it is


@dataclass
class TrainResult:
    encoder: ContentEncoder           # the EMA weights
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def pair_loss(att, state, pair: LatentPair, gen: torch.Generator, weights: LossWeights) -> tuple[Tensor, dict]:
    """One pair's total loss through the attached generator, and its terms."""
    state.set_source(pair.sce, pair.task)
    state.want_mask = True
    state.probe = probe_delta(pair.mask, weights.eps, gen) if weights.grad else None
    x1 = pair.target
    noise = torch.randn(x1.shape, generator=gen).to(x1)
    t = torch.rand(1, generator=gen)
    tt = t.to(x1)
    v = att.predict((1 - tt) * x1 + tt * noise, t.to(x1.device), pair.cond)
    l_mask, l_non = region_losses(v, noise - x1, pair.mask)
    zero = v.new_zeros(())
    l_grad = gradient_loss(*state.probed, pair.mask, weights.eps) if state.probe is not None else zero
    l_mpd = mpd_time_weight(tt).reshape(()) * mpd_loss(state.mask_logits, pair.mpd_target) if weights.mpd else zero
    loss = total_loss(l_mask, l_non, l_grad, l_mpd, weights)
    state.probe = state.probed = state.feats = state.mask_logits = None
    terms = {k: float(v.detach()) for k, v in (("mask", l_mask), ("non_mask", l_non), ("grad", l_grad), ("mpd", l_mpd))}
    return loss, terms


def _pair_gen(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 7_919 + 1_000_003 * int(index) + 17)


def _ema_step(loss: Tensor, opt, sched, params: list, ema: list, step: int, settings, what: str) -> None:
    """One optimiser step of both trainers: refuse a non-finite loss, backward, clip to settings.grad_clip (0 =
    off), AdamW + schedule, then the EMA copies `ema` follow `params` (decay min(ema_decay, (1+step)/(10+step)))."""
    if not torch.isfinite(loss):
        raise RuntimeError(f"{what} training diverged at step {step + 1} (loss {float(loss)}); "
                           f"lower the learning rate (now {settings.learning_rate:g}).")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    opt.step()
    sched.step()
    decay = min(settings.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_content_encoder(encoder: ContentEncoder, attach: Attach, get_pair: Callable[[int], LatentPair],
                          settings: TrainSettings = TrainSettings(), memory=None,
                          on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None,
                          device: torch.device | str | None = None) -> TrainResult:
    """Train `encoder` in place; returns its EMA copy. get_pair(i) -> the i-th global training pair.

    memory: lora_edit.lowvram.MemorySettings (None = no checkpointing). on_step(i, total, loss) after every step;
    should_stop() after every step and before every block. Runs under torch.distributed when it is initialised."""
    from ..lora_edit.lowvram import BlockRunner, MemorySettings
    from ..world.train import warmup_cosine
    from .attach import generator_blocks

    memory = memory or MemorySettings(gradient_checkpointing=False)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    if settings.batch % world:
        raise ValueError(f"batch {settings.batch} must be a multiple of the number of processes ({world}).")
    t0 = time.perf_counter()
    with torch.inference_mode(False):
        encoder.requires_grad_(True).train()
        if settings.only_mpd:
            for name, p in encoder.named_parameters():
                p.requires_grad_(name.startswith("mpd_"))
        att, state = attach(encoder)
        dit_base = att.module
        frozen = [(p, p.requires_grad) for p in dit_base.parameters()]
        dit_base.requires_grad_(False)
        params = [p for p in encoder.parameters() if p.requires_grad]
        model = encoder
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(encoder, find_unused_parameters=False)
        opt = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999),
                                weight_decay=settings.weight_decay)
        sched = warmup_cosine(opt, settings.steps)
        ema = [p.detach().clone() for p in params]
        dev = torch.device(device) if device is not None else params[0].device
        gen_blocks = generator_blocks(att)
        runners = [BlockRunner(gen_blocks, dev, memory.gradient_checkpointing, memory.blocks_to_swap(len(gen_blocks)),
                               should_stop, memory.offload_activations, memory.split_blocks),
                   BlockRunner([*encoder.blocks, encoder.mpd_block], dev, memory.gradient_checkpointing, 0, should_stop)]
        result = TrainResult(encoder)
        local = [j for j in range(settings.batch) if j % world == rank]
        try:
            with torch.enable_grad(), training_context(att):
                for r in runners:
                    r.install()
                for step in range(settings.steps):
                    def step_loss(step=step):
                        total, parts = 0.0, []
                        for j in local:
                            index = step * settings.batch + j
                            loss, terms = pair_loss(att, state, get_pair(index), _pair_gen(settings.seed, index),
                                                    settings.weights)
                            total = total + loss / len(local)
                            parts.append(terms)
                        step_loss.parts = parts
                        return total

                    loss = model(step_loss)
                    _ema_step(loss, opt, sched, params, ema, step, settings, "content-encoder")
                    value = float(loss.detach())
                    if world > 1:
                        value_t = torch.tensor([value])
                        torch.distributed.all_reduce(value_t)
                        value = float(value_t) / world
                    result.losses.append(value)
                    result.parts.append({k: sum(p[k] for p in step_loss.parts) / len(step_loss.parts)
                                         for k in step_loss.parts[0]})
                    report(on_step, should_stop, step + 1, settings.steps, value)
        finally:
            for r in reversed(runners):
                r.remove()
            for p, req in frozen:
                if p.requires_grad != req:
                    with torch.inference_mode(p.is_inference()):
                        p.requires_grad_(req)
        out = copy.deepcopy(encoder)
        with torch.no_grad():
            for q, e in zip([p for p in out.parameters() if p.requires_grad], ema):
                q.copy_(e)
        out.requires_grad_(False).eval()
        encoder.requires_grad_(False)
    result.encoder = out
    result.seconds = time.perf_counter() - t0
    if result.losses:
        tail = result.losses[-10:]
        log.info("FFP content encoder: %d steps, loss %.4f -> %.4f (mean of last %d)", len(result.losses),
                 result.losses[0], sum(tail) / len(tail), len(tail))
    return result


@dataclass(frozen=True)
class MpdSettings:
    """train_mask_decoder: `flow_times` cached MPD inputs per pair (the first at t = 0.05, where the mask node
    reads a sampled latent, the others t ~ U(0, max_t)), then `steps` AdamW steps of `batch` cached inputs each."""

    steps: int = 1500
    learning_rate: float = 2e-3
    batch: int = 8
    flow_times: int = 4
    max_t: float = 1.0
    ema_decay: float = 0.99
    seed: int = 0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class _MpdInput:
    hidden: Tensor        # the penultimate block's output [1, L, D] (detached)
    run_block: object     # the generator's RunBlock of that forward (its context, timestep modulation, RoPE)
    grid: tuple[int, int, int]
    target: Tensor        # [1, T, H, W]
    weight: float         # mpd_time_weight(t)


def _mpd_inputs(encoder: ContentEncoder, attach: Attach, pairs: Sequence[LatentPair], settings: MpdSettings,
                should_stop: Optional[ShouldStop] = None) -> list[_MpdInput]:
    """One forward of the attached generator per (pair, flow time), no gradient, keeping what the MPD reads."""
    caught: list[tuple[Tensor, object, tuple]] = []

    def catch(penultimate, run_block, grid):
        caught.append((penultimate.detach(), run_block, grid))
        return penultimate.new_zeros(())

    att, state = attach(encoder)
    out = []
    encoder.mask_logits = catch   # an instance attribute over the method, removed below
    try:
        with torch.no_grad():
            for i, pair in enumerate(pairs):
                gen = _pair_gen(settings.seed, i)
                ts = [0.05, *(settings.max_t * torch.rand(settings.flow_times - 1, generator=gen)).tolist()]
                state.set_source(pair.sce, pair.task)
                for t in ts[:settings.flow_times]:
                    x1 = pair.target
                    noise = torch.randn(x1.shape, generator=gen).to(x1)
                    state.want_mask = True
                    att.predict((1 - t) * x1 + t * noise, torch.tensor([t]).to(x1.device), pair.cond)
                    state.want_mask, state.mask_logits, state.feats = False, None, None
                    h, run_block, grid = caught.pop()
                    out.append(_MpdInput(h, run_block, grid, pair.mpd_target, float(mpd_time_weight(torch.tensor(t)))))
                if should_stop is not None and should_stop():
                    from ..common import Cancelled

                    raise Cancelled(f"cancelled while preparing the mask decoder's inputs ({i + 1} of {len(pairs)})")
    finally:
        del encoder.mask_logits
    return out


def train_mask_decoder(encoder: ContentEncoder, attach: Attach, pairs: Sequence[LatentPair],
                       settings: MpdSettings = MpdSettings(), on_step: Optional[OnStep] = None,
                       should_stop: Optional[ShouldStop] = None) -> TrainResult:
    """Train only the mask decoder (mpd_*) of `encoder` on `pairs`; returns the EMA copy (SCE bit-identical).

    The generator and the SCE are frozen, so the MPD's input for a (pair, flow time, noise) never changes: it is
    computed once (`MpdSettings.flow_times` per pair) and the steps run only the MPD (its block and head), on
    batches of `batch` inputs. One step of the full trainer with batch 1 costs a whole generator + SCE forward;
    on the world, this trains the decoder 8 pairs a step in about the time of one. Memory: the cached inputs are
    [L, D] floats each (the world: 40 KB; a 14B clip: hundreds of MB, so use train_content_encoder there)."""
    from ..world.train import warmup_cosine

    t0 = time.perf_counter()
    with torch.inference_mode(False):
        encoder.requires_grad_(False).eval()
        inputs = _mpd_inputs(encoder, attach, pairs, settings, should_stop)
        params = [p for n, p in encoder.named_parameters() if n.startswith("mpd_")]
        for p in params:
            p.requires_grad_(True)
        encoder.mpd_block.train()
        opt = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
        sched = warmup_cosine(opt, settings.steps)
        ema = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(int(settings.seed) + 99)
        result = TrainResult(encoder)
        try:
            with torch.enable_grad():
                for step in range(settings.steps):
                    batch = [inputs[i] for i in torch.randint(len(inputs), (settings.batch,), generator=gen).tolist()]
                    loss = sum(x.weight * mpd_loss(encoder.mask_logits(x.hidden, x.run_block, x.grid), x.target)
                               for x in batch) / len(batch)
                    _ema_step(loss, opt, sched, params, ema, step, settings, "mask-decoder")
                    value = float(loss.detach())
                    result.losses.append(value)
                    result.parts.append({"mpd": value})
                    report(on_step, should_stop, step + 1, settings.steps, value)
        finally:
            for p in params:
                p.requires_grad_(False)
        out = copy.deepcopy(encoder)
        with torch.no_grad():
            for q, e in zip([p for n, p in out.named_parameters() if n.startswith("mpd_")], ema):
                q.copy_(e)
        out.requires_grad_(False).eval()
        encoder.eval()
    result.encoder = out
    result.seconds = time.perf_counter() - t0
    return result


# ---- world pairs and the command line (also the torchrun entry) -----------------------------------------------

def world_pairs(world, seeds: Sequence[int], size=(64, 64), frames: int = 17, seed: int = 0,
                count: Optional[int] = None) -> list[LatentPair]:
    """Encoded training pairs from world scenes (training seeds only): `count` pairs (default: one per seed) drawn
    with data.make_pair over the clips of `seeds`."""
    from ..evaluate.bench import memo_encode
    from .data import make_pair, world_clip

    clips = [world_clip(s, size, frames) for s in seeds]
    ctx = world.context(1)
    encode = memo_encode(world.vae.encode, keep=4 * len(clips))   # a clip's real frames and I2V input recur
    return [encode_pair(make_pair(clips, i, seed), encode, ctx) for i in range(count or len(clips))]


def run(args) -> int:
    """Train on the world models (nodes/world) and save; under torchrun each process takes its share."""
    from ..world.model import load_world_models
    from .attach import attach_diffusers
    from .data import load_folder, make_pair
    from .files import load_encoder, save_encoder
    from .model import build_encoder

    dist = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if dist:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        world = load_world_models()
        if args.folder:
            clips = load_folder(args.folder)
            ctx = world.context(1)
            pairs = [encode_pair(make_pair(clips, i, args.seed), world.vae.encode, ctx) for i in range(args.pairs)]
        else:
            pairs = world_pairs(world, range(args.clips), seed=args.seed, count=args.pairs)
        if args.init:
            encoder = load_encoder(args.init, world.dit, fresh_mpd_head=args.only_mpd, seed=args.seed)
        elif args.only_mpd:
            raise ValueError("--only-mpd trains the mask decoder of an existing encoder: give it with --init FILE.")
        else:
            encoder = build_encoder(world.dit, args.depth, seed=args.seed)
        src = pairs[0].sce
        # --only-mpd: the SCE is frozen, so its gradient loss would cost a forward and teach nothing
        settings = TrainSettings(steps=args.steps, learning_rate=args.lr, batch=args.batch, ema_decay=args.ema,
                                 seed=args.seed, only_mpd=args.only_mpd,
                                 weights=LossWeights(mpd=args.mpd_weight, grad=0.0 if args.only_mpd else 1.0))
        last = [time.perf_counter()]

        def on_step(i, n, loss):
            if i == n or time.perf_counter() - last[0] > 10:
                last[0] = time.perf_counter()
                print(f"step {i}/{n} loss {loss:.4f}", file=sys.stderr, flush=True)

        attach = lambda e: attach_diffusers(world.dit, e, src)   # noqa: E731
        if args.only_mpd:   # the MPD's inputs cached once, batches of args.batch (train_mask_decoder)
            result = train_mask_decoder(encoder, attach, pairs, MpdSettings(
                steps=args.steps, learning_rate=args.lr, batch=args.batch, flow_times=args.flow_times,
                ema_decay=args.ema, seed=args.seed), on_step=on_step)
        else:
            result = train_content_encoder(encoder, attach, lambda i: pairs[i % len(pairs)], settings, on_step=on_step)
        rank = torch.distributed.get_rank() if dist else 0
        if rank == 0:
            tail = result.losses[-10:]
            save_encoder(result.encoder, args.out, {"steps": str(args.steps), "lr": str(args.lr),
                                                    "mpd_weight": str(args.mpd_weight), "mpd_loss": "bce+dice",
                                                    "batch": str(args.batch),
                                                    **({"mpd_trainer": "train_mask_decoder (cached MPD inputs, "
                                                                       f"{args.flow_times} flow times per pair)"}
                                                       if args.only_mpd else {}),
                                                    "mpd_resolution": "pixel", "init": str(args.init or ""),
                                                    "wall_seconds": f"{result.seconds:.0f}",
                                                    "command": " ".join(["python -m ffprop.nodes.content_encoder.train",
                                                                         *sys.argv[1:]]),
                                                    "loss_first": f"{result.losses[0]:.5f}",
                                                    "loss_last10": f"{sum(tail) / len(tail):.5f}",
                                                    "data": args.folder or f"world seeds 0..{args.clips - 1}",
                                                    "world_dit_sha256": world.manifest["models"]["dit_i2v"]["sha256"]})
            print(f"wrote {args.out}: {len(result.losses)} steps in {result.seconds:.0f} s, loss "
                  f"{result.losses[0]:.4f} -> {sum(tail) / len(tail):.4f}")
    finally:
        if dist:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from .cli import arguments

    raise SystemExit(run(arguments(argparse.ArgumentParser(prog="python -m ffprop.nodes.content_encoder.train"))
                         .parse_args()))
