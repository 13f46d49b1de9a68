"""LoRA-Edit trainer: peak memory and seconds per step for each memory preset, printed from one run.

    python tests/benchmarks/bench_lora_edit.py            # CUDA: Wan2.1-I2V-14B shape, random bf16, 49 f 832x480
                                                          # CPU:  a scaled shape (says so), fp32
    python tests/benchmarks/bench_lora_edit.py --presets 24GB,8GB --steps 3
    python tests/benchmarks/bench_lora_edit.py --estimate --jobs 2  # no GPU: 14B shape, fake tensors: per preset
                                    # training + sampling VRAM and CPU RAM (pinned + pageable), fp8 base weights,
                                    # then the Wan 2.2 two-expert case (--chunks N for a long clip's switches)

Each preset runs in a fresh subprocess (weights built there, random values, the diffusers WanTransformer3DModel
with the 14B config: 40 blocks, 40 heads x 128, ffn 13824, text 4096, CLIP 1280). Inputs are random latents in
place of VAE outputs (the VAE is not part of the step). CUDA: peak = torch.cuda.max_memory_allocated over the
timed steps (after the first, warm-up step); block linears stored in fp8 as the CLI does (presets with
checkpointing); the frozen blocks a preset swaps start in CPU memory (pinned by the runner), everything else on
the GPU. CPU: peak = growth of the process's peak RSS during the steps (block swap is a
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


def _config(shape: dict) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=shape["heads"], attention_head_dim=shape["head_dim"],
                in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=shape["ffn"],
                num_layers=shape["layers"], image_dim=1280, added_kv_proj_dim=shape["heads"] * shape["head_dim"],
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def build(shape: dict, device, dtype):
    import torch
    from diffusers import WanTransformer3DModel
    from ffprop.nodes.host.diffusers import DiffusersWan

    with torch.device("meta"):
        model = WanTransformer3DModel(**_config(shape))
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


def run_one(preset_name: str, shape: dict, steps: int) -> dict:
    import torch
    from ffprop.nodes.host.protocol import WanCond
    from ffprop.nodes.lora_edit.trainer import TrainSample, TrainSettings, train_lora_edit

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mem = _estimate_settings(preset_name)   # a preset or 'ckpt', with the same ':wN', ':sF', ':split'... modifiers
    mem = replace(mem, compute_dtype="bf16" if cuda else "fp32")
    from ffprop.nodes.host.diffusers import store_blocks_fp8
    from ffprop.nodes.lora_edit.lowvram import place_for_swap

    dit, model = build(shape, device, dtype)
    if cuda and mem.gradient_checkpointing:
        store_blocks_fp8(model)            # as the CLI stores the base weights on CUDA
    swapped = mem.blocks_to_swap(shape["layers"])
    place_for_swap(model, dit.blocks(), swapped, device)   # the swapped blocks stay on the CPU (the runner pins them)
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


ESTIMATE_PRESETS = "24GB,16GB,12GB,8GB"
GB = 1e9
CUDA_CONTEXT_GB = 0.5   # the CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated, typical, not measured


def _estimate_settings(name: str):
    """A preset name or 'ckpt' (checkpointing only), then optional ':wN' (N-frame windows, 0 = none), ':sF'
    (swap fraction F), ':off' (activation offload on) / ':nooff' (off), ':split' / ':nosplit' (sub-block
    checkpointing on / off)."""
    from ffprop.nodes.lora_edit.lowvram import MemorySettings, preset

    base, *mods = name.split(":")
    mem = MemorySettings(gradient_checkpointing=True) if base == "ckpt" else preset(base)
    for m in mods:
        if m.startswith("w"):
            mem = replace(mem, window_frames=int(m[1:]))
        elif m in ("split", "nosplit"):
            mem = replace(mem, split_blocks=m == "split")
        elif m.startswith("s"):
            mem = replace(mem, swap_fraction=float(m[1:]))
        elif m in ("off", "nooff"):
            mem = replace(mem, offload_activations=m == "off")
        else:
            raise ValueError(f"unknown estimate modifier ':{m}' in '{name}'")
    return mem


def attention_scratch_gb(tokens: int, dim: int) -> float:
    """FlashAttention-2's backward accumulates dq in fp32 ([S, heads x head_dim]); the meta kernel does not
    allocate it, so it is added to the fake-tensor peak (it lives during one attention backward)."""
    return tokens * dim * 4 / GB


class PeakBytes:
    """Live bytes per device, counted per storage through the dispatcher (a TorchDispatchMode): each op's output
    storages are added when first seen and removed when the storage is freed (weakref.finalize). Lighter than
    torch.distributed._tools MemTracker, whose per-module bookkeeping grows with the number of modules."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen: set[int] = set()
                self.now: dict = {}
                self.peak: dict = {}

            def track(self, t) -> None:
                import weakref

                st = t.untyped_storage()
                key = id(st)
                if key in self.seen:
                    return
                self.seen.add(key)
                dev, n = t.device, st.nbytes()
                self.now[dev] = self.now.get(dev, 0) + n
                self.peak[dev] = max(self.peak.get(dev, 0), self.now[dev])
                weakref.finalize(st, self._free, key, dev, n)

            def _free(self, key, dev, n) -> None:
                self.seen.discard(key)
                self.now[dev] -= n

            def reset_peak(self) -> None:
                self.peak = dict(self.now)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                from torch.utils._pytree import tree_leaves

                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        self.track(t)
                return out

        return Mode()


def estimate_one(preset_name: str, shape: dict, steps: int = 2) -> dict:
    """Peak memory of `steps` training steps, then of `SAMPLE_STEPS` sampling steps (CFG: two model calls each),
    with fake tensors (no data, no allocation): the compute device is the `meta` device, the host is the CPU.
    PeakBytes counts live storages per device through the dispatcher, so this is the memory the tensors of this
    code path need, as CUDA would see it through max_memory_allocated, without the CUDA context, allocator
    rounding/fragmentation and kernel workspaces. The base weights are stored as the CLI stores them: block
    linears in fp8 (float8_e4m3fn) for presets with checkpointing (':bf16' keeps bf16), fp32-kept modules in
    fp32, the rest bf16; the BlockRunner casts each block's fp8 weights to bf16 as it runs (counted)."""
    import torch
    from ffprop.nodes.host.diffusers import store_blocks_fp8
    from ffprop.nodes.host.protocol import WanCond
    from ffprop.nodes.lora_edit.lora import LoRA, LoRALayer, attach_hooks, target_paths
    from ffprop.nodes.lora_edit.lowvram import BlockRunner, HostSlabs
    from ffprop.nodes.lora_edit.trainer import TrainSample
    from torch._subclasses.fake_tensor import FakeTensorMode

    name = preset_name.replace("+lora-fp32", "")
    bf16_base = name.endswith(":bf16")
    mem = _estimate_settings(name.removesuffix(":bf16"))
    fp8 = mem.gradient_checkpointing and not bf16_base
    dev, dtype = torch.device("meta"), torch.bfloat16
    if preset_name.endswith("+lora-fp32"):
        # the pre-change LoRA compute: each LoRA input cast to fp32 (an fp32 copy of every targeted linear's input
        # saved for backward); the shipped default computes the delta in the activations' dtype
        LoRALayer.upcast = True
    frames = mem.window_frames if 0 < mem.window_frames < shape["frames"] else shape["frames"]
    f, h, w = (frames - 1) // 4 + 1, shape["height"] // 8, shape["width"] // 8
    layers = shape["layers"]
    swapped = mem.blocks_to_swap(layers)
    import ffprop.nodes.host.diffusers as host

    # the host's range check on t reads a value, which fake tensors do not have
    host.timesteps = lambda t, b, device: torch.full((b,), float(t) * 1000.0, device=device)

    # SDPA on the meta device falls back to the math path (a [heads, S, S] score matrix: 33 GB at 20,280 tokens);
    # CUDA runs a flash kernel for bf16. Route SDPA to the flash-attention op that has a meta kernel: it saves
    # the same things as CUDA flash attention (output + fp32 logsumexp), O(S) memory.
    def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            raise NotImplementedError("the estimate models unmasked attention only")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = flash_sdpa
    with FakeTensorMode(allow_non_fake_inputs=True):
        from diffusers import WanTransformer3DModel
        from ffprop.nodes.host.diffusers import DiffusersWan

        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with dev:
                model = WanTransformer3DModel(**_config(shape)).eval()   # fake tensors: nothing allocated
        finally:
            torch.set_default_dtype(default)
        keep = model._keep_in_fp32_modules
        for pname, p in model.named_parameters():
            if any(k in pname for k in keep):
                p.data = p.data.float()
        if fp8:
            store_blocks_fp8(model)
        dit = DiffusersWan(model)
        keep = torch.ones(1, 4, f, h, w, device=dev, dtype=dtype)
        cond = WanCond(keep, torch.empty(1, 16, f, h, w, device=dev, dtype=dtype),
                       torch.empty(1, 512, 4096, device=dev, dtype=dtype),
                       torch.empty(1, 257, 1280, device=dev, dtype=dtype))
        sample = TrainSample(torch.empty(1, 16, f, h, w, device=dev, dtype=dtype), cond)
        model.requires_grad_(False)
        layers_ = {}   # create_lora's LoRA (rank 16, fp32), built on the device directly (fake params cannot .to())
        for path, host_path in target_paths(dit, "all_linears").items():
            out_f, in_f = model.get_submodule(host_path).weight.shape
            layers_[path] = LoRALayer(torch.empty(16, in_f, device=dev), torch.zeros(out_f, 16, device=dev), 16)
        lora = LoRA(layers_)
        lora.requires_grad_(True)
        params = list(lora.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01)
        detach = attach_hooks(dit, lora)
        # Fake parameters cannot change device through `.data =` (the runner's swap), so the runner swaps
        # nothing here (it does cast the fp8 blocks up, on the device, one or two at a time) and the swapped
        # blocks' stored weights are subtracted below and counted in CPU RAM.
        runner = BlockRunner(dit.blocks(), dev, mem.gradient_checkpointing, 0,
                             offload_activations=mem.offload_activations, split_blocks=mem.split_blocks)
        tracker = PeakBytes()
        for t in [*model.parameters(), *model.buffers(), *params, sample.target, *vars(cond).values()]:
            if isinstance(t, torch.Tensor):
                tracker.track(t)
        with torch.enable_grad(), runner, tracker:
            for i in range(steps):
                # trainer.flow_loss with t = 0.5 as a Python float (a fake t cannot be range-checked)
                noise = torch.empty_like(sample.target)
                v = dit.predict(0.5 * sample.target + 0.5 * noise, 0.5, sample.cond)
                loss = torch.nn.functional.mse_loss(v.float(), (noise - sample.target).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                del v, loss, noise
                if i == 0:
                    tracker.reset_peak()
            acts_host = runner.acts.slabs.reserved if runner.acts else 0   # (released again by remove())
        packed = runner.acts.packed if runner.acts else 0
        del opt
        for prm in params:
            prm.grad = None
        # sampling (pipeline.sample_low_vram): the full clip (windows are a training setting), no gradients,
        # an inference BlockRunner, the trained LoRA attached; Euler steps with CFG as host.sampling.sample does
        fs = (shape["frames"] - 1) // 4 + 1
        scond = WanCond(torch.ones(1, 4, fs, h, w, device=dev, dtype=dtype),
                        torch.empty(1, 16, fs, h, w, device=dev, dtype=dtype), cond.context, cond.clip_tokens)
        neg = WanCond(scond.keep_mask, scond.cond_latent, torch.empty_like(cond.context), cond.clip_tokens)
        srunner = BlockRunner(dit.blocks(), dev, False, 0, inference=True)
        stracker = PeakBytes()
        x = torch.empty(1, 16, fs, h, w, device=dev, dtype=torch.float32)
        for t in [*model.parameters(), *model.buffers(), *params, x, *vars(scond).values(), neg.context]:
            if isinstance(t, torch.Tensor):
                stracker.track(t)
        with torch.no_grad(), srunner, stracker:
            for _ in range(SAMPLE_STEPS):
                v = dit.predict(x, 0.5, scond).float()
                v_neg = dit.predict(x, 0.5, neg).float()
                v = v_neg + 5.0 * (v - v_neg)
                x = x + (-0.1) * v
                del v, v_neg
        detach()

    def on_device(tr):
        return sum(n for d, n in tr.peak.items() if d.type == "meta")

    block_tensors = [*model.blocks[0].parameters(), *model.blocks[0].buffers()]
    block_bytes = sum(t.numel() * t.element_size() for t in block_tensors)
    away = swapped * block_bytes                      # the swapped blocks' stored (fp8) copies live on the CPU
    pinned_blocks = HostSlabs.footprint([t.numel() * t.element_size() for t in block_tensors] * swapped)
    pow2 = swapped * sum(1 << max(0, (t.numel() * t.element_size() - 1).bit_length()) for t in block_tensors)
    frames_bytes = shape["frames"] * shape["height"] * shape["width"] * 4
    pageable = 3 * frames_bytes + shape["frames"] * shape["height"] * shape["width"] * 4   # clip, cond, out, mask
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"preset": preset_name, "frames": frames, "tokens": f * (h // 2) * (w // 2), "swapped": swapped,
            "offload": mem.offload_activations, "split": mem.split_blocks, "fp8": fp8,
            "checkpointing": mem.gradient_checkpointing,
            "device_peak_gb": (on_device(tracker) - away) / GB, "measured_all_on_device_gb": on_device(tracker) / GB,
            "sample_device_peak_gb": (on_device(stracker) - away) / GB,
            "sample_tokens": fs * (h // 2) * (w // 2),
            "block_gb": block_bytes / GB, "pinned_blocks_gb": pinned_blocks / GB,
            "pinned_blocks_pow2_gb": pow2 / GB, "pinned_acts_gb": acts_host / GB, "pageable_gb": pageable / GB,
            "weights_gb": weights / GB, "lora_params": sum(p.numel() for p in params), "acts_packed": packed}


SAMPLE_STEPS = 2   # the peak of one sampling step repeats every step (no state grows)


DEFAULT_PRESETS = "ckpt,24GB,16GB,12GB,8GB"


def _subprocess(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    line = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {"status": f"failed: {p.stderr.strip()[-400:]}"}


CPU_RAM_GB = 24 * 2**30 / GB   # the CPU RAM goal: 24 GiB


def estimate_table(presets: str, jobs: int = 1) -> list[dict]:
    print("LoRA-Edit memory per preset for a Wan2.1-I2V-14B-shaped model, "
          f"{FULL['frames']} frames at {FULL['width']}x{FULL['height']}: the training step (rank 16, all_linears, "
          "AdamW; 2 steps, peak of the 2nd) and the sampling pass (CFG: 2 model calls per step, LoRA attached).\n"
          "Fake tensors (FakeTensorMode + a dispatcher storage tracker): the shipped code path (BlockRunner "
          "checkpointing, activation offload, fp8 -> bf16 upcast per block, LoRA hooks, diffusers "
          "WanTransformer3DModel), nothing allocated. Base weights as the CLI stores them: block linears fp8 "
          "(presets with checkpointing), the rest bf16/fp32. SDPA is routed to a flash-attention kernel (O(S) "
          "memory, like CUDA bf16). Block swap is applied by moving the swapped blocks' stored bytes from the "
          "device column to CPU RAM (fake parameters cannot change device).")
    from concurrent.futures import ThreadPoolExecutor

    names = presets.split(",")
    with ThreadPoolExecutor(jobs) as pool:        # each preset in its own subprocess
        rows = list(pool.map(lambda n: _subprocess(["--one", n, "--estimate"]), names))
    for name, r in zip(names, rows):
        r.setdefault("preset", name)
        print(f"  {name}: {r.get('status', 'ok')}", flush=True)
    dim = FULL["heads"] * FULL["head_dim"]
    print(f"\n{'preset':<22}{'frames':>7}{'swap':>5}{'fp8':>5}{'train VRAM':>11}{'sample VRAM':>12}"
          f"{'pinned blk':>11}{'pinned act':>11}{'pageable':>9}{'train RAM':>10}{'sample RAM':>11}")
    for r in rows:
        if "device_peak_gb" not in r:
            print(f"{r['preset']:<22}{r.get('status')}")
            continue
        r["vram_gb"] = r["device_peak_gb"] + attention_scratch_gb(r["tokens"], dim) + CUDA_CONTEXT_GB
        r["sample_vram_gb"] = r["sample_device_peak_gb"] + CUDA_CONTEXT_GB
        r["train_ram_gb"] = r["pinned_blocks_gb"] + r["pinned_acts_gb"] + r["pageable_gb"]
        r["sample_ram_gb"] = r["pinned_blocks_gb"] + r["pageable_gb"]
        print(f"{r['preset']:<22}{r['frames']:>7}{r['swapped']:>5}{'yes' if r['fp8'] else 'no':>5}"
              f"{r['vram_gb']:>11.2f}{r['sample_vram_gb']:>12.2f}{r['pinned_blocks_gb']:>11.2f}"
              f"{r['pinned_acts_gb']:>11.2f}{r['pageable_gb']:>9.2f}{r['train_ram_gb']:>10.2f}{r['sample_ram_gb']:>11.2f}")
    card = {"24GB": 24, "16GB": 16, "12GB": 12, "8GB": 8}
    for r in rows:
        gib = card.get(r["preset"].split(":")[0].split("+")[0])
        if gib and "vram_gb" in r:
            cap = gib * 2**30 / GB
            worst = max(r["vram_gb"], r["sample_vram_gb"])
            ram = max(r["train_ram_gb"], r["sample_ram_gb"])
            full = " (the full clip)" if r["frames"] == FULL["frames"] else ""
            print(f"{r['preset']}: {r['frames']} frames per training step{full}; VRAM train {r['vram_gb']:.2f} / "
                  f"sample {r['sample_vram_gb']:.2f} GB -> {'fits' if worst <= cap else 'does NOT fit'} a {gib} GiB "
                  f"card ({cap:.2f} GB), margin {(cap - worst) / cap:+.0%}; CPU RAM (tensors) {ram:.2f} GB -> "
                  f"{'fits' if ram <= CPU_RAM_GB else 'does NOT fit'} 24 GiB ({CPU_RAM_GB:.2f} GB), margin "
                  f"{(CPU_RAM_GB - ram) / CPU_RAM_GB:+.0%}")
    blk = next((r for r in rows if r.get("swapped")), None)
    if blk:
        print(f"(pinned blocks: {blk['swapped']} swapped blocks of {blk['block_gb'] * 1000:.0f} MB packed in 512 MiB "
              f"slabs = {blk['pinned_blocks_gb']:.2f} GB; one pinned allocation per tensor, as torch's pinned "
              f"allocator rounds them to powers of two, would take {blk['pinned_blocks_pow2_gb']:.2f} GB)")
    print("train/sample VRAM = peak of live tensors on the compute device (what torch.cuda.max_memory_allocated "
          "reports) + FlashAttention-2 backward fp32 dq scratch (training) + "
          f"{CUDA_CONTEXT_GB} GB CUDA context (typical, not measured). Not counted: caching-allocator rounding and "
          "fragmentation (often +5-15 %), cuBLAS/cuDNN workspaces, the VAE (encode before training, decode after "
          "sampling), other programs on the GPU. CPU RAM = pinned swapped blocks (fp8, 512 MiB slabs) + pinned "
          "offloaded activations (training; slabs, released before sampling) + pageable clip tensors (source, "
          "condition video, output, mask in fp32). Not counted: the Python/torch/CUDA process itself (typically "
          "1.5-3 GB RSS, not measured here), the VAE's CPU copy while loading, the page cache of the model files. "
          "Loading (streamed, fp8): the whole stored model is on the CPU once before the unswapped part moves to "
          f"the GPU: {rows[-1].get('weights_gb', float('nan')):.2f} GB.")
    return rows


PCIE_GBPS, DISK_GBPS = 25.0, 3.0
"""Assumed host -> GPU bandwidths for the two-expert switch times: pinned PCIe 4.0 x16 (about 25 GB/s in
practice) and an NVMe re-read of an fp8 expert file (about 3 GB/s); assumptions, not measured here."""


def two_expert_table(rows: list[dict], chunks: int = 4) -> None:
    """Wan 2.2 I2V A14B: two experts of the 14B shape, one resident at a time (the trainer trains the high-noise
    expert, unloads it, then trains the low-noise one; samplers switch at the boundary). Derived from the
    one-expert rows: each expert's training and sampling peaks are the one-model peaks (same architecture, never
    both on the device); what the pair adds is where the idle expert waits and the bytes moved at each switch."""
    print(f"\nWan 2.2 I2V A14B (two 14B experts, one resident at a time): per preset, the idle expert's residency and "
          f"the switch traffic. VRAM peaks = the rows above (each expert alone on the device). A switch moves the "
          f"incoming expert's device-resident part (stored model minus its swapped blocks) to the GPU: at "
          f"{PCIE_GBPS:g} GB/s from CPU RAM (pinned PCIe 4.0 x16), or at {DISK_GBPS:g} GB/s when it is re-read from an "
          f"NVMe disk because it does not fit CPU RAM (both bandwidths assumed). Switches: training 1 (high -> low), "
          f"one sampled clip 1, a {chunks}-chunk long clip {2 * chunks - 1} (each chunk: high -> low, then back).")
    print(f"{'preset':<10}{'expert GB':>10}{'resident':>10}{'idle in RAM':>12}{'RAM pair':>10}{'RAM fits':>9}"
          f"{'switch s RAM':>13}{'switch s disk':>14}{'train +s':>9}{'clip +s':>8}{f'{chunks} chunks +s':>13}")
    for r in rows:
        if "device_peak_gb" not in r or r["preset"] == "ckpt" or ":" in r["preset"] or "+" in r["preset"]:
            continue
        resident = r["weights_gb"] - r["swapped"] * r["block_gb"]
        ram = max(r["train_ram_gb"], r["sample_ram_gb"])
        pair_ram = ram + r["weights_gb"]                   # the idle expert's whole stored (fp8) model in CPU RAM
        fits = pair_ram <= CPU_RAM_GB
        rate = PCIE_GBPS if fits else DISK_GBPS
        switch = resident / PCIE_GBPS if fits else r["weights_gb"] / DISK_GBPS
        print(f"{r['preset']:<10}{r['weights_gb']:>10.2f}{resident:>10.2f}{r['weights_gb']:>12.2f}{pair_ram:>10.2f}"
              f"{'yes' if fits else 'no':>9}{resident / PCIE_GBPS:>13.2f}{r['weights_gb'] / DISK_GBPS:>14.2f}"
              f"{switch:>9.1f}{switch:>8.1f}{(2 * chunks - 1) * switch:>13.1f}")
        r["pair"] = {"resident_gb": resident, "pair_ram_gb": pair_ram, "switch_s": switch, "rate_gbps": rate}
    print("expert GB = one stored expert (fp8 block linears, the rest bf16/fp32) = what the idle expert occupies in "
          "CPU RAM if it waits there; RAM pair = the preset's CPU RAM (above) + that idle expert. Where RAM pair "
          f"does not fit 24 GiB ({CPU_RAM_GB:.2f} GB), the idle expert is dropped and re-read from disk at each "
          "switch (the +s columns then use the disk time of the whole file). Training also takes twice the steps "
          "(each expert trains `steps` steps on its own range): about 2x the one-model training time.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=DEFAULT_PRESETS)
    ap.add_argument("--estimate", action="store_true",
                    help="no GPU needed: peak memory per preset for the 14B shape at 49 frames 832x480, measured "
                         "with fake tensors (FakeTensorMode + storage tracking) on the real training-step code path")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per preset (after one warm-up step)")
    ap.add_argument("--jobs", type=int, default=1, help="--estimate: presets estimated in parallel subprocesses")
    ap.add_argument("--chunks", type=int, default=4, help="--estimate: chunks of the long clip in the two-expert "
                                                          "switch count")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    shape = FULL if torch.cuda.is_available() else SCALED
    if args.one and args.estimate:
        print(json.dumps(estimate_one(args.one, FULL)))
        return
    if args.one:
        print(json.dumps(run_one(args.one, shape, args.steps)))
        return
    if args.estimate:
        rows = estimate_table(args.presets if args.presets != DEFAULT_PRESETS else ESTIMATE_PRESETS, args.jobs)
        two_expert_table(rows, args.chunks)
        return
    if shape is SCALED:
        print(f"no CUDA: running a SCALED shape on the CPU, not Wan-14B: {SCALED}")
    else:
        print(f"Wan2.1-I2V-14B shape, random bf16 weights: {FULL}")
    rows = []
    for name in args.presets.split(","):
        r = _subprocess(["--one", name, "--steps", str(args.steps)])
        r.setdefault("preset", name)
        rows.append(r)
    ref = next((r for r in rows if r["preset"] == "ckpt" and r.get("status") == "ok"), None)
    print(f"{'preset':<20}{'status':<8}{'frames':>7}{'tokens':>8}{'swapped':>8}{'peak MB':>10}{'s/step':>9}{'vs ckpt':>9}")
    for r in rows:
        if "s_per_step" not in r:
            print(f"{r['preset']:<20}{r['status']}")
            continue
        ratio = r["s_per_step"] / ref["s_per_step"] if ref else float("nan")
        print(f"{r['preset']:<20}{r['status']:<8}{r['frames_per_step']:>7}{r['tokens']:>8}{r['blocks_swapped']:>8}"
              f"{r['peak_mb']:>10.0f}{r['s_per_step']:>9.3f}{ratio:>9.2f}")
    print(f"device: {rows[0].get('device', '?')}; windows presets train on shorter windows per step (frames column)")


if __name__ == "__main__":
    main()
