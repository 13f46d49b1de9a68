"""Wan DiT adapter for a ComfyUI MODEL (a ModelPatcher around `comfy.ldm.wan.model.WanModel`).

The one module outside node.py files that touches ComfyUI (DESIGN.md section 1): `comfy` is imported inside
functions only, so this file imports in a plain Python process. Patches go on a clone, never on the input.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import inspect
import logging
import os
import textwrap
import types
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..common import log_once
from . import names
from .protocol import (
    RopePositionFn,
    WanCond,
    WanDims,
    apply_position_fn,
    check_clip,
    check_context,
    model_input,
    timesteps,
)

ROPE_OBJECT = "diffusion_model.rope_embedder"
KINDS = ("i2v", "t2v", "fun_control")
SUPPORTED = ("a Wan 2.1-architecture DiT with the 16-channel Wan 2.1 latent: I2V (36 input channels, e.g. "
             "wan2.1_i2v_480p_14B or a Wan 2.2 I2V A14B expert), T2V (16) or Fun-Control (48)")
LOAD_HINT = "Load e.g. wan2.1_i2v_480p_14B with 'Load Diffusion Model' and connect it here."
FUSED_FORWARD = "80753dc06c2bc02f"
"""Fingerprint (forward_fingerprint) of the WanSelfAttention.forward that `_fused_self_attention_forward` copies
(ComfyUI 0.3.64); the fused path is used only where the host's forward is that code."""
FUSED_FORWARD_HOST_ROPE = "f2cd6c4d158162cc"
"""ComfyUI 0.28's WanSelfAttention.forward (0.3.64's + `attn1_patch` patches + comfy_kitchen RoPE inside
apply_rope1). The fused copy keeps the host's apply_rope1 for one shared position set (so the output is the
host's own) and routes only per-head-group positions (AST-RoPE's paper variant) through kernels/."""
PER_GROUP_UNSUPPORTED = ("per-head-group RoPE positions (AST-RoPE variant 'paper') need FFProp's fused "
                         "self-attention, which this ComfyUI's WanSelfAttention.forward is not proven equal to; "
                         "use variant 'global' or 'warped' here, or a ComfyUI whose Wan self-attention FFProp knows "
                         "(0.3.64 or 0.28).")
UNSUPPORTED_WAN = {
    "VaceWanModel": "Wan VACE", "CameraWanModel": "Wan Fun-Camera", "WanModel_S2V": "Wan S2V",
    "HumoWanModel": "Wan HuMo", "AnimateWanModel": "Wan 2.2 Animate", "CausalWanModel": "causal (AR) Wan",
}
_NO_BACKWARD = "no autograd formula was registered"


def _wan_kind(dm) -> str | None:
    """"i2v" / "t2v" / "fun_control" for a plain WanModel with the Wan 2.1 latent, None otherwise."""
    if getattr(dm, "out_dim", None) != 16:
        return None
    return {36: "i2v", 16: "t2v", 48: "fun_control"}.get(dm.patch_embedding.weight.shape[1])


def check_wan_model(model_patcher: Any, kinds: tuple[str, ...] = KINDS, node: str = "this node") -> str:
    """The kind ("i2v", "t2v", "fun_control") of a ComfyUI MODEL, or ValueError naming what the model is and
    what `node` supports. Runs no forward; for every node that takes a MODEL (e.g. the chunk sampler)."""
    wan_cls = _wan_model_class()
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(model_patcher, "clone"):
        raise ValueError(
            f"{node} needs a ComfyUI MODEL (ModelPatcher), got {type(model_patcher).__name__}. Connect the MODEL "
            f"output of 'Load Diffusion Model' with {SUPPORTED}."
        )
    name = type(dm).__name__
    if type(dm) is not wan_cls:
        what = f"{UNSUPPORTED_WAN.get(name, 'a Wan variant')} ({name})" if isinstance(dm, wan_cls) else \
            f"{name}, not a Wan DiT"
        raise ValueError(f"this MODEL is {what}, which {node} does not support; it needs {SUPPORTED}. {LOAD_HINT}")
    kind = _wan_kind(dm)
    if kind is None:
        ch, out = dm.patch_embedding.weight.shape[1], dm.out_dim
        what = "Wan 2.2 TI2V-5B (48-channel Wan 2.2 latent)" if out == 48 else \
            f"a Wan model with {ch} input / {out} output channels"
        raise ValueError(f"this MODEL is {what}, which {node} does not support; it needs {SUPPORTED}. {LOAD_HINT}")
    if kind not in kinds:
        raise ValueError(f"this MODEL is a Wan {kind} model but {node} needs a Wan {' or '.join(kinds)} model. "
                         f"{LOAD_HINT}")
    return kind


def model_file_name(model_patcher: Any) -> str | None:
    """The file name a MODEL was loaded from, where the host records it (ComfyUI 0.28: `cached_patcher_init`,
    set by 'Load Diffusion Model' and checkpoint loaders and kept by clone()), else None (e.g. 0.3.64)."""
    init = getattr(model_patcher, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 and isinstance(init[1], tuple) else ()
    return os.path.basename(args[0]) if args and isinstance(args[0], (str, os.PathLike)) else None


def is_wan22_ti2v(model_patcher: Any) -> bool:
    """True for Wan 2.2 TI2V-5B (a WanModel with the 48-channel Wan 2.2 latent), which has no mask channels."""
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    return dm is not None and getattr(dm, "out_dim", None) == 48


@contextlib.contextmanager
def host_training() -> Iterator[bool]:
    """ComfyUI's training contract around a training loop, wherever the host has one: 0.28+ exposes
    `comfy.model_management.in_training` (core's TrainLoraNode sets it around its loop) and, while it is False,
    runs RoPE through comfy_kitchen's inference-only kernel, which has no backward. Sets it True and restores the
    previous value on success, error and Cancel. Yields whether the host has the switch (False: nothing to do,
    e.g. 0.3.64, whose RoPE is plain torch). A backward that still meets a kernel without one is re-raised as
    a RuntimeError saying so."""
    try:
        import comfy.model_management as mm
    except ImportError:
        mm = None
    if mm is None or not hasattr(mm, "in_training"):
        yield False
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield True
    except RuntimeError as e:
        if _NO_BACKWARD not in str(e):
            raise
        raise RuntimeError(f"a ComfyUI kernel without a backward sat on the training graph although "
                           f"comfy.model_management.in_training was set ({e}). This ComfyUI is newer than FFProp "
                           "knows; please report it with your ComfyUI version.") from e
    finally:
        mm.in_training = before


def streams_weights(model_patcher: Any) -> bool:
    """True when the host streams this MODEL's weights itself: ComfyUI 0.28's dynamic VRAM (comfy-aimdo,
    `ModelPatcherDynamic.is_dynamic()`; weights stay in RAM and every layer faults its weight into a GPU
    virtual buffer on use, evicted under pressure). Never on a CPU load device (ComfyUI builds a plain patcher)."""
    is_dynamic = getattr(model_patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def forward_fingerprint(cls: type) -> str:
    """sha256 prefix of cls.forward's code (its AST without the docstring): formatting and comments don't count."""
    fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        fn.body = fn.body[1:]
    return hashlib.sha256(ast.dump(fn).encode()).hexdigest()[:16]


def fused_path_proven(attn: nn.Module) -> bool:
    """Whether the fused self-attention may replace this host's: only when the host's forward is the code it
    copies (FUSED_FORWARD: 0.3.64; FUSED_FORWARD_HOST_ROPE: 0.28), where the tests prove it equal. Any other
    forward keeps the host's own, fed by our position hook (one shared position set only)."""
    return _proven_forward(attn) is not None


def _proven_forward(attn: nn.Module) -> str | None:
    """FUSED_FORWARD or FUSED_FORWARD_HOST_ROPE when the host's self-attention forward is one of them."""
    stock = getattr(attn, "_ffp_stock", attn)
    try:
        found = forward_fingerprint(type(stock)) if hasattr(stock, "norm_q") else None
    except (OSError, TypeError, SyntaxError):   # no source available
        return None
    return found if found in (FUSED_FORWARD, FUSED_FORWARD_HOST_ROPE) else None


def _wan_model_class():
    try:
        from comfy.ldm.wan.model import WanModel
    except ImportError as e:
        raise RuntimeError(
            f"ComfyWan needs ComfyUI importable in this interpreter (import failed: {e}); "
            "run inside ComfyUI or with its venv and COMFYUI_DIR on sys.path."
        ) from e
    return WanModel


class RopePositionWrapper(nn.Module):
    """Object patch for `diffusion_model.rope_embedder`: ids [1, L, 3] -> inner(fn(ids)) per batch item.

    fn sees float32 ids (EmbedND casts positions to float32 anyway, so the identity is bit-exact)."""

    def __init__(self, inner: nn.Module, fn: RopePositionFn):
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.stack([apply_position_fn(self.fn, i.float()) for i in ids])
        if pos.ndim == 4 and not isinstance(self.inner, (RopePositionWrapper, PositionRecorder)):
            raise RuntimeError(PER_GROUP_UNSUPPORTED)
        return self.inner(pos)


class RopeState:
    """Shared by a `PositionRecorder` and the `fused_self_attention` patches of one MODEL clone: the final
    per-token positions [L, 3] (or [G, L, 3] per head group) of the current forward (set by the recorder, read
    by every block)."""

    def __init__(self, backend: str = "auto"):
        from ...kernels import RopeTables

        self.backend = backend
        self.positions: Tensor | None = None
        self.tables = RopeTables()


class PositionRecorder(nn.Module):
    """Innermost rope_embedder patch: records the (already remapped) ids, then builds the stock table (kept for
    any consumer that is not a patched self-attention, e.g. a fallback)."""

    def __init__(self, inner: nn.Module, state: RopeState):
        super().__init__()
        self.inner = inner
        self.state = state

    def forward(self, ids: Tensor) -> Tensor:
        self.state.positions = ids[0].float()
        return self.inner(ids[:, -1] if ids.ndim == 4 else ids)   # per head group: the stock table of the last


def _fused_self_attention_forward(self, x: Tensor, freqs: Tensor, transformer_options={}) -> Tensor:  # noqa: B006
    """WanSelfAttention.forward of ComfyUI 0.3.64 (or 0.28, `_ffp_host_rope`: plus its attn1_patch patches) with
    q/k RoPE applied by `kernels.rope_qk` at the positions recorded for this forward (Triton on CUDA, else the
    torch reference, which repeats apply_rope1's operations). 0.28 keeps its own apply_rope1 for one shared
    position set. Falls back to the stock table when no positions match the sequence (an error for per-head-group
    positions, which no table holds)."""
    from comfy.ldm.flux.math import apply_rope1
    from comfy.ldm.wan.model import optimized_attention

    from ...kernels import resolve_backend, rope_qk

    host_rope = self._ffp_host_rope
    patches = transformer_options.get("patches", {}) if host_rope else {}
    b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
    q = self.norm_q(self.q(x)).view(b, s, n, d)
    k = self.norm_k(self.k(x)).view(b, s, n, d)
    state = self._ffp_rope_state
    pos = state.positions
    matches = pos is not None and pos.shape[-2] == s
    if matches and (pos.ndim == 3 or not host_rope):
        backend = resolve_backend(state.backend, q.device.type)
        tables = None
        if backend == "torch":  # the table the (hooked) rope_embedder built holds exactly these cos/sin: reuse it
            same = pos.ndim == 2 and freqs.ndim == 6 and tuple(freqs.shape[:4]) == (1, s, 1, d // 2)
            tables = (freqs[0, :, 0, :, 0, 0], freqs[0, :, 0, :, 1, 0]) if same else state.tables.get(pos, d, q.device)
        q, k = rope_qk(q, k, pos.to(q.device), backend=backend, cos_sin=tables)
    else:
        if pos is not None and pos.ndim == 3:
            raise RuntimeError(f"per-head-group RoPE positions for {pos.shape[-2]} tokens but this self-attention "
                               f"call has {s} (e.g. a reference latent); AST-RoPE variant 'paper' cannot run here.")
        if not matches and not host_rope:
            log_once("comfy-fused-rope-fallback", "FFP AST-RoPE: positions unavailable for a self-attention call; "
                     "using the stock rope table there.")
        q, k = apply_rope1(q, freqs), apply_rope1(k, freqs)
    out = optimized_attention(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                              heads=self.num_heads, transformer_options=transformer_options)
    for p in patches.get("attn1_patch", []):
        out = p({"x": out, "q": q, "k": k, "transformer_options": transformer_options})
    return self.o(out)


def fused_self_attention(attn: nn.Module, state: RopeState) -> nn.Module:
    """A shallow copy of a WanSelfAttention (same child modules, so weight keys and LoRA patches still resolve
    as `blocks.N.self_attn.q.weight`) whose forward routes RoPE through kernels/. The input stays untouched."""
    stock = getattr(attn, "_ffp_stock", attn)
    proven = _proven_forward(stock)
    if proven is None:
        return attn
    new = copy.copy(stock)
    new._modules = dict(stock._modules)
    # plain attributes (object.__setattr__): registering `stock` as a child would make a module cycle
    object.__setattr__(new, "_ffp_stock", stock)
    object.__setattr__(new, "_ffp_rope_state", state)
    object.__setattr__(new, "_ffp_host_rope", proven == FUSED_FORWARD_HOST_ROPE)
    object.__setattr__(new, "forward", types.MethodType(_fused_self_attention_forward, new))
    return new


class ComfyWan:
    """`WanDiT` over a ComfyUI Wan MODEL; linear paths are relative to `model.diffusion_model`."""

    def __init__(self, model_patcher: Any):
        self.kind = check_wan_model(model_patcher, node="FFProp")
        dm = model_patcher.model.diffusion_model
        self.patcher = model_patcher
        head_dim = dm.dim // dm.num_heads
        self._dims = WanDims(
            hidden_size=dm.dim,
            num_heads=dm.num_heads,
            head_dim=head_dim,
            num_layers=len(dm.blocks),
            patch_size=tuple(dm.patch_size),
            in_channels=dm.patch_embedding.weight.shape[1],
            out_channels=dm.out_dim,
            text_dim=dm.text_embedding[0].weight.shape[1],
            rope_axes_dim=_axes(head_dim),
            clip_dim=1280 if dm.img_emb is not None else None,
        )

    @property
    def dims(self) -> WanDims:
        return self._dims

    @property
    def module(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    def blocks(self) -> list[nn.Module]:
        return list(self.module.blocks)

    def linear_names(self) -> dict[str, list[str]]:
        return names.block_linear_paths("comfy", self._dims.num_layers, self._dims.clip_dim is not None)

    def training_contract(self) -> contextlib.AbstractContextManager:
        """The host's training contract (`host_training`), entered by every trainer around its loop."""
        return host_training()

    def streams_weights(self) -> bool:
        """Whether the host streams the weights itself (dynamic VRAM), so a trainer's own block swap must not."""
        return streams_weights(self.patcher)

    def predict(self, x_t: Tensor, t: Tensor | float, cond: WanCond) -> Tensor:
        """x_t [B, 16, F, h, w], t [B] in 0..1 (1 = noise) -> velocity [B, 16, F, h, w] in x_t's dtype.

        Loads the patcher (so its object/weight patches apply) and calls the DiT like `BaseModel._apply_model`:
        inputs in the model's compute dtype, timestep t * 1000 in float32, a copy of the patcher's
        transformer_options (block replacements apply; sampling-time wrappers do not)."""
        import comfy.model_management as mm

        dims = self._dims
        x = model_input(x_t, cond, dims)
        b = x.shape[0]
        context = check_context(cond, dims, b)
        clip = check_clip(cond, dims, b)
        if clip is not None and dims.clip_dim is None:
            log_once("comfy-clip-ignored", "FFP host: this Wan model has no image embedder; clip_tokens are ignored.")
            clip = None
        mm.load_models_gpu([self.patcher])
        base = self.patcher.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        device = self.patcher.load_device
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        out = base.diffusion_model(
            x.to(device, dtype),
            timesteps(t, b, device),
            context.to(device, dtype),
            clip_fea=None if clip is None else clip.to(device, dtype),
            transformer_options=options,
        )
        return out.to(x_t.dtype)

    def with_rope_positions(self, fn: RopePositionFn) -> "ComfyWan":
        """A new adapter on `patcher.clone()` with an object patch of `diffusion_model.rope_embedder`.
        Hooks compose: the newest fn sees the stock ids and feeds any hook already on this MODEL."""
        clone = self.patcher.clone()
        clone.add_object_patch(ROPE_OBJECT, RopePositionWrapper(clone.get_model_object(ROPE_OBJECT), fn))
        return ComfyWan(clone)

    def with_fused_rope(self, backend: str = "auto") -> "ComfyWan":
        """A new adapter on a clone whose self-attentions apply RoPE through `kernels.rope_qk` (backend
        auto/triton/torch) at the positions the rope hooks produce. Object patches only: each block's
        `self_attn` and `rope_embedder` (a `PositionRecorder` innermost, under any existing position hooks).
        Where the host's self-attention is not the code the fused one copies (`fused_path_proven`), the clone
        keeps the host's own: position hooks then reach RoPE through the host's table."""
        from ...kernels import resolve_backend

        resolve_backend(backend, "cpu")  # validates the name; the device is decided per call
        clone = self.patcher.clone()
        attn = clone.get_model_object("diffusion_model.blocks.0.self_attn")
        if not fused_path_proven(attn):
            log_once("comfy-host-rope", "FFP AST-RoPE: this ComfyUI's %s.forward is not the one the fused RoPE path "
                     "copies (ComfyUI 0.3.64 or 0.28); its own self-attention applies RoPE at the remapped positions "
                     "(backend setting unused).", type(getattr(attn, "_ffp_stock", attn)).__name__,
                     level=logging.INFO)
            return ComfyWan(clone)
        state = RopeState(backend)
        chain = []
        rope = clone.get_model_object(ROPE_OBJECT)
        while isinstance(rope, (RopePositionWrapper, PositionRecorder)):
            if isinstance(rope, RopePositionWrapper):
                chain.append(rope.fn)
            rope = rope.inner
        rope = PositionRecorder(rope, state)
        for fn in reversed(chain):
            rope = RopePositionWrapper(rope, fn)
        clone.add_object_patch(ROPE_OBJECT, rope)
        for i in range(self._dims.num_layers):
            name = f"diffusion_model.blocks.{i}.self_attn"
            clone.add_object_patch(name, fused_self_attention(clone.get_model_object(name), state))
        return ComfyWan(clone)


def _axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE real dims per axis (t, h, w) exactly as WanModel builds its EmbedND."""
    return (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
