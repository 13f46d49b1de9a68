"""FreeProp rows of the world benchmark (nodes/evaluate/bench.py discovers `engines`), and how they are trained.

Rows (each: the world Fun-Control DiT, control = the source clip, start image = the edited first frame, as the
paper's FreeProp on Fun-Control; seeded noise, the benchmark's steps and shift, no CFG):
  freeprop              LoRA + AST-RoPE predictor, flow matching + the identity-propagation teacher (5 L_motion
                        + 1 L_MMD);
  freeprop_no_ast_rope  the same training without the predictor (stock RoPE): the paper's ablation;
  freeprop_no_teacher   the same training without the relation terms: the paper's other ablation;
  freeprop_untrained    the rows' base before training (zero LoRA, alpha = 1): stock Fun-Control on the same
                        conditioning, to separate what training adds from what the control slot gives.
The trained files are bundled (weights/<row>.safetensors, fp16, and weights/manifest.json: sha256, the command,
seed, time, losses and the world DiT sha256 they were trained on), so `bench world --quick` does not train.
They were trained once by `RETRAIN` on world pairs of TRAINING seeds 0..pairs-1 (never the held-out ones), all
three rows on the same pairs, the same seed and the same step count. When the loaded world DiT is not the one
in the manifest, engines() raises (the benchmark reports the rows as skipped with that message): retrain.

Heads: the recipe (all heads spatial, HeadSplit spatial_ratio 1: latent frame 0's time index moves to
(1 - alpha_S) F', F' = F - 1, the other frames keep theirs; alpha_T has no head to act on) was chosen on the earlier
one-head world DiT on the validation loss (VAL_SEEDS, training-range seeds never trained on; 600 steps each):
all heads spatial 0.6204, all heads temporal (spatial_ratio 0: time alpha_T f) 0.6228, no AST-RoPE 0.6237,
untrained 0.8137. The world DiT now has two heads (width 256); a real 1:1 spatial/temporal split on it is not
measured yet. The split itself (two groups in one attention call) is covered by tests/core/test_ast_rope_paper.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..common import OnStep, atomic_write, log

WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
KIND = "ffprop.freeprop_bench"
ROWS = {"freeprop": {}, "freeprop_no_ast_rope": {"ast_rope": False}, "freeprop_no_teacher": {"teacher": False}}
BASE = "dit_fun_control"           # the world manifest entry the rows are trained on
RETRAIN = "python -m ffprop.nodes.ast_rope.bench --out nodes/ast_rope/weights --cache /tmp/ffp_freeprop_cache"
VAL_SEEDS = range(900_000, 900_014)  # training-range seeds never trained on: the validation loss


@dataclass(frozen=True)
class Recipe:
    """How the bundled rows are trained (FreePropSettings for the world DiT; defaults = the bundled files)."""

    pairs: int = 112
    steps: int = 600
    learning_rate: float = 1e-3
    rank: int = 8
    seed: int = 0
    spatial_ratio: float = 1.0
    predictor_width: int = 64
    predictor_depth: int = 2

    def settings(self, **opts):
        from .freeprop import FreePropSettings
        from .positions import HeadSplit
        from .predictor import PredictorConfig

        return replace(FreePropSettings(), steps=self.steps, rank=self.rank, learning_rate=self.learning_rate,
                       seed=self.seed, variant="paper", split=HeadSplit(self.spatial_ratio), backend="torch",
                       predictor=PredictorConfig(width=self.predictor_width, depth=self.predictor_depth, heads=2),
                       **opts)


def world_dit_sha(name: str = BASE) -> str:
    """sha256 of a world DiT as the world manifest names it; RuntimeError when it cannot be read."""
    from ..world.model import read_manifest

    try:
        return read_manifest()["models"][name]["sha256"]
    except KeyError as e:
        raise RuntimeError(f"the world manifest has no '{name}' entry ({e}); the FreeProp rows need the world "
                           "Fun-Control DiT.") from e


def disk_encode(encode: Callable[[Tensor], Tensor], folder: Optional[Path]) -> Callable[[Tensor], Tensor]:
    """encode with a cache of latents in `folder` (keyed by the frames' bytes; None: no cache)."""
    if folder is None:
        return encode
    folder.mkdir(parents=True, exist_ok=True)

    def cached(frames: Tensor) -> Tensor:
        import numpy as np
        from safetensors.torch import load_file, save_file

        data = np.ascontiguousarray(frames.detach().float().cpu().numpy())
        key = hashlib.blake2b(data.data, digest_size=16).hexdigest() + "x".join(map(str, data.shape))
        path = folder / f"{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["latent"]
        latent = encode(frames)
        with atomic_write(path) as tmp:
            save_file({"latent": latent.detach().cpu().contiguous()}, str(tmp))
        return latent

    return cached


def world_pair(seed: int, encode, context: Tensor, frames: int = 17, size: tuple[int, int] = (64, 64)):
    """The Fun-Control PredictorSample of world seed `seed` (edit seed mod 7, as write_world_pairs)."""
    from ..world.scenes import EDITS, render_sample
    from .freeprop import pair_sample

    s = render_sample(seed, EDITS[seed % len(EDITS)], size=size, frames=frames)
    return pair_sample(s.source, s.target, encode, context, "fun_control")


def val_loss(dit, loaded, samples: list, points: int = 4, seed: int = 123) -> float:
    """Flow-matching loss of `dit` with a FreePropFile (None: stock) on a fixed t grid with seeded noise."""
    import torch.nn.functional as F

    from .freeprop import freeprop_model

    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for s in samples:
            ctx = freeprop_model(dit, loaded, s.source_latent, "torch") if loaded is not None else nullcontext(dit)
            with ctx as model:
                for i in range(points):
                    t = (i + 0.5) / points
                    noise = torch.randn(s.target.shape, generator=gen)
                    v = model.predict((1 - t) * s.target + t * noise, t, s.cond)
                    total += F.mse_loss(v.float(), noise - s.target).item()
    return total / (points * len(samples))


def val_alphas(loaded, samples: list) -> dict:
    """{alpha_s, alpha_t: {mean, min, max}} the file's predictor gives on `samples`' source latents."""
    with torch.no_grad():
        a = [loaded.predictor.alphas(s.source_latent) for s in samples]
    out = {}
    for name in ("alpha_s", "alpha_t"):
        v = torch.stack([getattr(x, name).float().mean() for x in a])
        out[name] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
    return out


def _half_file(src: Path, dst: Path) -> None:
    """Rewrite a FreeProp file with fp16 tensors (same keys and metadata); the loaders cast back to fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = {k: v.half().contiguous() for k, v in load_file(str(src)).items()}
    with atomic_write(dst) as tmp:
        save_file(state, str(tmp), metadata=meta)


def train_rows(out: Path, recipe: Recipe = Recipe(), cache: Optional[Path] = None, rows: tuple[str, ...] = tuple(ROWS),
               on_step: OnStep | None = None, command: str = RETRAIN) -> dict:
    """Train the rows on world training pairs 0..recipe.pairs-1 and write out/<row>.safetensors (fp16) and
    out/manifest.json; returns the manifest."""
    from ..world.model import load_fun_control, load_world_models
    from ..world.train import git_commit, sha256
    from .freeprop import load_freeprop, save_freeprop, train_freeprop

    out.mkdir(parents=True, exist_ok=True)
    world = load_world_models()
    fun = load_fun_control()
    encode = disk_encode(world.vae.encode, cache)
    ctx = world.context()
    t0 = time.perf_counter()
    pairs = [world_pair(i, encode, ctx) for i in range(recipe.pairs)]
    val = [world_pair(i, encode, ctx) for i in VAL_SEEDS]
    encode_s = time.perf_counter() - t0
    manifest = {"kind": KIND, "base": BASE, "base_sha256": world_dit_sha(), "val_seeds": [VAL_SEEDS.start,
                VAL_SEEDS.stop], "val_loss_untrained": val_loss(fun, None, val), "rows": {}}
    old = out / MANIFEST
    if old.is_file():               # keep the rows trained before on the same DiT (retrain one row at a time)
        prev = json.loads(old.read_text())
        if prev.get("kind") == KIND and prev.get("base_sha256") == manifest["base_sha256"]:
            manifest["rows"] = {r: e for r, e in prev.get("rows", {}).items() if r not in rows}
    for row in rows:
        t1 = time.perf_counter()
        res = train_freeprop(fun, pairs, len(pairs), recipe.settings(**ROWS[row]), on_step=on_step)
        seconds = time.perf_counter() - t1
        tmp = out / f".{row}.fp32.safetensors"
        save_freeprop(tmp, res.model, {"steps": res.step, "pairs": len(pairs), "kind_base": "fun_control",
                                       "bench_row": row, "base_sha256": manifest["base_sha256"]})
        path = out / f"{row}.safetensors"
        _half_file(tmp, path)
        tmp.unlink()
        loaded = load_freeprop(path)
        window = max(1, len(res.losses) // 10)
        curve = [round(sum(res.losses[i:i + window]) / len(res.losses[i:i + window]), 4)
                 for i in range(0, len(res.losses), window)]
        alphas = val_alphas(loaded, val) if loaded.predictor is not None else None
        last = res.parts[-window:]
        manifest["rows"][row] = {
            "file": path.name, "sha256": sha256(path), "command": command, "recipe": asdict(recipe),
            "seed": recipe.seed, "steps": res.step, "wall_seconds": round(seconds, 1),
            "encode_seconds": round(encode_s, 1), "git_commit": git_commit(), "torch": torch.__version__,
            "settings": dict(ROWS[row]),
            "loss_curve": curve, "loss_parts_last": {k: round(sum(p[k] for p in last) / len(last), 5) for k in last[0]},
            "val_loss": val_loss(fun, loaded, val), "val_alphas": alphas}
        log.info("FFP FreeProp bench: trained %s in %.0f s: %s", row, seconds, manifest["rows"][row])
        with atomic_write(out / MANIFEST) as tmpm:
            tmpm.write_text(json.dumps(manifest, indent=1))
    return manifest


# ---- the benchmark rows ----------------------------------------------------------------------------------

def read_rows(folder: Path = WEIGHTS, base_sha: Optional[str] = None) -> dict:
    """The bundled rows' manifest, checked: present, trained on the loaded world DiT (base_sha; None: the world
    manifest's), every file present with its sha256. RuntimeError saying what is wrong and the fix."""
    from ..world.train import sha256

    path = Path(folder) / MANIFEST
    fix = f"retrain them with `{RETRAIN}` (about 30 min on one loaded CPU core, most of it encoding the pairs)"
    if not path.is_file():
        raise RuntimeError(f"no bundled FreeProp benchmark files: {path} is missing; restore nodes/ast_rope/weights "
                           f"from git or {fix}.")
    try:
        manifest = json.loads(path.read_text())
        rows, trained_on = manifest["rows"], manifest["base_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{path} is not a FreeProp benchmark manifest ({e}); {fix}.") from e
    base_sha = base_sha or world_dit_sha()
    if trained_on != base_sha:
        raise RuntimeError(f"the bundled FreeProp rows were trained on world {BASE} {trained_on[:12]}..., but the "
                           f"loaded one is {base_sha[:12]}... (the world DiT was retrained); their LoRAs do not fit "
                           f"it: {fix}.")
    for entry in rows.values():
        f = Path(folder) / entry["file"]
        if not f.is_file() or sha256(f) != entry["sha256"]:
            raise RuntimeError(f"FreeProp benchmark file {f} is {'missing' if not f.is_file() else 'changed'} "
                               f"(manifest sha256 {entry['sha256'][:12]}...); restore it from git or {fix}.")
    return manifest


def run_engine(dit, loaded, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor],
               context: Tensor, settings, kind: str = "fun_control") -> Callable:
    """engine(sample) -> IMAGE [T, H, W, 3]: `dit` with FreePropFile `loaded` (None: stock) from the edited first
    frame; kind "fun_control" (control = the source clip, start image = the edited first frame, then grey, as
    freeprop.pair_sample trains it) or "i2v" (the benchmark's stock I2V conditioning)."""
    from ..host.protocol import WanCond
    from ..host.sampling import sample
    from ..lora_edit.conditioning import masked_condition_video, wan_cond
    from .freeprop import freeprop_model

    if kind not in ("fun_control", "i2v"):
        raise ValueError(f"kind must be 'fun_control' or 'i2v'; got {kind!r}.")

    def run(s) -> Tensor:
        v_cond, keep = masked_condition_video(s.source, None, s.edited_first)
        start = encode(v_cond)
        cond = wan_cond(start, keep, context) if kind == "i2v" else \
            WanCond(None, torch.cat([encode(s.source), start], 1), context)
        noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(s.seed)).to(start)
        patched = freeprop_model(dit, loaded, encode(s.source), "torch") if loaded is not None else nullcontext(dit)
        with torch.no_grad(), patched as model:
            return decode(sample(model, cond, noise, settings.sample_steps, settings.shift))

    return run


def engines(world, settings) -> dict[str, Callable]:
    """{"freeprop", "freeprop_no_ast_rope", "freeprop_no_teacher", "freeprop_untrained"} -> Engine; {} without
    the world models; RuntimeError when the bundled files do not fit the loaded world DiT (read_rows)."""
    if world is None:
        return {}
    from ..evaluate.bench import memo_encode
    from ..world.model import load_fun_control
    from .freeprop import load_freeprop

    manifest = read_rows()
    fun = load_fun_control()
    encode = memo_encode(world.encode)
    out = {}
    for row in ROWS:
        loaded = load_freeprop(WEIGHTS / manifest["rows"][row]["file"])
        out[row] = run_engine(fun, loaded, encode, world.decode, world.context, settings)
    out["freeprop_untrained"] = run_engine(fun, None, encode, world.decode, world.context, settings)
    r = manifest["rows"]["freeprop"]["recipe"]
    log.info("FFP bench freeprop: bundled rows (%d steps on %d world training pairs, LoRA rank %d, paper variant "
             "with spatial_ratio %g)", r["steps"], r["pairs"], r["rank"], r["spatial_ratio"])
    return out


def main(argv=None) -> int:
    """`python -m ffprop.nodes.ast_rope.bench --out DIR [--cache DIR] [--pairs N] [--steps N] ...`: train the rows."""
    import argparse
    import sys

    d = Recipe()
    p = argparse.ArgumentParser(prog="python -m ffprop.nodes.ast_rope.bench", description=train_rows.__doc__)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cache", type=Path, default=None, help="latent cache folder (reused across runs)")
    p.add_argument("--rows", default=",".join(ROWS))
    for f in ("pairs", "steps", "rank", "seed", "predictor_width", "predictor_depth"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--spatial-ratio", type=float, default=d.spatial_ratio)
    a = p.parse_args(argv)
    recipe = Recipe(a.pairs, a.steps, a.lr, a.rank, a.seed, a.spatial_ratio, a.predictor_width, a.predictor_depth)
    torch.set_num_threads(1)

    def bar(i: int, n: int, _p=None) -> None:
        if i == n or i % max(1, n // 10) == 0:
            print(f"step {i}/{n}", file=sys.stderr, flush=True)

    cmd = "python -m ffprop.nodes.ast_rope.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    m = train_rows(a.out, recipe, a.cache, tuple(r for r in a.rows.split(",") if r), bar, cmd)
    for row, e in m["rows"].items():
        print(f"{row}: val loss {e['val_loss']:.4f} (untrained {m['val_loss_untrained']:.4f}), {e['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
