"""Low-VRAM training machinery: presets, per-block gradient checkpointing, block swap with prefetch, OOM message.

Block swap keeps the first `blocks_to_swap` frozen blocks on the CPU (one copy: the device copy is freed) and
moves each to the compute device just before it runs, prefetching the next one (the previous one in the
backward pass) on a side CUDA stream. It needs gradient checkpointing (backward re-runs each block, which
loads it again). On CPU the moves are no-ops but the same code path runs (tests count the moves).

Activation offload keeps what checkpointing saves between blocks (each block's input hidden states, the only
activation a checkpointed block keeps for its recompute) on the CPU: copied device -> pinned host memory on a
side stream during the forward, copied back when backward re-runs that block (the block before it is fetched
ahead on the side stream). It hooks only the checkpoint's own input save (saved_tensors_hooks around the
checkpoint call: the ops inside a checkpointed block save into the checkpoint's holders, not through these
hooks), so the recompute sees exactly the tensor it saw in the forward. On CPU nothing is copied but the hooks
run (tests count them).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..common import Cancelled, log
from ..host.diffusers import UPCAST_ATTR
from .options import PRESET_ORDER

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class MemorySettings:
    """gradient_checkpointing: re-run each block in backward instead of storing its activations.
    swap_fraction: share of the blocks kept on the CPU (0..1; 0.95 of Wan-14B's 40 = 38, the paper's max).
    window_frames: train on overlapping windows of this many frames (4k+1; 0 = whole clip; the paper's 9).
    window_stride: frames between window starts (multiple of 4 keeps latent alignment).
    compute_dtype: dtype the DiT runs in ('auto' = the model's own); fp8 base weights come from the loader.
    offload_activations: keep the checkpointed block inputs in (pinned) CPU memory, not on the GPU (needs
    gradient checkpointing; 49 frames of Wan-14B at 832x480 save 40 x 208 MB = 8.3 GB there otherwise).
    split_blocks: inside each checkpointed block, checkpoint the self-attention, the cross-attention and the FFN
    separately (the FFN in chunks of tokens), so backward re-runs one of them at a time instead of keeping a
    whole block's activations, and keep the fp32 inputs of the block's norms (diffusers' `norm(x.float())`)
    as the exact bf16 values they are (one more forward per block, ~+25 % step time over checkpointing
    alone, not measured; needs gradient checkpointing)."""

    gradient_checkpointing: bool = True
    swap_fraction: float = 0.0
    window_frames: int = 0
    window_stride: int = 4
    compute_dtype: str = "auto"
    offload_activations: bool = False
    split_blocks: bool = False

    def __post_init__(self):
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations needs gradient_checkpointing (it offloads what checkpointing saves "
                             "between blocks); turn gradient_checkpointing on or offload_activations off.")
        if self.split_blocks and not self.gradient_checkpointing:
            raise ValueError("split_blocks needs gradient_checkpointing (it checkpoints parts of each block); turn "
                             "gradient_checkpointing on or split_blocks off.")

    def blocks_to_swap(self, num_layers: int) -> int:
        return min(num_layers, int(round(self.swap_fraction * num_layers)))


# Sized for Wan2.1-I2V-14B at 832x480, 49 frames (20,280 tokens), base weights as the CLI stores them (block
# linears fp8, computed in bf16 one block at a time), from a fake-tensor estimate of the training step's and the
# sampling pass's peaks (`python tests/benchmarks/bench_lora_edit.py --estimate`; not a GPU measurement), GPU incl.
# 0.5 GB CUDA context, excl. fragmentation; CPU RAM = the tensors the presets keep there (pinned swapped blocks
# + offloaded activations + the clip), excl. the process itself. Every preset keeps CPU RAM under 24 GB: the
# 16GB and 12GB presets swap fewer blocks than their VRAM alone would allow (each swapped block is 0.4 GB of
# pinned CPU RAM; 49 frames of offloaded activations are 8.6 GB). 8GB keeps 9-frame windows (the full clip with
# 8GB's settings: 8.2 GB with bf16 weights, +4 % margin on 8 GiB: too thin).
PRESETS: dict[str, MemorySettings] = {
    "unlimited": MemorySettings(gradient_checkpointing=False),
    "24GB": MemorySettings(swap_fraction=0.8, compute_dtype="bf16", offload_activations=True),
    "16GB": MemorySettings(swap_fraction=0.75, compute_dtype="bf16", offload_activations=True, split_blocks=True),
    "12GB": MemorySettings(swap_fraction=0.85, compute_dtype="bf16", offload_activations=True, split_blocks=True),
    "8GB": MemorySettings(swap_fraction=0.95, window_frames=9, compute_dtype="bf16", offload_activations=True,
                          split_blocks=True),
}
assert tuple(PRESETS) == PRESET_ORDER, "options.PRESET_ORDER names the presets, largest budget first"


def preset(name: str, **overrides) -> MemorySettings:
    if name not in PRESETS:
        raise ValueError(f"unknown memory preset '{name}'; use one of {list(PRESET_ORDER)}.")
    return replace(PRESETS[name], **overrides)


def _thrift(s: MemorySettings) -> tuple:
    return (s.swap_fraction, s.offload_activations, s.split_blocks, -(s.window_frames or 10**6))


def smaller_preset(settings: MemorySettings) -> Optional[str]:
    """The preset to try after `settings` ran out of memory: the next one in PRESET_ORDER when `settings` is a
    preset (their order is by estimated VRAM), else the first that saves more by swap / offload / split /
    windows (for the out-of-memory message)."""
    names = [n for n in PRESET_ORDER if PRESETS[n] == settings]
    if names:
        i = PRESET_ORDER.index(names[-1])
        return PRESET_ORDER[i + 1] if i + 1 < len(PRESET_ORDER) else None
    for name in PRESET_ORDER[1:]:
        if _thrift(PRESETS[name]) > _thrift(settings):
            return name
    return None


def oom_message(settings: MemorySettings, frames: int, height: int, width: int, free_note: str = "") -> str:
    nxt = smaller_preset(settings)
    if nxt:
        tip = f"choose the '{nxt}' memory preset"
    elif not settings.window_frames:
        tip = ("connect 'LoRA-Edit Memory Settings' with window_frames 9 (LoRA-Edit's low-cost mode: overlapping "
               "9-frame windows), or use fewer frames or a lower resolution")
    else:
        tip = "use fewer frames or a lower resolution (windows are already on and 95 % of the blocks swapped)"
    return (f"out of GPU memory while training the LoRA on {frames} frames at {width}x{height} with "
            f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
            f"{settings.swap_fraction:.0%} of the blocks swapped, activation offload "
            f"{'on' if settings.offload_activations else 'off'}, split blocks "
            f"{'on' if settings.split_blocks else 'off'}, windows "
            f"{settings.window_frames or 'off'}{free_note}. To fit: {tip}, or close other programs using the GPU.")


def place_for_swap(model: nn.Module, blocks: list[nn.Module], swapped: int, device: torch.device | str) -> None:
    """Put `model` on `device` except its first `swapped` blocks, which stay where they are (the CPU): the
    BlockRunner brings each to the device when it runs. Nothing of a swapped block ever passes through the
    device all at once (the whole model would not fit a small card)."""
    away = {id(t) for b in blocks[:swapped] for t in (*b.parameters(), *b.buffers())}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in away and t.device != torch.device(device):
            t.data = t.data.to(device)


# a block's sub-blocks, by attribute name (diffusers WanTransformerBlock, ComfyUI WanAttentionBlock)
SUB_BLOCKS = ("attn1", "attn2", "self_attn", "cross_attn", "ffn")
NORMS = ("norm1", "norm2", "norm3")   # a block's norms (both hosts); their fp32 inputs are saved compact
FFN_CHUNK_TOKENS = 4096   # FFN rows per checkpointed chunk (Wan-14B: 4096 x 13824 bf16 = 113 MB per hidden tensor)


class BlockRunner:
    """Installs checkpointing / block swap / fp8 upcast / cancel checks on a list of blocks by replacing each
    block's `forward` with a wrapper (an instance attribute, removed again by `remove()`; the class stays
    untouched). With split_blocks the block's sub-blocks (SUB_BLOCKS) get checkpoint wrappers the same way (nested
    non-reentrant checkpoints: backward re-runs the block, which saves only each sub-block's input, then re-runs one
    sub-block at a time; the FFN runs in chunks of `ffn_chunk_tokens` tokens, each its own checkpoint).

    fp8 storage: in a block marked for it (`UPCAST_ATTR`, set by the diffusers loader's fp8 storage) or with
    an explicit `compute_dtype`, each tensor stored in an 8-bit float dtype is cast to that dtype on the device
    just before its block runs and goes back to its fp8 storage after (at most two blocks at once, like the
    swap). Unmarked blocks (ComfyUI's, whose ops and modulation casts upcast fp8 themselves) are left as they
    are, and so are modules that cast their own weights (a `weight_function` attribute).

    inference=True (the sampler): no gradients, no checkpointing; block swap and the fp8 upcast still run, and
    the last block prefetches block 0 for the next model call.

    install() is transactional: every change it makes to the model is recorded as it is made and, if a later
    step fails, undone in reverse order before the original exception propagates unchanged; remove() undoes
    the same record (after a partial install too)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, checkpointing: bool, blocks_to_swap: int = 0,
                 should_stop: Optional[Callable[[], bool]] = None, offload_activations: bool = False,
                 split_blocks: bool = False, ffn_chunk_tokens: int = FFN_CHUNK_TOKENS,
                 compute_dtype: Optional[torch.dtype] = None, inference: bool = False):
        if inference and (checkpointing or offload_activations or split_blocks):
            raise ValueError("an inference BlockRunner (sampling) runs without gradients: checkpointing, activation "
                             "offload and split_blocks are training settings; turn them off for sampling.")
        if blocks_to_swap and not (checkpointing or inference):
            raise ValueError("block swap needs gradient checkpointing (backward re-runs each block on the device); "
                             "turn gradient_checkpointing on or set blocks_to_swap to 0.")
        if offload_activations and not checkpointing:
            raise ValueError("activation offload needs gradient checkpointing (it offloads what checkpointing saves "
                             "between blocks); turn gradient_checkpointing on or offload_activations off.")
        if split_blocks and not checkpointing:
            raise ValueError("split_blocks needs gradient checkpointing (it checkpoints the parts of each "
                             "checkpointed block); turn gradient_checkpointing on or split_blocks off.")
        self.split_blocks = split_blocks
        self.ffn_chunk_tokens = max(1, int(ffn_chunk_tokens))
        self.compact_saves = 0   # norm inputs saved in bf16 (exact) instead of fp32, for tests
        self.sub_runs = 0   # sub-block checkpoints made (in the forward and in each block recompute), for tests
        self.blocks = blocks
        self.acts = ActivationOffload(torch.device(device)) if offload_activations else None
        self.device = torch.device(device)
        self.checkpointing = checkpointing
        self.inference = inference
        self.compute_dtype = compute_dtype
        self.upcast: dict[int, torch.dtype] = {}   # staged fp8 block -> the dtype it computes in
        self.swapped = set(range(min(blocks_to_swap, len(blocks))))
        self.should_stop = should_stop
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slabs = HostSlabs(pin=self.cuda)    # the swapped blocks' pinned CPU copies
        self.home: dict[int, list[tuple[Tensor, Tensor]]] = {}  # staged block -> [(tensor, its home storage)]
        self.on_device: set[int] = set()
        self.pending: dict[int, object] = {}
        self.last = -1
        self.loads = 0
        self.max_resident = 0
        self._undo: list[Callable[[], None]] = []   # install's changes, in the order made
        self._installed = False

    # -- install / remove -------------------------------------------------------------------------------------
    def install(self) -> "BlockRunner":
        if self._installed or self._undo:
            raise RuntimeError("this BlockRunner is already installed; remove() it before installing it again.")
        dtypes = {i: self.compute_dtype or getattr(b, UPCAST_ATTR, None) for i, b in enumerate(self.blocks)}
        narrow = {i: _narrow_tensors(b) if dtypes[i] is not None else [] for i, b in enumerate(self.blocks)}
        if not (self.checkpointing or self.inference) and any(narrow.values()):
            raise ValueError("fp8 base weights are cast to the compute dtype per block at use, which training needs "
                             "gradient checkpointing for (backward re-runs each block); turn gradient_checkpointing "
                             "on or load the model in bf16.")
        try:
            for i, block in enumerate(self.blocks):
                if narrow[i]:
                    self.upcast[i] = dtypes[i]
                if i in self.swapped:
                    self._stage(i, [*block.parameters(), *block.buffers()], copy=True)
                elif narrow[i]:
                    self._stage(i, narrow[i], copy=False)
                self._replace_forward(block, self._wrap(i, block.forward))
                if self.split_blocks:
                    for name in SUB_BLOCKS:
                        sub = getattr(block, name, None)
                        if isinstance(sub, nn.Module):
                            self._replace_forward(sub, self._wrap_sub(sub.forward, chunk=name == "ffn"))
                    for sub in self._norms(block):
                        self._replace_forward(sub, self._wrap_norm(sub, sub.forward))
        except BaseException as e:
            try:
                self._rollback()
            except BaseException as undo_error:   # the install's own error is the one to report
                log.error("FFP LoRA-Edit: undoing a failed BlockRunner install also failed: %r (after %r)",
                          undo_error, e)
            raise
        self._installed = True
        return self

    def remove(self) -> None:
        """Undo everything install() did (all of it after a full install, what it had done after a failed one):
        wrappers off, every staged tensor back on its original device in its original dtype."""
        self._sync()
        if self.acts is not None:
            self.acts.release()
        self._rollback()
        self._installed = False

    def _rollback(self) -> None:
        first = None
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException as e:   # undo the rest anyway, report the first failure
                first = first or e
        self.home.clear()
        self.upcast.clear()
        self.on_device.clear()
        self.pending.clear()
        self.last = -1
        if first is not None:
            raise first

    def _replace_forward(self, module: nn.Module, wrapper: Callable) -> None:
        before = module.__dict__.get("forward", _NONE)

        def undo():
            if before is _NONE:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = before

        self._undo.append(undo)
        module.forward = wrapper

    def _stage(self, i: int, tensors: list[Tensor], copy: bool) -> None:
        """Give block i's tensors a home storage (swapped: a pinned CPU copy; fp8 on the device: their own
        storage) and put them there; each tensor's undo restores it on its original device."""
        entries = self.home.setdefault(i, [])
        for t in tensors:
            origin = t.data
            home = self._to_home(origin) if copy else origin
            self._undo.append(functools.partial(_restore, t, home, origin.device))
            t.data = home
            entries.append((t, home))

    def __enter__(self) -> "BlockRunner":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _to_home(self, t: Tensor) -> Tensor:
        if not self.cuda:
            return t if t.device.type == "cpu" else t.to("cpu")
        if t.device.type == "cpu" and t.is_pinned():
            return t
        home = self.slabs.empty(t.shape, t.dtype)   # pinned, packed (no power-of-two rounding per tensor)
        home.copy_(t)
        return home

    # -- running ----------------------------------------------------------------------------------------------
    def _wrap(self, i: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"cancelled before block {i}")
            self._request(i)
            if self.checkpointing and torch.is_grad_enabled():
                hooks = contextlib.nullcontext() if self.acts is None else self.acts.hooks(i, _hidden(args, kwargs))
                with hooks:
                    return torch.utils.checkpoint.checkpoint(self._rerun, i, forward, *args, use_reentrant=False,
                                                             **kwargs)
            if i in self.home and torch.is_grad_enabled():
                raise RuntimeError("a BlockRunner with swapped or fp8 blocks ran with gradients enabled but without "
                                   "checkpointing; sample under torch.no_grad() or train with checkpointing.")
            return forward(*args, **kwargs)

        return run

    def _wrap_sub(self, forward: Callable, chunk: bool) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if chunk and x is not None and x.ndim == 3 and x.shape[1] > self.ffn_chunk_tokens and not kwargs:
                # the FFN is token-wise: chunks of tokens, each checkpointed, give the same rows
                parts = []
                for part in x.split(self.ffn_chunk_tokens, dim=1):
                    self.sub_runs += 1
                    parts.append(torch.utils.checkpoint.checkpoint(forward, part, *args[1:], use_reentrant=False))
                return torch.cat(parts, dim=1)
            self.sub_runs += 1
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    @staticmethod
    def _norms(block: nn.Module) -> list[nn.Module]:
        # (wrapping the attentions' q/k RMSNorms the same way was measured: +0.4 GB peak, the re-run's fp32
        # internals in backward outweigh the saved copies)
        return [m for m in (getattr(block, n, None) for n in NORMS) if isinstance(m, nn.Module)]

    def _wrap_norm(self, module: nn.Module, forward: Callable) -> Callable:
        """A norm whose fp32 input is a cast of a bf16 tensor (diffusers' norm(x.float())) saves that input as
        bf16 and is re-run in backward; other inputs (an fp32 model, bf16 inputs, fp32 values computed in fp32
        such as ComfyUI's x + y * e) run it as it is. Decided from the input's autograd node, never its values
        (no device sync)."""
        def run(*args, **kwargs):
            x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) else None
            if (x is None or x.dtype != torch.float32 or not torch.is_grad_enabled() or not x.requires_grad
                    or any(p.requires_grad for p in module.parameters()) or not _cast_from_bf16(x)):
                return forward(*args, **kwargs)
            self.compact_saves += 1
            return _CompactInput.apply(x, x.detach().to(torch.bfloat16), forward)

        return run

    def _rerun(self, i: int, forward: Callable, *args, **kwargs):
        self._request(i)
        return forward(*args, **kwargs)

    def _request(self, i: int) -> None:
        """Block i is about to run: load it (swapped: CPU -> device; fp8: cast up), keep it and the next one in
        the direction of travel (the sampler wraps around to block 0), put every other staged block home."""
        if i not in self.home:
            self.last = i
            return
        if self.inference:
            nxt = (i + 1) % len(self.blocks)
        else:
            nxt = i + (1 if i >= self.last else -1)
        self.last = i
        self._load(i, wait=True)
        for j in list(self.on_device):
            if j not in (i, nxt):
                self._offload(j)
        if nxt in self.home:
            self._load(nxt, wait=False)
        self.max_resident = max(self.max_resident, len(self.on_device))

    def _load(self, i: int, wait: bool) -> None:
        if i in self.on_device:
            if wait and i in self.pending:
                torch.cuda.current_stream(self.device).wait_event(self.pending.pop(i))
            return
        self.loads += 1
        ctx = torch.cuda.stream(self.stream) if (self.cuda and not wait) else contextlib.nullcontext()
        with ctx:
            for t, home in self.home[i]:
                x = home.to(self.device, non_blocking=self.cuda)    # fp8 travels as fp8 (half the bytes)
                t.data = x.to(self.upcast[i]) if i in self.upcast and _is_narrow(x) else x
        if self.cuda and not wait:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.pending[i] = ev
        self.on_device.add(i)

    def _offload(self, i: int) -> None:
        if i in self.pending:
            torch.cuda.current_stream(self.device).wait_event(self.pending.pop(i))
        for t, home in self.home[i]:
            t.data = home  # the block's home (CPU copy, or its fp8 storage); the device / upcast copy is freed
        self.on_device.discard(i)

    def _sync(self) -> None:
        for ev in self.pending.values():
            ev.synchronize()
        self.pending.clear()


SLAB_BYTES = 512 << 20      # swapped blocks' tensors (Wan-14B fp8: 26.2 and 70.8 MB): ~4 % gaps (256 MiB: 8 %)
ACT_SLAB_BYTES = 1 << 30    # offloaded block inputs (Wan-14B, 49 frames: 207.6 MB each, 5 per slab)


class HostSlabs:
    """CPU tensors carved out of slabs of `slab_bytes` (a power of two; pinned when `pin`), first fit over the
    open slabs. torch's pinned allocator rounds every allocation up to a power of two (a 70.8 MB fp8 FFN weight
    of Wan-14B would take 128 MB: +50 % pinned RAM for the 14B's swapped blocks); packed slabs waste only small
    gaps. Tensors larger than a slab get their own allocation. Memory lives as long as the tensors carved from it
    (each is a view of its slab)."""

    ALIGN = 64

    def __init__(self, pin: bool, slab_bytes: int = SLAB_BYTES):
        self.pin, self.slab_bytes = pin, slab_bytes
        self._slabs: list[list] = []   # [slab tensor, bytes used]
        self.reserved = 0              # bytes allocated (slabs + large tensors)

    def empty(self, shape, dtype: torch.dtype) -> Tensor:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if n > self.slab_bytes:
            self.reserved += n
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=self.pin)
        slab, start = _first_fit(self._slabs, n, self.slab_bytes)
        if slab is None:
            slab = [torch.empty(self.slab_bytes, dtype=torch.uint8, device="cpu", pin_memory=self.pin), 0]
            self._slabs.append(slab)
            self.reserved += self.slab_bytes
            start = 0
        slab[1] = start + n
        return slab[0][start:start + n].view(dtype).view(shape)

    @staticmethod
    def footprint(sizes: list[int], slab_bytes: int = SLAB_BYTES) -> int:
        """Bytes `empty` reserves for tensors of these byte sizes, in this order (for the memory estimate)."""
        slabs: list[list] = []
        reserved = 0
        for n in sizes:
            if n > slab_bytes:
                reserved += n
                continue
            slab, start = _first_fit(slabs, n, slab_bytes)
            if slab is None:
                slab, start = [None, 0], 0
                slabs.append(slab)
                reserved += slab_bytes
            slab[1] = start + n
        return reserved


def _first_fit(slabs: list[list], n: int, slab_bytes: int):
    for slab in slabs:
        start = -(-slab[1] // HostSlabs.ALIGN) * HostSlabs.ALIGN
        if start + n <= slab_bytes:
            return slab, start
    return None, 0


class _CompactInput(torch.autograd.Function):
    """y = fn(x) for an fp32 x that holds exact bf16 values: saves the bf16 copy (half the bytes) and re-runs fn on
    it in backward (the same x bit for bit, so the same gradient). fn's parameters must not need grads."""

    @staticmethod
    def forward(ctx, x: Tensor, small: Tensor, fn: Callable) -> Tensor:
        ctx.fn, ctx.dtype = fn, x.dtype
        ctx.save_for_backward(small)
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (small,) = ctx.saved_tensors
        with torch.enable_grad():
            x = small.detach().to(ctx.dtype).requires_grad_(True)
            y = ctx.fn(x)
        (gx,) = torch.autograd.grad(y, x, grad)
        return gx, None, None


_NONE = object()


def _is_narrow(t: Tensor) -> bool:
    """An 8-bit float (fp8 e4m3 / e5m2 storage): cast up to the compute dtype at use."""
    return t.is_floating_point() and t.element_size() == 1


def _narrow_tensors(block: nn.Module) -> list[Tensor]:
    """fp8 parameters/buffers of modules that do not cast their own weights at use (ComfyUI's cast ops carry a
    `weight_function`: the host upcasts those itself, scaled fp8 included)."""
    out = []
    for m in block.modules():
        if hasattr(m, "weight_function"):
            continue
        out += [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if _is_narrow(t)]
    return out


def _restore(t: Tensor, home: Tensor, device: torch.device) -> None:
    t.data = home if home.device == device else home.to(device)


def _cast_from_bf16(x: Tensor) -> bool:
    """True when autograd says x was made by casting a bf16 tensor up (x.float(), x.to(fp32)): its values are then
    exact bf16 values. Reads graph metadata only (no data); False when the graph cannot tell."""
    node = x.grad_fn
    if node is None or node.name() != "ToCopyBackward0" or not node.next_functions:
        return False
    src, idx = node.next_functions[0]
    if src is None:
        return False
    var = getattr(src, "variable", None)       # AccumulateGrad: a leaf
    if var is not None:
        return var.dtype == torch.bfloat16
    meta = getattr(src, "_input_metadata", None)
    return meta is not None and idx < len(meta) and meta[idx].dtype == torch.bfloat16


def _hidden(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """A block's hidden-state input: its first positional tensor (diffusers `hidden_states`, ComfyUI `x`)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    return None


class _Saved:
    """One offloaded block input: its host copy, the event that says the device -> host copy is done, and the
    device copy fetched ahead for the backward pass (None until prefetched)."""

    __slots__ = ("block", "host", "device", "copied", "ahead", "ahead_ready")

    def __init__(self, block: int, host: Tensor, device: torch.device, copied=None):
        self.block, self.host, self.device, self.copied = block, host, device, copied
        self.ahead: Optional[Tensor] = None
        self.ahead_ready = None


class ActivationOffload:
    """saved_tensors_hooks for the checkpoint boundary: the block's input is packed to pinned host memory (async
    on a side stream) and unpacked to the device when backward re-runs the block; unpacking block i fetches
    block i-1's input ahead on the side stream. Other tensors the checkpoint saves (timestep embedding, text
    context: the same tensors for every block) pass through untouched. On CPU nothing moves; counts still tick."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.packed = 0          # block inputs offloaded (hook calls that took a tensor)
        self.unpacked = 0        # block inputs brought back for a recompute
        self.prefetched = 0      # of those, fetched ahead on the side stream
        self.host_bytes = 0      # bytes currently offloaded (this step)
        self.peak_host_bytes = 0
        self._by_block: dict[int, _Saved] = {}
        self.slabs = HostSlabs(pin=self.cuda, slab_bytes=ACT_SLAB_BYTES)   # 5 Wan-14B 49-frame block inputs each
        self._buffers: dict[tuple, Tensor] = {}

    def reset(self) -> None:
        self._by_block.clear()
        self.host_bytes = 0

    def release(self) -> None:
        """Drop the host buffers (after training: the sampler needs that CPU RAM) and hand torch's cached pinned
        memory back to the OS."""
        self.reset()
        self._buffers.clear()
        self.slabs = HostSlabs(pin=self.cuda, slab_bytes=ACT_SLAB_BYTES)
        empty = getattr(torch._C, "_host_emptyCache", None)
        if self.cuda and empty is not None:
            empty()

    def hooks(self, block: int, hidden: Optional[Tensor]):
        if block == 0:                   # a new forward: forget the previous step's prefetch table
            self.reset()
        # autograd keeps the pack hook as long as the graph: a strong reference here would keep the device copy
        # alive and the offload would save nothing
        target = None if hidden is None else weakref.ref(hidden)
        del hidden

        def pack(t: Tensor):
            if target is None or t is not target():   # the checkpoint hands its inputs to the hook as they are
                return t
            saved = self._pack(block, t)
            self._by_block[block] = saved
            self.packed += 1
            self.host_bytes += t.numel() * t.element_size()
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return saved

        def unpack(saved):
            if not isinstance(saved, _Saved):
                return saved
            self.unpacked += 1
            out = self._unpack(saved)
            self._by_block.pop(saved.block, None)
            before = self._by_block.get(saved.block - 1)
            if before is not None:
                self._fetch_ahead(before)
            return out

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _pack(self, block: int, t: Tensor) -> _Saved:
        if t.device.type == "cpu":
            return _Saved(block, t, t.device)
        host = self._host_buffer(block, t)
        if not self.cuda:
            host.copy_(t)
            return _Saved(block, host, t.device)
        main = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(main)              # the block input is complete on the main stream
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)               # its device memory is not reused before the copy ends
        return _Saved(block, host, t.device, done)

    def _host_buffer(self, block: int, t: Tensor) -> Tensor:
        """Block `block`'s host buffer for a tensor like t, made once and reused every step (the copies are
        stream-ordered: this step's device -> host copy runs after last step's host -> device copy)."""
        key = (block, tuple(t.shape), t.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self.slabs.empty(t.shape, t.dtype)
        return buf

    def _fetch_ahead(self, saved: _Saved) -> None:
        if not self.cuda or saved.ahead is not None or saved.device.type != "cuda":
            return
        with torch.cuda.stream(self.stream):
            if saved.copied is not None:
                self.stream.wait_event(saved.copied)
            saved.ahead = saved.host.to(saved.device, non_blocking=True)
            saved.ahead_ready = torch.cuda.Event()
            saved.ahead_ready.record(self.stream)
        self.prefetched += 1

    def _unpack(self, saved: _Saved) -> Tensor:
        if saved.device.type == "cpu":
            return saved.host
        if not self.cuda:                          # another accelerator (or meta, for the memory estimate)
            return saved.host.to(saved.device)
        main = torch.cuda.current_stream(saved.device)
        if saved.ahead is not None:
            out, saved.ahead = saved.ahead, None
            main.wait_event(saved.ahead_ready)
            out.record_stream(main)                # allocated on the side stream, used on the main one
            return out
        if saved.copied is not None:
            main.wait_event(saved.copied)
        return saved.host.to(saved.device, non_blocking=True)


_DEVICE_OOM = ("CUDA out of memory", "HIP out of memory", "MPS backend out of memory", "XPU out of memory")


def is_oom(e: BaseException) -> bool:
    """An allocation failure of the compute device: torch's OutOfMemoryError, or a RuntimeError with the device
    allocator's own wording. Not any text with "out of memory" in it: a failed pinned host allocation
    ("CUDA error: out of memory" from cudaHostAlloc) is CPU memory and propagates as it is."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return type(e) is RuntimeError and any(k in str(e) for k in _DEVICE_OOM)


def log_settings(settings: MemorySettings, num_layers: int) -> None:
    log.info("FFP LoRA-Edit: checkpointing %s, %d of %d blocks swapped, activation offload %s, windows %s, "
             "compute dtype %s", settings.gradient_checkpointing, settings.blocks_to_swap(num_layers), num_layers,
             settings.offload_activations, settings.window_frames or "off", settings.compute_dtype)
