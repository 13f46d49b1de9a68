"""VAE training paths of nodes/world/train.py: the one-pass decode is diffusers' decode (minus the clamp), and
decoder-only fine-tuning never touches what fixes the latents (encoder, quant_conv, latents_mean/std)."""

from __future__ import annotations

import copy

import pytest
import torch
from ffprop.nodes.world import model as M
from ffprop.nodes.world import train as T
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_clip


@pytest.fixture(scope="module")
def vae():
    return M.load_vae_file()


@pytest.fixture(scope="module")
def clips():
    """uint8 [2, 9, 32, 32, 3] held-out clips (9 frames: 3 latent frames, so the chunk-to-chunk cache is used)."""
    return torch.stack([(render_clip(s, size=(32, 32), frames=9) * 255).round().to(torch.uint8)
                        for s in HELDOUT_SEEDS[:2]])


def test_one_pass_decode_is_diffusers_decode_without_the_clamp(vae, clips):
    """vae_decode_whole == diffusers' frame-by-frame cached decode (`AutoencoderKLWan.decode`, which clamps) and
    == vae_decode_raw (the same loop, unclamped), values and gradients, to 1e-5."""
    with torch.no_grad():
        z = T.vae_encode_mean(vae, T.to_vae_space(clips))
        want = vae.decode(z).sample
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    whole, loop = T.vae_decode_whole(vae, za), T.vae_decode_raw(vae, zb)
    assert whole.shape == want.shape == (2, 3, 9, 32, 32)
    torch.testing.assert_close(whole.clamp(-1, 1), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, loop, atol=1e-5, rtol=0)
    weight = torch.randn(whole.shape, generator=torch.Generator().manual_seed(0))
    (whole * weight).sum().backward()
    (loop * weight).sum().backward()
    torch.testing.assert_close(za.grad, zb.grad, atol=1e-4, rtol=1e-4)
    assert za.grad.abs().mean() > 1e-4


def test_the_training_decode_is_unclamped_so_saturated_pixels_keep_their_gradient(vae, clips):
    """A latent scaled up drives pixels past +-1: diffusers' decode clamps them (zero gradient there), the
    training decode keeps their values and gradient."""
    with torch.no_grad():
        z = T.vae_encode_mean(vae, T.to_vae_space(clips[:1])) * 3
    z.requires_grad_()
    out = T.vae_decode_whole(vae, z)
    over = out.detach().abs() > 1
    assert over.any()
    grad = torch.autograd.grad(out[over].sum(), z)[0]
    assert grad.abs().sum() > 0
    with torch.no_grad():
        assert vae.decode(z).sample.abs().max() <= 1


def test_decoder_only_training_keeps_the_encoder_side_bit_identical(vae, clips):
    """Two steps of train_decoder: the decoder changes, every encoder/quant_conv tensor and the config's latent
    statistics stay bit-identical (encoder_digest equal), and the loss is the whole-clip MSE."""
    model = copy.deepcopy(vae)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latents = T.raw_latents(model, clips)
    stats = (list(model.config.latents_mean), list(model.config.latents_std))
    seen = []
    _, losses = T.train_decoder(model, latents, clips, steps=2, seed=0, batch=2, lr=1e-3, l1=1.0,
                                log=lambda s: None, checkpoint=lambda m, step: seen.append(step), every=1)
    after = model.state_dict()
    for key in before:
        if key.startswith(T.ENCODER_SIDE):
            assert torch.equal(after[key], before[key]), key
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert T.encoder_digest(after) == T.encoder_digest(before) != T.encoder_digest(
        {**before, "quant_conv.bias": before["quant_conv.bias"] + 1e-6})
    assert (list(model.config.latents_mean), list(model.config.latents_std)) == stats
    assert seen == [1, 2] and len(losses) == 2 and all(0 < loss < 1 for loss in losses)
    assert all(p.requires_grad for p in model.parameters())      # handed back trainable as it came


def test_the_bundled_vae_keeps_the_encoder_the_dits_were_trained_on():
    """The DiTs' manifests name the VAE file whose latents they learned; the bundled VAE is that file or a
    decoder-only fine-tune of it: some record in its init_from chain has that sha256 and the same encoder
    digest as the bundled file."""
    from safetensors.torch import load_file

    manifest = M.read_manifest()
    entry = manifest["models"]["vae"]
    digest = T.encoder_digest(load_file(str(M.WEIGHTS / entry["file"])))
    chain, record = [], entry
    while record is not None:
        chain.append(record)
        record = record.get("init_from")
    for name in ("dit_i2v", "dit_fun_control"):
        trained_on = manifest["models"][name]["vae_sha256"]
        same = [r for r in chain if r["sha256"] == trained_on]
        assert same, f"{name} was trained on VAE {trained_on[:12]}, which is not in the bundled VAE's chain"
        assert same[0] is entry or same[0].get("encoder_sha256") == digest, name


def test_dit_config_keeps_comfyui_heads_of_128_and_refuses_other_widths():
    """ComfyUI reads a Wan 2.1 DiT's heads as width // 128: a wider world DiT adds heads of 128, never changes the
    head size; a width ComfyUI cannot rebuild is refused with the number."""
    wide = T.dit_config(256, 3, 768)
    assert (wide["num_attention_heads"], wide["attention_head_dim"]) == (2, 128)
    assert (wide["num_layers"], wide["ffn_dim"]) == (3, 768)
    assert T.dit_config() == T.DIT_CONFIG
    with pytest.raises(ValueError, match="192 is not a multiple of 128"):
        T.dit_config(192)


class _Recorder(torch.nn.Module):
    """Stands in for the DiT inside dit_loss: records (hidden_states, timestep), predicts zero velocity."""

    config = type("Config", (), {"text_dim": 8})()

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
        self.seen = (hidden_states, timestep)
        return (torch.zeros_like(hidden_states[:, :2]),)


def test_dit_loss_t_shift_maps_the_training_noise_levels_like_the_sampler():
    """t_shift=1 is the plain logit-normal t; t_shift=s maps the same draws through s t / (1 + (s - 1) t) (the
    sampler's schedule), so every t rises, x_t is built at the shifted t, and the loss is its flow target."""
    x0, cond = torch.randn(64, 2, 1, 2, 2), torch.zeros(64, 1, 1, 2, 2)
    model = _Recorder()
    loss1 = T.dit_loss(model, x0, cond, torch.Generator().manual_seed(5))
    t1 = model.seen[1] / 1000
    torch.testing.assert_close(t1, torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(5))))
    loss3 = T.dit_loss(model, x0, cond, torch.Generator().manual_seed(5), t_shift=3.0)
    x_t, t3 = model.seen[0][:, :2], model.seen[1] / 1000
    torch.testing.assert_close(t3, 3 * t1 / (1 + 2 * t1))
    assert bool((t3 > t1).all()) and float(t1.median()) < 0.6 < float(t3.median())
    gen = torch.Generator().manual_seed(5)
    torch.randn(64, generator=gen)                                   # the t draw
    noise = torch.randn(x0.shape, generator=gen)
    tt = t3.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * noise)
    torch.testing.assert_close(loss3, torch.nn.functional.mse_loss(torch.zeros_like(x0), noise - x0))
    assert torch.isfinite(loss1)


def test_grow_dit_inserts_identity_blocks_that_then_train():
    """A 2-block DiT grown to 5 computes the same velocity (the new blocks' output projections are zero), keeps
    its blocks at the spread positions, and the new blocks receive gradient (they are not dead); shrinking is
    refused with the numbers."""
    small = T.seeded_init(lambda: T.new_dit(T.dit_config(128, 2, 256)), 3)
    grown = T.grow_dit(small, 5)
    assert grown.config.num_layers == 5
    torch.testing.assert_close(grown.blocks[2].attn1.to_q.weight, small.blocks[1].attn1.to_q.weight)
    x, t, ctx = torch.randn(2, 36, 2, 4, 4), torch.tensor([200.0, 900.0]), torch.zeros(2, 1, 4096)
    with torch.no_grad():
        want = small(x, t, ctx, return_dict=False)[0]
    got = grown(x, t, ctx, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float(want.abs().mean()) > 0.1
    got.square().mean().backward()
    new_out = grown.blocks[1].ffn.net[2].weight
    assert float(new_out.abs().max()) == 0 and float(new_out.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="cannot grow a DiT of 5 blocks to 3"):
        T.grow_dit(grown, 3)


def test_dit_training_with_the_vae_elsewhere_writes_the_dit_and_says_why_there_is_no_reference(tmp_path, capsys):
    """`dit --vae DIR --out OTHER` (a fine-tune kept apart from the bundle) used to crash after training, in
    write_reference, on OTHER's missing VAE; now the DiT and its manifest entry are written and the output says
    why the reference is not."""
    out = tmp_path / "dit"
    args = ["dit", "--init", str(M.WEIGHTS), "--vae", str(M.WEIGHTS), "--layers", "4", "--steps", "1", "--clips", "2",
            "--batch", "2", "--out", str(out)]
    assert T.main(args) == 0
    manifest = M.read_manifest(out)["models"]
    assert sorted(manifest) == ["dit_i2v"] and manifest["dit_i2v"]["config"]["num_layers"] == 4
    assert (out / "dit_i2v.safetensors").is_file() and not (out / "reference.safetensors").exists()
    assert "reference.safetensors not written" in capsys.readouterr().out
