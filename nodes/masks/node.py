"""Mask nodes (glue only): prompts, SAM2 loader, propagation, mask ops. Imports ComfyUI (layering rule)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from .._comfy import io, progress, ui
from ..common import log
from ..flow.dis import QUALITY
from ..video.preview import overlay
from .ops import COMBINE, OPS, apply_op, combine
from .prompts import parse_prompts
from .propagate import DIRECTIONS, ENGINES, propagate_masks
from .sam2_model import EXTENSIONS, SIZES, VERSIONS, SAM2Container, SAM2Model, find_checkpoint, load_sam2

MaskPromptsType = io.Custom("FFP_MASK_PROMPTS")
SAM2Type = io.Custom("FFP_SAM2")
FOLDER = "sam2"


def sam2_files() -> list[str]:
    """Register models/sam2 with folder_paths (once) and list its checkpoints."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], set(EXTENSIONS))
    return folder_paths.get_filename_list(FOLDER)


@dataclass(frozen=True)
class SAM2Handle:
    """The FFP_SAM2 wire value: a ModelPatcher around the SAM2 module (ComfyUI loads/offloads it), what it is,
    or, when no checkpoint was found, the reason (engine 'auto' then falls back to flow)."""

    patcher: object | None
    model: SAM2Model | None
    error: str = ""


class FFPMaskPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPMaskPrompts",
            display_name="Mask Prompts · FFP",
            category="FFP/masks",
            description="Points and boxes that pick the objects to track, placed on frames of the clip (the editor "
                        "on the node: left click = positive, right/shift click = negative, drag = box). Validates "
                        "them against the clip and shows the chosen frame.",
            inputs=[
                io.Image.Input("images", tooltip="The clip [T, H, W, 3] the prompts are placed on (e.g. from Get "
                               "Video Components). Coordinates are this clip's pixels."),
                io.Int.Input("frame", default=0, min=0, max=1_000_000,
                             tooltip="The frame the editor shows (0 = first). New clicks go on this frame; prompts on "
                                     "several frames act as keyframes."),
                io.String.Input("prompts", default="", multiline=False,
                                tooltip="Prompt JSON written by the editor: {\"version\": 1, \"width\": W, \"height\": "
                                        "H, \"prompts\": [{\"frame\": 0, \"object\": 1, \"points\": [[x, y, 1]], "
                                        "\"boxes\": [[x0, y0, x1, y1]]}]}. Label 1 = positive, 0 = negative."),
            ],
            outputs=[MaskPromptsType.Output(display_name="prompts",
                                            tooltip="The validated prompts (objects, keyframes), for Mask Propagate.")],
        )

    @classmethod
    def execute(cls, images, frame: int, prompts: str) -> io.NodeOutput:
        t_len, h, w = images.shape[:3]
        if not 0 <= frame < t_len:
            raise ValueError(f"frame {frame} is out of range: the clip has {t_len} frames (0..{t_len - 1}).")
        parsed = parse_prompts(prompts, t_len, h, w)
        log.info("FFP masks: %s", parsed.describe())
        return io.NodeOutput(parsed, ui=ui.PreviewImage(images[frame:frame + 1].float().cpu(), cls=cls))


class FFPSAM2Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPSAM2Loader",
            display_name="SAM2 Loader · FFP",
            category="FFP/masks",
            description="Loads a SAM2/SAM2.1 video segmentation checkpoint from models/sam2 (.safetensors or the "
                        "official .pt). Size and version are read from the weights. With 'auto' and no file "
                        "there, Mask Propagate falls back to optical flow.",
            inputs=[
                io.Combo.Input("checkpoint", options=["auto", *sam2_files()], default="auto",
                               tooltip="A file in ComfyUI/models/sam2, e.g. sam2.1_hiera_large.pt. auto = the "
                                       "largest SAM2.1 found (none: Mask Propagate's engine 'auto' uses flow)."),
                io.Combo.Input("size", options=["auto", *SIZES], default="auto",
                               tooltip="Model size; auto = read from the weights (trunk width and depth)."),
                io.Combo.Input("version", options=["auto", *VERSIONS], default="auto",
                               tooltip="SAM 2.0 or 2.1; auto = read from the weights (2.1-only keys)."),
                io.Int.Input("image_size", default=1024, min=256, max=2048, step=32,
                             tooltip="The model's input resolution. 1024 is what SAM2 was trained at; lower is "
                                     "faster and coarser."),
            ],
            outputs=[SAM2Type.Output(display_name="sam2", tooltip="The SAM2 model, for Mask Propagate.")],
        )

    @classmethod
    def execute(cls, checkpoint: str, size: str, version: str, image_size: int) -> io.NodeOutput:
        try:
            name = find_checkpoint(sam2_files(), checkpoint)
        except ValueError as e:
            if checkpoint != "auto":
                raise
            log.warning("FFP SAM2: %s", e)
            return io.NodeOutput(SAM2Handle(None, None, str(e)))
        model = load_sam2(folder_paths.get_full_path_or_raise(FOLDER, name), size, version, image_size,
                          device=mm.unet_offload_device())
        patcher = comfy.model_patcher.ModelPatcher(SAM2Container(model.module), load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        return io.NodeOutput(SAM2Handle(patcher, model))


class FFPMaskPropagate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPMaskPropagate",
            display_name="Mask Propagate · FFP",
            category="FFP/masks",
            description="Tracks the prompted objects through the clip with SAM2 (forward and backward from the "
                        "keyframes, bounded memory on long clips) or, without SAM2 weights, segments the clicks with "
                        "GrabCut and carries the keyframe masks along the optical flow. Output: one mask per frame (1 = object).",
            inputs=[
                io.Image.Input("images", tooltip="The clip [T, H, W, 3]; the same images the prompts were placed on."),
                io.Combo.Input("engine", options=list(ENGINES), default="auto",
                               tooltip="sam2: needs SAM2 Loader. flow: optical flow, no weights; clicks and boxes "
                                       "are segmented by GrabCut (seeded by the clicks, the boxes and the clip's "
                                       "motion), or connect a mask. auto: SAM2 when a checkpoint is loaded, else flow "
                                       "(the reason is logged)."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="both",
                               tooltip="both: from the first keyframe forward to the end and backward to frame 0. "
                                       "forward/backward: one way only (frames not reached stay empty)."),
                io.Int.Input("mask_frame", default=0, min=0, max=1_000_000,
                             tooltip="The keyframe the 'mask' input belongs to (0 = first frame)."),
                io.Combo.Input("flow_quality", options=list(QUALITY), default="medium",
                               tooltip="Optical-flow preset for the flow engine (medium = most accurate)."),
                MaskPromptsType.Input("prompts", optional=True, tooltip="Points/boxes from Mask Prompts."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Keyframe mask(s) on mask_frame, at the clip's size: [N, H, W] = N objects "
                                      "(ids 1..N, white = object). Works without prompts and with the flow engine."),
                SAM2Type.Input("sam2", optional=True, tooltip="From SAM2 Loader. Unconnected: engine auto uses flow."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="All objects, [T, H, W], 1 = object, at the clip's size."),
                io.Mask.Output(display_name="object_masks",
                               tooltip="One mask per object and frame, object-major: [N*T, H, W], object k "
                                       "(ascending id) at batch indices k*T .. k*T+T-1."),
                io.Image.Output(display_name="preview", tooltip="The clip with the mask tinted, to check the tracking."),
                io.Int.Output(display_name="num_objects", tooltip="N, the number of tracked objects."),
            ],
        )

    @classmethod
    def execute(cls, images, engine: str, direction: str, mask_frame: int, flow_quality: str, prompts=None,
                mask=None, sam2=None) -> io.NodeOutput:
        images = images.float().cpu()
        model, error = None, "no SAM2 Loader connected"
        if sam2 is not None and engine != "flow":
            if sam2.model is None:
                error = sam2.error
            else:
                mm.load_models_gpu([sam2.patcher], force_full_load=True)
                model = sam2.model
        on_step, should_stop = progress(images.shape[0])
        result = propagate_masks(images, prompts, mask, mask_frame, model, engine, direction, flow_quality,
                                 model_error=error, on_step=on_step, should_stop=should_stop)
        objects = result.objects.flatten(0, 1)
        return io.NodeOutput(result.mask, objects, overlay(images, result.mask), len(result.object_ids))


class FFPMaskOps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPMaskOps",
            display_name="Mask Ops · FFP",
            category="FFP/masks",
            description="One mask operation per node (chain several): LoRA-Edit's loose box (its best mask for "
                        "editing), dilate/erode by pixels, feather, convex hull, temporal smoothing, invert, threshold.",
            inputs=[
                io.Mask.Input("mask", tooltip="Masks [T, H, W], 1 = region."),
                io.Combo.Input("op", options=list(OPS), default="loose_box",
                               tooltip="loose_box: each blob's bounding box grown by 'expand', blobs under min_area "
                                       "dropped. dilate/erode/feather: by 'pixels'. convex_hull: per frame. "
                                       "smooth_majority/smooth_mean: over 'window' frames. invert. threshold: at 'level'."),
                io.Int.Input("pixels", default=8, min=0, max=512,
                             tooltip="Radius in pixels for dilate, erode (a disc) and feather (soft edge width)."),
                io.Float.Input("expand", default=0.1, min=0.0, max=4.0, step=0.01,
                               tooltip="loose_box growth: 0.1 = box 10 % larger (5 % each side), LoRA-Edit's setting."),
                io.Int.Input("min_area", default=50, min=0, max=1_000_000,
                             tooltip="loose_box: blobs whose bounding box has fewer pixels are dropped (LoRA-Edit: 50)."),
                io.Int.Input("window", default=3, min=1, max=61, step=2,
                             tooltip="Temporal smoothing window in frames (odd)."),
                io.Float.Input("level", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="threshold: values >= level become 1, the rest 0."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="The result, [T, H, W].")],
        )

    @classmethod
    def execute(cls, mask, op: str, pixels: int, expand: float, min_area: int, window: int, level: float) -> io.NodeOutput:
        return io.NodeOutput(apply_op(mask.float().cpu(), op, pixels, expand, min_area, window, level))


class FFPMaskCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPMaskCombine",
            display_name="Mask Combine · FFP",
            category="FFP/masks",
            description="Union, intersection or difference (a without b) of two masks of the same size; a single "
                        "mask is applied to every frame of the other.",
            inputs=[
                io.Mask.Input("mask_a", tooltip="First masks [T, H, W]."),
                io.Mask.Input("mask_b", tooltip="Second masks [T, H, W] or one mask [1, H, W]."),
                io.Combo.Input("mode", options=list(COMBINE), default="union",
                               tooltip="union = either, intersection = both, difference = in a but not in b."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="The combined masks.")],
        )

    @classmethod
    def execute(cls, mask_a, mask_b, mode: str) -> io.NodeOutput:
        return io.NodeOutput(combine(mask_a.float().cpu(), mask_b.float().cpu(), mode))


NODES = [FFPMaskPrompts, FFPSAM2Loader, FFPMaskPropagate, FFPMaskOps, FFPMaskCombine]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
