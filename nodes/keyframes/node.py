"""Keyframe nodes (glue): FFPKeyframes collects edited frames with their indices and checks them against the
clip; FFPKeyframePropagate generates the clip span by span between them (flow engine, or a Wan model through the
chunk chainer's ComfyUI sampler) with the span cache in ComfyUI's temp folder. Imports ComfyUI (layering rule)."""

from __future__ import annotations

import hashlib
import os

import folder_paths
from PIL import Image

from .._comfy import io, pack_video, progress, unpack_video
from ..common import atomic_write
from ..video.frames import FIT_POLICIES, to_uint8
from .cache import DEFAULT_MAX_BYTES, SpanCache
from .engines import ChainEngine, FlowEngine
from .keys import Keyframes, make_keyframes, parse_indices
from .propagate import propagate_keyframes

KeyframesType = io.Custom("FFP_KEYFRAMES")
ENGINES = ("flow", "wan")
THUMBS = 12
THUMB_HEIGHT = 64
CACHE_FOLDER = "ffprop_span_cache"


def _thumb(frame, name: str) -> dict:
    """A small PNG of frame [H, W, 3] in temp/ffp_keyframes/<name>.png -> the ui file reference."""
    h, w = frame.shape[:2]
    img = Image.fromarray(to_uint8(frame)).resize((max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT))
    folder = os.path.join(folder_paths.get_temp_directory(), "ffp_keyframes")
    with atomic_write(os.path.join(folder, f"{name}.png")) as tmp:
        img.save(tmp)
    return {"filename": f"{name}.png", "subfolder": "ffp_keyframes", "type": "temp"}


def strip_ui(source, keys: Keyframes) -> dict:
    """What web/js/ffp_keyframes.js draws: the clip length, the keyframe indices, thumbnails of evenly spaced
    source frames (every keyframe's frame among them) and of the edited keyframes."""
    t = source.shape[0]
    n = min(THUMBS, t)
    frames = sorted({round(i * (t - 1) / max(n - 1, 1)) for i in range(n)} | set(keys.indices))
    tag = hashlib.sha256(to_uint8(source[frames]).tobytes() + to_uint8(keys.frames).tobytes()).hexdigest()[:12]
    return {"ffp_keyframes": [{
        "frames": t, "indices": list(keys.indices), "edited": list(keys.edited),
        "thumbs": [{"frame": f, **_thumb(source[f], f"{tag}_src_{f}")} for f in frames],
        "keys": [{"frame": k, **_thumb(keys.frames[j], f"{tag}_key_{k}")} for j, k in enumerate(keys.indices)],
    }]}


class FFPKeyframes(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPKeyframes",
            display_name="Keyframes · FFP",
            category="FFP/video",
            description="Collects edited keyframes (any frames, not only frame 1) with their frame numbers and checks "
                        "them against the clip: numbers in range and not repeated, sizes fitted like the edited first "
                        "frame, edits inside the edit mask. Chain several of these nodes to add edits of other sizes. "
                        "The strip under the node shows the clip with the keyframes marked.",
            inputs=[
                io.Video.Input("source_video", tooltip="The clip the keyframes belong to."),
                io.Image.Input("images", tooltip="The edited frames: one image, or a batch of N (one per index)."),
                io.String.Input("frame_indices", default="0",
                                tooltip="0-based frame number of each image, comma-separated (frame 1 is 0), e.g. "
                                        "'0, 48' for a batch of two."),
                io.Combo.Input("size_policy", options=list(FIT_POLICIES), default="auto",
                               tooltip="How an edit of another size is fitted to the clip (as for the edited first "
                                       "frame): auto resizes when the aspect ratio agrees within 1 %, else crops."),
                io.Float.Input("mask_threshold", default=0.08, min=0.001, max=0.999, step=0.005,
                               tooltip="Colour difference (0..1) from the source frame that counts as edited."),
                KeyframesType.Input("keyframes", optional=True,
                                    tooltip="Keyframes from another Keyframes node, merged with these (a frame number "
                                            "may appear only once)."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region (white = edit), one mask or one per frame: a keyframe edited mostly "
                                      "outside it is refused (that part would be dropped)."),
            ],
            outputs=[
                KeyframesType.Output(display_name="keyframes", tooltip="The checked keyframes, fitted to the clip."),
                io.String.Output(display_name="report", tooltip="The keyframes and what was fitted."),
            ],
        )

    @classmethod
    def execute(cls, source_video, images, frame_indices: str, size_policy: str, mask_threshold: float,
                keyframes=None, edit_mask=None) -> io.NodeOutput:
        source, _, _ = unpack_video(source_video)
        indices = parse_indices(frame_indices)
        frames = list(images.float().cpu())
        if keyframes is not None:
            indices += list(keyframes.indices)
            frames += list(keyframes.frames)
        keys = make_keyframes(source, frames, indices, size_policy, edit_mask, mask_threshold)
        lines = [f"{len(keys)} keyframe(s) at frame(s) {', '.join(map(str, keys.indices))} of {source.shape[0]} "
                 "(0-based)"]
        lines += [f"keyframe {k} equals its source frame: an anchor that keeps the frame as it is"
                  for k, e in zip(keys.indices, keys.edited) if not e]
        text = "\n".join(lines + list(keys.notes))
        return io.NodeOutput(keys, text, ui={"text": [text], **strip_ui(source, keys)})


def comfy_identity(model, vae, positive, negative) -> str:
    """What a Wan span depends on besides its tensors: the model object and its patches, the VAE, the prompts."""
    h = hashlib.sha256()
    for cond in (positive, negative):
        for entry in cond:
            h.update(entry[0].float().cpu().numpy().tobytes())
    return (f"{type(model.model).__name__}:{id(model.model)}:{getattr(model, 'patches_uuid', '')}:"
            f"{id(vae)}:{h.hexdigest()[:16]}")


class FFPKeyframePropagate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="FFPKeyframePropagate",
            display_name="Propagate Keyframes · FFP",
            category="FFP/video",
            description="Carries edited keyframes through the clip span by span: the stretch before the first "
                        "keyframe backwards, each stretch between two keyframes from both ends, the rest forwards. "
                        "Spans are cached in ComfyUI's temp folder, so after you re-edit one keyframe only the "
                        "spans next to it run again. Outputs a per-frame confidence "
                        "(distance to the nearest keyframe) that shows where a new keyframe helps most.",
            inputs=[
                io.Video.Input("source_video", tooltip="The clip to edit."),
                KeyframesType.Input("keyframes", tooltip="From the Keyframes node."),
                io.Combo.Input("engine", options=list(ENGINES), default="flow",
                               tooltip="flow: optical flow on the CPU, no model; spans between two keyframes blend "
                                       "both propagations by distance, each pixel from the end that still tracks it. "
                                       "wan: a Wan 2.1 I2V model (model, vae, positive, negative) sampled per span "
                                       "like Sample Long Video in Chunks (LoRA-Edit conditioning, chunk_length "
                                       "chunks) from both ends: the span's first keyframe is frame 1, the later one "
                                       "is kept (keep-mask 1) on the span's last frame."),
                io.Int.Input("chunk_length", default=81, min=5, max=1025, step=4,
                             tooltip="wan: frames per generation inside a span (4k+1; Wan 2.1: 81)."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="wan: sampler steps per chunk."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="wan: classifier-free guidance (Wan / LoRA-Edit use 5)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="wan: seed of each span's first chunk."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="wan: sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="wan: scheduler, as in KSampler."),
                io.Boolean.Input("use_cache", default=True,
                                 tooltip="Keep finished spans in ComfyUI's temp folder (ffprop_span_cache, emptied "
                                         "when ComfyUI starts; safe to delete) and reuse them when nothing they depend "
                                         "on changed."),
                io.Int.Input("cache_mb", default=DEFAULT_MAX_BYTES >> 20, min=16, max=1 << 20,
                             tooltip="Size bound of the span cache in MB; the least recently used spans go first."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region (white = edit): one mask (the region at every keyframe) or one per "
                                      "frame (e.g. from SAM2). Unconnected: derived from each keyframe's edit."),
                io.Model.Input("model", optional=True, tooltip="wan: a Wan 2.1 I2V model (with the clip's LoRA)."),
                io.Vae.Input("vae", optional=True, tooltip="wan: the Wan 2.1 VAE."),
                io.Conditioning.Input("positive", optional=True, tooltip="wan: the prompt."),
                io.Conditioning.Input("negative", optional=True, tooltip="wan: the negative prompt."),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The edited clip (source fps and audio)."),
                io.Image.Output(display_name="frames", tooltip="The edited clip as IMAGE frames."),
                io.Mask.Output(display_name="edit_mask", tooltip="The edit region per frame as the engine knows it."),
                io.Mask.Output(display_name="confidence",
                               tooltip="Per frame 1 - (frames to the nearest keyframe) / (clip length - 1), the same "
                                       "over the whole frame: 1 on keyframes; the darkest frame is where to add the "
                                       "next keyframe."),
                io.String.Output(display_name="report", tooltip="Spans computed or cached, seconds, the farthest frame."),
            ],
        )

    @classmethod
    def execute(cls, source_video, keyframes, engine: str, chunk_length: int, steps: int, cfg: float, seed: int,
                sampler_name: str, scheduler: str, use_cache: bool, cache_mb: int, edit_mask=None, model=None,
                vae=None, positive=None, negative=None) -> io.NodeOutput:
        frames, fps, audio = unpack_video(source_video)
        if engine == "wan":
            missing = [n for n, v in (("model", model), ("vae", vae), ("positive", positive), ("negative", negative))
                       if v is None]
            if missing:
                raise ValueError(f"engine 'wan' needs {', '.join(missing)} connected (a Wan 2.1 I2V model, its VAE "
                                 "and the prompts); or choose engine 'flow', which needs none.")
            from ..chunks.node import comfy_generator
            from ..host.comfy import check_wan_model

            check_wan_model(model, ("i2v",), "Propagate Keyframes")
            gen = comfy_generator(model, vae, positive, negative, "lora_edit", None, 0, steps, cfg, sampler_name,
                                  scheduler)
            span_engine = ChainEngine(gen, f"{comfy_identity(model, vae, positive, negative)}:{sampler_name}:"
                                           f"{scheduler}:cfg{cfg}", chunk_length, steps, seed, keeps_source=True)
        else:
            span_engine = FlowEngine()
        cache = None
        if use_cache:
            cache = SpanCache(os.path.join(folder_paths.get_temp_directory(), CACHE_FOLDER), cache_mb << 20)
        on_step, should_stop = progress(frames.shape[0] + len(keyframes.indices))
        res = propagate_keyframes(frames, keyframes, span_engine, edit_mask, cache, on_step, should_stop)
        report = res.report()
        confidence = res.confidence.view(-1, 1, 1).expand(frames.shape[:3]).contiguous()
        return io.NodeOutput(pack_video(res.video, fps, audio), res.video, res.mask, confidence, report,
                             ui={"text": [report]})


NODES = [FFPKeyframes, FFPKeyframePropagate]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
