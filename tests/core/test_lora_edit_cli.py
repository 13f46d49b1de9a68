"""`ffprop propagate --engine wan` on a tiny diffusers-format Wan2.1 I2V directory (random transformer + VAE, CPU),
the diffusers Wan VAE adapter, and the end-to-end LoRA-Edit pipeline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers is installed but its Wan classes do not import here: {e}", allow_module_level=True)

from ffprop.__main__ import main  # noqa: E402
from ffprop.nodes.host.vae import DiffusersWanVAE, load_diffusers_wan_vae  # noqa: E402
from ffprop.nodes.video.io import read_video, write_image, write_video  # noqa: E402

T, H, W, TEXT_DIM = 9, 32, 32, 32


def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                          out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2, image_dim=1280,
                          added_kv_proj_dim=24).save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    frames = torch.zeros(T, H, W, 3)
    frames[..., 2] = torch.linspace(0, 1, W)
    for i in range(T):
        frames[i, 8:20, 4 + i:16 + i] = torch.tensor([0.9, 0.8, 0.1])
    edited = frames[0].clone()
    edited[8:20, 4:16] = torch.tensor([0.1, 0.9, 0.2])
    mask = torch.zeros(H, W, 3)
    mask[4:24, 0:28] = 1
    return (write_video(d / "clip.mp4", frames, 8), write_image(d / "edited.png", edited),
            write_image(d / "mask.png", mask))


def test_vae_adapter_normalises_like_comfy_process_in():
    vae = DiffusersWanVAE(tiny_vae())
    frames = torch.rand(T, H, W, 3, generator=torch.Generator().manual_seed(1))
    z = vae.encode(frames)
    raw = vae.vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1).latent_dist.mode()
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert z.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(z, (raw - mean) / std)
    out = vae.decode(z)
    assert out.shape == (T, H, W, 3) and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(frames[:8])


def test_cli_engine_wan_writes_the_edited_clip(model_dir, clip_files, tmp_path, capsys):
    clip, edited, mask = clip_files
    embeds = tmp_path / "embeds.safetensors"
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    save_file({"prompt_embeds": torch.randn(6, TEXT_DIM, generator=g),
               "negative_prompt_embeds": torch.zeros(1, 6, TEXT_DIM)}, str(embeds))
    out, lora = tmp_path / "out.mp4", tmp_path / "clip_lora.safetensors"
    rc = main(["propagate", "--engine", "wan", "--model", str(model_dir), "--video", str(clip),
               "--edited-first-frame", str(edited), "--mask", str(mask), "-o", str(out), "--train-steps", "3",
               "--steps", "2", "--lr", "1e-3", "--rank", "4", "--prompt-embeds", str(embeds),
               "--save-lora", str(lora), "--memory-preset", "8GB"])
    text = capsys.readouterr().out
    assert rc == 0, text
    frames, fps = read_video(out)
    assert frames.shape == (T, H, W, 3) and fps == 8
    assert "LoRA: 3 steps" in text and "zero CLIP-vision tokens" in text and lora.is_file()


def test_cli_engine_wan_errors(model_dir, clip_files, tmp_path, capsys):
    clip, edited, _ = clip_files
    base = ["propagate", "--engine", "wan", "--video", str(clip), "--edited-first-frame", str(edited),
            "-o", str(tmp_path / "o.mp4")]
    assert main(base) == 2 and "needs --model" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "nope")]) == 2 and "not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no diffusers Wan VAE"):
        load_diffusers_wan_vae(tmp_path)


def test_cli_engine_wan_fp8_base_weights_and_block_swap(model_dir, clip_files, tmp_path, capsys):
    """fp8 base weights (bf16 compute, one block at a time) with every block swapped, training and sampling."""
    clip, edited, mask = clip_files
    out = tmp_path / "fp8.mp4"
    rc = main(["propagate", "--engine", "wan", "--model", str(model_dir), "--video", str(clip),
               "--edited-first-frame", str(edited), "--mask", str(mask), "-o", str(out), "--train-steps", "2",
               "--steps", "2", "--rank", "2", "--memory-preset", "12GB", "--base-weights", "fp8", "--dtype", "bf16"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "2 of 2 blocks stay in CPU RAM (12GB preset), base weights fp8" in text and "LoRA: 2 steps" in text
    assert read_video(out)[0].shape == (T, H, W, 3)
    base = ["propagate", "--engine", "wan", "--model", str(model_dir), "--video", str(clip), "--edited-first-frame",
            str(edited), "-o", str(tmp_path / "x.mp4"), "--base-weights", "fp8", "--dtype", "fp16"]
    assert main(base) == 2 and "computed in bf16" in capsys.readouterr().err


def test_engine_wan_without_diffusers_is_a_clear_runtime_error(monkeypatch):
    """cli.py imports without diffusers; using it says what is missing and how to install it."""
    import argparse
    import importlib
    import sys

    from ffprop.nodes.lora_edit import cli

    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.setitem(sys.modules, name, None)     # `import diffusers` now fails as if not installed
    importlib.reload(cli)
    with pytest.raises(RuntimeError, match=r"needs the 'diffusers' package .*pip install 'diffusers>=0.33'"):
        cli.run_wan(argparse.Namespace(model="somewhere"), torch.zeros(5, 16, 16, 3), 8.0, torch.zeros(16, 16, 3),
                    None, None)
