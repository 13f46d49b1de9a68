"""LoRA-Edit nodes (glue only): conditioning for the stock KSampler, the trainer, its memory settings, saving.

`lora_edit_conditioning` is a plain function other nodes reuse (the chunk chainer)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

import comfy.lora
import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import node_helpers
import torch

from .._comfy import io, ui
from ..common import OnStep, log, safe_output_path
from ..host.comfy import ComfyWan, is_wan22_ti2v, model_file_name
from ..host.sampling import flow_sigmas
from ..video.frames import FIT_POLICIES, FRAME_POLICIES, SIZE_POLICIES, fit_to_frame, frames_to_latent
from .conditioning import comfy_concat_mask, masked_condition_video, prepare_clip
from .experts import (
    BOUNDARY_UNITS,
    EXPERT_ORDERS,
    HIGH,
    TI2V_MESSAGE,
    WAN22_I2V_BOUNDARY,
    check_boundary,
    check_same_architecture,
    expert_from_name,
    resolve_experts,
    split_step,
    t_range,
)
from .lora import TARGETS, LoRA, attach_weight_wrappers, create_lora, save_lora
from .lowvram import MemorySettings, log_settings, preset
from .options import PRESET_ORDER
from .trainer import (
    TrainSettings,
    build_keyframe_samples,
    build_video_samples,
    check_i2v,
    loss_curve_image,
    parse_indices,
    train_lora_edit,
)

LoraType = io.Custom("FFP_LORA")
MemoryType = io.Custom("FFP_LORA_EDIT_MEMORY")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lora_edit_conditioning(positive, negative, vae, source, edit_mask, head, clip_vision_output=None,
                           allow_empty: bool = False):
    """Like WanImageToVideo, with LoRA-Edit's masked video: returns (positive, negative, {"samples": zeros}).

    source IMAGE [T, H, W, 3] (T = 4k+1, H/W multiples of 16), edit_mask MASK (1 = edit) or None (global edit),
    head IMAGE [K, H, W, 3] (the edited first frame). Sets concat_latent_image = VAE(V_cond) and concat_mask
    (ComfyUI's sense, 1 = generate) so WAN21.concat_cond builds the 36-channel I2V input. allow_empty: a slice
    of a clip whose mask was validated whole (a chunk the edited object has left) may hold no edit."""
    t, h, w = source.shape[0], source.shape[1], source.shape[2]
    frames_to_latent(t)
    v_cond, keep = masked_condition_video(source, edit_mask, head, allow_empty=allow_empty)
    latent_image = vae.encode(v_cond[..., :3])
    values = {"concat_latent_image": latent_image, "concat_mask": comfy_concat_mask(keep).to(latent_image)}
    if clip_vision_output is not None:
        values["clip_vision_output"] = clip_vision_output
    positive = node_helpers.conditioning_set_values(positive, values)
    negative = node_helpers.conditioning_set_values(negative, values)
    latent = torch.zeros([1, 16, frames_to_latent(t), h // 8, w // 8], device=comfy.model_management.intermediate_device())
    return positive, negative, {"samples": latent}


def _clip_inputs(frame_policy_tip: bool = True) -> list:
    return [
        io.Combo.Input("frame_policy", options=list(FRAME_POLICIES), default="trim",
                       tooltip="Wan needs 4k+1 frames (49, 81): trim drops the tail, pad repeats the last frame, "
                               "error refuses. The change is logged."),
        io.Combo.Input("size_policy", options=list(SIZE_POLICIES), default="crop",
                       tooltip="Wan needs width and height that are multiples of 16: crop (centre), pad (edges), "
                               "resize, or error. Applied to the clip and its mask alike."),
    ]


def expert_inputs(verb: str) -> list:
    """The Wan 2.2 inputs shared by the trainer, the conditioning and the chunk sampler (optional, at the end, so
    Wan 2.1 workflows keep loading)."""
    return [
        io.Model.Input("model_2", optional=True,
                       tooltip=f"Wan 2.2 I2V A14B: the other expert (model = high-noise, model_2 = low-noise, as in "
                               f"the two KSamplerAdvanced). Each expert {verb} only its own noise range. Unconnected "
                               "= one Wan 2.1 model."),
        io.Float.Input("boundary", default=WAN22_I2V_BOUNDARY, min=0.0, max=1.0, step=0.005, optional=True,
                       tooltip="Where the high-noise expert hands over to the low-noise one, strictly between 0 and "
                               "1: a sigma (Wan 2.2 I2V A14B: 0.9) or a fraction of the steps (boundary_unit)."),
        io.Combo.Input("boundary_unit", options=list(BOUNDARY_UNITS), default="sigma", optional=True,
                       tooltip="sigma: the high-noise expert runs while sigma >= boundary (Wan 2.2's rule). "
                               "step_fraction: that share of the steps (samplers split at round(fraction x steps); "
                               "training uses the sigma there, ComfyUI's percent_to_sigma with the model's shift)."),
        io.Combo.Input("experts", options=list(EXPERT_ORDERS), default="auto", optional=True,
                       tooltip="Which input is which expert. auto: from the file names (..._high_noise_14B / "
                               "..._low_noise_14B) where ComfyUI records them, else model = high-noise; swapped or "
                               "same-kind pairs are errors."),
    ]


class FFPLoRAEditConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPLoRAEditConditioning",
            display_name="LoRA-Edit Conditioning · FFP",
            category="FFP/conditioning",
            description="Image-to-video conditioning for a LoRA-Edit LoRA: the source clip with the edit region "
                        "greyed out (the same mask as training) and your edited first frame as frame 1. Feeds "
                        "the stock KSampler, like WanImageToVideo.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Prompt describing the edited clip (text encoder output)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Image.Input("source_video", tooltip="The source clip frames (IMAGE), the one the LoRA was "
                               "trained on."),
                io.Image.Input("edited_first_frame", tooltip="Frame 1 after your edit; another size is fitted by "
                               "first_frame_fit."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="The training mask (white = edit region; one frame or one per frame; > 0.5 "
                                      "counts as edit). Unconnected = global edit: frames 2..T generated whole."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="CLIP-vision of the edited first frame (Wan 2.1 I2V uses it)."),
                io.Int.Input("length", default=0, min=0, max=10000, step=1,
                             tooltip="Frames to use from the clip (4k+1, e.g. 49); 0 = the whole clip."),
                *_clip_inputs(),
                io.Combo.Input("first_frame_fit", options=list(FIT_POLICIES), default="auto",
                               tooltip="How an edited frame of another size is fitted: auto = resize when the "
                                       "aspect matches, else centre-crop."),
                io.Model.Input("model", optional=True,
                               tooltip="Wan 2.2: the high-noise expert as its KSamplerAdvanced gets it (after "
                                       "ModelSamplingSD3): its schedule sets split_step. Unconnected: Wan's flow "
                                       "schedule with ComfyUI's default shift 8."),
                io.Int.Input("steps", default=20, min=1, max=10000, optional=True,
                             tooltip="Wan 2.2: the total steps of the two KSamplerAdvanced (same on both)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               optional=True, tooltip="Wan 2.2: the KSamplerAdvanced scheduler (same on both)."),
                *expert_inputs("denoises")[1:3],
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Positive with the LoRA-Edit I2V inputs."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative with the same I2V inputs."),
                io.Latent.Output(display_name="latent", tooltip="Empty latent of the clip's size for KSampler."),
                io.Int.Output(display_name="split_step",
                              tooltip="Wan 2.2: the steps at sigma >= boundary. Connect it to end_at_step of the "
                                      "high-noise KSamplerAdvanced and start_at_step of the low-noise one."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, source_video, edited_first_frame, length, frame_policy, size_policy,
                first_frame_fit, edit_mask=None, clip_vision_output=None, model=None, steps=20, scheduler="simple",
                boundary=WAN22_I2V_BOUNDARY, boundary_unit="sigma") -> io.NodeOutput:
        if model is not None:
            check_mask_aware(model)
        split = comfy_split_step(model, steps, scheduler, boundary, boundary_unit)
        source, mask, notes = prepare_clip(source_video.cpu(), None if edit_mask is None else edit_mask.cpu(),
                                           frame_policy, size_policy, length)
        head, note = fit_to_frame(edited_first_frame[:1].cpu(), source.shape[1], source.shape[2], first_frame_fit)
        for n in notes + ([note] if note else []):
            log.info("FFP LoRA-Edit conditioning: %s", n)
        return io.NodeOutput(*lora_edit_conditioning(positive, negative, vae, source, mask, head[None],
                                                     clip_vision_output), split)


def comfy_split_step(model, steps: int, scheduler: str, boundary: float, unit: str) -> int:
    """The high-noise expert's steps, as the two KSamplerAdvanced split them: a step fraction f is round(f *
    steps); a sigma counts the leading steps at sigma >= boundary on ComfyUI's schedule for `model` (its
    model_sampling, `scheduler`, `steps`), or without a model on Wan's flow schedule at ComfyUI's Wan shift 8."""
    check_boundary(boundary, unit)
    if unit == "step_fraction":
        return round(boundary * steps)
    if model is None:
        return split_step(flow_sigmas(steps, 8.0), boundary)
    ms = model.get_model_object("model_sampling")
    return split_step(comfy.samplers.calculate_sigmas(ms, scheduler, steps), boundary)


class FFPLoRAEditMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPLoRAEditMemory",
            display_name="LoRA-Edit Memory Settings · FFP",
            category="FFP/training",
            description="Manual low-VRAM settings for the LoRA-Edit trainer (overrides its memory_preset): "
                        "gradient checkpointing, block swap, activation offload, temporal windows, compute dtype.",
            inputs=[
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Re-run each block in the backward pass instead of storing activations "
                                         "(much less memory, about 30 % slower). Block swap needs it."),
                io.Float.Input("swap_fraction", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the frozen blocks kept on the CPU and streamed in one by one "
                                       "(the next is prefetched). 0.95 = 38 of Wan-14B's 40 blocks."),
                io.Int.Input("window_frames", default=0, min=0, max=10001, step=4,
                             tooltip="Train on overlapping windows of this many frames (4k+1; LoRA-Edit's "
                                     "low-cost mode uses 9). 0 = the whole clip. Inference is unchanged."),
                io.Int.Input("window_stride", default=4, min=1, max=1000,
                             tooltip="Frames between window starts (4 = one latent frame)."),
                io.Combo.Input("compute_dtype", options=list(DTYPES), default="auto",
                               tooltip="dtype the DiT computes in; auto = the model's (bf16 for fp8 weights). "
                                       "fp8 base weights: choose weight_dtype fp8 in Load Diffusion Model."),
                io.Boolean.Input("offload_activations", default=False, optional=True,
                                 tooltip="Keep the block inputs that checkpointing saves in CPU RAM (pinned, copied "
                                         "asynchronously) instead of VRAM: 8.3 GB less for 49 frames of Wan-14B at "
                                         "832x480, a little slower. Needs gradient checkpointing."),
                io.Boolean.Input("split_blocks", default=False, optional=True,
                                 tooltip="Inside each block, checkpoint self-attention, cross-attention and the FFN "
                                         "(in token chunks) separately, so backward re-runs one of them at a time: "
                                         "lets 12-16 GB cards train all 49 frames (estimate), about 25 % slower. "
                                         "Needs gradient checkpointing."),
            ],
            outputs=[MemoryType.Output(display_name="memory", tooltip="Connect to the trainer's memory input.")],
        )

    @classmethod
    def execute(cls, gradient_checkpointing, swap_fraction, window_frames, window_stride, compute_dtype,
                offload_activations=False, split_blocks=False) -> io.NodeOutput:
        if window_frames:
            frames_to_latent(window_frames)
        return io.NodeOutput(MemorySettings(gradient_checkpointing, swap_fraction, window_frames, window_stride,
                                            compute_dtype, bool(offload_activations), bool(split_blocks)))


class FFPTrainLoRAEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPTrainLoRAEdit",
            display_name="Train LoRA-Edit (per video) · FFP",
            category="FFP/training",
            description="Trains LoRA-Edit's mask-aware LoRA on one clip: stage 1 learns the clip's motion with the "
                        "edit region masked out of the I2V conditioning; stage 2 (optional) learns the look of "
                        "extra edited keyframes. Returns the MODEL with the LoRA applied (a patched clone; your "
                        "model is unchanged), the LoRA, and the loss curve.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 image-to-video MODEL (36 input channels), e.g. "
                               "wan2.1_i2v_480p_14B, or Wan 2.2 I2V A14B's high-noise expert (the low-noise one "
                               "into model_2). T2V and TI2V-5B models are refused."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Image.Input("source_video", tooltip="The source clip frames (49 frames at 832x480 in the paper)."),
                io.Conditioning.Input("positive", tooltip="Prompt for the source clip (LoRA-Edit: 'p3rs0n, ' + a "
                                      "caption of frame 1)."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Edit region (white; one per frame or one for all; a loose box, +10 %, works "
                                      "best). Unconnected = global edit (stylisation). An empty mask is an error."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="CLIP-vision of the source frame 1 (Wan 2.1 I2V uses it)."),
                io.Image.Input("keyframes", optional=True,
                               tooltip="Stage 2: extra edited frames (same size as the clip), trained as masked stills."),
                io.String.Input("keyframe_frames", default="", optional=True,
                                tooltip="1-based frame numbers of the keyframes, e.g. '25, 49' (one per image)."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Stage-1 steps (paper: 100)."),
                io.Int.Input("steps_stage2", default=100, min=0, max=100000,
                             tooltip="Stage-2 steps when keyframes are connected (paper: +100)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (paper: 1e-4)."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank (alpha = rank; code: 16)."),
                io.Combo.Input("target_modules", options=list(TARGETS), default="all_linears",
                               tooltip="all_linears: every block linear except k_img/v_img (LoRA-Edit's code); "
                                       "attention: self- and cross-attention only (the paper's wording)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed for LoRA init, noise and t (keep it fixed to reproduce a LoRA)."),
                io.Combo.Input("memory_preset", options=list(PRESET_ORDER), default="24GB",
                               tooltip="VRAM budget for Wan-14B at 832x480, 49 frames (estimates): 24GB swaps "
                                       "80 % of the blocks, full clip; 16GB 75 % and 12GB 85 %, full clip with "
                                       "split blocks (~25 % slower); 8GB 95 % + split + 9-frame windows. Swapped "
                                       "blocks wait in CPU RAM (about 0.4 GB each in fp8, 0.8 GB in bf16) and all "
                                       "presets offload activations there: each fits 24 GB of CPU RAM with fp8 "
                                       "weights. unlimited = no checkpointing. A memory input overrides it."),
                MemoryType.Input("memory", optional=True, tooltip="Manual settings from 'LoRA-Edit Memory Settings'."),
                *_clip_inputs(),
                *expert_inputs("trains"),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the LoRA applied as a "
                                "ComfyUI weight patch (works with fp8 and lowvram)."),
                LoraType.Output(display_name="lora", tooltip="The trained LoRA; save it with 'Save LoRA' (a Wan 2.2 "
                                "expert's file name gets _high_noise / _low_noise)."),
                io.Image.Output(display_name="loss", tooltip="Loss curve (raw and 10-step average); one image per "
                                "expert for a Wan 2.2 pair."),
                io.Model.Output(display_name="model_2", tooltip="Wan 2.2: model_2 with its own LoRA (trained on its "
                                "noise range only). Empty without model_2."),
                LoraType.Output(display_name="lora_2", tooltip="Wan 2.2: model_2's LoRA. Empty without model_2."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, source_video, positive, steps, steps_stage2, learning_rate, rank, target_modules,
                seed, memory_preset, frame_policy, size_policy, edit_mask=None, clip_vision_output=None,
                keyframes=None, keyframe_frames="", memory=None, model_2=None, boundary=WAN22_I2V_BOUNDARY,
                boundary_unit="sigma", experts="auto") -> io.NodeOutput:
        settings = TrainSettings(steps=steps, steps_stage2=steps_stage2, learning_rate=learning_rate, rank=rank,
                                 targets=target_modules, seed=seed)
        mem = memory if memory is not None else preset(memory_preset)
        models = [model] if model_2 is None else [model, model_2]
        for m in models:
            check_mask_aware(m)
        roles, sigma = (None,), None
        if model_2 is not None:
            roles, sigma = expert_roles(model, model_2, boundary, boundary_unit, experts)
        src, mask, notes = prepare_clip(source_video.cpu(), None if edit_mask is None else edit_mask.cpu(),
                                        frame_policy, size_policy)
        for n in notes:
            log.info("FFP LoRA-Edit trainer: %s", n)
        trainers = [trainer_clone(m, mem) for m in models]
        device, dtype, base = trainers[0].load_device, compute_dtype(trainers[0], mem), trainers[0].model

        def encode(frames):
            return base.process_latent_in(vae.encode(frames[..., :3])).to(device, dtype)

        context = positive[0][0].to(device, dtype)
        clip = None
        if clip_vision_output is not None:
            clip = clip_vision_output.penultimate_hidden_states.to(device, dtype)
        stage1 = build_video_samples(src, mask, encode, context, clip, mem.window_frames, mem.window_stride)
        stage2 = None
        if keyframes is not None and steps_stage2 > 0:
            idx = parse_indices(keyframe_frames, keyframes.shape[0], src.shape[0])
            stage2 = build_keyframe_samples(src, mask, _fit_keyframes(keyframes.cpu(), src), idx, encode, context, clip)
        per = steps + (steps_stage2 if stage2 else 0)
        bar = comfy.utils.ProgressBar(per * len(models))
        patched, loras, curves = [], [], []
        for k, (m, trainer, role) in enumerate(zip(models, trainers, roles)):
            if role is not None:
                settings = replace(settings, t_range=t_range(role, sigma))
                log.info("FFP LoRA-Edit: training the %s expert on sigma in [%.3f, %.3f) (%d of %d; the other "
                         "expert is unloaded meanwhile)", role.replace("_", "-"), *settings.t_range, k + 1, len(models))
            result = _train_expert(trainer, stage1, stage2, settings, mem, bar, k * per, per * len(models))
            result.lora.expert = role
            patched.append(apply_lora(m, result.lora))
            loras.append(result.lora)
            curves.append(loss_curve_image(result.losses, result.stages))
        pad = [None, None] if model_2 is None else []
        return io.NodeOutput(patched[0], loras[0], torch.cat(curves), *(patched[1:] + loras[1:] + pad))


def check_mask_aware(model) -> None:
    """ValueError unless `model` is a Wan I2V model with mask channels (TI2V-5B and T2V get their own message)."""
    if is_wan22_ti2v(model):
        raise ValueError(TI2V_MESSAGE)
    check_i2v(ComfyWan(model))


def expert_roles(model, model_2, boundary: float, unit: str, experts: str) -> tuple[tuple[str, str], float]:
    """Which of the two MODELs is the high-noise expert (file names where the host records them, else the
    `experts` setting) and the boundary as a sigma (a step fraction through the high-noise expert's
    model_sampling, ComfyUI's percent_to_sigma). ValueError for a bad boundary, a pair of one kind, swapped
    experts or two architectures."""
    check_boundary(boundary, unit)
    if model_2.model is model.model:
        raise ValueError("model and model_2 are the same model; connect Wan 2.2's two experts (high-noise into "
                         "model, low-noise into model_2), or leave model_2 unconnected for one Wan 2.1 model.")
    roles = resolve_experts(experts, model_file_name(model), model_file_name(model_2))
    check_same_architecture(ComfyWan(model).dims, ComfyWan(model_2).dims)
    high = model if roles[0] == HIGH else model_2
    sigma = boundary if unit == "sigma" else float(high.get_model_object("model_sampling").percent_to_sigma(boundary))
    return roles, check_boundary(sigma)


def compute_dtype(patcher, mem: MemorySettings) -> torch.dtype:
    """The training compute dtype: the memory settings' compute_dtype, auto = the model's (bf16 for fp8 weights)."""
    return DTYPES[mem.compute_dtype] or _auto_dtype(patcher)


def trainer_clone(model, mem: MemorySettings):
    """A clone that computes in the training dtype (the memory settings', else the model's)."""
    trainer = model.clone()
    trainer.set_model_compute_dtype(compute_dtype(trainer, mem))
    return trainer


def _train_expert(trainer, stage1, stage2, settings: TrainSettings, mem: MemorySettings, bar, done: int, total: int):
    """Train one LoRA on one (cloned) model; only this model is loaded while it trains (clones of it are unloaded
    before and after, so a second expert never shares the device with it)."""
    dit = ComfyWan(trainer)
    device = trainer.load_device
    log_settings(mem, dit.dims.num_layers)
    with torch.inference_mode(False):
        lora = create_lora(dit, settings.rank, settings.targets, settings.seed, device=device)
    on_step = loss_progress(bar, done, total, "LoRA-Edit")

    def attach(lo: LoRA):
        attach_weight_wrappers(trainer, lo)
        return lambda: _drop_wrappers(trainer)

    with trained_alone(trainer):
        return train_lora_edit(dit, stage1, settings, stage2, mem, attach, lora, on_step, interrupted, device)


def loss_progress(bar, done: int = 0, total: Optional[int] = None, label: str = "trainer") -> OnStep:
    """The trainer nodes' progress: on_step(i, n, loss) (the trainers' report) moves ComfyUI's ProgressBar `bar`
    to done + i of total (None: n) and, every 10 steps and at the last, logs the loss and shows the loss curve so
    far (loss_curve_image, the node's `loss` output) as the node's live preview."""
    losses: list[float] = []

    def on_step(i: int, n: int, loss=None) -> None:
        preview = None
        if loss is not None:
            losses.append(float(loss))
            if i == n or i % 10 == 0:
                log.info("FFP %s: step %d/%d loss %.4f", label, i, n, losses[-1])
                preview = ("JPEG", _to_pil(loss_curve_image(losses)[0]), 512)
        bar.update_absolute(done + i, n if total is None else total, preview)

    return on_step


def interrupted() -> bool:
    """should_stop for the trainers: raises ComfyUI's InterruptProcessingException once Cancel was pressed."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


@contextmanager
def trained_alone(trainer, cast_frozen: bool = False):
    """The block trains `trainer` (a trainer_clone) as the only loaded copy of its model: every loaded clone is
    unloaded before (a loaded clone would make ComfyUI skip the weight-wrapper patching) and after, also on error
    and Cancel (the block runner moved blocks and the wrappers were live: the next load starts clean).
    cast_frozen: for trainers that add no LoRA to the weights, put identity weight wrappers (an empty LoRA) on the
    trainer for the block, so ComfyUI casts (copies) each frozen weight per forward and the server's
    inference-tensor weights are never saved for backward (the LoRA-Edit trainer's way); off again at the end."""
    if cast_frozen:
        attach_weight_wrappers(trainer, LoRA({}))
    unload_clones_of(trainer)
    try:
        yield trainer
    finally:
        unload_clones_of(trainer)
        if cast_frozen:
            _drop_wrappers(trainer)


def apply_lora(model, lora: LoRA, strength: float = 1.0):
    """A clone of `model` with `lora` as ComfyUI "lora" weight patches (the stock LoraLoader's path)."""
    out = model.clone()
    key_map = comfy.lora.model_lora_keys_unet(out.model, {})
    loaded = comfy.lora.load_lora(lora.comfy_state_dict(), key_map)
    applied = set(out.add_patches(loaded, strength))
    if len(applied) != len(lora.paths):
        raise RuntimeError(f"only {len(applied)} of {len(lora.paths)} LoRA modules matched this model's weights.")
    return out


def unload_clones_of(patcher) -> None:
    """Unload (unpatch) every loaded ModelPatcher that shares `patcher`'s model, so the next load re-patches."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        other = loaded.model
        if other is not None and other.is_clone(patcher):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


def _drop_wrappers(patcher) -> None:
    """Take the trainer's weight wrappers off the shared modules again (the next load resets them too)."""
    wrappers = {id(f) for fns in patcher.weight_wrapper_patches.values() for f in fns}
    for m in patcher.model.diffusion_model.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if fns:
                setattr(m, attr, [f for f in fns if id(f) not in wrappers])
    patcher.weight_wrapper_patches = {}


def _auto_dtype(patcher) -> torch.dtype:
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def _fit_keyframes(keyframes: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return torch.stack([fit_to_frame(k, source.shape[1], source.shape[2])[0] for k in keyframes])


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).byte().cpu().numpy())


def expert_file_name(name: str, expert: str | None) -> str:
    """name + '_high_noise' / '_low_noise' for a Wan 2.2 expert's LoRA (unless the name already says it)."""
    if not expert or expert_from_name(name) == expert:
        return name
    return f"{name}_{expert}"


class FFPSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FFPSaveLoRA",
            display_name="Save LoRA · FFP",
            category="FFP/training",
            description="Writes a trained LoRA to models/loras/<name>.safetensors in ComfyUI's key format, so "
                        "'LoraLoaderModelOnly' loads it (written to a temporary file, then renamed).",
            is_output_node=True,
            inputs=[
                LoraType.Input("lora", tooltip="The LoRA from 'Train LoRA-Edit'."),
                io.String.Input("name", default="ffp_lora_edit",
                                tooltip="File name in models/loras (letters, digits, - _ . spaces, '/' between "
                                        "subfolders; no '..', no absolute path); .safetensors is added, and "
                                        "_high_noise / _low_noise for a Wan 2.2 expert's LoRA."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name; off = add _2, _3, ..."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The file name as LoraLoader lists it.")],
        )

    @classmethod
    def validate_inputs(cls, name: str, overwrite: bool) -> bool | str:
        if not isinstance(name, str):                # linked from another node: checked when it runs
            return True
        try:
            safe_output_path(folder_paths.get_folder_paths("loras")[0], name, ".safetensors", overwrite)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, lora, name, overwrite) -> io.NodeOutput:
        root = Path(folder_paths.get_folder_paths("loras")[0])
        expert = getattr(lora, "expert", None)
        path = safe_output_path(root, expert_file_name(name, expert), ".safetensors", overwrite)
        save_lora(lora, path, metadata={"ffprop": "lora_edit", "rank": lora.rank,
                                        **({"wan22_expert": expert} if expert else {})})
        rel = path.relative_to(root).as_posix()
        log.info("FFP LoRA-Edit: saved %s", path)
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/loras/{rel}").as_dict())


NODES = [FFPLoRAEditConditioning, FFPTrainLoRAEdit, FFPLoRAEditMemory, FFPSaveLoRA]
"""This room's nodes, in menu order (nodes/registry.py collects every room's NODES)."""
