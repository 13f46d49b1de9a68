"""Learned alpha predictor: a small transformer over the pooled source latent.

Input: source latent [B, 16, F, h, w]. Each latent frame is average-pooled to a grid x grid map; tokens carry
the latent and its difference to the previous frame (motion), plus a frame and a cell embedding. Two heads:
  arch "paper" (SEED_SPEC 3.6, default, file version 2): the tokens are mean-pooled and a two-headed MLP gives
    one alpha_S and one alpha_T per clip (the global / paper variants);
  arch "frames" (SEED_SPEC 3.3, version-1 files): a linear head per frame gives alpha_S (their mean) and one
    alpha_T step per latent frame k = 1..F-1 (the warped variant).
Each alpha = exp(tanh(s) * ln alpha_max), in [1/alpha_max, alpha_max]. The last layers are zero-initialised,
so a fresh predictor gives alpha = 1, i.e. exactly the stock model. Saved as safetensors with its kind, file
version and config in the metadata; version-1 files load as arch "frames", newer versions get a clear error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from ..common import atomic_write
from .positions import ALPHA_MAX, RopeAlphas, check_latent

KIND = "ffprop.ast_rope_predictor"
VERSION = 2
ARCHS = ("paper", "frames")


@dataclass(frozen=True)
class PredictorConfig:
    width: int = 256
    depth: int = 2
    heads: int = 4
    grid: int = 4
    alpha_max: float = 2.0
    max_frames: int = 64
    arch: str = "paper"

    def check(self) -> "PredictorConfig":
        if self.arch not in ARCHS:
            raise ValueError(f"predictor arch must be one of {ARCHS}; got {self.arch!r}.")
        if self.width % self.heads or self.width < 8 or self.depth < 1 or self.grid < 1:
            raise ValueError(f"bad predictor config {self}: width must be a multiple of heads, depth >= 1, grid >= 1.")
        if not 1.0 < self.alpha_max <= ALPHA_MAX:
            raise ValueError(f"alpha_max must be in (1, {ALPHA_MAX}]; got {self.alpha_max}.")
        return self


class AlphaPredictor(nn.Module):
    """source latent [B, 16, F, h, w] -> (alpha_s [B], alpha_t [B] (arch paper) or [B, F-1] (arch frames));
    alpha = 1 at initialisation."""

    def __init__(self, config: PredictorConfig = PredictorConfig(), seed: int = 0):
        super().__init__()
        self.config = config.check()
        c = config
        with torch.random.fork_rng(devices=[]):    # torch's own layer init draws from the global RNG: undone
            self.embed = nn.Linear(32, c.width)
            self.frame_pos = nn.Parameter(torch.empty(c.max_frames, c.width))
            self.cell_pos = nn.Parameter(torch.empty(c.grid * c.grid, c.width))
            layer = nn.TransformerEncoderLayer(c.width, c.heads, 2 * c.width, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(c.width)
            if c.arch == "frames":
                self.head = nn.Linear(c.width, 2)       # per frame: (s_T, s_S)
            else:                                       # the two-headed MLP on the pooled tokens
                self.mlp_s = nn.Sequential(nn.Linear(c.width, c.width), nn.GELU(), nn.Linear(c.width, 1))
                self.mlp_t = nn.Sequential(nn.Linear(c.width, c.width), nn.GELU(), nn.Linear(c.width, 1))
        self.reset_parameters(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        """Initialise from `gen` only (same seed, same predictor; the global RNG is not used): linears
        U(+-1/sqrt(fan_in)) like torch's default, attention in-projections Xavier-uniform, embeddings N(0, 0.02^2),
        norms 1/0, the head zero (so a fresh predictor gives alpha = 1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(m, nn.MultiheadAttention):
                rows, cols = m.in_proj_weight.shape
                bound = math.sqrt(6.0 / (rows // 3 + cols))
                m.in_proj_weight.uniform_(-bound, bound, generator=gen)
                m.in_proj_bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for p in (self.frame_pos, self.cell_pos):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for last in ((self.head,) if self.config.arch == "frames" else (self.mlp_s[-1], self.mlp_t[-1])):
            last.weight.zero_()
            last.bias.zero_()

    def features(self, latent: Tensor) -> Tensor:
        """latent -> per-frame features [B, F, width] (the encoder's tokens mean-pooled per frame)."""
        z = check_latent(latent, "source latent").to(self.embed.weight.dtype)
        b, _, f, _, _ = z.shape
        g, n = self.config.grid, self.config.grid ** 2
        if f > self.config.max_frames:
            raise ValueError(f"the source latent has {f} latent frames; this predictor handles at most "
                             f"{self.config.max_frames}. Trim the clip or train a predictor with a larger max_frames.")
        pooled = nn.functional.adaptive_avg_pool3d(z, (f, g, g))                  # [B, 16, F, g, g]
        scale = pooled.flatten(1).std(dim=1).clamp_min(1e-6).view(b, 1, 1, 1, 1)
        pooled = pooled / scale
        diff = torch.cat([torch.zeros_like(pooled[:, :, :1]), pooled[:, :, 1:] - pooled[:, :, :-1]], dim=2)
        tok = rearrange(torch.cat([pooled, diff], dim=1), 'b c f gh gw -> b f (gh gw) c')        # [B, F, n, 32]
        h = self.embed(tok) + self.frame_pos[:f, None] + self.cell_pos[None]
        return self.norm(self.encoder(h.reshape(b, f * n, -1))).reshape(b, f, n, -1).mean(dim=2)

    def forward(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(latent)
        ln_max = math.log(self.config.alpha_max)
        if self.config.arch == "paper":
            pooled = h.mean(dim=1)                                    # [B, width]
            s_s, s_t = self.mlp_s(pooled)[:, 0], self.mlp_t(pooled)[:, 0]
            return torch.exp(torch.tanh(s_s) * ln_max), torch.exp(torch.tanh(s_t) * ln_max)
        s = self.head(h)                                              # [B, F, 2] (s_T, s_S) per frame
        alpha_t = torch.exp(torch.tanh(s[:, 1:, 0]) * ln_max)         # steps k = 1..F-1
        alpha_s = torch.exp(torch.tanh(s[:, :, 1].mean(dim=1)) * ln_max)
        return alpha_s, alpha_t

    def alphas(self, latent: Tensor, anchor_first: bool = True) -> RopeAlphas:
        """RopeAlphas for the first clip of the batch (keeps the graph: differentiable)."""
        a_s, a_t = self(latent)
        return RopeAlphas(alpha_s=a_s[0], alpha_t=a_t[0], anchor_first=anchor_first)


def save_predictor(predictor: AlphaPredictor, path: str | os.PathLike) -> Path:
    """Write the predictor to `path` (.safetensors) atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().float().cpu().contiguous() for k, v in predictor.state_dict().items()}
    meta = {"kind": KIND, "version": str(VERSION), "config": json.dumps(asdict(predictor.config))}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_safetensors(path: Path, device, missing: str, unreadable_hint: str = "") -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors file; FileNotFoundError(missing) when it is absent, ValueError naming
    the file (+ unreadable_hint) when it cannot be read."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path), device=str(device))
    except Exception as e:
        raise ValueError(f"'{path.name}' is not a readable safetensors file ({e}){unreadable_hint}.") from e


def load_predictor(path: str | os.PathLike, device="cpu") -> AlphaPredictor:
    """Load a predictor written by save_predictor; ValueError naming the file for anything else."""
    path = Path(path)
    meta, state = read_safetensors(path, device, f"no AST-RoPE predictor at '{path}'; put .safetensors files in "
                                   "models/ast_rope.", "; re-train or re-download it")
    if meta.get("kind") != KIND:
        raise ValueError(
            f"'{path.name}' is not an FFProp AST-RoPE predictor (metadata kind {meta.get('kind')!r}, expected {KIND!r}); "
            f"it has {len(state)} tensors, e.g. {sorted(state)[:3]}. Select a file written by 'Train AST-RoPE Predictor'."
        )
    version = meta.get("version", "1")
    if version not in [str(v) for v in range(1, VERSION + 1)]:
        raise ValueError(f"'{path.name}' is an AST-RoPE predictor of file version {version!r}; this FFProp reads "
                         f"versions 1-{VERSION}. Update FFProp, or re-train the predictor with this one.")
    try:
        raw = json.loads(meta.get("config", "{}"))
        if version == "1":                    # version 1 had one architecture: the per-frame head
            raw["arch"] = "frames"
        known = {f.name for f in fields(PredictorConfig)}
        config = PredictorConfig(**{k: v for k, v in raw.items() if k in known}).check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path.name}' has an unreadable predictor config: {e}") from e
    model = AlphaPredictor(config)
    ref = model.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    bad = [k for k, v in state.items() if k in ref and ref[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"'{path.name}' (file version {version}) does not match the AST-RoPE predictor architecture of its "
            f"config {config}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {bad[:3]}."
        )
    model.load_state_dict(state)
    return model.to(device).eval()
