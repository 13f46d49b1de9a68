"""FreeProp training (LoRA + AST-RoPE predictor, flow matching + the identity teacher) on a tiny diffusers Wan:
the teacher terms are 0 when student and teacher inputs are equal and positive and falling otherwise;
checkpoints resume to the same state; the one-file model round-trips; 2 DDP processes equal 1 process."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401  (the skip below: the class must import)
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers' WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.ast_rope.freeprop import (  # noqa: E402
    FreePropSettings,
    load_freeprop,
    save_freeprop,
    train_freeprop,
)
from ffprop.nodes.ast_rope.positions import HeadSplit  # noqa: E402
from ffprop.nodes.ast_rope.predictor import PredictorConfig  # noqa: E402
from ffprop.nodes.ast_rope.train import PredictorSample  # noqa: E402
from ffprop.nodes.common import Cancelled  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from tiny_wan import seeded_tiny_wan  # noqa: E402

F, H, W = 3, 4, 4
FAST = FreePropSettings(steps=6, rank=4, learning_rate=1e-2, backend="torch",
                        predictor=PredictorConfig(width=32, depth=1, heads=2, grid=2))


def tiny(seed: int = 0) -> DiffusersWan:
    return seeded_tiny_wan(seed)


def pair(seed: int = 1, same: bool = False) -> PredictorSample:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1
    src = torch.randn(1, 16, F, H, W, generator=g).cumsum(2)
    ctx = torch.randn(1, 8, 32, generator=g)
    src_cond = WanCond(keep, torch.randn(1, 16, F, H, W, generator=g), ctx)
    if same:                                   # the teacher task is the student task
        return PredictorSample(src, src, src_cond, src, src_cond)
    edited = src + 0.7 * torch.randn(src.shape, generator=g)
    return PredictorSample(src, edited, WanCond(keep, torch.randn(1, 16, F, H, W, generator=g), ctx), src, src_cond)


@pytest.fixture(scope="module")
def wan() -> DiffusersWan:
    return tiny()


def test_teacher_terms_are_zero_for_equal_inputs_and_positive_falling_otherwise(wan):
    same = train_freeprop(wan, [pair(same=True)], 1, replace(FAST, steps=2))
    assert all(p["motion"] == 0.0 and p["mmd"] == 0.0 for p in same.parts), same.parts
    res = train_freeprop(wan, [pair(2)], 1, replace(FAST, steps=8))
    motion = [p["motion"] for p in res.parts]
    assert min(motion) > 0 and min(p["mmd"] for p in res.parts) >= 0 and max(p["mmd"] for p in res.parts) > 0
    assert sum(motion[-3:]) < sum(motion[:3]), motion
    assert res.model.predictor is not None and res.model.lora.rank == 4
    assert all(p.grad is None for p in wan.model.parameters()), "the DiT stays frozen"


def test_ablations_and_bad_input(wan):
    plain = train_freeprop(wan, [pair(2)], 1, replace(FAST, steps=2, ast_rope=False, teacher=False))
    assert plain.model.predictor is None and set(plain.parts[0]) == {"fm"}
    with pytest.raises(ValueError, match="teacher"):
        train_freeprop(wan, [replace(pair(2), teacher_cond=None)], 1, replace(FAST, steps=1))
    with pytest.raises(ValueError, match="no training pairs"):
        train_freeprop(wan, [], 0, FAST)
    with pytest.raises(ValueError, match=r"split 0.25 does not divide this model's 2 attention heads \(heads not "
                                         r"divisible by the split\)"):
        train_freeprop(wan, [pair(2)], 1, replace(FAST, steps=1, split=HeadSplit(0.25)))


def test_pairs_are_encoded_lazily_one_batch_per_step(wan):
    """get(i) is asked for step k's batch when step k runs: nothing is encoded ahead or held for the run."""
    asked: list[tuple[int, int]] = []
    steps: list[int] = []

    def get(i: int) -> PredictorSample:
        asked.append((len(steps), i))
        return pair(20 + i)
    train_freeprop(wan, get, 5, replace(FAST, steps=3, batch=2), on_step=lambda i, n, *_: steps.append(i))
    assert asked == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 0)]


def test_checkpoint_resume_equals_one_run(wan, tmp_path):
    data = [pair(4), pair(5)]
    full = train_freeprop(wan, data, 2, replace(FAST, steps=4))
    ck = tmp_path / "run.pt"
    done, stop = _stop_after(3)
    with pytest.raises(Cancelled):                   # Cancel after step 3 keeps a checkpoint of step 3
        train_freeprop(wan, data, 2, replace(FAST, steps=4), checkpoint=ck, on_step=done, should_stop=stop)
    resumed = train_freeprop(wan, data, 2, replace(FAST, steps=4), checkpoint=ck, resume=True)
    assert resumed.losses == full.losses[3:]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable FreeProp training checkpoint"):
        train_freeprop(wan, data, 2, FAST, checkpoint=tmp_path / "junk.pt", resume=True)


def _stop_after(n: int):
    """(on_step, should_stop): Cancel pressed once step n has finished (should_stop is also asked before every
    block, as ComfyUI's Cancel is, so the press may land inside step n + 1: the checkpoint is still step n)."""
    seen = {"step": 0}

    def on_step(i, total, *_):
        seen["step"] = i
    return on_step, lambda: seen["step"] >= n


def test_one_file_model_round_trips(wan, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    res = train_freeprop(wan, [pair(6)], 1, replace(FAST, steps=2))
    path = save_freeprop(tmp_path / "fp.safetensors", res.model)
    loaded = load_freeprop(path)
    assert loaded.variant == "paper" and loaded.predictor.config == FAST.predictor
    for (k, a), b in zip(res.model.predictor.state_dict().items(), loaded.predictor.state_dict().values()):
        assert torch.equal(a, b), k
    assert sorted(loaded.lora.paths) == sorted(res.model.lora.paths)
    for p, la in res.model.lora.items():
        assert torch.equal(la.up, loaded.lora[p].up) and torch.equal(la.down, loaded.lora[p].down), p
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an FFProp FreeProp model"):
        load_freeprop(tmp_path / "other.safetensors")
    state, meta = load_file(str(path)), safe_open(str(path), "pt").metadata()
    save_file(state, str(tmp_path / "v9.safetensors"), metadata={**meta, "version": "9"})
    with pytest.raises(ValueError, match="FreeProp file version '9'; this FFProp reads 1"):
        load_freeprop(tmp_path / "v9.safetensors")
    wider = {**meta, "predictor_config": json.dumps({**json.loads(meta["predictor_config"]), "width": 64})}
    save_file(state, str(tmp_path / "arch.safetensors"), metadata=wider)   # another predictor architecture
    with pytest.raises(ValueError, match="its predictor does not match its config"):
        load_freeprop(tmp_path / "arch.safetensors")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = train_freeprop(tiny(), [pair(7), pair(8)], 2, replace(FAST, steps=3, batch=4))
        if rank == 0:
            torch.save({k: v.detach() for k, v in res.model.state_dict().items()}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(tmp_path):
    """gloo, 2 ranks x 2 samples (one backward each, the first under no_sync) vs 1 process x 4 samples per step:
    the same weights (float rounding)."""
    one = train_freeprop(tiny(), [pair(7), pair(8)], 2, replace(FAST, steps=3, batch=4))
    out = str(tmp_path / "ddp.pt")
    torch.multiprocessing.start_processes(_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2,
                                          start_method="spawn")
    two = torch.load(out, weights_only=True)
    ref = one.model.state_dict()
    assert set(two) == set(ref)
    moved = 0.0
    for k, v in ref.items():
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6)
    for k, v in ref.items():
        if k.startswith("lora.") and k.endswith(".up"):
            moved = max(moved, float(v.abs().max()))
    assert moved > 0, "training moved the LoRA"
    assert os.path.exists(out)


def test_freeprop_model_applies_the_file_and_removes_itself(wan, tmp_path, caplog):
    """freeprop_model: inside, the LoRA and AST-RoPE at the predicted alphas change the output; afterwards the
    model is the stock one again; a head split that does not divide the heads falls back to global (logged)."""
    from ffprop.nodes.ast_rope.freeprop import freeprop_model

    res = train_freeprop(wan, [pair(6)], 1, replace(FAST, steps=2))
    with torch.no_grad():
        res.model.predictor.mlp_t[-1].bias.fill_(-0.5)              # a clearly non-stock alpha_T
    loaded = load_freeprop(save_freeprop(tmp_path / "fp.safetensors", res.model))
    s = pair(9)
    x = torch.randn(s.target.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = wan.predict(x, 0.5, s.cond)
        with freeprop_model(wan, loaded, s.source_latent, "torch") as m:
            inside = m.predict(x, 0.5, s.cond)
        with freeprop_model(wan, replace(loaded, predictor=None), s.source_latent, "torch") as m:
            lora_only = m.predict(x, 0.5, s.cond)
        with freeprop_model(wan, replace(loaded, split=HeadSplit(0.25)), s.source_latent, "torch") as m:
            fallback = m.predict(x, 0.5, s.cond)
        after = wan.predict(x, 0.5, s.cond)
    assert torch.equal(after, stock)
    assert (inside - lora_only).abs().max() > 1e-6 and (lora_only - stock).abs().max() > 1e-6
    assert torch.isfinite(fallback).all() and "using the global variant" in caplog.text
