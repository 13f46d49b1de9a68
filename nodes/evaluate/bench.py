"""`python -m ffprop bench world`: every engine on the held-out world scenes, scored against ground truth.

Each case is one held-out seed with one edit (nodes/world/scenes.py): the engine gets the source clip, the
ground-truth edited first frame and (where it takes one) the world's edit masks, and its output is compared
with the ground-truth edited clip. Scores (frames 2..T, the ones an engine makes; RGB in 0..1):
  psnr       PSNR over whole frames, dB;
  edit_psnr  PSNR inside the ground-truth edit masks (soft masks weight the pixels), dB;
  bg_psnr    PSNR outside them (weight 1 - mask; none for restyle, whose mask is the whole frame), dB;
  warp_error flow-warping error of the output along the TRUE motion: for each consecutive pair, DIS optical
             flow (OpenCV, preset 'fast') of the ground-truth edited clip from frame t-1 to t, forward-backward
             consistent pixels only; the mean |out[t-1] - out[t] warped back| (0..1, RGB mean). An output that
             moves like the truth scores like the truth; a frozen one scores the motion it misses;
  seconds    wall seconds the engine took per case (mean).
Engines: repeat_first_frame (the edited first frame, frozen: the lower bound); vae_ceiling (the ground truth
through the world VAE's round trip: no generative row can beat it, since each decodes its latents with that
VAE); flow (nodes/flow, default
settings, given the world's per-frame edit masks: oracle masks, as a SAM2 track would give); i2v, lora_edit,
lora_edit_ast_rope on the bundled world models (wan_engines; lora_edit gets the masks as loose boxes).
Later engines come from the rooms: for each room in ROOMS, `ffprop.nodes.<room>.bench.engines(world,
settings) -> {name: Engine}` (world: a WanWorld, or None when the world models cannot load) adds its rows; an
expected row (ROOM_ROWS) that no room provides is reported as skipped, with the reason. An engine may carry a
`frames` attribute (long-scene rows, e.g. chunks): its cases are rendered at that many frames and its summary
says so ("frames"). A PSNR of an exact match is capped at PSNR_CAP. Per method: the mean over cases of each score (cases where a
score has no value, e.g. bg_psnr of restyle, left out), overall and per edit. JSON: null for no value.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..common import OnStep, atomic_write, report
from ..world.scenes import EDITS, HELDOUT_SEEDS, WorldSample, render_sample

METHODS = ("repeat_first_frame", "flow", "vae_ceiling", "i2v", "lora_edit", "lora_edit_ast_rope")
ROOMS = ("keyframes", "content_encoder", "ast_rope", "lora_edit", "chunks")   # nodes/<room>/bench.py add rows
ROOM_ROWS = ("keyframes", "content_encoder", "freeprop", "freeprop_no_ast_rope", "freeprop_no_teacher",
             "lora_edit_wan22", "chunks")                                      # rows the rooms are expected to add
ROOM_PACKAGE = "ffprop.nodes"
SCORES = ("psnr", "edit_psnr", "bg_psnr", "warp_error", "seconds")
PSNR_CAP = 100.0
WARP_QUALITY = "fast"
LOOSE_BOX_MIN_AREA = 4     # px; LoRA-Edit drops mask specks below 50 px at 480p, a 64x64 world object is ~300

Engine = Callable[[WorldSample], Tensor]
"""engine(sample) -> its edited clip IMAGE [T, H, W, 3] in 0..1."""


@dataclass(frozen=True)
class BenchSettings:
    """cases: (held-out seed, edit) pairs; size, frames: the world's render size. Wan engines: LoRA training
    steps, sampling steps, the flow schedule's shift (no CFG: the world models ignore text), LoRA rate and rank
    (LoRA-Edit's 1e-4, 16)."""

    cases: tuple[tuple[int, str], ...]
    size: tuple[int, int] = (64, 64)
    frames: int = 17
    train_steps: int = 100
    sample_steps: int = 20
    shift: float = 3.0
    lora_lr: float = 1e-4
    lora_rank: int = 16


def world_cases(per_edit: int, edits: tuple[str, ...] = EDITS) -> tuple[tuple[int, str], ...]:
    """per_edit held-out seeds for each edit, no seed used twice: seed HELDOUT[i] gets edit i mod len(edits)."""
    n = per_edit * len(edits)
    if not 1 <= n <= len(HELDOUT_SEEDS):
        raise ValueError(f"per_edit must be 1..{len(HELDOUT_SEEDS) // len(edits)} for {len(edits)} edits "
                         f"({len(HELDOUT_SEEDS)} held-out seeds); got {per_edit}.")
    return tuple((HELDOUT_SEEDS[i], edits[i % len(edits)]) for i in range(n))


QUICK = BenchSettings(world_cases(1), train_steps=40, sample_steps=10)
FULL = BenchSettings(world_cases(len(HELDOUT_SEEDS) // len(EDITS)))


# ---- scoring --------------------------------------------------------------------------------------------

def weighted_psnr(out: Tensor, truth: Tensor, weight: Optional[Tensor] = None) -> Optional[float]:
    """PSNR (dB, peak 1) of out vs truth [T, H, W, 3] with per-pixel weights [T, H, W] (None: all equal);
    capped at PSNR_CAP; None when the weights sum to zero."""
    se = ((out.double() - truth.double()) ** 2).mean(-1)
    w = torch.ones_like(se) if weight is None else weight.double()
    total = float(w.sum())
    if total <= 0:
        return None
    mse = float((se * w).sum()) / total
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else 10 * math.log10(1 / mse)


def true_motion(truth: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per consecutive pair of the ground-truth clip [T, H, W, 3]: (coords [H, W, 2] where each pixel of frame
    t-1 is in frame t, forward-backward consistent [H, W] bool)."""
    from ..flow.dis import DenseFlow, consistent, identity_grid, to_gray
    from ..video.frames import to_uint8

    frames = to_uint8(truth)
    dis, grid = DenseFlow(WARP_QUALITY), identity_grid(*frames.shape[1:3])
    pairs = []
    for a, b in zip(frames[:-1], frames[1:]):
        ga, gb = to_gray(a), to_gray(b)
        fwd, back = dis.flow(ga, gb), dis.flow(gb, ga)
        pairs.append((grid + fwd, consistent(back, fwd)))
    return pairs


def warp_error(video: Tensor, motion: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over pairs of mean |video[t-1] - video[t] warped back along `motion`| on its consistent pixels."""
    from ..flow.dis import sample

    v = video.float().numpy()
    errors = []
    for t, (coords, ok) in enumerate(motion, start=1):
        if ok.any():
            errors.append(float(np.abs(v[t - 1] - sample(v[t], coords)).mean(-1)[ok].mean()))
    return float(np.mean(errors)) if errors else 0.0


def score(out: Tensor, s: WorldSample, motion: list) -> dict[str, Optional[float]]:
    """The four quality scores of one output (see the module docstring)."""
    if tuple(out.shape) != tuple(s.target.shape):
        raise ValueError(f"engine output is {tuple(out.shape)}; the case needs {tuple(s.target.shape)} [T, H, W, 3].")
    o, truth, m = out[1:].float(), s.target[1:], s.edit_mask[1:]
    return {"psnr": weighted_psnr(o, truth), "edit_psnr": weighted_psnr(o, truth, m),
            "bg_psnr": weighted_psnr(o, truth, 1 - m), "warp_error": warp_error(out, motion)}


def _mean(rows: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def summarise(rows: list[dict]) -> dict:
    """Per-case rows ({edit, psnr, ...}) -> {score: mean, ..., by_edit: {edit: {score: mean}}}."""
    out = {k: _mean(rows, k) for k in SCORES}
    edits = [e for e in EDITS if any(r["edit"] == e for r in rows)]
    out["by_edit"] = {e: {k: _mean([r for r in rows if r["edit"] == e], k) for k in SCORES} for e in edits}
    return out


# ---- engines --------------------------------------------------------------------------------------------

def repeat_first_frame(s: WorldSample) -> Tensor:
    """The lower bound: the edited first frame, frozen."""
    return s.edited_first[None].expand_as(s.target).clone()


def flow_engine(s: WorldSample) -> Tensor:
    """The embedded engine (nodes/flow) with the world's per-frame edit masks, default settings."""
    from ..flow.engine import propagate_edit

    return propagate_edit(s.source, s.edited_first, s.edit_mask).video


def room_engines(world: Optional["WanWorld"], settings: BenchSettings, rooms: tuple[str, ...] = ROOMS,
                 package: str = ROOM_PACKAGE) -> tuple[dict[str, Engine], dict[str, str]]:
    """The rows the rooms add: ({name: engine}, {room: why its module gave none}) from each
    `<package>.<room>.bench.engines(world, settings)`. A room without a bench module adds no rows (not a
    problem); one whose module fails to import or whose engines() raises is named with the error."""
    rows: dict[str, Engine] = {}
    problems: dict[str, str] = {}
    for room in rooms:
        name = f"{package}.{room}.bench"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):     # the module (or its room) does not exist
                continue
            problems[room] = f"{name} failed to import: {type(e).__name__}: {e}"
            continue
        except Exception as e:  # noqa: BLE001  (a broken room skips its rows, the others still run)
            problems[room] = f"{name} failed to import: {type(e).__name__}: {e}"
            continue
        try:
            found = module.engines(world, settings)
        except Exception as e:  # noqa: BLE001
            problems[room] = f"{name}.engines() raised {type(e).__name__}: {e}"
            continue
        for row, engine in found.items():
            if row in METHODS or row in rows:
                raise ValueError(f"{name}.engines() returns row '{row}', which another engine already has; "
                                 "rename the row.")
            rows[row] = engine
    return rows, problems


def _missing_row(row: str, world: Optional["WanWorld"], world_problem: Optional[str], problems: dict[str, str],
                 rooms: tuple[str, ...]) -> str:
    """Why an expected room row is absent."""
    why = f"no nodes/<room>/bench.py engines() provides '{row}' (rooms looked in: {', '.join(rooms)})"
    if problems:
        why += "; " + "; ".join(problems.values())
    if world is None and world_problem:
        why += f"; the world models did not load ({world_problem}), so Wan rows were not offered"
    return why


def engines(settings: BenchSettings, names: Optional[tuple[str, ...]] = None, rooms: tuple[str, ...] = ROOMS,
            package: str = ROOM_PACKAGE) -> dict[str, Engine | str]:
    """name -> engine, or -> the reason it is skipped. names None: every built-in method (METHODS), every
    expected room row (ROOM_ROWS) and any other row a room adds. The world models load once, only when a
    requested row needs them (a Wan method, or any room row)."""
    wanted_rooms = names is None or any(n not in METHODS for n in names)
    needs_world = names is None or any(n not in ("repeat_first_frame", "flow") for n in names)
    world, world_problem = (load_world() if needs_world else (None, None))
    extra, problems = room_engines(world, settings, rooms, package) if wanted_rooms else ({}, {})
    known = (*METHODS, *ROOM_ROWS, *[r for r in extra if r not in ROOM_ROWS])
    if names is None:
        names = known
    out: dict[str, Engine | str] = {}
    wan = None
    for name in names:
        if name not in known:
            raise ValueError(f"unknown method '{name}'; use some of {known}.")
        if name == "repeat_first_frame":
            out[name] = repeat_first_frame
        elif name == "flow":
            out[name] = flow_engine
        elif name in METHODS:
            if wan is None:
                wan = wan_engines(world, settings) if world is not None else world_problem
            out[name] = wan if isinstance(wan, str) else wan[name]
        elif name in extra:
            out[name] = extra[name]
        else:
            out[name] = _missing_row(name, world, world_problem, problems, rooms)
    return out


@dataclass(frozen=True)
class WanWorld:
    """A Wan 2.1 I2V DiT behind the host protocol and its VAE: encode(IMAGE [T, H, W, 3]) -> model-space
    latent [1, 16, F, h, w], decode back; context: the text context [1, L, text_dim] every engine gets."""

    dit: object
    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    context: Tensor


def memo_encode(encode: Callable[[Tensor], Tensor], keep: int = 8) -> Callable[[Tensor], Tensor]:
    """encode with a small cache keyed by the frames' bytes: the engines of one case encode the same clips
    (the source, the masked conditioning videos), and the VAE costs more than the tiny DiT."""
    cache: dict[bytes, Tensor] = {}

    def cached(frames: Tensor) -> Tensor:
        key = hashlib.blake2b(np.ascontiguousarray(frames.detach().float().cpu().numpy()).data,
                              digest_size=16).digest() + repr(tuple(frames.shape)).encode()
        if key not in cache:
            if len(cache) >= keep:
                cache.pop(next(iter(cache)))
            cache[key] = encode(frames)
        return cache[key]

    return cached


def loose_mask(s: WorldSample) -> Optional[Tensor]:
    """The mask the LoRA-Edit engines get: the world's edit masks as LoRA-Edit's loose boxes [T, H, W] (+10 %),
    or None (restyle, or no edit pixel > 0.5 in any frame: LoRA-Edit's global setting)."""
    from ..masks.ops import loose_box

    if s.edit == "restyle":
        return None
    mask = loose_box(s.edit_mask, min_area=LOOSE_BOX_MIN_AREA)
    return mask if bool(mask.any()) else None


def wan_engines(world: WanWorld, settings: BenchSettings) -> dict[str, Engine]:
    """The generative engines on one Wan world (noise and LoRA seeded by the case's seed):
    i2v: stock I2V from the edited first frame (frames 2..T grey, keep-mask on frame 1 only);
    lora_edit: LoRA-Edit stage 1 (nodes/lora_edit) with the world's edit masks as LoRA-Edit's loose boxes
    (+10 %; restyle: the global setting, no mask); lora_edit_ast_rope: the same on the DiT patched with
    AST-RoPE's heuristic alphas from the source latent (nodes/ast_rope, torch backend)."""
    from ..ast_rope.patch import apply_ast_rope, choose_alphas
    from ..host.sampling import sample
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from ..lora_edit.pipeline import SampleSettings, lora_edit_video
    from ..lora_edit.trainer import TrainSettings

    encode = memo_encode(world.encode)

    def i2v(s: WorldSample) -> Tensor:
        v_cond, keep = masked_condition_video(s.source, None, s.edited_first)
        cond = wan_cond(encode(v_cond), keep, world.context)
        noise = torch.randn(cond.cond_latent.shape, generator=torch.Generator().manual_seed(s.seed))
        return world.decode(sample(world.dit, cond, noise.to(cond.cond_latent), settings.sample_steps,
                                   settings.shift))

    def lora_edit(s: WorldSample, ast_rope: bool = False) -> Tensor:
        dit = world.dit
        if ast_rope:
            dit = apply_ast_rope(dit, choose_alphas("heuristic", latent=encode(s.source)), backend="torch")
        mask = loose_mask(s)
        out = lora_edit_video(dit, encode, world.decode, s.source, mask, s.edited_first[None], world.context,
                              train=TrainSettings(steps=settings.train_steps, learning_rate=settings.lora_lr,
                                                  rank=settings.lora_rank, seed=s.seed),
                              sampling=SampleSettings(steps=settings.sample_steps, cfg=1.0, shift=settings.shift,
                                                      seed=s.seed))
        return out.frames

    def vae_ceiling(s: WorldSample) -> Tensor:
        return world.decode(world.encode(s.target)).clamp(0, 1)

    return {"vae_ceiling": vae_ceiling, "i2v": i2v, "lora_edit": lora_edit,
            "lora_edit_ast_rope": lambda s: lora_edit(s, ast_rope=True)}


def load_world() -> tuple[Optional[WanWorld], Optional[str]]:
    """(the small trained world models (nodes/world/model.py) as a WanWorld, None), or (None, why they cannot
    load)."""
    try:
        from ..world.model import load_world_models
    except ImportError as e:
        return None, f"the trained world models are not in this checkout (nodes/world/model.py: {e})"
    try:
        world = load_world_models()
    except (RuntimeError, ValueError, ImportError) as e:
        return None, f"the world models did not load: {e}"
    return WanWorld(world.dit, world.vae.encode, world.vae.decode, world.context()), None


# ---- the run --------------------------------------------------------------------------------------------

def run_bench(settings: BenchSettings, methods: dict[str, Engine | str], on_step: Optional[OnStep] = None) -> dict:
    """Every engine on every case -> {"scenes", "frames", "methods": {name: summary}} (module docstring). An
    engine with a `frames` attribute gets its cases rendered at that length (its summary has "frames")."""
    live = {name: e for name, e in methods.items() if not isinstance(e, str)}
    rows: dict[str, list[dict]] = {name: [] for name in live}
    lengths = {name: int(getattr(e, "frames", settings.frames)) for name, e in live.items()}
    total = len(settings.cases) * max(len(rows), 1)
    done = 0
    for seed, edit in settings.cases:
        for frames in sorted(set(lengths.values())):
            s = render_sample(seed, edit, size=settings.size, frames=frames)
            motion = true_motion(s.target)
            for name in (n for n in rows if lengths[n] == frames):
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = live[name](s)
                seconds = time.perf_counter() - t0
                rows[name].append({"edit": edit, "seed": seed, **score(out, s, motion), "seconds": seconds})
                done += 1
                report(on_step, None, done, total)
    result = {"scenes": len(settings.cases), "frames": settings.frames, "methods": {}}
    for name, engine in methods.items():
        if isinstance(engine, str):
            result["methods"][name] = {**{k: None for k in SCORES}, "by_edit": {}, "skipped": engine}
        else:
            result["methods"][name] = summarise(rows[name])
            if lengths[name] != settings.frames:
                result["methods"][name]["frames"] = lengths[name]
    return result


def format_table(result: dict) -> str:
    """One table: a row per method and edit (plus 'all'), a column per score; '-' = no value."""
    head = f"{'method':<20} {'edit':<12}" + "".join(f"{k:>11}" for k in SCORES)
    lines = [f"world benchmark: {result['scenes']} held-out scenes, {result['frames']} frames "
             "(scores over frames 2..T vs the ground-truth edit)", head, "-" * len(head)]
    fmt = lambda v, k: "-" if v is None else f"{v:.4f}" if k == "warp_error" else f"{v:.2f}"  # noqa: E731
    for name, m in result["methods"].items():
        if "skipped" in m:
            lines.append(f"{name:<20} skipped: {m['skipped']}")
            continue
        label = name if "frames" not in m else f"{name} ({m['frames']}f)"
        for edit, row in [("all", m), *m["by_edit"].items()]:
            lines.append(f"{label if edit == 'all' else '':<20} {edit:<12}" + "".join(f"{fmt(row[k], k):>11}" for k in SCORES))
    lines.append("psnr/edit_psnr/bg_psnr: dB vs the ground truth (all / inside / outside its edit masks); "
                 f"warp_error: flicker along the true motion (DIS '{WARP_QUALITY}' flow of the ground truth), "
                 "0..1; seconds: per scene")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Strict JSON (no NaN/Infinity), written atomically."""
    text = json.dumps(result, indent=1, allow_nan=False)
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def run_cli(quick: bool, json_path: Optional[str], methods: Optional[str], on_step: Optional[OnStep] = None,
            per_edit: Optional[int] = None) -> int:
    """`ffprop bench world [--quick | --per-edit K] [--json FILE] [--methods a,b]`: run, print the table, write
    the JSON. per_edit: FULL's settings on the first K held-out scenes of each edit (ValueError out of range)."""
    if quick and per_edit is not None:
        raise ValueError("--quick and --per-edit exclude each other: --quick is one scene per edit with short "
                         "training; --per-edit K keeps the full run's training on K scenes per edit.")
    settings = QUICK if quick else FULL if per_edit is None else replace(FULL, cases=world_cases(per_edit))
    names = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None
    t0 = time.perf_counter()
    result = run_bench(settings, engines(settings, names), on_step)
    print(format_table(result))
    kind = "quick" if quick else "full" if per_edit is None else f"full-settings ({per_edit} per edit)"
    print(f"{kind} run: {result['scenes']} scenes x {len(result['methods'])} methods in "
          f"{time.perf_counter() - t0:.0f} s")
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


def world_demo(seed: int = 0, edit: str = "recolour", engine: str = "lora_edit",
               on_step: Optional[OnStep] = None) -> tuple[WorldSample, Tensor, dict]:
    """`ffprop demo --engine wan`: one engine (default LoRA-Edit) with the bundled world models on held-out
    scene HELDOUT_SEEDS[seed mod 100] and `edit`, at the world's size (FULL settings). Returns (the sample,
    the engine's clip [T, H, W, 3], {method: scores vs the ground truth} for it, flow and repeat_first_frame).
    RuntimeError (the loader's: which file, and the fix) when the world models are missing."""
    settings = replace(FULL, cases=((HELDOUT_SEEDS[seed % len(HELDOUT_SEEDS)], edit),))
    world, problem = load_world()
    if world is None:
        raise RuntimeError(f"--engine wan needs the bundled world models: {problem}")
    wan = wan_engines(world, settings)
    s = render_sample(*settings.cases[0], size=settings.size, frames=settings.frames)
    motion = true_motion(s.target)
    scores, out = {}, None
    methods = {engine: wan[engine], "flow": flow_engine, "repeat_first_frame": repeat_first_frame}
    for i, (name, run) in enumerate(methods.items()):
        t0 = time.perf_counter()
        video = run(s)
        scores[name] = {**score(video, s, motion), "seconds": time.perf_counter() - t0}
        out = video if out is None else out
        report(on_step, None, i + 1, len(methods))
    return s, out, scores
