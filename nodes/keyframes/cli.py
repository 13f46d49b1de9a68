"""The LoRA-Edit span engine of `ffprop propagate --engine wan` with keyframes: one builder for both model
sources, so `--world` (the bundled small world models) and `--model DIR` (a diffusers-format Wan2.1 I2V
directory, loaded by nodes/lora_edit/cli.py's load_wan as for a frame-1 run) propagate keyframes through the same
LoRAEditEngine: LoRA-Edit per span, two-ended between keyframes, the span cache keyed by the model's identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .engines import LoRAEditEngine, world_model_id

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_dir_id(folder: str | Path) -> str:
    """A diffusers model directory's identity for the span cache without reading its weights (tens of GB for a real
    Wan): its resolved path, every config.json's text and every weight file's name, size and modification time
    under transformer/ and vae/, so replaced or retrained weights are a new model."""
    root = Path(folder).resolve()
    h = hashlib.sha256(str(root).encode())
    for sub in ("transformer", "vae"):
        for f in sorted((root / sub).rglob("*")) if (root / sub).is_dir() else []:
            if f.name == "config.json" or f.name.endswith(".index.json"):
                h.update(f"{f.relative_to(root)}:".encode() + f.read_bytes())
            elif f.suffix in WEIGHT_SUFFIXES:
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "dir:" + h.hexdigest()[:16]


def wan_keyframe_engine(args) -> LoRAEditEngine:
    """--engine wan with keyframes: LoRA-Edit per span on --world or --model DIR with the wan options' training
    and sampling settings. --world has no text (its DiT ignores it): CFG off. --model DIR: the text context,
    negative (CFG only with one, as for a frame-1 run) and CLIP tokens of load_wan, its memory preset."""
    from ..evaluate.bench import WanWorld
    from ..lora_edit.pipeline import SampleSettings
    from ..lora_edit.trainer import TrainSettings

    train = TrainSettings(steps=args.train_steps, learning_rate=args.lr, rank=args.rank, seed=args.seed)
    if getattr(args, "world", False):
        from ..world.model import load_world_models

        w = load_world_models()
        print("note: --world: the bundled small world models (trained on 64x64 procedural scenes; other footage "
              "comes out as those scenes look)")
        return LoRAEditEngine(WanWorld(w.dit, w.vae.encode, w.vae.decode, w.context()), world_model_id(), train,
                              SampleSettings(args.steps, 1.0, args.shift, args.seed))
    from ..lora_edit.cli import load_wan

    m = load_wan(args)
    model_id = json.dumps([model_dir_id(args.model), args.dtype, args.base_weights])
    return LoRAEditEngine(WanWorld(m.dit, m.encode, m.vae.decode, m.context), model_id, train,
                          SampleSettings(args.steps, args.cfg, args.shift, args.seed), m.memory, m.negative, m.clip)
