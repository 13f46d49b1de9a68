"""The /ffprop/frame route's logic (nodes/masks/routes.py) without ComfyUI: path confinement, frame decoding,
errors. The HTTP layer itself is exercised against the real server in tests/e2e/test_web_editor.py."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from ffprop.nodes.masks import routes
from ffprop.nodes.masks.routes import FrameRequestError, frame_response, read_frame, resolve_media_path, video_frame
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
    (dirs["input"] / "garbage.png").write_bytes(b"not an image either" * 10)
    write_gop_video(dirs["input"] / "gop4.mp4", clip.repeat(4, 1, 1, 1)[:26], gop=4)
    (root / "secret.mp4").write_bytes(b"outside")
    return {k: str(v) for k, v in dirs.items()}


def write_gop_video(path, frames: torch.Tensor, gop: int) -> None:
    """H.264 with a keyframe every `gop` frames and B-frames (what seeking is for)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8, options={"g": str(gop), "keyint_min": str(gop), "bf": "2"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in to_uint8(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


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


def test_seek_from_the_nearest_keyframe_gives_the_same_frames(folders):
    """Every frame equals the sequential decode's, and is reached from its keyframe (at most 4 frames decoded
    with a keyframe every 4 or fewer), not from frame 0."""
    path = os.path.join(folders["input"], "gop4.mp4")
    expected = to_uint8(read_video(path)[0])
    assert expected.shape[0] == 26
    decoded = []
    for k in reversed(range(26)):                                        # backwards: no decoder to continue
        frame, count, n = video_frame(routes.Path(path), k)
        np.testing.assert_array_equal(frame, expected[k])
        decoded.append(n)
    assert max(decoded) <= 4 and decoded[0] < 26, decoded
    assert status_of(read_frame, path, 26)[0] == 400                  # past the end: still the count


def test_real_clip_frames_match_the_full_decode_and_stepping_decodes_one_frame(shared_data):
    """loraedit 017 has one keyframe: a seek lands on frame 0, but stepping forward continues the decoder the
    previous request left open (1 frame decoded per step); stepping back starts again, with the same frames."""
    path = shared_data / "loraedit_page" / "input" / "017.mp4"
    expected = to_uint8(read_video(path)[0])
    decoded = []
    for k in (20, 21, 22, 30, 48, 5, 6):
        frame, count, n = video_frame(path, k)
        np.testing.assert_array_equal(frame, expected[k])
        assert count == 49
        decoded.append(n)
    assert decoded == [21, 1, 1, 8, 18, 6, 1]


def test_a_replaced_file_is_decoded_afresh(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 6, 32, 48, 3, generator=g)
    path = tmp_path / "v.mp4"
    write_video(path, a, fps=8)
    first = video_frame(path, 2)[0]
    write_video(path, b, fps=8)                                          # same name, new content
    os.utime(path, ns=(1, 1))                                            # even with a clock that did not move on
    np.testing.assert_array_equal(video_frame(path, 3)[0], to_uint8(read_video(path)[0])[3])
    assert not np.array_equal(first, video_frame(path, 2)[0])


@pytest.mark.parametrize("query", [{"filename": "nope.mp4"}, {"filename": "../secret.mp4"},
                                   {"filename": "garbage.mp4"}, {"filename": "garbage.png"},
                                   {"filename": "nope.mp4", "subfolder": "sub"}, {"filename": "clip.mp4", "frame": "99"}])
def test_errors_name_only_what_the_request_gave(folders, query):
    status, msg = status_of(frame_response, query, folders)
    root = os.path.dirname(folders["input"])
    assert status in (400, 403, 404, 415)
    assert root not in msg and folders["input"] not in msg and os.path.realpath(root) not in msg, msg
    assert query["filename"].split("/")[-1] in msg
    if status == 404:
        assert "input folder" in msg


def test_busy_decoder_answers_503_and_frees_its_slots(folders, monkeypatch):
    monkeypatch.setattr(routes, "BUSY_WAIT_S", 0.05)
    held = [routes._DECODE_SLOTS.acquire(blocking=False) for _ in range(routes.MAX_DECODES)]
    try:
        assert all(held)
        with pytest.raises(FrameRequestError) as e:
            frame_response({"filename": "clip.mp4", "frame": "1"}, folders)
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"} and "busy" in str(e.value)
    finally:
        for _ in held:
            routes._DECODE_SLOTS.release()
    for query in ({"filename": "clip.mp4", "frame": "9"}, {"filename": "garbage.mp4"}, {"filename": "clip.mp4"}):
        try:                                                            # errors and answers alike give back the slot
            frame_response(query, folders)
        except FrameRequestError:
            pass
    free = [routes._DECODE_SLOTS.acquire(blocking=False) for _ in range(routes.MAX_DECODES)]
    for ok in free:
        if ok:
            routes._DECODE_SLOTS.release()
    assert all(free)
