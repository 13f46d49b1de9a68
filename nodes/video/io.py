"""Video, image and mask files: read with PyAV/PIL, write atomically (nodes.common.atomic_write)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import cv2
import numpy as np
import torch
from PIL import Image

from ..common import atomic_write, log
from .formats import IMAGE_SUFFIXES, VIDEO_FORMATS, VIDEO_SUFFIXES
from .frames import check_video, from_uint8, to_uint8

# Muxers write no dates, random segment ids or library versions: the same frames give the same file bytes.
BITEXACT = {"fflags": "+bitexact"}
STILL_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "jpegls_pipe")


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """A video file (mp4/webm/mov/...) or a folder of image frames -> (IMAGE [T, H, W, 3], fps).

    A folder has no frame rate; it reads as 25 fps. A still image is refused (it is not a clip). A frame of
    another size than the first is resized to it (logged)."""
    reader = VideoReader(path, max_frames)
    frames = list(reader)
    if not frames:
        raise ValueError(f"video '{path}' has no decodable frames.")
    for note in reader.notes:
        log.info("FFP video: %s", note)
    return from_uint8(np.stack(frames)), reader.fps


class VideoReader:
    """Frame-by-frame decode of a video file or a folder of frames: iterate for uint8 [H, W, 3] frames (one
    in memory at a time). fps; frames: the container's frame count (0 when unknown); notes: frames of
    another size than the first (resized to it). Each iteration decodes from the start."""

    def __init__(self, path: str | os.PathLike, max_frames: int | None = None):
        self.path = Path(path)
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1; got {max_frames}.")
        self.max_frames, self.notes = max_frames, []
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
            if not self.files:
                raise ValueError(f"no image frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder '{self.path}'.")
            self.fps, self.frames = 25.0, len(self.files)
            return
        self.files = None
        if not self.path.is_file():
            raise ValueError(f"video file '{self.path}' does not exist.")
        if self.path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"'{self.path}' is a still image, not a video. Give a video file (mp4, webm, mov, "
                             "mkv) or a folder of numbered frames.")
        with self._open() as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or Fraction(25))
            self.frames = min(int(stream.frames or 0), max_frames or 1 << 62)

    def _open(self):
        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read video '{self.path}': {e}. Is it a video file (mp4, webm, mov, mkv)?") from e
        if container.format.name in STILL_IMAGE_FORMATS:
            container.close()
            raise ValueError(f"'{self.path}' is a still image ({container.format.name}), not a video. Give a "
                             "video file (mp4, webm, mov, mkv) or a folder of numbered frames.")
        if not container.streams.video:
            container.close()
            raise ValueError(f"'{self.path}' has no video stream.")
        return container

    def _decoded(self):
        if self.files is not None:
            for p in self.files:
                yield (read_image(p).numpy() * 255 + 0.5).astype(np.uint8)
            return
        try:
            with self._open() as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for n, frame in enumerate(container.decode(stream)):
                    if self.max_frames is not None and n >= self.max_frames:
                        break
                    yield frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read video '{self.path}': {e}. Is it a video file (mp4, webm, mov, mkv)?") from e

    def __iter__(self) -> Iterator[np.ndarray]:
        size, self.notes = None, []
        for n, frame in enumerate(self._decoded()):
            if size is None:
                size = frame.shape[:2]
            elif frame.shape[:2] != size:
                self.notes.append(f"frame {n + 1} is {frame.shape[1]}x{frame.shape[0]} but the clip is "
                                  f"{size[1]}x{size[0]}: resized to the clip's size")
                frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            yield frame


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
    t, h, w, _ = frames.shape
    with VideoWriter(path, fps, (h, w), crf, audio_from) as writer:
        for i in range(t):
            writer.write(to_uint8(frames[i]))
    return Path(path)


class VideoWriter:
    """Frame-by-frame encode, atomically (the file appears on a clean close): `with VideoWriter(path, fps,
    (h, w)) as out: out.write(uint8 [h, w, 3])`. Same formats, padding and audio as write_video.

    The encoder runs in a worker thread of its own, at most IN_FLIGHT frames behind write() (x264 and the
    muxer release the GIL), so a caller that computes the next frame meanwhile uses the second core; the
    frames are encoded in order by that one thread, so the bytes are those of a same-thread encode. A failure
    in the worker is raised by the next write() or by the close."""

    IN_FLIGHT = 2

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int], crf: int = 17,
                 audio_from: str | os.PathLike | None = None):
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_FORMATS:
            raise ValueError(f"cannot write video '{self.path}': the name must end in {', '.join(VIDEO_SUFFIXES)}.")
        self.fps, self.size, self.crf, self.count = fps, size, crf, 0
        self.audio_from = audio_from if audio_from is not None and audio_codec(audio_from) is not None else None

    def __enter__(self) -> "VideoWriter":
        fmt, codec, options, self._audio_encoder, self._audio_copy = VIDEO_FORMATS[self.path.suffix.lower()]
        self._stack = contextlib.ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_write(self.path))
            self._container = self._stack.enter_context(av.open(str(tmp), mode="w", format=fmt, options=BITEXACT))
            self._src = self._stack.enter_context(av.open(str(self.audio_from))) if self.audio_from else None
            h, w = self.size
            eh, ew = encoded_size(h, w)
            self._pad = ((0, eh - h), (0, ew - w), (0, 0))
            stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
            stream.width, stream.height = ew, eh
            stream.pix_fmt = "yuv420p"
            stream.options = {**options, "crf": str(self.crf if codec == "libx264" else self.crf + 7)}
            self._stream = stream
            self._mux_audio = (_audio_muxer(self._container, self._src, self._audio_encoder, self._audio_copy)
                               if self._src is not None else None)
            self._worker = self._stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ffp-encode"))
            self._pending: deque[Future] = deque()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _encode(self, frame: av.VideoFrame | None) -> None:
        """Encode one frame (None: flush the encoder) and mux its packets; the worker thread's only job."""
        self._container.mux(self._stream.encode(frame))

    def write(self, frame: np.ndarray) -> None:
        """One uint8 frame [h, w, 3] of the size given (copied: the caller may reuse its array at once)."""
        if frame.shape != (*self.size, 3):
            raise ValueError(f"frame {self.count + 1} is {tuple(frame.shape)}; this video is {(*self.size, 3)}.")
        if any(p[1] for p in self._pad):
            frame = np.pad(frame, self._pad, mode="edge")
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        while len(self._pending) >= self.IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._worker.submit(self._encode, picture))
        self.count += 1

    def _drain(self) -> None:
        """Wait for every queued frame; the first failure is raised after all have finished."""
        failure = None
        while self._pending:
            error = self._pending.popleft().exception()
            failure = failure or error
        if failure is not None:
            raise failure

    def __exit__(self, kind, value, tb) -> bool:
        try:
            if kind is None:
                self._drain()
                if self.count == 0:
                    raise ValueError(f"no frames written to '{self.path}'.")
                self._encode(None)
                if self._mux_audio is not None:
                    self._mux_audio(self.count / self.fps)
            else:
                with contextlib.suppress(BaseException):
                    self._drain()          # the file is discarded; the worker must be idle before it closes
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self._stack.__exit__(kind, value, tb)


def _audio_muxer(container, src, encoder: str, copyable: tuple[str, ...]) -> Callable[[float], None]:
    """Add an audio stream for src's first audio stream to `container` now (before anything is muxed) and return
    the function that muxes its first `duration` seconds, timed from src's first video frame: packets copied
    when the container takes the codec, else decoded and re-encoded with `encoder`."""
    a = src.streams.audio[0]
    v = src.streams.video[0] if src.streams.video else None
    start = v.start_time * v.time_base if v is not None and v.start_time is not None else 0
    if a.codec_context.name in copyable:
        out = container.add_stream_from_template(a)
        shift = round(start / a.time_base)

        def copy(duration: float) -> None:
            for packet in src.demux(a):
                if packet.pts is None or not 0 <= (packet.pts - shift) * a.time_base < duration:
                    continue
                dts = packet.dts if packet.dts is not None else packet.pts
                packet.pts, packet.dts, packet.stream = packet.pts - shift, dts - shift, out
                container.mux(packet)
        return copy
    out = container.add_stream(encoder, rate=48000 if encoder == "libopus" else a.codec_context.sample_rate)

    def encode(duration: float) -> None:
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
