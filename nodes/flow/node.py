"""FFPFlowPropagate: carry a first-frame edit through a clip with optical flow (glue only)."""

from __future__ import annotations

import os

import comfy.model_management as mm
import folder_paths

from .._comfy import io, pack_video, progress, unpack_video
from ..common import log
from ..video.frames import FIT_POLICIES
from .dis import QUALITY
from .engine import MODES, FlowSettings, propagate_edit
from .raft import ITERS, PRECISIONS, RaftFlow, load_raft

OpticalFlow = io.Custom("OPTICAL_FLOW")   # ComfyUI 0.28's Load Optical Flow Model output (a RAFT ModelPatcher)
FOLDER = "optical_flow"                    # models/optical_flow, ComfyUI's own folder for it where it has one
DIS = "DIS (built in)"


def flow_files() -> list[str]:
    """models/optical_flow's files; registers the folder where the host does not (ComfyUI before 0.28)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       {".safetensors", ".pth", ".pt"})
    return folder_paths.get_filename_list(FOLDER)


def host_raft(optical_flow):
    """The torchvision RAFT module inside the host's OPTICAL_FLOW (a ModelPatcher: loaded to its device by
    ComfyUI's model management, never modified) or a bare module."""
    if hasattr(optical_flow, "model") and hasattr(optical_flow, "load_device"):
        mm.load_models_gpu([optical_flow])
        optical_flow = optical_flow.model
    if type(optical_flow).__name__ != "RAFT" or not type(optical_flow).__module__.startswith("torchvision."):
        raise ValueError(f"optical_flow holds a {type(optical_flow).__name__}, not torchvision's RAFT; connect "
                         "Load Optical Flow Model (raft_large), or disconnect it to use DIS.")
    return optical_flow


def flow_backend(optical_flow, flow_model: str, precision: str, iters: int) -> RaftFlow | None:
    """The chain-flow backend: the connected OPTICAL_FLOW, else flow_model's file, else None (DIS)."""
    if optical_flow is not None:
        if flow_model != DIS:
            log.info("FFP flow: optical_flow is connected; flow_model '%s' is not used", flow_model)
        flow, origin = RaftFlow(host_raft(optical_flow), precision, iters), "optical_flow input"
    elif flow_model == DIS:
        return None
    else:
        flow_files()
        path = folder_paths.get_full_path_or_raise(FOLDER, flow_model)
        flow, origin = RaftFlow(load_raft(path, mm.get_torch_device()), precision, iters), flow_model
    log.info("FFP flow: frame-to-frame flow by RAFT (%s) on %s, %s, %d updates", origin, flow.device,
             "fp16" if flow.half else "fp32", iters)
    return flow


class FFPFlowPropagate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPFlowPropagate",
            display_name="Propagate Edit (Optical Flow) · FFP",
            category="FFP/video",
            description="Carries the edit of frame 1 through the whole clip along the source's optical flow "
                        "(CPU, no model weights). Pixels outside the propagated edit region stay exactly the "
                        "source's. A fast preview of a propagation, or the whole job for rigid edits.",
            inputs=[
                io.Video.Input("source_video", tooltip="The clip to edit (e.g. from Load Video)."),
                io.Image.Input("edited_first_frame", tooltip="Frame 1 of the clip after your edit, from any "
                               "image tool. Another size is fitted by size_policy."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Where the edit is (white = edited). One mask for frame 1 (carried by "
                                      "flow) or one per frame (e.g. from SAM2). Unconnected: derived from the "
                                      "difference between the edited and the source frame 1."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="auto: delta (the log says when the tracking breaks up and layer may do better; when "
                                       "the edit region is lost while the camera pans past the object, it "
                                       "restarts with the motion follower's masks, as Mask Propagate without SAM2 "
                                       "gives them: choose delta to keep the plain track); a colour "
                                       "change with a mask for every frame, or a whole-frame colour restyle, is carried "
                                       "as one colour map of each frame's own pixels. "
                                       "delta: add the edit's change where it keeps the picture's structure "
                                       "(keeps the clip's lighting; recolours, textures) and carry the edited "
                                       "result, relit, where it changes it (a removed part: no ghost). pixels: "
                                       "carry the edited pixels everywhere, relit. layer: move the whole edit "
                                       "region as one piece with the object's motion over a rebuilt "
                                       "background (pose and shape changes; never tears)."),
                io.Combo.Input("size_policy", options=list(FIT_POLICIES), default="auto",
                               tooltip="How an edited frame of another size is fitted to the clip: auto = "
                                       "resize if the aspect ratio matches, else centre-crop."),
                io.Combo.Input("flow_quality", options=list(QUALITY), default="medium",
                               tooltip="OpenCV DIS preset (of the re-anchoring to frame 1, and of the frame-to-"
                                       "frame flow unless RAFT does it): medium is the most accurate; "
                                       "fast/ultrafast for quick previews of long or large clips."),
                io.Float.Input("mask_threshold", default=0.08, min=0.01, max=0.9, step=0.01,
                               tooltip="Colour difference (0..1) that counts as edited when edit_mask is not "
                                       "connected. Raise it if compression noise shows up as edits."),
                io.Int.Input("mask_grow", default=4, min=0, max=64,
                             tooltip="Pixels to grow the edit region by before compositing."),
                io.Int.Input("feather", default=3, min=0, max=64,
                             tooltip="Soft edge width in pixels where the edit blends into the source."),
                io.Float.Input("match_tolerance", default=0.06, min=0.01, max=0.5, step=0.01,
                               tooltip="How closely (0..1 mean colour difference) a pixel must match frame 1 "
                                       "to keep the edit. Lower hides the edit under occluders sooner; higher "
                                       "keeps it through lighting changes."),
                io.Boolean.Input("light_tolerant", default=True,
                                 tooltip="Keep the edit through lighting changes (shade, exposure): when most "
                                         "of a frame stops matching frame 1, compare lighting-normalised "
                                         "patches, and relight the carried pixels with the clip's light."),
                OpticalFlow.Input("optical_flow", optional=True,
                                  tooltip="RAFT from Load Optical Flow Model (ComfyUI 0.28+, weights in "
                                          "models/optical_flow). Connected: RAFT computes the frame-to-frame flow "
                                          "on ComfyUI's device (GPU); the re-anchoring to frame 1 stays DIS at "
                                          "flow_quality. Unconnected: flow_model decides."),
                io.Combo.Input("flow_model", options=[DIS, *flow_files()], default=DIS, optional=True,
                               tooltip="The frame-to-frame flow when optical_flow is not connected: DIS (CPU, no "
                                       "weights) or a torchvision RAFT file (raft_large / raft_small state dict, "
                                       ".safetensors or .pth) from models/optical_flow, run on the GPU."),
                io.Combo.Input("raft_precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="RAFT only: auto = fp16 on a CUDA GPU (faster, less memory), fp32 elsewhere."),
                io.Int.Input("raft_iters", default=ITERS, min=1, max=32, optional=True,
                             tooltip="RAFT only: flow refinement steps per frame pair (12 as trained; fewer is "
                                     "faster and coarser)."),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The edited clip (source fps and audio kept)."),
                io.Image.Output(display_name="frames", tooltip="The edited clip as IMAGE frames."),
                io.Mask.Output(display_name="edit_mask", tooltip="The edit region in every frame (1 = edit)."),
            ],
        )

    @classmethod
    def execute(cls, source_video, edited_first_frame, mode, size_policy, flow_quality, mask_threshold,
                mask_grow, feather, match_tolerance, light_tolerant=True, edit_mask=None, optical_flow=None,
                flow_model=DIS, raft_precision="auto", raft_iters=ITERS) -> io.NodeOutput:
        frames, fps, audio = unpack_video(source_video)   # the clip once, float32; the engine reads it frame by frame
        settings = FlowSettings(mode=mode, quality=flow_quality, mask_threshold=mask_threshold,
                                mask_grow=mask_grow, feather=feather, match_tolerance=match_tolerance,
                                light=light_tolerant,
                                flow=flow_backend(optical_flow, flow_model, raft_precision, raft_iters))
        on_step, should_stop = progress(frames.shape[0])
        result = propagate_edit(frames, edited_first_frame.cpu(), None if edit_mask is None else edit_mask.cpu(),
                                settings, size_policy, on_step, should_stop)
        return io.NodeOutput(pack_video(result.video, fps, audio), result.video, result.mask)


NODES = [FFPFlowPropagate]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
