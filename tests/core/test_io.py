"""Video/image files through PyAV and PIL: round trips, fps, atomic writes, unreadable files."""

import os

import pytest
import torch
from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.video.io import read_image, read_mask, read_video, write_image, write_video
from ffprop.nodes.video.synthetic import synthetic_clip


def test_video_round_trip_keeps_frames_and_fps(tmp_path):
    clip = synthetic_clip(9, 96, 128)
    path = write_video(tmp_path / "clip.mp4", clip.source, fps=12.5)
    frames, fps = read_video(path)
    assert frames.shape == clip.source.shape and fps == pytest.approx(12.5)
    assert psnr(frames.numpy(), clip.source.numpy()) > 25       # h264 yuv420p on noise texture
    assert os.listdir(tmp_path) == ["clip.mp4"]                      # no temp file left behind
    assert read_video(path, max_frames=4)[0].shape[0] == 4


def test_odd_size_is_padded_to_even(tmp_path):
    frames = torch.rand(3, 33, 41, 3)
    read, _ = read_video(write_video(tmp_path / "odd.mp4", frames, 8))
    assert read.shape == (3, 34, 42, 3)


def test_image_and_mask_files(tmp_path):
    img = torch.rand(20, 30, 3)
    back = read_image(write_image(tmp_path / "a.png", img))
    assert (back - img).abs().max() <= 1 / 255 + 1e-6
    mask_img = torch.zeros(20, 30, 3)
    mask_img[5:10, 5:15] = 1
    mask = read_mask(write_image(tmp_path / "m.png", mask_img))
    assert mask.shape == (1, 20, 30) and mask.sum() == 50
    frames_dir = tmp_path / "frames"
    for i in range(3):
        write_image(frames_dir / f"{i:05d}.png", img)
    assert read_video(frames_dir)[0].shape == (3, 20, 30, 3)


def test_unreadable_files_give_clear_errors(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    with pytest.raises(ValueError, match="cannot read video .*fake.mp4"):
        read_video(fake)
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(bad_png)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image frames"):
        read_video(tmp_path / "empty")
