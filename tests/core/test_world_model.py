"""The bundled small Wan world models (nodes/world/weights): load, reproduce, measured quality, bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from ffprop.nodes.evaluate.bench import true_motion, warp_error, weighted_psnr
from ffprop.nodes.host.protocol import WanCond
from ffprop.nodes.world import convert
from ffprop.nodes.world import model as M
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_clip
from safetensors.torch import load_file

HELD = (HELDOUT_SEEDS[0], HELDOUT_SEEDS[1])
FRAMES = 9                 # 9-frame clips (3 latent frames: the chunk-to-chunk cache is used) keep this file fast
VAE_PSNR_FLOOR = 16.0      # dB on each of the 2 clips (measured 18.2 and 17.1; mean of 4 held-out clips 18.0)


@pytest.fixture(scope="module")
def world():
    return M.load_world_models()


@pytest.fixture(scope="module")
def held_clips():
    return [render_clip(s, frames=FRAMES) for s in HELD]


def test_weights_reproduce_the_stored_forward_output(world):
    ref = load_file(str(M.WEIGHTS / "reference.safetensors"))
    out = M.reference_forward(world)
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=2e-4, rtol=1e-3, msg=key)
    assert float(ref["dit_velocity"].abs().mean()) > 0.05      # a real output, not an all-zero tensor


def test_models_are_the_documented_wan_classes(world):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    assert isinstance(world.vae.vae, AutoencoderKLWan) and isinstance(world.dit.model, WanTransformer3DModel)
    assert world.dit.dims.in_channels == 36 and world.dit.dims.clip_dim is None
    cfg = world.manifest["models"]["dit_i2v"]["config"]
    assert cfg["num_layers"] == len(world.dit.blocks())
    # ComfyUI derives num_heads = dim // 128 and builds the Wan 2.1 VAE with num_res_blocks 2
    assert world.dit.dims.head_dim == 128 and world.vae.vae.config.num_res_blocks == 2


def test_the_dit_ignores_its_text_context(world):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 5, 8, 8, generator=gen)
    keep = torch.zeros(1, 4, 5, 8, 8)
    cond = torch.randn(1, 16, 5, 8, 8, generator=gen)
    a = world.dit.predict(x, 0.5, WanCond(keep, cond, world.context(1)))
    b = world.dit.predict(x, 0.5, WanCond(keep, cond, torch.randn(1, 7, 4096, generator=gen)))
    torch.testing.assert_close(a, b)


def test_vae_round_trip_on_held_out_scenes(world, held_clips):
    for seed, clip in zip(HELD, held_clips):
        rec = world.vae.decode(world.vae.encode(clip))
        assert rec.shape == clip.shape
        assert weighted_psnr(rec, clip) > VAE_PSNR_FLOOR, seed


def _i2v_scores(world, held_clips):
    rows = []
    for seed, clip in zip(HELD, held_clips):
        out = M.generate_i2v(world, clip[0], frames=FRAMES, steps=10, seed=seed)
        rep = clip[:1].expand_as(clip)
        motion = true_motion(clip)
        rows.append({"out": out, "i2v": weighted_psnr(out[1:], clip[1:]), "repeat": weighted_psnr(rep[1:], clip[1:]),
                     "i2v_warp": warp_error(out, motion), "repeat_warp": warp_error(rep, motion)})
    return rows


@pytest.fixture(scope="module")
def i2v_rows(world, held_clips):
    return _i2v_scores(world, held_clips)


def test_i2v_follows_its_own_first_frame(i2v_rows, held_clips):
    """The conditioning carries the scene: each I2V clip is closer to its own clip than to the other scene."""
    (a, b), (ca, cb) = i2v_rows, held_clips
    assert weighted_psnr(a["out"][1:], ca[1:]) > weighted_psnr(a["out"][1:], cb[1:]) + 1
    assert weighted_psnr(b["out"][1:], cb[1:]) > weighted_psnr(b["out"][1:], ca[1:]) + 1


@pytest.mark.xfail(strict=True, reason="measured on 8 held-out scenes: i2v 17.5 dB vs repeat_first_frame 20.5 dB, "
                   "warp 0.024 vs 0.017; the VAE's 18.4 dB round trip caps the I2V output (see the report)")
def test_i2v_beats_repeating_the_first_frame(i2v_rows):
    assert sum(r["i2v"] for r in i2v_rows) > sum(r["repeat"] for r in i2v_rows)
    assert sum(r["i2v_warp"] for r in i2v_rows) < sum(r["repeat_warp"] for r in i2v_rows)


def test_comfy_layout_names():
    vae = convert.vae_key
    assert vae("decoder.norm_out.gamma", 2) == "decoder.head.0.gamma"          # ComfyUI 0.28 reads the width here
    assert vae("decoder.up_blocks.1.upsamplers.0.resample.1.weight", 2) == "decoder.upsamples.7.resample.1.weight"
    assert vae("decoder.up_blocks.2.resnets.0.conv1.weight", 2) == "decoder.upsamples.8.residual.2.weight"
    assert vae("encoder.mid_block.attentions.0.proj.bias", 2) == "encoder.middle.1.proj.bias"
    assert vae("post_quant_conv.bias", 2) == "conv2.bias"
    assert convert.dit_key("scale_shift_table") == "head.modulation"
    assert convert.dit_key("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert convert.dit_key("blocks.0.attn2.to_out.0.weight") == "blocks.0.cross_attn.o.weight"
    with pytest.raises(ValueError, match="unexpected AutoencoderKLWan key"):
        vae("encoder.bogus.weight", 2)


def test_converted_keys_are_one_to_one(world):
    vae_sd = world.vae.vae.state_dict()
    assert len(convert.vae_to_comfy(vae_sd, 2)) == len(vae_sd)
    dit_sd = world.dit.model.state_dict()
    assert len(convert.dit_to_comfy(dit_sd)) == len(dit_sd)


# ---- bad files: a clear error naming the file and the fix -------------------------------------------------

@pytest.fixture
def copy(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(M.WEIGHTS, folder)
    return folder


def test_missing_file_names_it_and_the_fix(copy):
    (copy / "dit_i2v.safetensors").unlink()
    with pytest.raises(RuntimeError, match=r"missing: .*dit_i2v\.safetensors.*git checkout"):
        M.load_world_models(folder=copy)


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match=r"manifest not found: .*manifest\.json"):
        M.load_world_models(folder=copy)


def test_corrupt_file_is_caught_by_its_sha256(copy):
    path = copy / "vae.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"vae\.safetensors is corrupt.*sha256.*retrain"):
        M.load_world_models(folder=copy)


def test_config_that_does_not_match_the_weights(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["models"]["dit_i2v"]["config"]["ffn_dim"] = 256
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json \('dit_i2v'\) does not match the weights in .*dit_i2v"):
        M.load_world_models(folder=copy)


@pytest.mark.slow
def test_retraining_a_short_run_lowers_the_losses(tmp_path):
    from ffprop.nodes.world.train import main

    out = tmp_path / "w"
    assert main(["vae", "--steps", "60", "--clips", "4", "--batch", "2", "--out", str(out)]) == 0
    assert main(["dit", "--steps", "60", "--clips", "4", "--batch", "8", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("vae", "dit_i2v"):
        entry = manifest["models"][name]
        assert entry["loss_last10"] < 0.7 * entry["loss_first"], (name, entry["loss_first"], entry["loss_last10"])
    M.load_world_models(folder=out)            # the run's own manifest verifies its files
