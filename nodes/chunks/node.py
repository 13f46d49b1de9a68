"""Chunk chainer nodes (glue): FFPChunkPlan, FFPChunkSample (ComfyUI sampling per chunk), FFPChunkFlowPropagate.

FFPChunkSample is one loop node rather than a pair of nodes users loop: ComfyUI 0.3.64 has no stable loop
construct, and one node keeps the hand-off frames and drift anchors internal, shows one progress bar across
all chunks, and stops at Cancel between sampler steps."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from comfy_extras.nodes_wan import WanFunControlToVideo, WanImageToVideo

from .._comfy import io, pack_video, progress, ui, unpack_video
from ..common import log
from ..host.comfy import check_wan_model, is_wan22_ti2v
from ..lora_edit.experts import HIGH, TI2V_MESSAGE, WAN22_I2V_BOUNDARY
from ..lora_edit.node import comfy_split_step, expert_inputs, expert_roles
from ..video.frames import FIT_POLICIES
from .chain import DEFAULT_KIND, KINDS, ChunkJob, ChunkResult, chain_chunks, flow_generator
from .drift import DriftSettings
from .plan import POLICIES, check_chunk_settings, plan_chunks

ChunkPlanType = io.Custom("FFP_CHUNK_PLAN")


def drift_inputs(colour_default: bool = True) -> list:
    """The drift switches; the flow engine has no VAE round trip, so its colour matches default to off there."""
    return [
        io.Boolean.Input("match_background", default=colour_default,
                         tooltip="Match the colour statistics (per-channel mean/std) of the unedited region of "
                                 "every frame to the source clip (needs edit_mask), so background colour drift "
                                 "does not carry over the joins. Off keeps the flow engine's background bit-exact."),
        io.Boolean.Input("match_edit", default=colour_default,
                         tooltip="Match the colour statistics of the edit region (whole frame without a mask) in "
                                 "every later chunk to chunk 1, which was generated from your edited first frame. "
                                 "Assumes the edit's colours stay about the same over the clip."),
        io.Boolean.Input("crossfade", default=True,
                         tooltip="Blend the overlapping frames from the previous chunk into this one (overlap > 1)."),
        io.Float.Input("drift_strength", default=1.0, min=0.0, max=1.0, step=0.05,
                       tooltip="How far the colour matches pull (1 = fully, 0 = drift control off)."),
    ]


def _drift(match_background: bool, match_edit: bool, crossfade: bool, drift_strength: float) -> DriftSettings:
    return DriftSettings(match_background, match_edit, crossfade, drift_strength)


class FFPChunkPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPChunkPlan",
            display_name="Plan Video Chunks · FFP",
            category="FFP/video",
            description="Splits a clip longer than one Wan generation window into 4k+1-frame chunks that hand "
                        "over through their last frame(s), and shows the frame ranges. The chunk nodes read it.",
            inputs=[
                io.Video.Input("source_video", tooltip="The clip to split (its frame count sets the plan)."),
                io.Int.Input("chunk_length", default=81, min=5, max=1025, step=4,
                             tooltip="Frames per generation; must be 4k+1 (Wan 2.1: 81, or 49 on smaller GPUs)."),
                io.Int.Input("overlap_frames", default=1, min=1, max=1024,
                             tooltip="Frames each chunk takes over from the previous one. 1 = last-frame chaining; "
                                     "5 = one latent frame of motion context (Wan keeps 4k+1 leading frames)."),
                io.Combo.Input("last_chunk", options=list(POLICIES), default="pad_repeat",
                               tooltip="The last chunk rarely fits: pad_repeat / pad_reflect generate a full chunk "
                                       "padded with the last frame / the clip mirrored back, then trim; shorten "
                                       "generates the smallest 4k+1 length that holds the rest (faster)."),
            ],
            outputs=[
                ChunkPlanType.Output(display_name="plan", tooltip="The chunk plan for the chunk nodes."),
                io.Int.Output(display_name="num_chunks", tooltip="How many chunks the clip needs."),
                io.String.Output(display_name="summary", tooltip="The frame ranges of every chunk, as text."),
            ],
        )

    @classmethod
    def validate_inputs(cls, chunk_length: int, overlap_frames: int, last_chunk: str) -> bool | str:
        try:
            check_chunk_settings(chunk_length, overlap_frames, last_chunk)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, source_video, chunk_length: int, overlap_frames: int, last_chunk: str) -> io.NodeOutput:
        frames, _, _ = unpack_video(source_video)
        plan = plan_chunks(frames.shape[0], chunk_length, overlap_frames, last_chunk)
        text = plan.summary()
        return io.NodeOutput(plan, len(plan), text, ui=ui.PreviewText(text))


def _pick(conditioning: list, index: int, name: str) -> list:
    """One entry of a per-chunk conditioning list (combined in chunk order), or the whole list when it has one."""
    return conditioning if len(conditioning) == 1 else [conditioning[index]]


def comfy_generator(model, vae, positive, negative, kind: str, clip_vision_output, seed_offset: int, steps: int,
                    cfg: float, sampler_name: str, scheduler: str, model_2=None, split: int = 0):
    """A chain generator over ComfyUI: the conditioning node logic of ComfyUI (WanImageToVideo /
    WanFunControlToVideo) or LoRA-Edit's, then comfy.sample.sample like KSampler, then the VAE decode.
    model_2 (Wan 2.2, `model` = the high-noise expert): each chunk is sampled like the two KSamplerAdvanced,
    `model` for steps 0..split with noise added and the leftover noise returned, `model_2` from split to the end."""

    def generate(job: ChunkJob) -> ChunkResult:
        length, h, w = job.source.shape[:3]
        pos, neg = _pick(positive, job.prompt, "positive"), _pick(negative, job.prompt, "negative")
        region = job.edit_mask if job.edit_mask is not None else job.user_mask
        if kind == "i2v":
            pos, neg, latent = WanImageToVideo.execute(pos, neg, vae, w, h, length, 1, start_image=job.head,
                                                       clip_vision_output=clip_vision_output).args
        elif kind == "fun_control":
            pos, neg, latent = WanFunControlToVideo.execute(pos, neg, vae, w, h, length, 1, start_image=job.head,
                                                            clip_vision_output=clip_vision_output,
                                                            control_video=job.source).args
        else:
            try:
                from ..lora_edit.node import lora_edit_conditioning
            except ImportError as e:
                raise RuntimeError(f"conditioning 'lora_edit' needs the LoRA-Edit nodes of this pack ({e}).") from e
            pos, neg, latent = lora_edit_conditioning(pos, neg, vae, job.source, region, job.head, clip_vision_output,
                                                       allow_empty=True)   # the object may have left this chunk
        samples = latent["samples"]
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        seed = job.seed + seed_offset
        if model_2 is None:
            out = comfy.sample.sample(model, comfy.sample.prepare_noise(samples, seed), steps, cfg, sampler_name,
                                      scheduler, pos, neg, samples, callback=_callback(job, 0, steps),
                                      disable_pbar=True, seed=seed)
        else:
            out = sample_experts(model, model_2, split, samples, seed, steps, cfg, sampler_name, scheduler, pos, neg,
                                 job)
        del samples
        frames = vae.decode(out)
        del out
        frames = frames.reshape(-1, *frames.shape[-3:])[:length, :, :, :3].float().cpu()
        mask = None if region is None else region.float().cpu().expand(length, h, w).clone()
        return ChunkResult(frames, mask)

    return generate


def _callback(job: ChunkJob, done: int, total: int):
    def callback(step, x0, x, n):
        if job.on_step is not None:
            job.on_step(done + step + 1, total)
    return callback


def sample_experts(high, low, split: int, samples, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, pos, neg, job: ChunkJob):
    """One chunk through the Wan 2.2 pair exactly as two KSamplerAdvanced do it: `high` adds the seed's noise and
    runs steps 0..split returning the leftover noise, `low` continues from split to the last step without new
    noise. split 0 or >= steps runs one expert over all steps."""
    if split <= 0 or split >= steps:
        model = low if split <= 0 else high
        return comfy.sample.sample(model, comfy.sample.prepare_noise(samples, seed), steps, cfg, sampler_name,
                                   scheduler, pos, neg, samples, callback=_callback(job, 0, steps),
                                   disable_pbar=True, seed=seed)
    x = comfy.sample.sample(high, comfy.sample.prepare_noise(samples, seed), steps, cfg, sampler_name, scheduler,
                            pos, neg, samples, start_step=0, last_step=split, force_full_denoise=False,
                            callback=_callback(job, 0, steps), disable_pbar=True, seed=seed)
    zeros = torch.zeros(x.size(), dtype=x.dtype, layout=x.layout, device="cpu")
    return comfy.sample.sample(low, zeros, steps, cfg, sampler_name, scheduler, pos, neg, x, disable_noise=True,
                               start_step=split, last_step=10000, force_full_denoise=True,
                               callback=_callback(job, split, steps), disable_pbar=True, seed=seed)


def conditioning_note(kind: str, has_mask: bool, has_weight_patches: bool) -> str:
    """The report's first line: what of the source each chunk was conditioned on."""
    if kind == "fun_control":
        return "conditioning: fun_control (every chunk's source slice as control video)"
    if kind == "i2v":
        return "conditioning: i2v (later chunks continue from the hand-off frame; the source is not seen)"
    if not has_mask:
        return ("conditioning: lora_edit without edit_mask: no source frames kept (the same as i2v); connect "
                "edit_mask to condition every chunk on its source outside the edit region")
    return ("conditioning: lora_edit (every chunk keeps its source slice outside edit_mask)"
            + ("" if has_weight_patches else "; note: no LoRA patch is loaded on this MODEL, and the stock model "
               "fills a masked region poorly: load the clip's LoRA from Train LoRA-Edit"))


class FFPChunkSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPChunkSample",
            display_name="Sample Long Video in Chunks · FFP",
            category="FFP/video",
            description="Generates a clip longer than one Wan window chunk by chunk: each chunk starts from the "
                        "last generated frame(s) of the previous one (chunk 1: your edited first frame), sampled "
                        "like KSampler, decoded and kept on the CPU. With conditioning lora_edit (default) and an "
                        "edit_mask, every chunk is also conditioned on its own slice of the source outside the mask; "
                        "with i2v, later chunks are free continuations of the hand-off frame that do not see the "
                        "source. Colour drift is held to the edited first frame; seams and drift are reported.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 I2V (or Fun-Control) model, or Wan 2.2 I2V A14B's high-noise "
                                                "expert (with model_2); for LoRA-Edit, the model with the clip's LoRA "
                                                "applied (one LoRA trained on windows of the whole clip)."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Conditioning.Input("positive", tooltip="Prompt: one for the whole clip, or one per chunk combined "
                                                          "in chunk order with Conditioning (Combine)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt: one, or one per chunk."),
                io.Video.Input("source_video", tooltip="The clip being edited (the plan's clip)."),
                io.Image.Input("edited_first_frame", tooltip="Frame 1 after your edit; another size is fitted by "
                                                             "size_policy."),
                ChunkPlanType.Input("plan", tooltip="From Plan Video Chunks."),
                io.Combo.Input("conditioning", options=list(KINDS), default=DEFAULT_KIND,
                               tooltip="lora_edit: the hand-off frame(s), then this chunk's source frames with the "
                                       "edit region grey; the source outside edit_mask is kept (LoRA-Edit; best with "
                                       "a LoRA from Train LoRA-Edit: the stock model fills a masked region poorly). "
                                       "Without edit_mask nothing of the source is kept (= i2v). i2v: stock Wan "
                                       "image-to-video from the hand-off frame(s) only: the source is not seen. "
                                       "fun_control: the source chunk as control video (Wan Fun-Control model)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of chunk 1; chunk k uses seed + k - 1."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampler steps per chunk."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance (Wan / LoRA-Edit use 5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler, as in KSampler."),
                *drift_inputs(True),
                io.Combo.Input("size_policy", options=list(FIT_POLICIES), default="auto",
                               tooltip="How an edited frame of another size is fitted to the clip."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region (white = edit): one mask for every frame (e.g. a loose box) or one "
                                      "per frame (e.g. from SAM2). lora_edit keeps the source outside it in every "
                                      "chunk; match_background needs it."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="CLIP Vision Encode of the edited first frame (Wan I2V 14B uses it)."),
                *expert_inputs("denoises"),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The whole edited clip (source fps and audio)."),
                io.Image.Output(display_name="frames", tooltip="The whole edited clip as IMAGE frames."),
                io.String.Output(display_name="report", tooltip="Chunk ranges, seam jumps and colour drift per chunk."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, source_video, edited_first_frame, plan, conditioning, seed,
                steps, cfg, sampler_name, scheduler, match_background, match_edit, crossfade, drift_strength,
                size_policy, edit_mask=None, clip_vision_output=None, model_2=None, boundary=WAN22_I2V_BOUNDARY,
                boundary_unit="sigma", experts="auto") -> io.NodeOutput:
        split = 0
        for m in (model, model_2) if model_2 is not None else (model,):
            if conditioning == "lora_edit" and is_wan22_ti2v(m):
                raise ValueError(TI2V_MESSAGE)
            check_wan_model(m, ("fun_control",) if conditioning == "fun_control" else ("i2v",), "the chunk sampler")
        if model_2 is not None:
            roles, sigma = expert_roles(model, model_2, boundary, boundary_unit, experts)
            if roles[0] != HIGH:
                model, model_2 = model_2, model
            split = comfy_split_step(model, steps, scheduler, boundary, boundary_unit)
            log.info("FFP chunks: Wan 2.2 pair, high-noise expert for steps 0-%d, low-noise for %d-%d (sigma %.3f)",
                     split, split, steps, sigma)
        frames, fps, audio = unpack_video(source_video)
        if len(negative) not in (1, len(positive)):
            raise ValueError(f"negative has {len(negative)} entries and positive {len(positive)}; give one negative "
                             "or one per chunk like the positive.")
        gen = comfy_generator(model, vae, positive, negative, conditioning, clip_vision_output, 0, steps, cfg,
                              sampler_name, scheduler, model_2, split)
        on_step, should_stop = progress(len(plan) * steps)
        res = chain_chunks(plan, frames, edited_first_frame.cpu(), gen, edit_mask,
                           _drift(match_background, match_edit, crossfade, drift_strength), len(positive), seed,
                           steps, size_policy, on_step, should_stop)
        note = conditioning_note(conditioning, edit_mask is not None, bool(getattr(model, "patches", None)))
        report = note + "\n" + res.report
        return io.NodeOutput(pack_video(res.video, fps, audio), res.video, report, ui=ui.PreviewText(report))


class FFPChunkFlowPropagate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPChunkFlowPropagate",
            display_name="Propagate Edit in Chunks (Optical Flow) · FFP",
            category="FFP/video",
            description="Runs the optical-flow engine chunk by chunk over a chunk plan, each chunk starting from the "
                        "previous chunk's last frame: a CPU preview of a chunked generation (same plan, same seams) "
                        "with seam jumps and colour drift reported.",
            inputs=[
                io.Video.Input("source_video", tooltip="The clip to edit (the plan's clip)."),
                io.Image.Input("edited_first_frame", tooltip="Frame 1 after your edit."),
                ChunkPlanType.Input("plan", tooltip="From Plan Video Chunks."),
                *drift_inputs(False),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region: one mask for frame 1 (later chunks derive it from the hand-off "
                                      "frame) or one per frame. Unconnected: derived from the edit."),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The edited clip (source fps and audio)."),
                io.Image.Output(display_name="frames", tooltip="The edited clip as IMAGE frames."),
                io.Mask.Output(display_name="edit_mask", tooltip="The propagated edit region (1 = edit)."),
                io.String.Output(display_name="report", tooltip="Chunk ranges, seam jumps and colour drift per chunk."),
            ],
        )

    @classmethod
    def execute(cls, source_video, edited_first_frame, plan, match_background, match_edit, crossfade, drift_strength,
                edit_mask=None) -> io.NodeOutput:
        frames, fps, audio = unpack_video(source_video)
        steps = max(c.length for c in plan.chunks)
        on_step, should_stop = progress(len(plan) * steps)
        res = chain_chunks(plan, frames, edited_first_frame.cpu(), flow_generator(), edit_mask,
                           _drift(match_background, match_edit, crossfade, drift_strength), 1, 0, steps, "auto",
                           on_step, should_stop)
        mask = res.edit_mask if res.edit_mask is not None else frames.new_zeros(frames.shape[:3])
        return io.NodeOutput(pack_video(res.video, fps, audio), res.video, mask, res.report,
                             ui=ui.PreviewText(res.report))


NODES = [FFPChunkPlan, FFPChunkSample, FFPChunkFlowPropagate]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
