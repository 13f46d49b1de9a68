"""The AST-RoPE predictor as the paper has it (SEED_SPEC 3.6): a transformer + two-headed MLP on the source latent,
one alpha_S and one alpha_T per clip, alpha = 1 at init; its file format is versioned (version-1 files still load)."""

from __future__ import annotations

import json

import pytest
import torch
from ffprop.nodes.ast_rope.patch import choose_alphas
from ffprop.nodes.ast_rope.predictor import VERSION, AlphaPredictor, PredictorConfig, load_predictor, save_predictor
from safetensors.torch import save_file

PAPER = PredictorConfig(width=32, depth=1, heads=2, grid=2)
FRAMES = PredictorConfig(width=32, depth=1, heads=2, grid=2, arch="frames")


def latent(seed: int = 0, frames: int = 4) -> torch.Tensor:
    return torch.randn(2, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed)).cumsum(2)


def test_fresh_paper_predictor_is_the_identity_and_gives_one_alpha_pair_per_clip():
    p = AlphaPredictor(PAPER, seed=1)
    a_s, a_t = p(latent())
    assert a_s.shape == (2,) and a_t.shape == (2,)
    assert torch.equal(a_s, torch.ones(2)) and torch.equal(a_t, torch.ones(2))
    assert choose_alphas("learned", latent=latent()[:1], predictor=p, variant="paper").is_identity()
    with torch.no_grad():                                   # both heads are MLPs on the pooled tokens
        p.mlp_t[-1].bias.fill_(0.5)
        p.mlp_s[-1].bias.fill_(-0.5)
        a_s, a_t = p(latent())
    assert bool((a_t > 1).all()) and bool((a_s < 1).all()) and float(a_t.max()) <= 2.0
    p.mlp_t[-1].weight.data.normal_(generator=torch.Generator().manual_seed(0))
    a, b = p(latent(1))[1], p(latent(2) * 3)[1]              # content-dependent once trained
    assert not torch.equal(a, b)
    assert torch.equal(AlphaPredictor(PAPER, seed=1).state_dict()["embed.weight"],
                       AlphaPredictor(PAPER, seed=1).state_dict()["embed.weight"])


def test_round_trip_and_version(tmp_path):
    from safetensors import safe_open

    p = AlphaPredictor(PAPER, seed=2)
    with torch.no_grad():
        p.mlp_t[-1].bias.fill_(0.3)
    path = save_predictor(p, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["version"] == str(VERSION) == "2" and json.loads(meta["config"])["arch"] == "paper"
    q = load_predictor(path)
    assert q.config == PAPER
    torch.testing.assert_close(q(latent()), p(latent()), rtol=0, atol=0)


def test_version_one_files_load_and_others_get_clear_errors(tmp_path):
    v1 = AlphaPredictor(FRAMES, seed=3)
    with torch.no_grad():
        v1.head.bias.copy_(torch.tensor([0.3, -0.2]))
    state = {k: v.contiguous() for k, v in v1.state_dict().items()}
    old_meta = {"kind": "ffprop.ast_rope_predictor", "version": "1",      # what version 1 wrote: no arch key
                "config": json.dumps({"width": 32, "depth": 1, "heads": 2, "grid": 2, "alpha_max": 2.0,
                                      "max_frames": 64})}
    save_file(state, str(tmp_path / "v1.safetensors"), metadata=old_meta)
    old = load_predictor(tmp_path / "v1.safetensors")
    assert old.config.arch == "frames"
    torch.testing.assert_close(old(latent()), v1(latent()), rtol=0, atol=0)
    a = choose_alphas("learned", latent=latent()[:1], predictor=old, variant="warped")
    assert a.warped and a.alpha_t.shape == (3,)
    save_file(state, str(tmp_path / "v9.safetensors"), metadata={**old_meta, "version": "9"})
    with pytest.raises(ValueError, match="file version '9'.*reads versions 1-2"):
        load_predictor(tmp_path / "v9.safetensors")
    save_file(state, str(tmp_path / "mixed.safetensors"),                 # per-frame weights under a v2 paper config
              metadata={**old_meta, "version": "2", "config": json.dumps({"width": 32, "depth": 1, "heads": 2,
                                                                           "grid": 2})})
    with pytest.raises(ValueError, match="file version 2.*does not match.*missing"):
        load_predictor(tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError, match="arch"):
        PredictorConfig(arch="mlp").check()
