"""GenProp content encoder: quality on the world benchmark's held-out scenes, and peak VRAM on the 14B shape.

    python tests/benchmarks/bench_content_encoder.py --quality [--per-edit 3] [--edits colour_fill,removal]
        stock I2V vs the bundled encoder (nodes/content_encoder/weights/world.safetensors) on held-out world scenes
        (world_cases: seed HELDOUT[i] gets edit i mod 7; only the chosen edits run), the benchmark's scores
        (nodes/evaluate/bench.py score: psnr / edit_psnr / bg_psnr / warp_error over frames 2..T) and the mask
        decoder's IoU against the world's true edit masks (both binarised at 0.5, all T frames).
    python tests/benchmarks/bench_content_encoder.py --mpd [--per-edit 3] [--edits colour_fill,removal]
        the mask decoder alone: its IoU against the world's true edit masks when it reads the TRUE edited clip
        (the encoded ground truth at flow time 0.05, as the mask node runs it on a sampled latent), no sampling;
        the decoder's mask binarised at 0.5 and at each of THRESHOLDS (the best one is chosen on the same scenes,
        so it is an optimistic figure), the true mask at 0.5.
    python tests/benchmarks/bench_content_encoder.py --estimate [--depths 8,16,24]
        peak training VRAM for N = 8/16/24 on Wan2.1-I2V-14B at 49 frames 832x480 (20,280 tokens), see `estimate`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GB = 1024 ** 3


def quality(per_edit: int, edits: tuple[str, ...], weights: Path, steps: int, shift: float) -> dict:
    import torch
    from ffprop.nodes.content_encoder.bench import content_encoder_engine
    from ffprop.nodes.content_encoder.model import mask_iou
    from ffprop.nodes.evaluate.bench import BenchSettings, WanWorld, score, true_motion, wan_engines, world_cases
    from ffprop.nodes.world.model import load_world_models
    from ffprop.nodes.world.scenes import EDITS, render_sample

    torch.set_num_threads(1)
    cases = tuple(c for c in world_cases(per_edit, EDITS) if c[1] in edits)
    settings = BenchSettings(cases, sample_steps=steps, shift=shift)
    w = load_world_models()
    world = WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context())
    i2v = wan_engines(world, settings)["i2v"]
    ce = content_encoder_engine(world, settings, weights, with_mask=True)
    rows = []
    for seed, edit in cases:
        s = render_sample(seed, edit, size=settings.size, frames=settings.frames)
        motion = true_motion(s.target)
        t0 = time.perf_counter()
        out_i2v = i2v(s)
        t1 = time.perf_counter()
        out_ce, mask = ce(s)
        t2 = time.perf_counter()
        rows.append({"seed": seed, "edit": edit, "i2v": {**score(out_i2v, s, motion), "seconds": t1 - t0},
                     "content_encoder": {**score(out_ce, s, motion), "seconds": t2 - t1},
                     "mpd_iou": mask_iou(mask, s.edit_mask)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for edit in edits:
        sel = [r for r in rows if r["edit"] == edit]
        if not sel:
            continue
        summary[edit] = {m: {k: sum(r[m][k] for r in sel) / len(sel) for k in ("psnr", "edit_psnr", "bg_psnr",
                                                                                  "warp_error")}
                         for m in ("i2v", "content_encoder")}
        ious = [r["mpd_iou"] for r in sel if r["mpd_iou"] is not None]
        summary[edit]["mpd_iou"] = sum(ious) / len(ious) if ious else None
        summary[edit]["cases"] = len(sel)
    return {"settings": {"per_edit": per_edit, "steps": steps, "shift": shift, "weights": str(weights)},
            "rows": rows, "summary": summary}


THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def mpd(per_edit: int, edits: tuple[str, ...], weights: Path) -> dict:
    import torch
    from ffprop.nodes.content_encoder.bench import true_clip_mpd_mask
    from ffprop.nodes.content_encoder.files import load_encoder
    from ffprop.nodes.content_encoder.model import mask_iou
    from ffprop.nodes.evaluate.bench import WanWorld, world_cases
    from ffprop.nodes.world.model import load_world_models
    from ffprop.nodes.world.scenes import EDITS, render_sample

    torch.set_num_threads(1)
    w = load_world_models()
    world = WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context())
    encoder = load_encoder(weights, w.dit)
    rows = []
    for seed, edit in (c for c in world_cases(per_edit, EDITS) if c[1] in edits):
        s = render_sample(seed, edit)
        prob = true_clip_mpd_mask(world, encoder, s, seed)
        at = {str(th): mask_iou((prob > th).float(), s.edit_mask) for th in THRESHOLDS}
        rows.append({"seed": seed, "edit": edit, "mpd_iou": at["0.5"], "mpd_iou_at": at})
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for edit in edits:
        sel = [r for r in rows if r["edit"] == edit and r["mpd_iou"] is not None]
        at = {th: sum(r["mpd_iou_at"][th] for r in sel) / len(sel) if sel else None for th in map(str, THRESHOLDS)}
        best = max(at, key=lambda th: at[th] if at[th] is not None else -1.0)
        summary[edit] = {"mpd_iou": at["0.5"], "cases": len(sel), "mpd_iou_at": at, "best_threshold": float(best),
                         "mpd_iou_best": at[best]}
    return {"settings": {"per_edit": per_edit, "weights": str(weights)}, "rows": rows, "summary": summary}


def estimate(depth: int, layers: int = 40, dim: int = 5120, ffn: int = 13824, heads: int = 40, frames: int = 49,
             height: int = 480, width: int = 832, swap_fraction: float = 0.8) -> dict:
    """Peak training VRAM (GB) of one content-encoder step on the Wan2.1-I2V-14B shape, from exact parameter counts
    (the diffusers WanTransformer3DModel with the 14B config, built on the meta device) and a fake-tensor
    measurement of the largest transient (one checkpointed block's forward + backward at the clip's token count,
    FlashAttention-style O(S) attention; `bench_lora_edit.PeakBytes`). Assumptions, the trainer's with LoRA-Edit's
    24GB-style memory settings: generator block linears in fp8 (other generator weights bf16), `swap_fraction`
    of its blocks kept on the CPU; the SCE (N blocks + injections + fusion + patch embed) and the MPD (one block +
    head) trained in bf16 weights with fp32 gradients and fp32 AdamW moments (2 + 4 + 8 bytes / parameter), all on
    the GPU; gradient checkpointing on every block (generator and encoder): one bf16 input [tokens, dim] saved per
    block (40 + N + 1), activation offload off; plus the fp32 flash-attention dq scratch. Not a GPU measurement."""
    import torch
    from diffusers import WanTransformer3DModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lora_edit import FULL, PeakBytes, _config
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = {**FULL, "layers": layers, "heads": heads, "head_dim": dim // heads, "ffn": ffn, "frames": frames,
             "height": height, "width": width}
    f, h, w = (frames - 1) // 4 + 1, height // 16, width // 16
    tokens = f * h * w
    with torch.device("meta"):
        model = WanTransformer3DModel(**_config(shape))
    block = model.blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    linear = sum(p.numel() for n, p in block.named_parameters() if p.ndim == 2)
    other = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    gen_resident = (layers - round(swap_fraction * layers)) * (linear * 1 + (block_params - linear) * 2) + other * 2
    gen_swap_buffer = 2 * (linear * 1 + (block_params - linear) * 2)          # the runner keeps 2 blocks on the GPU
    from ffprop.nodes.content_encoder.model import build_encoder
    from ffprop.nodes.host.diffusers import DiffusersWan

    with torch.device("meta"):
        enc = build_encoder(DiffusersWan(model), depth, dtype=torch.bfloat16)   # exact layout, nothing allocated
    enc_params = sum(p.numel() for p in enc.parameters())
    enc_bytes = enc_params * (2 + 4 + 8)
    saved = (layers + depth + 1) * tokens * dim * 2
    # the largest transient: one block recomputed and backpropagated (fake tensors, bf16, flash attention)
    import torch.nn.functional as F

    def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_sdpa
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                from diffusers.models.transformers.transformer_wan import WanTransformerBlock

                blk = WanTransformerBlock(dim, ffn, heads, "rms_norm_across_heads", True, 1e-6, dim)
            finally:
                torch.set_default_dtype(default)
            x = torch.empty(1, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
            ctx = torch.empty(1, 257 + 512, dim, dtype=torch.bfloat16)
            temb = torch.empty(1, 6, dim, dtype=torch.float32)
            rope = (torch.empty(1, tokens, 1, dim // heads), torch.empty(1, tokens, 1, dim // heads))
            tracker = PeakBytes()
            for t in (x, ctx, temb, *rope):
                tracker.track(t)
            with torch.enable_grad(), tracker:
                out = blk(x, ctx, temb, rope)
                out.float().sum().backward()
            transient = sum(tracker.peak.values()) - sum(t.numel() * t.element_size() for t in (x, ctx, temb, *rope))
    finally:
        F.scaled_dot_product_attention = real_sdpa
    dq = tokens * dim * 4
    total = gen_resident + gen_swap_buffer + enc_bytes + saved + transient + dq
    return {"depth": depth, "tokens": tokens, "encoder_params_b": enc_params / 1e9,
            "generator_resident_gb": (gen_resident + gen_swap_buffer) / GB, "encoder_train_state_gb": enc_bytes / GB,
            "saved_block_inputs_gb": saved / GB, "one_block_transient_gb": (transient + dq) / GB,
            "peak_gb": total / GB, "swap_fraction": swap_fraction}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--estimate", action="store_true")
    ap.add_argument("--mpd", action="store_true")
    ap.add_argument("--per-edit", type=int, default=3, help="--quality: held-out scenes per edit")
    ap.add_argument("--edits", default="colour_fill,removal", help="--quality: edits to score")
    ap.add_argument("--steps", type=int, default=20, help="--quality: sampling steps (the full benchmark's 20)")
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--weights", default=str(REPO / "nodes/content_encoder/weights/world.safetensors"))
    ap.add_argument("--depths", default="8,16,24", help="--estimate: N values")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    result = {}
    if args.estimate:
        rows = [estimate(int(n)) for n in args.depths.split(",")]
        print(f"{'N':>3} {'enc params':>11} {'generator':>10} {'enc train':>10} {'saved acts':>11} {'transient':>10} "
              f"{'peak GB':>8}   (Wan2.1-I2V-14B, 49 f 832x480 = {rows[0]['tokens']} tokens, 80 % of generator "
              "blocks swapped, fp8 generator linears; fake-tensor/analytic estimate)")
        for r in rows:
            print(f"{r['depth']:>3} {r['encoder_params_b']:>10.2f}B {r['generator_resident_gb']:>10.1f} "
                  f"{r['encoder_train_state_gb']:>10.1f} {r['saved_block_inputs_gb']:>11.1f} "
                  f"{r['one_block_transient_gb']:>10.1f} {r['peak_gb']:>8.1f}")
        result["estimate"] = rows
    if args.quality:
        q = quality(args.per_edit, tuple(args.edits.split(",")), Path(args.weights), args.steps, args.shift)
        for edit, s in q["summary"].items():
            for m in ("i2v", "content_encoder"):
                v = s[m]
                print(f"{edit:<12} {m:<16} psnr {v['psnr']:6.2f}  edit_psnr {v['edit_psnr']:6.2f}  bg_psnr "
                      f"{v['bg_psnr']:6.2f}  warp {v['warp_error']:.4f}")
            iou = s["mpd_iou"]
            print(f"{edit:<12} MPD IoU vs true edit mask: {'-' if iou is None else f'{iou:.3f}'} ({s['cases']} scenes)")
        result["quality"] = q
    if args.mpd:
        q = mpd(args.per_edit, tuple(args.edits.split(",")), Path(args.weights))
        for edit, s in q["summary"].items():
            iou, best = s["mpd_iou"], s["mpd_iou_best"]
            print(f"{edit:<12} MPD IoU vs true edit mask, reading the true edited clip: "
                  f"{'-' if iou is None else f'{iou:.3f}'} at 0.5, "
                  f"{'-' if best is None else f'{best:.3f}'} at the best threshold {s['best_threshold']:g} "
                  f"(chosen on these scenes) ({s['cases']} scenes)")
        result["mpd"] = q
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False,
                                              default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    if not (args.quality or args.estimate or args.mpd):
        ap.print_help()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
