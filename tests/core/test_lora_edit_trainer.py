"""LoRA-Edit trainer on a tiny diffusers Wan I2V (CPU): loss goes down, base weights bit-identical, zero LoRA is
the identity, save/load reproduces the output, stage 2, checkpointing/block swap/activation offload/windows,
cancel, bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers is installed but WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.common import Cancelled  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.lora_edit import lowvram  # noqa: E402
from ffprop.nodes.lora_edit import trainer as trainer_mod  # noqa: E402
from ffprop.nodes.lora_edit.lora import (  # noqa: E402
    LoRA,
    LoRALayer,
    attach_hooks,
    create_lora,
    load_lora,
    save_lora,
)
from ffprop.nodes.lora_edit.lowvram import BlockRunner, MemorySettings, oom_message, preset  # noqa: E402
from ffprop.nodes.lora_edit.trainer import (  # noqa: E402
    TrainSample,
    TrainSettings,
    build_keyframe_samples,
    build_video_samples,
    flow_loss,
    loss_curve_image,
    parse_indices,
    train_lora_edit,
    window_starts,
)

TEXT_DIM, T, H, W = 32, 9, 32, 32


def tiny_wan(in_channels: int = 36, image: bool = False, layers: int = 2) -> DiffusersWan:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=layers,
        image_dim=1280 if image else None, added_kv_proj_dim=24 if image else None,
    )
    return DiffusersWan(model.eval())


class ToyVAE:
    """Deterministic stand-in for the Wan VAE: frame 0 alone, then groups of 4 frames, 8x8 average pool, a
    fixed 3 -> 16 projection. IMAGE [T, H, W, 3] -> [1, 16, F, H/8, W/8]."""

    def __init__(self):
        self.proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2) * 2 - 1
        groups = [x[:1]] + [x[i:i + 4].mean(0, keepdim=True) for i in range(1, x.shape[0], 4)]
        x = torch.nn.functional.avg_pool2d(torch.cat(groups), 8)        # [F, 3, h, w]
        return torch.einsum("oc,fchw->ofhw", self.proj, x)[None]


def moving_clip(frames: int = T, seed: int = 0) -> torch.Tensor:
    """A textured square moving right over a gradient background."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.linspace(0, 1, W)[None, :, None].expand(H, W, 3).clone() * torch.tensor([0.3, 0.6, 0.9])
    tex = torch.rand(10, 10, 3, generator=g)
    out = []
    for i in range(frames):
        f = bg.clone()
        f[10:20, 2 + i:12 + i] = tex
        out.append(f)
    return torch.stack(out)


def edit_mask(frames: int = T) -> torch.Tensor:
    m = torch.zeros(frames, H, W)
    m[:, 8:24, 0:24] = 1.0
    return m


CTX = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def dit():
    return tiny_wan()


@pytest.fixture(scope="module")
def samples():
    return build_video_samples(moving_clip(), edit_mask(), ToyVAE(), CTX)


def eval_loss(dit, samples, seeds=range(6)) -> float:
    with torch.no_grad():
        return sum(flow_loss(dit, samples[0], torch.Generator().manual_seed(s)).item() for s in seeds) / len(seeds)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


FAST = TrainSettings(steps=30, learning_rate=3e-3, rank=4, seed=1)


def test_training_lowers_loss_changes_output_and_keeps_base_bit_identical(dit, samples):
    before = snapshot(dit.module)
    flags = [p.requires_grad for p in dit.module.parameters()]
    base_loss = eval_loss(dit, samples)
    res = train_lora_edit(dit, samples, FAST)
    assert len(res.losses) == 30 and res.stages == [1] * 30
    assert all(torch.equal(before[k], v) for k, v in dit.module.state_dict().items())   # base untouched
    assert [p.requires_grad for p in dit.module.parameters()] == flags                 # restored
    assert "forward" not in dit.blocks()[0].__dict__                                   # hooks/wrappers removed
    detach = attach_hooks(dit, res.lora)
    try:
        trained_loss = eval_loss(dit, samples)
        x = samples[0].target
        with torch.no_grad():
            with_lora = dit.predict(x, 0.5, samples[0].cond)
    finally:
        detach()
    with torch.no_grad():
        plain = dit.predict(x, 0.5, samples[0].cond)
    assert trained_loss < 0.8 * base_loss, (base_loss, trained_loss)
    assert (with_lora - plain).abs().max() > 1e-3
    # targets: every block linear except the image-only k_img/v_img (none on this model), ComfyUI naming
    assert len(res.lora.paths) == 2 * 10 and "blocks.1.ffn.2" in res.lora.paths and "blocks.0.self_attn.q" in res.lora.paths


def test_zero_lora_is_identity(dit, samples):
    lora = create_lora(dit, rank=4)
    x = samples[0].target
    with torch.no_grad():
        plain = dit.predict(x, 0.7, samples[0].cond)
        detach = attach_hooks(dit, lora)
        try:
            hooked = dit.predict(x, 0.7, samples[0].cond)
        finally:
            detach()
    assert torch.equal(plain, hooked)


def test_save_load_reproduces_output_in_comfy_key_format(dit, samples, tmp_path):
    res = train_lora_edit(dit, samples, TrainSettings(steps=3, learning_rate=1e-2, rank=4))
    path = save_lora(res.lora, tmp_path / "loras" / "edit.safetensors")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    from safetensors.torch import load_file

    keys = load_file(str(path))
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in keys
    assert "diffusion_model.blocks.1.cross_attn.o.lora_down.weight" in keys
    assert "diffusion_model.blocks.0.ffn.0.alpha" in keys and float(keys["diffusion_model.blocks.0.ffn.0.alpha"]) == 4
    loaded = load_lora(path)
    x = samples[0].target
    outs = []
    for lora in (res.lora, loaded):
        detach = attach_hooks(dit, lora)
        try:
            with torch.no_grad():
                outs.append(dit.predict(x, 0.4, samples[0].cond))
        finally:
            detach()
    assert torch.equal(outs[0], outs[1])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_lora(tmp_path / "bad.safetensors")


def masked_keyframe_error(dit, lora, still, region, seeds=range(8)) -> float:
    """Mean squared velocity error of `dit` + `lora` on a stage-2 still, over the latent positions of the edit
    region (region: bool [h, w]) only: how well the model reproduces the edited keyframe where it is masked."""
    detach = attach_hooks(dit, lora)
    try:
        errs = []
        with torch.no_grad():
            for s in seeds:
                g = torch.Generator().manual_seed(s)
                x1 = still.target
                noise = torch.randn(x1.shape, generator=g)
                t = (s + 0.5) / len(seeds)                                 # t spread over (0, 1)
                v = dit.predict((1 - t) * x1 + t * noise, torch.tensor([t]), still.cond)
                errs.append(((v - (noise - x1)) ** 2)[..., region].mean())
    finally:
        detach()
    return float(torch.stack(errs).mean())


def test_stage2_keyframes_as_masked_stills_move_the_model_to_the_keyframe(dit, samples):
    src = moving_clip()
    edited = src[[4, 8]].clone()
    edited[:, 8:24, 0:24] = torch.tensor([1.0, 0.2, 0.2])
    stills = build_keyframe_samples(src, edit_mask(), edited, parse_indices("5, 9", 2, T), ToyVAE(), CTX)
    assert stills[0].target.shape == (1, 16, 1, 4, 4)
    region = stills[0].cond.keep_mask[0, 0, 0] == 0                       # latent positions of the edit region
    assert bool(region[1:3, 0:3].all()) and not bool(region.all())        # edit region masked in the still
    settings = TrainSettings(steps=10, steps_stage2=40, learning_rate=1e-2, rank=4, seed=1)
    both = train_lora_edit(dit, samples, settings, stage2=stills)
    assert both.stages == [1] * 10 + [2] * 40
    same_steps = train_lora_edit(dit, samples, dataclasses.replace(settings, steps=50))   # stage 1 only, 50 steps
    for still in stills:
        with_stage2 = masked_keyframe_error(dit, both.lora, still, region)
        stage1_only = masked_keyframe_error(dit, same_steps.lora, still, region)
        untrained = masked_keyframe_error(dit, create_lora(dit, rank=4), still, region)
        # stage 2 teaches the keyframe's edited appearance where the still hides it; stage 1 never sees it
        # (measured: 2.52 with stage 2 vs 3.26 stage 1 only and 3.12 untrained)
        assert with_stage2 < 0.9 * min(stage1_only, untrained), (with_stage2, stage1_only, untrained)
    with pytest.raises(ValueError, match="outside the clip"):
        parse_indices("5, 10", 2, T)
    with pytest.raises(ValueError, match="one 1-based"):
        parse_indices("5", 2, T)


def test_checkpointing_and_block_swap_match_plain_training(dit, samples):
    cfg = TrainSettings(steps=4, learning_rate=1e-3, rank=4, seed=3)
    plain = train_lora_edit(dit, samples, cfg, memory=MemorySettings(gradient_checkpointing=False))
    ckpt = train_lora_edit(dit, samples, cfg, memory=MemorySettings(gradient_checkpointing=True))
    swap = train_lora_edit(dit, samples, cfg, memory=MemorySettings(gradient_checkpointing=True, swap_fraction=1.0))
    assert plain.losses == pytest.approx(ckpt.losses, rel=1e-5, abs=1e-7)
    assert plain.losses == pytest.approx(swap.losses, rel=1e-5, abs=1e-7)
    for (_, a), (_, b) in zip(plain.lora.items(), swap.lora.items()):
        torch.testing.assert_close(a.up, b.up, rtol=1e-4, atol=1e-6)


def test_split_blocks_match_plain_training_and_chunk_the_ffn(dit, samples):
    """Sub-block checkpointing (attention / cross-attention / FFN in token chunks, nested in the block checkpoint),
    alone and with block swap + activation offload: the same losses and LoRA as plain training."""
    made = []
    real = lowvram.BlockRunner

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        made[-1].ffn_chunk_tokens = 5          # the tiny clip has 12 tokens: 3 chunks per FFN call
        return made[-1]

    cfg = TrainSettings(steps=4, learning_rate=1e-3, rank=4, seed=3)
    plain = train_lora_edit(dit, samples, cfg, memory=MemorySettings(gradient_checkpointing=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "BlockRunner", spy)
        split = train_lora_edit(dit, samples, cfg, memory=MemorySettings(True, split_blocks=True))
        every = train_lora_edit(dit, samples, cfg, memory=MemorySettings(True, 1.0, offload_activations=True,
                                                                         split_blocks=True))
    assert plain.losses == pytest.approx(split.losses, rel=1e-5, abs=1e-7)
    assert plain.losses == pytest.approx(every.losses, rel=1e-5, abs=1e-7)
    for (_, a), (_, b), (_, c) in zip(plain.lora.items(), split.lora.items(), every.lora.items()):
        torch.testing.assert_close(a.up, b.up, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.down, c.down, rtol=1e-4, atol=1e-6)
    # per block and pass (forward, recompute): attn1 + attn2 + 3 FFN chunks = 5 checkpoints; 2 blocks x 4 steps
    assert [m.sub_runs for m in made] == [2 * 5 * 2 * 4] * 2
    for b in dit.blocks():
        assert all("forward" not in m.__dict__ for m in (b, b.attn1, b.attn2, b.ffn))
    with pytest.raises(ValueError, match="split_blocks needs gradient checkpointing"):
        BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=False, split_blocks=True)


def _bf16(dit, samples):
    model = DiffusersWan(copy.deepcopy(dit.module).to(torch.bfloat16))

    def cast(x):
        return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return model, [TrainSample(cast(x.target), dataclasses.replace(x.cond, **{k: cast(v) for k, v in
                                                                             vars(x.cond).items()}), x.kind)
                   for x in samples]


def one_step_grads(model, sample, **runner_settings):
    """LoRA gradients [(down.grad, up.grad) per layer] of one flow-matching backward with a BlockRunner built with
    runner_settings (same LoRA init, same noise every call), and the runner (for its counters)."""
    lora = create_lora(model, rank=4, seed=2)
    with torch.no_grad():
        for _, layer in lora.items():
            layer.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
    lora.requires_grad_(True)
    detach = attach_hooks(model, lora)
    runner = BlockRunner(model.blocks(), torch.device("cpu"), **runner_settings)
    try:
        with runner:
            flow_loss(model, sample, torch.Generator().manual_seed(4)).backward()
    finally:
        detach()
    return [(layer.down.grad.clone(), layer.up.grad.clone()) for _, layer in lora.items()], runner


def test_split_blocks_bf16_grads_match_and_norm_inputs_are_saved_compact(dit, samples):
    """bf16 model: diffusers feeds its norms x.float(); split_blocks saves those as bf16 (exact) and re-runs the
    norm in backward. The LoRA gradients of one step match those without checkpointing."""
    model, s16 = _bf16(dit, samples)
    plain, _ = one_step_grads(model, s16[0], checkpointing=False)
    split, runner = one_step_grads(model, s16[0], checkpointing=True, split_blocks=True)
    # forward: block 0's norm2/norm3 (its input needs no grad: no LoRA before it) + block 1's 3;
    assert runner.compact_saves >= 5   # the recomputes add more (checkpoint stops early when it has all)
    for (d0, u0), (d1, u1) in zip(plain, split):
        assert float(u0.abs().max()) > 0
        torch.testing.assert_close(d0, d1, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(u0, u1, rtol=1e-5, atol=1e-7)


def test_lora_delta_in_bf16_is_close_to_fp32_compute(dit, samples):
    """bf16 activations: the LoRA delta runs in bf16 (fp32 master weights cast inside the op, fp32 grads) instead
    of on an fp32 copy of its input. Measured on this model, 20 steps at lr 3e-3: max rel loss difference to the
    fp32 LoRA compute 3.4e-4 (mean 1e-4), smaller than the bf16 model's own gap to the fp32 model (7.7e-4)."""
    bf16, s16 = _bf16(dit, samples)
    cfg = TrainSettings(steps=20, learning_rate=3e-3, rank=4, seed=1)
    losses = {}
    for upcast in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LoRALayer, "upcast", upcast)
            run = train_lora_edit(bf16, s16, cfg, memory=MemorySettings(False))
        losses[upcast] = run.losses
        assert all(p.dtype == torch.float32 for p in run.lora.parameters())
    assert losses[False] != losses[True]       # the bf16 path did run
    assert losses[False] == pytest.approx(losses[True], rel=2e-3)
    # fp32 activations: the delta is the fp32 computation either way
    layer = create_lora(dit, rank=4, seed=2).layers[0]
    with torch.no_grad():
        layer.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        x = torch.randn(3, layer.down.shape[1])
        want = (x @ layer.down.T @ layer.up.T) * layer.scale
        torch.testing.assert_close(layer.delta(x), want)
        x16 = x.to(torch.bfloat16)
        assert layer.delta(x16).dtype == torch.bfloat16
        torch.testing.assert_close(layer.delta(x16).float(), want, rtol=3e-2, atol=3e-2)


def test_activation_offload_matches_plain_training_and_runs_its_hooks(dit, samples, monkeypatch):
    made = []
    real = lowvram.ActivationOffload

    def spy(device):
        made.append(real(device))
        return made[-1]

    monkeypatch.setattr(lowvram, "ActivationOffload", spy)
    cfg = TrainSettings(steps=4, learning_rate=1e-3, rank=4, seed=5)
    plain = train_lora_edit(dit, samples, cfg, memory=MemorySettings(gradient_checkpointing=False))
    assert not made
    off = train_lora_edit(dit, samples, cfg, memory=MemorySettings(True, offload_activations=True))
    both = train_lora_edit(dit, samples, cfg, memory=MemorySettings(True, 1.0, offload_activations=True))
    assert plain.losses == pytest.approx(off.losses, rel=1e-5, abs=1e-7)
    assert plain.losses == pytest.approx(both.losses, rel=1e-5, abs=1e-7)
    for (_, a), (_, b), (_, c) in zip(plain.lora.items(), off.lora.items(), both.lora.items()):
        torch.testing.assert_close(a.up, b.up, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.down, c.down, rtol=1e-4, atol=1e-6)
    # 2 blocks x 4 steps: every block input went through pack and came back through unpack for its recompute
    assert len(made) == 2 and all(m.packed == 8 and m.unpacked == 8 for m in made)
    x = samples[0].target
    assert made[0].peak_host_bytes == 2 * x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2) * 24 * 4  # 2 x [1, S, 24]
    assert all("forward" not in b.__dict__ for b in dit.blocks())


def test_activation_offload_grads_match_one_step(dit, samples):
    """The LoRA gradients themselves (not only the losses after AdamW) match with the hooks on."""
    plain, _ = one_step_grads(dit, samples[0], checkpointing=False)
    offloaded, runner = one_step_grads(dit, samples[0], checkpointing=True, offload_activations=True)
    assert runner.acts.packed == runner.acts.unpacked == 2
    for (d0, u0), (d1, u1) in zip(plain, offloaded):
        assert float(d0.abs().max()) > 0
        torch.testing.assert_close(d0, d1, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(u0, u1, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=False, offload_activations=True)


def test_activation_offload_releases_the_device_copy():
    """Once packed, the block input must not be kept alive by the hooks (autograd holds the pack hook as long as
    the graph): with a copying pack (what CUDA does), the original is freed after the forward."""
    import gc
    import weakref

    import torch.utils.checkpoint

    class Copying(lowvram.ActivationOffload):
        def _pack(self, block, t):
            return lowvram._Saved(block, t.detach().clone(), t.device)

    off = Copying(torch.device("cpu"))
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2
    ref = weakref.ref(h)
    with off.hooks(1, h):
        y = torch.utils.checkpoint.checkpoint(lambda a: torch.tanh(lin(a)), h, use_reentrant=False)
    del h
    gc.collect()
    assert ref() is None and off.packed == 1          # nothing holds the original any more
    y.sum().backward()
    assert off.unpacked == 1 and x.grad is not None
    expect = torch.autograd.grad(torch.tanh(lin(x * 2)).sum(), x)[0]
    torch.testing.assert_close(x.grad, expect)


def test_cancel_with_activation_offload(dit, samples):
    before = snapshot(dit.module)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 4   # block 1 of step 2: block 0's input is already offloaded

    with pytest.raises(Cancelled):
        train_lora_edit(dit, samples, TrainSettings(steps=50, rank=4), memory=preset("8GB", compute_dtype="auto"),
                        should_stop=should_stop)
    assert calls["n"] == 5
    assert all(torch.equal(before[k], v) for k, v in dit.module.state_dict().items())
    assert all("forward" not in b.__dict__ for b in dit.blocks())


def test_block_runner_prefetch_keeps_at_most_two_blocks_resident():
    dit = tiny_wan(layers=4)
    x = torch.randn(1, 16, 3, 4, 4, requires_grad=False)
    samples = build_video_samples(moving_clip(), edit_mask(), ToyVAE(), CTX)
    lora = create_lora(dit, rank=2)
    detach = attach_hooks(dit, lora)
    runner = BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=True, blocks_to_swap=4)
    try:
        with runner:
            loss = flow_loss(dit, samples[0], torch.Generator().manual_seed(0))
            loss.backward()
            # 4 forward loads (+1 prefetch of the next is the same load) and 4 re-loads in backward at most
            assert 4 <= runner.loads <= 8 and runner.max_resident <= 2
    finally:
        detach()
    assert x.grad is None and all(layer.down.grad is not None for _, layer in lora.items())
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=False, blocks_to_swap=2)


def test_windows_keep_each_windows_first_frame_and_full_window_equals_plain(dit):
    src, mask = moving_clip(17), edit_mask(17)
    assert window_starts(17, 9, 4) == [0, 4, 8] and window_starts(17, 0, 4) == [0] and window_starts(19, 9, 8) == [0, 8, 10]
    wins = build_video_samples(src, mask, ToyVAE(), CTX, window_frames=9, window_stride=4)
    assert len(wins) == 3 and wins[1].target.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(wins[1].target, ToyVAE()(src[4:13]))              # window 2 = frames 5..13
    assert float(wins[1].cond.keep_mask[0, :, 0].min()) == 1.0                     # its first frame is kept
    full = build_video_samples(src, mask, ToyVAE(), CTX)
    same = build_video_samples(src, mask, ToyVAE(), CTX, window_frames=17)
    cfg = TrainSettings(steps=3, learning_rate=1e-3, rank=4)
    assert train_lora_edit(dit, full, cfg).losses == train_lora_edit(dit, same, cfg).losses
    res = train_lora_edit(dit, wins, TrainSettings(steps=30, learning_rate=3e-3, rank=4, seed=1))
    assert sum(res.losses[-10:]) < sum(res.losses[:10])


def test_cancel_stops_cleanly_within_a_step(dit, samples):
    before = snapshot(dit.module)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3   # two blocks per forward: cancels inside the second step's forward

    with pytest.raises(Cancelled):
        train_lora_edit(dit, samples, TrainSettings(steps=50, rank=4), memory=MemorySettings(True, 1.0),
                        should_stop=should_stop)
    assert calls["n"] == 4
    assert all(torch.equal(before[k], v) for k, v in dit.module.state_dict().items())
    assert all("forward" not in b.__dict__ for b in dit.blocks())
    x = samples[0].target
    with torch.no_grad():   # no hook left behind: output equals a fresh forward of the same weights
        a = dit.predict(x, 0.3, samples[0].cond)
        b = dit.predict(x, 0.3, samples[0].cond)
    assert torch.equal(a, b) and all(len(m._forward_hooks) == 0 for m in dit.module.modules())


def test_clip_image_model_trains(samples):
    dit = tiny_wan(image=True)
    clip = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(4))
    s = build_video_samples(moving_clip(), edit_mask(), ToyVAE(), CTX, clip_tokens=clip)
    res = train_lora_edit(dit, s, TrainSettings(steps=2, rank=4))
    assert not any("k_img" in p or "v_img" in p for p in res.lora.paths) and len(res.losses) == 2


def test_bad_input(dit, samples):
    with pytest.raises(ValueError, match="text-to-video"):
        train_lora_edit(tiny_wan(in_channels=16), samples, FAST)
    with pytest.raises(ValueError, match="4k\\+1"):
        build_video_samples(moving_clip(8), None, ToyVAE(), CTX)
    with pytest.raises(ValueError, match="unconnected"):
        build_video_samples(moving_clip(), torch.zeros(T, H, W), ToyVAE(), CTX)
    with pytest.raises(ValueError, match="frames but the video has"):
        build_video_samples(moving_clip(), edit_mask(5), ToyVAE(), CTX)
    with pytest.raises(ValueError, match="needs a diffusers WanTransformer3DModel"):
        DiffusersWan(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lora_down"):
        LoRA.from_comfy_state_dict({"x": torch.zeros(1)})


def test_presets_oom_message_and_loss_image():
    # fake-tensor estimate (bench --estimate): 24GB trains the whole clip; 16GB/12GB too with split_blocks; 8GB
    # would need 8.2 GB on the full clip (too thin) and keeps 9-frame windows; every checkpointing preset offloads
    eight = preset("8GB")
    assert eight.window_frames == 9 and eight.blocks_to_swap(40) == 38 and eight.offload_activations
    assert preset("24GB").window_frames == 0 and preset("24GB").blocks_to_swap(40) == 32
    assert all(preset(n).offload_activations and preset(n).gradient_checkpointing for n in ("24GB", "16GB", "12GB"))
    assert [(preset(n).window_frames, preset(n).split_blocks) for n in ("16GB", "12GB")] == [(0, True), (0, True)]
    assert not preset("24GB").split_blocks and eight.split_blocks
    assert not preset("unlimited").gradient_checkpointing and not preset("unlimited").offload_activations
    msg = oom_message(preset("24GB"), 49, 480, 832)
    assert "16GB" in msg and "49 frames at 832x480" in msg and "activation offload on" in msg
    assert "'8GB'" in oom_message(preset("12GB"), 49, 480, 832)
    assert "window_frames 9" in oom_message(MemorySettings(True, 1.0, offload_activations=True), 49, 480, 832)
    assert "fewer frames" in oom_message(eight, 49, 480, 832)
    img = loss_curve_image([1.0, 0.8, 0.9, 0.5], [1, 1, 2, 2])
    assert img.shape == (1, 256, 512, 3) and 0 <= float(img.min()) < float(img.max()) <= 1
