"""SAM2 propagation memory vs clip length: peak RSS (CPU) for 50 vs 200 frames of sam2_bedroom (960x540).

A tiny random-weight SAM2.1 (hiera tiny config; weights do not change memory or speed), the SAM2 demo click
(210, 350) on frame 0, forward tracking. One subprocess per run, peak RSS from getrusage. Two modes:

- stream: frames decoded from the mp4 on demand and masks consumed as they come (what the tracker itself
  holds: its bounded memory window, not the clip). Goal: 200-frame / 50-frame peak RSS <= 1.2.
- tensor: the whole clip decoded into an IMAGE tensor and all masks kept, as inside ComfyUI, where the IMAGE
  input (T*H*W*3*4 bytes) and the MASK output (T*H*W*4) are the host's and grow with T by definition.

Run: python tests/benchmarks/bench_sam2_memory.py [--image-size 256] [--frames 50 200] [--modes stream tensor]
Needs ../shared/data/sam2_bedroom and the sam2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("FFP_SHARED_DATA", REPO.parent / "shared" / "data"))
CLIP = DATA / "sam2_bedroom" / "bedroom.mp4"
CLICK = '{"version": 1, "prompts": [{"frame": 0, "object": 1, "points": [[210, 350, 1]]}]}'


class StreamedVideo:
    """Frames of a video file decoded on demand (sequential reads; a backward jump re-opens the file).
    len(), .height, .width and source[i] -> IMAGE frame [H, W, 3] float, as track_sam2 expects."""

    def __init__(self, path: Path, max_frames: int):
        import av

        self.path, self._av = path, av
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            self.height, self.width = s.codec_context.height, s.codec_context.width
            total = s.frames or max_frames
        self.n = min(max_frames, total)
        self._open()

    def _open(self):
        self._container = self._av.open(str(self.path))
        self._frames = self._container.decode(video=0)
        self._index, self._frame = -1, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        if not 0 <= i < self.n:
            raise IndexError(i)
        if i < self._index:
            self._container.close()
            self._open()
        while self._index < i:
            self._frame = next(self._frames).to_ndarray(format="rgb24")
            self._index += 1
        return torch.from_numpy(self._frame).float() / 255.0


def child(frames: int, mode: str, image_size: int) -> dict:
    import torch
    from ffprop.nodes.masks.prompts import parse_prompts
    from ffprop.nodes.masks.propagate import propagate_masks, track_sam2
    from ffprop.nodes.masks.sam2_model import SAM2Model, SAM2Spec, build_model

    torch.set_num_threads(1)                      # shared CPUs: two spin-waiting OpenMP threads were ~7x slower
    spec = SAM2Spec("tiny", "2.1", image_size)
    model = SAM2Model(build_model(spec, None, "cpu", seed=0), spec)
    t0 = time.perf_counter()
    if mode == "stream":
        source = StreamedVideo(CLIP, frames)
        prompts = parse_prompts(CLICK, len(source), source.height, source.width)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        area = 0
        for _, _, masks in track_sam2(model, source, prompts.entries, direction="forward"):
            area += int(masks.sum())
    else:
        from ffprop.nodes.video.io import read_video

        video, _ = read_video(CLIP, max_frames=frames)
        prompts = parse_prompts(CLICK, *video.shape[:3])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        area = int(propagate_masks(video, prompts, model=model, engine="sam2", direction="forward").mask.sum())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames": frames, "mode": mode, "image_size": image_size, "peak_rss_mb": peak / 1024,
            "rss_before_tracking_mb": base / 1024, "seconds": seconds, "frames_per_s": frames / seconds,
            "mask_pixels": area}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256, help="SAM2 input size (1024 = as trained; slow on CPU)")
    ap.add_argument("--frames", type=int, nargs=2, default=[50, 200])
    ap.add_argument("--modes", nargs="+", default=["stream", "tensor"], choices=["stream", "tensor"])
    ap.add_argument("--child", nargs=3, metavar=("FRAMES", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], int(args.child[2]))))
        return 0
    if not CLIP.is_file():
        print(f"skip: {CLIP} not found (set FFP_SHARED_DATA)")
        return 0
    rows = {}
    for mode in args.modes:
        for n in args.frames:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), mode, str(args.image_size)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[(mode, n)] = r
            print(f"{mode:6s} {n:4d} frames @ {args.image_size}px: peak RSS {r['peak_rss_mb']:8.1f} MB "
                  f"(before tracking {r['rss_before_tracking_mb']:7.1f} MB), {r['seconds']:6.1f} s, "
                  f"{r['frames_per_s']:.2f} frames/s", flush=True)
        a, b = rows[(mode, args.frames[0])], rows[(mode, args.frames[1])]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        goal = " (goal <= 1.2: " + ("met" if ratio <= 1.2 else "NOT met") + ")" if mode == "stream" else ""
        print(f"{mode}: peak RSS {args.frames[1]} / {args.frames[0]} frames = {ratio:.3f}{goal}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
