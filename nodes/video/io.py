"""Video, image and mask files: read with PyAV/PIL, write atomically (nodes.common.atomic_write)."""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
from PIL import Image

from ..common import atomic_write
from .formats import IMAGE_SUFFIXES, VIDEO_FORMATS, VIDEO_SUFFIXES
from .frames import check_video, from_uint8, to_uint8

# Muxers write no dates, random segment ids or library versions: the same frames give the same file bytes.
BITEXACT = {"fflags": "+bitexact"}
STILL_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "jpegls_pipe")


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """A video file (mp4/webm/mov/...) or a folder of image frames -> (IMAGE [T, H, W, 3], fps).

    A folder has no frame rate; it reads as 25 fps. A still image is refused (it is not a clip)."""
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1; got {max_frames}.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not files:
            raise ValueError(f"no image frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder '{path}'.")
        return torch.stack([read_image(p) for p in files]), 25.0
    if not path.is_file():
        raise ValueError(f"video file '{path}' does not exist.")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"'{path}' is a still image, not a video. Give a video file (mp4, webm, mov, mkv) or a "
                         "folder of numbered frames.")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if container.format.name in STILL_IMAGE_FORMATS:
                raise ValueError(f"'{path}' is a still image ({container.format.name}), not a video. Give a video "
                                 "file (mp4, webm, mov, mkv) or a folder of numbered frames.")
            if not container.streams.video:
                raise ValueError(f"'{path}' has no video stream.")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video '{path}': {e}. Is it a video file (mp4, webm, mov, mkv)?") from e
    if not frames:
        raise ValueError(f"video '{path}' has no decodable frames.")
    return from_uint8(np.stack(frames)), float(rate)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> IMAGE frame [H, W, 3] (alpha composited over black, greyscale expanded)."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ValueError(f"image file '{path}' does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"'{path}' is a folder; give an image file (png/jpg).") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image '{path}': {e}. Use a PNG/JPEG/WebP file.") from e
    return from_uint8(rgb)


def read_mask(path: str | os.PathLike, threshold: float = 0.5) -> torch.Tensor:
    """A mask image, mask video or folder of mask images -> MASK [T, H, W] in {0, 1} (white = edit region)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        frames = read_image(p)[None]
    else:
        frames = read_video(p)[0]
    return (frames.mean(-1) > threshold).float()


def encoded_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) write_video stores for frames of height x width: 4:2:0 video needs even sizes, so
    an odd side grows by one pixel (the last row/column repeated)."""
    return height + height % 2, width + width % 2


def audio_codec(path: str | os.PathLike) -> str | None:
    """Name of the first audio stream's codec in a video file; None for no audio (or a folder of frames)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with av.open(str(path)) as container:
            return container.streams.audio[0].codec_context.name if container.streams.audio else None
    except av.error.FFmpegError:
        return None


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, crf: int = 17,
                audio_from: str | os.PathLike | None = None) -> Path:
    """Write IMAGE [T, H, W, 3] atomically as .mp4/.mov/.mkv (H.264) or .webm (VP9), yuv420p, by suffix.

    Odd sizes are padded to even (see encoded_size). audio_from: a video file whose first audio stream is kept
    for the written clip's duration (T / fps; copied when the container takes its codec, else re-encoded)."""
    check_video(frames, "frames to write")
    path = Path(path)
    if path.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"cannot write video '{path}': the name must end in {', '.join(VIDEO_SUFFIXES)}.")
    fmt, codec, options, audio_encoder, audio_copy = VIDEO_FORMATS[path.suffix.lower()]
    data = to_uint8(frames)
    t, h, w, _ = data.shape
    eh, ew = encoded_size(h, w)
    if (eh, ew) != (h, w):
        data = np.pad(data, ((0, 0), (0, eh - h), (0, ew - w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    has_audio = audio_from is not None and audio_codec(audio_from) is not None
    with atomic_write(path) as tmp, av.open(str(tmp), mode="w", format=fmt, options=BITEXACT) as container, \
            (av.open(str(audio_from)) if has_audio else contextlib.nullcontext()) as src:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = ew, eh
        stream.pix_fmt = "yuv420p"
        stream.options = {**options, "crf": str(crf if codec == "libx264" else crf + 7)}
        mux_audio = _audio_muxer(container, src, t / fps, audio_encoder, audio_copy) if has_audio else None
        for frame in data:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if mux_audio is not None:
            mux_audio()
    return path


def _audio_muxer(container, src, duration: float, encoder: str, copyable: tuple[str, ...]) -> Callable[[], None]:
    """Add an audio stream for src's first audio stream to `container` now (before anything is muxed) and return
    the function that muxes its first `duration` seconds, timed from src's first video frame: packets copied
    when the container takes the codec, else decoded and re-encoded with `encoder`."""
    a = src.streams.audio[0]
    v = src.streams.video[0] if src.streams.video else None
    start = v.start_time * v.time_base if v is not None and v.start_time is not None else 0
    if a.codec_context.name in copyable:
        out = container.add_stream_from_template(a)
        shift = round(start / a.time_base)

        def copy() -> None:
            for packet in src.demux(a):
                if packet.pts is None or not 0 <= (packet.pts - shift) * a.time_base < duration:
                    continue
                dts = packet.dts if packet.dts is not None else packet.pts
                packet.pts, packet.dts, packet.stream = packet.pts - shift, dts - shift, out
                container.mux(packet)
        return copy
    out = container.add_stream(encoder, rate=48000 if encoder == "libopus" else a.codec_context.sample_rate)

    def encode() -> None:
        for frame in src.decode(a):
            if frame.time is not None and 0 <= frame.time - start < duration:
                frame.pts = None
                container.mux(out.encode(frame))
        container.mux(out.encode())
    return encode


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write one IMAGE frame [H, W, 3] (or [1, H, W, 3]) as PNG/JPEG by suffix, atomically."""
    path = Path(path)
    if image.ndim == 4:
        image = image[0]
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path
