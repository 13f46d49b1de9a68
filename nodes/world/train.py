"""Train the small Wan world models on the procedural world (CPU, deterministic, local generators).

    python -m ffprop.nodes.world.train vae --steps N --seed S --out DIR [--clips K]
    python -m ffprop.nodes.world.train dit --steps N --seed S --out DIR [--vae DIR_WITH_vae.safetensors]
    python -m ffprop.nodes.world.train dit --init DIR --layers N ...  # grow DIR's DiT to N blocks (grow_dit)
    python -m ffprop.nodes.world.train fun --init DIR_WITH_dit_i2v --steps N --seed S --out DIR [--vae DIR]
    python -m ffprop.nodes.world.train vae --decoder-only --init DIR --steps N --seed S --out DIR2 [--l1 W]
    python -m ffprop.nodes.world.train eval --out DIR --clips K    # held-out quality (K scenes)

Decoder-only (`train_decoder`): the encoder, quant_conv and latents_mean/std of --init are kept bit-identical
(so every latent, the DiTs and the content encoder stay valid); post_quant_conv + decoder learn to decode the
frozen latents of whole 17-frame clips with the one-pass unclamped `vae_decode_whole` (same function as
diffusers' cached frame loop, about 2x less CPU per step with the encoder's work gone).

Where the VAE's error comes from (tests/benchmarks/bench_world_vae.py, 8 held-out clips, frames 2..17): the
bundled VAE reconstructs at 21.0 dB, a linear PCA code of the same size (16 numbers per 4-frame x 8x8 x RGB
patch) at 27.5 dB, but a ridge map from the frozen encoder's latents (3x3x3 latent neighbourhood) reaches only
20.7 dB and an MLP on the same neighbourhood 20.6 dB: the latents themselves lack the information, so no
decoder-only fine-tune can approach 27.5 dB; the encoder must train on. It is underfit, not overfit (19.7 dB on
training clips); its whole history is ~660 end-to-end steps of batch 2-4 windows.

VAE: diffusers `AutoencoderKLWan` trained as a deterministic autoencoder (the posterior mean, no sampling, no
KL) on random 5-frame, 32x32 windows of world clips, encoded and decoded in one pass (`vae_encode_whole`,
`vae_decode_whole`: the same functions as diffusers' chunked loops; a causal conv net: windows train every
weight the 17-frame, 64x64 clips use), with an UNCLAMPED decode (diffusers' `decode` clamps to [-1, 1], which zeroes the
gradient of every saturated pixel). Afterwards the log-variance half of `quant_conv` is set to a constant
-30 (posterior std ~ 3e-7, so `sample()` equals `mode()`), and `latents_mean`/`latents_std` are measured on
the training clips, so the model-space latent (ComfyUI's `process_in`) is ~N(0, 1) per channel.

DiT: diffusers `WanTransformer3DModel`, I2V with 36 input channels (16 noisy latent + 4 keep-mask + 16
condition latent of [first frame, grey 0.5 after it], exactly `lora_edit.conditioning`'s stock I2V input),
no CLIP image embedder. Flow matching as `host.sampling` integrates it: x_t = (1 - t) x_0 + t noise, target
v = noise - x_0, t ~ logit-normal. Text: the cross-attention output projections are zero and frozen, so any
context (zeros [1, L, 4096] in FFProp's tests, a real UMT5 embedding in ComfyUI) gives the same output.

Fun-Control DiT: the same transformer with 48 input channels, ComfyUI's WanFunControlToVideo layout
(16 noisy latent + 16 control-video latent + 16 start-image latent: frame 1 in latent frame 0, zeros after),
fine-tuned from the I2V DiT (`fun_from_i2v`); the world's control video is the clip's luma (`control_clips`).
Latents of the training pool are cached beside the pool cache, keyed by the VAE file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

FRAMES = 17
SIZE = 64
GREY = 0.5
VAE_WINDOW = (5, 32)        # frames, pixels of one VAE training window
LOGVAR_OFF = -30.0

VAE_CONFIG = {"base_dim": 12, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
              "temperal_downsample": [False, True, True]}
DIT_CONFIG = {"patch_size": [1, 2, 2], "num_attention_heads": 1, "attention_head_dim": 128, "in_channels": 36,
              "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 512, "num_layers": 4,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
              "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
DIT_STORED = torch.float16  # the DiT files' dtype (half the bytes: two DiTs + the VAE fit the 30 MB budget)
TEXT_TOKENS = 1             # the context used in training: zeros [B, 1, 4096] (the output ignores it anyway)


# ---------------------------------------------------------------- data
def render_pool(seeds, cache: Path | None = None) -> Tensor:
    """uint8 [N, T, H, W, 3] world clips for `seeds`, cached in `cache` (a .pt of {'seeds', 'clips'})."""
    from .scenes import render_clip

    seeds = [int(s) for s in seeds]
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
        if list(data["seeds"]) == seeds:
            return data["clips"]
    clips = torch.stack([(render_clip(s, size=(SIZE, SIZE), frames=FRAMES) * 255).round().to(torch.uint8)
                         for s in seeds])
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        torch.save({"seeds": seeds, "clips": clips}, tmp)
        os.replace(tmp, cache)
    return clips


def to_vae_space(clips: Tensor) -> Tensor:
    """uint8 or 0..1 [N, T, H, W, 3] -> float [N, 3, T, H, W] in [-1, 1]."""
    x = clips.float() / 255 if clips.dtype == torch.uint8 else clips.float()
    return x.permute(0, 4, 1, 2, 3) * 2 - 1


# ---------------------------------------------------------------- VAE
def vae_encode_mean(vae, x: Tensor) -> Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> posterior mean [B, 16, F, H/8, W/8] (raw VAE space), differentiable.
    Same chunking as `AutoencoderKLWan._encode` (frame 0, then 4 at a time, causal cache cleared per call)."""
    vae.clear_cache()
    outs = []
    for i in range(1 + (x.shape[2] - 1) // 4):
        vae._enc_conv_idx = [0]
        chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1):1 + 4 * i]
        outs.append(vae.encoder(chunk, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
    h = vae.quant_conv(torch.cat(outs, 2))
    vae.clear_cache()
    return h[:, :vae.config.z_dim]


def vae_encode_whole(vae, x: Tensor) -> Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> posterior mean [B, 16, F, H/8, W/8] in ONE pass over all frames: the same
    function as `vae_encode_mean` (diffusers' chunked loop: frame 0, then 4 at a time, with its causal feature
    cache; every cached causal conv equals one zero-padded causal conv over the whole sequence), a few large
    convs instead of many small ones (faster on CPU for training). The special case is each temporal
    downsampler (`WanResample` 'downsample3d'): frame 0 passes alone (its first chunk has no time conv), and
    `time_conv` (kernel 3, stride 2, no padding) runs over all frames from frame 0 on, which is what the cached
    loop computes chunk by chunk (each chunk is prefixed with the previous chunk's last frame). Wan 2.1 only."""
    if vae.config.is_residual:
        raise ValueError("vae_encode_whole supports the Wan 2.1 VAE (is_residual=False) only.")
    enc = vae.encoder
    x = enc.conv_in(x)
    for layer in enc.down_blocks:
        x = layer(x)                       # a resample without a feature cache: the per-frame spatial part only
        if getattr(layer, "mode", None) == "downsample3d" and x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], layer.time_conv(x)], 2)
    x = enc.mid_block(x)
    x = enc.conv_out(enc.nonlinearity(enc.norm_out(x)))
    return vae.quant_conv(x)[:, :vae.config.z_dim]


def vae_decode_raw(vae, z: Tensor) -> Tensor:
    """Raw latent [B, 16, F, h, w] -> [B, 3, T, 8h, 8w], UNCLAMPED (as `_decode` minus its clamp)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


def vae_decode_whole(vae, z: Tensor) -> Tensor:
    """Raw latent [B, 16, F, h, w] -> [B, 3, 1 + 4(F-1), 8h, 8w] UNCLAMPED in ONE pass over all latent frames:
    the same function as `vae_decode_raw` (diffusers' frame-by-frame loop with its causal feature cache:
    every cached causal conv equals one zero-padded causal conv over the whole sequence), ~5x faster on CPU
    for training (a few large convs instead of ~30 small ones per latent frame). The one special case is
    each temporal upsampler (`WanResample` 'upsample3d'): the first latent frame is not time-upsampled
    (its cache entry is 'Rep'), the later frames go through `time_conv` as one zero-padded causal sequence
    and each becomes 2 frames. Wan 2.1 layout only (`is_residual=False`)."""
    if vae.config.is_residual:
        raise ValueError("vae_decode_whole supports the Wan 2.1 VAE (is_residual=False) only.")
    dec = vae.decoder
    x = dec.conv_in(vae.post_quant_conv(z))
    x = dec.mid_block(x)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            if up.mode == "upsample3d" and x.shape[2] > 1:
                b, c, t, h, w = x.shape
                later = up.time_conv(x[:, :, 1:]).reshape(b, 2, c, t - 1, h, w)
                later = torch.stack((later[:, 0], later[:, 1]), 3).reshape(b, c, 2 * (t - 1), h, w)
                x = torch.cat([x[:, :, :1], later], 2)
            x = up(x)                      # without a feature cache: the per-frame spatial resample only
    return dec.conv_out(dec.nonlinearity(dec.norm_out(x)))


def seeded_init(build, seed: int):
    """build() with the global RNG pinned to seed and restored after (module init draws from it)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def warmup_cosine(opt, steps: int):
    """20 steps of linear warm-up, then cosine decay to 0 over `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps)))


def optimizer_step(opt, sched, params, loss: Tensor) -> None:
    """One update: backward of `loss`, gradient norm clipped to 1 over `params`, optimizer and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def new_vae(config: dict | None = None):
    """A fresh AutoencoderKLWan with `init_vae`'s initialisation (draws from the global RNG: seed it first)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**(config or VAE_CONFIG))
    init_vae(vae)
    return vae


@torch.no_grad()
def init_vae(vae) -> None:
    """Kaiming-normal conv weights (ReLU gain), zero biases. THE plateau fix: with PyTorch's default conv init
    each layer shrinks the signal (~1/sqrt(3) per layer) while its uniform bias adds a constant, so after the
    encoder's ~20 convs and RMS norms the latent hardly depends on the input (std across inputs 0.02 vs 0.16
    overall at init, measured on world crops); the decoder then learns the data mean and training sits at
    MSE ~ data variance. With this init the latent varies with the input (0.35 vs 0.64) and the loss drops
    below the variance within ~25 steps. (A 2-clip overfit cannot show the bug: the decoder can memorise two
    clips without any information from the encoder.)"""
    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def vae_windows(pool: Tensor, batch: int, gen: torch.Generator, frames: int = VAE_WINDOW[0],
                crop: int = VAE_WINDOW[1]) -> Tensor:
    """A batch of random windows [B, 3, frames, crop, crop] in [-1, 1] from the uint8 pool."""
    n, t, h, w, _ = pool.shape
    out = []
    for _ in range(batch):
        i = int(torch.randint(n, (1,), generator=gen))
        t0 = int(torch.randint(t - frames + 1, (1,), generator=gen))
        y0 = int(torch.randint(h - crop + 1, (1,), generator=gen))
        x0 = int(torch.randint(w - crop + 1, (1,), generator=gen))
        out.append(pool[i, t0:t0 + frames, y0:y0 + crop, x0:x0 + crop])
    return to_vae_space(torch.stack(out))


def train_vae(pool: Tensor, steps: int, seed: int, batch: int = 4, lr: float = 1e-3, log=print, vae=None,
              frames: int = VAE_WINDOW[0], crop: int = VAE_WINDOW[1], l1: float = 0.0, checkpoint=None):
    """Train a fresh VAE (or continue `vae`) on `frames`-frame windows of `pool`; returns (vae, losses).
    Windows of 5 frames train every weight, but only 9+ frames train the chunk-to-chunk causal cache that
    17-frame clips use from their third latent frame on (5-frame training: 19.5 dB on windows, 14.7 dB on
    full held-out clips); hence the second stage on 17-frame windows."""
    gen = torch.Generator().manual_seed(seed)
    if vae is None:
        vae = seeded_init(new_vae, seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    losses = []
    t0 = time.time()
    for i in range(steps):
        x = vae_windows(pool, batch, gen, frames, crop)
        rec = vae_decode_whole(vae, vae_encode_whole(vae, x))
        loss = F.mse_loss(rec, x)
        total = loss + l1 * F.l1_loss(rec, x) if l1 else loss
        optimizer_step(opt, sched, vae.parameters(), total)
        losses.append(loss.item())
        if checkpoint is not None and i % 100 == 99:
            checkpoint(vae, i + 1)
        if i % 25 == 0 or i == steps - 1:
            log(f"vae step {i} mse {losses[-1]:.5f} ({10 * math.log10(4 / max(losses[-1], 1e-12)):.1f} dB) "
                f"{time.time() - t0:.0f}s")
    return vae.eval(), losses


ENCODER_SIDE = ("encoder.", "quant_conv.")      # what fixes every latent (with the config's latents_mean/std)


def encoder_digest(state: dict[str, Tensor]) -> str:
    """sha256 over the names and bytes of a VAE state_dict's encoder side (ENCODER_SIDE), in sorted order: equal
    digests = the same latents for every input (the DiTs and the content encoder were trained on them)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(ENCODER_SIDE)):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def decoder_params(vae) -> list:
    """The decoder side of a VAE (post_quant_conv + decoder): what `train_decoder` trains."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


@torch.no_grad()
def raw_latents(vae, clips: Tensor, batch: int = 4) -> Tensor:
    """uint8 [N, T, H, W, 3] -> raw posterior means [N, 16, F, h, w] (the frozen encoder's training targets)."""
    return torch.cat([vae_encode_mean(vae, to_vae_space(clips[i:i + batch])) for i in range(0, len(clips), batch)])


@torch.no_grad()
def decoded_psnr(vae, latents: Tensor, clips: Tensor) -> float:
    """Mean per-clip PSNR (dB, 0..1, decode clamped as diffusers' `decode`) of latents [N, 16, F, h, w] vs
    uint8 clips [N, T, H, W, 3]."""
    out = [vae_decode_whole(vae, latents[i:i + 1]).clamp(-1, 1) for i in range(len(latents))]
    return sum(psnr((o + 1) / 2, to_vae_space(c[None]) / 2 + 0.5) for o, c in zip(out, clips)) / len(clips)


def train_decoder(vae, latents: Tensor, pool: Tensor, steps: int, seed: int, batch: int = 2, lr: float = 5e-4,
                  l1: float = 0.0, log=print, checkpoint=None, every: int = 50):
    """Fine-tune only the decoder side of `vae` (encoder and quant_conv frozen, so every latent and the
    config's latents_mean/std stay valid) to decode the frozen encoder's latents [N, 16, F, h, w] of the
    uint8 clips pool [N, T, H, W, 3] back to the whole clips: one-pass UNCLAMPED decode (`vae_decode_whole`),
    MSE (+ l1 * L1). checkpoint(vae, step) runs every `every` steps and at the end; returns (vae, losses)."""
    gen = torch.Generator().manual_seed(seed)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = decoder_params(vae)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    losses = []
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        x = to_vae_space(pool[idx])
        rec = vae_decode_whole(vae, latents[idx])
        loss = F.mse_loss(rec, x)
        total = loss + l1 * F.l1_loss(rec, x) if l1 else loss
        optimizer_step(opt, sched, params, total)
        losses.append(loss.item())
        if i % 25 == 0 or i == steps - 1:
            log(f"decoder step {i} mse {losses[-1]:.5f} ({10 * math.log10(4 / max(losses[-1], 1e-12)):.1f} dB) "
                f"{time.time() - t0:.0f}s ({(time.time() - t0) / (i + 1):.2f} s/step)")
        if checkpoint is not None and ((i + 1) % every == 0 or i == steps - 1):
            vae.eval()
            checkpoint(vae, i + 1)
            vae.train()
    for p in vae.parameters():
        p.requires_grad_(True)
    return vae.eval(), losses


@torch.no_grad()
def finish_vae(vae, pool: Tensor) -> None:
    """Constant log-variance (sample() == mode()) and latents_mean/std measured on `pool` (full clips)."""
    zd = vae.config.z_dim
    vae.quant_conv.weight[zd:] = 0
    vae.quant_conv.bias[zd:] = LOGVAR_OFF
    zs = torch.cat([vae_encode_mean(vae, to_vae_space(pool[i:i + 4])) for i in range(0, len(pool), 4)])
    mean = zs.mean(dim=(0, 2, 3, 4))
    std = zs.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two 0..1 tensors."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


# ---------------------------------------------------------------- DiT
def new_dit(config: dict | None = None):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**(config or DIT_CONFIG))
    mute_text(model)
    return model


@torch.no_grad()
def mute_text(model) -> None:
    """Make every cross-attention output independent of the text context, keeping what it adds for the
    training context (zeros: softmax over equal keys returns the value bias b_v, so the block adds
    W_o (W_v e + b_v) + b_o with e = the text embedder's output for a zero token): that vector becomes the
    output bias, the output weight is zeroed; both are frozen. A fresh model's cross-attention starts muted; a
    warm-started one is muted again (its training context was zeros, so its function is unchanged)."""
    e = model.condition_embedder.text_embedder(torch.zeros(1, model.config.text_dim))[0]
    for block in model.blocks:
        out, v = block.attn2.to_out[0], block.attn2.to_v
        out.bias.copy_(out.weight @ v(e) + out.bias)
        out.weight.zero_()
        out.weight.requires_grad_(False)
        out.bias.requires_grad_(False)


def i2v_channels(first_latents: Tensor) -> Tensor:
    """Stock I2V conditioning channels [N, 20, F, h, w] = keep-mask (4: latent frame 0 kept) + cond latent
    (16), from first_latents [N, 16, F, h, w] = model-space latent of [frame 1, grey 0.5 x (T-1)]."""
    n, _, f, h, w = first_latents.shape
    keep = torch.zeros(n, 4, f, h, w)
    keep[:, :, 0] = 1
    return torch.cat([keep, first_latents], 1)


def fun_channels(control_latents: Tensor, latents: Tensor) -> Tensor:
    """Fun-Control conditioning channels [N, 32, F, h, w] as ComfyUI's WanFunControlToVideo builds them: the
    control video's latent (16), then the start image's latent (16: latent frame 0 = frame 1 alone, a causal
    encode, so `latents[:, :, 0]`; zeros after). No mask channels."""
    image = torch.zeros_like(latents)
    image[:, :, 0] = latents[:, :, 0]
    return torch.cat([control_latents, image], 1)


def control_clips(clips: Tensor) -> Tensor:
    """uint8 [N, T, H, W, 3] -> 0..1 [N, T, H, W, 3]: the world's control video, the clip's luma as grey RGB
    (motion and shapes without colour: the appearance must come from the start image)."""
    x = clips.float() / 255
    luma = x @ torch.tensor([0.299, 0.587, 0.114])
    return luma[..., None].expand_as(x).contiguous()


def cond_clips(clips: Tensor) -> Tensor:
    """uint8 [N, T, H, W, 3] -> 0..1 [N, T, H, W, 3]: frame 1 then grey 0.5 (lora_edit's stock I2V V_cond)."""
    x = clips.float() / 255
    out = torch.full_like(x, GREY)
    out[:, 0] = x[:, 0]
    return out


def pool_latents(vae_dir: Path, pool: Tensor, kind: str, cache: Path | None = None) -> Tensor:
    """Model-space latents [N, 16, F, h, w] of the pool's clips ('clip'), their stock I2V condition videos
    ('first': `cond_clips`) or control videos ('control': `control_clips`) under the VAE in vae_dir; cached
    next to the pool cache (keyed by the VAE file's sha256 and the pool size)."""
    from .model import load_vae_file

    make = {"clip": lambda c: c, "first": cond_clips, "control": control_clips}[kind]
    path = None
    if cache is not None:
        path = cache.with_name(f"latents_{kind}_{sha256(vae_dir / 'vae.safetensors')[:16]}_{len(pool)}.pt")
        if path.is_file():
            return torch.load(path, weights_only=True)
    lat = encode_model_space(load_vae_file(vae_dir), make(pool))
    if path is not None:
        tmp = path.with_suffix(".tmp")
        torch.save(lat, tmp)
        os.replace(tmp, path)
    return lat


@torch.no_grad()
def encode_model_space(vae, clips: Tensor, batch: int = 4) -> Tensor:
    """0..1 or uint8 [N, T, H, W, 3] -> model-space latents [N, 16, F, h, w] (posterior mean, normalised)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    zs = [vae_encode_mean(vae, to_vae_space(clips[i:i + batch])) for i in range(0, len(clips), batch)]
    return (torch.cat(zs) - mean) / std


def dit_loss(model, x0: Tensor, cond: Tensor, gen: torch.Generator, t_shift: float = 1.0) -> Tensor:
    """Flow-matching loss (host.sampling's convention): x_t = (1-t) x0 + t n, predict v = n - x0; the input is
    cat([x_t, cond]) (cond: `i2v_channels` or `fun_channels`). t is logit-normal, then mapped through the
    sampler's shift (t_shift * t / (1 + (t_shift - 1) t); 1 = unshifted) so training sees the noise levels a
    shifted schedule spends its steps on."""
    from ..host.sampling import shifted_sigma

    b = x0.shape[0]
    t = shifted_sigma(torch.sigmoid(torch.randn(b, generator=gen)), t_shift)   # logit-normal t in (0, 1), shifted
    noise = torch.randn(x0.shape, generator=gen)
    tt = t.view(b, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    inp = torch.cat([x_t, cond], 1)
    ctx = torch.zeros(b, TEXT_TOKENS, model.config.text_dim)
    v = model(hidden_states=inp, timestep=t * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
    return F.mse_loss(v, noise - x0)


def dit_config(width: int = 0, layers: int = 0, ffn: int = 0) -> dict:
    """DIT_CONFIG with another width (a multiple of 128: ComfyUI reads heads = width // 128), depth or FFN
    width (0 keeps the default)."""
    if width % 128:
        raise ValueError(f"DiT width {width} is not a multiple of 128 (ComfyUI builds width // 128 heads of 128)")
    heads = width // 128 or DIT_CONFIG["num_attention_heads"]
    return DIT_CONFIG | {"num_attention_heads": heads, "num_layers": layers or DIT_CONFIG["num_layers"],
                         "ffn_dim": ffn or DIT_CONFIG["ffn_dim"]}


@torch.no_grad()
def grow_dit(model, layers: int):
    """`model` with `layers` blocks: its own blocks spread evenly (old block i at layers * i // old), identity
    blocks between them (self-attention, cross-attention and FFN output projections zero, so every new block
    adds nothing: the grown model computes the same function, and training gives it the extra depth)."""
    old = model.config.num_layers
    if layers < old:
        raise ValueError(f"cannot grow a DiT of {old} blocks to {layers}: --layers must be at least {old}")
    grown = new_dit({k: model.config[k] for k in DIT_CONFIG} | {"num_layers": layers})
    keep = {layers * i // old: i for i in range(old)}
    for j, block in enumerate(grown.blocks):
        if j in keep:
            block.load_state_dict(model.blocks[keep[j]].state_dict())
        else:
            for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
                linear.weight.zero_()
                linear.bias.zero_()
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    grown.load_state_dict(outside | {k: v for k, v in grown.state_dict().items() if k.startswith("blocks.")})
    return grown


def train_dit(latents: Tensor, cond: Tensor, steps: int, seed: int, batch: int = 16, lr: float = 1e-3,
              log=print, model=None, config: dict | None = None, checkpoint=None, t_shift: float = 1.0):
    """Train a fresh I2V DiT of `config` (default DIT_CONFIG), or continue `model`, on model-space latents
    [N, 16, F, h, w] with conditioning channels cond [N, C, F, h, w]; checkpoint(model, step) every 500 steps
    when given; returns (model, losses)."""
    gen = torch.Generator().manual_seed(seed)
    model = seeded_init(lambda: new_dit(config), seed) if model is None else model
    mute_text(model)                                       # a warm start too (its text path stays frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    losses = []
    t0 = time.time()
    model.train()
    for i in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        loss = dit_loss(model, latents[idx], cond[idx], gen, t_shift)
        optimizer_step(opt, sched, params, loss)
        losses.append(loss.item())
        if i % 25 == 0 or i == steps - 1:
            log(f"dit step {i} loss {losses[-1]:.4f} {time.time() - t0:.0f}s")
        if checkpoint is not None and i % 500 == 499:
            checkpoint(model, i + 1)
    return model.eval(), losses


@torch.no_grad()
def fun_from_i2v(i2v):
    """A Fun-Control DiT (48 input channels: x_t, control latent, start-image latent) initialised from an I2V
    DiT (36: x_t, keep-mask, cond latent): every weight copied; the input layer keeps x_t's and the cond
    latent's columns (the cond latent becomes the start-image slot), the control columns start at zero (so
    at init it is the I2V model without its mask channels)."""
    model = new_dit({k: i2v.config[k] for k in DIT_CONFIG} | {"in_channels": 48})
    state = i2v.state_dict()
    w = state["patch_embedding.weight"]                    # [dim, 36, 1, 2, 2]
    state["patch_embedding.weight"] = torch.cat([w[:, :16], torch.zeros_like(w[:, 20:36]), w[:, 20:36]], 1)
    model.load_state_dict(state, strict=True)
    mute_text(model)
    return model


# ---------------------------------------------------------------- evaluation
def evaluate(folder: Path, seeds, steps: int = 20, shift: float = 3.0, log=print) -> dict:
    """Held-out quality of the models in `folder`: VAE round-trip PSNR; I2V from each clip's own first frame vs
    repeating frame 1 (PSNR over frames 2..T and bench.warp_error along the true motion), and vs repeating the VAE
    round trip of frame 1 (`repeat_vae_psnr`: a still video through the same VAE, isolating the DiT), and the DiT's
    one-Euler-step output (`i2v_mean_psnr`: its estimate of the expected clip given frame 1, no sampling spread)."""
    from ..evaluate.bench import true_motion, warp_error, weighted_psnr
    from .model import generate_i2v, load_world_models
    from .scenes import render_clip

    world = load_world_models(folder=folder)
    rows = []
    for s in seeds:
        clip = render_clip(int(s), size=(SIZE, SIZE), frames=FRAMES)
        rec = world.vae.decode(world.vae.encode(clip))
        gen = generate_i2v(world, clip[0], FRAMES, steps, shift, seed=int(s))
        rep = clip[:1].expand_as(clip)
        motion = true_motion(clip)
        row = {"seed": int(s), "vae_psnr": weighted_psnr(rec, clip),
               "i2v_psnr": weighted_psnr(gen[1:], clip[1:]), "repeat_psnr": weighted_psnr(rep[1:], clip[1:]),
               "i2v_mean_psnr": weighted_psnr(generate_i2v(world, clip[0], FRAMES, 1, shift, seed=int(s))[1:], clip[1:]),
               "repeat_vae_psnr": weighted_psnr(rec[:1].expand_as(clip)[1:], clip[1:]),
               "i2v_warp": warp_error(gen, motion), "repeat_warp": warp_error(rep, motion),
               "truth_warp": warp_error(clip, motion)}
        log(" ".join(f"{k} {v:.4g}" for k, v in row.items()))
        rows.append(row)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "seed"} | {"scenes": len(rows)}


# ---------------------------------------------------------------- output
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_model(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """state_dict -> safetensors (floating tensors cast to `dtype` when given), written atomically."""
    from safetensors.torch import save_file

    def stored(v: Tensor) -> Tensor:
        return v.detach().to(dtype).contiguous() if dtype is not None and v.is_floating_point() else v.contiguous()

    tmp = path.with_suffix(".tmp")
    save_file({k: stored(v) for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def write_entry(out: Path, name: str, file: str, config: dict, args, seconds: float, extra: dict) -> None:
    """Add/replace manifest.json's entry `name` (sha256, config, command, seed, wall time, git commit)."""
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    manifest["models"][name] = {
        "file": file, "sha256": sha256(out / file), "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "command": "python -m ffprop.nodes.world.train " + " ".join(sys.argv[1:]),
        "seed": args.seed, "steps": args.steps, "wall_seconds": round(seconds, 1), "git_commit": git_commit(),
        "torch": torch.__version__, **extra,
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)


def write_reference(out: Path) -> bool:
    """reference.safetensors: model.reference_forward of the models in `out` (the tests reproduce it). False,
    writing nothing, when `out` lacks the VAE or the I2V DiT the reference runs (a DiT trained with --vae
    elsewhere, kept apart from the bundle)."""
    from safetensors.torch import save_file

    from .model import load_fun_control, load_world_models, read_manifest, reference_forward

    models = read_manifest(out)["models"]
    if not {"vae", "dit_i2v"} <= models.keys():
        return False
    fun = load_fun_control(folder=out) if "dit_fun_control" in models else None
    ref = reference_forward(load_world_models(folder=out), fun)
    tmp = out / "reference.tmp"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp))
    os.replace(tmp, out / "reference.safetensors")
    return True


def decoder_main(args, pool: Tensor, cache: Path | None, t0: float, log) -> int:
    """`vae --decoder-only`: train_decoder from --init's VAE; every checkpoint writes --out/vae.safetensors and
    its manifest entry (a complete, loadable VAE: nothing to finish) plus the validation curve (held-out seeds
    HELDOUT_SEEDS[8:16], disjoint from `eval`'s first 8) to --out/decoder_curve.json."""
    from .model import load_vae_file, read_manifest
    from .scenes import HELDOUT_SEEDS

    if args.init is None:
        raise SystemExit("vae --decoder-only needs --init DIR (the VAE whose encoder is kept)")
    vae = load_vae_file(args.init)
    init_record = read_manifest(args.init)["models"]["vae"]
    encoder = encoder_digest(vae.state_dict())
    lat_path = None if cache is None else cache.with_name(
        f"raw_latents_{sha256(args.init / 'vae.safetensors')[:16]}_{len(pool)}.pt")
    if lat_path is not None and lat_path.is_file():
        latents = torch.load(lat_path, weights_only=True)
    else:
        latents = raw_latents(vae, pool)
        if lat_path is not None:
            torch.save(latents, lat_path.with_suffix(".tmp"))
            os.replace(lat_path.with_suffix(".tmp"), lat_path)
    val_clips = render_pool(HELDOUT_SEEDS[8:16])
    val_lat = raw_latents(vae, val_clips)
    curve = [{"step": 0, "val_psnr": round(decoded_psnr(vae, val_lat, val_clips), 3), "seconds": 0.0}]
    log(f"latents {tuple(latents.shape)} in {time.time() - t0:.0f}s; validation {curve[0]['val_psnr']:.2f} dB")
    t_train = time.time()

    def checkpoint(model, step):
        if encoder_digest(model.state_dict()) != encoder:
            raise RuntimeError("decoder-only training changed the encoder side (a bug in train_decoder)")
        curve.append({"step": step, "val_psnr": round(decoded_psnr(model, val_lat, val_clips), 3),
                      "seconds": round(time.time() - t_train, 1)})
        save_model(model, args.out / "vae.safetensors")
        write_entry(args.out, "vae", "vae.safetensors", dict(model.config), args, time.time() - t0,
                    {"steps_done": step, "decoder_only": "encoder + quant_conv + latents_mean/std copied from "
                     "init_from unchanged; post_quant_conv + decoder trained on whole clips", "loss": "mse"
                     + (f" + {args.l1} l1" if args.l1 else ""), "encoder_sha256": encoder, "val_curve": curve,
                     "init_from": init_record | {"encoder_sha256": encoder}})
        tmp = args.out / "decoder_curve.tmp"
        tmp.write_text(json.dumps(curve, indent=1) + "\n")
        os.replace(tmp, args.out / "decoder_curve.json")
        log(f"checkpoint at step {step}: validation {curve[-1]['val_psnr']:.2f} dB")

    train_decoder(vae, latents, pool, args.steps, args.seed, args.batch or 2, args.lr or 5e-4, args.l1, log,
                  checkpoint)
    print(f"done in {time.time() - t0:.0f}s -> {args.out}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffprop.nodes.world.train", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["vae", "dit", "fun", "eval"],
                   help="dit: I2V DiT; fun: Fun-Control DiT (from --init's I2V DiT); eval: held-out quality of --out")
    p.add_argument("--steps", type=int, default=0, help="training steps (vae, dit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for the .safetensors and manifest.json")
    p.add_argument("--clips", type=int, default=160, help="training clips (world seeds 0..clips-1)")
    p.add_argument("--batch", type=int, default=0, help="0 = default (vae 4, dit 16)")
    p.add_argument("--lr", type=float, default=0.0, help="0 = default (vae 1e-3, dit 1e-3)")
    p.add_argument("--vae", type=Path, default=None, help="dit: folder holding vae.safetensors (default --out)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from DIR/vae.safetensors (vae) or DIR/dit_i2v.safetensors (dit), checked")
    p.add_argument("--init-name", default="dit_i2v", help="fun: the manifest entry in --init to start from")
    p.add_argument("--window", type=int, default=VAE_WINDOW[0], help="vae: frames per training window (4k+1)")
    p.add_argument("--crop", type=int, default=VAE_WINDOW[1], help="vae: pixels per side of a training window")
    p.add_argument("--l1", type=float, default=0.0, help="vae: weight of an L1 term added to the MSE loss")
    p.add_argument("--decoder-only", action="store_true",
                   help="vae: fine-tune only the decoder of --init's VAE on whole clips (encoder, latents_mean/std "
                        "kept bit-identical); checkpoints vae.safetensors + manifest to --out every 50 steps")
    p.add_argument("--width", type=int, default=0, help="dit without --init: model width, a multiple of 128 (default 128)")
    p.add_argument("--layers", type=int, default=0, help="dit: transformer blocks (default 4); with --init, grow its DiT to "
                   "this many by inserting identity blocks (grow_dit)")
    p.add_argument("--ffn", type=int, default=0, help="dit without --init: FFN width (default 512)")
    p.add_argument("--t-shift", type=float, default=1.0,
                   help="dit, fun: shift the logit-normal training t like the sampler's schedule (1 = unshifted)")
    p.add_argument("--cache", type=Path, default=None, help="folder to cache rendered clips (default: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two threads thrash on a shared CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.what == "eval":
        from .scenes import HELDOUT_SEEDS

        summary = evaluate(args.out, HELDOUT_SEEDS[:args.clips], log=log)
        print(json.dumps(summary, indent=2))
        return 0
    if args.steps < 1:
        p.error("vae, dit and fun need --steps N (N >= 1)")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = None if args.cache is None else args.cache / f"world_train_{args.clips}.pt"
    t0 = time.time()
    pool = render_pool(range(args.clips), cache)
    print(f"{len(pool)} clips ready in {time.time() - t0:.0f}s", flush=True)
    if args.what == "vae" and args.decoder_only:
        return decoder_main(args, pool, cache, t0, log)
    if args.what == "vae":
        from .model import load_vae_file, read_manifest

        start = None if args.init is None else load_vae_file(args.init)
        init_record = None if args.init is None else read_manifest(args.init)["models"]["vae"]

        def checkpoint(vae, step):                 # raw weights mid-run (not finished): a killed run keeps them
            save_model(vae, args.out / "vae_checkpoint.safetensors")
            log(f"checkpoint at step {step}")

        vae, losses = train_vae(pool, args.steps, args.seed, args.batch or 4, args.lr or 1e-3, log, start,
                                args.window, args.crop, args.l1, checkpoint)
        finish_vae(vae, pool)
        save_model(vae, args.out / "vae.safetensors")
        extra = {"loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:])}
        if args.init is not None:                  # keep the first stage's record (its command, seed, time)
            extra["init_from"] = init_record
        write_entry(args.out, "vae", "vae.safetensors", dict(vae.config), args, time.time() - t0, extra)
    else:
        from .model import load_dit_file, read_manifest

        vae_dir = args.vae or args.out
        lat = pool_latents(vae_dir, pool, "clip", cache)
        print(f"latents {tuple(lat.shape)} std {float(lat.std()):.3f} in {time.time() - t0:.0f}s", flush=True)
        if args.what == "dit":
            name, init_name = "dit_i2v", "dit_i2v"
            cond = i2v_channels(pool_latents(vae_dir, pool, "first", cache))
            start = None if args.init is None else load_dit_file(args.init)
            if start is not None and args.layers:
                start = grow_dit(start, args.layers)
        else:
            name, init_name = "dit_fun_control", args.init_name
            if args.init is None:
                p.error("fun needs --init DIR holding the I2V DiT it starts from")
            cond = fun_channels(pool_latents(vae_dir, pool, "control", cache), lat)
            start = load_dit_file(args.init, init_name)
            if start.config.in_channels == 36:
                start = fun_from_i2v(start)
        init_record = None if args.init is None else read_manifest(args.init)["models"][init_name]
        def checkpoint(model, step):               # raw weights mid-run: a killed run keeps them
            save_model(model, args.out / f"{name}_checkpoint.safetensors")
            log(f"checkpoint at step {step}")

        model, losses = train_dit(lat, cond, args.steps, args.seed, args.batch or 16, args.lr or 1e-3, log, start,
                                  dit_config(args.width, args.layers, args.ffn), checkpoint, args.t_shift)
        save_model(model, args.out / f"{name}.safetensors", DIT_STORED)
        extra = {"loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                 "stored": f"{DIT_STORED} (the loaders build float32 modules)",
                 "text_context": f"ignored (cross-attention outputs zeroed); trained with zeros [B, {TEXT_TOKENS}, 4096]",
                 "vae_sha256": sha256(vae_dir / "vae.safetensors"), "t_shift": args.t_shift}
        if args.what == "fun":
            extra["control"] = "the clip's luma as grey RGB (control_clips); start image = frame 1"
        if args.init is not None:
            extra["init_from"] = init_record
        write_entry(args.out, name, f"{name}.safetensors", dict(model.config), args, time.time() - t0, extra)
        if not write_reference(args.out):          # --vae / --init elsewhere: the models are not side by side
            print(f"reference.safetensors not written: {args.out} lacks the VAE or the I2V DiT (this DiT was "
                  f"trained on {vae_dir}'s VAE); copy them and their manifest entries beside it to load or bundle it",
                  flush=True)
    print(f"done in {time.time() - t0:.0f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
