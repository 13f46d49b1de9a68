"""GenProp's selective content encoder (SCE) and mask prediction decoder (MPD) on a Wan DiT (SEED_SPEC 4.2, 4.6).

SCE: a trainable copy of the generator's first N blocks. Its input is the patch-embedded source-video latent
plus a zero-initialised linear fusion of the generator's own patch tokens (so it "knows" what the generator is
making); after SCE block i a zero-initialised MLP maps its output to a residual that is added to the output of
generator block i. MPD: a copy of the generator's last block plus an MLP head, run on the penultimate block's
output, predicting the per-pixel-frame instance mask at pixel resolution (each token: its 4 pixel frames x 2x2
latent cells x 8x8 pixels, through a code of MPD_CODE values per frame and cell and one shared cell decoder). Task embeddings (one per augmentation) are added to the
SCE blocks' timestep modulation. The generator stays frozen; all new layers start at zero, so an attached
encoder leaves the generator's output bit-identical until it is trained.

Torch-only and host-agnostic: the blocks are copies of whatever host's blocks (diffusers or ComfyUI) and are run
through a `RunBlock` callable that the host glue (attach.py) supplies with the generator's own context,
timestep modulation and RoPE. Shapes: B batch, L = F * h' * w' tokens (h' = h / 2), D hidden size.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

TASKS = ("copy_paste", "mask_fill", "colour_fill")
"""The augmentation (= sub-task) of each task embedding, in order (SEED_SPEC 4.4)."""
TRACK_PROMPT = "track colored regions"   # GenProp's text prompt for the colour-fill (tracking) task
LATENT_CHANNELS = 16
PIXEL_FRAMES_PER_LATENT = 4              # the Wan VAE's temporal stride
VAE_STRIDE = 8                           # the Wan VAE's spatial stride: one latent cell = 8x8 pixels
MPD_CODE = 16                            # the MPD's code per (pixel frame, latent cell), decoded to its 8x8 pixels

RunBlock = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""run_block(block, hidden [B, L, D], temb_delta [6, D]) -> hidden [B, L, D]: run one (copied) Wan block with the
generator's context and RoPE and its timestep modulation plus temb_delta."""


@dataclass(frozen=True)
class EncoderConfig:
    """depth: N, the SCE's blocks; dim: D; num_layers: the generator's depth; patch_size: Wan's (1, 2, 2)."""

    depth: int
    dim: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def as_meta(self) -> dict[str, str]:
        return {k: str(list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def check_depth(depth: int, num_layers: int) -> None:
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"the content encoder depth N must be a whole number >= 1 (GenProp uses 24); got {depth!r}.")
    if num_layers < 2:
        raise ValueError(f"the content encoder needs a generator with at least 2 blocks (the mask decoder reads the "
                         f"penultimate block's output); this one has {num_layers}.")
    if depth > num_layers:
        raise ValueError(f"content encoder depth N = {depth} is larger than the generator's {num_layers} blocks; use "
                         f"N <= {num_layers} (Wan 2.1-14B has 40 blocks, 1.3B 30; try 8-20 on 14B).")


class ZeroMLP(nn.Module):
    """Linear -> GELU -> Linear whose last layer starts at zero: outputs exactly 0 until trained."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class ContentEncoder(nn.Module):
    """SCE (patch_embed, fusion, blocks, inject, task_embed) + MPD (mpd_block, mpd_head, mpd_pixel); see the module
    docstring.

    Build one with `build_encoder(dit, depth)` (copies the generator's blocks) or `load_encoder` (a saved file)."""

    def __init__(self, config: EncoderConfig, blocks: list[nn.Module], last_block: nn.Module):
        super().__init__()
        d, (pt, ph, pw) = config.dim, config.patch_size
        self.config = config
        self.patch_embed = nn.Conv3d(LATENT_CHANNELS, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.fusion = nn.Linear(d, d)
        nn.init.zeros_(self.fusion.weight)
        nn.init.zeros_(self.fusion.bias)
        self.blocks = nn.ModuleList(blocks)
        self.inject = nn.ModuleList(ZeroMLP(d, d) for _ in blocks)
        self.task_embed = nn.Parameter(torch.zeros(len(TASKS), 6, d))
        self.mpd_block = last_block
        self.mpd_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"),
                                      nn.Linear(d, PIXEL_FRAMES_PER_LATENT * ph * pw * MPD_CODE))
        self.mpd_pixel = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(MPD_CODE, VAE_STRIDE ** 2))
        assert pt == 1, "Wan patches are (1, 2, 2)"

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def source_tokens(self, latent: Tensor) -> Tensor:
        """Source-video latent [B, 16, F, h, w] (model space) -> tokens [B, F*h'*w', D] in token order (t, h, w)."""
        w = self.patch_embed.weight
        return self.patch_embed(latent.to(w.device, w.dtype)).flatten(2).transpose(1, 2)   # b d f h w -> b (f h w) d

    def features(self, gen_tokens: Tensor, source: Tensor, task: int, run_block: RunBlock) -> list[Tensor]:
        """The N injection residuals [B, L, D], one per SCE block (zeros until trained).

        gen_tokens: the generator's patch tokens [B, L, D] (the input of its block 0); source: source tokens
        [B or 1, L, D] (`source_tokens`); task: index into TASKS."""
        if source.shape[1:] != gen_tokens.shape[1:]:
            raise ValueError(f"the source video gives {source.shape[1]} tokens but the generator's latent has "
                             f"{gen_tokens.shape[1]}: the source video must have the same length and size as the "
                             "generated video (same frames, width and height in WanImageToVideo / the sampler).")
        h = source.to(gen_tokens.dtype).expand(gen_tokens.shape[0], -1, -1) + self.fusion(gen_tokens)
        delta = self.task_embed[task]
        out = []
        for block, inject in zip(self.blocks, self.inject):
            h = run_block(block, h, delta)
            out.append(inject(h))
        return out

    def mask_logits(self, penultimate: Tensor, run_block: RunBlock, grid: tuple[int, int, int]) -> Tensor:
        """MPD: the penultimate block's output [B, L, D] -> per-pixel-frame mask logits [B, T, H, W] at PIXEL
        resolution (H = 8 h), T = 4 (F - 1) + 1 (each latent frame's 4 pixel frames; frame 0 stands for one)."""
        f, gh, gw = grid
        _, ph, pw = self.config.patch_size
        k, s = PIXEL_FRAMES_PER_LATENT, VAE_STRIDE
        x = self.mpd_head(run_block(self.mpd_block, penultimate, torch.zeros_like(self.task_embed[0])))
        b = x.shape[0]
        x = self.mpd_pixel(x.reshape(b, f, gh, gw, k, ph, pw, MPD_CODE))    # [b, f, gh, gw, k, ph, pw, s*s]
        # b f gh gw k ph pw (sy sx) -> b (f k) (gh ph sy) (gw pw sx)
        x = x.reshape(b, f, gh, gw, k, ph, pw, s, s).permute(0, 1, 4, 2, 5, 7, 3, 6, 8)
        return x.reshape(b, f * k, gh * ph * s, gw * pw * s)[:, k - 1:]

    def forward(self, fn: Callable[[], Tensor]) -> Tensor:
        """Runs fn() (a whole training step's loss with this encoder attached): lets DistributedDataParallel wrap
        the encoder, whose layers are called from inside the generator's forward, not from here."""
        return fn()


def copy_block(block: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A trainable deep copy of a generator block in `dtype` (its own weights, requires_grad on; fp8 cast up)."""
    twin = copy.deepcopy(block)
    for m in twin.modules():
        m.__dict__.pop("forward", None)   # a wrapper some runner installed on the original (e.g. a BlockRunner)
        if hasattr(m, "weight_function"):  # ComfyUI cast ops: the original's weight wrappers / LoRA patches stay there
            m.weight_function, m.bias_function = [], []
    for t in (*twin.parameters(), *twin.buffers()):
        if t.is_floating_point():
            t.data = t.data.detach().to(dtype).clone()
    return twin.requires_grad_(True).train()


def build_encoder(dit, depth: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> ContentEncoder:
    """A fresh ContentEncoder for `dit` (a WanDiT, I2V): copies of its blocks 0..N-1 and its last block; the
    source patch embedding starts from the generator's conditioning-latent input channels (the 16 channels of
    clean VAE latents it already reads); new layers drawn from a local generator seeded by `seed`."""
    dims = dit.dims
    check_i2v(dims.in_channels, "the content encoder")
    check_depth(depth, dims.num_layers)
    blocks = dit.blocks()
    config = EncoderConfig(depth=depth, dim=dims.hidden_size, num_layers=dims.num_layers,
                           patch_size=tuple(dims.patch_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = ContentEncoder(config, [copy_block(b, dtype) for b in blocks[:depth]], copy_block(blocks[-1], dtype))
    pe = dit.module.patch_embedding
    with torch.no_grad():
        enc.patch_embed.weight.copy_(pe.weight[:, -LATENT_CHANNELS:].float())
        if pe.bias is not None:
            enc.patch_embed.bias.copy_(pe.bias.float())
    return enc.to(pe.weight.device, dtype)


def check_i2v(c: int, what: str) -> None:
    """c = the DiT's input channels: a Wan 2.1 I2V DiT (36) or ValueError naming what it is."""
    if c != 36:
        kind = {16: "a text-to-video (T2V) model", 48: "a Fun-Control model"}.get(c, f"a model with {c} input channels")
        raise ValueError(f"{what} works on a Wan 2.1 image-to-video model (36 input channels = 16 noise + 4 mask + "
                         f"16 image) but this is {kind}. Load an I2V checkpoint, e.g. wan2.1_i2v_480p_14B.")


def pixel_mask_to_latent(mask: Tensor, sigma: float = 1.0) -> Tensor:
    """GenProp's m~: a pixel-rate edit mask [T, H, W] (1 = edited) -> [1, 1, F, H/8, W/8]: each latent frame
    takes the max over its pixel frames (frame 0 alone, then groups of 4: "repeated temporally"), then a
    Gaussian blur (sigma in latent pixels) and 8x8 area downsampling ("Gaussian-downsampled")."""
    t, hh, ww = mask.shape
    if (t - 1) % PIXEL_FRAMES_PER_LATENT or hh % 8 or ww % 8:
        raise ValueError(f"mask is {t} frames of {ww}x{hh}; it needs 4k+1 frames and sizes that are multiples of 8.")
    m = mask.float()
    groups = torch.cat([m[:1], m[1:].reshape(-1, PIXEL_FRAMES_PER_LATENT, hh, ww).amax(1)])   # [F, H, W]
    small = nn.functional.avg_pool2d(groups[:, None], 8)                                     # [F, 1, h, w]
    if sigma > 0:
        r = max(1, int(round(2 * sigma)))
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = k / k.sum()
        small = nn.functional.pad(small, (r, r, r, r), mode="replicate")
        small = nn.functional.conv2d(small, k.view(1, 1, 1, -1))
        small = nn.functional.conv2d(small, k.view(1, 1, -1, 1))
    return small.permute(1, 0, 2, 3)[None].clamp(0, 1)                                      # [1, 1, F, h, w]


def pixel_mask_to_mpd(mask: Tensor) -> Tensor:
    """The MPD's target: the instance mask itself, mask [T, H, W] -> [1, T, H, W] (pixel resolution: the world's
    objects cover about one 8x8 latent cell, and even a perfect decoder of the cell's area fraction, upsampled,
    overlaps them with IoU ~0.2 at 0.5)."""
    return mask.float()[None]


def upsample_mask(logits: Tensor, height: int, width: int) -> Tensor:
    """MPD logits [B, T, h, w] -> MASK [T, H, W] in 0..1 of the first batch item (sigmoid, then bilinear resizing:
    none when the logits already have the pixel size, as the MPD's do)."""
    prob = torch.sigmoid(logits[:1].float())
    return nn.functional.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)[0]


def mask_iou(pred: Tensor, truth: Tensor, threshold: float = 0.5) -> Optional[float]:
    """IoU of two masks [T, H, W] binarised at `threshold`; None when both are empty."""
    a, b = pred > threshold, truth > threshold
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union
