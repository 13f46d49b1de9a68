"""Low-VRAM training machinery: presets, per-block gradient checkpointing, block swap with prefetch, OOM message.

Block swap keeps the first `blocks_to_swap` frozen blocks on the CPU (one copy: the device copy is freed) and
moves each to the compute device just before it runs, prefetching the next one (the previous one in the
backward pass) on a side CUDA stream. It needs gradient checkpointing (backward re-runs each block, which
loads it again). On CPU the moves are no-ops but the same code path runs (tests count the moves).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..common import Cancelled, log

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class MemorySettings:
    """gradient_checkpointing: re-run each block in backward instead of storing its activations.
    swap_fraction: share of the blocks kept on the CPU (0..1; 0.95 of Wan-14B's 40 = 38, the paper's max).
    window_frames: train on overlapping windows of this many frames (4k+1; 0 = whole clip; the paper's 9).
    window_stride: frames between window starts (multiple of 4 keeps latent alignment).
    compute_dtype: dtype the DiT runs in ('auto' = the model's own); fp8 base weights come from the loader."""

    gradient_checkpointing: bool = True
    swap_fraction: float = 0.0
    window_frames: int = 0
    window_stride: int = 4
    compute_dtype: str = "auto"

    def blocks_to_swap(self, num_layers: int) -> int:
        return min(num_layers, int(round(self.swap_fraction * num_layers)))


# Estimates for Wan2.1-I2V-14B at 832x480, anchored on LoRA-Edit's Table 4 (9-frame windows: swap 32 of 40 ->
# 9,987 MB, 38 -> 7,617 MB) and README (49 frames, swap 32 -> 21,522 MB). Not measured here (no GPU).
PRESETS: dict[str, MemorySettings] = {
    "unlimited": MemorySettings(gradient_checkpointing=False),
    "24GB": MemorySettings(swap_fraction=0.4, compute_dtype="bf16"),
    "16GB": MemorySettings(swap_fraction=0.8, compute_dtype="bf16"),
    "12GB": MemorySettings(swap_fraction=0.85, window_frames=21, compute_dtype="bf16"),
    "8GB": MemorySettings(swap_fraction=0.95, window_frames=9, compute_dtype="bf16"),
}
PRESET_ORDER = ("unlimited", "24GB", "16GB", "12GB", "8GB")


def preset(name: str, **overrides) -> MemorySettings:
    if name not in PRESETS:
        raise ValueError(f"unknown memory preset '{name}'; use one of {list(PRESET_ORDER)}.")
    return replace(PRESETS[name], **overrides)


def smaller_preset(settings: MemorySettings) -> Optional[str]:
    """The first preset that saves more memory than `settings` (for the out-of-memory message)."""
    for name in PRESET_ORDER[1:]:
        p = PRESETS[name]
        if (p.swap_fraction, -(p.window_frames or 10**6)) > (settings.swap_fraction, -(settings.window_frames or 10**6)):
            return name
    return None


def oom_message(settings: MemorySettings, frames: int, height: int, width: int, free_note: str = "") -> str:
    nxt = smaller_preset(settings)
    tip = (f"choose the '{nxt}' memory preset" if nxt else
           "use fewer frames or a lower resolution (the smallest preset already swaps 95 % of the blocks and "
           "trains on 9-frame windows)")
    return (f"out of GPU memory while training the LoRA on {frames} frames at {width}x{height} with "
            f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
            f"{settings.swap_fraction:.0%} of the blocks swapped, windows "
            f"{settings.window_frames or 'off'}{free_note}. To fit: {tip}, or close other programs using the GPU.")


class BlockRunner:
    """Installs checkpointing / block swap / cancel checks on a list of blocks by replacing each block's `forward`
    with a wrapper (an instance attribute, removed again by `remove()`; the class stays untouched)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, checkpointing: bool, blocks_to_swap: int = 0,
                 should_stop: Optional[Callable[[], bool]] = None):
        if blocks_to_swap and not checkpointing:
            raise ValueError("block swap needs gradient checkpointing (backward re-runs each block on the device); "
                             "turn gradient_checkpointing on or set blocks_to_swap to 0.")
        self.blocks = blocks
        self.device = torch.device(device)
        self.checkpointing = checkpointing
        self.swapped = set(range(min(blocks_to_swap, len(blocks))))
        self.should_stop = should_stop
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.home: dict[int, list[tuple[Tensor, Tensor]]] = {}  # block -> [(tensor, cpu copy)]
        self.origin: dict[int, list[torch.device]] = {}          # block -> each tensor's device before install
        self.on_device: set[int] = set()
        self.pending: dict[int, object] = {}
        self.last = -1
        self.loads = 0
        self.max_resident = 0
        self._installed = False

    # -- install / remove -------------------------------------------------------------------------------------
    def install(self) -> "BlockRunner":
        for i, block in enumerate(self.blocks):
            if i in self.swapped:
                tensors = [*block.parameters(), *block.buffers()]
                self.origin[i] = [t.device for t in tensors]
                self.home[i] = [(t, self._to_home(t.data)) for t in tensors]
                for t, cpu in self.home[i]:
                    t.data = cpu
            block.forward = self._wrap(i, block.forward)
        self._installed = True
        return self

    def remove(self) -> None:
        if not self._installed:
            return
        self._sync()
        for i, block in enumerate(self.blocks):
            block.__dict__.pop("forward", None)
            for (t, cpu), dev in zip(self.home.get(i, []), self.origin.get(i, [])):
                t.data = cpu.to(dev)  # back where the host had it (ComfyUI may keep some blocks on the CPU)
        self.home.clear()
        self.origin.clear()
        self.on_device.clear()
        self._installed = False

    def __enter__(self) -> "BlockRunner":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _to_home(self, t: Tensor) -> Tensor:
        if t.device.type == "cpu":
            return t.pin_memory() if self.cuda and not t.is_pinned() else t
        cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        cpu.copy_(t)
        return cpu

    # -- running ----------------------------------------------------------------------------------------------
    def _wrap(self, i: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"cancelled before block {i}")
            self._request(i)
            if self.checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(self._rerun, i, forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return run

    def _rerun(self, i: int, forward: Callable, *args, **kwargs):
        self._request(i)
        return forward(*args, **kwargs)

    def _request(self, i: int) -> None:
        if i not in self.swapped:
            self.last = i
            return
        step = 1 if i >= self.last else -1
        self.last = i
        self._load(i, wait=True)
        keep = {i, i + step}
        for j in list(self.on_device):
            if j not in keep:
                self._offload(j)
        if i + step in self.swapped:
            self._load(i + step, wait=False)
        self.max_resident = max(self.max_resident, len(self.on_device))

    def _load(self, i: int, wait: bool) -> None:
        if i in self.on_device:
            if wait and i in self.pending:
                torch.cuda.current_stream(self.device).wait_event(self.pending.pop(i))
            return
        self.loads += 1
        ctx = torch.cuda.stream(self.stream) if (self.cuda and not wait) else contextlib.nullcontext()
        with ctx:
            for t, cpu in self.home[i]:
                t.data = cpu.to(self.device, non_blocking=self.cuda)
        if self.cuda and not wait:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.pending[i] = ev
        self.on_device.add(i)

    def _offload(self, i: int) -> None:
        if i in self.pending:
            torch.cuda.current_stream(self.device).wait_event(self.pending.pop(i))
        for t, cpu in self.home[i]:
            t.data = cpu  # the CPU copy is the block's home; the device copy is freed
        self.on_device.discard(i)

    def _sync(self) -> None:
        for ev in self.pending.values():
            ev.synchronize()
        self.pending.clear()


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def log_settings(settings: MemorySettings, num_layers: int) -> None:
    log.info("FFP LoRA-Edit: checkpointing %s, %d of %d blocks swapped, windows %s, compute dtype %s",
             settings.gradient_checkpointing, settings.blocks_to_swap(num_layers), num_layers,
             settings.window_frames or "off", settings.compute_dtype)
