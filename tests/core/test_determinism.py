"""Same input, same output: the written bytes do not depend on the run, the process or PYTHONHASHSEED."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ffprop.nodes.video.formats import VIDEO_SUFFIXES
from ffprop.nodes.video.io import write_image, write_video
from ffprop.nodes.video.synthetic import synthetic_clip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", VIDEO_SUFFIXES)
def test_write_video_same_frames_same_bytes(tmp_path, suffix):
    """Each write gets its own copy of the frames, as every real run does; with x264's mb-tree on, 2 or 3 of
    these 6 files differed."""
    frames = synthetic_clip(17, 192, 320, seed=3).source
    digests = {_digest(write_video(tmp_path / f"w{i}{suffix}", frames.clone(), 25.0)) for i in range(6)}
    assert len(digests) == 1, f"{len(digests)} different files from 6 writes of the same frames"


def test_propagate_cli_bytes_independent_of_hash_seed(tmp_path):
    clip = synthetic_clip(17, 192, 320, seed=5)
    src = write_video(tmp_path / "src.mp4", clip.source, 25.0)
    edited = write_image(tmp_path / "edited.png", clip.edited[0])
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}.mp4"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-m", "ffprop", "propagate", "--video", str(src), "--edited-first-frame", str(edited),
               "-o", str(out), "--mask-out", str(tmp_path / f"mask{seed}.mp4")]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
        outs.append((_digest(out), _digest(tmp_path / f"mask{seed}.mp4")))
    assert outs[0] == outs[1], "two runs with other PYTHONHASHSEEDs wrote different bytes"
