"""The `ffprop` command (also `python -m ffprop`): the main job outside ComfyUI.

  ffprop demo                      synthesise a clip + edit, propagate it, write videos and metrics
  ffprop propagate --video SRC --edited-first-frame IMG [--mask M] -o OUT.mp4
  ffprop eval --video SRC --edited-first-frame IMG --output OUT.mp4 [--mask M]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):                      # `python __main__.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = Path(__file__).resolve().parent.name

from .nodes.common import Cancelled  # noqa: E402
from .nodes.evaluate.metrics import evaluate, format_table, psnr  # noqa: E402
from .nodes.flow.dis import QUALITY  # noqa: E402
from .nodes.flow.engine import MODES, FlowSettings, derive_edit_mask, propagate_edit, propagate_mask  # noqa: E402
from .nodes.lora_edit.cli import add_wan_arguments, run_wan  # noqa: E402
from .nodes.video.frames import FIT_POLICIES, fit_to_frame  # noqa: E402
from .nodes.video.io import read_image, read_mask, read_video, write_image, write_video  # noqa: E402
from .nodes.video.preview import comparison_grid, side_by_side  # noqa: E402
from .nodes.video.synthetic import synthetic_clip  # noqa: E402


class Bar:
    """on_step callback drawing a tqdm bar."""

    def __init__(self, desc: str):
        self.bar = None
        self.desc = desc

    def __call__(self, i: int, total: int, preview=None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="frame", leave=False, file=sys.stderr)
        self.bar.update(i - self.bar.n)
        if i >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _settings(args) -> FlowSettings:
    return FlowSettings(mode=args.mode, quality=args.quality, mask_threshold=args.mask_threshold,
                        mask_grow=args.mask_grow, feather=args.feather, match_tolerance=args.match_tolerance)


def _write_outputs(out_dir: Path, source, result_video, edited, masks, fps, metrics) -> dict[str, Path]:
    paths = {
        "output": write_video(out_dir / "output.mp4", result_video, fps),
        "side_by_side": write_video(out_dir / "side_by_side.mp4", side_by_side(source, result_video), fps),
        "preview": write_image(out_dir / "preview.png", comparison_grid(source, result_video, masks)),
        "edited_first_frame": write_image(out_dir / "edited_first_frame.png", edited),
    }
    tmp = out_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(out_dir / "metrics.json")
    paths["metrics"] = out_dir / "metrics.json"
    return paths


def cmd_demo(args) -> int:
    """Synthetic clip with a known ground truth: a textured disc recoloured in frame 1."""
    t0 = time.time()
    clip = synthetic_clip(args.frames, args.height, args.width, seed=args.seed)
    out_dir = Path(args.output)
    write_video(out_dir / "source.mp4", clip.source, clip.fps)
    bar = Bar("propagating")
    result = propagate_edit(clip.source, clip.edited[0], None, _settings(args), on_step=bar)
    bar.close()
    metrics = evaluate(clip.source, result.video, clip.edited[0], result.mask)
    metrics["ground_truth_psnr"] = psnr(result.video.numpy(), clip.edited.numpy())
    metrics["ground_truth_psnr_min_frame"] = min(psnr(a, b) for a, b in zip(result.video.numpy(), clip.edited.numpy()))
    paths = _write_outputs(out_dir, clip.source, result.video, clip.edited[0], result.mask, clip.fps, metrics)
    print(format_table({"demo (flow engine)": metrics}))
    print(f"\nground truth PSNR {metrics['ground_truth_psnr']:.2f} dB (worst frame "
          f"{metrics['ground_truth_psnr_min_frame']:.2f} dB): the disc's recolour, tracked through "
          f"{args.frames} frames with a passing occluder")
    print(f"done in {time.time() - t0:.1f} s; wrote:")
    for name, path in [("source", out_dir / "source.mp4"), *paths.items()]:
        print(f"  {name:<19} {path}")
    return 0


def cmd_propagate(args) -> int:
    source, fps = read_video(args.video, args.max_frames)
    edited = read_image(args.edited_first_frame)
    mask = read_mask(args.mask) if args.mask else None
    if mask is not None and mask.shape[1:] != source.shape[1:3]:
        raise ValueError(f"mask '{args.mask}' is {mask.shape[2]}x{mask.shape[1]} but the video is "
                         f"{source.shape[2]}x{source.shape[1]}; export the mask at the video's size.")
    if mask is not None and mask.shape[0] > 1:
        mask = mask[: source.shape[0]]
    if args.engine == "wan":
        frames = run_wan(args, source, fps, edited, mask, Bar)
        out = write_video(args.output, frames, fps)
        print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps:g} fps)")
        return 0
    bar = Bar("propagating")
    result = propagate_edit(source, edited, mask, _settings(args), args.size_policy, on_step=bar)
    bar.close()
    for note in result.notes:
        print(f"note: {note}")
    out = write_video(args.output, result.video, fps)
    print(f"wrote {out} ({source.shape[0]} frames, {source.shape[2]}x{source.shape[1]}, {fps:g} fps)")
    if args.mask_out:
        print(f"wrote {write_video(args.mask_out, result.mask[..., None].expand(-1, -1, -1, 3), fps)}")
    return 0


def cmd_eval(args) -> int:
    source, _ = read_video(args.video)
    output, _ = read_video(args.output)
    if output.shape[0] != source.shape[0]:
        raise ValueError(f"output has {output.shape[0]} frames but the source has {source.shape[0]}.")
    edited, _ = fit_to_frame(read_image(args.edited_first_frame), source.shape[1], source.shape[2], args.size_policy)
    if args.mask:
        masks = read_mask(args.mask)[: source.shape[0]]
    else:
        bar = Bar("tracking edit region")
        masks = propagate_mask(source, derive_edit_mask(source[0], edited, args.mask_threshold), on_step=bar)
        bar.close()
    seams = tuple(int(s) for s in args.seams.split(",") if s.strip()) if args.seams else ()
    metrics = evaluate(source, output, edited, masks, seams, args.margin)
    print(format_table({Path(args.output).name: metrics}))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0


def _add_flow_options(p: argparse.ArgumentParser) -> None:
    d = FlowSettings()
    p.add_argument("--mode", choices=MODES, default=d.mode, help="delta: add the edit's change; pixels: paste")
    p.add_argument("--quality", choices=list(QUALITY), default=d.quality, help="optical-flow preset")
    p.add_argument("--mask-threshold", type=float, default=d.mask_threshold,
                   help="colour difference counted as edited when no mask is given (0..1)")
    p.add_argument("--mask-grow", type=int, default=d.mask_grow, help="px to grow the edit region")
    p.add_argument("--feather", type=int, default=d.feather, help="soft edge width in px")
    p.add_argument("--match-tolerance", type=float, default=d.match_tolerance,
                   help="how closely a pixel must match frame 1 to keep the edit (0..1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffprop", description="First-frame propagation: edit frame 1, "
                                     "FFProp carries the edit through the clip.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is fixed or derived")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole job on a synthetic clip (no inputs, no weights)")
    demo.add_argument("-o", "--output", default="ffprop_out/demo", help="output folder")
    demo.add_argument("--frames", type=int, default=49)
    demo.add_argument("--width", type=int, default=512)
    demo.add_argument("--height", type=int, default=288)
    demo.add_argument("--seed", type=int, default=0)
    _add_flow_options(demo)
    demo.set_defaults(func=cmd_demo)

    prop = sub.add_parser("propagate", help="propagate an edited first frame through a video")
    prop.add_argument("--video", required=True, help="source video file (mp4/webm/mov) or folder of frames")
    prop.add_argument("--edited-first-frame", required=True, help="frame 1 after your edit (png/jpg)")
    prop.add_argument("--mask", help="edit region: one image for frame 1, or a mask video / folder (white = edit)")
    prop.add_argument("-o", "--output", required=True, help="output mp4")
    prop.add_argument("--mask-out", help="also write the propagated edit region as a video")
    prop.add_argument("--size-policy", choices=FIT_POLICIES, default="auto",
                      help="fit an edited frame of another size: auto = resize if same aspect, else crop")
    prop.add_argument("--max-frames", type=int, help="only the first N frames")
    prop.add_argument("--engine", choices=["flow", "wan"], default="flow",
                      help="flow: optical flow (CPU, no weights); wan: LoRA-Edit on a Wan2.1 I2V model (--model)")
    _add_flow_options(prop)
    add_wan_arguments(prop)
    prop.set_defaults(func=cmd_propagate)

    ev = sub.add_parser("eval", help="score an edited video against its source")
    ev.add_argument("--video", required=True, help="source video")
    ev.add_argument("--edited-first-frame", required=True)
    ev.add_argument("--output", required=True, help="the edited video to score")
    ev.add_argument("--mask", help="edit region per frame (mask video/folder); default: tracked from frame 1")
    ev.add_argument("--mask-threshold", type=float, default=FlowSettings.mask_threshold)
    ev.add_argument("--size-policy", choices=FIT_POLICIES, default="auto")
    ev.add_argument("--seams", help="first frame of each chunk after the first, e.g. '81,161'")
    ev.add_argument("--margin", type=int, default=4, help="px around the edit left out of background scores")
    ev.add_argument("--json", help="also write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ffprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print(f"ffprop {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
