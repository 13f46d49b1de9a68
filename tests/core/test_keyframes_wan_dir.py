"""Keyframes with `ffprop propagate --engine wan --model DIR`: the bundled world models saved as a diffusers-format
Wan directory are loaded by nodes/lora_edit/cli.py's load_wan (the loader of a frame-1 run) and propagated by the
same LoRAEditEngine as --world (nodes/keyframes/cli.py wan_keyframe_engine): a later keyframe's appearance
reaches the frames near it, the directory engine gives --world's frames bit for bit, and the CLI runs keyframes
at any frame with the span cache."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("diffusers")

from ffprop.__main__ import main  # noqa: E402
from ffprop.nodes.evaluate.bench import loose_mask  # noqa: E402
from ffprop.nodes.keyframes.cli import model_dir_id, wan_keyframe_engine  # noqa: E402
from ffprop.nodes.keyframes.keys import make_keyframes  # noqa: E402
from ffprop.nodes.keyframes.propagate import propagate_keyframes  # noqa: E402
from ffprop.nodes.video.io import read_video, write_image  # noqa: E402
from ffprop.nodes.world.model import load_world_models  # noqa: E402
from ffprop.nodes.world.scenes import HELDOUT_SEEDS, render_sample  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The world DiT and VAE as a diffusers pipeline folder (transformer/ and vae/), float32."""
    w = load_world_models()
    root = tmp_path_factory.mktemp("world_as_dir")
    w.dit.module.save_pretrained(root / "transformer")
    w.vae.vae.save_pretrained(root / "vae")
    return root


def wan_args(model=None, world=False, train_steps=20, steps=6) -> argparse.Namespace:
    return argparse.Namespace(model=None if model is None else str(model), world=world, dtype="fp32",
                              memory_preset="unlimited", base_weights="compute", prompt_embeds=None,
                              image_embeds=None, train_steps=train_steps, lr=1e-4, rank=16, seed=0, steps=steps,
                              cfg=1.0, shift=3.0)


def test_a_later_keyframe_reaches_the_frames_near_it(model_dir):
    """Held-out recolour scene (13 frames), keyframe 0 = the true recolour; keyframe 8 = the unedited source frame
    (the user undoes the edit there: another appearance of the object). Through the directory engine, with and
    without keyframe 8: near frame 8 the object's mean colour is closer to keyframe 8's with it. Measured here
    (mean colour distance to the source's object, frames 7-10): 0.243 without, 0.207 with; frame 8 alone 0.233 ->
    0.130. The world models hold an object's colour weakly, so the effect fades a few frames away (frames 11-12
    are no closer; see the keyframes section of the README)."""
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=13)
    mask = loose_mask(s)
    engine = wan_keyframe_engine(wan_args(model_dir))

    def colour(video, t):
        m = s.edit_mask[t][..., None]
        return (video[t] * m).sum((0, 1)) / m.sum()

    dist = {}
    for idx in ((0,), (0, 8)):
        keys = make_keyframes(s.source, [s.target[0], s.source[8]][:len(idx)], idx, "error", mask)
        res = propagate_keyframes(s.source, keys, engine, mask)
        assert res.video.shape == s.source.shape and len(res.runs) == len(idx)
        dist[idx] = torch.stack([(colour(res.video, t) - colour(s.source, t)).norm() for t in range(13)])
    without, with_8 = dist[(0,)], dist[(0, 8)]
    assert float(with_8[7:11].mean()) < float(without[7:11].mean()) - 0.02, (without, with_8)
    assert float(with_8[8]) < 0.75 * float(without[8]), (without, with_8)
    assert torch.allclose(with_8[:5], without[:5], atol=0.02)   # far from frame 8 keyframe 0 rules alike


def test_the_directory_engine_is_the_world_engine(model_dir):
    """Same weights, same settings: the --model DIR engine gives --world's span bit for bit (one code path); only
    the cache identity differs (it names the directory)."""
    s = render_sample(HELDOUT_SEEDS[1], "recolour", frames=5)
    mask = loose_mask(s)
    keys = make_keyframes(s.source, [s.target[0], s.target[4]], [0, 4], "error", mask)
    engines = [wan_keyframe_engine(wan_args(model_dir, train_steps=2, steps=2)),
               wan_keyframe_engine(wan_args(world=True, train_steps=2, steps=2))]
    engines[1].memory = engines[0].memory                  # the dir engine's preset 'unlimited'
    a, b = (propagate_keyframes(s.source, keys, e, mask).video for e in engines)
    assert torch.equal(a, b)
    assert engines[0].identity != engines[1].identity and model_dir_id(model_dir) in engines[0].identity


def test_model_dir_id_changes_with_the_weights(model_dir, tmp_path):
    first = model_dir_id(model_dir)
    assert model_dir_id(model_dir) == first
    weights = next((model_dir / "vae").glob("*.safetensors"))
    stat = weights.stat()
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_dir_id(model_dir) != first


def test_cli_model_dir_takes_keyframes_at_any_frame(model_dir, tmp_path, capsys):
    """`ffprop propagate --engine wan --model DIR --keyframe 0:... --keyframe 4:...` (it refused later keyframes):
    two spans computed, then both from the cache, the same video."""
    s = render_sample(HELDOUT_SEEDS[0], "recolour", frames=9)
    for name, frames in (("src", s.source), ("mask", loose_mask(s)[..., None].expand(-1, -1, -1, 3))):
        (tmp_path / name).mkdir()
        for i, frame in enumerate(frames):
            write_image(tmp_path / name / f"{i:03d}.png", frame)
    write_image(tmp_path / "k0.png", s.target[0])
    write_image(tmp_path / "k4.png", s.target[4])
    args = ["propagate", "--engine", "wan", "--model", str(model_dir), "--dtype", "fp32", "--video",
            str(tmp_path / "src"), "--mask", str(tmp_path / "mask"), "--keyframe", f"0:{tmp_path / 'k0.png'}",
            "--keyframe", f"4:{tmp_path / 'k4.png'}", "--train-steps", "2", "--steps", "2", "--shift", "3",
            "-o", str(tmp_path / "out.mkv")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "2 span(s), 2 computed" in first and "frames 0-4 (between keyframes 0 and 4): computed" in first, first
    video = read_video(tmp_path / "out.mkv")[0]
    assert video.shape == (9, 64, 64, 3)
    assert main(args) == 0
    assert "0 computed, 2 from the cache" in capsys.readouterr().out
    assert torch.equal(read_video(tmp_path / "out.mkv")[0], video)
