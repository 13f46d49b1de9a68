"""nodes.common.atomic_write and the savers that use it: normal file mode, all-or-nothing replacement."""

import os
import stat

import pytest
import torch
from ffprop.nodes.ast_rope.predictor import AlphaPredictor, PredictorConfig, load_predictor, save_predictor
from ffprop.nodes.common import atomic_write
from ffprop.nodes.lora_edit.lora import LoRA, LoRALayer, load_lora, save_lora
from ffprop.nodes.masks.sam2_model import random_checkpoint
from ffprop.nodes.video.io import write_image, write_video


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_file_gets_the_umask_mode_not_0600(tmp_path, umask022):
    target = tmp_path / "out.bin"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".bin" and tmp != target
        tmp.write_bytes(b"hello")
    assert target.read_bytes() == b"hello"
    assert _mode(target) == 0o644
    old = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "private.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.bin") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "private.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old contents")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise error
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _save_predictor(path):
    save_predictor(AlphaPredictor(PredictorConfig()), path)
    load_predictor(path)


def _save_lora(path):
    save_lora(LoRA({"blocks.0.ffn.0": LoRALayer(torch.randn(2, 8), torch.randn(4, 2), 2.0)}), path)
    assert load_lora(path).rank == 2


def _save_sam2(path):
    random_checkpoint(path, "tiny", "2.1", seed=0)


def _save_video(path):
    write_video(path.with_suffix(".mp4"), torch.rand(3, 16, 16, 3), 25)
    path.with_suffix(".mp4").rename(path)


def _save_image(path):
    write_image(path.with_suffix(".png"), torch.rand(16, 16, 3))
    path.with_suffix(".png").rename(path)


@pytest.mark.parametrize("save", [_save_predictor, _save_lora, _save_sam2, _save_video, _save_image])
def test_savers_write_normal_mode_and_leave_no_temp(tmp_path, umask022, save):
    """The migrated savers end to end: a new subfolder, mode 0644, only the target file left behind."""
    out = tmp_path / "sub" / "file.safetensors"
    save(out)
    assert _mode(out) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["file.safetensors"]


def test_errors_name_the_target_not_the_temp_file(tmp_path):
    """Replacing a folder failed with 'Is a directory: /x/.out.7ywyh1sz -> out' (issue 11)."""
    folder = tmp_path / "out.mp4"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as err:
        with atomic_write(folder) as tmp:
            tmp.write_bytes(b"video")
    assert err.value.filename == str(folder) and ".tmp" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and not any(folder.iterdir())
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    with pytest.raises(OSError) as err:                                    # its folder is a file
        with atomic_write(blocked / "x.png"):
            pass
    assert str(blocked) in str(err.value) and ".tmp" not in str(err.value)
