"""AST-RoPE nodes: the patch node, a loader that patches on load, and the predictor trainer (glue only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import comfy.sd
import comfy.utils
import folder_paths
import torch

from ...kernels import BACKENDS
from .._comfy import io, ui
from ..common import log, log_once, safe_output_path
from ..host.comfy import ComfyWan, check_wan_model
from ..lora_edit.node import MemoryType
from ..lora_edit.options import PRESET_ORDER
from .pairs import PairSet
from .patch import MODES, VARIANTS, apply_ast_rope, choose_alphas
from .positions import FIRST_FRAME, HeadSplit, check_latent
from .predictor import AlphaPredictor, PredictorConfig, load_predictor, save_predictor
from .train import PredictorTrainSettings, i2v_samples, train_predictor

FOLDER = "ast_rope"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})

Predictor = io.Custom("FFP_AST_ROPE_PREDICTOR")
NONE = "none"
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def _predictor_files() -> list[str]:
    return [NONE] + folder_paths.get_filename_list(FOLDER)



def _name_problem(filename, to_path) -> bool | str:
    """validate_inputs for an output file name: True, or the error to_path(filename) raises (a name linked from
    another node is checked when the node runs)."""
    if not isinstance(filename, str):
        return True
    try:
        to_path(filename)
    except ValueError as e:
        return str(e)
    return True

def _predictor_path(filename: str) -> Optional[Path]:
    """models/ast_rope/<filename>.safetensors, validated and versioned (_2, _3, ...); None for an empty name."""
    if not filename.strip():
        return None
    return safe_output_path(folder_paths.get_folder_paths(FOLDER)[0], filename, ".safetensors")


def _encode(model, vae):
    """IMAGE [T, H, W, 3] -> model-space latent [1, 16, F, H/8, W/8] (VAE encode + process_latent_in)."""
    def encode(frames: torch.Tensor) -> torch.Tensor:
        return model.model.process_latent_in(vae.encode(frames[..., :3])).float().cpu()
    return encode


def _pair_conditioning(pair, context: torch.Tensor, clip, clip_vision) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A folder pair's own text embedding (its prompt through `clip`; zeros shaped like the node's when it has
    none or no clip is connected) and CLIP-vision tokens of its own first frame (None without clip_vision)."""
    if pair.prompt is not None and clip is not None:
        ctx = clip.encode_from_tokens_scheduled(clip.tokenize(pair.prompt))[0][0].float()
    else:
        log_once(f"ffp-pair-noprompt-{pair.name}", "FFP AST-RoPE: pair '%s' trains with a zero text embedding (%s).",
                 pair.name, "no prompt file" if pair.prompt is None else "no clip connected")
        ctx = torch.zeros_like(context)
    tokens = None
    if clip_vision is not None:
        tokens = clip_vision.encode_image(pair.source[:1]).penultimate_hidden_states.float()
    return ctx, tokens


def _source_latent(model, source_latent, source_images, vae):
    if source_latent is not None:
        raw = check_latent(source_latent["samples"].float(), "source_latent")  # before broadcasting can hide it
        return model.model.process_latent_in(raw).cpu()
    if source_images is not None:
        if vae is None:
            raise ValueError("source_images needs the Wan VAE to encode them: connect 'vae' (or a source_latent).")
        from ..video.frames import frames_to_latent

        frames_to_latent(source_images.shape[0])
        return _encode(model, vae)(source_images)
    return None


def _split(spatial_ratio: float, first_frame: str, f_prime: float) -> HeadSplit:
    return HeadSplit(float(spatial_ratio), None if f_prime <= 0 else float(f_prime), first_frame)


def _patch(model, mode, variant, alpha_s, alpha_t, alpha_max, strength, anchor_first, backend, predictor,
           source_latent=None, source_images=None, vae=None, predictor_model=None, spatial_ratio=0.5,
           first_frame="shifted", f_prime=0.0) -> tuple:
    if mode == "off":
        return model.clone(), "AST-RoPE off: stock RoPE (alpha_S = alpha_T = 1, no patch)."
    dit = ComfyWan(model)
    opts = model.model_options.get("transformer_options", {})
    if opts.get("rope_options"):
        log_once("ast-rope-rope-options", "FFP AST-RoPE: this MODEL also has ComfyUI rope_options %s; ComfyUI "
                 "applies them when building the ids and AST-RoPE remaps the result (the two compose).",
                 opts["rope_options"])
    if model.model_options.get("context_handler") is not None:
        log_once("ast-rope-context", "FFP AST-RoPE: context windows are on: each window restarts time at 0, so only "
                 "the first window holds the edited frame 0; warped steps are applied from each window's start.")
    pred = predictor_model
    if mode == "learned" and pred is None and predictor != NONE:
        pred = load_predictor(folder_paths.get_full_path_or_raise(FOLDER, predictor))
    latent = _source_latent(model, source_latent, source_images, vae) if mode in ("heuristic", "learned") else None
    alphas = choose_alphas(mode, latent=latent, alpha_s=alpha_s, alpha_t=alpha_t, variant=variant,
                           alpha_max=alpha_max, strength=strength, predictor=pred, anchor_first=anchor_first,
                           split=_split(spatial_ratio, first_frame, f_prime))
    patched = apply_ast_rope(dit, alphas, backend)
    return patched.patcher, f"AST-RoPE {mode}: {alphas.describe()}"


def _rope_inputs() -> list:
    return [
        io.Combo.Input("mode", options=list(MODES), default="manual",
                       tooltip="off: stock model. manual: the alpha widgets. heuristic: alpha_T per latent frame "
                               "from the source's motion (training-free, unverified benefit). learned: a trained "
                               "predictor over the source latent."),
        io.Combo.Input("variant", options=list(VARIANTS), default="paper",
                       tooltip="paper (FreeProp, CVPR 2026 notes): half the heads (spatial_ratio) are spatial and "
                               "move only the first frame's time index to (1 - alpha_S) * F'; the others are "
                               "temporal with time alpha_T * f; height/width unchanged. global: every head gets "
                               "(alpha_T * f, alpha_S * y, alpha_S * x). warped: one alpha_T step per latent frame "
                               "(heuristic/learned; manual is the same as global)."),
        io.Float.Input("alpha_s", default=1.0, min=0.25, max=4.0, step=0.01,
                       tooltip="1 = stock. paper: below 1 moves the edited first frame's time index towards the "
                               "last frames in the spatial heads. global/warped: spatial scale of the positions "
                               "(below 1: less spatially local attention)."),
        io.Float.Input("alpha_t", default=1.0, min=0.25, max=4.0, step=0.01,
                       tooltip="Temporal scale (manual mode; 1 = stock). Below 1 pulls every frame toward the "
                               "edited frame 0 (stronger appearance anchoring); above 1 stretches time."),
        io.Float.Input("alpha_max", default=2.0, min=1.0, max=4.0, step=0.05,
                       tooltip="Bound of the heuristic: each alpha_T step stays in [1/alpha_max, alpha_max]."),
        io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                       tooltip="Heuristic gain: 0 gives alpha_T = 1; higher reacts more strongly to motion."),
        io.Boolean.Input("anchor_first", default=True,
                         tooltip="Remap time relative to the first latent frame of the sequence, so frame 0 (the "
                                 "edited frame) keeps its position even when the ids start elsewhere."),
        io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                       tooltip="RoPE kernel: auto = fused Triton on CUDA when available, else torch. For debugging. "
                               "ComfyUI 0.3.64: used for every variant. 0.28: used for the paper variant's "
                               "per-head positions; global/warped run the host's own RoPE at our positions."),
        io.Combo.Input("predictor", options=_predictor_files(), default=NONE,
                       tooltip="Learned mode: a predictor file from models/ast_rope (written by the trainer)."),
        io.Latent.Input("source_latent", optional=True,
                        tooltip="The source video encoded by the Wan VAE (heuristic/learned modes)."),
        io.Image.Input("source_images", optional=True,
                       tooltip="Or the source video frames (4k+1 of them) plus 'vae'; used when no latent is given."),
        io.Vae.Input("vae", optional=True, tooltip="The Wan 2.1 VAE, to encode source_images."),
        Predictor.Input("predictor_model", optional=True,
                        tooltip="A predictor straight from 'Train AST-RoPE Predictor' (overrides the file)."),
    ] + _split_inputs()


def _split_inputs() -> list:
    return [
        io.Float.Input("spatial_ratio", default=0.5, min=0.0, max=1.0, step=0.0625, optional=True,
                       tooltip="paper variant: share of each layer's heads that are spatial (the first ones; the "
                               "paper does not state it). heads x ratio must be a whole number."),
        io.Combo.Input("first_frame", options=list(FIRST_FRAME), default="shifted", optional=True,
                       tooltip="paper variant, spatial heads' first-frame time index: shifted = (1 - alpha_S) * F' "
                               "(alpha 1 = stock model); literal = alpha_S * F' (the notes' wording; stock only at "
                               "alpha_S = 0)."),
        io.Float.Input("f_prime", default=0.0, min=0.0, max=1024.0, step=1.0, optional=True,
                       tooltip="paper variant: F' in latent frames; 0 = the clip's last latent frame index (F - 1)."),
    ]


_OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="A patched clone of the model; the input MODEL is unchanged."),
    io.String.Output(display_name="alphas", tooltip="The alphas used (alpha_S; alpha_T or its per-step values)."),
]


class FFPASTRoPE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPASTRoPE",
            display_name="Apply AST-RoPE · FFP",
            category="FFP/model_patches",
            description="Remaps the Wan DiT's 3-D RoPE positions to (tau(f), alpha_S*y, alpha_S*x) so the edited "
                        "first frame anchors appearance while source motion sets temporal distances (FreeProp's "
                        "AST-RoPE, engineering reading). alpha = 1 is exactly the stock model.",
            inputs=[io.Model.Input("model", tooltip="A Wan 2.1 MODEL (I2V, T2V or Fun-Control).")] + _rope_inputs(),
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, mode, variant, alpha_s, alpha_t, alpha_max, strength, anchor_first, backend, predictor,
                source_latent=None, source_images=None, vae=None, predictor_model=None, spatial_ratio=0.5,
                first_frame="shifted", f_prime=0.0) -> io.NodeOutput:
        patched, text = _patch(model, mode, variant, alpha_s, alpha_t, alpha_max, strength, anchor_first, backend,
                               predictor, source_latent, source_images, vae, predictor_model, spatial_ratio,
                               first_frame, f_prime)
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))


class FFPASTRoPELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPASTRoPELoader",
            display_name="Load Diffusion Model (AST-RoPE) · FFP",
            category="FFP/model_patches",
            description="Loads a Wan diffusion model like 'Load Diffusion Model' and applies AST-RoPE on load (the "
                        "same as that loader followed by 'Apply AST-RoPE').",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A Wan 2.1 diffusion model from models/diffusion_models."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Weight storage dtype, as in 'Load Diffusion Model' (fp8 saves memory)."),
            ] + _rope_inputs(),
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype, mode, variant, alpha_s, alpha_t, alpha_max, strength, anchor_first,
                backend, predictor, source_latent=None, source_images=None, vae=None,
                predictor_model=None, spatial_ratio=0.5, first_frame="shifted", f_prime=0.0) -> io.NodeOutput:
        options = {}
        if weight_dtype.startswith("fp8_e4m3fn"):
            options["dtype"] = torch.float8_e4m3fn
            if weight_dtype.endswith("_fast"):
                options["fp8_optimizations"] = True
        elif weight_dtype == "fp8_e5m2":
            options["dtype"] = torch.float8_e5m2
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        model = comfy.sd.load_diffusion_model(path, model_options=options)
        patched, text = _patch(model, mode, variant, alpha_s, alpha_t, alpha_max, strength, anchor_first, backend,
                               predictor, source_latent, source_images, vae, predictor_model, spatial_ratio,
                               first_frame, f_prime)
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))


class FFPASTRoPETrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPASTRoPETrain",
            display_name="Train AST-RoPE Predictor · FFP",
            category="FFP/training",
            description="Trains the AST-RoPE alpha predictor on a frozen Wan I2V model (optionally one that already "
                        "carries a LoRA-Edit LoRA) with the flow-matching loss: per video, on an edited clip, or "
                        "on a folder of (source, edited) clip pairs with optional self-distillation. Saves it to "
                        "models/ast_rope.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan 2.1 I2V MODEL the predictor is trained for (kept frozen)."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (encodes the clips)."),
                io.Conditioning.Input("positive", tooltip="Text conditioning (e.g. the clip's prompt); only its "
                                      "text embedding is used."),
                io.Image.Input("source_video", tooltip="The source clip (4k+1 frames, sides multiples of 16)."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimiser steps."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the predictor."),
                io.Combo.Input("variant", options=list(VARIANTS), default="paper",
                               tooltip="paper: one alpha_S and alpha_T per clip applied per head group (FreeProp's "
                                       "predictor: transformer + two-headed MLP); global: one alpha pair for all "
                                       "heads; warped: one alpha_T step per latent frame (per-frame head)."),
                io.Float.Input("alpha_max", default=2.0, min=1.05, max=4.0, step=0.05,
                               tooltip="alpha = exp(tanh(s) ln alpha_max): every alpha stays in [1/alpha_max, alpha_max]."),
                io.Int.Input("width", default=256, min=16, max=1024, step=16, tooltip="Predictor transformer width."),
                io.Int.Input("depth", default=2, min=1, max=8, tooltip="Predictor transformer layers."),
                io.Boolean.Input("self_distill", default=False,
                                 tooltip="Add FreeProp's self-distillation terms (motion + MMD drift) against the "
                                         "identity task; needs edited_video or pairs_folder."),
                io.Float.Input("lambda_motion", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the frame-similarity motion loss (self-distillation)."),
                io.Float.Input("lambda_mmd", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the MMD drift loss (self-distillation)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed for noise, time and init."),
                io.String.Input("filename", default="ast_rope_predictor",
                                tooltip="Saved as models/ast_rope/<filename>.safetensors (letters, digits, - _ . "
                                        "spaces, '/' between subfolders; no '..', no absolute path). An existing "
                                        "file is kept: the new one gets _2, _3, ... Empty: do not save."),
                io.Image.Input("edited_video", optional=True,
                               tooltip="The edited version of source_video (same size/length): trains FFP "
                                       "(edited frame 1 -> edited clip) instead of reconstructing the source."),
                io.String.Input("pairs_folder", default="", optional=True,
                                tooltip="A folder of pairs to train on as well: <name>/source.mp4 + <name>/edited.mp4 "
                                        "(+ <name>/prompt.txt), or <name>_source.mp4 + <name>_edited.mp4 (+ "
                                        "<name>.txt). Each pair uses its own prompt (encoded with 'clip') and its "
                                        "own first frame (with 'clip_vision'), never those of source_video."),
                io.Int.Input("max_frames", default=33, min=5, max=257, step=4, optional=True,
                             tooltip="Frames read per clip from pairs_folder (4k+1)."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="CLIP-vision output of source_video's first frame (I2V image "
                                                  "tokens; used for source_video only)."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto", optional=True,
                               tooltip="RoPE kernel used while training (auto: Triton on CUDA when available; both "
                                       "carry the alpha gradient). On ComfyUI 0.28 used for the paper variant only."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text encoder for the pairs' own prompts (prompt.txt). Without it, or for a "
                                      "pair without a prompt, that pair trains with a zero text embedding."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP vision model for the pairs' own first frames (I2V image tokens); "
                                            "without it pairs train without image tokens."),
            ],
            outputs=[
                Predictor.Output(display_name="predictor", tooltip="The trained predictor (connect to Apply AST-RoPE)."),
                io.String.Output(display_name="file", tooltip="Path of the saved predictor ('' when not saved)."),
                io.String.Output(display_name="report", tooltip="Loss at start and end, and the predicted alphas."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename: str) -> bool | str:
        return _name_problem(filename, _predictor_path)

    @classmethod
    def execute(cls, model, vae, positive, source_video, steps, learning_rate, variant, alpha_max, width, depth,
                self_distill, lambda_motion, lambda_mmd, seed, filename, edited_video=None, pairs_folder="",
                max_frames=33, clip_vision_output=None, backend="auto", clip=None, clip_vision=None) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..lora_edit.lowvram import MemorySettings
        from ..lora_edit.node import interrupted, loss_progress, trained_alone, trainer_clone

        _predictor_path(filename)                    # a bad file name fails now, not after training
        trainer = trainer_clone(model, MemorySettings(gradient_checkpointing=False))
        dit = ComfyWan(trainer)
        encode = _encode(trainer, vae)
        # the server runs nodes under inference mode: latents and text made there are inference tensors, which
        # autograd refuses to save for backward (the positions' gradient runs through the DiT), so the training
        # inputs are made outside it
        with torch.inference_mode(False):
            context = positive[0][0].float().clone()
            image_tokens = None if clip_vision_output is None else \
                clip_vision_output.penultimate_hidden_states.float().clone()
            edited = None if edited_video is None else edited_video.clone()
            samples = [i2v_samples(source_video.clone(), encode, context, image_tokens, edited)]
            pairs = PairSet.from_folder(pairs_folder, max_frames) if pairs_folder.strip() else PairSet([])
            for i in range(len(pairs)):
                pair = pairs[i]
                ctx, tokens = _pair_conditioning(pair, context, clip, clip_vision)
                samples.append(i2v_samples(pair.source, encode, ctx.clone(), None if tokens is None else tokens.clone(),
                                           pair.edited))
        if self_distill and edited_video is None and len(samples) == 1:
            raise ValueError("self_distill needs edited clips: connect edited_video or set pairs_folder.")
        if edited_video is None and len(samples) > 1:
            samples = samples[1:]  # pairs given: the source clip alone would be an identity sample; keep pairs only
        settings = PredictorTrainSettings(steps=steps, learning_rate=learning_rate, seed=seed, variant=variant,
                                          backend=backend, self_distill=self_distill, lambda_motion=lambda_motion,
                                          lambda_mmd=lambda_mmd)
        config = PredictorConfig(width=width, depth=depth, heads=max(1, width // 64), alpha_max=alpha_max,
                                 arch="frames" if variant == "warped" else "paper")
        on_step = loss_progress(comfy.utils.ProgressBar(steps), label="AST-RoPE predictor")   # live loss curve
        # cast_frozen: ComfyUI casts (copies) the frozen weights per forward; outside inference mode: trainable
        with trained_alone(trainer, cast_frozen=True), torch.inference_mode(False):
            mm.load_models_gpu([trainer])
            result = train_predictor(dit, samples, settings, AlphaPredictor(config, seed=seed), on_step=on_step,
                                     should_stop=interrupted)
        path = _predictor_path(filename)             # again: another run may have saved that name meanwhile
        if path is not None:
            save_predictor(result.predictor, path)
            log.info("FFP AST-RoPE: predictor saved to %s", path)
        text = (f"loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g} over {steps} steps "
                f"({len(samples)} clip(s)); {result.alphas.describe()}")
        return io.NodeOutput(result.predictor, "" if path is None else str(path), text, ui=ui.PreviewText(text))


class FFPFreePropApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPFreePropApply",
            display_name="Apply FreeProp Model · FFP",
            category="FFP/model_patches",
            description="Applies a FreeProp model file (LoRA + AST-RoPE predictor in one .safetensors, written by "
                        "'Train FreeProp Model' or 'ffprop train freeprop') to a Wan MODEL: the LoRA as weight patches and AST-RoPE at the "
                        "alphas its predictor gives for the source video. Then sample with the stock sampler "
                        "(WanImageToVideo with the edited first frame, or WanFunControlToVideo for Fun-Control).",
            inputs=[
                io.Model.Input("model", tooltip="The Wan 2.1 MODEL the FreeProp model was trained on."),
                io.Combo.Input("freeprop", options=_predictor_files(), default=NONE,
                               tooltip="A FreeProp model file in models/ast_rope (train one with 'Train FreeProp "
                                       "Model' on a few pairs, or `ffprop train freeprop --out "
                                       "ComfyUI/models/ast_rope/NAME.safetensors` on a dataset; no public "
                                       "FreeProp weights exist). 'none' until you have one."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="LoRA strength (1 = as trained)."),
                io.Latent.Input("source_latent", optional=True,
                                tooltip="The source video encoded by the Wan VAE (the predictor's input)."),
                io.Image.Input("source_images", optional=True, tooltip="Or the source frames (4k+1) plus 'vae'."),
                io.Vae.Input("vae", optional=True, tooltip="The Wan 2.1 VAE, to encode source_images."),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, freeprop, strength, source_latent=None, source_images=None, vae=None) -> io.NodeOutput:
        from .freeprop import freeprop_alphas, load_freeprop

        if freeprop == NONE:
            raise ValueError("pick a FreeProp model file in 'freeprop' (models/ast_rope); train one with 'Train FreeProp "
                             "Model' on a few clip pairs, or `ffprop train freeprop --pairs DIR --out "
                             "ComfyUI/models/ast_rope/NAME.safetensors` for a dataset (see the node's help page).")
        loaded = load_freeprop(folder_paths.get_full_path_or_raise(FOLDER, freeprop))
        patched, _ = comfy.sd.load_lora_for_models(model, None, loaded.lora.comfy_state_dict(), strength, 0)
        if loaded.predictor is None:
            text = "FreeProp (trained without AST-RoPE): LoRA only, stock RoPE."
            return io.NodeOutput(patched, text, ui=ui.PreviewText(text))
        latent = _source_latent(model, source_latent, source_images, vae)
        if latent is None:
            raise ValueError("this FreeProp model has an AST-RoPE predictor: connect source_latent, or source_images "
                             "and a VAE.")
        dit = ComfyWan(patched)
        alphas = freeprop_alphas(loaded, latent, dit.dims.num_heads)
        out = apply_ast_rope(dit, alphas, "auto").patcher
        text = f"FreeProp: LoRA x{strength:g}; AST-RoPE {alphas.describe()}"
        return io.NodeOutput(out, text, ui=ui.PreviewText(text))


PAIR_SLOTS = 3
"""Pairs the train node takes: source/edited, source_2/edited_2, source_3/edited_3 (a dataset: the CLI)."""


def _train_pairs(pairs: list, window_frames: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check and prepare the node's (source, edited) IMAGE pairs [T, H, W, 3]: both connected, same length and
    size, T = 4k+1; sides cropped (centre, the same crop for both) to multiples of 16; trimmed to a memory
    preset's window_frames (FreeProp trains a clip whole). ValueError naming the pair, the numbers and the fix."""
    from ..video.frames import fix_size, frames_to_latent

    out = []
    for k, (src, ed) in enumerate(pairs, 1):
        tag = "" if k == 1 else f"_{k}"
        if src is None and ed is None:
            continue
        if src is None or ed is None:
            have, miss = (f"source{tag}", f"edited{tag}") if ed is None else (f"edited{tag}", f"source{tag}")
            raise ValueError(f"pair {k}: {have} is connected but {miss} is not; connect both clips of a pair (or "
                             "neither).")
        if tuple(src.shape[:3]) != tuple(ed.shape[:3]):
            raise ValueError(f"pair {k}: edited{tag} is {ed.shape[0]} frames of {ed.shape[2]}x{ed.shape[1]}, "
                             f"source{tag} {src.shape[0]} frames of {src.shape[2]}x{src.shape[1]}; the two clips of "
                             "a pair must have the same frame count and size (load both with the same frame cap "
                             "and resize/crop settings).")
        try:
            frames_to_latent(src.shape[0])
        except ValueError as e:
            raise ValueError(f"pair {k} (source{tag}/edited{tag}): {e}") from None
        src, note = fix_size(src.float().cpu(), "crop")
        ed, _ = fix_size(ed.float().cpu(), "crop")
        if note:
            log.info("FFP FreeProp trainer: pair %d: %s", k, note)
        if window_frames and src.shape[0] > window_frames:
            log.info("FFP FreeProp trainer: pair %d trains its first %d of %d frames (the memory preset's window; "
                     "FreeProp trains clips whole).", k, window_frames, src.shape[0])
            src, ed = src[:window_frames], ed[:window_frames]
        out.append((src, ed))
    if not out:
        raise ValueError("no training pairs: connect source and edited (and optionally source_2/edited_2, ...).")
    return out


def _freeprop_path(filename: str) -> Path:
    path = _predictor_path(filename) if isinstance(filename, str) else None
    if path is None:
        raise ValueError("filename is empty: type a name for the FreeProp file (saved in models/ast_rope).")
    return path


class FFPFreePropTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        pair_inputs = []
        for k in range(2, PAIR_SLOTS + 1):
            pair_inputs += [
                io.Image.Input(f"source_{k}", optional=True, tooltip=f"Pair {k}: another source clip (any size "
                               "and 4k+1 length of its own)."),
                io.Image.Input(f"edited_{k}", optional=True, tooltip=f"Pair {k}: the edited version of source_{k} "
                               "(same frame count and size)."),
            ]
        return io.Schema(
            node_id="FFPFreePropTrain",
            display_name="Train FreeProp Model · FFP",
            category="FFP/training",
            description="Trains a FreeProp model (a LoRA + the AST-RoPE alpha predictor, with the identity-"
                        "propagation teacher) on a few (source, edited) clip pairs inside ComfyUI and saves it to "
                        "models/ast_rope for 'Apply FreeProp Model'. For a dataset use `ffprop train freeprop`. "
                        "Your MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 I2V (36-channel) or Fun-Control (48-channel) MODEL; the "
                               "FreeProp file only works on the model it was trained on. Kept frozen."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (encodes the clips once, before training)."),
                io.Conditioning.Input("positive", tooltip="Text conditioning used for every pair (e.g. a caption of "
                                      "the edited clips); only its text embedding is used."),
                io.Image.Input("source", tooltip="Pair 1: the source clip (4k+1 frames, e.g. 33 or 49; sides "
                               "not multiples of 16 are centre-cropped)."),
                io.Image.Input("edited", tooltip="Pair 1: the edited version of source (same frame count and "
                               "size): the target FreeProp learns to propagate to from its first frame."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimiser steps (one pair per step, "
                             "in turn)."),
                io.Float.Input("learning_rate", default=2e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate, cosine decay to 0 (the paper: 2e-4)."),
                io.Int.Input("rank", default=32, min=1, max=256,
                             tooltip="LoRA rank. The paper (and `ffprop train freeprop`) use 128; 32 here because "
                                     "on Wan-14B rank 128 on every block linear is 613M trainable parameters, "
                                     "9.1 GiB of fp32 weights + gradients + AdamW state beside the model, more "
                                     "than the 24GB preset leaves free; rank 32 is 2.3 GiB (from the layer sizes, "
                                     "not measured). Raise it on a larger card."),
                io.Combo.Input("variant", options=list(VARIANTS), default="paper",
                               tooltip="AST-RoPE variant the predictor drives. paper: spatial_ratio of the heads "
                                       "spatial (first frame's time index moved), the rest temporal (time scaled "
                                       "by alpha_T); needs heads x spatial_ratio whole. global: one alpha pair for "
                                       "every head. warped: one alpha_T step per latent frame."),
                io.Float.Input("spatial_ratio", default=0.5, min=0.0, max=1.0, step=0.0625,
                               tooltip="paper variant: share of each layer's heads that are spatial (not stated by "
                                       "the paper). Wan-14B has 40 heads, 1.3B 12."),
                io.Boolean.Input("teacher", default=True,
                                 tooltip="Add the identity-propagation teacher's relation losses (L_motion x 5 + "
                                         "L_MMD x 1, the paper's weights); off = flow matching only (the ablation, "
                                         "a little faster: no teacher forward)."),
                io.Combo.Input("memory_preset", options=list(PRESET_ORDER), default="24GB",
                               tooltip="The LoRA-Edit trainer's low-VRAM presets for Wan-14B (estimates): 24GB "
                                       "swaps 80 % of the blocks to CPU RAM with gradient checkpointing and "
                                       "activation offload; 16GB/12GB add split blocks; 8GB also trims every pair "
                                       "to its first 9 frames. unlimited = no checkpointing. A memory input "
                                       "overrides it."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed for LoRA/predictor init, noise and t (same seed, same file)."),
                io.String.Input("filename", default="freeprop",
                                tooltip="Saved as models/ast_rope/<filename>.safetensors (letters, digits, - _ . "
                                        "spaces, '/' between subfolders; no '..', no absolute path). An existing "
                                        "file is kept: the new one gets _2, _3, ..."),
                *pair_inputs,
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP vision model: each pair gets image tokens of its own edited first "
                                            "frame (as Wan 2.1 I2V sampling does). Without it pairs train without "
                                            "image tokens."),
                MemoryType.Input("memory", optional=True,
                                 tooltip="Manual settings from 'LoRA-Edit Memory Settings' (overrides "
                                         "memory_preset; window_frames trims each pair to that many frames)."),
            ],
            outputs=[
                io.String.Output(display_name="freeprop", tooltip="The saved file's name in models/ast_rope (pick "
                                 "it in 'Apply FreeProp Model'; refresh the node list first)."),
                io.Image.Output(display_name="loss", tooltip="Loss curve (raw and 10-step average)."),
                io.String.Output(display_name="report", tooltip="Steps, pairs, first and last loss and its parts."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename: str) -> bool | str:
        return _name_problem(filename, _freeprop_path)

    @classmethod
    def execute(cls, model, vae, positive, source, edited, steps, learning_rate, rank, variant, spatial_ratio,
                teacher, memory_preset, seed, filename, source_2=None, edited_2=None, source_3=None, edited_3=None,
                clip_vision=None, memory=None) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..lora_edit.lowvram import log_settings, preset
        from ..lora_edit.node import interrupted, loss_progress, trained_alone, trainer_clone
        from ..lora_edit.trainer import loss_curve_image
        from .freeprop import FreePropSettings, pair_sample, save_freeprop, train_freeprop

        kind = check_wan_model(model, ("i2v", "fun_control"), node="Train FreeProp")
        _freeprop_path(filename)                      # a bad file name fails now, not after training
        mem = memory if memory is not None else preset(memory_preset)
        pairs = _train_pairs([(source, edited), (source_2, edited_2), (source_3, edited_3)], mem.window_frames)
        heads = model.model.diffusion_model.num_heads
        split = HeadSplit(float(spatial_ratio))
        if variant == "paper":
            try:
                split.groups(heads)
            except ValueError:
                raise ValueError(f"variant paper: spatial_ratio {spatial_ratio:g} of this model's {heads} attention "
                                 f"heads is not a whole number of heads; pick a ratio r with {heads} x r whole, "
                                 "or variant global.") from None
        trainer = trainer_clone(model, mem)
        device, base = trainer.load_device, trainer.model
        dit = ComfyWan(trainer)
        log_settings(mem, dit.dims.num_layers)

        def encode(frames: torch.Tensor) -> torch.Tensor:
            return base.process_latent_in(vae.encode(frames[..., :3])).float().to(device)

        samples = []
        # the server runs nodes under inference mode: latents and text made there are inference tensors, which
        # autograd refuses to save for backward, so the training inputs are made outside it
        with torch.inference_mode(False):
            context = positive[0][0].float().to(device).clone()
            for src, ed in pairs:                      # a few pairs: their latents are small, encode them once
                tokens = None
                if clip_vision is not None:
                    tokens = clip_vision.encode_image(ed[:1]).penultimate_hidden_states.float().to(device).clone()
                samples.append(pair_sample(src.clone(), ed.clone(), encode, context, kind, tokens))
        config = PredictorConfig(arch="frames" if variant == "warped" else "paper")
        settings = FreePropSettings(steps=steps, learning_rate=learning_rate, rank=rank, variant=variant, split=split,
                                    teacher=bool(teacher), seed=seed, predictor=config)
        on_step = loss_progress(comfy.utils.ProgressBar(steps), label="FreeProp")   # live loss curve
        # cast_frozen: ComfyUI casts (copies) the frozen weights per forward; outside inference mode: trainable
        with trained_alone(trainer, cast_frozen=True), torch.inference_mode(False):
            mm.load_models_gpu([trainer])              # train_freeprop puts the LoRA on the weights' device
            result = train_freeprop(dit, samples, len(samples), settings, on_step=on_step, should_stop=interrupted,
                                    memory=mem)
        path = _freeprop_path(filename)                # again: another run may have saved that name meanwhile
        save_freeprop(path, result.model, {"steps": result.step, "pairs": len(samples), "kind_base": kind,
                                           "trained_by": "FFPFreePropTrain"})
        root = Path(folder_paths.get_folder_paths(FOLDER)[0])
        name = path.relative_to(root).as_posix()
        last = result.parts[-1] if result.parts else {}
        text = (f"saved models/ast_rope/{name}: {result.step} steps on {len(samples)} pair(s), loss "
                f"{result.losses[0]:.4g} -> {result.losses[-1]:.4g} ("
                + ", ".join(f"{k} {v:.4g}" for k, v in last.items()) + ")")
        log.info("FFP FreeProp trainer: %s", text)
        return io.NodeOutput(name, loss_curve_image(result.losses), text, ui=ui.PreviewText(text))


NODES = [FFPASTRoPE, FFPASTRoPELoader, FFPASTRoPETrain, FFPFreePropApply, FFPFreePropTrain]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
