"""How far the world models carry frame 1's edit: the same scene sampled from the edited and from the unedited
frame 1, and how much the two outputs differ inside the true edit mask, frame by frame (not collected by pytest).

    python tests/benchmarks/bench_world_carry.py [--edits recolour,retexture] [--per-edit 1] [--steps 10]
        [--lora-steps 100] [--lora-lr 1e-4]

For each held-out scene (nodes/evaluate/bench.py world_cases) and each engine of the world benchmark (i2v: stock
I2V; lora_edit: LoRA-Edit stage 1 with the world's loose-box mask, --lora-steps at --lora-lr: --lora-lr 0 is
LoRA-Edit's masked conditioning on the untouched DiT), same noise and seeds for both runs: the mean
absolute RGB difference (0..1) of the two outputs inside the true edit mask of each frame, next to the truth's
(the edited clip against the source). A model that carries the edit keeps the outputs as far apart as the truth
is; where they meet, what the model puts on the object no longer depends on frame 1. Prints one row per engine
with the frames 1, 3, 5, 9, 13, 17 (1-based) and the frame from which the difference stays under a tenth of the
truth's.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

FRAMES = (0, 2, 4, 8, 12, 16)


def gap(a: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> np.ndarray:
    """Mean absolute RGB difference of clips a, b [T, H, W, 3] inside the mask inside [T, H, W] bool, per frame
    (NaN where the mask is empty) -> [T]."""
    d = (a.float() - b.float()).abs().mean(-1)
    return np.array([float(d[t][inside[t]].mean()) if inside[t].any() else np.nan for t in range(len(d))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", default="recolour,retexture")
    ap.add_argument("--per-edit", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--lora-steps", type=int, default=100, help="LoRA-Edit stage-1 steps (the benchmark's 100)")
    ap.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA rate (0: no training, the conditioning alone)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ffprop.nodes.evaluate.bench import BenchSettings, load_world, wan_engines, world_cases
    from ffprop.nodes.world.scenes import render_sample

    world, problem = load_world()
    if world is None:
        raise SystemExit(f"needs the world models: {problem}")
    cases = tuple(c for c in world_cases(args.per_edit) if c[1] in args.edits.split(","))
    engines = wan_engines(world, BenchSettings(cases, sample_steps=args.steps, shift=3.0, train_steps=args.lora_steps,
                                               lora_lr=args.lora_lr))
    rows: dict[str, list[np.ndarray]] = {"truth": []}
    for seed, edit in cases:
        s = render_sample(seed, edit)
        inside = s.edit_mask > 0.5
        rows["truth"].append(gap(s.target, s.source, inside))
        for name in ("i2v", "lora_edit"):
            edited = engines[name](s)
            unedited = engines[name](dataclasses.replace(s, edited_first=s.source[0]))
            rows.setdefault(name, []).append(gap(edited, unedited, inside))
        print(f"{edit} seed {seed}: " + "  ".join(f"{k} {v[-1][FRAMES[2]]:.3f}" for k, v in rows.items()), flush=True)
    truth = np.nanmean(rows["truth"], 0)
    print(f"\n{len(cases)} held-out scenes ({args.edits}), {args.steps} sampling steps: mean |output from the edited "
          "frame 1 - output from the unedited one| inside the true edit mask, 0..1")
    print(f"{'row':<11}" + "".join(f"{'frame ' + str(t + 1):>9}" for t in FRAMES) + "   gone from frame")
    for name, vals in rows.items():
        m = np.nanmean(vals, 0)
        gone = next((t + 1 for t in range(len(m)) if np.all(m[t:] < truth[t:] / 10)), None)
        print(f"{name:<11}" + "".join(f"{m[t]:9.3f}" for t in FRAMES) + f"   {gone if gone else '-':>9}")


if __name__ == "__main__":
    main()
