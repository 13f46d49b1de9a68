"""diffusers -> ComfyUI key layout for the world models (the original Wan 2.1 checkpoint layout ComfyUI loads).

`vae_to_comfy(sd, num_res_blocks)`: AutoencoderKLWan keys -> ComfyUI's `comfy.ldm.wan.vae.WanVAE` keys
(load with `comfy.sd.VAE(sd=...)`). `dit_to_comfy(sd)`: WanTransformer3DModel keys -> ComfyUI's `WanModel`
raw keys (load with `comfy.sd.load_diffusion_model_state_dict`). Tensors are shared, not copied.

    python -m ffprop.nodes.world.convert OUT_DIR   # writes world_vae_comfy.safetensors, world_dit_i2v_comfy.safetensors

ComfyUI limits (read from comfy/sd.py and comfy/model_detection.py): both 0.28 and 0.3.64 build the Wan 2.1
VAE with num_res_blocks 2 and dim_mult [1, 2, 4, 4]; 0.28 reads the width from `decoder.head.0.gamma`, 0.3.64
hard-codes width 96 (only the real Wan 2.1 VAE loads there). The DiT: num_heads = dim // 128, so head_dim must
be 128; without `img_emb` keys a 36-channel model is detected as model_type t2v, whose concat_cond still
appends the 4-channel mask and the image latent (as for Wan 2.2 I2V).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from torch import Tensor

_RES = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
        "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}
_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
        "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
        "decoder.norm_out.": "decoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
        "decoder.conv_out.": "decoder.head.2."}


def _res(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest  # Resample keys (resample.1.*, time_conv.*) are named alike


def vae_key(key: str, num_res_blocks: int) -> str:
    """One AutoencoderKLWan key -> its ComfyUI / original-Wan name."""
    for a, b in _TOP.items():
        if key.startswith(a):
            return b + key[len(a):]
    m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$", key)
    if m:
        side, kind, i, rest = m.groups()
        slot = 1 if kind == "attentions" else 2 * int(i)
        return f"{side}.middle.{slot}.{rest if kind == 'attentions' else _res(rest)}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_res(m.group(2))}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$", key)
    if m:
        stage, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        per = num_res_blocks + 2                        # (num_res_blocks + 1) resblocks + 1 upsampler
        slot = stage * per + (j if kind == "resnets" else num_res_blocks + 1)
        return f"decoder.upsamples.{slot}.{_res(rest) if kind == 'resnets' else rest}"
    raise ValueError(f"unexpected AutoencoderKLWan key '{key}' (is this a Wan 2.1 VAE in diffusers layout?)")


def vae_to_comfy(sd: dict[str, Tensor], num_res_blocks: int) -> dict[str, Tensor]:
    return {vae_key(k, num_res_blocks): v for k, v in sd.items()}


_DIT = (  # applied in order to each diffusers key
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)


def dit_key(key: str) -> str:
    """One WanTransformer3DModel key (no image embedder) -> ComfyUI WanModel's raw key."""
    if key == "scale_shift_table":
        return "head.modulation"
    if "image_embedder" in key or "add_k_proj" in key or "add_v_proj" in key:
        raise ValueError(f"'{key}': the world converter handles Wan DiTs without an image (CLIP) embedder only.")
    for a, b in _DIT:
        key = key.replace(a, b)
    key = re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", key)
    return re.sub(r"^(blocks\.\d+)\.norm2\.", r"\1.norm3.", key)   # diffusers norm2 = cross-attn norm = Wan norm3


def dit_to_comfy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {dit_key(k): v for k, v in sd.items()}


def main(argv=None) -> int:
    from safetensors.torch import save_file

    from .model import load_world_models

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    world = load_world_models()
    vae = world.vae.vae
    save_file({k: v.contiguous() for k, v in vae_to_comfy(vae.state_dict(), vae.config.num_res_blocks).items()},
              str(out / "world_vae_comfy.safetensors"))
    save_file({k: v.contiguous() for k, v in dit_to_comfy(world.dit.model.state_dict()).items()},
              str(out / "world_dit_i2v_comfy.safetensors"))
    print(f"wrote {out}/world_vae_comfy.safetensors and world_dit_i2v_comfy.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
