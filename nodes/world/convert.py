"""diffusers -> ComfyUI key layout for the world models (the original Wan 2.1 checkpoint layout ComfyUI loads).

`vae_to_comfy(sd, num_res_blocks)`: AutoencoderKLWan keys -> ComfyUI's `comfy.ldm.wan.vae.WanVAE` keys
(load with `comfy.sd.VAE(sd=...)`); `fold_latent_format` puts the world's latent normalisation into the quant
convs (ComfyUI normalises with the real Wan 2.1 statistics); the CLI's VAE files have it folded in.
`dit_to_comfy(sd)`: WanTransformer3DModel keys -> ComfyUI's `WanModel` raw keys (load with
`comfy.sd.load_diffusion_model_state_dict`). Tensors are shared, not copied.

    python -m ffprop.nodes.world.convert OUT_DIR [--vae-width 96]
    # writes world_vae_comfy.safetensors, world_dit_i2v_comfy.safetensors, world_dit_fun_control_comfy.safetensors
    # (and world_vae_comfy_w96.safetensors: the VAE zero-padded to width 96 for ComfyUI 0.3.64, float16)

`comfy_vae_state_dict(vae, width)` is what both VAE files hold (the e2e and node tiers load exactly that).

ComfyUI limits (read from comfy/sd.py and comfy/model_detection.py): both 0.28 and 0.3.64 build the Wan 2.1
VAE with num_res_blocks 2 and dim_mult [1, 2, 4, 4]; 0.28 reads the width from `decoder.head.0.gamma`, 0.3.64
hard-codes width 96 (only the real Wan 2.1 VAE loads there: `pad_vae_width` makes an exactly equivalent
width-96 file, zero channels around the trained ones). The DiT: num_heads = dim // 128, so head_dim must
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


def wan21_latent_stats() -> tuple[Tensor, Tensor]:
    """The real Wan 2.1 VAE's per-channel latents_mean/std [16] (float64): AutoencoderKLWan's defaults, the
    numbers of ComfyUI's comfy.latent_formats.Wan21."""
    import inspect

    import torch
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return (torch.tensor(params["latents_mean"].default, dtype=torch.float64),
            torch.tensor(params["latents_std"].default, dtype=torch.float64))


def fold_latent_format(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """ComfyUI-layout VAE state_dict -> the same with the world VAE's latent normalisation folded in: ComfyUI
    normalises every Wan 2.1 latent with the REAL Wan 2.1 statistics (process_in), the world DiT was trained on
    latents normalised with the world VAE's own (config latents_mean/std). The per-channel affine map
    z_comfy = wan_mean + wan_std / world_std * (z_world - world_mean) goes into the 1x1x1 quant convs (`conv1`,
    the posterior-mean half; `conv2` undoes it), so ComfyUI's process_in(z_comfy) is the world's latent."""
    import torch

    world_mean = torch.tensor(config["latents_mean"], dtype=torch.float64)
    world_std = torch.tensor(config["latents_std"], dtype=torch.float64)
    wan_mean, wan_std = wan21_latent_stats()
    a = wan_std / world_std                               # z_comfy = a * z_world + b
    b = wan_mean - a * world_mean
    z = len(a)
    w1, b1 = sd["conv1.weight"].double().clone(), sd["conv1.bias"].double().clone()   # mean rows, then log-var
    w1[:z] *= a.view(z, 1, 1, 1, 1)
    b1[:z] = a * b1[:z] + b
    w2, b2 = sd["conv2.weight"].double(), sd["conv2.bias"].double()                   # acts on z_world
    inv = (1 / a).view(1, z, 1, 1, 1)
    b2 = b2 - (w2 * inv * b.view(1, z, 1, 1, 1)).sum((1, 2, 3, 4))
    dtype = sd["conv1.weight"].dtype
    return {**sd, "conv1.weight": w1.to(dtype), "conv1.bias": b1.to(dtype), "conv2.weight": (w2 * inv).to(dtype),
            "conv2.bias": b2.to(dtype)}


def _groups(key: str) -> int:
    """How many equal channel groups dim 0 of a weight holds (an upsampler's time_conv: 2 frames; a
    to_qkv: q, k, v); real channels are padded within each group."""
    if ".upsamplers." in key and ".time_conv." in key:
        return 2
    return 3 if ".to_qkv." in key else 1


def pad_vae_width(sd: dict[str, Tensor], config: dict, width: int) -> dict[str, Tensor]:
    """An AutoencoderKLWan state_dict (diffusers layout) of base width config['base_dim'] -> the same function
    at base width `width` (e.g. 96, the width ComfyUI 0.3.64 hard-codes): every channel axis zero-padded (real
    channels first in each group), RMS-norm gains scaled by sqrt(c / C) (the norm multiplies by sqrt(C)) and
    the attention queries by sqrt(C / c) (softmax scale 1/sqrt(C)), so the padded channels stay exactly zero
    and the real ones compute what they did."""
    import torch
    from diffusers import AutoencoderKLWan

    small = config["base_dim"]
    if width < small or width % small:
        raise ValueError(f"width must be a multiple of the VAE's base width {small}; got {width}.")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")} | {"base_dim": width}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKLWan(**cfg).state_dict().items()}
    if set(shapes) != set(sd):
        raise ValueError("the state_dict does not match its config's AutoencoderKLWan (different keys).")
    out = {}
    for key, v in sd.items():
        big = shapes[key]
        w = v.detach().float().clone()
        if key.endswith(".gamma"):
            w = w * (v.shape[0] / big[0]) ** 0.5
        if ".to_qkv." in key:                              # scale the q rows of [q; k; v]
            q = v.shape[0] // 3
            w[:q] *= (big[0] // 3 / q) ** 0.5
        padded = torch.zeros(big, dtype=torch.float32)
        g = _groups(key)
        idx = [slice(0, n) for n in w.shape]
        for j in range(g):                                 # dim 0 group by group, the other dims real-first
            n, nb = w.shape[0] // g, big[0] // g
            src = tuple([slice(j * n, (j + 1) * n)] + idx[1:])
            dst = tuple([slice(j * nb, j * nb + n)] + idx[1:])
            padded[dst] = w[src]
        out[key] = padded.to(v.dtype)
    return out


VAE_FILE = "world_vae_comfy.safetensors"


def wide_vae_file(width: int) -> str:
    """The CLI's file name of the world VAE padded to base width `width`."""
    return f"world_vae_comfy_w{width}.safetensors"


def comfy_vae_state_dict(vae, width: int | None = None) -> dict[str, Tensor]:
    """The world VAE (a diffusers AutoencoderKLWan) as ComfyUI's VAELoader loads it: ComfyUI keys with the latent
    normalisation folded in (`fold_latent_format`), in the weights' dtype: the CLI's VAE_FILE, for a ComfyUI that
    reads the Wan 2.1 VAE width from the weights (0.28). width: first zero-padded to that base width
    (`pad_vae_width`), float16: the CLI's wide_vae_file(width), for a ComfyUI that builds every Wan 2.1 VAE at
    width 96 (0.3.64)."""
    import torch

    cfg, sd = dict(vae.config), vae.state_dict()
    if width is None:
        return fold_latent_format(vae_to_comfy(sd, cfg["num_res_blocks"]), cfg)
    wide = fold_latent_format(vae_to_comfy(pad_vae_width(sd, cfg, width), cfg["num_res_blocks"]), cfg)
    return {k: v.to(torch.float16) for k, v in wide.items()}


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
    import argparse
    import os

    from safetensors.torch import save_file

    from .model import load_fun_control, load_world_models, read_manifest

    p = argparse.ArgumentParser(prog="python -m ffprop.nodes.world.convert", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder for the ComfyUI-layout files")
    p.add_argument("--vae-width", type=int, default=0,
                   help="also write world_vae_comfy_w{N}.safetensors, the VAE zero-padded to base width N "
                        "(96 for ComfyUI 0.3.64, which hard-codes it), float16")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    world = load_world_models()
    vae = world.vae.vae
    files = {VAE_FILE: comfy_vae_state_dict(vae),
             "world_dit_i2v_comfy.safetensors": dit_to_comfy(world.dit.model.state_dict())}
    if "dit_fun_control" in read_manifest()["models"]:
        files["world_dit_fun_control_comfy.safetensors"] = dit_to_comfy(load_fun_control().model.state_dict())
    if args.vae_width:
        files[wide_vae_file(args.vae_width)] = comfy_vae_state_dict(vae, args.vae_width)
    for name, sd in files.items():
        tmp = out / f"{name}.tmp{os.getpid()}"          # atomic: an interrupted run leaves no half-written model
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, out / name)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
