"""The flow engine against its speed floor, its memory against clip length, its output across processes.

    OMP_NUM_THREADS=2 /work/venv/bin/python tests/benchmarks/bench_flow.py [--quality medium] [--clip 017]

Prints, on the same clip in one run: the engine's wall time file -> file (nodes/flow/stream.py: decode ->
engine -> encode), the floor (decode + encode + one DIS flow per frame at the same preset, in one loop; the encode runs in VideoWriter's own thread for both), their
ratio, and the CPU seconds of both (all threads: what a loaded machine's wall times hide); then peak RSS of a fresh process running the engine on 49 and on 200 frames of the same footage (the
clip played forward and back), and whether two processes wrote the same bytes. Needs ../shared/data."""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def clip_paths(clip: str) -> tuple[Path, Path]:
    base = DATA / "loraedit_page" / "input"
    return base / f"{clip}.mp4", base / f"{clip}_e1.png"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_all() -> None:
    """Import everything either timed path uses (torch included), so neither run pays for imports."""
    import ffprop.nodes.flow.fit  # noqa: F401  (imported lazily by the engine)
    import ffprop.nodes.flow.layer  # noqa: F401
    import ffprop.nodes.flow.stream  # noqa: F401
    import ffprop.nodes.video.io  # noqa: F401


def floor(video: Path, quality: str, out: Path) -> float:
    """Seconds to decode every frame, compute one DIS flow per consecutive pair, and encode every frame."""
    from ffprop.nodes.flow.dis import DenseFlow, to_gray
    from ffprop.nodes.video.io import VideoReader, VideoWriter

    t0 = time.perf_counter()
    reader, dis, prev = VideoReader(video), DenseFlow(quality), None
    writer = None
    for frame in reader:
        if writer is None:
            writer = VideoWriter(out, reader.fps, frame.shape[:2]).__enter__()
        gray = to_gray(frame)
        if prev is not None:
            dis.flow(gray, prev)
        prev = gray
        writer.write(frame)
    writer.__exit__(None, None, None)
    return time.perf_counter() - t0


def engine(video: Path, edited: Path, quality: str, out: Path, max_frames: int | None = None):
    from ffprop.nodes.flow.engine import FlowSettings
    from ffprop.nodes.flow.stream import propagate_file
    from ffprop.nodes.video.io import read_image

    return propagate_file(video, read_image(edited), out, settings=FlowSettings(quality=quality),
                          max_frames=max_frames, keep_audio=False)


def looped(video: Path, frames: int, out: Path) -> Path:
    """A clip of `frames` frames: `video` played forward, back, forward... (same footage, any length)."""
    from ffprop.nodes.video.io import VideoReader, VideoWriter

    src = list(VideoReader(video))
    order = src + src[-2:0:-1]
    with VideoWriter(out, 25.0, src[0].shape[:2]) as w:
        for i in range(frames):
            w.write(order[i % len(order)])
    return out


def child(args) -> int:
    """--child: run the engine once, print peak RSS (MiB) and the output's sha256."""
    out = Path(args.child_out)
    res = engine(Path(args.child), Path(args.edited), args.quality, out, args.frames)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rss:.1f} {hashlib.sha256(out.read_bytes()).hexdigest()} {res.frames}")
    return 0


def run_child(video: Path, edited: Path, quality: str, frames: int, out: Path) -> tuple[float, str, int]:
    cmd = [sys.executable, __file__, "--child", str(video), "--edited", str(edited), "--quality", quality,
           "--frames", str(frames), "--child-out", str(out)]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rss, digest, n = line.split()
    return float(rss), digest, int(n)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default="017")
    ap.add_argument("--quality", default="medium")
    ap.add_argument("--long", type=int, default=200)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of floor and engine")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS and two-process part")
    ap.add_argument("--edited")
    ap.add_argument("--child")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        return child(args)
    video, edited = clip_paths(args.clip)
    if not video.is_file():
        print(f"skipped: {video} not found (../shared/data is not in this checkout)")
        return 0
    load_all()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls, cpus = {"floor": [], "engine": []}, {"floor": [], "engine": []}
        for _ in range(max(1, args.repeat)):
            c0 = cpu_seconds()
            walls["floor"].append(floor(video, args.quality, tmp / "floor.mp4"))
            c1 = cpu_seconds()
            t0 = time.perf_counter()
            res = engine(video, edited, args.quality, tmp / "engine.mp4")
            walls["engine"].append(time.perf_counter() - t0)
            cpus["floor"].append(c1 - c0)
            cpus["engine"].append(cpu_seconds() - c1)
        e, f = min(walls["engine"]), min(walls["floor"])
        ce, cf = min(cpus["engine"]), min(cpus["floor"])
        here = hashlib.sha256((tmp / "engine.mp4").read_bytes()).hexdigest()
        best = f"best of {len(walls['engine'])}; " if len(walls["engine"]) > 1 else ""
        print(f"clip loraedit {args.clip}: {res.frames} frames, preset {args.quality}; {best}load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times are only meaningful when idle)")
        print(f"engine (decode -> engine -> encode) {e:.2f} s ({res.frames / e:.1f} fps); floor (decode + "
              f"encode + 1 DIS per frame) {f:.2f} s; engine / floor {e / f:.2f}")
        print(f"CPU seconds (all threads): engine {ce:.2f}, floor {cf:.2f}; ratio {ce / cf:.2f}")
        if args.no_memory:
            print(f"output sha256 {here[:16]}")
            return 0
        long = looped(video, args.long, tmp / "long.mp4")
        rss_short, d1, n1 = run_child(long, edited, args.quality, 49, tmp / "a.mp4")
        rss_long, _, n2 = run_child(long, edited, args.quality, args.long, tmp / "b.mp4")
        _, d2, _ = run_child(long, edited, args.quality, 49, tmp / "c.mp4")
        _, d3, _ = run_child(video, edited, args.quality, res.frames, tmp / "d.mp4")
        print(f"peak RSS: {rss_short:.0f} MiB at {n1} frames, {rss_long:.0f} MiB at {n2} frames: ratio "
              f"{rss_long / rss_short:.3f}")
        print(f"two processes, same input: output bytes {'identical' if d1 == d2 else 'DIFFER'} ({d1[:16]}); "
              f"a process and this one: {'identical' if d3 == here else 'DIFFER'} ({here[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
