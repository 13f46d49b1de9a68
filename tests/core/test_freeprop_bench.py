"""The world benchmark's FreeProp rows (nodes/ast_rope/bench.py) on the real bundled world models: a neutral
FreeProp (zero LoRA, alpha = 1) reproduces the stock sampling bit for bit, the bundled files load and change
the video, and files for another DiT or a changed file are refused with the fix."""

import json
import shutil

import pytest
import torch
from ffprop.nodes.ast_rope import bench
from ffprop.nodes.ast_rope.freeprop import FreePropFile, load_freeprop
from ffprop.nodes.ast_rope.positions import HeadSplit
from ffprop.nodes.ast_rope.predictor import AlphaPredictor, PredictorConfig
from ffprop.nodes.evaluate.bench import BenchSettings, load_world, wan_engines
from ffprop.nodes.lora_edit.lora import create_lora
from ffprop.nodes.world.model import load_fun_control
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample

SETTINGS = BenchSettings(cases=((HELDOUT_SEEDS[0], "recolour"),), sample_steps=2)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    w, problem = load_world()
    assert w is not None, problem
    return w


@pytest.fixture(scope="module")
def case():
    return render_sample(*SETTINGS.cases[0], size=SETTINGS.size, frames=SETTINGS.frames)


def _neutral(dit) -> FreePropFile:
    """A FreeProp model that must change nothing: a fresh LoRA (up = 0) and a fresh predictor (alpha = 1)."""
    return FreePropFile(create_lora(dit, 4, seed=3), AlphaPredictor(PredictorConfig(width=16, depth=1, heads=2)).eval(),
                        "paper", HeadSplit(0.0))


def test_neutral_freeprop_reproduces_stock_i2v_bit_for_bit(world, case):
    stock = wan_engines(world, SETTINGS)["i2v"](case)
    ours = bench.run_engine(world.dit, _neutral(world.dit), world.encode, world.decode, world.context, SETTINGS,
                            kind="i2v")(case)
    assert torch.equal(ours, stock)
    # the same neutral model on a non-neutral predictor is not the stock model (the check above can fail)
    moved = _neutral(world.dit)
    with torch.no_grad():
        moved.predictor.mlp_t[-1].bias.fill_(0.5)
    assert not torch.equal(bench.run_engine(world.dit, moved, world.encode, world.decode, world.context, SETTINGS,
                                            kind="i2v")(case), stock)


def test_bundled_rows_load_and_change_the_video(world, case):
    rows = bench.engines(world, SETTINGS)
    assert set(rows) == {*bench.ROWS, "freeprop_untrained"}
    manifest = bench.read_rows()
    files = {r: load_freeprop(bench.WEIGHTS / manifest["rows"][r]["file"]) for r in bench.ROWS}
    assert files["freeprop_no_ast_rope"].predictor is None
    assert files["freeprop"].predictor is not None and files["freeprop_no_teacher"].predictor is not None
    assert files["freeprop"].split == HeadSplit(1.0)      # the world DiT's one head is spatial
    untrained = rows["freeprop_untrained"](case)
    trained = rows["freeprop"](case)
    stock_i2v = wan_engines(world, SETTINGS)["i2v"](case)
    assert trained.shape == case.target.shape and 0 <= float(trained.min()) and float(trained.max()) <= 1
    assert (trained - stock_i2v).abs().mean() > 1e-3
    assert (trained - untrained).abs().mean() > 1e-3
    # the trained predictor moves frame 0's time index for this clip (alpha_S != 1): AST-RoPE is active
    with torch.no_grad():
        a = files["freeprop"].predictor.alphas(world.encode(case.source)).alpha_s
    assert abs(float(a) - 1) > 1e-3


def test_neutral_freeprop_on_fun_control_is_the_untrained_row(world, case):
    fun = load_fun_control()
    base = bench.run_engine(fun, None, world.encode, world.decode, world.context, SETTINGS)(case)
    ours = bench.run_engine(fun, _neutral(fun), world.encode, world.decode, world.context, SETTINGS)(case)
    assert torch.equal(ours, base)


def test_files_for_another_dit_or_changed_files_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"trained on world dit_fun_control .*retrain them with"):
        bench.read_rows(base_sha="0" * 64)
    copy = tmp_path / "w"
    shutil.copytree(bench.WEIGHTS, copy)
    bench.read_rows(copy)                                   # an intact copy passes
    f = copy / json.loads((copy / bench.MANIFEST).read_text())["rows"]["freeprop"]["file"]
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RuntimeError, match=r"freeprop\.safetensors is changed .*restore it from git"):
        bench.read_rows(copy)
    (copy / bench.MANIFEST).unlink()
    with pytest.raises(RuntimeError, match="is missing; restore nodes/ast_rope/weights"):
        bench.read_rows(copy)


def test_rows_for_another_dit_are_skipped_with_the_reason(monkeypatch, world):
    from ffprop.nodes.evaluate import bench as world_bench

    monkeypatch.setattr(bench, "world_dit_sha", lambda name=bench.BASE: "f" * 64)
    rows, problems = world_bench.room_engines(world, SETTINGS, rooms=("ast_rope",))
    assert rows == {} and "ffffffffffff" in problems["ast_rope"] and "retrain them with" in problems["ast_rope"]


def test_disk_encode_caches_latents(tmp_path):
    calls = []

    def encode(frames):
        calls.append(1)
        return frames.mean(-1)[None, None] * 2

    x = torch.rand(5, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    cached = bench.disk_encode(encode, tmp_path)
    first, again = cached(x), cached(x.clone())
    assert torch.equal(first, encode(x)) and torch.equal(again, first) and len(calls) == 2
    assert not torch.equal(cached(x + 0.1), first) and len(calls) == 3
