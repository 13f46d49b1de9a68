"""Chained generation over a chunk plan: each chunk starts from the last generated frame(s) of the previous one.

`chain_chunks` is engine-agnostic: it slices the source (and masks) per chunk, pads the last chunk by the
plan's policy, hands off the overlap frames, applies drift control, streams each chunk's frames into one
preallocated CPU output, reports progress across chunks, honours Cancel, and measures seams and colour
drift. A `Generator` turns one `ChunkJob` into frames: `flow_generator` (nodes/flow, CPU), `wan_generator`
(any WanDiT + VAE callables, with the Euler sampler of nodes/host/sampling), or the ComfyUI sampler in
nodes/chunks/node.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..common import OnStep, ShouldStop, log
from ..video.frames import check_mask, check_video, fit_to_frame, wan_mask_channels
from .drift import (
    DriftSettings,
    EditAnchor,
    color_drift,
    correct_chunk,
    crossfade,
    edit_anchor,
    format_report,
    region_seam_jumps,
    seam_jumps,
)
from .plan import Chunk, ChunkPlan, source_indices

KINDS = ("i2v", "lora_edit", "fun_control")
DEFAULT_KIND = "lora_edit"
"""The default conditions every chunk on its own source slice (outside the edit mask); i2v does not see the source."""
GREY = 0.5


@dataclass(frozen=True)
class ChunkJob:
    """What a generator gets for one chunk.

    source:    [length, H, W, 3] source frames of the chunk (padding included).
    edit_mask: [length, H, W] edit region (1 = edit) for every chunk frame, or None (none given, or only a
               frame-1 mask: see first_mask).
    first_mask: [H, W] edit region of the chunk's first frame when known (chunk 1: the user's frame-1 mask).
    user_mask: the user's single mask [1, H, W] for every chunk (a static region, e.g. a loose box), or None.
    head:      [n, H, W, 3] frames to keep at the start: chunk 1 = the edited first frame (n = 1), later chunks
               = the previous chunk's last `overlap` output frames (hand-off).
    prompt:    index into the per-chunk prompts (0 when one prompt serves every chunk).
    seed:      the chunk's seed (base seed + chunk index).
    on_step / should_stop: inner progress (steps of this chunk) and cancel."""

    chunk: Chunk
    source: Tensor
    edit_mask: Optional[Tensor]
    first_mask: Optional[Tensor]
    user_mask: Optional[Tensor]
    head: Tensor
    prompt: int
    seed: int
    on_step: Optional[OnStep] = None
    should_stop: Optional[ShouldStop] = None


@dataclass(frozen=True)
class ChunkResult:
    """frames [length, H, W, 3] in 0..1 on CPU; edit_mask [length, H, W] where the generator knows it."""

    frames: Tensor
    edit_mask: Optional[Tensor] = None


Generator = Callable[[ChunkJob], ChunkResult]


@dataclass(frozen=True)
class ChainResult:
    """video [T, H, W, 3] (CPU), edit_mask [T, H, W] or None, the per-chunk hand-off frames as received,
    seam jumps (whole frame, and inside the edit region when one is known), colour drift per chunk, the report."""

    video: Tensor
    edit_mask: Optional[Tensor]
    seams: tuple[int, ...]
    seam_jumps: list[float]
    drift: dict[str, list[float]]
    report: str
    region_seam_jumps: list[float] = field(default_factory=list)
    heads: list[Tensor] = field(default_factory=list)


def check_inputs(plan: ChunkPlan, source: Tensor, edit_mask: Optional[Tensor], num_prompts: int) -> Optional[Tensor]:
    """Validate source/mask/prompt counts against the plan; returns the mask as [1 or T, H, W] float."""
    check_video(source, "source_video")
    if source.shape[0] != plan.num_frames:
        raise ValueError(f"the chunk plan was made for {plan.num_frames} frames but source_video has "
                         f"{source.shape[0]}; plan the chunks from this clip (connect it to the plan node).")
    if num_prompts not in (1, len(plan)):
        raise ValueError(f"got {num_prompts} prompts for {len(plan)} chunks; give one prompt for the whole clip "
                         f"or exactly one per chunk ({len(plan)}).")
    if edit_mask is None:
        return None
    mask = check_mask(edit_mask.float().cpu(), "edit_mask", source)
    if mask.shape[0] not in (1, plan.num_frames):
        raise ValueError(f"edit_mask has {mask.shape[0]} frames but the clip has {plan.num_frames}; give one mask "
                         "for frame 1 or one per frame.")
    if not bool((mask > 0.5).any()):
        raise ValueError("edit_mask is empty (no pixel > 0.5), so nothing would be edited. Leave it unconnected "
                         "for a global edit, or check the mask node (inverted mask? wrong threshold?).")
    return mask


def check_finite(frames: Tensor, chunk: Chunk, num_chunks: int) -> None:
    """RuntimeError naming the chunk when its generated frames [L, H, W, 3] hold NaN/inf: one bad value would
    spread through the colour anchor and the hand-off into every later chunk."""
    per_frame = [int(frame.numel() - torch.isfinite(frame).sum()) for frame in frames]   # frame by frame: no copy
    count = sum(per_frame)
    if not count:
        return
    where = [chunk.start + i + 1 for i, n in enumerate(per_frame) if n]
    shown = ", ".join(map(str, where[:8])) + (f", ... ({len(where)} frames)" if len(where) > 8 else "")
    raise RuntimeError(
        f"chunk {chunk.index + 1} of {num_chunks} (frames {chunk.start + 1}-{chunk.stop}"
        f"{f' + {chunk.pad} padding frames' if chunk.pad else ''}) came back "
        f"from the generator with {count} non-finite values (NaN/inf) of {frames.numel()}, in clip frame(s) {shown}; "
        "stopped before they spread into the later chunks. The sampler diverged: try a lower cfg, fp32 or bf16 "
        "instead of fp16 weights/VAE, another sampler or scheduler, more steps, or another seed.")


def chain_chunks(plan: ChunkPlan, source: Tensor, edited_first: Tensor, generate: Generator,
                 edit_mask: Optional[Tensor] = None, drift: DriftSettings = DriftSettings(), num_prompts: int = 1,
                 seed: int = 0, steps_per_chunk: int = 1, size_policy: str = "auto",
                 on_step: Optional[OnStep] = None, should_stop: Optional[ShouldStop] = None) -> ChainResult:
    """Run `generate` chunk by chunk over the plan and assemble the clip.

    source [T, H, W, 3] (CPU); edited_first [H', W', 3] or [1, H', W', 3] (fitted by size_policy); edit_mask
    None, [1, H, W] or [T, H, W] (1 = edit). Progress: chunk c step i of steps_per_chunk is reported as
    c * steps_per_chunk + i of len(plan) * steps_per_chunk (preview = the chunk's last frame)."""
    mask = check_inputs(plan, source, edit_mask, num_prompts)
    t_len, h, w = source.shape[:3]
    edited, fit_note = fit_to_frame(edited_first.float().cpu(), h, w, size_policy)
    notes = list(plan.notes) + ([fit_note] if fit_note else [])
    per_frame = mask if mask is not None and mask.shape[0] == t_len and t_len > 1 else None
    out = torch.empty(t_len, h, w, 3)                             # the whole result lives on the CPU
    out_mask: Optional[Tensor] = None
    total = len(plan) * steps_per_chunk
    anchor: Optional[EditAnchor] = None
    heads: list[Tensor] = []
    for chunk in plan.chunks:
        idx = source_indices(plan, chunk)
        head = edited[None] if chunk.index == 0 else out[chunk.start:chunk.start + chunk.overlap].clone()
        heads.append(head)
        done = chunk.index * steps_per_chunk

        def inner(i: int, n: int, preview=None, _done=done) -> None:
            if on_step is not None:
                on_step(_done + min(i, steps_per_chunk), total, preview)

        job = ChunkJob(chunk, source[idx], None if per_frame is None else per_frame[idx],
                       mask[0] if mask is not None and chunk.index == 0 else None,
                       mask if mask is not None and per_frame is None else None, head,
                       chunk.index if num_prompts > 1 else 0, seed + chunk.index, inner, should_stop)
        result = generate(job)
        frames = result.frames.detach().float().cpu()
        if frames.shape != (chunk.length, h, w, 3):
            raise RuntimeError(f"chunk {chunk.index + 1} generator returned {tuple(frames.shape)}, expected "
                               f"{(chunk.length, h, w, 3)}.")
        check_finite(frames, chunk, len(plan))
        region = result.edit_mask.detach().float().cpu() if result.edit_mask is not None else job.edit_mask
        fixed = 1 if chunk.index == 0 else chunk.overlap         # frames that must stay (edit / hand-off)
        frames = correct_chunk(frames, job.source, region, anchor, drift, first_fixed=fixed) \
            if chunk.index > 0 or drift.match_background else frames
        if chunk.index == 0 and drift.match_edit:
            anchor = edit_anchor(frames, region)
        if chunk.index > 0 and drift.crossfade and chunk.overlap > 1 and not drift.off:
            lo = chunk.start
            out[lo + 1:lo + chunk.overlap] = crossfade(out[lo:lo + chunk.overlap], frames[:chunk.overlap])[1:]
        keep = chunk.stop - chunk.start
        out[chunk.start + chunk.overlap:chunk.stop] = frames[chunk.overlap:keep]
        if region is not None:
            if out_mask is None:
                out_mask = torch.zeros(t_len, h, w)
            out_mask[chunk.start + chunk.overlap:chunk.stop] = region[chunk.overlap:keep]
        del frames, result
        log.info("FFP chunks: chunk %d/%d done (frames %d-%d)", chunk.index + 1, len(plan), chunk.start + 1, chunk.stop)
        if on_step is not None:
            on_step(done + steps_per_chunk, total, out[chunk.stop - 1])
        if should_stop is not None and should_stop():
            from ..common import Cancelled
            raise Cancelled(f"cancelled after chunk {chunk.index + 1} of {len(plan)}")

    metric_mask = per_frame if per_frame is not None else out_mask
    jumps = seam_jumps(out, plan.seams)
    region_jumps = region_seam_jumps(out, metric_mask, plan.seams) if metric_mask is not None else []
    ranges = [range(c.start + c.overlap, c.stop) for c in plan.chunks]
    drift_rows = color_drift(out, source, metric_mask, ranges)
    report = plan.summary() + "\n" + format_report(plan.seams, jumps, drift_rows, drift, tuple(notes[len(plan.notes):]),
                                                   region_jumps)
    return ChainResult(out, out_mask, plan.seams, jumps, drift_rows, report, region_jumps, heads)


# ---- generators ---------------------------------------------------------------------------------------------


def flow_generator(settings=None) -> Generator:
    """Chunks through the optical-flow engine (nodes/flow): chunk 1 uses the user's mask (or derives it);
    later chunks use the per-frame masks when given, else derive the edit region from the hand-off frame's
    difference to the source (so the region does not grow from chunk to chunk)."""
    from ..flow.engine import FlowSettings, derive_edit_mask, propagate_edit

    settings = settings or FlowSettings()

    def generate(job: ChunkJob) -> ChunkResult:
        first = job.head[0]
        if job.edit_mask is not None:
            mask = job.edit_mask
        elif job.first_mask is not None:
            mask = job.first_mask[None]
        elif job.chunk.index == 0:
            mask = None                                          # propagate_edit derives it and says so
        else:
            try:
                mask = derive_edit_mask(job.source[0], first, settings.mask_threshold)[None]
            except ValueError:                                   # the edit has left the frame
                mask = torch.zeros(1, *job.source.shape[1:3])
        if mask is not None and float(mask.amax()) <= 0:
            log.info("FFP chunks: no edit region at the start of chunk %d; it keeps the source", job.chunk.index + 1)
            return ChunkResult(job.source.clone(), torch.zeros(job.source.shape[:3]))
        res = propagate_edit(job.source, first, mask, settings, "error", job.on_step, job.should_stop)
        return ChunkResult(res.video, res.mask)

    return generate


def condition_video(kind: str, source: Tensor, edit_mask: Optional[Tensor], head: Tensor) -> tuple[Tensor, Tensor]:
    """Conditioning video [L, H, W, 3] and keep-mask [L, H, W] (1 = keep) for one chunk.

    i2v / fun_control: head frames, then grey (stock Wan I2V: V_cond = [I_1, grey...], M = [1, 0, ...]): the
    source is not in it (fun_control passes the source as its control video instead).
    lora_edit: nodes/lora_edit's masked_condition_video: head frames, then the chunk's source frames with the
    edit region grey, keep = 1 outside the edit region (edit_mask None: nothing kept, the same as i2v)."""
    if kind == "lora_edit":
        try:
            from ..lora_edit.conditioning import masked_condition_video
        except ImportError as e:
            raise RuntimeError(f"conditioning kind 'lora_edit' needs nodes/lora_edit ({e}); use 'i2v' meanwhile.") from e
        return masked_condition_video(source, edit_mask, head, allow_empty=True)  # the object may be gone here
    if kind not in KINDS:
        raise ValueError(f"unknown conditioning kind '{kind}'; use one of {KINDS}.")
    n = head.shape[0]
    video = torch.full_like(source, GREY)
    video[:n] = head
    keep = torch.zeros(source.shape[:3])
    keep[:n] = 1
    return video, keep


def wan_generator(dit, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], context: Tensor,
                  steps: int = 20, shift: float = 5.0, kind: str = DEFAULT_KIND,
                  clip_tokens: Optional[Tensor] = None, negative_context: Optional[Tensor] = None, cfg: float = 1.0,
                  device=None, low_noise_dit=None, boundary: float = 0.9) -> Generator:
    """Chunks through a WanDiT with the Euler sampler (nodes/host/sampling).

    low_noise_dit: Wan 2.2's low-noise expert (then `dit` is the high-noise one): inside every chunk the steps at
    sigma >= boundary run `dit`, the rest `low_noise_dit` (lora_edit.experts.ExpertPair routes each step).

    encode(frames [L, H, W, 3] 0..1) -> model-space latent [1, 16, F, h, w]; decode(latent) -> [L, H, W, 3].
    context: [1 or P, tokens, text_dim] (P = one per chunk). kind: see condition_video (the default lora_edit keeps
    each chunk's source outside the edit mask). Only this chunk's latents exist at any time."""
    from ..host.protocol import WanCond
    from ..host.sampling import sample

    if low_noise_dit is not None:
        from ..lora_edit.experts import ExpertPair

        dit = ExpertPair(dit, low_noise_dit, boundary)

    def generate(job: ChunkJob) -> ChunkResult:
        region = job.edit_mask if job.edit_mask is not None else job.user_mask
        video, keep = condition_video(kind, job.source, region, job.head)
        if kind == "fun_control":
            cond_latent = torch.cat([encode(job.source), encode(video)], dim=1)   # control latent, then image
            keep_mask = None
        else:
            cond_latent = encode(video)
            keep_mask = wan_mask_channels(keep)[None]
        ctx = context[job.prompt:job.prompt + 1] if context.shape[0] > 1 else context
        dev = device or cond_latent.device
        cond = WanCond(None if keep_mask is None else keep_mask.to(dev), cond_latent.to(dev), ctx.to(dev),
                       None if clip_tokens is None else clip_tokens.to(dev))
        neg = None
        if negative_context is not None:
            nctx = negative_context[job.prompt:job.prompt + 1] if negative_context.shape[0] > 1 else negative_context
            neg = WanCond(None, None, nctx.to(dev), None)
        g = torch.Generator().manual_seed(job.seed)
        noise = torch.randn(cond_latent.shape[0], 16, *cond_latent.shape[2:], generator=g).to(dev)
        latent = sample(dit, cond, noise, steps, shift, job.on_step, job.should_stop, neg, cfg)
        del noise, cond
        frames = decode(latent).float().cpu().clamp(0, 1)
        mask = None if region is None else region.float().expand(job.source.shape[:3]).clone()
        return ChunkResult(frames, mask)

    return generate
