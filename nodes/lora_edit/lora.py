"""A LoRA held as separate trainable tensors beside a frozen Wan DiT, and its ComfyUI file format.

Keys are ComfyUI module paths relative to the DiT root (`blocks.N.self_attn.q`); a file holds
`diffusion_model.<path>.lora_up.weight [out, r]`, `.lora_down.weight [r, in]` and `.alpha` (a 0-d tensor),
which the stock LoraLoader(ModelOnly) loads. Delta W = up @ down * alpha / rank (alpha = rank -> scale 1,
LoRA-Edit's code default). Two ways to apply it without touching base weights:
  - forward hooks on torch Linear modules (diffusers host, `attach_hooks`): y + (x @ down^T @ up^T) * scale;
  - ComfyUI weight wrappers (`attach_weight_wrappers` on a cloned ModelPatcher): W + up @ down * scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import atomic_write
from ..host import names

PREFIX = "diffusion_model."
TARGETS = {
    "all_linears": tuple(n for n in names.CANONICAL if n not in names.IMAGE_ONLY),  # LoRA-Edit code default
    "attention": tuple(n for n in names.CANONICAL if n.startswith(("self_", "cross_")) and n not in names.IMAGE_ONLY),
}


class LoRALayer(nn.Module):
    """down [r, in] (uniform +-1/sqrt(in), PEFT's kaiming default), up [out, r] zeros; scale = alpha / r.

    forward(weight) -> weight + up @ down * scale (a ComfyUI weight function); delta(x) -> the output change.

    delta computes in the input's dtype (bf16/fp16 activations: the fp32 master weights are cast down inside the
    op, as autocast would, and autograd still hands fp32 grads to the parameters), so backward keeps the
    activation-dtype input it already has instead of an fp32 copy of every targeted linear's input (2x its
    size). upcast=True restores the fp32 compute (more memory; the test measures how close the two are)."""

    upcast = False

    def __init__(self, down: Tensor, up: Tensor, alpha: float):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    def delta(self, x: Tensor) -> Tensor:
        if self.upcast or x.dtype == self.down.dtype or not x.is_floating_point() or x.element_size() < 2:
            return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + ((self.up @ self.down) * self.scale).to(weight.dtype)


class LoRA(nn.Module):
    """A set of LoRALayers keyed by ComfyUI module path (see module docstring)."""

    def __init__(self, layers: dict[str, LoRALayer]):
        super().__init__()
        self.paths = list(layers)
        self.layers = nn.ModuleList(layers[p] for p in self.paths)

    def __getitem__(self, path: str) -> LoRALayer:
        return self.layers[self.paths.index(path)]

    def items(self) -> Iterable[tuple[str, LoRALayer]]:
        return zip(self.paths, self.layers)

    @property
    def rank(self) -> int:
        return self.layers[0].down.shape[0] if len(self.layers) else 0

    def comfy_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """ComfyUI LoRA keys -> detached CPU tensors (what SaveLoRA writes and LoraLoader reads)."""
        out = {}
        for path, layer in self.items():
            out[f"{PREFIX}{path}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
            out[f"{PREFIX}{path}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
            out[f"{PREFIX}{path}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return out

    @classmethod
    def from_comfy_state_dict(cls, sd: dict[str, Tensor], source: str = "LoRA") -> "LoRA":
        layers: dict[str, LoRALayer] = {}
        downs = sorted(k for k in sd if k.endswith(".lora_down.weight"))
        if not downs:
            raise ValueError(f"{source} holds no '*.lora_down.weight' keys; expected a ComfyUI-format LoRA "
                             f"(diffusion_model.<module>.lora_up/lora_down.weight/alpha). Keys: {sorted(sd)[:4]}")
        for key in downs:
            base = key[: -len(".lora_down.weight")]
            if not base.startswith(PREFIX) or f"{base}.lora_up.weight" not in sd:
                raise ValueError(f"{source}: '{key}' has no matching '{base}.lora_up.weight' or lacks the "
                                 f"'{PREFIX}' prefix; is this a ComfyUI-format Wan LoRA?")
            down, up = sd[key].float(), sd[f"{base}.lora_up.weight"].float()
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise ValueError(f"{source}: '{base}' has up {tuple(up.shape)} and down {tuple(down.shape)}; "
                                 "expected [out, r] and [r, in] (linear LoRA).")
            alpha = sd.get(f"{base}.alpha")
            layers[base[len(PREFIX):]] = LoRALayer(down, up, float(alpha) if alpha is not None else down.shape[0])
        return cls(layers)


def target_paths(dit, targets: str = "all_linears") -> dict[str, str]:
    """ComfyUI path -> host path of every targeted block linear of a WanDiT (canonical names via names.py)."""
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets '{targets}'; use one of {sorted(TARGETS)}.")
    table = dit.linear_names()
    out = {}
    for name in TARGETS[targets]:
        for i, host_path in enumerate(table.get(name, [])):
            out[f"blocks.{i}.{names.COMFY[name]}"] = host_path
    if not out:
        raise ValueError("the model has no Wan block linears to put a LoRA on; is this a Wan 2.1 DiT?")
    return out


def create_lora(dit, rank: int = 16, targets: str = "all_linears", seed: int = 0, alpha: Optional[float] = None,
                device: torch.device | str | None = None) -> LoRA:
    """A fresh LoRA (up = 0, so the model's output is unchanged) for every targeted linear of `dit`."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}.")
    gen = torch.Generator().manual_seed(seed)
    root = dit.module
    layers = {}
    for path, host_path in target_paths(dit, targets).items():
        weight = root.get_submodule(host_path).weight
        out_f, in_f = weight.shape
        bound = 1.0 / math.sqrt(in_f)
        down = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
        layers[path] = LoRALayer(down, torch.zeros(out_f, rank), alpha if alpha is not None else rank)
    lora = LoRA(layers)
    return lora.to(device if device is not None else weight.device)


def attach_hooks(dit, lora: LoRA) -> Callable[[], None]:
    """Add lora's output deltas to the host's Linear modules through forward hooks. Returns detach()."""
    host = _host_paths(dit, lora)
    root = dit.module
    handles = []
    for path, layer in lora.items():
        mod = root.get_submodule(host[path])

        def hook(_mod, args, out, layer=layer):
            return out + layer.delta(args[0]).to(out.dtype)

        handles.append(mod.register_forward_hook(hook))

    def detach() -> None:
        for h in handles:
            h.remove()

    return detach


def _host_paths(dit, lora: LoRA) -> dict[str, str]:
    table = dit.linear_names()
    inverse = {}
    for name, paths in table.items():
        for i, p in enumerate(paths):
            inverse[f"blocks.{i}.{names.COMFY[name]}"] = p
    missing = [p for p in lora.paths if p not in inverse]
    if missing:
        raise ValueError(f"this LoRA targets {len(missing)} modules the model lacks (e.g. {missing[:3]}); "
                         f"was it trained for another Wan size ({dit.dims.num_layers} blocks here)?")
    return inverse


def attach_weight_wrappers(patcher, lora: LoRA) -> None:
    """On a cloned ComfyUI ModelPatcher: lora layers as weight wrappers of their linears, and an identity wrapper
    on every other cast-able weight/bias. The wrappers make ComfyUI cast (copy) each weight per forward, so the
    frozen base weights (inference tensors when loaded by a node) are never saved for backward, and fp8 /
    lowvram models train like TrainLoraNode's. Duck-typed: no ComfyUI import."""
    targets = set(lora.paths)
    root = patcher.model.diffusion_model
    for name, mod in root.named_modules():
        if not hasattr(mod, "weight_function"):
            continue
        if getattr(mod, "weight", None) is not None:
            fn = lora[name] if name in targets else _same
            patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", fn)
        if getattr(mod, "bias", None) is not None:
            patcher.add_weight_wrapper(f"diffusion_model.{name}.bias", _same)
    missing = targets - {n for n, _ in root.named_modules()}
    if missing:
        raise ValueError(f"this LoRA targets modules the model lacks (e.g. {sorted(missing)[:3]}).")


def _same(w: Tensor) -> Tensor:
    return w


def save_lora(lora: LoRA, path: str | Path, dtype: torch.dtype = torch.float32, metadata: Optional[dict] = None) -> Path:
    """Write lora in ComfyUI key format to `path` atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(lora.comfy_state_dict(dtype), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_lora(path: str | Path) -> LoRA:
    """Read a ComfyUI-format LoRA file (safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at '{path}'.")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file ({e}); re-save it with the save node.") from e
    return LoRA.from_comfy_state_dict(sd, f"'{path.name}'")
