"""The in-graph FreeProp trainer (FFPFreePropTrain) on ComfyUI's own tiny Wan models (needs COMFYUI_DIR): it writes
a file FFPFreePropApply loads, leaves the input MODEL bit-identical, stops cleanly on Cancel, and refuses bad
pairs and models with the numbers."""

from __future__ import annotations

import pytest
import torch
from comfy_support import FakeVAE, cancelled, import_comfy, load_tiny_comfy_wan

import_comfy()

import folder_paths  # noqa: E402
from ffprop.nodes.ast_rope.freeprop import load_freeprop  # noqa: E402
from ffprop.nodes.ast_rope.node import NODES, FFPASTRoPETrain, FFPFreePropApply, FFPFreePropTrain  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402

# (model kwargs, variant): 2 heads (dim 256) for the paper split; the 1-head tiny Fun-Control trains global
CASES = {"i2v": ({"dim": 256}, "paper"), "fun_control": ({}, "global")}


@pytest.fixture
def ast_rope_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ast_rope", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def clips(frames: int = 9, h: int = 32, w: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (source, edited) IMAGE pair: the edit recolours the source."""
    src = torch.rand(frames, h, w, 3, generator=torch.Generator().manual_seed(seed))
    return src, (src * torch.tensor([0.3, 1.0, 0.6])).clamp(0, 1)


def positive() -> list:
    return [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(3)), {}]]


def train(model, src, ed, steps=2, variant="global", preset="unlimited", filename="fp_ci", **kw):
    return FFPFreePropTrain.execute(model, FakeVAE(), positive(), src, ed, steps, 1e-2, 4, variant, 0.5,
                                    kw.pop("teacher", True), preset, 0, filename, **kw)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_two_steps_write_a_file_apply_loads_and_the_model_is_untouched(kind, ast_rope_dir):
    kwargs, variant = CASES[kind]
    model = load_tiny_comfy_wan(kind, **kwargs)
    before = weights(model)
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    src, ed = clips()
    src2, ed2 = clips(5, 48, 32, seed=1)                                   # a second pair of another shape
    name, loss, text = train(model, src, ed, variant=variant, preset="24GB", source_2=src2, edited_2=ed2).result
    assert name == "fp_ci.safetensors" and (ast_rope_dir / name).is_file()
    assert loss.shape[0] == 1 and loss.shape[-1] == 3 and "2 steps on 2 pair(s)" in text and "motion" in text
    assert sorted(p.name for p in ast_rope_dir.iterdir()) == [name]        # no temp file left
    loaded = load_freeprop(ast_rope_dir / name)
    assert loaded.variant == variant and loaded.predictor is not None
    assert max(float(layer.up.detach().abs().max()) for _, layer in loaded.lora.items()) > 0   # the LoRA really trained
    after = weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model.patches and not model.object_patches and no_hooks(model)
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags
    latent = {"samples": FakeVAE().encode(src)}
    out, applied = FFPFreePropApply.execute(model, name, 1.0, source_latent=latent).result
    assert applied.startswith("FreeProp: LoRA x1")
    g = torch.Generator().manual_seed(4)
    ch = 16 if kind == "i2v" else 32
    keep = torch.zeros(1, 4, 3, 4, 6)
    keep[:, :, 0] = 1
    cond = WanCond(keep if kind == "i2v" else None, torch.randn(1, ch, 3, 4, 6, generator=g),
                   torch.randn(1, 8, 4096, generator=g), None)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    with torch.no_grad():
        assert (ComfyWan(out).predict(x, 0.5, cond) - ComfyWan(model).predict(x, 0.5, cond)).abs().max() > 1e-6
    name2 = train(model, src, ed, steps=1).result[0]                      # the name is taken: versioned
    assert name2 == "fp_ci_2.safetensors"


def test_cancel_stops_cleanly_without_a_file(ast_rope_dir):
    import comfy.model_management as mm

    model = load_tiny_comfy_wan("i2v")
    before = weights(model)
    src, ed = clips()
    with cancelled():
        train(model, src, ed, steps=50)
    assert list(ast_rope_dir.iterdir()) == []                                # nothing written, no temp file
    after = weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert no_hooks(model) and not model.patches and not model.object_patches
    assert getattr(mm, "in_training", False) is False                       # the host's switch restored
    assert train(model, src, ed, steps=1).result[0] == "fp_ci.safetensors"   # and the next run works


def test_same_inputs_and_seed_give_the_same_file(ast_rope_dir):
    """Local generators only: two runs with one seed write identical tensors; another seed does not."""
    from safetensors.torch import load_file

    model = load_tiny_comfy_wan("i2v")
    src, ed = clips()
    torch.manual_seed(1)
    first = load_file(ast_rope_dir / train(model, src, ed).result[0])
    torch.manual_seed(2)                                                    # the global RNG plays no part
    second = load_file(ast_rope_dir / train(model, src, ed).result[0])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = FFPFreePropTrain.execute(model, FakeVAE(), positive(), src, ed, 2, 1e-2, 4, "global", 0.5, True,
                                     "unlimited", 1, "fp_seed1").result[0]
    third = load_file(ast_rope_dir / other)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_bad_pairs_and_models_are_refused_with_the_numbers(ast_rope_dir):
    model = load_tiny_comfy_wan("i2v")
    src, ed = clips()
    with pytest.raises(ValueError, match=r"pair 1: edited is 5 frames of 48x32, source 9 frames of 48x32.*same "
                                         r"frame count and size"):
        train(model, src, ed[:5])
    with pytest.raises(ValueError, match=r"pair 2: edited_2 is 9 frames of 32x32, source_2 9 frames of 48x32"):
        train(model, src, ed, source_2=src, edited_2=ed[:, :, :32])
    with pytest.raises(ValueError, match="pair 3: source_3 is connected but edited_3 is not"):
        train(model, src, ed, source_3=src)
    with pytest.raises(ValueError, match=r"pair 1 \(source/edited\): Wan needs 4k\+1 frames.*got 8"):
        train(model, src[:8], ed[:8])
    with pytest.raises(ValueError, match=r"spatial_ratio 0.5 of this model's 1 attention heads.*variant global"):
        train(model, src, ed, variant="paper")
    with pytest.raises(ValueError, match="filename is empty"):
        train(model, src, ed, filename=" ")
    assert isinstance(FFPFreePropTrain.validate_inputs("../x"), str)        # refused before the run starts
    assert FFPFreePropTrain.validate_inputs("ok_name") is True
    assert FFPFreePropTrain.validate_inputs(["3", 0]) is True               # linked: checked when it runs
    assert isinstance(FFPASTRoPETrain.validate_inputs("../x"), str) and FFPASTRoPETrain.validate_inputs("p") is True
    with pytest.raises(ValueError, match="Wan t2v model but Train FreeProp needs a Wan i2v or fun_control"):
        train(load_tiny_comfy_wan("t2v"), src, ed)
    import comfy.model_patcher

    fake = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="Train FreeProp needs a ComfyUI MODEL"):
        train(fake, src, ed)
    assert list(ast_rope_dir.iterdir()) == []


def test_node_is_registered_with_tooltips_and_a_help_page():
    from pathlib import Path

    assert FFPFreePropTrain in NODES
    schema = FFPFreePropTrain.GET_SCHEMA()
    assert all((i.tooltip or "").strip() for i in schema.inputs) and all((o.tooltip or "").strip()
                                                                       for o in schema.outputs)
    rank = next(i for i in schema.inputs if i.id == "rank")
    assert rank.default == 32 and "128" in rank.tooltip
    page = Path(__file__).resolve().parents[2] / "web" / "docs" / "FFPFreePropTrain.md"
    assert "ffprop train freeprop" in page.read_text(encoding="utf-8")
