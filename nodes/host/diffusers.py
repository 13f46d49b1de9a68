"""Wan DiT adapter for diffusers' `WanTransformer3DModel` (optional dependency, imported lazily)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..common import log_once
from . import names
from .protocol import (
    CLIP_DIM,
    RopePositionFn,
    WanCond,
    WanDims,
    apply_position_fn,
    check_clip,
    check_context,
    compose_position_fns,
    model_input,
    shared_positions,
    stock_rope_ids,
    timesteps,
)

TEXT_TOKENS = 512  # diffusers' WanAttnProcessor hard-codes 512 text tokens when image tokens are present


def _diffusers_wan():
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError(f"the diffusers Wan host needs the 'diffusers' package (>= 0.33): pip install diffusers ({e})") from e
    try:
        from diffusers import WanTransformer3DModel
    except (ImportError, RuntimeError) as e:  # diffusers wraps broken optional deps (e.g. torchaudio) in RuntimeError
        raise RuntimeError(
            f"diffusers {diffusers.__version__} is installed but its WanTransformer3DModel failed to import; fix the "
            f"environment (e.g. matching torch/torchaudio builds) or pip install -U diffusers. Cause: {e}"
        ) from e
    return WanTransformer3DModel


def rope_cos_sin(pos: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """pos [L] (any real values) -> cos, sin [L, dim] float32, pairs interleaved, as diffusers'
    `get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)` with float64 angles (float32 on MPS,
    which has no float64, as diffusers does)."""
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    pos = pos.to(wide)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim))
    ang = torch.outer(pos, inv)
    return ang.cos().repeat_interleave(2, dim=1).float(), ang.sin().repeat_interleave(2, dim=1).float()


class PositionRope(nn.Module):
    """Stands in for `WanRotaryPosEmbed`: returns (cos, sin), each [1, L, 1, head_dim], for positions fn(ids).

    Integer positions inside the stock table are read from it (bit-identical to the stock module); other
    positions are computed the way `get_1d_rotary_pos_embed` builds the table (float64 angles, interleaved).
    """

    def __init__(self, stock: nn.Module, fn: RopePositionFn, theta: float = 10000.0, state: Any = None):
        super().__init__()
        self.stock = stock
        self.fn = fn
        self.theta = theta
        self.state = state  # a RopeState when the blocks route RoPE through kernels/ (with_fused_rope)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        stock = self.stock
        _, _, f, h, w = hidden_states.shape
        key = (f, h, w, stock.freqs_cos.device)
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == key:          # only for fns marked `static` (same ids -> same output)
            if self.state is not None:
                self.state.positions = cached[1]
            return cached[2]
        p_t, p_h, p_w = stock.patch_size
        ids = stock_rope_ids(f // p_t, h // p_h, w // p_w, device=stock.freqs_cos.device)
        pos = apply_position_fn(self.fn, ids)
        if self.state is not None:
            self.state.positions = pos.float()
        elif pos.ndim == 3:
            raise RuntimeError("per-head-group RoPE positions need the fused RoPE processors (with_fused_rope); "
                               "a rope table holds one position set.")
        out = self._tables(shared_positions(pos), ids.shape[0])
        if getattr(self.fn, "static", False) and not pos.requires_grad:
            self._cache = (key, pos.float(), out)
        return out

    def _tables(self, pos: Tensor, n: int) -> tuple[Tensor, Tensor]:
        stock = self.stock
        dims = [stock.t_dim, stock.h_dim, stock.w_dim]
        cos_parts, sin_parts = [], []
        tables = zip(stock.freqs_cos.split(dims, dim=1), stock.freqs_sin.split(dims, dim=1))
        for axis, (dim, (cos_t, sin_t)) in enumerate(zip(dims, tables)):
            p = pos[:, axis].to(torch.float32 if pos.device.type == "mps" else torch.float64)
            inv = None
            if not p.requires_grad:  # an axis holds few distinct positions (F, h or w): compute those once
                p, inv = torch.unique(p, return_inverse=True)
            idx = p.round().clamp(0, cos_t.shape[0] - 1)
            exact = (p == idx)[:, None] & (not p.requires_grad)  # keep alpha gradients (AST-RoPE training)
            cos, sin = rope_cos_sin(p, dim, self.theta)
            cos, sin = cos.to(cos_t.dtype), sin.to(sin_t.dtype)
            idx = idx.long()
            cos, sin = torch.where(exact, cos_t[idx], cos), torch.where(exact, sin_t[idx], sin)
            cos_parts.append(cos if inv is None else cos[inv])
            sin_parts.append(sin if inv is None else sin[inv])
        return torch.cat(cos_parts, dim=-1).reshape(1, n, 1, -1), torch.cat(sin_parts, dim=-1).reshape(1, n, 1, -1)


class DiffusersWan:
    """`WanDiT` over a diffusers `WanTransformer3DModel` (linear paths are relative to the model)."""

    def __init__(self, model: nn.Module):
        cls = _diffusers_wan()
        if not isinstance(model, cls):
            raise ValueError(
                f"DiffusersWan needs a diffusers WanTransformer3DModel, got {type(model).__name__}. "
                "Load one with load_diffusers_wan(<diffusers-format dir>)."
            )
        self.model = model
        cfg = model.config
        rope = model.rope.stock if isinstance(model.rope, PositionRope) else model.rope
        image_dim = cfg.image_dim if getattr(model.condition_embedder, "image_embedder", None) is not None else None
        self._dims = WanDims(
            hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            num_layers=len(model.blocks),
            patch_size=tuple(cfg.patch_size),
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels or cfg.in_channels,
            text_dim=cfg.text_dim,
            rope_axes_dim=(rope.t_dim, rope.h_dim, rope.w_dim),
            clip_dim=image_dim,
        )
        self._has_added_kv = model.blocks[0].attn2.add_k_proj is not None if len(model.blocks) else False

    @property
    def dims(self) -> WanDims:
        return self._dims

    @property
    def module(self) -> nn.Module:
        return self.model

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def linear_names(self) -> dict[str, list[str]]:
        return names.block_linear_paths("diffusers", self._dims.num_layers, self._has_added_kv)

    def predict(self, x_t: Tensor, t: Tensor | float, cond: WanCond) -> Tensor:
        """x_t [B, 16, F, h, w], t [B] in 0..1 (1 = noise) -> velocity [B, 16, F, h, w] in x_t's dtype."""
        dims = self._dims
        param = self.model.patch_embedding.weight  # the input layer sets dtype and device
        x = model_input(x_t, cond, dims)
        b = x.shape[0]
        context = check_context(cond, dims, b)
        clip = check_clip(cond, dims, b)
        if dims.clip_dim is None:
            if clip is not None:
                log_once("diffusers-clip-ignored", "FFP host: this diffusers Wan has no image embedder; clip_tokens are ignored.")
            clip = None
        else:
            if clip is None:
                raise ValueError(
                    f"this diffusers Wan I2V model has an image embedder (image_dim {dims.clip_dim}) and needs "
                    f"cond.clip_tokens [B, 257, {CLIP_DIM}]; pass CLIP-vision-H penultimate tokens of the first frame."
                )
            context = _pad_text(context)
        out = self.model(
            hidden_states=x.to(param.device, param.dtype),
            timestep=timesteps(t, b, param.device),
            encoder_hidden_states=context.to(param.device, param.dtype),
            encoder_hidden_states_image=None if clip is None else clip.to(param.device, param.dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def with_rope_positions(self, fn: RopePositionFn) -> "DiffusersWan":
        """A new adapter over a shallow copy of the model (own `_modules`, shared weights) with RoPE from fn(ids)."""
        rope = self.model.rope
        if isinstance(rope, PositionRope):
            chained = fn if rope.fn is _identity else compose_position_fns(fn, rope.fn)
            rope = PositionRope(rope.stock, chained, rope.theta, rope.state)
        else:
            rope = PositionRope(rope, fn)
        twin = copy.copy(self.model)
        twin._modules = dict(self.model._modules)
        twin._modules["rope"] = rope
        return DiffusersWan(twin)

    def with_fused_rope(self, backend: str = "auto") -> "DiffusersWan":
        """A new adapter whose self-attentions (attn1) apply RoPE through `kernels.rope_qk` (auto/triton/torch)
        at the positions the rope hooks produce. Shallow copies of the model, blocks and attn1 modules (shared
        weights) carry a `FusedRopeProcessor`; this adapter's model is untouched."""
        from ...kernels import resolve_backend

        resolve_backend(backend, "cpu")  # validates the name
        state = RopeState(backend)
        rope = self.model.rope
        if isinstance(rope, PositionRope):
            rope = PositionRope(rope.stock, rope.fn, rope.theta, state)
        else:
            rope = PositionRope(rope, _identity, state=state)
        blocks = []
        for block in self.model.blocks:
            attn = copy.copy(block.attn1)
            attn.processor = FusedRopeProcessor(state, getattr(block.attn1.processor, "stock", block.attn1.processor))
            twin_block = copy.copy(block)
            twin_block._modules = dict(block._modules)
            twin_block._modules["attn1"] = attn
            blocks.append(twin_block)
        twin = copy.copy(self.model)
        twin._modules = dict(self.model._modules)
        twin._modules["rope"] = rope
        twin._modules["blocks"] = nn.ModuleList(blocks)
        return DiffusersWan(twin)


def _identity(ids: Tensor) -> Tensor:
    return ids


_identity.static = True


class RopeState:
    """Positions [L, 3] of the current forward, shared by a PositionRope and the FusedRopeProcessors."""

    def __init__(self, backend: str = "auto"):
        from ...kernels import RopeTables

        self.backend = backend
        self.positions: Optional[Tensor] = None
        self.tables = RopeTables()


class FusedRopeProcessor:
    """Self-attention processor for diffusers' WanAttention (as `WanAttnProcessor`, diffusers 0.42) with q/k RoPE
    applied by `kernels.rope_qk` from the recorded positions. Cross-attention calls go to the stock processor."""

    def __init__(self, state: RopeState, stock: Any):
        self.state = state
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        pos = self.state.positions
        if encoder_hidden_states is not None or pos is None or pos.shape[-2] != hidden_states.shape[1]:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections, dispatch_attention_fn

        from ...kernels import resolve_backend, rope_qk

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        backend = resolve_backend(self.state.backend, query.device.type)
        tables = None
        if backend == "torch":  # PositionRope's (cos, sin) [1, L, 1, D] hold these values pairwise repeated: reuse
            if pos.ndim == 2 and rotary_emb is not None and tuple(rotary_emb[0].shape) == (1, query.shape[1], 1,
                                                                            query.shape[-1]):
                tables = (rotary_emb[0][0, :, 0, 0::2], rotary_emb[1][0, :, 0, 1::2])
            else:
                tables = self.state.tables.get(pos, query.shape[-1], query.device)
        query, key = rope_qk(query, key, pos.to(query.device), backend=backend, host="diffusers", cos_sin=tables)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=getattr(self.stock, "_attention_backend", None), parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _pad_text(context: Tensor) -> Tensor:
    """Zero-pad context to 512 tokens (as the diffusers Wan pipeline does): the I2V attention splits image and
    text tokens by counting 512 text tokens from the end."""
    n = context.shape[1]
    if n > TEXT_TOKENS:
        raise ValueError(
            f"context has {n} tokens; diffusers' Wan I2V attention expects at most {TEXT_TOKENS} text tokens "
            "(it counts 512 from the end to find the image tokens). Truncate the prompt embedding to 512."
        )
    if n < TEXT_TOKENS:
        log_once("diffusers-pad-text", "FFP host: zero-padding the text context to 512 tokens for diffusers Wan I2V.")
        context = torch.cat([context, context.new_zeros(context.shape[0], TEXT_TOKENS - n, context.shape[2])], dim=1)
    return context


FP8 = torch.float8_e4m3fn
UPCAST_ATTR = "ffp_upcast_dtype"   # on a block: its fp8 tensors compute in this dtype (the BlockRunner casts them)
FP8_MAX = 448.0   # largest finite float8_e4m3fn


def is_fp8_target(name: str, tensor: Tensor) -> bool:
    """The tensors kept in fp8 by storage='fp8': the blocks' linear weights (2-D `blocks.N....weight`), ~99 % of
    Wan-14B's block bytes. Biases, norms, modulation tables and everything outside the blocks keep their dtype."""
    return name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point()


def to_fp8(t: Tensor) -> Tensor:
    """Round to float8_e4m3fn (saturating at +-448: Wan's weights are far inside that range)."""
    return t.float().clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def store_blocks_fp8(model: nn.Module) -> nn.Module:
    """Keep the blocks' linear weights in fp8 in place (the BlockRunner casts them to the compute dtype per block
    at use). Returns model."""
    for name, p in model.named_parameters():
        if is_fp8_target(name, p):
            p.data = to_fp8(p.data)
    return mark_fp8_blocks(model)


def mark_fp8_blocks(model: nn.Module, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    """Tell the BlockRunner that these blocks' fp8 tensors compute in `compute` (it casts them per block)."""
    for block in model.blocks:
        setattr(block, UPCAST_ATTR, compute)
    return model


def load_diffusers_wan(
    path: Union[str, Path], dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = "cpu",
    storage: Optional[str] = None,
) -> DiffusersWan:
    """Load a local diffusers-format WanTransformer3DModel (a dir with config.json, or a pipeline dir with
    transformer/), no hub access. storage='fp8': the blocks' linear weights are kept in float8_e4m3fn (loaded
    tensor by tensor from the shards, so CPU memory peaks at the fp8 model plus one tensor, not the bf16 model;
    compute in bf16 through the BlockRunner's per-block upcast)."""
    cls = _diffusers_wan()
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no diffusers Wan model at '{root}'; pass a directory holding config.json.")
    folder = root if (root / "config.json").is_file() else root / "transformer"
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"'{root}' is not a diffusers-format Wan transformer: expected config.json (or transformer/config.json) "
            "plus diffusion_pytorch_model*.safetensors. A single ComfyUI .safetensors file loads in ComfyUI instead."
        )
    if storage not in (None, "fp8"):
        raise ValueError(f"storage must be None (the dtype as loaded) or 'fp8'; got {storage!r}.")
    from diffusers.utils import is_accelerate_available

    if storage == "fp8":
        model = load_streaming(cls, folder, dtype)
    elif is_accelerate_available():
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        model = cls.from_pretrained(str(folder), **kwargs)
    else:
        model = _load_without_accelerate(cls, folder, dtype)
    if device is not None:
        model = model.to(device)
    return DiffusersWan(model.eval())


def load_streaming(cls, folder: Path, dtype: Optional[torch.dtype]) -> nn.Module:
    """WanTransformer3DModel built on the meta device, then filled tensor by tensor from the safetensors shards:
    block linear weights in fp8, the fp32-kept modules in fp32, the rest in `dtype` (or as stored)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    from safetensors import safe_open

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ValueError(f"'{folder}' has config.json but no diffusion_pytorch_model*.safetensors weights.")
    cfg = cls.load_config(str(folder))
    with torch.device("meta"):
        model = cls.from_config(cfg)
    keep = tuple(cls._keep_in_fp32_modules or ())
    slots = {n: (m, "_parameters") for n, m in _leaf_owners(model, "parameters")}
    slots.update({n: (m, "_buffers") for n, m in _leaf_owners(model, "buffers")})
    unexpected = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key not in slots:
                    unexpected.append(key)
                    continue
                t = fh.get_tensor(key)
                if is_fp8_target(key, t):
                    t = to_fp8(t)
                elif t.is_floating_point() and any(k in key for k in keep):
                    t = t.float()
                elif t.is_floating_point() and dtype is not None:
                    t = t.to(dtype)
                owner, kind = slots.pop(key)
                leaf = key.rsplit(".", 1)[-1]
                if kind == "_parameters":
                    owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
                else:
                    owner._buffers[leaf] = t
    mark_fp8_blocks(model)
    rope = model.rope
    model.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)   # non-persistent
    missing = [k for k in slots if not k.startswith("rope.")]
    ignored = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
    unexpected = [k for k in unexpected if not any(p in k for p in ignored)]
    if missing or unexpected:
        raise ValueError(
            f"'{folder}' does not match its config.json: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Is it a complete {cls.__name__}?"
        )
    return model.eval()


def _leaf_owners(model: nn.Module, kind: str):
    """(full name, owning module) of every parameter or buffer."""
    for prefix, mod in model.named_modules():
        for leaf, t in getattr(mod, f"_{kind}").items():
            if t is not None:
                yield (f"{prefix}.{leaf}" if prefix else leaf), mod


def _load_without_accelerate(cls, folder: Path, dtype: Optional[torch.dtype]) -> nn.Module:
    """diffusers 0.42.1's from_pretrained refuses WanTransformer3DModel without `accelerate` (its fp32-module
    rule needs low_cpu_mem_usage); build from config.json and load the safetensors shards directly instead."""
    model = load_from_shards(cls, folder)
    if dtype is not None:
        keep = tuple(cls._keep_in_fp32_modules or ())
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not any(k in name for k in keep):
                tensor.data = tensor.data.to(dtype)
    return model.eval()


def load_from_shards(cls, folder: Path) -> nn.Module:
    """A diffusers model class built from folder/config.json with its diffusion_pytorch_model*.safetensors
    shards loaded (no accelerate, no network); a clear error when the weights are absent or do not match."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ValueError(f"'{folder}' has config.json but no diffusion_pytorch_model*.safetensors weights.")
    model = cls.from_config(cls.load_config(str(folder)))
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    ignored = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not any(p in k for p in ignored)]
    if missing or unexpected:
        raise ValueError(
            f"'{folder}' does not match its config.json: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Is it a complete {cls.__name__}?"
        )
    return model
