"""Video/image files through PyAV and PIL: round trips, fps, atomic writes, unreadable files."""

import os

import numpy as np
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


def test_real_files_read_without_warnings(tmp_path):
    """Every CLI run printed torch's 'NumPy array is not writable' warning (PIL's read-only array). torch warns
    once per process, so the reads run in a fresh one with warnings as errors."""
    import subprocess
    import sys

    png = write_image(tmp_path / "a.png", torch.rand(20, 30, 3))
    mp4 = write_video(tmp_path / "a.mp4", torch.rand(3, 16, 16, 3), 8)
    code = (f"from ffprop.nodes.video.io import read_image, read_video, read_mask; "
            f"read_image({str(png)!r}); read_video({str(mp4)!r}); read_mask({str(png)!r})")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_still_image_is_not_a_video(tmp_path):
    png = write_image(tmp_path / "frame.png", torch.rand(32, 48, 3))
    with pytest.raises(ValueError, match="still image, not a video"):
        read_video(png)
    disguised = tmp_path / "frame.mp4"                       # a PNG under a video name
    disguised.write_bytes(png.read_bytes())
    with pytest.raises(ValueError, match="still image .*not a video"):
        read_video(disguised)
    clip = write_video(tmp_path / "clip.mp4", torch.rand(2, 16, 16, 3), 8)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            read_video(clip, max_frames=bad)


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".webm"])
def test_every_output_format_round_trips_with_the_sources_audio(tmp_path, suffix):
    """Each suffix write_video accepts really is that container, decodes to the same frames, and carries the
    source's audio (a 440 Hz tone) for the written frames' duration (copied aac, or re-encoded to opus)."""
    import av
    from clip_files import SAMPLE_RATE, TONE_HZ, audio_of, dominant_hz, write_clip
    from ffprop.nodes.video.frames import to_uint8

    clip = synthetic_clip(20, 96, 128)
    src = write_clip(tmp_path / "src.mp4", to_uint8(clip.source), fps=20)
    frames, fps = read_video(src, max_frames=10)                      # half the clip: 0.5 s
    out = write_video(tmp_path / f"out{suffix}", frames, fps, audio_from=src)
    with av.open(str(out)) as c:
        assert c.format.name.split(",")[0] in {".mp4": "mov", ".mov": "mov", ".mkv": "matroska",
                                               ".webm": "matroska"}[suffix]
        assert c.streams.video[0].codec_context.name == ("vp9" if suffix == ".webm" else "h264")
    back, back_fps = read_video(out)
    assert back.shape == frames.shape and back_fps == pytest.approx(20)
    assert psnr(back.numpy(), frames.numpy()) > 28
    codec, rate, samples = audio_of(out)
    assert codec == ("opus" if suffix == ".webm" else "aac")
    assert 0.45 < len(samples) / rate < 0.6                            # trimmed to the 10 frames written
    assert dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=5)
    _, src_rate, src_samples = audio_of(src)
    rms = [np.sqrt(np.mean(x[len(x) // 4: len(x) // 2] ** 2)) for x in (samples, src_samples)]
    assert src_rate == SAMPLE_RATE and rms[0] == pytest.approx(rms[1], rel=0.1) and rms[1] > 0.1
    assert sorted(os.listdir(tmp_path)) == sorted(["src.mp4", f"out{suffix}"])


def test_no_audio_source_and_unsupported_suffixes(tmp_path):
    from clip_files import audio_of, write_clip
    from ffprop.nodes.video.io import encoded_size

    src = write_clip(tmp_path / "silent.mp4", np.zeros((4, 16, 16, 3), np.uint8), audio=None)
    out = write_video(tmp_path / "o.mp4", torch.rand(4, 16, 16, 3), 25, audio_from=src)
    assert audio_of(out) is None
    for name in ("o.png", "o", "o.avi"):
        with pytest.raises(ValueError, match=r"must end in \.mp4, \.mov, \.mkv, \.webm"):
            write_video(tmp_path / name, torch.rand(2, 16, 16, 3), 25)
        assert not (tmp_path / name).exists()
    assert encoded_size(511, 511) == (512, 512) and encoded_size(480, 832) == (480, 832)


def test_writer_encodes_in_the_background_from_a_copy_of_each_frame(tmp_path):
    """VideoWriter encodes in a worker thread: the caller may overwrite its array right after write() and the
    file still holds the frames as they were written, in order."""
    from ffprop.nodes.video.io import VideoReader, VideoWriter

    buf = np.zeros((64, 96, 3), np.uint8)
    levels = [20, 120, 220, 60, 180]
    with VideoWriter(tmp_path / "a.mp4", 25.0, (64, 96)) as w:
        for v in levels:
            buf[:] = v                     # one buffer reused for every frame
            w.write(buf)
    got = [int(round(float(f.mean()))) for f in VideoReader(tmp_path / "a.mp4")]
    assert len(got) == len(levels)
    assert all(abs(g - v) <= 3 for g, v in zip(got, levels)), got


def test_writer_raises_an_encoder_failure_and_writes_no_file(tmp_path, monkeypatch):
    """A failure inside the encoder thread reaches the caller (at a later write or at the close), and the
    partial file is discarded."""
    from ffprop.nodes.video.io import VideoWriter

    def broken(self, frame):
        raise RuntimeError("encoder gave up")

    monkeypatch.setattr(VideoWriter, "_encode", broken)
    out = tmp_path / "b.mp4"
    with pytest.raises(RuntimeError, match="encoder gave up"):
        with VideoWriter(out, 25.0, (32, 32)) as w:
            for _ in range(6):
                w.write(np.zeros((32, 32, 3), np.uint8))
    assert not out.exists() and list(tmp_path.iterdir()) == []
