"""Train the AST-RoPE alpha predictor on a frozen WanDiT (either host), torch-only.

Loss: flow matching on the patched model (x_t = (1 - t) x0 + t n, target velocity n - x0, t ~ U(0, 1), MSE),
the predictor being the only trainable part; the DiT (optionally already carrying a LoRA-Edit LoRA) stays
frozen. With `self_distill` and pairs that carry a teacher condition, SEED_SPEC 3.4 adds
  L_motion = mean_{f,f'} (C^S - C^T)^2,  C_{f,f'} = cos(mean_tokens h_f, mean_tokens h_f')
  L_MMD    = sum_f MMD^2_k(rows of R^S_f - R^S_{f-1}, rows of R^T_f - R^T_{f-1}),  R_f = norm(h_f) norm(h_0)^T
with hidden tokens h of a few mid-depth blocks, the teacher = the same frozen model on the identity task
(source first frame -> source video) under no_grad, Gaussian kernel with the median-heuristic bandwidth;
relation rows are subsampled to at most `mmd_tokens` tokens per frame.

Joint training with LoRA-Edit: build `holder = AlphaHolder()`, `dit = apply_ast_rope(dit, holder)`, add the
predictor's parameters to the LoRA optimiser and set `holder.alphas = predictor.alphas(source_latent)` before
each forward: positions are differentiable in the alphas on both hosts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import OnStep, ShouldStop, log, report
from ..host.protocol import WanCond, WanDiT, training_context
from .patch import VARIANTS, apply_ast_rope, variant_alphas
from .positions import AlphaHolder, HeadSplit, RopeAlphas, check_latent
from .predictor import AlphaPredictor, PredictorConfig

Encode = Callable[[Tensor], Tensor]
"""encode(IMAGE [T, H, W, 3] in 0..1, T = 4k+1) -> model-space latent [1, 16, F, H/8, W/8]."""


@dataclass(frozen=True)
class PredictorSample:
    """source_latent: predictor input [1, 16, F, h, w]. target: x0 the patched model should produce (the source
    latent itself per video; the edited clip's latent for pairs). cond: its conditioning. teacher_target /
    teacher_cond: the identity task (source first frame -> source), used by self-distillation only."""

    source_latent: Tensor
    target: Tensor
    cond: WanCond
    teacher_target: Optional[Tensor] = None
    teacher_cond: Optional[WanCond] = None


@dataclass(frozen=True)
class PredictorTrainSettings:
    steps: int = 200
    learning_rate: float = 1e-3
    seed: int = 0
    variant: str = "warped"
    anchor_first: bool = True
    backend: str = "auto"
    self_distill: bool = False
    lambda_motion: float = 1.0
    lambda_mmd: float = 1.0
    distill_blocks: Optional[tuple[int, ...]] = None   # None: the middle block
    mmd_tokens: int = 256
    grad_clip: float = 1.0
    split: HeadSplit = HeadSplit()          # the paper variant's head split


@dataclass
class PredictorTrainResult:
    predictor: AlphaPredictor
    losses: list[float] = field(default_factory=list)
    alphas: Optional[RopeAlphas] = None


def i2v_samples(source: Tensor, encode: Encode, context: Tensor, clip_tokens: Optional[Tensor] = None,
                edited: Optional[Tensor] = None) -> PredictorSample:
    """One sample from IMAGE clips [T, H, W, 3] (T = 4k+1) with stock I2V conditioning (first frame kept, the
    rest grey, keep-mask [1, 0, ...]). edited=None: per-video (target = the source, identity). With an edited
    clip of the same shape: student = edited first frame -> edited clip, teacher = the identity task."""
    from ..lora_edit.conditioning import masked_condition_video, wan_cond

    def cond_for(clip: Tensor) -> tuple[Tensor, WanCond]:
        v_cond, keep = masked_condition_video(clip, None, clip[:1])
        with torch.no_grad():
            return encode(clip), wan_cond(encode(v_cond), keep, context, clip_tokens)

    src_lat, src_cond = cond_for(source)
    if edited is None:
        return PredictorSample(src_lat, src_lat, src_cond)
    if edited.shape != source.shape:
        raise ValueError(f"edited clip {tuple(edited.shape)} must match the source clip {tuple(source.shape)} "
                         "(same frame count and size).")
    ed_lat, ed_cond = cond_for(edited)
    return PredictorSample(src_lat, ed_lat, ed_cond, src_lat, src_cond)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad False on every parameter (restored after), so no .grad lands on the DiT.
    ComfyUI's server loads weights under inference mode: such a flag is restored inside inference mode (outside it
    torch refuses requires_grad=True on an inference tensor), as the LoRA-Edit trainer does."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(f)


@contextlib.contextmanager
def capture(blocks: list[nn.Module], idx: tuple[int, ...], out: dict[int, Tensor]) -> Iterator[None]:
    """Forward hooks storing the output tokens [B, L, dim] of the chosen blocks into `out`."""
    handles = []
    for i in idx:
        def hook(_m, _a, o, i=i):
            out[i] = o[0] if isinstance(o, tuple) else o
        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def frame_tokens(h: Tensor, frames: int) -> Tensor:
    """[B, L, d] -> [B, F, N, d] (token order t, h, w)."""
    b, seq, d = h.shape
    if seq % frames:
        raise ValueError(f"{seq} tokens do not split into {frames} latent frames.")
    return h.reshape(b, frames, seq // frames, d).float()


def motion_loss(hs: Tensor, ht: Tensor) -> Tensor:
    """Frame-to-frame similarity structure C (cosine of mean tokens), [B, F, N, d] each -> mean squared gap."""
    def sim(h):
        m = F.normalize(h.mean(dim=2), dim=-1)
        return m @ m.transpose(1, 2)
    return (sim(hs) - sim(ht)).pow(2).mean()


def mmd2(p: Tensor, q: Tensor) -> Tensor:
    """Unbiased-free (V-statistic) MMD^2 with a Gaussian kernel, median-heuristic bandwidth; p [n, d], q [m, d]."""
    z = torch.cat([p, q])
    d2 = torch.cdist(z, z).pow(2)
    sigma2 = d2.detach()[d2.detach() > 0].median().clamp_min(1e-8) if bool((d2.detach() > 0).any()) else d2.new_tensor(1.0)
    k = torch.exp(-d2 / (2 * sigma2))
    n = p.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def drift_loss(hs: Tensor, ht: Tensor, max_tokens: int = 256) -> Tensor:
    """Sum over f >= 1 of MMD^2 between the rows of R_f - R_{f-1} (R_f = norm(h_f) norm(h_0)^T), student vs
    teacher. [B, F, N, d] each; the first batch item; tokens subsampled with a fixed stride to <= max_tokens."""
    n = hs.shape[2]
    sel = torch.arange(0, n, max(1, math.ceil(n / max_tokens)), device=hs.device)

    def rel(h):
        x = F.normalize(h[0][:, sel], dim=-1)            # [F, n', d]
        r = x @ x[0].transpose(0, 1)                     # [F, n', n'] relations to frame 0
        return r[1:] - r[:-1]
    rs, rt = rel(hs), rel(ht)
    return sum(mmd2(rs[f], rt[f]) for f in range(rs.shape[0])) if rs.shape[0] else hs.new_zeros(())


def evaluate_loss(dit: WanDiT, predictor: AlphaPredictor, samples: list[PredictorSample], points: int = 6,
                  seed: int = 123, backend: str = "auto", variant: str = "warped",
                  split: Optional[HeadSplit] = None) -> float:
    """Flow-matching loss of the patched model on a fixed grid of t = (i + 0.5) / points with seeded noise
    (deterministic, so before/after training compare). Mean over samples and points."""
    holder = AlphaHolder()
    hooked = apply_ast_rope(dit, holder, backend)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for s in samples:
            holder.alphas = variant_alphas(predictor.alphas(s.source_latent), variant, split)
            for i in range(points):
                t = (i + 0.5) / points
                noise = torch.randn(s.target.shape, generator=gen).to(s.target)
                v = hooked.predict((1 - t) * s.target + t * noise, t, s.cond)
                total += F.mse_loss(v.float().to(s.target.device), (noise - s.target).float()).item()
    return total / (points * len(samples))


def train_predictor(dit: WanDiT, samples: list[PredictorSample], settings: PredictorTrainSettings = PredictorTrainSettings(),
                    predictor: Optional[AlphaPredictor] = None, config: PredictorConfig = PredictorConfig(),
                    on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> PredictorTrainResult:
    """Fit the predictor so that the AST-RoPE-patched, frozen `dit` best reproduces each sample's target.

    Returns the trained predictor (new, or `predictor` trained in place), per-step losses and the alphas it
    predicts for the first sample."""
    if not samples:
        raise ValueError("no training samples: pass at least one (source, target) clip.")
    if settings.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {settings.variant!r}.")
    if settings.steps < 1 or not settings.learning_rate > 0:
        raise ValueError(f"steps must be >= 1 and learning_rate > 0; got {settings.steps}, {settings.learning_rate}.")
    if settings.self_distill and any(s.teacher_cond is None for s in samples):
        raise ValueError("self_distill needs (source, edited) pairs: every sample must carry the identity-task "
                         "teacher condition (i2v_samples(..., edited=...)).")
    for s in samples:
        check_latent(s.source_latent, "source latent")
    gen = torch.Generator().manual_seed(settings.seed)
    if predictor is None:
        predictor = AlphaPredictor(config, seed=settings.seed)
    device = samples[0].target.device
    predictor = predictor.to(device).train()
    holder = AlphaHolder()
    hooked = apply_ast_rope(dit, holder, settings.backend)
    n_blocks = dit.dims.num_layers
    idx = settings.distill_blocks or (n_blocks // 2,)
    if any(not 0 <= i < n_blocks for i in idx):
        raise ValueError(f"distill_blocks {idx} out of range for a model with {n_blocks} blocks.")
    opt = torch.optim.AdamW(predictor.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    result = PredictorTrainResult(predictor)

    def alphas_for(s: PredictorSample) -> RopeAlphas:
        return variant_alphas(predictor.alphas(s.source_latent, settings.anchor_first), settings.variant,
                              settings.split)

    with torch.inference_mode(False), torch.enable_grad(), frozen(dit.module), training_context(hooked):
        for step in range(1, settings.steps + 1):
            s = samples[(step - 1) % len(samples)]
            x0 = s.target
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.rand(1, generator=gen).item()
            holder.alphas = alphas_for(s)
            feats: dict[int, Tensor] = {}
            with capture(hooked.blocks(), idx if settings.self_distill else (), feats):
                v = hooked.predict((1 - t) * x0 + t * noise, t, s.cond)
            loss = F.mse_loss(v.float().to(x0.device), (noise - x0).float())   # the host may answer on its GPU
            if settings.self_distill:
                student = dict(feats)
                with torch.no_grad(), capture(hooked.blocks(), idx, feats):
                    xt_t = (1 - t) * s.teacher_target + t * noise
                    hooked.predict(xt_t, t, s.teacher_cond)
                frames = x0.shape[2]
                for i in idx:
                    hs, ht = frame_tokens(student[i], frames), frame_tokens(feats[i], frames)
                    loss = loss + settings.lambda_motion * motion_loss(hs, ht) \
                        + settings.lambda_mmd * drift_loss(hs, ht, settings.mmd_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), settings.grad_clip)
            opt.step()
            result.losses.append(float(loss.detach()))
            report(on_step, should_stop, step, settings.steps, result.losses[-1])   # on_step(i, n, loss)
    predictor.eval()
    with torch.no_grad():
        a = alphas_for(samples[0])
        result.alphas = replace(a, alpha_s=a.alpha_s.detach().cpu(), alpha_t=a.alpha_t.detach().cpu())
    log.info("FFP AST-RoPE: trained predictor for %d steps, loss %.4g -> %.4g; %s", settings.steps,
             result.losses[0], result.losses[-1], result.alphas.describe())
    return result
