"""Benchmark: the world VAE's round trip against simple codes of the same size (python tests/benchmarks/bench_world_vae.py).

Held-out clips (HELDOUT_SEEDS[:heldout], 64x64, 17 frames, values 0..1), PSNR over frames 2..17 (the 4 latent
frames after the first: a 16-channel latent per 4-frame x 8x8 x RGB patch, 768 values -> 16 numbers):
  - bicubic: 8x area-down + bicubic-up of each frame (64 numbers per 4-frame patch: 4x the VAE's budget);
  - pca K: a linear code, K components per 4 x 8 x 8 x 3 patch fitted on `train` training clips (K = 16 is
    exactly the VAE's latent budget);
  - ridge probe: a linear map from the frozen encoder's latents (each latent pixel with its 3x3 spatial x
    3 temporal neighbours, 432 numbers) to that pixel's patch, fitted on the same training clips: how much
    of the clip a decoder can read linearly from the latents (if it is far below pca 16, the encoder, not
    the decoder, loses the information);
  - vae: the VAE's own decode (clamped to [-1, 1] as diffusers' decode), per frame and its per-channel bias.
Pass --vae DIR (a folder with vae.safetensors + manifest.json) to measure another VAE; several may be given.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT.parent))


def psnr(a, b) -> float:
    return 10 * math.log10(1 / max(float(((a - b) ** 2).mean()), 1e-12))


def patches(c):
    """[N, 17, 64, 64, 3] -> [N, 4, 8, 8, 768]: frames 2..17 as one 4 x 8 x 8 x 3 patch per latent pixel."""
    n = c.shape[0]
    x = c[:, 1:].reshape(n, 4, 4, 8, 8, 8, 8, 3).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, 4, 8, 8, 768)


def unpatch(p):
    n = p.shape[0]
    return p.reshape(n, 4, 8, 8, 4, 8, 8, 3).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, 16, 64, 64, 3)


def neighbour_features(z):
    """Raw latents [N, 16, 5, 8, 8] -> [N, 4, 8, 8, 433]: latent frames 1..4, 3x3 x 3 neighbours (edge-replicated) + 1."""
    zp = F.pad(z, (1, 1, 1, 1, 0, 0), mode="replicate")
    feats = []
    for dt in (-1, 0, 1):
        frames = [min(max(f + dt, 0), 4) for f in range(1, 5)]
        for dy in range(3):
            for dx in range(3):
                feats.append(zp[:, :, frames, dy:dy + 8, dx:dx + 8])
    f = torch.cat(feats, 1).permute(0, 2, 3, 4, 1)
    return torch.cat([f, torch.ones(*f.shape[:-1], 1)], -1)


def main(argv=None) -> int:
    from ffprop.nodes.world.model import WEIGHTS, load_vae_file
    from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_clip
    from ffprop.nodes.world.train import vae_decode_whole, vae_encode_whole

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", type=Path, action="append", default=None, help="VAE folder(s) (default: the bundled one)")
    p.add_argument("--train", type=int, default=40, help="training clips (seeds 0..train-1) for pca and the probe")
    p.add_argument("--heldout", type=int, default=8, help="held-out clips (HELDOUT_SEEDS[:heldout])")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    clips = lambda seeds: torch.stack([render_clip(int(s), size=(64, 64), frames=17) for s in seeds])  # noqa: E731
    tr, te = clips(range(args.train)), clips(HELDOUT_SEEDS[:args.heldout])
    truth = te[:, 1:]
    rows = []
    x = te[:, 1:].reshape(-1, 64, 64, 3).permute(0, 3, 1, 2)
    bic = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bicubic", align_corners=False).clamp(0, 1)
    rows.append(("bicubic (8x area down, bicubic up)", psnr(bic.permute(0, 2, 3, 1).reshape(truth.shape), truth)))
    ptr, pte = patches(tr).reshape(-1, 768), patches(te)
    mu = ptr.mean(0)
    basis = torch.linalg.svd(ptr - mu, full_matrices=False)[2]
    for k in (16, 32, 64):
        w = basis[:k]
        rec = ((pte.reshape(-1, 768) - mu) @ w.T) @ w + mu
        rows.append((f"pca {k} per 4x8x8x3 patch", psnr(unpatch(rec.reshape(pte.shape)).clamp(0, 1), truth)))
    for folder in args.vae or [WEIGHTS]:
        vae = load_vae_file(folder)
        with torch.no_grad():
            ztr, zte = (torch.cat([vae_encode_whole(vae, c[i:i + 4].permute(0, 4, 1, 2, 3) * 2 - 1)
                                   for i in range(0, len(c), 4)]) for c in (tr, te))
            a, at = neighbour_features(ztr).reshape(-1, 433), neighbour_features(zte).reshape(-1, 433)
            w = torch.linalg.solve(a.T @ a + torch.eye(433), a.T @ ptr)
            rows.append((f"ridge probe on latents ({folder.name})", psnr(unpatch((at @ w).reshape(pte.shape)).clamp(0, 1),
                                                                         truth)))
            out = torch.cat([vae_decode_whole(vae, zte[i:i + 1]) for i in range(len(zte))])
            out = ((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        rows.append((f"vae ({folder.name})", psnr(out[:, 1:], truth)))
        rows.append((f"vae ({folder.name}) all 17 frames", psnr(out, te)))
        print(f"vae ({folder}): per-frame PSNR", [round(psnr(out[:, i], te[:, i]), 1) for i in range(out.shape[1])])
        print(f"vae ({folder}): mean error per RGB channel", [round(float(v), 4) for v in (out - te).mean((0, 1, 2, 3))])
    print(f"\n{args.heldout} held-out clips, frames 2..17, fitted on {args.train} training clips ({time.time() - t0:.0f}s)")
    for name, value in rows:
        print(f"  {name:<48} {value:6.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
