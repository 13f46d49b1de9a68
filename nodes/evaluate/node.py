"""FFPEvaluate: score any engine's output (glue only)."""

from __future__ import annotations

import json

from .._comfy import io, progress, ui, unpack_video
from ..flow.engine import FlowSettings, derive_edit_mask, propagate_mask
from ..video.frames import fit_to_frame
from ..video.preview import comparison_grid
from .metrics import evaluate, format_table


def parse_seams(text: str) -> tuple[int, ...]:
    """'49, 97' -> (49, 97). Empty -> ()."""
    try:
        return tuple(int(x) for x in text.replace(";", ",").split(",") if x.strip())
    except ValueError:
        raise ValueError(f"seam_frames must be comma-separated frame numbers like '49, 97'; got '{text}'.") from None


class FFPEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPEvaluate",
            display_name="Evaluate Propagation · FFP",
            category="FFP/video",
            description="Scores an edited clip against its source: frame-1 fidelity, background preservation "
                        "(PSNR/SSIM outside the edit), flicker (flow-warping error vs the source's), edit "
                        "persistence, jumps at chunk seams. Shows a before/after preview.",
            is_output_node=True,
            inputs=[
                io.Video.Input("source_video", tooltip="The original clip."),
                io.Video.Input("output_video", tooltip="The edited clip to score (same size and length)."),
                io.Image.Input("edited_first_frame", tooltip="Your edited frame 1 (fitted like the propagation)."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region per frame (e.g. the propagation's edit_mask output). "
                                      "Unconnected: derived from frame 1 and carried by optical flow."),
                io.String.Input("seam_frames", default="", optional=True,
                                tooltip="First frame of each chunk after the first, e.g. '81, 161', to score "
                                        "jumps at chunk borders. Empty for single-chunk outputs."),
                io.Int.Input("margin", default=4, min=0, max=64,
                             tooltip="Pixels around the edit region left out of the background scores."),
            ],
            outputs=[
                io.String.Output(display_name="metrics_json",
                                 tooltip="All metrics as strict JSON: a score with no finite value (e.g. PSNR of "
                                         "identical frames) is null, and 'notes' says why."),
                io.Image.Output(display_name="preview",
                                tooltip="4 frames, one per row, labelled: source | output | output with the edit "
                                        "region tinted."),
            ],
        )

    @classmethod
    def execute(cls, source_video, output_video, edited_first_frame, margin, edit_mask=None,
                seam_frames: str = "") -> io.NodeOutput:
        source, _, _ = unpack_video(source_video)
        output, _, _ = unpack_video(output_video)
        edited, _ = fit_to_frame(edited_first_frame.cpu(), source.shape[1], source.shape[2])
        t, tracked = source.shape[0], edit_mask is None
        on_step, should_stop = progress(2 * t if tracked else t)    # one bar: tracking (if any), then scoring
        if tracked:
            first = derive_edit_mask(source[0], edited, FlowSettings.mask_threshold)
            edit_mask = propagate_mask(source, first, on_step=lambda i, n, p=None: on_step(i, 2 * t, p),
                                       should_stop=should_stop)
        report = evaluate(source, output, edited, edit_mask.cpu(), parse_seams(seam_frames), margin,
                          on_step=lambda i, n, p=None: on_step(i + t * tracked, t * (1 + tracked), p),
                          should_stop=should_stop)
        text = json.dumps(report, indent=1, allow_nan=False)
        preview = comparison_grid(source, output, edit_mask.cpu())
        shown = {**ui.PreviewImage(preview, cls=cls).as_dict(), **ui.PreviewText(format_table({"output": report})).as_dict()}
        return io.NodeOutput(text, preview, ui=shown)


NODES = [FFPEvaluate]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
