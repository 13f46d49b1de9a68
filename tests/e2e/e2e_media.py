"""Synthetic input files for e2e workflows (`extra.ffprop_ci.files` generators) and output-file checks.

A clip is a moving textured square on a smooth background, so optical flow and propagation have real
motion to follow; the "edit" is the first frame with the square recoloured, the mask is the square.
Needs numpy, Pillow and PyAV (all pack dependencies), no ComfyUI.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

SIZE, FRAMES, FPS = 64, 9, 8
SQUARE = 20


def _square_origin(t: int) -> tuple[int, int]:
    return 8 + 3 * t, 12 + 2 * t  # (y, x): 3 px down, 2 px right per frame


def clip_frames(frames: int = FRAMES, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a textured square moving over a gradient background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg = np.stack([40 + 120 * xx, 60 + 100 * yy, 140 - 60 * xx], -1)
    texture = rng.integers(0, 80, (SQUARE, SQUARE, 1)) + np.array([150, 60, 30])
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        img = bg.copy()
        y, x = _square_origin(t)
        img[y:y + SQUARE, x:x + SQUARE] = texture
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def square_mask(t: int = 0, size: int = SIZE) -> np.ndarray:
    """float [H, W] in 0..1, 1 = the square (the edit region) in frame t."""
    m = np.zeros((size, size), np.float32)
    y, x = _square_origin(t)
    m[y:y + SQUARE, x:x + SQUARE] = 1.0
    return m


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def synthetic_clip_mp4(path: Path) -> Path:
    return write_mp4(path, clip_frames())


def synthetic_edit_png(path: Path) -> Path:
    from PIL import Image

    frame = clip_frames()[0].copy()
    m = square_mask(0) > 0
    frame[m] = frame[m][:, [2, 1, 0]] // 2 + np.array([0, 100, 0], np.uint8)  # recolour: a greenish square
    Image.fromarray(frame).save(path)
    return path


def synthetic_mask_png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray((square_mask(0) * 255).astype(np.uint8)).save(path)
    return path


GENERATORS = {
    "synthetic_clip_mp4": synthetic_clip_mp4,
    "synthetic_edit_png": synthetic_edit_png,
    "synthetic_mask_png": synthetic_mask_png,
}


def make_input_file(input_dir: Path, name: str, generator: str) -> Path:
    if generator not in GENERATORS:
        raise ValueError(f"extra.ffprop_ci.files[{name!r}] names generator {generator!r}; known: {sorted(GENERATORS)}")
    path = Path(input_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return GENERATORS[generator](path)


VIDEO_EXT = {".mp4", ".webm", ".mkv", ".mov", ".avi"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def check_output_file(path: Path) -> str:
    """Open an output file by its kind and return a one-line description; raise AssertionError if invalid."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, f"output {path} is missing or empty"
    ext = path.suffix.lower()
    if ext in VIDEO_EXT:
        import av

        with av.open(str(path)) as c:
            vs = c.streams.video
            assert vs, f"{path.name}: no video stream"
            n, shape = 0, None
            for frame in c.decode(vs[0]):
                n += 1
                shape = (frame.height, frame.width)
        assert n > 0, f"{path.name}: video has no decodable frames"
        return f"{path.name}: video, {n} frames, {shape[1]}x{shape[0]}"
    if ext in IMAGE_EXT:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            im.load()
            return f"{path.name}: image {im.size[0]}x{im.size[1]} {im.mode}, {n} frame(s)"
    if ext == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
        assert keys, f"{path.name}: safetensors file with no tensors"
        return f"{path.name}: safetensors, {len(keys)} tensors"
    if ext == ".json":
        import json

        json.loads(path.read_text())
        return f"{path.name}: json"
    return f"{path.name}: {path.stat().st_size} bytes"
