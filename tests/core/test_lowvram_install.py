"""BlockRunner install is transactional, Cancel leaves nothing behind, the norm wrapper syncs nothing (tiny diffusers
Wan I2V, CPU).

Failures are injected from two real hook points, never by replacing the runner's own code: torch's
__torch_function__ mode (every `tensor.data = ...` the install makes goes through it) and nn.Module.__setattr__
(every `module.forward = wrapper`). Each install step is one of those calls, so parametrizing over the step index
fails the install at every step it has."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers is installed but WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.common import Cancelled  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan, store_blocks_fp8  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.lora_edit.lora import attach_hooks, create_lora  # noqa: E402
from ffprop.nodes.lora_edit.lowvram import BlockRunner, MemorySettings, is_oom  # noqa: E402
from ffprop.nodes.lora_edit.trainer import TrainSample, TrainSettings, flow_loss, train_lora_edit  # noqa: E402

TEXT_DIM = 32
F, H, W = 3, 4, 4
DATA_SET = torch._C.TensorBase.__dict__["data"]   # the descriptor whose __set__ is `tensor.data = x`


def tiny(layers: int = 2, fp8: bool = True) -> DiffusersWan:
    """bf16 tiny Wan I2V; fp8=True keeps its block linear weights in float8_e4m3fn (the loader's fp8 storage)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=layers).eval()
    keep = model._keep_in_fp32_modules
    for name, p in model.named_parameters():     # bf16, the fp32 modules kept in fp32 (as the loaders do)
        p.data = p.data.to(torch.float32 if any(k in name for k in keep) else torch.bfloat16)
    return DiffusersWan(store_blocks_fp8(model) if fp8 else model)


def sample(dtype=torch.bfloat16) -> TrainSample:
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1
    cond = WanCond(keep.to(dtype), torch.randn(1, 16, F, H, W, generator=g).to(dtype),
                   torch.randn(1, 8, TEXT_DIM, generator=g).to(dtype))
    return TrainSample(torch.randn(1, 16, F, H, W, generator=g).to(dtype), cond)


def state(dit) -> dict:
    """Every tensor's bytes, device and dtype (fp8 compared as bytes: torch.equal has no fp8 kernel)."""
    out = {}
    for k, v in dit.module.state_dict(keep_vars=True).items():
        out[k] = (v.detach().flatten().view(torch.uint8).clone(), v.device, v.dtype, v.data_ptr())
    return out


def assert_untouched(dit, before: dict) -> None:
    after = state(dit)
    assert after.keys() == before.keys()
    for k, (bits, dev, dtype, _) in before.items():
        assert (after[k][1], after[k][2]) == (dev, dtype), k
        assert torch.equal(after[k][0], bits), k
    for name, m in dit.module.named_modules():
        assert "forward" not in m.__dict__, f"{name or 'model'} still has a forward wrapper"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"{name or 'model'} still has hooks"


class Injector(TorchFunctionMode):
    """Counts the model changes BlockRunner.install makes (tensor.data sets, module.forward sets) and raises
    `error` at change number `at` (0-based; None: count only). Changes made outside install (the trainer's LoRA
    set-up, the undo itself) are not counted."""

    def __init__(self, at=None, error=None):
        super().__init__()
        self.at, self.error, self.count, self.fired = at, error, 0, False

    def step(self) -> None:
        if not _in_install() or self.fired:
            return
        if self.count == self.at:
            self.fired = True
            raise self.error
        self.count += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is DATA_SET and func.__name__ == "__set__":
            self.step()
        return func(*args, **(kwargs or {}))


def _in_install() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is BlockRunner.install.__code__:
            return True
        f = f.f_back
    return False


def injecting(monkeypatch, inj: Injector):
    real = nn.Module.__setattr__

    def setattr_(self, name, value):
        if name == "forward":
            inj.step()
        real(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", setattr_)
    return inj


RUNNER = dict(checkpointing=True, blocks_to_swap=1, offload_activations=True, split_blocks=True)


def install_steps() -> int:
    dit = tiny()
    inj = Injector()
    with pytest.MonkeyPatch.context() as mp:
        injecting(mp, inj)
        with inj:
            BlockRunner(dit.blocks(), torch.device("cpu"), **RUNNER).install().remove()
    return inj.count


STEPS = install_steps()


def test_install_has_a_step_per_change():
    # block 0 swapped: each of its tensors staged; block 1: its fp8 linear weights staged; per block one forward
    # wrapper + attn1, attn2, ffn + the 3 norms (split_blocks)
    dit = tiny()
    b0, b1 = dit.blocks()
    fp8 = sum(1 for t in b1.parameters() if t.dtype == torch.float8_e4m3fn)
    assert fp8 == 10
    assert STEPS == len([*b0.parameters(), *b0.buffers()]) + fp8 + 2 * (1 + 3 + 3)


@pytest.mark.parametrize("step", range(STEPS))
def test_install_failing_at_any_step_is_undone_and_reraised_unchanged(step, monkeypatch):
    dit = tiny()
    before = state(dit)
    error = RuntimeError(f"injected failure at install step {step}")
    runner = BlockRunner(dit.blocks(), torch.device("cpu"), **RUNNER)
    inj = injecting(monkeypatch, Injector(step, error))
    with inj, pytest.raises(RuntimeError) as info:
        runner.install()
    assert info.value is error and inj.fired
    monkeypatch.undo()
    assert_untouched(dit, before)
    runner.remove()                      # harmless after the rollback
    assert_untouched(dit, before)
    with runner:                         # and the same runner installs cleanly afterwards
        assert "forward" in dit.blocks()[0].__dict__
    assert_untouched(dit, before)


@pytest.mark.parametrize("step", [0, STEPS // 2, STEPS - 1])
def test_trainer_reraises_an_install_failure_as_it_is(step, monkeypatch):
    """Not an out-of-memory error: propagates unchanged (no OOM advice); the model is as before."""
    dit = tiny()
    before = state(dit)
    error = RuntimeError("CUDA error: out of memory (cudaHostAlloc: pinned CPU memory)")
    assert not is_oom(error)
    inj = injecting(monkeypatch, Injector(step, error))
    with inj, pytest.raises(RuntimeError) as info:
        train_lora_edit(dit, [sample()], TrainSettings(steps=2, rank=2),
                        memory=MemorySettings(True, 0.5, offload_activations=True, split_blocks=True))
    assert info.value is error
    monkeypatch.undo()
    assert_untouched(dit, before)


def test_trainer_turns_only_a_device_oom_into_the_oom_advice(monkeypatch):
    dit = tiny()
    before = state(dit)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    inj = injecting(monkeypatch, Injector(3, oom))
    with inj, pytest.raises(RuntimeError, match="out of GPU memory while training") as info:
        train_lora_edit(dit, [sample()], TrainSettings(steps=2, rank=2), memory=MemorySettings(True, 0.5))
    assert info.value.__cause__ is oom
    monkeypatch.undo()
    assert_untouched(dit, before)
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_oom(ValueError("the clip is out of memory range"))


@pytest.mark.parametrize("fp8", [True, False])
def test_cancel_mid_training_leaves_the_model_as_it_was(fp8):
    dit = tiny(fp8=fp8)
    before = state(dit)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 5    # block 1 of the 3rd forward: blocks loaded/upcast, activations offloaded

    with pytest.raises(Cancelled):
        train_lora_edit(dit, [sample()], TrainSettings(steps=20, rank=2),
                        memory=MemorySettings(True, 0.5, offload_activations=True, split_blocks=True),
                        should_stop=should_stop)
    assert calls["n"] == 6
    assert_untouched(dit, before)


def test_fp8_training_needs_checkpointing_and_says_so():
    dit = tiny()
    before = state(dit)
    with pytest.raises(ValueError, match="fp8 base weights .* gradient checkpointing"):
        BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=False).install()
    assert_untouched(dit, before)


class CountSyncs(TorchFunctionMode):
    """Counts the calls that read tensor values back to the host (a device sync on CUDA)."""

    NAMES = {"equal", "item", "tolist", "__bool__", "allclose", "__int__", "__float__", "nonzero", "any", "all"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_norm_wrapper_decides_by_graph_not_by_values():
    """split_blocks on a bf16 model compacts the norms' fp32 inputs (x.float() of bf16 x) with no value read: the
    same host reads as without split_blocks (none from the runner), and the same gradients."""
    dit = tiny(fp8=False)
    s = sample()
    grads, syncs, runners = {}, {}, {}
    for split in (False, True):
        lora = create_lora(dit, rank=2, seed=2)
        with torch.no_grad():
            for _, layer in lora.items():
                layer.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
        lora.requires_grad_(True)
        detach = attach_hooks(dit, lora)
        runner = BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=True, split_blocks=split)
        counter = CountSyncs()
        try:
            with runner, counter:
                flow_loss(dit, s, torch.Generator().manual_seed(4)).backward()
        finally:
            detach()
        grads[split] = [layer.down.grad for _, layer in lora.items()]
        syncs[split], runners[split] = counter.calls, runner
    assert runners[True].compact_saves >= 3 and runners[False].compact_saves == 0
    assert syncs[True] == syncs[False] and "equal" not in syncs[True], syncs
    for a, b in zip(grads[False], grads[True]):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_norm_wrapper_leaves_fp32_values_computed_in_fp32_alone():
    """ComfyUI's blocks feed norm3 x + y * e computed in fp32 (not bf16 values): not compacted."""
    runner = BlockRunner([], torch.device("cpu"), checkpointing=True, split_blocks=True)
    norm = nn.LayerNorm(8, elementwise_affine=False)
    wrapped = runner._wrap_norm(norm, norm.forward)
    x16 = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.enable_grad():
        computed = x16.float() * torch.randn(2, 8) + 0.1          # fp32 values that bf16 cannot hold
        wrapped(computed)
        assert runner.compact_saves == 0
        y = wrapped(x16.float())                                  # a cast of bf16: compacted
        assert runner.compact_saves == 1
        w = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
        (y * w).sum().backward()
        ref = x16.detach().clone().requires_grad_(True)
        (norm(ref.float()) * w).sum().backward()
    assert torch.equal(x16.grad, ref.grad) and float(ref.grad.abs().max()) > 0


def test_unmarked_fp8_blocks_are_left_to_the_host():
    """fp8 tensors in blocks the fp8 loader did not mark (ComfyUI's: its ops and modulation casts upcast fp8
    themselves) are not touched: nothing staged, nothing cast."""
    from ffprop.nodes.host.diffusers import UPCAST_ATTR

    dit = tiny()
    for b in dit.blocks():
        del b.__dict__[UPCAST_ATTR]
    before = state(dit)
    runner = BlockRunner(dit.blocks(), torch.device("cpu"), checkpointing=True)
    with runner:
        assert not runner.home and not runner.upcast
        assert dit.blocks()[1].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    assert_untouched(dit, before)
