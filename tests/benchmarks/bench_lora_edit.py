"""LoRA-Edit trainer: peak memory and seconds per step for each memory preset, printed from one run.

    python tests/benchmarks/bench_lora_edit.py            # CUDA: Wan2.1-I2V-14B shape, random bf16, 49 f 832x480
                                                          # CPU:  a scaled shape (says so), fp32
    python tests/benchmarks/bench_lora_edit.py --presets 24GB,8GB --steps 3

Each preset runs in a fresh subprocess (weights built there, random values, the diffusers WanTransformer3DModel
with the 14B config: 40 blocks, 40 heads x 128, ffn 13824, text 4096, CLIP 1280). Inputs are random latents in
place of VAE outputs (the VAE is not part of the step). CUDA: peak = torch.cuda.max_memory_allocated over the
timed steps (after the first, warm-up step); the frozen blocks a preset swaps start in pinned CPU memory,
everything else on the GPU. CPU: peak = growth of the process's peak RSS during the steps (block swap is a
no-op on CPU, so only checkpointing and windows change it) and s/step is process CPU seconds per step (all
threads), steadier than wall time on a shared machine. The reference for the 24 GB goal is `ckpt`
(gradient checkpointing, nothing swapped): without checkpointing a 49-frame 14B step does not fit 139 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FULL = dict(layers=40, heads=40, head_dim=128, ffn=13824, frames=49, height=480, width=832)
SCALED = dict(layers=4, heads=2, head_dim=64, ffn=512, frames=17, height=128, width=128)


def build(shape: dict, device, dtype):
    import torch
    from diffusers import WanTransformer3DModel
    from ffprop.nodes.host.diffusers import DiffusersWan

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=shape["heads"], attention_head_dim=shape["head_dim"],
               in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=shape["ffn"],
               num_layers=shape["layers"], image_dim=1280, added_kv_proj_dim=shape["heads"] * shape["head_dim"],
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    # rope tables are buffers computed at init on meta: rebuild them on the CPU
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = model.rope
    model.rope = WanRotaryPosEmbed(shape["head_dim"], rope.patch_size, rope.max_seq_len)
    return DiffusersWan(model.eval()), model


def place(model, swapped: int, device) -> None:
    """Everything on `device` except the first `swapped` blocks (those stay on the CPU; the runner pins them)."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for i, block in enumerate(model.blocks):
        if i >= swapped:
            block.to(device)
    for _, p in model.named_parameters(recurse=False):
        p.data = p.data.to(device)
    for _, b in model.named_buffers(recurse=False):
        b.data = b.data.to(device)


def run_one(preset_name: str, shape: dict, steps: int) -> dict:
    import torch
    from ffprop.nodes.host.protocol import WanCond
    from ffprop.nodes.lora_edit.lowvram import MemorySettings, preset
    from ffprop.nodes.lora_edit.trainer import TrainSample, TrainSettings, train_lora_edit

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mem = MemorySettings(gradient_checkpointing=True) if preset_name == "ckpt" else preset(preset_name)
    mem = replace(mem, compute_dtype="bf16" if cuda else "fp32")
    dit, model = build(shape, device, dtype)
    swapped = mem.blocks_to_swap(shape["layers"])
    place(model, swapped, device)
    frames = mem.window_frames if 0 < mem.window_frames < shape["frames"] else shape["frames"]
    f, h, w = (frames - 1) // 4 + 1, shape["height"] // 8, shape["width"] // 8
    g = torch.Generator().manual_seed(1)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    keep = torch.ones(1, 4, f, h, w)
    keep[:, :, 1:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0
    cond = WanCond(keep.to(device, dtype), rnd(1, 16, f, h, w), rnd(1, 512, 4096), rnd(1, 257, 1280))
    sample = TrainSample(rnd(1, 16, f, h, w), cond)
    stamps: list[float] = []
    peak = {"rss0": 0.0, "cuda": 0}

    def on_step(i, n, loss):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter() if cuda else time.process_time())  # CPU: CPU seconds (shared machine)
        if i == 1:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            peak["rss0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter() if cuda else time.process_time()
    status = "ok"
    try:
        train_lora_edit(dit, [sample], TrainSettings(steps=steps + 1, rank=16, learning_rate=1e-4), memory=mem,
                        on_step=on_step, device=device)
    except RuntimeError as e:
        status = "OOM" if "out of GPU memory" in str(e) or "out of memory" in str(e).lower() else f"error: {e}"
    deltas = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    per_step = deltas[len(deltas) // 2] if deltas else float("nan")  # median: the CPU is shared and noisy
    out = {"preset": preset_name, "status": status, "s_per_step": per_step, "frames_per_step": frames,
           "tokens": f * (h // 2) * (w // 2), "blocks_swapped": swapped, "checkpointing": mem.gradient_checkpointing,
           "first_step_s": (stamps[0] - t0) if stamps else float("nan")}
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak["rss0"]
        out["device"] = f"CPU ({os.cpu_count()} cores)"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="ckpt,24GB,16GB,12GB,8GB")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per preset (after one warm-up step)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    shape = FULL if torch.cuda.is_available() else SCALED
    if args.one:
        print(json.dumps(run_one(args.one, shape, args.steps)))
        return
    if shape is SCALED:
        print(f"no CUDA: running a SCALED shape on the CPU, not Wan-14B: {SCALED}")
    else:
        print(f"Wan2.1-I2V-14B shape, random bf16 weights: {FULL}")
    rows = []
    for name in args.presets.split(","):
        env = {**os.environ, "PYTHONPATH": str(REPO.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)], env=env,
                           capture_output=True, text=True)
        line = (p.stdout.strip().splitlines() or [""])[-1]
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append({"preset": name, "status": f"failed: {p.stderr.strip()[-400:]}"})
    ref = next((r for r in rows if r["preset"] == "ckpt" and r.get("status") == "ok"), None)
    print(f"{'preset':<10}{'status':<8}{'frames':>7}{'tokens':>8}{'swapped':>8}{'peak MB':>10}{'s/step':>9}{'vs ckpt':>9}")
    for r in rows:
        if "s_per_step" not in r:
            print(f"{r['preset']:<10}{r['status']}")
            continue
        ratio = r["s_per_step"] / ref["s_per_step"] if ref else float("nan")
        print(f"{r['preset']:<10}{r['status']:<8}{r['frames_per_step']:>7}{r['tokens']:>8}{r['blocks_swapped']:>8}"
              f"{r['peak_mb']:>10.0f}{r['s_per_step']:>9.3f}{ratio:>9.2f}")
    print(f"device: {rows[0].get('device', '?')}; windows presets train on shorter windows per step (frames column)")


if __name__ == "__main__":
    main()
