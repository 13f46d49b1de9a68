"""Every node that writes a user-named file (FFPSaveLoRA, FFPASTRoPETrain) refuses names that leave its models
folder, never overwrites silently, and fails before the work for a bad name (needs COMFYUI_DIR)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from comfy_support import import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes.ast_rope.node import FFPASTRoPETrain  # noqa: E402
from ffprop.nodes.ast_rope.predictor import load_predictor  # noqa: E402
from ffprop.nodes.lora_edit.lora import LoRA, LoRALayer, load_lora  # noqa: E402
from ffprop.nodes.lora_edit.node import FFPSaveLoRA  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_models import random_wan21_vae_state_dict  # noqa: E402

BAD = ["../../x", "../x", "/tmp/ffp_abs_x", "a/../../x", "a\\..\\x", "C:/x", ".hidden", "con", "a//b", "x\ny"]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """models/loras and models/ast_rope inside tmp_path/models; tmp_path itself stands for 'anywhere else'."""
    loras, ast = tmp_path / "models" / "loras", tmp_path / "models" / "ast_rope"
    loras.mkdir(parents=True)
    ast.mkdir()
    real = folder_paths.get_folder_paths
    monkeypatch.setattr(folder_paths, "get_folder_paths",
                        lambda name: [str(loras)] if name == "loras" else [str(ast)] if name == "ast_rope" else real(name))
    return tmp_path, loras, ast


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def tiny_lora() -> LoRA:
    g = torch.Generator().manual_seed(0)
    return LoRA({"blocks.0.ffn.0": LoRALayer(torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 2.0)})


@pytest.mark.parametrize("name", BAD)
def test_save_lora_refuses_names_outside_models_loras(folders, name):
    root, _, _ = folders
    assert "not allowed" in FFPSaveLoRA.validate_inputs(name, False), "refused before the graph runs"
    with pytest.raises(ValueError, match="not allowed"):
        FFPSaveLoRA.execute(tiny_lora(), name, False)
    assert files(root) == set() and not Path("/tmp/ffp_abs_x.safetensors").exists()


def test_save_lora_versions_an_existing_file_unless_overwrite(folders):
    _, loras, _ = folders
    assert FFPSaveLoRA.validate_inputs("clip", False) is True
    assert FFPSaveLoRA.execute(tiny_lora(), "edits/clip", False).args[0] == "edits/clip.safetensors"
    first = (loras / "edits" / "clip.safetensors").read_bytes()
    assert FFPSaveLoRA.execute(tiny_lora(), "edits/clip.safetensors", False).args[0] == "edits/clip_2.safetensors"
    assert (loras / "edits" / "clip.safetensors").read_bytes() == first
    assert load_lora(loras / "edits" / "clip_2.safetensors").rank == 2
    assert FFPSaveLoRA.execute(tiny_lora(), "edits/clip", True).args[0] == "edits/clip.safetensors"
    assert files(loras) == {loras / "edits" / "clip.safetensors", loras / "edits" / "clip_2.safetensors"}


@pytest.fixture(scope="module")
def train_parts():
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(9, 32, 48, 3, generator=g)
    vae = comfy.sd.VAE(sd=random_wan21_vae_state_dict(dtype=torch.float32))
    return load_tiny_comfy_wan("i2v"), vae, [[torch.randn(1, 8, 4096, generator=g), {}]], clip


def train(parts, filename: str):
    model, vae, positive, clip = parts
    return FFPASTRoPETrain.execute(model, vae, positive, clip, 2, 1e-2, "warped", 2.0, 32, 1, False, 1.0, 1.0, 0,
                                   filename, backend="torch").result


@pytest.mark.parametrize("name", BAD)
def test_predictor_trainer_refuses_bad_names_before_training(folders, train_parts, name, monkeypatch):
    root, _, _ = folders
    assert "not allowed" in FFPASTRoPETrain.validate_inputs(name)
    import ffprop.nodes.ast_rope.node as node

    def no_training(*a, **k):
        raise AssertionError("trained although the file name is refused")

    monkeypatch.setattr(node, "train_predictor", no_training)
    with pytest.raises(ValueError, match="not allowed"):
        train(train_parts, name)
    assert files(root) == set() and not Path("/tmp/ffp_abs_x.safetensors").exists()


def test_predictor_trainer_keeps_an_existing_file_and_reports_the_new_name(folders, train_parts):
    _, _, ast = folders
    assert FFPASTRoPETrain.validate_inputs("") is True and FFPASTRoPETrain.validate_inputs("runs/p") is True
    (ast / "runs").mkdir()
    (ast / "runs" / "p.safetensors").write_bytes(b"a predictor the user keeps")
    rng = torch.get_rng_state()
    predictor, path, _ = train(train_parts, "runs/p")
    assert torch.equal(torch.get_rng_state(), rng), "the node seeds its own generators, never torch's global RNG"
    assert Path(path) == ast / "runs" / "p_2.safetensors"
    assert (ast / "runs" / "p.safetensors").read_bytes() == b"a predictor the user keeps"
    assert load_predictor(path).config == predictor.config
    assert files(ast) == {ast / "runs" / "p.safetensors", Path(path)}
