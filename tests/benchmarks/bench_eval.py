"""Evaluate: time and peak memory vs clip length, streamed (now) against the whole-clip float64 code (before).

Material: loraedit first_comp 001_e1 at 832x480: the source clip, LoRA-Edit's published output and the edited
frame; the edit mask derived from frame 1 (threshold 0.08), one per frame. 49 frames as they are; longer
clips are the same 49 frames played back and forth (source, output and masks alike), so every length is real
footage at the same resolution. One subprocess per run. Each run builds its inputs, then resets the peak-RSS
mark (/proc/self/clear_refs) and calls evaluate(): "added peak" = peak RSS during the call minus RSS before
it, i.e. what evaluation holds on top of its inputs (the inputs, T*H*W*(3+3+1)*4 bytes, are the caller's:
the host's IMAGE/MASK tensors in ComfyUI). CPU s = user+sys of the call (steadier than wall time on a busy
machine). A first call with a warm source cache is timed too ("again": a second output of the same source).

Run: python tests/benchmarks/bench_eval.py [--frames 49 200] [--before 57bf02d] [--before-frames 49]
  --before REV: also run nodes/video/metrics.py of git revision REV (the code before streaming; needs git
  history); "--before ''" skips it. The before code at 200 frames needs about 10 GB: opt in with
  --before-frames 49 200. Needs ../shared/data (FFP_SHARED_DATA).
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
COMP = DATA / "loraedit_page" / "first_comp"


def rss_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def back_and_forth(clip, frames: int):
    """[T, ...] -> [frames, ...]: the clip played forward, backward, forward ... (no frame repeated at turns)."""
    import torch

    t = clip.shape[0]
    period = 2 * (t - 1)
    idx = [i % period for i in range(frames)]
    return clip[torch.tensor([i if i < t else period - i for i in idx])]


def load_before(rev: str):
    """nodes/video/metrics.py at git revision rev, imported inside ffprop.nodes.video (its relative imports)."""
    import importlib.util
    import tempfile

    import ffprop.nodes.video

    code = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:nodes/video/metrics.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "metrics_before.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(f"{ffprop.nodes.video.__name__}._metrics_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(impl: str, frames: int, rev: str) -> dict:
    from ffprop.nodes.flow.engine import derive_edit_mask
    from ffprop.nodes.video.io import read_image, read_video

    evaluate = load_before(rev).evaluate if impl == "before" else __import__(
        "ffprop.nodes.evaluate.metrics", fromlist=["evaluate"]).evaluate
    source, _ = read_video(COMP / "input" / "001_e1.mp4")
    output, _ = read_video(COMP / "ours" / "001_e1.mp4")
    edited = read_image(COMP / "input" / "001_e1.png")
    masks = derive_edit_mask(source[0], edited, 0.08)[None].expand(source.shape[:3])
    source, output, masks = (back_and_forth(x, frames).contiguous() for x in (source, output, masks))
    inputs_mb = sum(x.numel() * x.element_size() for x in (source, output, masks)) / 2**20
    runs = {}
    for name, out in [("first", output), ("again", output.flip(0).contiguous())]:
        if name == "again" and impl == "before":
            break
        Path("/proc/self/clear_refs").write_text("5")            # reset the peak-RSS mark (VmHWM)
        before_kb, cpu0, wall0 = rss_kb("VmRSS"), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        report = evaluate(source, out, edited, masks, margin=4)
        wall, cpu1 = time.perf_counter() - wall0, resource.getrusage(resource.RUSAGE_SELF)
        runs[name] = {"wall_s": wall, "cpu_s": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime,
                      "added_peak_mb": (rss_kb("VmHWM") - before_kb) / 1024,
                      "peak_mb": rss_kb("VmHWM") / 1024}
        del report
    return {"impl": impl, "frames": frames, "inputs_mb": inputs_mb, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[49, 200])
    ap.add_argument("--before", default="57bf02d", help="git revision of the whole-clip code ('' = skip)")
    ap.add_argument("--before-frames", type=int, nargs="+", default=[49])
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "FRAMES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.before)))
        return
    if not (COMP / "ours" / "001_e1.mp4").is_file():
        sys.exit(f"needs {COMP} (set FFP_SHARED_DATA)")
    jobs = [("after", f) for f in args.frames] + [("before", f) for f in (args.before_frames if args.before else [])]
    results = []
    for impl, frames in jobs:
        proc = subprocess.run([sys.executable, __file__, "--worker", impl, str(frames), "--before", args.before],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{impl} {frames} frames failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"evaluate() on loraedit first_comp 001_e1, 832x480 (cores: {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"{'code':<8}{'frames':>7}{'call':>7}{'wall s':>9}{'CPU s':>8}{'added peak MB':>15}{'peak RSS MB':>13}"
          f"{'inputs MB':>11}")
    for r in results:
        for name, run in r["runs"].items():
            print(f"{r['impl']:<8}{r['frames']:>7}{name:>7}{run['wall_s']:>9.1f}{run['cpu_s']:>8.1f}"
                  f"{run['added_peak_mb']:>15.0f}{run['peak_mb']:>13.0f}{r['inputs_mb']:>11.0f}")
    by = {(r["impl"], r["frames"]): r["runs"]["first"] for r in results}
    for impl in ("after", "before"):
        sizes = sorted(f for i, f in by if i == impl)
        if len(sizes) >= 2:
            a, b = by[(impl, sizes[0])], by[(impl, sizes[-1])]
            print(f"{impl}: {sizes[-1]} vs {sizes[0]} frames ({sizes[-1] / sizes[0]:.2f}x): CPU time "
                  f"{b['cpu_s'] / a['cpu_s']:.2f}x, added peak memory {b['added_peak_mb'] / a['added_peak_mb']:.2f}x")
    for f in sorted({f for i, f in by if i == "before"} & {f for i, f in by if i == "after"}):
        a, b = by[("before", f)], by[("after", f)]
        print(f"{f} frames, before -> after: CPU {a['cpu_s']:.1f} -> {b['cpu_s']:.1f} s "
              f"({a['cpu_s'] / b['cpu_s']:.1f}x less), added peak {a['added_peak_mb']:.0f} -> "
              f"{b['added_peak_mb']:.0f} MB ({a['added_peak_mb'] / b['added_peak_mb']:.1f}x less)")


if __name__ == "__main__":
    main()
