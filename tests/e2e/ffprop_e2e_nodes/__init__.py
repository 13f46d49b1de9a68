"""Test-only ComfyUI node pack for the e2e tier. Never registered by the shipped FFProp pack.

The e2e harness symlinks this folder into the temporary custom_nodes dir and whitelists it next to the pack.
It exists because no small Wan text encoder exists (HOST.md 1a): ComfyUI only accepts a full UMT5-XXL, and no
core node makes a 4096-wide CONDITIONING without one. `E2EWanTextConditioning` stands in for
CLIPLoader(wan) + CLIPTextEncode in CPU-sized workflows. Node ids deliberately do not start with "FFP", so
they can never be mistaken for the pack's nodes.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io

WAN_TEXT_DIM = 4096  # comfy/model_detection.py builds every Wan 2.1 model with text_dim 4096


class E2EWanTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="E2EWanTextConditioning",
            display_name="Wan Text Conditioning (test stub) · E2E",
            category="_for_testing/ffprop_e2e",
            description="Emits a [1, tokens, 4096] Wan text CONDITIONING without a text encoder: zeros, or seeded "
                        "random values when scale > 0. For CPU end-to-end tests with tiny random Wan models only.",
            inputs=[
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Number of text tokens N in [1, N, 4096]."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed for the random values (used when scale > 0)."),
                io.Float.Input("scale", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="0 = all zeros; otherwise standard normal values times scale."),
            ],
            outputs=[io.Conditioning.Output(tooltip="A Wan 2.1 text conditioning, [1, tokens, 4096].")],
        )

    @classmethod
    def execute(cls, tokens: int, seed: int, scale: float) -> io.NodeOutput:
        if scale > 0:
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn((1, tokens, WAN_TEXT_DIM), generator=g) * scale
        else:
            cond = torch.zeros((1, tokens, WAN_TEXT_DIM))
        return io.NodeOutput([[cond, {}]])


class E2EExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [E2EWanTextConditioning]


async def comfy_entrypoint() -> E2EExtension:
    return E2EExtension()
