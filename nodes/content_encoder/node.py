"""Content-encoder nodes (glue only): load, apply (MODEL -> MODEL for the stock KSampler), train on a clip, and the
mask decoder's MASK from a sampled latent."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from .._comfy import io, ui
from ..common import log, safe_output_path
from ..host.comfy import ComfyWan
from ..lora_edit.lowvram import preset
from ..lora_edit.node import MemoryType, compute_dtype, interrupted, loss_progress, trained_alone, trainer_clone
from ..lora_edit.options import PRESET_ORDER
from ..lora_edit.trainer import loss_curve_image
from ..video.frames import check_mask, check_video, frames_to_latent
from .attach import attach_comfy, injection_of
from .data import Clip, make_pair
from .files import load_encoder, save_encoder
from .model import TASKS, build_encoder, check_i2v, upsample_mask
from .train import TrainSettings, encode_pair, train_content_encoder

FOLDER = "ffprop_content_encoder"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})

EncoderType = io.Custom("FFP_CONTENT_ENCODER")
TASK_TIP = ("Which sub-task embedding the encoder uses: mask_fill = general edits (default), copy_paste = removal / "
            "insertion, colour_fill = tracking a colour-filled region (GenProp's prompt: 'track colored regions').")


def _model_dit(model, node: str) -> ComfyWan:
    dit = ComfyWan(model)                       # refuses non-Wan models with what is supported
    check_i2v(dit.dims.in_channels, node)
    return dit


def _source_latent(model, vae, source_video: torch.Tensor) -> torch.Tensor:
    """IMAGE [T, H, W, 3] -> model-space latent [1, 16, F, H/8, W/8] on the model's device."""
    check_video(source_video, "source_video")
    t, h, w = source_video.shape[:3]
    frames_to_latent(t)
    if h % 16 or w % 16:
        raise ValueError(f"source_video is {w}x{h}; Wan needs width and height that are multiples of 16 (resize or "
                         "crop it, e.g. with the size policy of 'LoRA-Edit Conditioning').")
    latent = vae.encode(source_video[..., :3].cpu())
    return model.model.process_latent_in(latent).to(model.load_device, torch.float32)


class FFPContentEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPContentEncoderLoader", display_name="Load Content Encoder · FFP", category="FFP/model_patches",
            description="Loads a GenProp content encoder (selective content encoder + mask decoder) trained by FFProp "
                        "for this MODEL from models/ffprop_content_encoder. No public GenProp weights exist.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan 2.1 image-to-video MODEL the encoder was trained for (the "
                               "encoder copies its blocks, so width and depth must match)."),
                io.Combo.Input("encoder_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors file in models/ffprop_content_encoder (written by 'Train "
                                       "Content Encoder' or `ffprop train content-encoder`)."),
            ],
            outputs=[EncoderType.Output(display_name="content_encoder", tooltip="Connect to 'Apply Content Encoder'.")],
        )

    @classmethod
    def execute(cls, model, encoder_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, encoder_name)
        dit = _model_dit(model, "Load Content Encoder")
        with torch.inference_mode(False):
            enc = load_encoder(path, dit)
        log.info("FFP content encoder: loaded %s (N=%d)", encoder_name, enc.depth)
        return io.NodeOutput(enc)


class FFPApplyContentEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPApplyContentEncoder", display_name="Apply Content Encoder · FFP", category="FFP/model_patches",
            description="Attaches a content encoder that reads the source clip to a clone of the MODEL (your model "
                        "is unchanged). Sample it with the stock KSampler and WanImageToVideo from the edited first "
                        "frame, at the source clip's length and size. Composes with LoRAs and AST-RoPE.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 image-to-video MODEL (36 input channels); T2V is refused."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (encodes the source clip)."),
                EncoderType.Input("content_encoder", tooltip="From 'Load Content Encoder' or 'Train Content Encoder'."),
                io.Image.Input("source_video", tooltip="The ORIGINAL clip (4k+1 frames, sizes multiples of 16): the "
                               "encoder reads it. Generate the same length and size."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of the encoder's injections; 0 = the stock model bit for bit."),
                io.Combo.Input("task", options=list(TASKS), default="mask_fill", tooltip=TASK_TIP),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A patched clone reading the source clip.")],
        )

    @classmethod
    def execute(cls, model, vae, content_encoder, source_video, strength, task) -> io.NodeOutput:
        _model_dit(model, "Apply Content Encoder")
        clone, _ = attach_comfy(model, content_encoder, _source_latent(model, vae, source_video), strength, task)
        return io.NodeOutput(clone)


class FFPTrainContentEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPTrainContentEncoder", display_name="Train Content Encoder (per video) · FFP",
            category="FFP/training",
            description="Trains a GenProp content encoder on one clip with its object mask: GenProp's synthetic pairs "
                        "(copy-paste / mask-and-fill / colour fill at 0.5 / 0.375 / 0.125), region-aware + gradient + "
                        "mask losses, LR warm-up + cosine, EMA. The generator stays frozen; the file is saved "
                        "atomically to models/ffprop_content_encoder.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 image-to-video MODEL (36 input channels); T2V is refused."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Image.Input("source_video", tooltip="The clip to train on (4k+1 frames, sizes multiples of 16)."),
                io.Mask.Input("object_mask", tooltip="Per-frame mask of an object in the clip (white = object; one "
                              "per frame): the region the augmentations paste, fill and colour."),
                io.Conditioning.Input("positive", tooltip="Prompt describing the clip (text encoder output)."),
                io.Int.Input("depth", default=8, min=1, max=64,
                             tooltip="N, generator blocks the encoder copies (GenProp: 24; Wan-14B has 40, 1.3B 30: "
                                     "8-20 bound the memory). Must not exceed the model's blocks."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=5e-5, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate, after 20 warm-up steps decayed on a cosine (GenProp: 5e-5)."),
                io.Int.Input("pairs", default=16, min=1, max=1000,
                             tooltip="Distinct synthetic pairs drawn from the clip (each costs 2-3 VAE encodes)."),
                io.Float.Input("ema_decay", default=0.99, min=0.0, max=0.99999, step=0.001,
                               tooltip="EMA decay of the weights that are saved and returned."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the new layers, the pairs, noise and t."),
                io.Combo.Input("memory_preset", options=list(PRESET_ORDER), default="24GB",
                               tooltip="LoRA-Edit's low-VRAM presets for the frozen generator (checkpointing, block "
                                       "swap, activation offload); the encoder's blocks are checkpointed."),
                io.String.Input("name", default="ffp_content_encoder",
                                tooltip="File name in models/ffprop_content_encoder (.safetensors is added; an "
                                        "existing file gets _2, _3, ...)."),
                MemoryType.Input("memory", optional=True, tooltip="Manual settings from 'LoRA-Edit Memory Settings'."),
            ],
            outputs=[
                EncoderType.Output(display_name="content_encoder", tooltip="The trained encoder (EMA weights)."),
                io.Image.Output(display_name="loss", tooltip="Loss curve (raw and 10-step average)."),
                io.String.Output(display_name="encoder_name", tooltip="The saved file's name in the loader's list."),
            ],
        )

    @classmethod
    def validate_inputs(cls, name: str) -> bool | str:
        if not isinstance(name, str):
            return True
        try:
            safe_output_path(folder_paths.get_folder_paths(FOLDER)[0], name, ".safetensors")
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, vae, source_video, object_mask, positive, depth, steps, learning_rate, pairs, ema_decay,
                seed, memory_preset, name, memory=None) -> io.NodeOutput:
        dit = _model_dit(model, "Train Content Encoder")
        check_video(source_video, "source_video")
        frames_to_latent(source_video.shape[0])
        mask = check_mask(object_mask.float().cpu(), "object_mask", source_video.cpu())
        mask = mask.expand(source_video.shape[0], -1, -1) if mask.shape[0] == 1 else mask
        mem = memory if memory is not None else preset(memory_preset)
        trainer = trainer_clone(model, mem)
        device, base, dtype = trainer.load_device, trainer.model, compute_dtype(trainer, mem)

        def encode(frames):
            return base.process_latent_in(vae.encode(frames[..., :3])).to(device, dtype)

        with torch.inference_mode(False):   # the server runs nodes under inference mode; training tensors must not be
            context = positive[0][0].to(device, dtype).clone()
            clips = [Clip(source_video[..., :3].float().cpu().clone(), mask[None].clone(), "clip")]
            data = [encode_pair(make_pair(clips, i, seed), encode, context) for i in range(pairs)]
            enc = build_encoder(dit, depth, seed)
        on_step = loss_progress(comfy.utils.ProgressBar(steps), label="content encoder")

        def attach(e):
            clone, state = attach_comfy(trainer, e, data[0].sce)
            return ComfyWan(clone), state

        settings = TrainSettings(steps=steps, learning_rate=learning_rate, ema_decay=ema_decay, seed=seed)
        with trained_alone(trainer, cast_frozen=True):
            result = train_content_encoder(enc, attach, lambda i: data[i % len(data)], settings, mem, on_step,
                                           interrupted, device)
        path = safe_output_path(folder_paths.get_folder_paths(FOLDER)[0], name, ".safetensors")
        save_encoder(result.encoder, path, {"steps": str(steps), "lr": str(learning_rate), "pairs": str(pairs)})
        rel = path.relative_to(folder_paths.get_folder_paths(FOLDER)[0]).as_posix()
        log.info("FFP content encoder: saved %s", path)
        return io.NodeOutput(result.encoder, loss_curve_image(result.losses), rel,
                             ui=ui.PreviewText(f"saved models/{FOLDER}/{rel}").as_dict())


class FFPContentEncoderMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPContentEncoderMask", display_name="Content Encoder Mask · FFP", category="FFP/masking",
            description="Runs the content encoder's mask decoder once on a sampled latent: the edited region per "
                        "pixel frame (GenProp's MPD side output), e.g. to composite or to check what changed.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from 'Apply Content Encoder' (the one you sampled with)."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning you sampled with "
                                      "(WanImageToVideo's output)."),
                io.Latent.Input("latent", tooltip="The sampled latent (KSampler's output)."),
                io.Float.Input("noise_level", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Flow time t of the one forward (0 = the clean latent)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of that forward's noise."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="MASK [T, H, W]: 1 = the predicted edit region.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, noise_level, seed) -> io.NodeOutput:
        state = injection_of(model)
        if state is None:
            raise ValueError("this MODEL has no content encoder; connect the MODEL output of 'Apply Content Encoder'.")
        x0 = latent["samples"]
        if tuple(x0.shape[2:]) != tuple(state.source_latent.shape[2:]):
            f, h, w = x0.shape[2:]
            sf, sh, sw = state.source_latent.shape[2:]
            raise ValueError(f"the latent is {4 * (f - 1) + 1} frames of {8 * w}x{8 * h} but the encoder's source video "
                             f"is {4 * (sf - 1) + 1} frames of {8 * sw}x{8 * sh}; sample at the source clip's size.")
        base = model.model
        comfy.model_management.load_models_gpu([model])
        dev = model.load_device
        x0 = base.process_latent_in(x0.to(dev))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
        sigma = torch.full((x0.shape[0],), float(noise_level), device=dev)
        x = (1 - noise_level) * x0 + noise_level * noise
        conds = base.extra_conds(noise=x, device=dev, cross_attn=positive[0][0].to(dev), **positive[0][1])
        extra = {k: v.cond for k, v in conds.items() if k not in ("c_concat", "c_crossattn")}
        c_concat = conds["c_concat"].cond if "c_concat" in conds else None
        state.want_mask = True
        try:
            with torch.no_grad():
                base.apply_model(x, sigma, c_concat=c_concat, c_crossattn=conds["c_crossattn"].cond,
                                 transformer_options=model.model_options.get("transformer_options", {}), **extra)
            logits = state.mask_logits
        finally:
            state.want_mask, state.mask_logits, state.feats = False, None, None
        return io.NodeOutput(upsample_mask(logits.cpu(), 8 * x0.shape[3], 8 * x0.shape[4]).float())


NODES = [FFPContentEncoderLoader, FFPApplyContentEncoder, FFPTrainContentEncoder, FFPContentEncoderMask]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
