"""Chunk chainer on long world scenes, scored against ground truth, with its drift metrics (not collected by pytest).

    python tests/benchmarks/bench_world_chunks.py [--cases N] [--frames 49] [--steps-train 40] [--steps-sample 10]

Each case: held-out world scene HELDOUT_SEEDS[i] with edit EDITS[i mod 7] (the benchmark's world_cases), rendered
at --frames (49 = 3 chunks of 17, overlap 1). Rows, each scored like `ffprop bench world` (frames 2..T):
  chunks          the benchmark's chunks row: stage-1 LoRA on the long source (17-frame windows), chained chunks
                  with lora_edit conditioning, default drift control (background + edit colour match, crossfade)
  chunks_no_drift the same LoRA, drift control off (NO_DRIFT_CONTROL)
  chunks_no_lora  chained chunks on the stock world DiT (lora_edit conditioning, default drift control)
  flow_chunks     the flow engine through the same chainer (flow_generator, oracle per-frame edit masks)
  repeat          the edited first frame, frozen
Drift (nodes/chunks/drift.py, as the chainer reports it): seam jump at each seam = |frame_s - frame_{s-1}| over the
clip's median frame step (1 = an ordinary step), whole frame and inside the edit region; colour drift per chunk
(0..255 RGB): background mean vs the source's, edit-region mean vs chunk 1's. `truth` rows: the same metrics of the
ground-truth edited clip itself (what an exact answer scores: the world's own motion and lighting change).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--steps-train", type=int, default=40)
    ap.add_argument("--steps-sample", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ffprop.nodes.chunks import bench as cb
    from ffprop.nodes.chunks.chain import flow_generator
    from ffprop.nodes.chunks.drift import NO_DRIFT_CONTROL, color_drift, region_seam_jumps, seam_jumps
    from ffprop.nodes.chunks.plan import plan_chunks
    from ffprop.nodes.evaluate.bench import (
        BenchSettings,
        load_world,
        loose_mask,
        memo_encode,
        repeat_first_frame,
        score,
        true_motion,
        world_cases,
    )
    from ffprop.nodes.lora_edit.lora import attach_hooks
    from ffprop.nodes.world.scenes import render_sample

    world, problem = load_world()
    if world is None:
        raise SystemExit(f"needs the world models: {problem}")
    settings = BenchSettings(cases=world_cases(1)[:args.cases], frames=args.frames, train_steps=args.steps_train,
                             sample_steps=args.steps_sample)
    encode = memo_encode(world.encode)
    plan = plan_chunks(args.frames, cb.CHUNK_FRAMES, cb.OVERLAP)
    ranges = [range(c.start + c.overlap, c.stop) for c in plan.chunks]
    rows: dict[str, list[dict]] = {}

    def drift_of(video, s):
        return {"seam_jump": seam_jumps(video, plan.seams),
                "seam_jump_edit": region_seam_jumps(video, s.edit_mask, plan.seams),
                **{f"drift_{k}": v for k, v in color_drift(video, s.source, s.edit_mask, ranges).items()}}

    for seed, edit in settings.cases:
        s = render_sample(seed, edit, size=settings.size, frames=args.frames)
        motion = true_motion(s.target)

        def add(name, video, seconds, s=s, motion=motion, seed=seed, edit=edit):
            rows.setdefault(name, []).append({"edit": edit, "seed": seed, **score(video, s, motion),
                                              **drift_of(video, s), "seconds": seconds})
            r = rows[name][-1]
            print(f"{edit:<12} {name:<16} psnr {r['psnr']:6.2f} edit {r['edit_psnr'] or float('nan'):6.2f} "
                  f"bg {r['bg_psnr'] or float('nan'):6.2f} warp {r['warp_error']:.4f} seams "
                  f"{[round(x, 2) for x in r['seam_jump']]} edit-seams {[round(x, 2) for x in r['seam_jump_edit']]} "
                  f"drift bg {[round(x, 2) for x in r['drift_background']]} edit "
                  f"{[round(x, 2) for x in r['drift_edit']]} {seconds:.0f} s", flush=True)

        add("truth", s.target, 0.0)
        add("repeat", repeat_first_frame(s), 0.0)
        t0 = time.perf_counter()
        with torch.no_grad():
            video = cb.chain_world(world, s, settings, flow_generator(), lora=False, edit_mask=s.edit_mask).video
        add("flow_chunks", video, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            video = cb.chain_world(world, s, settings, lora=False, encode=encode).video
        add("chunks_no_lora", video, time.perf_counter() - t0)
        t0 = time.perf_counter()
        lora = cb.train_world_lora(world, s.source, loose_mask(s), settings, s.seed, encode)
        train_s = time.perf_counter() - t0
        detach = attach_hooks(world.dit, lora)
        try:
            for name, drift in (("chunks", cb.DriftSettings()), ("chunks_no_drift", NO_DRIFT_CONTROL)):
                t0 = time.perf_counter()
                with torch.no_grad():
                    video = cb.chain_world(world, s, settings, lora=False, drift=drift, encode=encode).video
                add(name, video, train_s + time.perf_counter() - t0)
        finally:
            detach()

    def mean(vals):
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    print(f"\n{len(settings.cases)} held-out scenes x {args.frames} frames, {len(plan)} chunks of {cb.CHUNK_FRAMES} "
          f"(overlap {cb.OVERLAP}); LoRA {args.steps_train} steps, sampling {args.steps_sample} steps")
    print(f"{'row':<16}{'psnr':>8}{'edit':>8}{'bg':>8}{'warp':>8}{'seam':>7}{'seam_ed':>8}"
          + "".join(f"{f'bg_c{i + 1}':>7}" for i in range(len(plan)))
          + "".join(f"{f'ed_c{i + 1}':>7}" for i in range(len(plan))) + f"{'sec':>6}")
    summary = {}
    for name, rs in rows.items():
        m = {k: mean([r[k] for r in rs]) for k in ("psnr", "edit_psnr", "bg_psnr", "warp_error", "seconds")}
        m["seam_jump"] = mean([x for r in rs for x in r["seam_jump"]])
        m["seam_jump_edit"] = mean([x for r in rs for x in r["seam_jump_edit"]])
        m["drift_background"] = [mean([r["drift_background"][i] for r in rs]) for i in range(len(plan))]
        m["drift_edit"] = [mean([r["drift_edit"][i] for r in rs]) for i in range(len(plan))]
        summary[name] = m
        print(f"{name:<16}{m['psnr']:8.2f}{m['edit_psnr']:8.2f}{m['bg_psnr']:8.2f}{m['warp_error']:8.4f}"
              f"{m['seam_jump']:7.2f}{m['seam_jump_edit']:8.2f}" + "".join(f"{x:7.2f}" for x in m["drift_background"])
              + "".join(f"{x:7.2f}" for x in m["drift_edit"]) + f"{m['seconds']:6.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
