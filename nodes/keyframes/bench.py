"""The `keyframes` benchmark rows and the issue-15 checks on the procedural world (nodes/world/scenes.py).

engines(world, settings): rows for nodes/evaluate/bench.py. `keyframes`: the flow engine given the edited first
frame AND the true edited frame T//2 as a second keyframe (with the world's per-frame masks, as the `flow` row
gets them), so it sees more of the truth than the one-keyframe rows: compare it with `flow`, not with the rest.
`keyframes_lora_edit` (needs the world models): LoRA-Edit per span with the same two keyframes, the span between
them two-ended (frame T//2 kept at the span's end), seeded like the `lora_edit` row: compare it with that row.

`python -m ffprop.nodes.keyframes.bench [--quick]` prints the two checks of issue 15 for both engines:
  second keyframe: PSNR (dB) of frames T//2+1..T-1 vs the ground truth, keyframes {0} vs {0, T//2}, and of
                   frames 1..T//2-1 (the span between the two keyframes);
  re-edit:         keyframes {0, T//3, 2T//3} (flow) / {0, T//2, T-1} (LoRA-Edit), a full run into an empty span
                   cache, then keyframe 0 re-edited (its edit at 80 % strength) and run again: spans recomputed
                   and time of the re-run / the full run."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from ..world.scenes import EDITS, HELDOUT_SEEDS, WorldSample, render_sample
from .cache import SpanCache
from .engines import FlowEngine, LoRAEditEngine, SpanEngine, world_model_id
from .keys import make_keyframes
from .propagate import propagate_keyframes

LOOSE_BOX_MIN_AREA = 4


def _mask_for(engine: SpanEngine, s: WorldSample) -> Optional[Tensor]:
    """The world's per-frame masks (flow: as the `flow` row gets them; LoRA-Edit: as loose boxes, restyle global)."""
    if isinstance(engine, LoRAEditEngine):
        from ..masks.ops import loose_box

        if s.edit == "restyle":
            return None
        box = loose_box(s.edit_mask, min_area=LOOSE_BOX_MIN_AREA)
        return box if bool(box.any()) else None
    return s.edit_mask


def run_keys(engine: SpanEngine, s: WorldSample, indices: list[int], cache: Optional[SpanCache] = None,
             frames: Optional[list[Tensor]] = None):
    """The engine on sample s with the true edited frames at `indices` (or `frames`) as keyframes."""
    mask = _mask_for(engine, s)
    keys = make_keyframes(s.source, frames or [s.target[i] for i in indices], indices, "error", mask)
    return propagate_keyframes(s.source, keys, engine, mask, cache)


def world_engine(world, model_id: str, settings, seed: int = 0) -> LoRAEditEngine:
    """LoRA-Edit per span with the benchmark's settings; seed: of the LoRA init, training and sampling noise
    (the `lora_edit` row seeds each case by its scene seed; the `keyframes_lora_edit` row does the same)."""
    from ..lora_edit.pipeline import SampleSettings
    from ..lora_edit.trainer import TrainSettings

    return LoRAEditEngine(world, model_id, TrainSettings(steps=settings.train_steps, learning_rate=settings.lora_lr,
                                                         rank=settings.lora_rank, seed=seed),
                          SampleSettings(steps=settings.sample_steps, cfg=1.0, shift=settings.shift, seed=seed))


def engines(world, settings) -> dict[str, Callable[[WorldSample], Tensor]]:
    """Benchmark rows (nodes/evaluate/bench.py discovers this): see the module docstring."""
    flow = FlowEngine()
    rows = {"keyframes": lambda s: run_keys(flow, s, [0, s.source.shape[0] // 2]).video}
    if world is not None:
        model_id = world_model_id()
        rows["keyframes_lora_edit"] = lambda s: run_keys(world_engine(world, model_id, settings, s.seed), s,
                                                         [0, s.source.shape[0] // 2]).video
    return rows


def _psnr(a: Tensor, b: Tensor) -> float:
    from ..evaluate.bench import weighted_psnr

    return weighted_psnr(a.float(), b.float())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def second_keyframe(engine: SpanEngine, samples: list[WorldSample],
                    on_case: Optional[Callable[..., None]] = None) -> dict[str, float]:
    """Mean PSNR vs the truth with keyframes {0} and {0, T//2}: of frames T//2+1..T-1 (after the second keyframe:
    a forward span from it) and of frames 1..T//2-1 (the span between the two: two-ended where the engine is)."""
    one, two, one_early, two_early = [], [], [], []
    for s in samples:
        t = s.source.shape[0]
        late, early = slice(t // 2 + 1, t), slice(1, t // 2)
        a, b = run_keys(engine, s, [0]).video, run_keys(engine, s, [0, t // 2]).video
        one.append(_psnr(a[late], s.target[late]))
        two.append(_psnr(b[late], s.target[late]))
        one_early.append(_psnr(a[early], s.target[early]))
        two_early.append(_psnr(b[early], s.target[early]))
        if on_case is not None:
            on_case(s, one[-1], two[-1], one_early[-1], two_early[-1])
    return {"one_keyframe_db": _mean(one), "two_keyframes_db": _mean(two),
            "one_keyframe_first_half_db": _mean(one_early), "two_keyframes_first_half_db": _mean(two_early), "better_cases": sum(b > a for a, b in zip(one, two)),
            "better_first_half": sum(b > a for a, b in zip(one_early, two_early)), "cases": len(samples)}


def reedit(engine: SpanEngine, s: WorldSample, indices: list[int]) -> dict[str, float]:
    """Full run into an empty cache, then keyframe 0 re-edited (80 % of its edit) and run again."""
    frames = [s.target[i] for i in indices]
    with tempfile.TemporaryDirectory() as folder:
        cache = SpanCache(folder)
        t0 = time.perf_counter()
        run_keys(engine, s, indices, cache, frames)
        full = time.perf_counter() - t0
        frames[0] = s.source[0] + 0.8 * (s.target[0] - s.source[0])
        t0 = time.perf_counter()
        res = run_keys(engine, s, indices, cache, frames)
        again = time.perf_counter() - t0
    return {"spans": len(res.runs), "recomputed": sum(r.computed for r in res.runs), "full_s": full,
            "rerun_s": again, "ratio": again / full}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffprop.nodes.keyframes.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one scene per edit (default: 2)")
    p.add_argument("--frames", type=int, default=17, help="world clip length (the world models' 17 by default)")
    p.add_argument("--engines", default="flow,lora_edit", help="comma-separated: flow, lora_edit")
    p.add_argument("--scenes", type=int, default=0, help="only the first N scenes (0: all)")
    args = p.parse_args(argv)
    from ..evaluate.bench import FULL, QUICK, WanWorld

    settings = QUICK if args.quick else FULL
    per = 1 if args.quick else 2
    cases = [(HELDOUT_SEEDS[i], EDITS[i % len(EDITS)]) for i in range(per * len(EDITS))][:args.scenes or None]
    samples = [render_sample(seed, edit, frames=args.frames) for seed, edit in cases]
    t = args.frames
    todo: dict[str, tuple[SpanEngine, list[int]]] = {}
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if "flow" in names:
        todo["flow"] = (FlowEngine(), [0, t // 3, 2 * t // 3])
    if "lora_edit" in names:
        from ..world.model import load_world_models

        w = load_world_models()
        world = WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context())
        todo["lora_edit"] = (world_engine(world, world_model_id(), replace(settings)), [0, t // 2, t - 1])
    print(f"{len(samples)} held-out world scenes ({per} per edit), {t} frames, 64x64", flush=True)
    for name, (engine, idx) in todo.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            re = reedit(engine, samples[0], idx)
            print(f"{name}: re-edit keyframe 0 of {idx}: {re['recomputed']}/{re['spans']} spans recomputed, "
                  f"{re['rerun_s']:.2f} s / {re['full_s']:.2f} s = {re['ratio']:.2f} of the full run", flush=True)
            sk = second_keyframe(engine, samples, lambda s, a, b, c, d, n=name: print(
                f"  {n} scene {s.seed} {s.edit}: frames {t // 2 + 1}..{t - 1} {a:.2f} -> {b:.2f} dB, frames "
                f"1..{t // 2 - 1} {c:.2f} -> {d:.2f} dB", flush=True))
        print(f"{name}: frames {t // 2 + 1}..{t - 1} vs truth: keyframe 0 only {sk['one_keyframe_db']:.2f} dB, "
              f"+ true keyframe {t // 2}: {sk['two_keyframes_db']:.2f} dB (better in {sk['better_cases']}/"
              f"{sk['cases']} scenes); frames 1..{t // 2 - 1} (between the two): {sk['one_keyframe_first_half_db']:.2f}"
              f" -> {sk['two_keyframes_first_half_db']:.2f} dB (better in {sk['better_first_half']}/{sk['cases']}); "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
