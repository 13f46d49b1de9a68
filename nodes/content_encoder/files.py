"""Content-encoder files: safetensors with the encoder's weights and its configuration in the metadata.

Keys: `patch_embed.*`, `fusion.*`, `inject.i.*`, `task_embed`, `mpd_head.*`, `mpd_pixel.*` as the module names
them, and the
copied Wan blocks (`blocks.i.*`, `mpd_block.*`) always in ComfyUI's / the original Wan checkpoint's naming
(`self_attn.q`, `cross_attn.k_img`, `norm3`, `modulation`), so one file loads on both hosts. Metadata: format,
depth (N), dim, num_layers (the generator's), patch_size, tasks. Written atomically. Format 1 (before the
pixel-resolution mask decoder) had a latent-grid MPD head: its SCE and MPD block still load with
`fresh_mpd_head=True` (the trainer's `--init FILE --only-mpd`), on their own it is refused with what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..common import atomic_write
from .model import TASKS, ContentEncoder, EncoderConfig

FORMAT = "ffprop_content_encoder/2"
OLD_FORMAT = "ffprop_content_encoder/1"   # latent-grid MPD head (mpd_head.2: 16 outputs per token), no mpd_pixel
MPD_HEAD = ("mpd_head.", "mpd_pixel.")
_BLOCK = re.compile(r"^(blocks\.\d+|mpd_block)\.(.+)$")
_DIFFUSERS_IMAGE = (("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
                    ("attn2.norm_added_k", "cross_attn.norm_k_img"))


def _block_key_to_comfy(rest: str) -> str:
    """A key inside one diffusers WanTransformerBlock -> its ComfyUI WanAttentionBlock name (others unchanged)."""
    from ..world.convert import dit_key

    for a, b in _DIFFUSERS_IMAGE:
        if rest.startswith(a):
            return b + rest[len(a):]
    return dit_key(f"blocks.0.{rest}")[len("blocks.0."):]


def file_key(key: str, diffusers: bool) -> str:
    """An encoder state_dict key -> its key in the file (block keys in ComfyUI naming)."""
    m = _BLOCK.match(key)
    if not diffusers or m is None:
        return key
    return f"{m.group(1)}.{_block_key_to_comfy(m.group(2))}"


def _is_diffusers(encoder: ContentEncoder) -> bool:
    return hasattr(encoder.mpd_block, "attn1")


def save_encoder(encoder: ContentEncoder, path: str | Path, extra: Optional[dict[str, str]] = None) -> Path:
    """Write `encoder` to `path` (.safetensors) atomically; extra: more metadata (e.g. how it was trained)."""
    from safetensors.torch import save_file

    diffusers = _is_diffusers(encoder)
    state = {file_key(k, diffusers): v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    meta = {"format": FORMAT, "tasks": json.dumps(list(TASKS)), **encoder.config.as_meta(), **(extra or {})}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_encoder_file(path: str | Path) -> tuple[dict[str, Tensor], EncoderConfig, dict[str, str]]:
    """(tensors, config, metadata) of an encoder file; FileNotFoundError when it is absent, ValueError naming the
    file when it is not one."""
    from ..ast_rope.predictor import read_safetensors

    path = Path(path)
    meta, state = read_safetensors(path, "cpu", f"no content encoder at '{path}'; put .safetensors files in "
                                   "models/ffprop_content_encoder.", "; re-save it with 'Train Content Encoder' or "
                                   "`ffprop train content-encoder`")
    if meta.get("format") not in (FORMAT, OLD_FORMAT):
        what = f"format '{meta['format']}'" if "format" in meta else "no FFProp content-encoder metadata"
        raise ValueError(f"'{path.name}' is not an FFProp content encoder ({what}; expected '{FORMAT}'). Choose a file "
                         "written by 'Train Content Encoder' (models/ffprop_content_encoder).")
    try:
        config = EncoderConfig(depth=int(meta["depth"]), dim=int(meta["dim"]), num_layers=int(meta["num_layers"]),
                               patch_size=tuple(json.loads(meta["patch_size"])))
    except (KeyError, ValueError) as e:
        raise ValueError(f"'{path.name}' has broken content-encoder metadata ({e}); re-save it.") from e
    return state, config, meta


def load_into(encoder: ContentEncoder, state: dict[str, Tensor], config: EncoderConfig, name: str = "file",
              fresh_mpd_head: bool = False) -> ContentEncoder:
    """Copy a file's tensors into a skeleton built for the target model (`build_encoder(dit, config.depth)`);
    ValueError saying what differs (depth N, width, generator depth, missing or extra keys, shapes).
    fresh_mpd_head: leave the skeleton's MPD head (mpd_head, mpd_pixel) as drawn and ignore the file's."""
    have = encoder.config
    for field, what in (("depth", "depth N"), ("dim", "width (hidden size)"), ("num_layers", "generator depth")):
        if getattr(have, field) != getattr(config, field):
            raise ValueError(f"'{name}' holds a content encoder with {what} {getattr(config, field)} but this model needs "
                             f"{getattr(have, field)}; train or choose an encoder for this model "
                             f"(file: N={config.depth}, dim {config.dim}, {config.num_layers} blocks; model: "
                             f"dim {have.dim}, {have.num_layers} blocks).")
    diffusers = _is_diffusers(encoder)
    wanted = {file_key(k, diffusers): k for k in encoder.state_dict()}
    if fresh_mpd_head:
        wanted = {fk: k for fk, k in wanted.items() if not fk.startswith(MPD_HEAD)}
        state = {fk: v for fk, v in state.items() if not fk.startswith(MPD_HEAD)}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    if missing or extra:
        raise ValueError(f"'{name}' does not fit this model's content-encoder layout: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}). Was it trained for another "
                         "Wan variant (e.g. with / without the CLIP image embedder)?")
    own = encoder.state_dict()
    with torch.no_grad():
        for fk, k in wanted.items():
            if own[k].shape != state[fk].shape:
                raise ValueError(f"'{name}': tensor '{fk}' is {tuple(state[fk].shape)} but this model needs "
                                 f"{tuple(own[k].shape)}; the encoder was trained for another model.")
            own[k].copy_(state[fk].to(own[k].dtype))
    return encoder


def load_encoder(path: str | Path, dit, dtype: torch.dtype = torch.float32, fresh_mpd_head: bool = False,
                 seed: int = 0) -> ContentEncoder:
    """The encoder in `path` built for `dit` (a WanDiT of either host). fresh_mpd_head: keep the file's SCE and MPD
    block, draw a new MPD head (seeded by `seed`) to retrain; the only way a format-1 file loads."""
    from .model import build_encoder, check_depth

    state, config, meta = read_encoder_file(path)
    name = Path(path).name
    if meta["format"] == OLD_FORMAT and not fresh_mpd_head:
        raise ValueError(f"'{name}' is a format-1 content encoder: its mask decoder predicts one value per 8x8-pixel "
                         f"latent cell, this version's predicts every pixel. Retrain its mask decoder (the SCE is kept): "
                         f"`python -m ffprop.nodes.content_encoder.train --init {name} --only-mpd --out NEW.safetensors`"
                         ", or train a new encoder with 'Train Content Encoder'.")
    check_depth(config.depth, dit.dims.num_layers)
    enc = build_encoder(dit, config.depth, seed=seed, dtype=dtype)
    return load_into(enc, state, config, name, fresh_mpd_head).requires_grad_(False).eval()
