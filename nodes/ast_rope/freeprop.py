"""FreeProp training on (source, edited) pairs: a LoRA on the DiT + the AST-RoPE predictor, trained jointly with
flow matching and the identity-propagation teacher (SEED_SPEC 3.6), on one process or several (torchrun + DDP).

Per sample (PredictorSample): the student predicts the velocity of the edited clip from its conditioning;
  I2V base (36 ch): student = edited first frame -> edited clip; teacher = the source's first frame -> the source
    (the I2V model has no source slot, so the notes' teacher would equal the student; SEED_SPEC 3.4's identity task);
  Fun-Control base (48 ch): student = control source + edited first frame -> edited clip; teacher = the notes'
    identity propagation: control = the edited clip itself + its own first frame -> the edited clip.
The teacher pass is the same model (LoRA and alphas included) under no_grad at the same x_t noise and time;
L = L_FM + lambda_motion L_motion + lambda_MMD L_MMD (5 and 1, teacher.py) on block `block`'s tokens.
Every sample's noise and time come from a generator seeded by (seed, step, sample index), so a run is the same
on 1 process with batch B as on N processes with batch B / N each (DDP averages the gradients).
Ablations: ast_rope=False trains the LoRA alone on the stock RoPE; teacher=False drops both relation terms.

Memory: the LoRA-Edit low-VRAM machinery (lora_edit.lowvram.BlockRunner: per-block gradient checkpointing, block
swap with prefetch, activation offload, split blocks; its presets) runs the DiT's blocks; each sample is its own
backward (gradient accumulation over the batch), so a recomputed block sees the positions of its own forward.
Ctrl-C (KeyboardInterrupt) and Cancel write the checkpoint of the last finished step before they propagate; a
Ctrl-C during the optimizer update lands after it, so the checkpoint is always one whole step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import Cancelled, OnStep, ShouldStop, atomic_write, log, log_once, report
from ..host.protocol import WanCond, WanDiT, host_streams_weights, training_context
from .patch import VARIANTS, apply_ast_rope, variant_alphas
from .positions import AlphaHolder, HeadSplit, RopeAlphas
from .predictor import AlphaPredictor, PredictorConfig, read_safetensors
from .teacher import LAMBDA_MMD, LAMBDA_MOTION, teacher_losses
from .train import PredictorSample, capture, frame_tokens, frozen

if TYPE_CHECKING:
    from ..lora_edit.lowvram import MemorySettings

KIND = "ffprop.freeprop"
VERSION = 1
PREDICTOR_PREFIX = "ffprop_ast_rope."
Encode = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FreePropSettings:
    steps: int = 200
    batch: int = 1                       # global batch per step (split evenly over DDP ranks)
    learning_rate: float = 2e-4          # AdamW, cosine decay to 0 over `steps`
    rank: int = 128
    targets: str = "all_linears"
    ast_rope: bool = True
    teacher: bool = True
    lambda_motion: float = LAMBDA_MOTION
    lambda_mmd: float = LAMBDA_MMD
    block: Optional[int] = None          # None: the middle block
    k_s: int = 2
    variant: str = "paper"
    split: HeadSplit = HeadSplit()
    predictor: PredictorConfig = PredictorConfig()
    backend: str = "auto"
    seed: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 0            # 0: only at the end (when a checkpoint path is given)

    def check(self) -> "FreePropSettings":
        if self.steps < 1 or self.batch < 1 or not self.learning_rate > 0 or self.rank < 1:
            raise ValueError(f"steps, batch and rank must be >= 1 and learning_rate > 0; got {self.steps}, "
                             f"{self.batch}, {self.rank}, {self.learning_rate}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {self.variant!r}.")
        return self


def pair_sample(source: Tensor, edited: Tensor, encode: Encode, context: Tensor, kind: str = "i2v",
                clip_tokens: Optional[Tensor] = None) -> PredictorSample:
    """One FreeProp sample from IMAGE clips [T, H, W, 3] (same shape) for an "i2v" or "fun_control" base."""
    from ..lora_edit.conditioning import masked_condition_video
    from .train import i2v_samples

    if kind == "i2v":
        return i2v_samples(source, encode, context, clip_tokens, edited)
    if kind != "fun_control":
        raise ValueError(f"FreeProp trains an 'i2v' or 'fun_control' base; got {kind!r}.")
    if edited.shape != source.shape:
        raise ValueError(f"edited clip {tuple(edited.shape)} must match the source clip {tuple(source.shape)}.")
    with torch.no_grad():
        src, ed = encode(source), encode(edited)
        start = encode(masked_condition_video(edited, None, edited[:1])[0])

    def fun(control: Tensor) -> WanCond:
        return WanCond(None, torch.cat([control, start], dim=1), context, clip_tokens)
    return PredictorSample(src, ed, fun(src), ed, fun(ed))


class FreePropModel(nn.Module):
    """The trainable parts: `lora` (lora_edit.lora.LoRA) and `predictor` (None without AST-RoPE). forward(...)
    = the mean loss of a list of samples (so DDP can wrap it); the frozen DiT is not a submodule."""

    def __init__(self, dit: WanDiT, lora: nn.Module, predictor: Optional[AlphaPredictor], settings: FreePropSettings):
        super().__init__()
        self.lora = lora
        self.predictor = predictor
        object.__setattr__(self, "dit", dit)
        object.__setattr__(self, "settings", settings)
        self.holder = AlphaHolder()
        object.__setattr__(self, "hooked", apply_ast_rope(dit, self.holder, settings.backend) if predictor is not None
                           else dit)
        self.block = settings.block if settings.block is not None else dit.dims.num_layers // 2
        if not 0 <= self.block < dit.dims.num_layers:
            raise ValueError(f"block {self.block} out of range for a model with {dit.dims.num_layers} blocks.")
        self.last_parts: dict[str, float] = {}

    def alphas(self, s: PredictorSample) -> Optional[RopeAlphas]:
        if self.predictor is None:
            return None
        st = self.settings
        heads = self.dit.dims.num_heads
        variant = st.variant
        if variant == "paper":
            try:
                st.split.groups(heads)
            except ValueError:
                raise ValueError(f"the paper variant's head split {st.split.spatial_ratio} does not divide this "
                                 f"model's {heads} attention heads (heads not divisible by the split); use variant "
                                 "'global' or another spatial_ratio.") from None
        return variant_alphas(self.predictor.alphas(s.source_latent), variant, st.split)

    def sample_loss(self, s: PredictorSample, step: int, index: int) -> tuple[Tensor, dict[str, float]]:
        st = self.settings
        gen = torch.Generator().manual_seed(((st.seed * 1_000_003) + step) * 1_000_033 + index)
        x0 = s.target
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.rand(1, generator=gen).item()
        a = self.alphas(s)
        if a is not None:
            self.holder.alphas = a
        blocks = self.hooked.blocks()
        teacher: dict[int, Tensor] = {}
        if st.teacher:       # first: a checkpointed student block re-runs in backward at the student's positions
            if s.teacher_cond is None:
                raise ValueError("the teacher needs (source, edited) pairs: every sample must carry its teacher task.")
            with torch.no_grad(), capture(blocks, (self.block,), teacher):
                self.hooked.predict((1 - t) * s.teacher_target + t * noise, t, s.teacher_cond)
        feats: dict[int, Tensor] = {}
        with capture(blocks, (self.block,) if st.teacher else (), feats):
            v = self.hooked.predict((1 - t) * x0 + t * noise, t, s.cond)
        fm = F.mse_loss(v.float(), (noise - x0).float().to(v.device))   # latents may be kept on the CPU
        parts = {"fm": float(fm.detach())}
        loss = fm
        if st.teacher:
            f, h, w = x0.shape[2:]
            _, ph, pw = self.dit.dims.patch_size
            lm, ld = teacher_losses(frame_tokens(feats[self.block], f), frame_tokens(teacher[self.block], f),
                                    (h // ph, w // pw), st.k_s)
            loss = loss + st.lambda_motion * lm + st.lambda_mmd * ld
            parts.update(motion=float(lm.detach()), mmd=float(ld.detach()))
        return loss, parts

    def forward(self, samples: Sequence[tuple[int, PredictorSample]], step: int) -> Tensor:
        total, acc = 0.0, {}
        for index, s in samples:
            loss, parts = self.sample_loss(s, step, index)
            total = total + loss / len(samples)
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v / len(samples)
        self.last_parts = acc
        return total


@dataclass
class FreePropResult:
    model: FreePropModel
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    step: int = 0


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_freeprop(dit: WanDiT, samples: Sequence[PredictorSample] | Callable[[int], PredictorSample], count: int,
                   settings: FreePropSettings = FreePropSettings(), checkpoint: Optional[str | os.PathLike] = None,
                   resume: bool = False, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None, memory: Optional["MemorySettings"] = None) -> FreePropResult:
    """Train a FreeProp LoRA (+ predictor) on `count` samples (a list, or get(i) -> sample for lazy encoding).

    Step k uses samples (k * batch + j) mod count, j < batch; rank r of N takes j = r, r + N, ... When
    torch.distributed is initialised (torchrun), the model is wrapped in DDP (gloo on CPU, nccl on CUDA).
    checkpoint: a path written every `checkpoint_every` steps, on Cancel / Ctrl-C and at the end (LoRA,
    predictor, optimizer, scheduler, step); resume=True continues from it. on_step(i, steps, loss) after every
    step (this process's loss, as the LoRA-Edit and content-encoder trainers report it). memory: lora_edit.lowvram
    MemorySettings (a preset(name)); None = no checkpointing, no swap. window_frames does not apply (pairs train
    whole; shorten them when reading, e.g. `--max-frames`)."""
    from ..lora_edit.lora import attach_hooks, create_lora
    from ..lora_edit.lowvram import BlockRunner, MemorySettings, is_oom, oom_message

    st = settings.check()
    mem = memory if memory is not None else MemorySettings(gradient_checkpointing=False)
    if count < 1:
        raise ValueError("no training pairs: give at least one (source, edited) pair.")
    rank, world = _dist()
    if st.batch % world:
        raise ValueError(f"batch {st.batch} does not split over {world} processes; use a multiple of {world}.")
    get = samples.__getitem__ if not callable(samples) else samples
    device = dit.module.patch_embedding.weight.device if hasattr(dit.module, "patch_embedding") else "cpu"
    lora = create_lora(dit, st.rank, st.targets, seed=st.seed, device=device)
    predictor = AlphaPredictor(st.predictor, seed=st.seed).to(device) if st.ast_rope else None
    model = FreePropModel(dit, lora, predictor, st)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=st.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, st.steps) / st.steps)))
    result = FreePropResult(model)
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        start = load_checkpoint(checkpoint, model, opt, sched)
        log.info("FFP FreeProp: resumed %s at step %d", checkpoint, start)
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    blocks = model.hooked.blocks()
    if mem.swap_fraction > 0 and host_streams_weights(dit):
        log.info("FFP FreeProp: the host streams this model's weights itself; block swap is skipped.")
        mem = replace(mem, swap_fraction=0.0)
    runner = BlockRunner(blocks, torch.device(device), mem.gradient_checkpointing, mem.blocks_to_swap(len(blocks)),
                         should_stop, mem.offload_activations, mem.split_blocks)
    if mem.window_frames:
        log_once("freeprop-windows", "FFP FreeProp: memory window_frames %d does not apply (pairs train whole; read "
                 "them shorter, e.g. --max-frames).", mem.window_frames)
    detach = attach_hooks(dit, lora)
    done = start

    def keep(reason: str) -> None:
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model, opt, sched, done)
            log.warning("FFP FreeProp: %s; checkpoint of step %d written to %s (--resume continues)", reason, done,
                        checkpoint)
    try:
        with torch.inference_mode(False), torch.enable_grad(), frozen(dit.module), training_context(dit):
            runner.install()
            for step in range(start + 1, st.steps + 1):
                mine = list(range(rank, st.batch, world))
                opt.zero_grad(set_to_none=True)
                total, parts = 0.0, {}
                for n, j in enumerate(mine):       # one backward per sample: gradient accumulation
                    sync = n == len(mine) - 1 or world == 1
                    with contextlib.nullcontext() if sync else wrapped.no_sync():
                        loss = wrapped([(j, get(((step - 1) * st.batch + j) % count))], step) / len(mine)
                        loss.backward()
                    total += float(loss.detach())
                    for k, v in model.last_parts.items():
                        parts[k] = parts.get(k, 0.0) + v / len(mine)
                with _sigint_deferred():           # a Ctrl-C here lands after the whole update
                    torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
                    opt.step()
                    sched.step()
                    result.losses.append(total)
                    result.parts.append(parts)
                    result.step = done = step
                if checkpoint is not None and rank == 0 and st.checkpoint_every and step % st.checkpoint_every == 0:
                    save_checkpoint(checkpoint, model, opt, sched, step)
                report(on_step, should_stop, step, st.steps, total)     # on_step(i, n, loss), as the trainers do
    except Cancelled:                           # keep what was trained: resume continues after `done`
        keep("cancelled")
        raise
    except KeyboardInterrupt:
        keep("interrupted (Ctrl-C)")
        raise
    except Exception as e:
        if is_oom(e):
            f, h, w = get(0).target.shape[2:]
            raise RuntimeError(oom_message(mem, 4 * (f - 1) + 1, 8 * h, 8 * w)) from e
        raise
    finally:
        runner.remove()
        detach()
    if checkpoint is not None and rank == 0:
        save_checkpoint(checkpoint, model, opt, sched, result.step or start)
    if result.losses:
        log.info("FFP FreeProp: %d steps, loss %.4g -> %.4g", len(result.losses), result.losses[0], result.losses[-1])
    return result


@contextlib.contextmanager
def _sigint_deferred():
    """In the main thread: a SIGINT inside the block is held and raised (as the previous handler would) when it
    ends, so the parameters and the optimizer state never stop half-updated. Elsewhere (ComfyUI's worker thread,
    where Cancel is cooperative): nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: pressed.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(*pressed[0])
            else:
                raise KeyboardInterrupt


def save_checkpoint(path: str | os.PathLike, model: FreePropModel, opt, sched, step: int) -> Path:
    """Everything to resume (tensors, numbers and dicts only: loadable with weights_only=True), atomically."""
    state = {"kind": KIND, "version": VERSION, "step": step, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, model: FreePropModel, opt, sched) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"'{path}' is not a readable FreeProp training checkpoint ({type(e).__name__}); delete it "
                         "or pick another --checkpoint path.") from e
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise ValueError(f"'{path}' is not a FreeProp training checkpoint; delete it or pick another path.")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"'{path}' was written for another model or settings (rank, predictor): {e}") from e
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def save_freeprop(path: str | os.PathLike, model: FreePropModel, extra: Optional[dict] = None) -> Path:
    """One .safetensors FreeProp model: the LoRA in ComfyUI keys (diffusion_model.*, what LoraLoader reads) and
    the predictor under `ffprop_ast_rope.*`, with kind, version, predictor config and settings in the metadata."""
    from safetensors.torch import save_file

    state = model.lora.comfy_state_dict()
    if model.predictor is not None:
        state.update({PREDICTOR_PREFIX + k: v.detach().float().cpu().contiguous()
                      for k, v in model.predictor.state_dict().items()})
    st = model.settings
    meta = {"kind": KIND, "version": str(VERSION), "ast_rope": str(model.predictor is not None).lower(),
            "variant": st.variant, "split": json.dumps(asdict(st.split)), "block": str(model.block),
            "predictor_config": json.dumps(asdict(model.predictor.config)) if model.predictor is not None else "",
            **{k: str(v) for k, v in (extra or {}).items()}}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


@dataclass
class FreePropFile:
    """A loaded FreeProp model: the LoRA, the predictor (None when trained without AST-RoPE), the variant."""

    lora: nn.Module
    predictor: Optional[AlphaPredictor]
    variant: str
    split: HeadSplit


def load_freeprop(path: str | os.PathLike, device="cpu") -> FreePropFile:
    """Read a file written by save_freeprop; ValueError naming the file for anything else."""
    from ..lora_edit.lora import LoRA

    path = Path(path)
    meta, state = read_safetensors(path, device, f"no FreeProp model at '{path}'.")
    if meta.get("kind") != KIND:
        raise ValueError(f"'{path.name}' is not an FFProp FreeProp model (metadata kind {meta.get('kind')!r}); a plain "
                         "LoRA goes into LoraLoaderModelOnly, a predictor into 'Apply AST-RoPE'.")
    if meta.get("version") != str(VERSION):
        raise ValueError(f"'{path.name}' is FreeProp file version {meta.get('version')!r}; this FFProp reads {VERSION}.")
    lora = LoRA.from_comfy_state_dict({k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIX)},
                                      path.name)
    predictor = None
    if meta.get("ast_rope") == "true":
        config = PredictorConfig(**json.loads(meta["predictor_config"])).check()
        predictor = AlphaPredictor(config)
        pstate = {k[len(PREDICTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PREDICTOR_PREFIX)}
        try:
            predictor.load_state_dict(pstate)
        except RuntimeError as e:
            raise ValueError(f"'{path.name}': its predictor does not match its config {config}: {e}") from e
        predictor = predictor.to(device).eval()
    split = HeadSplit(**json.loads(meta.get("split", "{}")))
    return FreePropFile(lora.to(device), predictor, meta.get("variant", "paper"), split)


@contextlib.contextmanager
def freeprop_model(dit: WanDiT, loaded: FreePropFile, source_latent: Optional[Tensor], backend: str = "auto"):
    """Yields `dit` with the FreeProp LoRA (forward hooks) and, when the file has a predictor, AST-RoPE at the
    predicted alphas for `source_latent`; the hooks are removed afterwards."""
    from ..lora_edit.lora import attach_hooks

    detach = attach_hooks(dit, loaded.lora)
    try:
        if loaded.predictor is None:
            yield dit
            return
        yield apply_ast_rope(dit, freeprop_alphas(loaded, source_latent, dit.dims.num_heads), backend)
    finally:
        detach()


def freeprop_alphas(loaded: FreePropFile, source_latent: Tensor, heads: int) -> RopeAlphas:
    """The alphas the file's predictor gives for `source_latent` [1, 16, F, h, w] (detached, CPU), in its variant;
    a paper split that does not divide `heads` falls back to the global variant (logged)."""
    device = next(loaded.predictor.parameters()).device
    with torch.no_grad():
        a = variant_alphas(loaded.predictor.alphas(source_latent.float().to(device)), loaded.variant, loaded.split)
    a = replace(a, alpha_s=a.alpha_s.detach().cpu(), alpha_t=a.alpha_t.detach().cpu())
    if loaded.variant == "paper":
        try:
            loaded.split.groups(heads)
        except ValueError:
            log.warning("FFP FreeProp: the file's head split %s does not divide this model's %d heads; using the "
                        "global variant (one position set for all heads).", loaded.split, heads)
            a = replace(a, split=None)
    return a
