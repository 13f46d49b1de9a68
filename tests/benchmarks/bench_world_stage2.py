"""LoRA-Edit stage 2 on the world models: does a keyframe's appearance carry into the frames near it?
(not collected by pytest)

    python tests/benchmarks/bench_world_stage2.py [--keyframe 17] [--steps 40] [--steps-sample 10] [--first source]

Each case: held-out world scene (the benchmark's world_cases(1), edits recolour, retexture, shape_swap, insertion),
17 frames, 64x64; LoRA-Edit on the world DiT with the world's loose-box masks (as the bench's lora_edit row).
Rows, same noise and LoRA seed:
  stage1        stage 1 only, --steps steps
  stage1_long   stage 1 only, 2 x --steps steps (the same number of steps as stage1+2: more training alone)
  stage1+2      stage 1 --steps steps, then stage 2 --steps steps with ONE keyframe: the ground-truth edited
                frame --keyframe (1-based) as the still (trainer.build_keyframe_samples)
--first source: the generator is conditioned on the SOURCE's frame 1 (unedited), so the keyframe is the only
place the edit is shown (a user who edited a later frame alone); the default `edited` conditions on the edited
frame 1, which on the world already shows everything the keyframe does.
Scores vs the ground-truth edited clip: edit_psnr (inside the true edit masks, dB) on the frames near the keyframe
(--near frames ending at it) and on frames 2..5 (far from it), psnr over frames 2..T. One run prints both stages.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keyframe", type=int, default=17, help="1-based frame of the keyframe")
    ap.add_argument("--near", type=int, default=4, help="frames scored as near the keyframe (ending at it)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--steps-sample", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--edits", default="recolour,retexture,shape_swap,insertion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first", choices=("edited", "source"), default="edited",
                    help="the conditioning frame 1: the edited one (default) or the source's own (the keyframe alone "
                         "carries the edit)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ffprop.nodes.evaluate.bench import load_world, loose_mask, memo_encode, weighted_psnr, world_cases
    from ffprop.nodes.lora_edit.pipeline import SampleSettings, lora_edit_video
    from ffprop.nodes.lora_edit.trainer import TrainSettings
    from ffprop.nodes.world.scenes import render_sample

    world, problem = load_world()
    if world is None:
        raise SystemExit(f"needs the world models: {problem}")
    encode = memo_encode(world.encode)
    edits = args.edits.split(",")
    cases = [(seed, e) for seed, e in world_cases(1) if e in edits]
    k = args.keyframe - 1
    near = slice(max(1, k + 1 - args.near), k + 1)
    far = slice(1, 5)
    rows: dict[str, list[dict]] = {}
    for seed, edit in cases:
        s = render_sample(seed, edit)
        mask = loose_mask(s)
        sampling = SampleSettings(steps=args.steps_sample, cfg=1.0, shift=3.0, seed=seed)
        for name, steps, stage2 in (("stage1", args.steps, 0), ("stage1_long", 2 * args.steps, 0),
                                    ("stage1+2", args.steps, args.steps)):
            t0 = time.perf_counter()
            train = TrainSettings(steps=steps, steps_stage2=stage2, learning_rate=args.lr, rank=16, seed=seed)
            first = s.edited_first if args.first == "edited" else s.source[0]
            out = lora_edit_video(world.dit, encode, world.decode, s.source, mask, first[None], world.context,
                                  train=train, sampling=sampling,
                                  keyframes=s.target[k:k + 1] if stage2 else None,
                                  keyframe_indices=[k] if stage2 else None).frames.float()
            r = {"edit": edit, "seed": seed, "seconds": time.perf_counter() - t0,
                 "edit_psnr_near": weighted_psnr(out[near], s.target[near], s.edit_mask[near]),
                 "edit_psnr_far": weighted_psnr(out[far], s.target[far], s.edit_mask[far]),
                 "edit_psnr_keyframe": weighted_psnr(out[k:k + 1], s.target[k:k + 1], s.edit_mask[k:k + 1]),
                 "psnr": weighted_psnr(out[1:], s.target[1:])}
            rows.setdefault(name, []).append(r)
            print(f"{edit:<11} {name:<12} edit near {r['edit_psnr_near']:6.2f}  at keyframe "
                  f"{r['edit_psnr_keyframe']:6.2f}  far {r['edit_psnr_far']:6.2f}  psnr {r['psnr']:6.2f}  "
                  f"{r['seconds']:.0f} s", flush=True)

    def mean(name, key):
        vals = [r[key] for r in rows[name] if r[key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    print(f"\n{len(cases)} held-out scenes, 17 frames; frame 1: {args.first}; keyframe = ground-truth frame {args.keyframe}; near = frames "
          f"{near.start + 1}..{near.stop}, far = frames 2..5; LoRA lr {args.lr:g}, {args.steps} steps per stage; "
          f"sampling {args.steps_sample} steps")
    print(f"{'row':<12}{'edit near':>10}{'at key':>8}{'far':>8}{'psnr':>8}{'sec':>6}")
    for name in rows:
        print(f"{name:<12}{mean(name, 'edit_psnr_near'):10.2f}{mean(name, 'edit_psnr_keyframe'):8.2f}"
              f"{mean(name, 'edit_psnr_far'):8.2f}{mean(name, 'psnr'):8.2f}{mean(name, 'seconds'):6.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
