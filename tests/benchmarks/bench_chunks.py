"""Chunk chainer benchmarks, printed from one run (not collected by pytest).

    python tests/benchmarks/bench_chunks.py memory   # tiny diffusers Wan on CPU: peak memory 4 chunks vs 1, time vs chunks
    python tests/benchmarks/bench_chunks.py flow     # flow engine chunked vs unchunked on ../shared/data/sam2_bedroom

memory: each chunk count runs in a fresh subprocess; after a one-chunk warm-up the kernel's peak-RSS counter is reset
(/proc/self/clear_refs), and peak = VmHWM during the chain minus the RSS right before it (model, VAE and inputs
already built), so it counts what the chain itself adds; glibc is told to return large blocks to the OS
(MALLOC_MMAP_THRESHOLD_) so RSS follows live memory. The
output buffer grows with the clip by design (it is the result, assembled on the CPU): it is reported separately.
flow: the edit is derived by recolouring a region of frame 1 (the peach cushion on the bed: red and blue swapped
inside an ellipse); chunk plan 81 frames, overlap 1 (3 chunks over 200 frames) vs one run over all 200 frames.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "core"))

SIZE, CHUNK, STEPS = 128, 17, 4


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(chunks: int) -> dict:
    """One chain of `chunks` chunks of CHUNK frames at SIZE x SIZE, in this process."""
    import torch
    from ffprop.nodes.chunks.chain import chain_chunks, wan_generator
    from ffprop.nodes.chunks.drift import DriftSettings
    from ffprop.nodes.chunks.plan import plan_chunks
    from ffprop.nodes.host.diffusers import DiffusersWan
    from test_chunks_wan import TinyVAE

    torch.set_num_threads(2)
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    dit = DiffusersWan(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                             in_channels=36, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256,
                                             num_layers=4).eval())
    vae = TinyVAE()
    frames = chunks * (CHUNK - 1) + 1
    g = torch.Generator().manual_seed(1)
    source = torch.rand(frames, SIZE, SIZE, 3, generator=g)
    context = torch.randn(1, 16, 64, generator=g)
    plan = plan_chunks(frames, CHUNK, 1)
    assert len(plan) == chunks
    gen = wan_generator(dit, vae.encode, vae.decode, context, steps=STEPS, shift=3.0)
    # warm-up on one chunk so one-time allocations (thread pools, kernels) are outside the measurement
    chain_chunks(plan_chunks(CHUNK, CHUNK, 1), source[:CHUNK], source[0], gen)
    exact = reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    res = chain_chunks(plan, source, source[0], gen, drift=DriftSettings())
    elapsed = time.perf_counter() - t0
    peak = peak_mb()
    return {"chunks": chunks, "frames": frames, "seconds": elapsed, "peak_added_mb": peak - base, "hwm_reset": exact,
            "output_mb": res.video.numel() * 4 / 2**20, "seam_jumps": res.seam_jumps}


def bench_memory() -> None:
    rows = []
    for n in (1, 2, 4):
        # large blocks straight from/to the OS, so RSS follows live tensors instead of glibc's retained arenas
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run([sys.executable, __file__, "_one", str(n)], capture_output=True, text=True, check=True,
                             env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny diffusers Wan (4 layers, dim 128) + tiny Wan VAE, {SIZE}x{SIZE}, chunks of {CHUNK} frames, "
          f"{STEPS} steps, CPU")
    for r in rows:
        print(f"  {r['chunks']} chunk(s), {r['frames']:3d} frames: {r['seconds']:6.2f} s "
              f"({r['seconds'] / r['chunks']:.2f} s/chunk), peak added {r['peak_added_mb']:7.1f} MB "
              f"(output buffer {r['output_mb']:.1f} MB)")
    if not all(r["hwm_reset"] for r in rows):
        print("note: could not reset the peak-RSS counter; peaks include the one-chunk warm-up")
    one, four = rows[0], rows[-1]
    ratio = four["peak_added_mb"] / max(one["peak_added_mb"], 1e-6)
    ratio_ex = (four["peak_added_mb"] - four["output_mb"]) / max(one["peak_added_mb"] - one["output_mb"], 1e-6)
    print(f"peak memory 4 chunks / 1 chunk: {ratio:.3f} (goal <= 1.1); without the output buffer: {ratio_ex:.3f}")
    print(f"time 4 chunks / 1 chunk: {four['seconds'] / one['seconds']:.2f} (linear = 4.00)")


def bench_flow() -> None:
    import numpy as np
    from ffprop.nodes.chunks.chain import chain_chunks, flow_generator
    from ffprop.nodes.chunks.drift import NO_DRIFT_CONTROL, region_seam_jumps, seam_jumps
    from ffprop.nodes.chunks.plan import plan_chunks
    from ffprop.nodes.evaluate.metrics import frame_jumps
    from ffprop.nodes.flow.engine import FlowSettings, propagate_edit
    from ffprop.nodes.video.io import read_video

    data = Path(os.environ.get("FFP_SHARED_DATA", REPO.parent / "shared" / "data"))
    source, fps = read_video(data / "sam2_bedroom" / "bedroom.mp4")
    edited = recolour_cushion(source[0])
    settings = FlowSettings()
    plan = plan_chunks(source.shape[0], 81, 1)
    print(plan.summary())
    t0 = time.perf_counter()
    whole = propagate_edit(source, edited, None, settings)
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    chained = chain_chunks(plan, source, edited, flow_generator(settings), drift=NO_DRIFT_CONTROL)
    t_chain = time.perf_counter() - t0
    src_j = seam_jumps(source, plan.seams)
    whole_j = seam_jumps(whole.video, plan.seams)
    print(f"sam2_bedroom {tuple(source.shape)}: unchunked {t_whole:.1f} s, chunked {t_chain:.1f} s")
    print("seam jump (x median frame step) at seams", [s + 1 for s in plan.seams], "(1-based frame):")
    print(f"  source      {fmt(src_j)}\n  unchunked   {fmt(whole_j)}\n  chunked     {fmt(chained.seam_jumps)}")
    print("seam jump inside the edit region (x its median frame step):")
    print(f"  unchunked   {fmt(region_seam_jumps(whole.video, whole.mask, plan.seams))}\n"
          f"  chunked     {fmt(chained.region_seam_jumps)}")
    j = frame_jumps(chained.video.numpy())
    print(f"  chunked: max frame jump anywhere {j.max():.2f}, median 1.00 by definition")
    region_w = (whole.mask > 0.5).float().mean((1, 2))
    region_c = (chained.edit_mask > 0.5).float().mean((1, 2))
    for s in plan.seams:
        print(f"  edit region at seam {s + 1}: unchunked {region_w[s - 1]:.2%} -> {region_w[s]:.2%}, "
              f"chunked {region_c[s - 1]:.2%} -> {region_c[s]:.2%} of the frame")
    diff = (chained.video - whole.video).abs().mean((1, 2, 3)) * 255
    print(f"  |chunked - unchunked| mean per frame (0..255): chunk 1 {diff[:81].mean():.3f}, chunk 2 "
          f"{diff[81:161].mean():.3f}, chunk 3 {diff[161:].mean():.3f}; max {diff.max():.3f}")
    bg = (whole.mask < 0.01) & (chained.edit_mask < 0.01)
    same = float(((chained.video - source).abs().amax(-1)[bg] == 0).float().mean())
    print(f"  background (outside both edit regions) identical to the source: {same:.2%} of pixels")
    np.seterr(all="ignore")


def recolour_cushion(frame):
    """Frame 1 with the peach cushion (centre (605, 352), radii 72 x 60 px) recoloured: red and blue swapped."""
    import torch

    h, w = frame.shape[:2]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((xx - 605) / 72.0) ** 2 + ((yy - 352) / 60.0) ** 2 <= 1
    out = frame.clone()
    out[inside] = frame[inside][:, [2, 1, 0]]
    return out


def fmt(values) -> str:
    return "  ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "memory"
    if what == "_one":
        print(json.dumps(run_one(int(sys.argv[2]))))
    elif what == "flow":
        bench_flow()
    else:
        bench_memory()
