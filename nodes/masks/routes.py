"""HTTP routes for the mask prompt editor (web/js/ffp_prompt_editor.js). ComfyUI-only module (layering rule).

GET /ffprop/frame?filename=clip.mp4&type=input&subfolder=&frame=N
    -> image/png of frame N (0-based) of a video or image in ComfyUI's input (or output/temp) folder, so the editor
       can show the frame before the graph has run. Headers: X-FFP-Frame, X-FFP-Width, X-FFP-Height and, when the
       container states it, X-FFP-Frame-Count. Errors are 4xx with a JSON body {"error": "<what, numbers, fix>"}:
       400 bad parameter or frame out of range, 403 a path escaping the folder, 404 no such file, 415 not decodable,
       503 (with Retry-After) when MAX_DECODES frames are being decoded already. Messages name only what the
       request gave (file name, folder type), never a server path.
    A video frame is decoded onward from where the previous request of the same file stopped (its decoder is
    kept open, 2 files at most) when it lies ahead; else from the nearest keyframe before it (a seek) where the
    stream's timestamps give exact frame numbers (constant frame rate); else from the start.

The path and decode logic below is plain Python (PIL/PyAV, no ComfyUI) and is tested in tests/core; only
`register_routes()` touches ComfyUI, and only when ComfyUI's server module is already loaded with a running
PromptServer (so importing this module in a plain process or in the nodes test tier registers nothing).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import sys
import threading
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image, ImageSequence

from ..common import log, log_once
from ..video.frames import to_uint8
from ..video.io import IMAGE_SUFFIXES

ROUTE_FRAME = "/ffprop/frame"
FOLDER_TYPES = ("input", "output", "temp")
ANIMATED_SUFFIXES = {".gif", ".webp", ".apng", ".png"}
MAX_DECODES = 2             # frame decodes at once; more requests wait up to BUSY_WAIT_S, then get a 503
BUSY_WAIT_S = 2.0
_DECODE_SLOTS = threading.BoundedSemaphore(MAX_DECODES)


class FrameRequestError(ValueError):
    """A request the route answers with a 4xx/5xx status, this message and these extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def resolve_media_path(base_dir: str | os.PathLike, filename: str, subfolder: str = "", folder: str = "input") -> Path:
    """`base_dir/subfolder/filename` as a real path that must stay inside base_dir (symlinks resolved).

    filename may carry a sub-path ("clips/a.mp4", as some loaders list files); folder: the folder's type as the
    request named it (messages say "the input folder", never base_dir). Raises FrameRequestError 400 for an
    empty or malformed name, 403 when the result escapes base_dir, 404 when it is not a file."""
    if not filename or "\x00" in filename or "\x00" in subfolder:
        raise FrameRequestError(400, "filename is empty or malformed; pass the file name the loader node shows.")
    if os.path.isabs(filename) or os.path.isabs(subfolder):
        raise FrameRequestError(403, f"absolute paths are not served ('{subfolder or filename}'); "
                                     "use a file name relative to ComfyUI's input folder.")
    base = Path(base_dir).resolve()
    target = (base / subfolder / filename).resolve()
    if os.path.commonpath([str(base), str(target)]) != str(base):
        raise FrameRequestError(403, f"'{os.path.join(subfolder, filename)}' points outside the {folder} folder; "
                                     "only files inside it are served.")
    if not target.is_file():
        raise FrameRequestError(404, f"no file '{os.path.join(subfolder, filename)}' in ComfyUI's {folder} folder. "
                                     "Upload or copy it there, or pick another file in the loader node.")
    return target


def _why(error: Exception, path: Path) -> str:
    """A decoder's reason without the server path it may quote (FFmpeg and PIL name the file)."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return str(text).replace(str(path), path.name)


def read_frame(path: str | os.PathLike, index: int) -> tuple[np.ndarray, int | None]:
    """Frame `index` (0-based) of a video or image file -> (uint8 RGB [H, W, 3], frame count or None if unknown).

    Videos are decoded with PyAV by video_frame (onward from the last request, or from the keyframe before the
    frame), holding one frame at a time (bounded memory); images (and animated GIF/WebP/APNG) with PIL. Raises
    FrameRequestError 400 when index is out of range (giving the count), 415 when the file cannot be decoded."""
    path = Path(path)
    if index < 0:
        raise FrameRequestError(400, f"frame must be >= 0, got {index}.")
    if path.suffix.lower() in IMAGE_SUFFIXES | ANIMATED_SUFFIXES:
        return _read_image_frame(path, index)
    frame, stated, _ = video_frame(path, index)
    return frame, stated


class _Decoder:
    """An open video: `frames` yields its frames in order, `next_index` is the number of the one it yields next."""

    def __init__(self, path: Path):
        self.container = av.open(str(path))
        if not self.container.streams.video:
            self.container.close()
            raise FrameRequestError(415, f"'{path.name}' has no video stream.")
        self.stream = self.container.streams.video[0]
        self.stated = int(self.stream.frames or 0) or None  # container metadata; may be absent (0) or approximate
        self.frames, self.next_index = self.container.decode(self.stream), 0

    def close(self) -> None:
        self.container.close()


_OPEN: OrderedDict[tuple, _Decoder] = OrderedDict()   # (path, mtime, size) -> decoder left after the last frame
_OPEN_KEEP = 2
_OPEN_LOCK = threading.Lock()


def _take(key: tuple) -> _Decoder | None:
    with _OPEN_LOCK:
        return _OPEN.pop(key, None)


def _keep(key: tuple, decoder: _Decoder) -> None:
    """Keep decoder for the next request of the same file (the editor steps through frames); at most _OPEN_KEEP."""
    with _OPEN_LOCK:
        old = _OPEN.pop(key, None)
        _OPEN[key] = decoder
        dropped = [old] if old is not None else []
        while len(_OPEN) > _OPEN_KEEP:
            dropped.append(_OPEN.popitem(last=False)[1])
    for d in dropped:
        d.close()


def video_frame(path: Path, index: int) -> tuple[np.ndarray, int | None, int]:
    """Frame `index` of a video -> (uint8 RGB [H, W, 3], stated frame count or None, frames decoded for it).

    Continues the decoder the previous request of this file left open when the frame lies ahead of it; else
    seeks to the keyframe before the frame (timestamp-exact streams); else decodes from the start."""
    try:
        st = path.stat()
    except OSError:
        raise FrameRequestError(404, f"no file '{path.name}'.") from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    decoder = _take(key)
    try:
        if decoder is not None and decoder.next_index > index:
            decoder.close()
            decoder = None
        if decoder is None and index > 0:
            decoder = _Decoder(path)
            found = _seek_decode(decoder, index)
            if found is not None:
                _keep(key, decoder)
                return _frame_rgb(path, found[0], decoder.stream), decoder.stated, found[1]
            decoder.close()                           # no exact timestamps: from the start, counting frames
            decoder = None
        decoder = decoder or _Decoder(path)
        decoded = 0
        for frame in decoder.frames:
            k, decoder.next_index, decoded = decoder.next_index, decoder.next_index + 1, decoded + 1
            if k == index:
                _keep(key, decoder)
                return _frame_rgb(path, frame, decoder.stream), decoder.stated, decoded
        count = decoder.next_index
        decoder.close()
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        if decoder is not None:
            decoder.close()
        raise FrameRequestError(415, f"cannot decode '{path.name}' ({_why(e, path)}); use a video (mp4, webm, "
                                     "mov, mkv) or an image (png, jpg, webp).") from e
    if count == 0:
        raise FrameRequestError(415, f"'{path.name}' has no decodable frames.")
    raise FrameRequestError(400, _out_of_range(path, index, count))


def _seek_decode(decoder: _Decoder, index: int) -> tuple["av.VideoFrame", int] | None:
    """(frame `index`, frames decoded) after a seek to the keyframe at or before it, numbering frames by their
    timestamps (frame k at start + k / fps). None where that numbering is not exact: no frame rate or time
    base, a timestamp between two frame slots, or the seek landing after the frame."""
    stream = decoder.stream
    rate, base = stream.average_rate, stream.time_base
    if not rate or not base:
        return None
    start, decoded = stream.start_time or 0, 0
    try:
        decoder.container.seek(start + int(Fraction(index) / (rate * base)), stream=stream, backward=True,
                               any_frame=False)
        decoder.frames = decoder.container.decode(stream)
        for frame in decoder.frames:
            decoded += 1
            k = None if frame.pts is None else (frame.pts - start) * base * rate
            if k is None or abs(k - round(k)) > Fraction(1, 4) or round(k) > index:
                return None
            if round(k) == index:
                decoder.next_index = index + 1
                return frame, decoded
    except av.error.FFmpegError:                      # a stream that cannot seek: the caller decodes from the start
        return None
    return None


# Set by register_routes() inside ComfyUI: the host's own decode of one video frame (see host_frame_decoder).
HOST_FRAME_DECODER: Callable[[Path, "av.VideoFrame", "av.video.stream.VideoStream"], np.ndarray] | None = None


def _frame_rgb(path: Path, frame, stream) -> np.ndarray:
    """A decoded frame as the node will see it: the host's LoadVideo decode where known, else PyAV rgb24."""
    if HOST_FRAME_DECODER is not None and frame.pts is not None:
        return HOST_FRAME_DECODER(path, frame, stream)
    return frame.to_ndarray(format="rgb24")


def host_frame_decoder() -> Callable | None:
    """ComfyUI's LoadVideo decode (comfy_api VideoFromFile) of the one frame PyAV just decoded, where the host can
    decode a time window (VideoFromFile(start_time=, duration=), ComfyUI 0.28); None where it cannot (0.3.64,
    whose LoadVideo decodes `to_ndarray("rgb24")` exactly as `_frame_rgb` does).

    Why: 0.28 decodes 8-bit YUV through float RGB (gbrpf32le: interpolated chroma, rotation metadata applied),
    which differs from PyAV's rgb24 (chroma replicated per 2x2 block) by up to ~80 levels at colour edges, so
    the editor would show another image than the one the node gets."""
    try:
        from comfy_api.latest import InputImpl
    except ImportError:
        return None
    video_cls = getattr(InputImpl, "VideoFromFile", None)
    if video_cls is None or "start_time" not in inspect.signature(video_cls).parameters:
        return None

    def decode(path: Path, frame, stream) -> np.ndarray:
        step = frame.duration * stream.time_base if getattr(frame, "duration", None) else 1 / (stream.average_rate or Fraction(25))
        images = video_cls(str(path), start_time=float(frame.pts * stream.time_base),
                           duration=float(step) / 2).get_components().images
        if images.shape[0] != 1:  # a window the host decodes otherwise (odd timestamps): PyAV's frame, said so
            log_once("routes-host-decode", "FFP masks: ComfyUI decoded %d frame(s) around frame pts %s of '%s'; "
                     "the editor shows PyAV's rgb24 decode instead.", images.shape[0], frame.pts, path.name)
            return frame.to_ndarray(format="rgb24")
        return to_uint8(images[0])

    return decode


def _read_image_frame(path: Path, index: int) -> tuple[np.ndarray, int]:
    try:
        with Image.open(path) as im:
            count = int(getattr(im, "n_frames", 1) or 1)
            if index >= count:
                raise FrameRequestError(400, _out_of_range(path, index, count))
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                if i == index:
                    return np.asarray(frame.convert("RGB")), count
    except (OSError, Image.DecompressionBombError) as e:
        raise FrameRequestError(415, f"cannot read image '{path.name}' ({_why(e, path)}); use PNG/JPEG/WebP.") from e
    raise FrameRequestError(400, _out_of_range(path, index, count))


def _out_of_range(path: Path, index: int, count: int) -> str:
    return (f"frame {index} is out of range: '{path.name}' has {count} frame(s) (0..{count - 1}). "
            "Lower the node's frame widget.")


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes (fast compression: this is a preview)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def frame_response(query: dict[str, str], folders: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """Answer one /ffprop/frame query: (PNG bytes, headers). folders maps type -> directory.

    Raises FrameRequestError with the status and message of a 4xx answer."""
    filename = query.get("filename", "")
    kind = query.get("type", "input") or "input"
    # ComfyUI's annotated names ("clip.mp4 [output]") pick the folder themselves.
    for name in FOLDER_TYPES:
        suffix = f" [{name}]"
        if filename.endswith(suffix):
            filename, kind = filename[: -len(suffix)], name
    if kind not in folders:
        raise FrameRequestError(400, f"type must be one of {', '.join(folders)}; got '{kind}'.")
    try:
        index = int(query.get("frame", "0") or 0)
    except ValueError:
        raise FrameRequestError(400, f"frame must be an integer, got '{query.get('frame')}'.") from None
    path = resolve_media_path(folders[kind], filename, query.get("subfolder", "") or "", kind)
    if not _DECODE_SLOTS.acquire(timeout=BUSY_WAIT_S):
        raise FrameRequestError(503, f"busy: {MAX_DECODES} frames are being decoded already; the editor asks again "
                                     "in a moment (or reload the frame).", {"Retry-After": "1"})
    try:
        frame, count = read_frame(path, index)
        body = encode_png(frame)
    finally:
        _DECODE_SLOTS.release()
    headers = {"X-FFP-Frame": str(index), "X-FFP-Width": str(frame.shape[1]), "X-FFP-Height": str(frame.shape[0]),
               "Cache-Control": "no-store"}
    if count is not None:
        headers["X-FFP-Frame-Count"] = str(count)
    return body, headers


def register_routes() -> bool:
    """Add the routes to ComfyUI's running PromptServer. Returns False (and registers nothing) outside ComfyUI."""
    server = sys.modules.get("server")  # ComfyUI's server.py, loaded by main.py before custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        log_once("routes-no-server", "FFP masks: ComfyUI's PromptServer is not running; %s not registered.",
                 ROUTE_FRAME)
        return False
    if getattr(instance, "_ffp_routes_registered", False):
        return True
    import folder_paths
    from aiohttp import web

    global HOST_FRAME_DECODER
    HOST_FRAME_DECODER = host_frame_decoder()

    @instance.routes.get(ROUTE_FRAME)
    async def ffp_frame(request: web.Request) -> web.Response:
        folders = {"input": folder_paths.get_input_directory(), "output": folder_paths.get_output_directory(),
                   "temp": folder_paths.get_temp_directory()}
        try:  # decoding can take a while on long clips: keep the server's event loop free
            body, headers = await asyncio.get_running_loop().run_in_executor(
                None, frame_response, dict(request.rel_url.query), folders)
        except FrameRequestError as e:
            return web.json_response({"error": str(e)}, status=e.status, headers=e.headers)
        return web.Response(body=body, content_type="image/png", headers=headers)

    instance._ffp_routes_registered = True
    log.debug("FFP masks: registered %s", ROUTE_FRAME)
    return True


register_routes()
