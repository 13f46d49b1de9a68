"""`ffprop train freeprop` on a tiny diffusers Wan folder (transformer + VAE, CPU): Ctrl-C (a real SIGINT to a
real child process) writes a checkpoint of the last finished step and exits 130 without a traceback; --resume
continues from it to the same weights as an uninterrupted run; the memory presets run."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers is installed but its Wan classes do not import here: {e}", allow_module_level=True)

from ffprop.nodes.ast_rope.cli import add_parser, run  # noqa: E402
from ffprop.nodes.ast_rope.freeprop import load_freeprop  # noqa: E402
from ffprop.nodes.video.io import write_video  # noqa: E402
from test_cli import as_from_a_terminal  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformer dir, vae dir, pairs dir): a 2-layer 2-head I2V DiT, a tiny VAE, two 5-frame 32x32 pairs."""
    root = tmp_path_factory.mktemp("freeprop_cli")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                              out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2
                              ).save_pretrained(root / "transformer")
        AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(3)
    for name in ("a", "b"):
        (root / "pairs" / name).mkdir(parents=True)
        src = torch.rand(5, 4, 4, 3, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
        write_video(root / "pairs" / name / "source.mp4", src, 8)
        write_video(root / "pairs" / name / "edited.mp4", src.flip(-1), 8)
    return root / "transformer", root / "vae", root / "pairs"


def args(folders, tmp, *extra) -> list[str]:
    model, vae, pairs = folders
    return ["freeprop", "--pairs", str(pairs), "--model", str(model), "--vae", str(vae), "--rank", "4",
            "--backend", "torch", "--max-frames", "5", "--lr", "1e-2", *map(str, extra)]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="what"))
    return parser.parse_args(argv)


STEPS = 5          # the progress line comes after every step; Ctrl-C is pressed after the first


def test_ctrl_c_writes_a_checkpoint_that_resume_continues_to_the_uninterrupted_weights(folders, tmp_path, capsys):
    ck = tmp_path / "run.pt"
    cmd = [sys.executable, "-m", "ffprop.nodes.ast_rope.cli",
           *args(folders, tmp_path, "--out", tmp_path / "never.safetensors", "--steps", STEPS, "--checkpoint", ck,
                 "--checkpoint-every", 1000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    log = []
    for line in proc.stderr:                      # training is under way after step 1: press Ctrl-C
        log.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGINT)
            break
    try:
        out, rest = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, rest = proc.communicate()
    err = "".join(log) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "--resume to continue" in err, err[-3000:]
    assert not (tmp_path / "never.safetensors").exists()
    state = torch.load(ck, map_location="cpu", weights_only=True)
    k = state["step"]
    assert state["kind"] == "ffprop.freeprop" and 1 <= k < STEPS
    assert not list(tmp_path.glob(".*.tmp*")), "no temp file left behind"

    resumed, fresh = tmp_path / "resumed.safetensors", tmp_path / "fresh.safetensors"
    assert run(parse(args(folders, tmp_path, "--out", resumed, "--steps", STEPS, "--checkpoint", ck,
                          "--resume"))) == 0
    assert f"{STEPS} steps ({STEPS - k} this run)" in capsys.readouterr().out
    assert run(parse(args(folders, tmp_path, "--out", fresh, "--steps", STEPS, "--memory-preset", "8GB"))) == 0
    a, b = load_freeprop(resumed), load_freeprop(fresh)
    for p, la in a.lora.items():
        torch.testing.assert_close(la.up, b.lora[p].up, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(la.down, b.lora[p].down, rtol=1e-4, atol=1e-6)
    for (name, x), y in zip(a.predictor.state_dict().items(), b.predictor.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(la.up.detach().abs().max()) for _, la in a.lora.items()) > 0, "training moved the LoRA"


def test_fp8_base_weights_need_a_checkpointing_preset(folders, tmp_path):
    with pytest.raises(ValueError, match="fp8 base weights"):
        run(parse(args(folders, tmp_path, "--out", tmp_path / "x.safetensors", "--steps", 1, "--base-weights", "fp8",
                       "--memory-preset", "unlimited")))
