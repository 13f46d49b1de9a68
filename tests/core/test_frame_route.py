"""The /ffprop/frame route's logic (nodes/masks/routes.py) without ComfyUI: path confinement, frame decoding,
errors. The HTTP layer itself is exercised against the real server in tests/e2e/test_web_editor.py."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from ffprop.nodes.masks import routes
from ffprop.nodes.masks.routes import FrameRequestError, frame_response, read_frame, resolve_media_path
from ffprop.nodes.video.frames import to_uint8
from ffprop.nodes.video.io import read_video, write_image, write_video
from PIL import Image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    dirs = {k: root / k for k in ("input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(7, 48, 80, 3, generator=g)
    clip[:, :, :, 0] = torch.arange(7).view(7, 1, 1) / 6  # red channel encodes the frame index
    write_video(dirs["input"] / "clip.mp4", clip, fps=8)
    (dirs["input"] / "sub").mkdir()
    write_video(dirs["input"] / "sub" / "nested.mp4", clip[:3], fps=8)
    write_image(dirs["input"] / "still.png", clip[2])
    write_image(dirs["output"] / "out.png", clip[4])
    (dirs["input"] / "garbage.mp4").write_bytes(b"not a video at all" * 10)
    (root / "secret.mp4").write_bytes(b"outside")
    return {k: str(v) for k, v in dirs.items()}


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(FrameRequestError) as e:
        fn(*args)
    return e.value.status, str(e.value)


def test_every_frame_matches_the_full_decode(folders):
    full, _ = read_video(os.path.join(folders["input"], "clip.mp4"))
    expected = to_uint8(full)
    for k in range(full.shape[0]):
        frame, count = read_frame(os.path.join(folders["input"], "clip.mp4"), k)
        assert frame.dtype == np.uint8 and frame.shape == (48, 80, 3)
        np.testing.assert_array_equal(frame, expected[k])
        assert count in (None, 7)


def test_frame_out_of_range_names_the_count(folders):
    status, msg = status_of(read_frame, os.path.join(folders["input"], "clip.mp4"), 7)
    assert status == 400 and "7 frame(s) (0..6)" in msg
    status, msg = status_of(read_frame, os.path.join(folders["input"], "still.png"), 1)
    assert status == 400 and "1 frame(s)" in msg
    status, _ = status_of(read_frame, os.path.join(folders["input"], "clip.mp4"), -1)
    assert status == 400


def test_undecodable_file_is_415(folders):
    status, msg = status_of(read_frame, os.path.join(folders["input"], "garbage.mp4"), 0)
    assert status == 415 and "garbage.mp4" in msg


@pytest.mark.parametrize("filename, subfolder", [
    ("../secret.mp4", ""), ("secret.mp4", ".."), ("sub/../../secret.mp4", ""), ("/etc/passwd", ""),
    ("clip.mp4", "/tmp"),
])
def test_paths_outside_the_folder_are_refused(folders, filename, subfolder):
    status, _ = status_of(resolve_media_path, folders["input"], filename, subfolder)
    assert status == 403


def test_symlink_escaping_the_folder_is_refused(folders, tmp_path):
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    link = os.path.join(folders["input"], "link.mp4")
    os.symlink(outside, link)
    try:
        status, _ = status_of(resolve_media_path, folders["input"], "link.mp4", "")
        assert status == 403
    finally:
        os.unlink(link)


def test_missing_and_empty_names(folders):
    assert status_of(resolve_media_path, folders["input"], "nope.mp4", "")[0] == 404
    assert status_of(resolve_media_path, folders["input"], "", "")[0] == 400
    assert status_of(resolve_media_path, folders["input"], "a\x00b", "")[0] == 400


def test_subfolders_inside_the_folder_are_served(folders):
    a = resolve_media_path(folders["input"], "sub/nested.mp4")
    b = resolve_media_path(folders["input"], "nested.mp4", "sub")
    assert a == b and a.is_file()


def test_frame_response_png_headers_and_folder_types(folders):
    body, headers = frame_response({"filename": "clip.mp4", "type": "input", "frame": "3"}, folders)
    png = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    np.testing.assert_array_equal(png, read_frame(os.path.join(folders["input"], "clip.mp4"), 3)[0])
    assert headers["X-FFP-Frame"] == "3" and headers["X-FFP-Width"] == "80" and headers["X-FFP-Height"] == "48"
    # ComfyUI's annotated names pick the folder; so does type=output
    body, _ = frame_response({"filename": "out.png [output]"}, folders)
    assert Image.open(io.BytesIO(body)).size == (80, 48)
    body2, _ = frame_response({"filename": "out.png", "type": "output", "frame": "0"}, folders)
    assert body == body2
    assert status_of(frame_response, {"filename": "clip.mp4", "type": "models"}, folders)[0] == 400
    assert status_of(frame_response, {"filename": "clip.mp4", "frame": "two"}, folders)[0] == 400
    assert status_of(frame_response, {"filename": "out.png"}, folders)[0] == 404  # default type is input


def test_no_routes_outside_comfyui():
    assert routes.register_routes() is False
