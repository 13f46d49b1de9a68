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
VAE_PSNR_FLOOR = 19.5      # dB on each of the 2 9-frame clips (measured 21.4 and 21.0; before the decoder fine-tune 21.4, 20.6)


@pytest.fixture(scope="module")
def world():
    return M.load_world_models()


@pytest.fixture(scope="module")
def held_clips():
    return [render_clip(s, frames=FRAMES) for s in HELD]


@pytest.fixture(scope="module")
def fun():
    return M.load_fun_control()


def test_weights_reproduce_the_stored_forward_output(world, fun):
    ref = load_file(str(M.WEIGHTS / "reference.safetensors"))
    out = M.reference_forward(world, fun)
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


def test_mute_text_keeps_the_zero_context_output_and_drops_the_text(world):
    """A warm-started run trains the cross-attention outputs (the bug behind the previous test's failure on the
    first re-fitted DiT); mute_text folds them into a bias: same output for the zeros training context, and
    then the same output for any context."""
    import copy

    from ffprop.nodes.host.diffusers import DiffusersWan
    from ffprop.nodes.world.train import mute_text

    model = copy.deepcopy(world.dit.model)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for block in model.blocks:
            block.attn2.to_out[0].weight.copy_(torch.randn(block.attn2.to_out[0].weight.shape, generator=gen) * 0.05)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen)
    cond = WanCond(torch.zeros(1, 4, 3, 4, 4), torch.randn(1, 16, 3, 4, 4, generator=gen), world.context(1))
    text = WanCond(cond.keep_mask, cond.cond_latent, torch.randn(1, 5, 4096, generator=gen))
    trained = DiffusersWan(model)
    before, before_text = trained.predict(x, 0.5, cond), trained.predict(x, 0.5, text)
    assert (before - before_text).abs().max() > 1e-3        # the perturbed text path does matter
    mute_text(model)
    torch.testing.assert_close(trained.predict(x, 0.5, cond), before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trained.predict(x, 0.5, text), before, atol=1e-5, rtol=1e-4)


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


def test_one_pass_encode_is_diffusers_chunked_encode(world, held_clips):
    """train.vae_encode_whole (one pass over all frames) == diffusers' chunked cached encode
    (`AutoencoderKLWan.encode(...).latent_dist.mean`: frame 0, then 4 frames at a time) == train.vae_encode_mean
    (the same loop, differentiable), values and input gradients, on 9-frame held-out clips (3 latent frames:
    both temporal downsamplers and the chunk-to-chunk cache are used)."""
    from ffprop.nodes.world.train import to_vae_space, vae_encode_mean, vae_encode_whole

    vae = world.vae.vae
    x = to_vae_space(torch.stack(held_clips))[..., :32, :32]
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    whole, loop = vae_encode_whole(vae, xa), vae_encode_mean(vae, xb)
    assert whole.shape == want.shape == (2, 16, 3, 4, 4)
    torch.testing.assert_close(whole, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, loop, atol=1e-4, rtol=1e-4)
    weight = torch.randn(whole.shape, generator=torch.Generator().manual_seed(0))
    (whole * weight).sum().backward()
    (loop * weight).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-3)
    assert xa.grad.abs().mean() > 1e-5


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


@pytest.mark.xfail(strict=True, reason="measured on 32 held-out scenes (train eval --clips 32): i2v 18.65 dB vs "
                   "repeat_first_frame 18.86 dB (warp 0.0193 below repeat's 0.0276; the one-step mean 19.06 wins), "
                   "VAE round trip 26.0 dB: a sample of the I2V DiT (width 256, 3 blocks, 14000 steps) still loses "
                   "on PSNR; on these 2 scenes too")
def test_i2v_beats_repeating_the_first_frame(i2v_rows):
    assert sum(r["i2v"] for r in i2v_rows) > sum(r["repeat"] for r in i2v_rows)
    assert sum(r["i2v_warp"] for r in i2v_rows) < sum(r["repeat_warp"] for r in i2v_rows)


# ---- Fun-Control (48 input channels: x_t, control latent, start-image latent) --------------------------------

def test_fun_control_is_the_48_channel_wan_of_the_manifest(world, fun):
    from diffusers import WanTransformer3DModel

    assert isinstance(fun.model, WanTransformer3DModel) and fun.dims.in_channels == 48
    assert fun.dims.head_dim == 128 and fun.dims.num_layers == world.dit.dims.num_layers
    # trained on the latents of the bundled VAE's encoder: tests/core/test_world_train.py (the VAE's decoder was
    # fine-tuned after the DiTs; its encoder is bit-identical to the file they name)


def test_fun_from_i2v_starts_as_the_i2v_model_without_its_mask(world):
    """At init the control columns are zero and the start-image slot takes the I2V cond latent's weights: the
    output ignores the control and equals the I2V DiT given an all-zero keep-mask and the same latent."""
    from ffprop.nodes.host.diffusers import DiffusersWan
    from ffprop.nodes.world.train import fun_from_i2v

    init = DiffusersWan(fun_from_i2v(world.dit.model))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen)
    image = torch.randn(1, 16, 3, 4, 4, generator=gen)
    a = init.predict(x, 0.4, WanCond(None, torch.cat([torch.randn(1, 16, 3, 4, 4, generator=gen), image], 1),
                                      world.context(1)))
    b = init.predict(x, 0.4, WanCond(None, torch.cat([torch.zeros(1, 16, 3, 4, 4), image], 1), world.context(1)))
    ref = world.dit.predict(x, 0.4, WanCond(torch.zeros(1, 4, 3, 4, 4), image, world.context(1)))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-4)


def test_fun_control_follows_its_control_video(world, fun, held_clips):
    """Sampled from a held-out clip's own first frame, the Fun-Control output is closer to the clip when the
    control is that clip's luma than when it is the other held-out clip's."""
    from ffprop.nodes.host.sampling import sample
    from ffprop.nodes.video.frames import latent_shape
    from ffprop.nodes.world.train import control_clips

    def run(clip, control):
        ctl = world.vae.encode(control_clips((control * 255).round().to(torch.uint8)[None])[0])
        start = torch.zeros_like(ctl)
        start[:, :, :1] = world.vae.encode(clip[:1])
        noise = torch.randn(latent_shape(FRAMES, 64, 64), generator=torch.Generator().manual_seed(0))
        out = sample(fun, WanCond(None, torch.cat([ctl, start], 1), world.context(1)), noise, 10, 3.0)
        return weighted_psnr(world.vae.decode(out)[1:], clip[1:])

    a, b = held_clips
    gains = (run(a, a) - run(a, b), run(b, b) - run(b, a))   # measured +1.1 and +0.8 dB
    assert min(gains) > 0 and sum(gains) > 0.5, gains


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


def test_a_wider_zero_padded_vae_computes_the_same_function(world):
    """pad_vae_width (how the world VAE reaches ComfyUI 0.3.64, which hard-codes width 96): here 12 -> 24, the
    same code path; encode and decode agree with the original."""
    from diffusers import AutoencoderKLWan

    vae = world.vae.vae
    wide = AutoencoderKLWan.from_config({**vae.config, "base_dim": 2 * vae.config.base_dim})
    wide.load_state_dict(convert.pad_vae_width(vae.state_dict(), dict(vae.config), 2 * vae.config.base_dim))
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z, zw = vae.encode(x).latent_dist.mode(), wide.encode(x).latent_dist.mode()
        torch.testing.assert_close(zw, z, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(wide.decode(z).sample, vae.decode(z).sample, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of the VAE's base width 12"):
        convert.pad_vae_width(vae.state_dict(), dict(vae.config), 30)


def test_folded_latent_format_gives_comfyui_the_world_latent(world):
    """After fold_latent_format, normalising with the real Wan 2.1 statistics (ComfyUI's process_in) yields the
    world VAE's own normalised latent, and decoding the folded latent gives the same frames."""
    from diffusers import AutoencoderKLWan

    vae = world.vae.vae
    sd = vae.state_dict()
    names = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
    quant = {f"{c}.{p}": sd[f"{d}.{p}"] for c, d in names.items() for p in ("weight", "bias")}
    folded = convert.fold_latent_format(quant, dict(vae.config))
    other = AutoencoderKLWan.from_config(vae.config)
    other.load_state_dict({**sd, **{f"{d}.{p}": folded[f"{c}.{p}"] for c, d in names.items() for p in ("weight", "bias")}})
    wan_mean, wan_std = (t.float().view(1, -1, 1, 1, 1) for t in convert.wan21_latent_stats())
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        z, zc = vae.encode(x).latent_dist.mode(), other.encode(x).latent_dist.mode()
        torch.testing.assert_close((zc - wan_mean) / wan_std, (z - mean) / std, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(other.decode(zc).sample, vae.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(zc, z, atol=1e-2)        # the fold did change the raw latent


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
    assert main(["fun", "--init", str(out), "--steps", "60", "--clips", "4", "--batch", "8", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("vae", "dit_i2v", "dit_fun_control"):
        entry = manifest["models"][name]
        assert entry["loss_last10"] < 0.7 * entry["loss_first"], (name, entry["loss_first"], entry["loss_last10"])
    M.load_world_models(folder=out)            # the run's own manifest verifies its files
