"""Sampling through the BlockRunner (block swap, fp8 base weights upcast per block) and fp8 training, on tiny diffusers
Wan I2V models (CPU).

Exactness, stated: casting fp8 -> bf16 is exact, so an fp8-stored model computes bit for bit what a bf16 model
holding the same (fp8-rounded) values computes; block swap moves weights, never changes them. Every comparison
below is torch.equal, no tolerance."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers is installed but WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.host.diffusers import (  # noqa: E402
    DiffusersWan,
    is_fp8_target,
    load_diffusers_wan,
    mark_fp8_blocks,
    to_fp8,
)
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.host.sampling import sample  # noqa: E402
from ffprop.nodes.lora_edit.lora import attach_hooks  # noqa: E402
from ffprop.nodes.lora_edit.lowvram import MemorySettings, preset  # noqa: E402
from ffprop.nodes.lora_edit.pipeline import SampleSettings, sample_low_vram  # noqa: E402
from ffprop.nodes.lora_edit.trainer import TrainSample, TrainSettings, train_lora_edit  # noqa: E402

TEXT_DIM, LAYERS = 32, 4
F, H, W = 3, 4, 4
FP8 = torch.float8_e4m3fn
DATA_SET = torch._C.TensorBase.__dict__["data"]


def raw_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=LAYERS).eval()


def twins() -> tuple[DiffusersWan, DiffusersWan]:
    """(fp8-stored, bf16 with the very same fp8-rounded block weights); fp32-kept modules in fp32 in both."""
    model = raw_model()
    keep = model._keep_in_fp32_modules
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name for k in keep) else torch.bfloat16)
    fp8 = raw_model()
    fp8.load_state_dict(model.state_dict())
    for (name, p), (_, q) in zip(model.named_parameters(), fp8.named_parameters()):
        q.data = p.data.clone()
        if is_fp8_target(name, p):
            q.data = to_fp8(p.data)
            p.data = q.data.to(torch.bfloat16)
    return DiffusersWan(mark_fp8_blocks(fp8).eval()), DiffusersWan(model.eval())


def inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1
    cond = WanCond(keep.to(dtype), torch.randn(1, 16, F, H, W, generator=g).to(dtype),
                   torch.randn(1, 8, TEXT_DIM, generator=g).to(dtype))
    neg = WanCond(None, None, torch.zeros(1, 8, TEXT_DIM, dtype=dtype))
    noise = torch.randn(1, 16, F, H, W, generator=g).to(dtype)
    target = torch.randn(1, 16, F, H, W, generator=g).to(dtype)
    return cond, neg, noise, target


def snapshot(dit) -> dict:
    return {k: (v.detach().flatten().view(torch.uint8).clone(), v.dtype, v.device)
            for k, v in dit.module.state_dict().items()}


def assert_same(dit, before) -> None:
    now = snapshot(dit)
    assert all(torch.equal(now[k][0], b) and now[k][1:] == tuple(rest) for k, (b, *rest) in before.items())
    assert all("forward" not in m.__dict__ for m in dit.module.modules())


class CountLoads(TorchFunctionMode):
    """Counts `tensor.data = ...` (the runner's swap / upcast / put-back) during sampling."""

    def __init__(self):
        super().__init__()
        self.sets = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is DATA_SET and func.__name__ == "__set__":
            self.sets += 1
        return func(*args, **(kwargs or {}))


SET = SampleSettings(steps=3, cfg=4.0, shift=5.0)


@pytest.fixture(scope="module")
def models():
    return twins()


def test_sampling_with_block_swap_equals_sampling_without(models):
    _, bf16 = models
    cond, neg, noise, _ = inputs()
    plain = sample(bf16, cond, noise, SET.steps, SET.shift, negative=neg, cfg=SET.cfg)
    before = snapshot(bf16)
    counter = CountLoads()
    with counter:
        swapped = sample_low_vram(bf16, preset("12GB"), cond, noise, SET, negative=neg)   # 95 %: all 4 blocks
    assert torch.equal(plain, swapped)
    # 3 steps x 2 calls (CFG) x 4 blocks, each block loaded once per call: >= 24 loads, each sets its 27 tensors
    assert counter.sets >= 3 * 2 * 4 * 27
    assert_same(bf16, before)


def test_fp8_storage_samples_exactly_like_bf16_of_the_same_values(models):
    fp8, bf16 = models
    assert fp8.blocks()[0].ffn.net[0].proj.weight.dtype == FP8 and fp8.module.proj_out.weight.dtype == torch.bfloat16
    cond, neg, noise, _ = inputs()
    want = sample(bf16, cond, noise, SET.steps, SET.shift, negative=neg, cfg=SET.cfg)
    before = snapshot(fp8)
    for mem in (MemorySettings(True), preset("24GB")):     # no swap (upcast only) and 3 of 4 blocks swapped
        got = sample_low_vram(fp8, mem, cond, noise, SET, negative=neg)
        assert torch.equal(got, want)
        assert_same(fp8, before)
    with pytest.raises(RuntimeError, match="same dtype|Float8"):    # without the runner fp8 cannot compute at all
        sample(fp8, cond, noise, 1)
    assert_same(fp8, before)


def test_fp8_storage_trains_exactly_like_bf16_and_keeps_base_bits(models):
    fp8, bf16 = models
    cond, neg, noise, target = inputs()
    s = [TrainSample(target, cond)]
    cfg = TrainSettings(steps=3, learning_rate=1e-3, rank=2, seed=4)
    mem = MemorySettings(True, 0.5, offload_activations=True, split_blocks=True)
    before = snapshot(fp8)
    a = train_lora_edit(bf16, s, cfg, memory=mem)
    b = train_lora_edit(fp8, s, cfg, memory=mem)
    assert a.losses == b.losses and len(b.losses) == 3
    assert all(torch.equal(x.up, y.up) and torch.equal(x.down, y.down) for (_, x), (_, y) in
               zip(a.lora.items(), b.lora.items()))
    assert float(b.lora.layers[0].up.abs().max()) > 0
    assert_same(fp8, before)
    # the trained LoRA samples the same on both (LoRA and compute in bf16 / fp32 master weights)
    outs = []
    for dit, res in ((bf16, a), (fp8, b)):
        detach = attach_hooks(dit, res.lora)
        try:
            outs.append(sample_low_vram(dit, preset("24GB"), cond, noise, SET, negative=neg))
        finally:
            detach()
    assert torch.equal(outs[0], outs[1])
    assert_same(fp8, before)


def test_streaming_fp8_load_matches_in_memory_fp8(tmp_path):
    raw_model().save_pretrained(tmp_path / "transformer")
    dit = load_diffusers_wan(tmp_path, dtype=torch.bfloat16, storage="fp8")
    ref = raw_model()
    keep = ref._keep_in_fp32_modules
    for name, t in ref.state_dict().items():
        got = dit.module.state_dict()[name]
        if is_fp8_target(name, t):
            want = to_fp8(t)
        elif any(k in name for k in keep):
            want = t.float()
        else:
            want = t.to(torch.bfloat16)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert torch.equal(dit.module.rope.freqs_cos, ref.rope.freqs_cos) and dit.module.rope.freqs_cos.device.type == "cpu"
    assert not any(t.is_meta for t in (*dit.module.parameters(), *dit.module.buffers()))
    with pytest.raises(ValueError, match="storage must be"):
        load_diffusers_wan(tmp_path, storage="int4")


def test_host_slabs_pack_tensors_without_power_of_two_rounding():
    from ffprop.nodes.lora_edit.lowvram import HostSlabs

    slabs = HostSlabs(pin=False, slab_bytes=1000)
    shapes = [((150,), torch.bfloat16), ((10, 15), torch.bfloat16), ((150,), torch.bfloat16), ((150,), FP8),
              ((600,), torch.float32)]
    ts = [slabs.empty(shape, dtype) for shape, dtype in shapes]
    assert [(tuple(t.shape), t.dtype) for t in ts] == [(tuple(s), d) for s, d in shapes]
    for i, t in enumerate(ts):      # distinct values in each: no two tensors share bytes
        t.view(torch.uint8).fill_(i + 1)
    assert [set(t.view(torch.uint8).unique().tolist()) for t in ts] == [{i + 1} for i in range(len(ts))]
    # 3 x 300 B in slab 1 (64-byte aligned starts: 0, 320, 640), 150 B opens slab 2, 2400 B gets its own
    assert slabs.reserved == 1000 + 1000 + 2400
    assert HostSlabs.footprint([300, 300, 300, 150, 2400], 1000) == slabs.reserved
    small = slabs.empty((20,), torch.uint8)          # first fit: back into slab 1's gap (940..960... 960+20)
    assert slabs.reserved == 4400 and small.untyped_storage().data_ptr() == ts[0].untyped_storage().data_ptr()
    assert HostSlabs.footprint([300, 300, 300, 150, 2400, 20], 1000) == 4400


def test_cancel_while_sampling_restores_the_model(models):
    from ffprop.nodes.common import Cancelled

    fp8, _ = models
    cond, neg, noise, _ = inputs()
    before = snapshot(fp8)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 6      # inside the 2nd model call (CFG), blocks loaded and cast up

    with pytest.raises(Cancelled):
        sample_low_vram(fp8, preset("24GB"), cond, noise, SET, should_stop=should_stop, negative=neg)
    assert calls["n"] == 7
    assert_same(fp8, before)
