"""The V3 extension ComfyUI loads: every FFP node of every room. Imports ComfyUI (layering rule)."""

from __future__ import annotations

from ._comfy import ComfyExtension, io
from .ast_rope.node import FFPASTRoPE, FFPASTRoPELoader, FFPASTRoPETrain
from .chunks.node import FFPChunkFlowPropagate, FFPChunkPlan, FFPChunkSample
from .evaluate.node import FFPEvaluate
from .flow.node import FFPFlowPropagate
from .lora_edit.node import FFPLoRAEditConditioning, FFPLoRAEditMemory, FFPSaveLoRA, FFPTrainLoRAEdit
from .masks import routes as _mask_routes  # noqa: F401  (registers GET /ffprop/frame for the web editor)
from .masks.node import FFPMaskCombine, FFPMaskOps, FFPMaskPrompts, FFPMaskPropagate, FFPSAM2Loader

NODES: list[type[io.ComfyNode]] = [FFPFlowPropagate, FFPEvaluate,
                                   FFPMaskPrompts, FFPSAM2Loader, FFPMaskPropagate, FFPMaskOps, FFPMaskCombine,
                                   FFPLoRAEditConditioning, FFPTrainLoRAEdit, FFPLoRAEditMemory, FFPSaveLoRA,
                                   FFPASTRoPE, FFPASTRoPELoader, FFPASTRoPETrain,
                                   FFPChunkPlan, FFPChunkSample, FFPChunkFlowPropagate]


class FFPropExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
