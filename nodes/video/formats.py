"""Torch-free names of the video room: the fit/size/frame policies and the file formats it reads and writes.

Apart from frames.py and io.py (which import torch and PyAV) so that the `ffprop` command can build its parser
and check its arguments without importing torch."""

from __future__ import annotations

FRAME_POLICIES = ("error", "trim", "pad")
SIZE_POLICIES = ("error", "crop", "pad", "resize")
FIT_POLICIES = ("auto", "resize", "crop", "pad", "error")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

# What write_video writes, by the output's suffix: (PyAV container, video encoder, encoder options, audio
# encoder used when the source's audio codec cannot be copied, audio codecs the container takes as they are).
# Each is written and read back, with audio, by tests/core/test_io.py. Quality: x264 gets write_video's crf
# (17); VP9 gets crf + 7, which gave the same PSNR on the synthetic clip (29.1 vs 29.5 dB at 512x288).
_MP4_AUDIO = ("aac", "mp3", "alac", "ac3", "eac3")
# x264's macroblock-tree rate control wrote other bytes for the same frames from run to run (PyAV 18.1, 2 of 3
# to 10 of 10 writes differed, with one thread too); without it the bytes are the same every time
# (tests/core/test_determinism.py).
_X264 = {"preset": "medium", "x264-params": "no-mbtree=1"}
VIDEO_FORMATS: dict[str, tuple[str, str, dict[str, str], str, tuple[str, ...]]] = {
    ".mp4": ("mp4", "libx264", _X264, "aac", _MP4_AUDIO),
    ".mov": ("mov", "libx264", _X264, "aac", _MP4_AUDIO),
    ".mkv": ("matroska", "libx264", _X264, "aac", _MP4_AUDIO + ("opus", "vorbis", "flac", "pcm_s16le")),
    ".webm": ("webm", "libvpx-vp9", {"b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}, "libopus",
              ("opus", "vorbis")),
}
VIDEO_SUFFIXES = tuple(VIDEO_FORMATS)
