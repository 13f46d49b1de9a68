"""RAFT (torchvision) as the flow engine's frame-to-frame flow backend: `FlowSettings(flow=RaftFlow(model))`.

The model is torchvision's raft_large or raft_small: ComfyUI 0.28's OPTICAL_FLOW (its patcher's .model) or one
loaded here from a file in models/optical_flow (load_raft). Frames are uint8 numpy, flows [H, W, 2] float32
numpy in pixels (dx, dy), as nodes/flow/dis.py. torchvision is imported lazily (it is not a core dependency)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import atomic_write

ARCHS = ("raft_large", "raft_small")
PRECISIONS = ("auto", "fp32", "fp16")   # auto: fp16 on CUDA, fp32 elsewhere
MIN_SIDE = 128    # RAFT's 4-level correlation pyramid needs 1/8-resolution features of at least 16 px
ITERS = 12        # torchvision's default number of flow updates


def _torchvision_raft():
    try:
        from torchvision.models import optical_flow
    except ImportError as e:
        raise RuntimeError(f"the RAFT flow backend needs torchvision ({e}); install the torchvision build that "
                           "matches your torch (ComfyUI's own venv has it), or use the DIS flow.") from None
    return optical_flow


def build_raft(arch: str) -> torch.nn.Module:
    """An untrained torchvision RAFT of `arch` (raft_large / raft_small), eval mode, on CPU."""
    if arch not in ARCHS:
        raise ValueError(f"unknown RAFT architecture '{arch}'; use one of {ARCHS}.")
    return getattr(_torchvision_raft(), arch)(weights=None, progress=False).eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:   # a pickle with objects beyond tensors, or not a torch file at all
            raise ValueError(f"'{path.name}' cannot be read as a weights-only torch file ({type(e).__name__}: "
                             f"{str(e)[:200]}); use torchvision's raft_large/raft_small state dict "
                             "(.pth or .safetensors).") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict", sd.get("model")), dict):
        sd = sd.get("state_dict", sd.get("model"))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"'{path.name}' does not hold a state dict of tensors; use torchvision's "
                         "raft_large/raft_small weights.")
    return sd


def detect_arch(sd: dict[str, torch.Tensor], name: str = "the file") -> str:
    """Which torchvision RAFT `sd` is (every key and shape must match), else ValueError with the closest."""
    best = None
    for arch in ARCHS:
        want = {k: tuple(v.shape) for k, v in build_raft(arch).state_dict().items()}
        missing = sorted(set(want) - set(sd))
        extra = sorted(set(sd) - set(want))
        shape = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
        if not (missing or extra or shape):
            return arch
        score = len(missing) + len(extra) + len(shape)
        if best is None or score < best[0]:
            best = (score, arch, missing, extra, shape)
    _, arch, missing, extra, shape = best
    raise ValueError(f"{name} is not a torchvision RAFT checkpoint: closest is {arch}, with {len(missing)} keys "
                     f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}) and {len(shape)} of "
                     f"another shape (e.g. {shape[:2]}). Use torchvision's raft_large or raft_small weights "
                     "(e.g. raft_large_C_T_SKHT_V2), saved as a state dict (.pth or .safetensors).")


def load_raft(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torchvision RAFT from a state-dict file (.safetensors, or .pth/.pt read with weights_only=True), its
    architecture (raft_large / raft_small) told from the keys; eval mode, on `device`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"RAFT weights '{path}' not found; put the file in ComfyUI's models/optical_flow.")
    sd = _read_state_dict(path)
    model = build_raft(detect_arch(sd, f"'{path.name}'"))
    model.load_state_dict(sd)
    return model.to(device)


def random_raft(path: str | os.PathLike, arch: str = "raft_small", seed: int = 0) -> Path:
    """Write a random-weight RAFT state dict (torchvision's own initialisation, seeded without touching the
    global RNG) to `path` (.safetensors, else torch.save), atomically: for tests and plumbing benchmarks."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_raft(arch)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, str(tmp))
    return path


class RaftFlow:
    """flow(a, b, init=None) -> [H, W, 2] float32 numpy, the flow from uint8 frame a to frame b ([H, W] grey,
    replicated to RGB, or [H, W, 3] RGB), by a torchvision RAFT on the device its weights are on.

    Frames are padded (edge replicated) to a multiple of 8 and at least MIN_SIDE, and the flow cropped back:
    flows stay in the frame's pixels. init (a DIS-style initial guess) is ignored: RAFT starts from zero.
    precision: fp16 runs under CUDA autocast (the model's weights are not converted); iters: RAFT's flow
    updates (fewer is faster and coarser). The model is never modified (a host's cached model stays as it is)."""

    def __init__(self, model: torch.nn.Module, precision: str = "auto", iters: int = ITERS):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; use one of {PRECISIONS}.")
        if iters < 1:
            raise ValueError(f"iters must be >= 1; got {iters}.")
        self.model = model
        self.device = next(model.parameters()).device
        self.half = precision == "fp16" or (precision == "auto" and self.device.type == "cuda")
        if self.half and self.device.type != "cuda":
            raise ValueError(f"fp16 RAFT needs a CUDA device; the model is on {self.device}. Use fp32 or auto.")
        self.iters = iters

    def _tensor(self, frame: np.ndarray, pad: tuple[int, int, int, int]) -> torch.Tensor:
        """uint8 [H, W] or [H, W, 3] -> [1, 3, H', W'] float32 in -1..1 on the device, edge-padded."""
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
            raise ValueError(f"RAFT flow takes uint8 [H, W] or [H, W, 3] frames; got {frame.dtype} "
                             f"{tuple(frame.shape)}.")
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)
        x = x[None, None].expand(1, 3, *x.shape) if x.ndim == 2 else x.permute(2, 0, 1)[None]
        x = x.float() * (2 / 255) - 1
        return F.pad(x, pad, mode="replicate") if any(pad) else x

    def __call__(self, a: np.ndarray, b: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        if a.shape != b.shape:
            raise ValueError(f"RAFT flow needs two frames of one size; got {tuple(a.shape)} and {tuple(b.shape)}.")
        h, w = a.shape[:2]
        ph, pw = max(MIN_SIDE, -(-h // 8) * 8) - h, max(MIN_SIDE, -(-w // 8) * 8) - w
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)        # left, right, top, bottom
        # inference_mode here, not in the caller: the engine calls the chain flow from a worker thread
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            flow = self.model(self._tensor(a, pad), self._tensor(b, pad), num_flow_updates=self.iters)[-1][0]
        flow = flow[:, pad[2]:pad[2] + h, pad[0]:pad[0] + w]
        return np.ascontiguousarray(flow.float().permute(1, 2, 0).cpu().numpy(), dtype=np.float32)
