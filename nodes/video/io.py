"""Video, image and mask files: read with PyAV/PIL, write atomically (temp name, then rename)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from ..common import atomic_write
from .frames import check_video, from_uint8, to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """A video file (mp4/webm/mov/...) or a folder of image frames -> (IMAGE [T, H, W, 3], fps).

    A folder has no frame rate; it reads as 25 fps."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not files:
            raise ValueError(f"no image frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder '{path}'.")
        return torch.stack([read_image(p) for p in files]), 25.0
    if not path.is_file():
        raise ValueError(f"video file '{path}' does not exist.")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
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


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, crf: int = 17) -> Path:
    """Write IMAGE [T, H, W, 3] as H.264 mp4 (yuv420p; odd sizes padded by one edge pixel) atomically."""
    check_video(frames, "frames to write")
    path = Path(path)
    data = to_uint8(frames)
    t, h, w, _ = data.shape
    if h % 2 or w % 2:
        data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_write(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = data.shape[2], data.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in data:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write one IMAGE frame [H, W, 3] (or [1, H, W, 3]) as PNG/JPEG by suffix, atomically."""
    path = Path(path)
    if image.ndim == 4:
        image = image[0]
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path
