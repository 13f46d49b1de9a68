"""The `ffprop` command (also `python -m ffprop`): the main job outside ComfyUI.

  ffprop demo                      synthesise a clip + edit, propagate it, write videos and metrics
  ffprop propagate --video SRC --edited-first-frame IMG [--mask M] -o OUT.mp4
  ffprop propagate --video SRC --keyframe 0:first.png --keyframe 48:f48.png -o OUT.mp4   edits at any frames
  ffprop propagate --engine wan --world|--model DIR --video SRC --keyframe 0:a.png --keyframe 8:b.png -o OUT.mp4
  ffprop eval --video SRC --edited-first-frame IMG --output OUT.mp4 [--mask M]
  ffprop bench world [--json FILE] [--quick]     every engine vs ground truth on held-out world scenes

Exit codes: 0 done, 2 bad input or arguments (nothing written), 1 any other failure, 130 cancelled (Ctrl-C).
torch, OpenCV and PyAV are imported inside the commands: `--help`, `--version` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                      # `python __main__.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = Path(__file__).resolve().parent.name

from . import __version__  # noqa: E402
from .nodes.lora_edit.options import add_wan_arguments  # noqa: E402
from .nodes.video.formats import FIT_POLICIES, VIDEO_SUFFIXES  # noqa: E402

# The flow engine's choices and defaults (nodes/flow/engine.py FlowSettings, MODES; nodes/flow/dis.py QUALITY),
# repeated here because those modules import torch; tests/core/test_cli.py checks that they agree.
FLOW_MODES = ("auto", "delta", "pixels", "layer")
FLOW_QUALITIES = ("ultrafast", "fast", "medium")
FLOW_DEFAULTS = {"mode": "auto", "quality": "medium", "mask_threshold": 0.08, "mask_grow": 4, "feather": 3,
                 "match_tolerance": 0.06}


class CliError(ValueError):
    """A bad argument found before any work starts (exit 2, nothing written)."""


class Bar:
    """on_step callback drawing a tqdm bar."""

    def __init__(self, desc: str):
        self.bar = None
        self.desc = desc

    def __call__(self, i: int, total: int, preview=None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="frame", leave=False, file=sys.stderr)
        self.bar.update(i - self.bar.n)
        if i >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- argument checks that need no torch -------------------------------------------------------------------

def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value:g}")
    return value


def _seams(text: str) -> tuple[int, ...]:
    try:
        seams = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame numbers separated by commas (e.g. '81,161'), got '{text}'") from None
    if any(s < 1 for s in seams) or list(seams) != sorted(set(seams)):
        raise argparse.ArgumentTypeError(f"seams must be increasing frame numbers >= 1, got '{text}'")
    return seams


def _keyframe(text: str) -> tuple[int, str]:
    """'48:f48.png' -> (48, 'f48.png'): a 0-based frame number (frame 1 is 0) and the edited image of that frame."""
    index, sep, path = text.partition(":")
    if not sep or not path or not index.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected INDEX:PATH with a 0-based frame number, e.g. '48:frame48.png' "
                                         f"(frame 1 is 0), got '{text}'")
    return int(index), path


def check_keyframes(args) -> list[tuple[int, str]]:
    """The keyframes of `propagate` (--edited-first-frame counts as keyframe 0), checked before any work."""
    keys = list(args.keyframe or [])
    if args.edited_first_frame:
        if any(i == 0 for i, _ in keys):
            raise CliError("--edited-first-frame and --keyframe 0:... both give frame 1's edit; give one of them.")
        keys.insert(0, (0, args.edited_first_frame))
    if not keys:
        raise CliError("give the edit: --edited-first-frame IMG (frame 1), or one --keyframe INDEX:IMG per edited "
                       "frame (0-based, e.g. --keyframe 0:first.png --keyframe 48:f48.png).")
    seen = [i for i, _ in keys]
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    if repeated:
        raise CliError(f"--keyframe gives frame(s) {repeated} more than once; keep one edit per frame.")
    if args.engine == "wan" and keys != [(0, keys[0][1])] and getattr(args, "save_lora", None):
        raise CliError("--save-lora saves the one LoRA of a frame-1 run; with keyframes at other frames every span "
                       "trains its own LoRA. Leave --save-lora out (the span cache keeps the results).")
    return sorted(keys)


def _same_file(a: str, b: str) -> bool:
    """True when paths a and b name one file (symlinks, hard links, '..' and relative paths included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None],
                  video: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, output paths that cannot be written as asked or would overwrite an input.

    outputs/inputs: option name -> path (None = not given); video: the output options that must name a video
    file ffprop can write (by suffix)."""
    given = {k: v for k, v in outputs.items() if v}
    for flag, path in given.items():
        p = Path(path)
        if p.is_dir():
            raise CliError(f"{flag} '{path}' is an existing folder; give a file name, e.g. '{p / 'out.mp4'}'.")
        if flag in video and p.suffix.lower() not in VIDEO_SUFFIXES:
            ending = f"'{p.suffix}'" if p.suffix else "no extension"
            raise CliError(f"{flag} '{path}' has {ending}; ffprop writes video by the name's ending: "
                           f"{', '.join(VIDEO_SUFFIXES)} (H.264; .webm is VP9). Use e.g. '{p.with_suffix('.mp4')}'.")
        parent = p.parent
        if not parent.is_dir():
            raise CliError(f"the folder of {flag} '{path}' does not exist ('{parent}'); create it first "
                           f"(mkdir -p '{parent}') or choose another place.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CliError(f"cannot write {flag} '{path}': folder '{parent}' is not writable for you.")
        for in_flag, in_path in inputs.items():
            if in_path and _same_file(path, in_path):
                raise CliError(f"{flag} '{path}' is the same file as {in_flag} '{in_path}'; ffprop never "
                               "overwrites its input. Choose another output name.")
    names = list(given.items())
    for i, (flag, path) in enumerate(names):
        for other, other_path in names[i + 1:]:
            if _same_file(path, other_path):
                raise CliError(f"{flag} and {other} are both '{path}'; give them different names.")


def check_diffusers(engine: str) -> None:
    """--engine wan needs diffusers: say so before importing or reading anything (find_spec imports nothing)."""
    if engine != "wan":
        return
    try:
        missing = importlib.util.find_spec("diffusers") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise CliError(f"--engine wan needs the 'diffusers' package, which this Python ({sys.executable}) does "
                       "not have. Install it (pip install 'diffusers>=0.33', or pip install -e '.[diffusers]' in "
                       "a checkout), or use --engine flow (no weights needed).")


def check_engine(args) -> None:
    """--engine wan needs --model DIR or --world: say so before reading anything."""
    if args.engine != "wan":
        if getattr(args, "world", False):
            raise CliError("--world picks the models of --engine wan; add --engine wan (the flow engine needs none).")
        return
    if getattr(args, "world", False):
        if args.model:
            raise CliError("give --model DIR or --world (the bundled small world models), not both.")
        return
    if not args.model:
        raise CliError("--engine wan needs --model DIR (a diffusers-format Wan2.1 I2V directory), or --world for "
                       "the bundled small world models (64x64 procedural scenes; no download).")
    if not Path(args.model).is_dir():
        raise CliError(f"--model '{args.model}' is not a directory (expected a diffusers-format Wan2.1 I2V "
                       "folder with transformer/ and vae/).")


# ---- shared steps -------------------------------------------------------------------------------------------

def _settings(args):
    from .nodes.flow.engine import FlowSettings

    return FlowSettings(mode=args.mode, quality=args.quality, mask_threshold=args.mask_threshold,
                        mask_grow=args.mask_grow, feather=args.feather, match_tolerance=args.match_tolerance,
                        auto_follow=not getattr(args, "no_follow", False))


def fit_edit(edited, source_first, policy: str, mask_given: bool, threshold: float):
    """The edited first frame fitted to the clip (DESIGN.md sec 2: explicit policy, reported).

    edited [H', W', 3], source_first [H, W, 3] -> ([H, W, 3], note). A fit that changes the aspect moves the
    picture against the source; without --mask the edit region is derived from their difference and then
    covers the moved parts too: an error with --size-policy auto, a warning with the numbers for an explicit
    crop/pad."""
    from .nodes.flow.engine import derive_edit_mask
    from .nodes.video.frames import fit_to_frame

    h, w = source_first.shape[:2]
    ih, iw = edited.shape[:2]
    fitted, note = fit_to_frame(edited, h, w, policy)
    same_aspect = abs((iw / ih) / (w / h) - 1) < 0.01
    if note and not same_aspect and not mask_given:
        cover = derive_edit_mask(source_first, fitted, threshold).mean().item()
        why = (f"the edited first frame is {iw}x{ih} (aspect {iw / ih:.3f}) but the video is {w}x{h} "
               f"({w / h:.3f}): fitting it moves its picture against the source's, so the edit region derived "
               f"from their difference covers {cover:.0%} of the frame")
        if policy == "auto":
            raise CliError(f"{why}. Export the edit at {w}x{h} (or at the clip's aspect ratio), give --mask with "
                           "the edit region, or choose --size-policy crop or pad to go ahead anyway.")
        print(f"warning: {why}; give --mask to set the edit region yourself.", file=sys.stderr)
    return fitted, note


def _size_note(out: Path, h: int, w: int) -> str:
    from .nodes.video.io import encoded_size

    eh, ew = encoded_size(h, w)
    return "" if (eh, ew) == (h, w) else (
        f"{w}x{h} has an odd side and 4:2:0 video needs even ones: '{out}' is {ew}x{eh} (last row/column "
        f"repeated); `ffprop eval` scores its {w}x{h} part.")


def _wrote(out: Path, frames, fps: float) -> None:
    from .nodes.video.io import encoded_size

    t, h, w = frames.shape[:3]
    eh, ew = encoded_size(h, w)
    note = _size_note(out, h, w)
    if note:
        print(f"note: {note}")
    print(f"wrote {out} ({t} frames, {ew}x{eh}, {fps:g} fps)")


def _write_json(path: Path, metrics: dict) -> Path:
    import json

    from .nodes.common import atomic_write
    from .nodes.evaluate.metrics import json_ready

    with atomic_write(path) as tmp:       # strict JSON: inf/NaN become null, with the reason under "notes"
        tmp.write_text(json.dumps(json_ready(metrics), indent=1, allow_nan=False))
    return path


# ---- commands -----------------------------------------------------------------------------------------------

def _write_outputs(out_dir: Path, source, result_video, edited, masks, fps, metrics) -> dict[str, Path]:
    from .nodes.video.io import write_image, write_video
    from .nodes.video.preview import comparison_grid, side_by_side

    return {
        "output": write_video(out_dir / "output.mp4", result_video, fps),
        "side_by_side": write_video(out_dir / "side_by_side.mp4", side_by_side(source, result_video), fps),
        "preview": write_image(out_dir / "preview.png", comparison_grid(source, result_video, masks)),
        "edited_first_frame": write_image(out_dir / "edited_first_frame.png", edited),
        "metrics": _write_json(out_dir / "metrics.json", metrics),
    }


def check_demo(args) -> None:
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise CliError(f"-o '{args.output}' is a file; the demo writes a folder of results. Give a folder name.")


def cmd_demo(args) -> int:
    """Synthetic clip with a known ground truth: a textured disc recoloured in frame 1."""
    out_dir = Path(args.output)
    t0 = time.time()
    if args.engine == "wan":
        return _demo_wan(args, out_dir, t0)
    from .nodes.evaluate.metrics import evaluate, format_table, psnr
    from .nodes.flow.engine import propagate_edit
    from .nodes.video.io import write_video
    from .nodes.video.synthetic import synthetic_clip

    settings = _settings(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = synthetic_clip(args.frames, args.height, args.width, seed=args.seed)
    write_video(out_dir / "source.mp4", clip.source, clip.fps)
    bar = Bar("propagating")
    result = propagate_edit(clip.source, clip.edited[0], None, settings, on_step=bar)
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


def _demo_wan(args, out_dir: Path, t0: float) -> int:
    """`demo --engine wan`: nodes/evaluate/bench.py's world_demo, written like the flow demo plus the truth."""
    from .nodes.evaluate.bench import world_demo
    from .nodes.evaluate.metrics import evaluate, format_table
    from .nodes.video.io import write_video

    s, video, scores = world_demo(args.seed, on_step=Bar("LoRA-Edit, flow, repeat"))
    fps = 8.0
    out_dir.mkdir(parents=True, exist_ok=True)
    write_video(out_dir / "source.mp4", s.source, fps)
    write_video(out_dir / "ground_truth.mp4", s.target, fps)
    metrics = {**evaluate(s.source, video, s.edited_first, s.edit_mask), "ground_truth": scores}
    paths = _write_outputs(out_dir, s.source, video, s.edited_first, s.edit_mask, fps, metrics)
    print(format_table({"demo (LoRA-Edit, world model)": metrics}))
    print(f"\nvs the ground truth (held-out world scene {s.seed}, edit '{s.edit}', frames 2..{s.target.shape[0]}):")
    for name, row in scores.items():
        print(f"  {name:<19} psnr {row['psnr']:6.2f} dB  edit {row['edit_psnr']:6.2f} dB  bg "
              f"{row['bg_psnr']:6.2f} dB  warp {row['warp_error']:.4f}  {row['seconds']:.1f} s")
    print(f"done in {time.time() - t0:.1f} s; wrote:")
    for name, path in [("source", out_dir / "source.mp4"), ("ground_truth", out_dir / "ground_truth.mp4"),
                       *paths.items()]:
        print(f"  {name:<19} {path}")
    return 0


def check_propagate(args) -> None:
    """Outputs and engine of `propagate`, before any work (the wan options may be absent: light parse)."""
    inputs = {"--video": args.video, "--edited-first-frame": args.edited_first_frame, "--mask": args.mask,
              "--model": getattr(args, "model", None), "--prompt-embeds": getattr(args, "prompt_embeds", None),
              "--image-embeds": getattr(args, "image_embeds", None),
              **{f"--keyframe {i}": path for i, path in args.keyframe or []}}
    args.keys = check_keyframes(args)
    check_outputs({"-o/--output": args.output, "--mask-out": args.mask_out,
                   "--save-lora": getattr(args, "save_lora", None)}, inputs, video=("-o/--output", "--mask-out"))
    check_diffusers(args.engine)
    if hasattr(args, "model"):
        check_engine(args)


def _wan_size(source, mask, fitted: list, policy: str):
    """Wan's multiple-of-16 size rule applied alike to the clip, its mask and the fitted keyframes."""
    import torch

    from .nodes.video.frames import fix_size

    source, note = fix_size(source, policy)
    if note:
        print(f"note: {note} (the clip, its mask and every keyframe)")
        fitted = list(fix_size(torch.stack(fitted), policy)[0])
        mask = None if mask is None else (fix_size(mask, policy)[0] > 0.5).float()
    return source, mask, fitted


def _propagate_keyframes(args, source, mask, settings, images: list):
    """--keyframe, or --engine wan with --world or later keyframes: each edited frame fitted like frame 1, checked, then
    propagated span by span with the span cache in --cache-dir (default: ffprop_cache/ next to -o). Returns the
    KeyframeResult (for --engine wan at the clip's size after Wan's multiple-of-16 rule, --crop-policy)."""
    from .nodes.keyframes.cache import SpanCache
    from .nodes.keyframes.cli import wan_keyframe_engine
    from .nodes.keyframes.engines import FlowEngine
    from .nodes.keyframes.keys import make_keyframes
    from .nodes.keyframes.propagate import propagate_keyframes

    t = source.shape[0]
    out_of_range = [i for i, _ in args.keys if i >= t]
    if out_of_range:
        raise CliError(f"--keyframe frame(s) {out_of_range} are past the clip's end: it has {t} frames (0..{t - 1}, "
                       f"0-based){' after --max-frames' if args.max_frames else ''}.")
    fitted = []
    for (i, path), image in zip(args.keys, images):
        frame, note = fit_edit(image, source[i], args.size_policy, mask is not None, args.mask_threshold)
        if note:
            print(f"note: keyframe {i} ('{path}'): {note}")
        fitted.append(frame)
    wan = args.engine == "wan"
    if wan:
        source, mask, fitted = _wan_size(source, mask, fitted, args.crop_policy)
    keys = make_keyframes(source, fitted, [i for i, _ in args.keys], "error", mask, args.mask_threshold)
    engine = wan_keyframe_engine(args) if wan else FlowEngine(settings)
    cache = None
    if not args.no_cache:
        cache = SpanCache(args.cache_dir or Path(args.output).resolve().parent / "ffprop_cache", args.cache_mb << 20)
    bar = Bar("propagating")
    try:
        result = propagate_keyframes(source, keys, engine, mask, cache, on_step=bar)
    finally:
        bar.close()
    print(result.report())
    if cache is not None:
        print(f"span cache: {cache.folder} (safe to delete)")
    return result


def _check_mask_size(mask, path: str, h: int, w: int) -> None:
    if mask.shape[1:] != (h, w):
        raise ValueError(f"mask '{path}' is {mask.shape[2]}x{mask.shape[1]} but the video is {w}x{h}; export the "
                         "mask at the video's size.")


def _propagate_stream(args, settings) -> int:
    """The flow engine from one edited frame, file to file (nodes/flow/stream.py): decode -> engine -> encode
    one frame at a time, so memory stays flat whatever the clip's length."""
    from .nodes.flow.stream import propagate_file
    from .nodes.video.frames import from_uint8
    from .nodes.video.io import VideoReader, audio_codec, encoded_size, read_image, read_mask

    first = next(iter(VideoReader(args.video, 1)), None)
    if first is None:
        raise ValueError(f"video '{args.video}' has no decodable frames.")
    h, w = first.shape[:2]
    mask = read_mask(args.mask) if args.mask else None
    if mask is not None:
        _check_mask_size(mask, args.mask, h, w)
        if mask.shape[0] > 1 and args.max_frames:
            mask = mask[: args.max_frames]
    fitted, note = fit_edit(read_image(args.keys[0][1]), from_uint8(first), args.size_policy, mask is not None,
                            args.mask_threshold)
    if note:
        print(f"note: {note}")
    bar = Bar("propagating")
    result = propagate_file(args.video, fitted, args.output, mask, settings, args.size_policy,
                            mask_out=args.mask_out, max_frames=args.max_frames, on_step=bar)
    bar.close()
    for n in result.notes:
        print(f"note: {n}")
    size_note = _size_note(Path(args.output), h, w)
    if size_note:
        print(f"note: {size_note}")
    eh, ew = encoded_size(h, w)
    print(f"wrote {args.output} ({result.frames} frames, {ew}x{eh}, {result.fps:g} fps)")
    if args.mask_out:
        print(f"wrote {args.mask_out}")
    audio = audio_codec(args.video)
    print(f"audio: kept the source's ({audio})" if audio else "audio: the source has none")
    return 0


def cmd_propagate(args) -> int:
    settings = _settings(args)
    if not args.keyframe and args.engine != "wan":
        return _propagate_stream(args, settings)
    from .nodes.video.io import audio_codec, read_image, read_mask, read_video, write_video

    source, fps = read_video(args.video, args.max_frames)
    images = [read_image(path) for _, path in args.keys]
    edited = images[0]
    mask = read_mask(args.mask) if args.mask else None
    if mask is not None:
        _check_mask_size(mask, args.mask, *source.shape[1:3])
    if mask is not None and mask.shape[0] > 1:
        mask = mask[: source.shape[0]]
    audio = audio_codec(args.video)
    if args.engine != "wan" or args.world or args.keys != [(0, args.keys[0][1])]:   # span by span (keyframes)
        result = _propagate_keyframes(args, source, mask, settings, images)
        out = write_video(args.output, result.video, fps, audio_from=args.video)
        _wrote(out, result.video, fps)
        if args.mask_out:
            print(f"wrote {write_video(args.mask_out, result.mask[..., None].expand(-1, -1, -1, 3), fps)}")
        print(f"audio: kept the source's ({audio})" if audio else "audio: the source has none")
        return 0
    from .nodes.lora_edit.cli import run_wan  # --engine wan (the flow engine without keyframes streams)

    fit_edit(edited, source[0], args.size_policy, mask is not None, args.mask_threshold)  # its refusals apply
    frames = run_wan(args, source, fps, edited, mask, Bar)
    out = write_video(args.output, frames, fps, audio_from=args.video)
    _wrote(out, frames, fps)
    print(f"audio: kept the source's ({audio})" if audio else "audio: the source has none")
    return 0


def check_eval(args) -> None:
    check_outputs({"--json": args.json}, {"--video": args.video, "--edited-first-frame": args.edited_first_frame,
                                          "--output": args.output, "--mask": args.mask})


def cmd_eval(args) -> int:
    from .nodes.evaluate.metrics import evaluate, format_table
    from .nodes.flow.engine import derive_edit_mask, propagate_mask
    from .nodes.video.io import encoded_size, read_image, read_mask, read_video

    source, _ = read_video(args.video)
    output, _ = read_video(args.output)
    if output.shape[0] != source.shape[0]:
        raise ValueError(f"output has {output.shape[0]} frames but the source has {source.shape[0]}.")
    h, w = source.shape[1:3]
    if output.shape[1:3] != source.shape[1:3]:
        if tuple(output.shape[1:3]) != encoded_size(h, w):
            raise ValueError(f"output '{args.output}' is {output.shape[2]}x{output.shape[1]} but the source is "
                             f"{w}x{h}; score the output against the clip it was made from.")
        print(f"note: the output is {output.shape[2]}x{output.shape[1]}, the {w}x{h} source padded to even "
              f"sides for video; scoring its top-left {w}x{h}")
        output = output[:, :h, :w]
    edited, note = fit_edit(read_image(args.edited_first_frame), source[0], args.size_policy, bool(args.mask),
                            args.mask_threshold)
    if note:
        print(f"note: {note}")
    t, tracked = source.shape[0], not args.mask
    bar = Bar("tracking edit region, scoring" if tracked else "scoring")    # one bar over all the work
    if tracked:
        masks = propagate_mask(source, derive_edit_mask(source[0], edited, args.mask_threshold),
                               on_step=lambda i, n, p=None: bar(i, 2 * t))
    else:
        masks = read_mask(args.mask)[:t]
    metrics = evaluate(source, output, edited, masks, args.seams or (), args.margin,
                       on_step=lambda i, n, p=None: bar(i + t * tracked, t * (1 + tracked)))
    bar.close()
    print(format_table({Path(args.output).name: metrics}))
    if args.json:
        print(f"wrote {_write_json(Path(args.json), metrics)}")
    return 0


# ---- parser -------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for options without one (None) and on/off flags."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _add_flow_options(p: argparse.ArgumentParser) -> None:
    d = FLOW_DEFAULTS
    g = p.add_argument_group("engine flow (optical flow on the CPU, no weights)")
    g.add_argument("--mode", choices=FLOW_MODES, default=d["mode"],
                   help="auto: delta, and a note when the per-pixel chain breaks up (when the edit region is "
                        "lost while the camera pans past the object: restarted with the motion follower's "
                        "per-frame masks, see --no-follow); delta: add the edit's change "
                        "where it keeps the picture's structure (keeps the source's lighting), the relit edited "
                        "result elsewhere; pixels: the relit edited pixels everywhere; layer: the edit region "
                        "moves as one piece with the object")
    g.add_argument("--quality", choices=FLOW_QUALITIES, default=d["quality"], help="optical-flow (DIS) preset")
    g.add_argument("--mask-threshold", type=_fraction, default=d["mask_threshold"],
                   help="colour difference (0..1) that counts as edited when no --mask is given")
    g.add_argument("--mask-grow", type=_int_at_least(0), default=d["mask_grow"], help="px to grow the edit region")
    g.add_argument("--feather", type=_int_at_least(0), default=d["feather"], help="soft edge width in px")
    g.add_argument("--match-tolerance", type=_fraction, default=d["match_tolerance"],
                   help="how closely (0..1) a pixel must still match frame 1 to keep the edit")
    g.add_argument("--no-follow", action="store_true",
                   help="mode auto: when the edit region is lost on a camera pan, only say so instead of "
                        "restarting with the motion follower's per-frame masks")


def build_parser() -> argparse.ArgumentParser:
    """The `ffprop` parser (torch-free: --help and argument errors import no torch)."""
    fmt = {"formatter_class": HelpFormatter}
    parser = argparse.ArgumentParser(prog="ffprop", description="First-frame propagation: edit frame 1, "
                                     "FFProp carries the edit through the clip.",
                                     epilog="exit codes: 0 done, 2 bad input or arguments (nothing written), "
                                            "1 other failure, 130 cancelled", **fmt)
    parser.add_argument("--version", action="version", version=f"ffprop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is fixed or derived; tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole job on a synthetic clip (no inputs, no weights)",
                          description="Synthesise a clip and its edited first frame (a recoloured disc), "
                                      "propagate the edit and score it against the known ground truth.", **fmt)
    demo.add_argument("-o", "--output", default="ffprop_out/demo",
                      help="output folder (created; files in it are replaced)")
    demo.add_argument("--frames", type=_int_at_least(2), default=49, help="clip length in frames")
    demo.add_argument("--width", type=_int_at_least(64), default=512, help="clip width in px")
    demo.add_argument("--height", type=_int_at_least(64), default=288, help="clip height in px")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic textures")
    demo.add_argument("--engine", choices=["flow", "wan"], default="flow",
                      help="flow: the optical-flow engine on a synthetic clip; wan: LoRA-Edit with the bundled "
                           "small world models on a held-out world scene (64x64, 17 frames; --frames/--width/"
                           "--height/flow options do not apply), scored against its ground truth")
    _add_flow_options(demo)
    demo.set_defaults(func=cmd_demo, check=check_demo)

    prop = sub.add_parser("propagate", help="propagate an edited first frame through a video",
                          description="Carry the edit of frame 1 through the clip. Writes video by the output's "
                                      f"ending ({', '.join(VIDEO_SUFFIXES)}) with the source's audio.", **fmt)
    prop.add_argument("--video", required=True, help="source video file (mp4/webm/mov/mkv) or folder of frames")
    prop.add_argument("--edited-first-frame", help="frame 1 after your edit (png/jpg); or use --keyframe 0:IMG")
    prop.add_argument("--keyframe", action="append", type=_keyframe, metavar="INDEX:PATH",
                      help="an edited frame at 0-based frame INDEX (frame 1 is 0); repeat for several, e.g. "
                           "--keyframe 0:first.png --keyframe 48:f48.png: each stretch between two keyframes is made "
                           "from both (--engine flow or wan), the rest from the nearest one")
    prop.add_argument("--cache-dir", help="keyframes: span cache folder, so a re-run after editing one keyframe "
                                          "recomputes only the stretches it touches (default: ffprop_cache/ next to "
                                          "-o; safe to delete)")
    prop.add_argument("--cache-mb", type=_int_at_least(1), default=2048, help="keyframes: span cache size bound")
    prop.add_argument("--no-cache", action="store_true", help="keyframes: compute every span, store nothing")
    prop.add_argument("--mask", help="edit region: one image for frame 1, or a mask video / folder (white = edit); "
                                     "default: derived from the difference between frame 1 and your edit")
    prop.add_argument("-o", "--output", required=True, help=f"output video ({', '.join(VIDEO_SUFFIXES)})")
    prop.add_argument("--mask-out", help="also write the propagated edit region as a video")
    prop.add_argument("--size-policy", choices=FIT_POLICIES, default="auto",
                      help="fit an edited frame of another size: auto = resize if the aspect ratio agrees within "
                           "1 %%, else refuse unless --mask is given (then crop)")
    prop.add_argument("--max-frames", type=_int_at_least(1), help="only the first N frames (default: all)")
    prop.add_argument("--engine", choices=["flow", "wan"], default="flow",
                      help="flow: optical flow (CPU, no weights); wan: LoRA-Edit on a Wan2.1 I2V model (--model, "
                           "needs diffusers)")
    _add_flow_options(prop)
    add_wan_arguments(prop)
    prop.add_argument("--world", action="store_true",
                      help="engine wan: the bundled small world models (nodes/world, trained on 64x64 procedural "
                           "scenes) instead of --model: LoRA-Edit span by span, every stretch between two keyframes "
                           "from both ends; no download, CPU is enough")
    prop.set_defaults(func=cmd_propagate, check=check_propagate)

    ev = sub.add_parser("eval", help="score an edited video against its source",
                        description="Score an edited video against its source: first-frame fidelity, background "
                                    "preservation, temporal consistency.", **fmt)
    ev.add_argument("--video", required=True, help="source video")
    ev.add_argument("--edited-first-frame", required=True, help="frame 1 after the edit (png/jpg)")
    ev.add_argument("--output", required=True, help="the edited video to score")
    ev.add_argument("--mask", help="edit region per frame (mask video/folder); default: tracked from frame 1")
    ev.add_argument("--mask-threshold", type=_fraction, default=FLOW_DEFAULTS["mask_threshold"],
                    help="colour difference (0..1) that counts as edited when no --mask is given")
    ev.add_argument("--size-policy", choices=FIT_POLICIES, default="auto",
                    help="fit an edited frame of another size (as for propagate)")
    ev.add_argument("--seams", type=_seams, help="first frame of each chunk after the first, e.g. '81,161'")
    ev.add_argument("--margin", type=_int_at_least(0), default=4,
                    help="px around the edit left out of background scores")
    ev.add_argument("--json", help="also write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval, check=check_eval)

    bench = sub.add_parser("bench", help="score every engine against ground truth on held-out world scenes",
                           description="Run every engine on the held-out scenes of the procedural world "
                                       "(nodes/world/scenes.py), per edit type; print one table, optionally "
                                       "write JSON. Engines whose models are missing are reported as skipped.",
                           **fmt)
    bench.add_argument("suite", choices=["world"], help="world: the procedural world's held-out scenes")
    bench.add_argument("--json", help="also write the results as JSON here")
    bench.add_argument("--quick", action="store_true",
                       help="one scene per edit type and short LoRA training (under 10 minutes on 2 cores)")
    bench.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    bench.add_argument("--per-edit", type=int, default=None, metavar="K",
                       help="the full run's settings on only K held-out scenes per edit (1..14; default: all 14)")
    bench.set_defaults(func=cmd_bench, check=check_bench)

    train = sub.add_parser("train", help="train a model on a dataset (FreeProp, GenProp content encoder)",
                           description="Dataset training; each runs on one process or under torchrun (DDP).", **fmt)
    trainers = train.add_subparsers(dest="trainer", required=True, metavar="TRAINER", help="what to train")
    for room in TRAINERS.values():
        room.add_parser(trainers)
    train.set_defaults(func=cmd_train)
    return parser


def _trainers() -> dict:
    """`ffprop train NAME` -> the room's cli module (add_parser(sub), run(args); neither imports torch at parse)."""
    from .nodes.ast_rope import cli as freeprop
    from .nodes.content_encoder import cli as content_encoder

    return {"freeprop": freeprop, "content-encoder": content_encoder}


TRAINERS = _trainers()


def cmd_train(args) -> int:
    return TRAINERS[args.trainer].run(args)


def check_bench(args) -> None:
    check_outputs({"--json": args.json}, {})


def cmd_bench(args) -> int:
    """`ffprop bench world`: nodes/evaluate/bench.py does the work (imported here: it needs torch)."""
    from .nodes.evaluate.bench import run_cli

    return run_cli(args.quick, args.json, args.methods, Bar("benchmark"), per_edit=args.per_edit)


def _command(argv: list[str]) -> str | None:
    """The sub-command named in argv (the first word that is not an option), without parsing."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv) or "ffprop"
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        if hasattr(args, "check"):                  # a command without checks (e.g. one added later) skips this
            args.check(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"ffprop {command}: cancelled (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (each kind gets its exit code and a message, not a traceback)
        from .nodes.common import Cancelled

        if isinstance(e, Cancelled):
            print(f"ffprop {command}: cancelled", file=sys.stderr)
            return 130
        if args is not None and args.verbose:
            raise
        if isinstance(e, (ValueError, OSError)):
            print(f"ffprop {command}: error: {e}", file=sys.stderr)
            return 2
        print(f"ffprop {command}: failed: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
