"""Attach a ContentEncoder to a Wan generator without touching the generator (torch-only; ComfyUI is duck-typed).

diffusers (`attach_diffusers`): a new DiffusersWan over a shallow copy of the model whose block list holds
thin wrappers around the SAME block modules (shared weights; LoRA hooks and RoPE hooks on the base still apply).
ComfyUI (`attach_comfy`): a `clone()` of the MODEL with `("double_block", i)` patch replacements (chained onto
any already there) and one object patch of `diffusion_model.forward_orig` that records the CLIP token count;
the cached MODEL and its modules stay untouched, weight patches (LoRA) and self-attention / RoPE object
patches (AST-RoPE) still reach the real blocks.

Per forward: generator block 0's input (the patch tokens) enters the SCE with the source tokens; block i < N
gets inject_i(SCE block i) * strength added to its output; with `want_mask` the MPD runs on the last block's
input and leaves its logits in `Injection.mask_logits`. strength 0 (or an untrained encoder) = the generator.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .model import TASKS, ContentEncoder, RunBlock, check_i2v

STATE_KEY = "ffprop_content_encoder"   # transformer_options key holding the Injection on a patched ComfyUI MODEL


class Injection:
    """What one attached encoder needs per forward, and what it leaves behind.

    source_latent [1, 16, F, h, w] model-space latent of the clip the SCE reads; task: index or name in TASKS.
    probe: a latent perturbation delta [1, 16, F, h, w] (training's gradient loss): when set, block 0 also runs the
    SCE on source + probe and leaves both feature lists in `probed`."""

    def __init__(self, encoder: ContentEncoder, source_latent: Tensor, strength: float = 1.0, task: int | str = 0):
        self.encoder = encoder
        self.strength = float(strength)
        self.set_source(source_latent, task)
        self.want_mask = False
        self.probe: Optional[Tensor] = None
        self.probed: Optional[tuple[list[Tensor], list[Tensor]]] = None
        self.mask_logits: Optional[Tensor] = None
        self.feats: Optional[list[Tensor]] = None
        self.context_img_len: Optional[int] = None

    def set_source(self, source_latent: Tensor, task: int | str) -> None:
        """The clip the SCE reads (model-space latent [1, 16, F, h, w]) and the task (index or name in TASKS)."""
        if source_latent.ndim != 5 or source_latent.shape[1] != 16:
            raise ValueError(f"source latent must be [1, 16, F, h, w]; got {tuple(source_latent.shape)}.")
        _, ph, pw = self.encoder.config.patch_size
        f, h, w = source_latent.shape[2:]
        if h % ph or w % pw:
            raise ValueError(f"source latent {h}x{w} is not a multiple of the patch size {ph}x{pw}.")
        if isinstance(task, str) and task not in TASKS:
            raise ValueError(f"unknown content-encoder task '{task}'; use one of {TASKS}.")
        self.source_latent = source_latent
        self.task = TASKS.index(task) if isinstance(task, str) else int(task)
        self.grid = (f, h // ph, w // pw)

    def __deepcopy__(self, memo):   # ComfyUI deep-copies model_options on clone: share, never copy the weights
        return self

    def _encoder_for(self, x: Tensor) -> ContentEncoder:
        enc = self.encoder
        p = enc.patch_embed.weight
        if p.device != x.device or (not torch.is_grad_enabled() and p.dtype != x.dtype):
            # inference in the host's compute dtype/device; a converted copy, the loaded encoder stays as it is
            cached = getattr(self, "_converted", None)
            if cached is None or cached[0] != (x.device, x.dtype):
                self._converted = ((x.device, x.dtype), copy.deepcopy(enc).to(x.device, x.dtype))
            enc = self._converted[1]
        return enc

    @staticmethod
    def _precision(x: Tensor, enc: ContentEncoder):
        """Training a float32 encoder next to a generator computing in bf16/fp16 (a memory preset): autocast."""
        if enc.patch_embed.weight.dtype == x.dtype or x.dtype not in (torch.bfloat16, torch.float16):
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=x.dtype)

    def on_block(self, i: int, hidden_in: Tensor, out: Tensor, run_block: RunBlock) -> Tensor:
        """Generator block i ran on hidden_in and gave out [B, L, D]; returns out plus block i's injection."""
        if self.strength == 0.0 or i >= self.encoder.depth:
            return out
        enc = self._encoder_for(hidden_in)
        if i == 0:
            with self._precision(hidden_in, enc):
                self._run_sce(enc, hidden_in, run_block)
        if self.feats is None:
            raise RuntimeError("the content encoder's features are missing: generator block 0 did not run first.")
        return out + (self.strength * self.feats[i]).to(out.dtype)

    def _run_sce(self, enc: ContentEncoder, hidden_in: Tensor, run_block: RunBlock) -> None:
        """The SCE on the generator's patch tokens (and, with a probe, once more on the probed source)."""
        src = self.source_latent
        self.feats = enc.features(hidden_in, enc.source_tokens(src), self.task, run_block)
        if self.probe is not None:
            moved = enc.features(hidden_in, enc.source_tokens(src + self.probe.to(src)), self.task, run_block)
            self.probed = (self.feats, moved)

    def before_last(self, hidden_in: Tensor, run_block: RunBlock) -> None:
        """The last generator block is about to run on hidden_in (the penultimate block's output)."""
        if self.want_mask:
            enc = self._encoder_for(hidden_in)
            with self._precision(hidden_in, enc):
                self.mask_logits = enc.mask_logits(hidden_in, run_block, self.grid).float()


def _block_indices(encoder: ContentEncoder, num_layers: int) -> set[int]:
    if encoder.config.num_layers != num_layers:
        raise ValueError(f"this content encoder was made for a generator with {encoder.config.num_layers} blocks but "
                         f"the model has {num_layers}; load an encoder trained for this model.")
    return set(range(encoder.depth)) | {num_layers - 1}


def check_compatible(encoder: ContentEncoder, dims) -> None:
    """The encoder fits this generator (dims: WanDims): width and depth; ValueError saying what differs."""
    check_i2v(dims.in_channels, "the content encoder")
    if encoder.config.dim != dims.hidden_size:
        raise ValueError(f"this content encoder is {encoder.config.dim} wide but the model's hidden size is "
                         f"{dims.hidden_size} (Wan 2.1-14B: 5120, 1.3B: 1536); use an encoder trained for this model.")
    _block_indices(encoder, dims.num_layers)


# ---- diffusers ------------------------------------------------------------------------------------------------

class _DiffusersBlock(nn.Module):
    """Runs one diffusers WanTransformerBlock (a child, shared) and adds the injection around it."""

    def __init__(self, block: nn.Module, index: int, last: bool, state: Injection):
        super().__init__()
        self.block = block
        self.index = index
        self.last = last
        object.__setattr__(self, "state", state)   # not a child: the encoder stays out of the generator's tree

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the wrapped block (readers such as DiffusersWan look at attn2)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        def run(block, h, delta):
            return block(h, encoder_hidden_states, temb + delta.to(temb.dtype), rotary_emb)

        if self.last:
            self.state.before_last(hidden_states, run)
        out = self.block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return self.state.on_block(self.index, hidden_states, out, run)


def attach_diffusers(dit, encoder: ContentEncoder, source_latent: Tensor, strength: float = 1.0,
                     task: int | str = 0):
    """(a new DiffusersWan with the encoder attached, its Injection); `dit` and its model stay unchanged."""
    from ..host.diffusers import DiffusersWan

    check_compatible(encoder, dit.dims)
    state = Injection(encoder, source_latent, strength, task)
    model = dit.model
    wrap = _block_indices(encoder, len(model.blocks))
    last = len(model.blocks) - 1
    blocks = [_DiffusersBlock(b, i, i == last, state) if i in wrap else b for i, b in enumerate(model.blocks)]
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    twin._modules["blocks"] = nn.ModuleList(blocks)
    return DiffusersWan(twin), state


def generator_blocks(dit) -> list[nn.Module]:
    """The generator's own block modules behind an attached adapter (what a BlockRunner should wrap)."""
    return [b.block if isinstance(b, _DiffusersBlock) else b for b in dit.blocks()]


# ---- ComfyUI --------------------------------------------------------------------------------------------------

class _ComfyBlockPatch:
    """A `("double_block", i)` replacement: args {img, txt, vec, pe, transformer_options} -> {"img": ...}."""

    def __init__(self, index: int, last: bool, state: Injection, previous: Any = None):
        self.index, self.last, self.state, self.previous = index, last, state, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        state = self.state

        def run(block, h, delta):
            vec = args["vec"]
            return block(h, e=vec + delta.to(vec.dtype), freqs=args["pe"], context=args["txt"],
                         context_img_len=state.context_img_len, transformer_options=args["transformer_options"])

        x = args["img"]
        if self.last:
            state.before_last(x, run)
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        return {**out, "img": state.on_block(self.index, x, out["img"], run)}


class _ForwardOrig:
    """Object patch of WanModel.forward_orig: records context_img_len (the CLIP token count) for the SCE's cross-
    attention, as forward_orig computes it, then runs the previous forward_orig unchanged."""

    def __init__(self, inner, state: Injection):
        self.inner, self.state = inner, state

    def __deepcopy__(self, memo):
        return self

    def __call__(self, x, t, context, clip_fea=None, *args, **kwargs):
        self.state.context_img_len = None if clip_fea is None else clip_fea.shape[-2]
        return self.inner(x, t, context, clip_fea, *args, **kwargs)


def attach_comfy(model_patcher, encoder: ContentEncoder, source_latent: Tensor, strength: float = 1.0,
                 task: int | str = 0):
    """(a patched clone of a ComfyUI Wan I2V MODEL, its Injection); the input MODEL is not modified."""
    from ..host.comfy import ComfyWan

    dit = ComfyWan(model_patcher)
    check_compatible(encoder, dit.dims)
    state = Injection(encoder, source_latent, strength, task)
    clone = model_patcher.clone()
    num_layers = dit.dims.num_layers
    options = clone.model_options.setdefault("transformer_options", {})
    existing = options.get("patches_replace", {}).get("dit", {})
    for i in sorted(_block_indices(encoder, num_layers)):
        patch = _ComfyBlockPatch(i, i == num_layers - 1, state, existing.get(("double_block", i)))
        clone.set_model_patch_replace(patch, "dit", "double_block", i)
    name = "diffusion_model.forward_orig"
    clone.add_object_patch(name, _ForwardOrig(clone.get_model_object(name), state))
    clone.model_options["transformer_options"][STATE_KEY] = state
    return clone, state


def injection_of(model_patcher) -> Optional[Injection]:
    """The Injection on a MODEL patched by attach_comfy (None when it has none)."""
    return model_patcher.model_options.get("transformer_options", {}).get(STATE_KEY)


@torch.no_grad()
def predict_mask(dit, state: Injection, latent: Tensor, cond, t: float = 0.05, seed: int = 0) -> Tensor:
    """Run the MPD once on a sampled latent [1, 16, F, h, w]: one forward of the attached `dit` (a WanDiT with
    `state` attached) at flow time t (x_t = (1 - t) latent + t noise, seeded). -> logits [1, T, h, w]."""
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)).to(latent)
    state.want_mask = True
    try:
        dit.predict((1 - t) * latent + t * noise, t, cond)
        logits = state.mask_logits
    finally:
        state.want_mask, state.mask_logits, state.feats = False, None, None
    if logits is None:
        raise RuntimeError("the mask decoder did not run: is this MODEL's content encoder attached to its last block?")
    return logits
