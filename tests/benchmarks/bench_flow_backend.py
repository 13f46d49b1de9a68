"""The flow engine with its two frame-to-frame flow backends side by side: OpenCV DIS vs RAFT (nodes/flow/raft.py).

    # a lent GPU (or CPU: slow at full size), bmx-trees from ../shared/data, 80 frames 432x240:
    OMP_NUM_THREADS=2 python tests/benchmarks/bench_flow_backend.py [--weights raft_large.pth] [--frames 80]
    # plumbing on any CPU in ~1 min: a 6-frame 64x96 synthetic clip, random raft_small, 2 flow updates
    OMP_NUM_THREADS=1 python tests/benchmarks/bench_flow_backend.py --tiny

Needs torchvision (ComfyUI's venv has it). For each backend, on the same clip, device and edit (the true frame-1
mask, bench_flow_quality.py's `first_mask` variant; on bmx-trees the truth is a hue rotation inside every frame's
true mask, on the synthetic clip its own ground truth): the flow alone (ms per frame pair, mean of the clip's
pairs after one warm-up), the engine's wall time (propagate_edit, IMAGE in and out, no encoding), the quality
against the truth on frames 2..T (PSNR dB: object = inside the true mask, outside, far_bg = outside the mask
dilated by the object's motion; missing = share of the edit missing, vanished = frames where 3/4 of it is), and
whether a second run gave the same bytes. Without --weights RAFT has random weights (there is no trained file
here): its time is real, its quality numbers are not (they say nothing about RAFT) and are printed as such."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]


def load_clip(tiny: bool, frames: int):
    """(source, truth, true masks) IMAGE/MASK tensors and a name."""
    from bench_flow_quality import DATA, HUE_DEG, hue_rotate, read_bmx

    if tiny or not (DATA / "propainter_bmx_trees").is_dir():
        from ffprop.nodes.video.synthetic import synthetic_clip

        if not tiny:
            print(f"bmx-trees not found under {DATA}: the synthetic clip instead")
        t, h, w = (6, 64, 96) if tiny else (frames, 240, 432)
        clip = synthetic_clip(t, h, w, seed=0)
        return clip.source, clip.edited, clip.mask, f"synthetic {t} frames {w}x{h}"
    source, gt = read_bmx(frames)
    m = gt[..., None]
    truth = source * (1 - m) + hue_rotate(source, HUE_DEG) * m
    return source, truth, gt, f"bmx-trees {source.shape[0]} frames {source.shape[2]}x{source.shape[1]}, hue {HUE_DEG:g}"


def flow_ms(flow, source: torch.Tensor) -> float:
    """Mean ms of flow(frame t, frame t-1) over the clip's pairs (grey uint8, as the engine calls it), one warm-up."""
    from ffprop.nodes.flow.dis import to_gray
    from ffprop.nodes.video.frames import to_uint8

    grays = [to_gray(to_uint8(f)) for f in source]
    flow(grays[1], grays[0], None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(1, len(grays)):
        flow(grays[t], grays[t - 1], None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(len(grays) - 1, 1) * 1000


def run_engine(source, truth, gt, quality: str, flow) -> tuple[torch.Tensor, float]:
    from ffprop.nodes.flow.engine import FlowSettings, propagate_edit

    t0 = time.perf_counter()
    out = propagate_edit(source, truth[0], gt[:1], FlowSettings(quality=quality, flow=flow)).video
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="6-frame 64x96 synthetic clip, random raft_small, 2 updates")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--quality", default="medium", help="DIS preset (the DIS row's flow and both rows' anchor)")
    ap.add_argument("--weights", help="a trained torchvision RAFT file (.pth/.safetensors); default random weights")
    ap.add_argument("--arch", default="raft_large", help="random RAFT architecture without --weights")
    ap.add_argument("--iters", type=int, default=None, help="RAFT flow updates (default 12, --tiny 2)")
    ap.add_argument("--precision", default="auto", help="auto (fp16 on CUDA) | fp32 | fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from bench_flow_quality import dilate, edit_kept, motion_radius, scores
    from ffprop.nodes.flow.raft import RaftFlow, load_raft, random_raft
    from ffprop.nodes.flow.track import dis_backend

    arch = "raft_small" if args.tiny and not args.weights else args.arch
    iters = args.iters or (2 if args.tiny else 12)
    source, truth, gt, name = load_clip(args.tiny, args.frames)
    far = 1 - dilate(gt, motion_radius(gt))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.weights) if args.weights else random_raft(Path(tmp) / f"{arch}.safetensors", arch)
        raft = RaftFlow(load_raft(path, args.device), args.precision, iters)
    label = f"RAFT {path.name if args.weights else arch + ' (random weights)'}"
    dev = f"{args.device}{' ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}"
    print(f"clip {name}; DIS preset {args.quality}; RAFT {iters} updates, {'fp16' if raft.half else 'fp32'} on "
          f"{dev}; torch threads {torch.get_num_threads()}")
    rows = []
    for row, flow_fn in ((f"DIS {args.quality}", None), (label, raft)):
        ms = flow_ms(flow_fn or dis_backend(args.quality), source)
        out, seconds = run_engine(source, truth, gt, args.quality, flow_fn)
        again, _ = run_engine(source, truth, gt, args.quality, flow_fn)
        q = {**scores(out, truth, gt, far), **edit_kept(out, truth, source, gt)}
        rows.append((row, ms, seconds, source.shape[0] / seconds, q, torch.equal(out, again)))
    src = {**scores(source, truth, gt, far), **edit_kept(source, truth, source, gt)}
    head = f"{'backend':34s} {'flow ms/pair':>12s} {'engine s':>9s} {'fps':>6s} {'object':>7s} {'outside':>8s} " \
           f"{'far_bg':>7s} {'missing':>8s} {'vanished':>8s} {'repeat':>9s}"
    print(head)
    for row, ms, seconds, fps, q, same in [(" untouched source", np.nan, np.nan, np.nan, src, True), *rows]:
        print(f"{row:34s} {ms:12.1f} {seconds:9.2f} {fps:6.2f} {q['object']:7.2f} {q['outside']:8.2f} "
              f"{q['far_bg']:7.2f} {q['missing'] if q['missing'] is not None else float('nan'):8.3f} "
              f"{len(q['vanished']):8d} {'identical' if same else 'DIFFERS':>9s}")
    if not args.weights:
        print("RAFT has random weights: its time is RAFT's, its quality columns say nothing about RAFT "
              "(pass --weights with a trained torchvision raft_large/raft_small file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
