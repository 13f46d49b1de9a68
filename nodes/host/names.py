"""Module-name tables for the Wan block linears, one per host, and a LoRA key converter.

Paths are relative to the DiT root (ComfyUI: `model.diffusion_model`; diffusers: the WanTransformer3DModel).
LoRA files use ComfyUI's keys (`diffusion_model.<path>.lora_up.weight / lora_down.weight / alpha`); the
diffusers/PEFT naming is `transformer.<path>.lora_B.weight / lora_A.weight` (alpha kept as `.alpha`).
"""

from __future__ import annotations

import re

CANONICAL = (
    "self_q", "self_k", "self_v", "self_o",
    "cross_q", "cross_k", "cross_v", "cross_o", "cross_k_img", "cross_v_img",
    "ffn_in", "ffn_out",
)  # fmt: skip

IMAGE_ONLY = ("cross_k_img", "cross_v_img")

COMFY = {
    "self_q": "self_attn.q",
    "self_k": "self_attn.k",
    "self_v": "self_attn.v",
    "self_o": "self_attn.o",
    "cross_q": "cross_attn.q",
    "cross_k": "cross_attn.k",
    "cross_v": "cross_attn.v",
    "cross_o": "cross_attn.o",
    "cross_k_img": "cross_attn.k_img",
    "cross_v_img": "cross_attn.v_img",
    "ffn_in": "ffn.0",
    "ffn_out": "ffn.2",
}

DIFFUSERS = {
    "self_q": "attn1.to_q",
    "self_k": "attn1.to_k",
    "self_v": "attn1.to_v",
    "self_o": "attn1.to_out.0",
    "cross_q": "attn2.to_q",
    "cross_k": "attn2.to_k",
    "cross_v": "attn2.to_v",
    "cross_o": "attn2.to_out.0",
    "cross_k_img": "attn2.add_k_proj",
    "cross_v_img": "attn2.add_v_proj",
    "ffn_in": "ffn.net.0.proj",
    "ffn_out": "ffn.net.2",
}

TABLES = {"comfy": COMFY, "diffusers": DIFFUSERS}
PREFIX = {"comfy": "diffusion_model.", "diffusers": "transformer."}
LORA_SUFFIX = {
    "comfy": {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"},
    "diffusers": {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"},
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _table(host: str) -> dict[str, str]:
    if host not in TABLES:
        raise ValueError(f"unknown host naming '{host}'; use one of {sorted(TABLES)}.")
    return TABLES[host]


def block_linear_paths(host: str, num_layers: int, has_image: bool) -> dict[str, list[str]]:
    """Canonical name -> [blocks.0.<path>, ..., blocks.N-1.<path>] for one host's naming."""
    table = _table(host)
    names = [n for n in CANONICAL if has_image or n not in IMAGE_ONLY]
    return {n: [f"blocks.{i}.{table[n]}" for i in range(num_layers)] for n in names}


def split_path(path: str, host: str) -> tuple[int, str]:
    """'blocks.3.self_attn.q' -> (3, 'self_q') for the given host's naming."""
    m = _BLOCK.match(path)
    inverse = {v: k for k, v in _table(host).items()}
    if m is None or m.group(2) not in inverse:
        raise ValueError(
            f"'{path}' is not a Wan block linear in {host} naming; expected blocks.N.<one of {sorted(inverse)}>."
        )
    return int(m.group(1)), inverse[m.group(2)]


def convert_path(path: str, src: str, dst: str) -> str:
    """Module path from one host's naming to the other's, e.g. blocks.0.self_attn.q <-> blocks.0.attn1.to_q."""
    i, name = split_path(path, src)
    return f"blocks.{i}.{_table(dst)[name]}"


def convert_lora_key(key: str, to: str) -> str:
    """Convert one LoRA key between ComfyUI and diffusers/PEFT naming (the source naming is detected).

    'diffusion_model.blocks.0.self_attn.q.lora_up.weight' <-> 'transformer.blocks.0.attn1.to_q.lora_B.weight'.
    """
    _table(to)
    for src in TABLES:
        if not key.startswith(PREFIX[src]):
            continue
        body = key[len(PREFIX[src]) :]
        for kind, suffix in LORA_SUFFIX[src].items():
            if body.endswith(suffix):
                path = convert_path(body[: -len(suffix)], src, to)
                return PREFIX[to] + path + LORA_SUFFIX[to][kind]
    raise ValueError(
        f"'{key}' is not a Wan block LoRA key; expected 'diffusion_model.blocks.N.<linear>.lora_up.weight|"
        "lora_down.weight|alpha' (ComfyUI) or 'transformer.blocks.N.<linear>.lora_A.weight|lora_B.weight|alpha' "
        "(diffusers)."
    )
