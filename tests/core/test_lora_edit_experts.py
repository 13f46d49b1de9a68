"""Wan 2.2 two-expert LoRA-Edit, torch-only (tiny diffusers Wan I2V DiTs on CPU): the boundary rules, expert
detection and its errors, each expert trains on its own noise range only, the router sends every step to the
expert of its range (a LoRA on one expert leaves the other range bit-identical), and the whole pipeline trains two
LoRAs and samples with the high-noise expert for exactly the steps above the boundary."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.host.sampling import flow_sigmas  # noqa: E402
from ffprop.nodes.lora_edit.experts import (  # noqa: E402
    HIGH,
    LOW,
    TI2V_MESSAGE,
    WAN22_I2V_BOUNDARY,
    ExpertPair,
    boundary_sigma,
    check_boundary,
    expert_from_name,
    resolve_experts,
    shifted_sigma,
    split_step,
    t_range,
)
from ffprop.nodes.lora_edit.lora import attach_hooks, create_lora  # noqa: E402
from ffprop.nodes.lora_edit.lowvram import MemorySettings  # noqa: E402
from ffprop.nodes.lora_edit.pipeline import SampleSettings, lora_edit_video  # noqa: E402
from ffprop.nodes.lora_edit.trainer import TrainSettings, build_video_samples, check_i2v, train_lora_edit  # noqa: E402
from test_lora_edit_trainer import CTX, ToyVAE, edit_mask, moving_clip, tiny_wan  # noqa: E402

HIGH_FILE, LOW_FILE = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors"


def test_boundary_rules_and_the_comfyui_template_split():
    assert check_boundary(0.9) == 0.9 and WAN22_I2V_BOUNDARY == 0.9
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            check_boundary(bad)
    with pytest.raises(ValueError, match="unknown boundary unit"):
        check_boundary(0.5, "steps")
    # step fraction -> sigma as ComfyUI's ModelSamplingDiscreteFlow.percent_to_sigma: time_snr_shift(shift, 1 - f)
    assert boundary_sigma(0.5, "step_fraction", shift=8.0) == pytest.approx(8 * 0.5 / (1 + 7 * 0.5))
    assert boundary_sigma(0.9, "sigma", shift=3.0) == 0.9
    assert shifted_sigma(1.0, 5.0) == 1.0 and shifted_sigma(0.0, 5.0) == 0.0
    # ComfyUI's Wan 2.2 I2V template: 20 steps, shift 8, high-noise expert for steps 0-9: sigma 0.9 gives that
    assert split_step(flow_sigmas(20, 8.0), 0.9) == 10
    assert split_step(flow_sigmas(20, 8.0), 0.85) == 12       # 0.8675 >= 0.85 > 0.8421
    assert t_range(HIGH, 0.9) == (0.9, 1.0) and t_range(LOW, 0.9) == (0.0, 0.9)


def test_expert_detection_from_names_and_the_errors():
    assert expert_from_name(HIGH_FILE) == HIGH and expert_from_name(LOW_FILE) == LOW
    assert expert_from_name("wan2.1_i2v_480p_14B.safetensors") is None and expert_from_name(None) is None
    assert resolve_experts("auto", HIGH_FILE, LOW_FILE) == (HIGH, LOW)
    assert resolve_experts("auto", None, None) == (HIGH, LOW)            # 0.3.64 records no file names
    assert resolve_experts("model=low_noise", None, None) == (LOW, HIGH)
    assert resolve_experts("model=low_noise", LOW_FILE, HIGH_FILE) == (LOW, HIGH)
    with pytest.raises(ValueError, match="both models are high-noise experts"):
        resolve_experts("auto", HIGH_FILE, "my_high_noise_copy.safetensors")
    with pytest.raises(ValueError, match="both models are low-noise experts"):
        resolve_experts("model=high_noise", LOW_FILE, LOW_FILE)
    with pytest.raises(ValueError, match="swapped.*Swap the two connections"):
        resolve_experts("auto", LOW_FILE, HIGH_FILE)
    with pytest.raises(ValueError, match="swapped.*'model_2' is the low-noise expert, but its file"):
        resolve_experts("model=high_noise", None, HIGH_FILE)
    with pytest.raises(ValueError, match="unknown expert order"):
        resolve_experts("first", None, None)


def test_mismatched_architectures_and_ti2v_are_refused():
    with pytest.raises(ValueError, match="different architectures.*num_layers 2 vs 3"):
        ExpertPair(tiny_wan(), tiny_wan(layers=3))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ExpertPair(tiny_wan(), tiny_wan(), boundary=1.0)

    class TI2V:
        dims = dataclasses.replace(tiny_wan().dims, in_channels=48, out_channels=48)

    with pytest.raises(ValueError, match="mask-aware recipe needs an I2V model with mask channels"):
        check_i2v(TI2V())
    assert "TI2V-5B" in TI2V_MESSAGE


class Recording:
    """A WanDiT wrapper recording the t of every predict call."""

    def __init__(self, dit):
        self.dit, self.ts = dit, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def predict(self, x_t, t, cond):
        self.ts.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.dit.predict(x_t, t, cond)


def samples():
    return build_video_samples(moving_clip(), edit_mask(), ToyVAE(), CTX)


def test_each_expert_trains_on_its_own_range_and_full_range_is_unchanged():
    data = samples()
    b = 0.9
    for role, ok in ((HIGH, lambda t: t >= b - 1e-6), (LOW, lambda t: t < b)):
        rec = Recording(tiny_wan())
        train_lora_edit(rec, data, TrainSettings(steps=12, rank=2, t_range=t_range(role, b)))
        assert len(rec.ts) == 12 and all(ok(t) for t in rec.ts), (role, rec.ts)
        assert max(rec.ts) - min(rec.ts) > 0.01                       # drawn, not a constant
    # (0, 1) draws exactly the t of the default settings: Wan 2.1 LoRAs are reproduced bit for bit
    a = train_lora_edit(tiny_wan(), data, TrainSettings(steps=3, rank=2)).lora
    c = train_lora_edit(tiny_wan(), data, TrainSettings(steps=3, rank=2, t_range=(0.0, 1.0))).lora
    assert all(torch.equal(x.up, y.up) and torch.equal(x.down, y.down) for (_, x), (_, y) in zip(a.items(), c.items()))
    with pytest.raises(ValueError, match="t_range"):
        TrainSettings(t_range=(0.9, 0.9))


def test_router_sends_each_step_to_its_expert_and_a_lora_changes_only_its_range():
    high, low = tiny_wan(), tiny_wan()
    with torch.no_grad():                                            # a different low-noise expert
        for p in low.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() % 97)))
    pair = ExpertPair(high, low, 0.9)
    data = samples()[0]
    x, cond = torch.randn(data.target.shape, generator=torch.Generator().manual_seed(1)), data.cond
    with torch.no_grad():
        assert torch.equal(pair.predict(x, 0.95, cond), high.predict(x, 0.95, cond))
        assert torch.equal(pair.predict(x, 0.9, cond), high.predict(x, 0.9, cond))      # >= boundary: high
        assert torch.equal(pair.predict(x, 0.3, cond), low.predict(x, 0.3, cond))
        before = {t: pair.predict(x, t, cond) for t in (0.95, 0.5, 0.1)}
        lora = create_lora(high, 2, "all_linears", 0)
        for _, layer in lora.items():
            layer.up.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        detach = attach_hooks(high, lora)                            # a LoRA on the high-noise expert only
        try:
            after = {t: pair.predict(x, t, cond) for t in (0.95, 0.5, 0.1)}
        finally:
            detach()
    assert not torch.equal(after[0.95], before[0.95])
    assert torch.equal(after[0.5], before[0.5]) and torch.equal(after[0.1], before[0.1])   # low range untouched
    with pytest.raises(ValueError, match="mixes timesteps"):
        pair.predict(x.expand(2, *x.shape[1:]), torch.tensor([0.95, 0.2]),
                     WanCond(cond.keep_mask, cond.cond_latent, cond.context))


def test_pipeline_trains_two_loras_and_samples_with_the_split_schedule():
    high, low = Recording(tiny_wan()), Recording(tiny_wan())
    train = TrainSettings(steps=4, steps_stage2=0, rank=2)
    sampling = SampleSettings(steps=6, cfg=1.0, shift=5.0)
    src = moving_clip()
    out = lora_edit_video(high, ToyVAE(), lambda z: torch.rand(9, 32, 32, 3), src, edit_mask(), src[:1], CTX,
                          train=train, memory=MemorySettings(False), sampling=sampling, low_noise_dit=low,
                          boundary=0.9)
    assert out.training_2 is not None and len(out.training.losses) == len(out.training_2.losses) == 4
    high_train, low_train = high.ts[:4], low.ts[:4]
    assert all(t >= 0.9 - 1e-6 for t in high_train) and all(t < 0.9 for t in low_train)
    k = split_step(flow_sigmas(6, 5.0), 0.9)
    assert 0 < k < 6
    assert high.ts[4:] == pytest.approx([float(s) for s in flow_sigmas(6, 5.0)[:k]])
    assert low.ts[4:] == pytest.approx([float(s) for s in flow_sigmas(6, 5.0)[k:-1]])
    assert out.latent.shape == (1, 16, 3, 4, 4) and torch.isfinite(out.latent).all()
    assert not any(torch.equal(a.up, b.up) for (_, a), (_, b) in zip(out.training.lora.items(),
                                                                     out.training_2.lora.items()))


def test_bench_row_builds_a_low_noise_expert_and_runs_the_pair():
    """nodes/lora_edit/bench.py: no row without the world models; on a tiny stand-in world, the low-noise expert is
    a fine-tuned copy (the world DiT stays bit-identical) and the row returns the edited clip."""
    from ffprop.nodes.evaluate.bench import BenchSettings, WanWorld
    from ffprop.nodes.lora_edit.bench import engines
    from ffprop.nodes.world.scenes import render_sample

    settings = BenchSettings(cases=((1_000_000, "recolour"),), size=(32, 32), frames=9, train_steps=1,
                             sample_steps=3, lora_rank=2)
    assert engines(None, settings) == {}
    dit = tiny_wan()
    before = {k: v.clone() for k, v in dit.module.state_dict().items()}

    def decode(z):
        x = torch.sigmoid(z[0, :3]).movedim(0, -1)
        return torch.cat([x[:1], x[1:].repeat_interleave(4, 0)]).repeat_interleave(8, 1).repeat_interleave(8, 2)

    row = engines(WanWorld(dit, ToyVAE(), decode, CTX), settings)["lora_edit_wan22"]
    s = render_sample(1_000_000, "recolour", size=(32, 32), frames=9)
    out = row(s)
    assert out.shape == s.source.shape and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in dit.module.state_dict().items())
