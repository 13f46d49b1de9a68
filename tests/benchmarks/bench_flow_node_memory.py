"""Peak memory of the FFPFlowPropagate node against clip length, inside ComfyUI (not a pytest file).

    COMFYUI_DIR=/work/comfy028 OMP_NUM_THREADS=1 /work/comfy028-venv/bin/python \
        tests/benchmarks/bench_flow_node_memory.py [--clip 017] [--quality medium] [--frames 49 200]

For each length, a fresh process: loraedit <clip> played forward and back to that many frames (bench_flow.py's
`looped`), run through the node twice over: (a) `image`: the clip already in memory as an IMAGE-backed VIDEO
(what an upstream node hands over), the process's peak RSS counter reset just before the node runs, so `added`
is what the node itself allocates beyond its input; (b) `file`: a VideoFromFile (Load Video), so the node
includes ComfyUI's own decode to float32. The node's floor is its outputs: IMAGE [T, H, W, 3] and MASK [T, H, W]
float32 (16 bytes per pixel per frame), printed as `outputs`. Needs ../shared/data."""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(video: Path, edited: Path, quality: str, source: str) -> None:
    from comfy_support import import_comfy

    import_comfy()
    from ffprop.nodes._comfy import InputImpl, pack_video
    from ffprop.nodes.flow.node import FFPFlowPropagate
    from ffprop.nodes.video.io import read_image, read_video

    edit = read_image(edited)[None]
    if source == "image":
        frames, fps = read_video(video)[:2]
        clip = pack_video(frames, fps)
        t_len, h, w = frames.shape[:3]
        del frames
    else:
        clip = InputImpl.VideoFromFile(str(video))
    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")                        # reset VmHWM to the current RSS
    out = FFPFlowPropagate.execute(clip, edit, mode="auto", size_policy="auto", flow_quality=quality,
                                   mask_threshold=0.08, mask_grow=4, feather=3, match_tolerance=0.06)
    peak = _status("VmHWM")
    t_len, h, w = out.result[1].shape[:3]
    print(f"RESULT {t_len} {h} {w} {base:.1f} {peak:.1f}")


def main() -> int:
    from bench_flow import clip_paths, looped

    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default="017")
    ap.add_argument("--quality", default="medium")
    ap.add_argument("--frames", type=int, nargs="+", default=[49, 200])
    ap.add_argument("--child", nargs=4, metavar=("VIDEO", "EDITED", "QUALITY", "SOURCE"))
    args = ap.parse_args()
    if args.child:
        video, edited, quality, source = args.child
        child(Path(video), Path(edited), quality, source)
        return 0
    video, edited = clip_paths(args.clip)
    if not video.is_file():
        print(f"skipped: {video} not found (../shared/data is not in this checkout)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        long = looped(video, max(args.frames), Path(tmp) / "long.mp4")
        rows = {}
        for n in args.frames:
            clip = looped(long, n, Path(tmp) / f"clip{n}.mp4") if n != max(args.frames) else long
            for source in ("image", "file"):
                cmd = [sys.executable, __file__, "--child", str(clip), str(edited), args.quality, source]
                res = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
                if res.returncode or not line:
                    print(res.stdout[-2000:], res.stderr[-4000:])
                    return 1
                t_len, h, w, base, peak = line[-1].split()[1:]
                t_len, h, w, base, peak = int(t_len), int(h), int(w), float(base), float(peak)
                outputs = t_len * h * w * 16 / 2**20
                rows[n, source] = peak
                print(f"{source:5s} {t_len:4d} frames {w}x{h}: before the node {base:7.0f} MiB, peak {peak:7.0f} "
                      f"MiB, added {peak - base:7.0f} MiB, outputs (IMAGE + MASK float32) {outputs:6.0f} MiB, "
                      f"input IMAGE {t_len * h * w * 12 / 2**20:6.0f} MiB")
        a, b = min(args.frames), max(args.frames)
        for source in ("image", "file"):
            print(f"{source}: peak RSS {b} vs {a} frames: {rows[b, source] / rows[a, source]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
