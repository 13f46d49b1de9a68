"""RAFT as the flow engine's backend (nodes/flow/raft.py): loading, architecture check, padding, determinism, and
the engine end to end with it. Random weights (no trained RAFT can be downloaded here): these tests check the
plumbing, not flow accuracy; test_trained_raft_tracks_a_translation does that when FFP_RAFT_WEIGHTS names a
real file. Needs torchvision (not in the core env: run with a ComfyUI venv, which has it)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="the RAFT backend needs torchvision (ComfyUI's venv has it; the core "
                                          "env does not)")

from ffprop.nodes.flow.engine import FlowSettings, propagate_edit  # noqa: E402
from ffprop.nodes.flow.raft import RaftFlow, build_raft, detect_arch, load_raft, random_raft  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip, texture  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return random_raft(tmp_path_factory.mktemp("raft") / "raft_small.safetensors", "raft_small", seed=0)


def frames(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [(texture(h, w, rng, 2.0) * 255 + 0.5).astype(np.uint8) for _ in range(2)]


@pytest.mark.parametrize("arch,suffix", [("raft_small", ".safetensors"), ("raft_small", ".pth"),
                                         ("raft_large", ".pth")])
def test_random_file_loads_as_its_architecture_with_the_same_weights(tmp_path, arch, suffix):
    path = random_raft(tmp_path / f"r{suffix}", arch, seed=1)
    model = load_raft(path)
    again = random_raft(tmp_path / f"again{suffix}", arch, seed=1)
    other = random_raft(tmp_path / f"other{suffix}", arch, seed=2)
    sd, sd_again, sd_other = (load_raft(p).state_dict() for p in (path, again, other))
    assert detect_arch(sd) == arch and not model.training
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)                 # seeded: same file twice
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)             # another seed: other weights


def test_files_that_are_not_raft_are_refused_clearly(tmp_path):
    not_raft = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), not_raft)
    with pytest.raises(ValueError, match="not a torchvision RAFT checkpoint: closest is"):
        load_raft(not_raft)
    trimmed = {k: v for k, v in build_raft("raft_small").state_dict().items() if not k.startswith("update_block")}
    torch.save(trimmed, tmp_path / "trimmed.pth")
    with pytest.raises(ValueError, match=r"closest is raft_small, with \d+ keys missing"):
        load_raft(tmp_path / "trimmed.pth")
    with open(tmp_path / "object.pth", "wb") as f:                          # a pickle of an arbitrary object
        pickle.dump({"weights": complex(1, 2), "fn": os.getcwd}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_raft(tmp_path / "object.pth")
    with pytest.raises(ValueError, match="not found"):
        load_raft(tmp_path / "missing.safetensors")


def test_flow_is_hxwx2_float32_finite_and_deterministic_at_any_size(small_file):
    flow = RaftFlow(load_raft(small_file), iters=2)
    for h, w in ((50, 70), (131, 129)):                                     # padded to >= 128, multiples of 8
        a, b = frames(h, w)
        out = flow(a, b)
        assert out.shape == (h, w, 2) and out.dtype == np.float32 and np.isfinite(out).all()
        assert np.array_equal(out, flow(a, b))                               # same call twice
        assert np.array_equal(out, RaftFlow(load_raft(small_file), iters=2)(a, b))  # a fresh load
        grey = flow(a[..., 0], b[..., 0])                                    # the engine passes grey frames
        assert grey.shape == (h, w, 2) and np.isfinite(grey).all()
    same = flow(a, a)                                                        # identity pair: finite (random weights:
    assert np.isfinite(same).all()                                           # near zero needs trained ones)


def test_an_aligned_frame_is_not_resampled(small_file):
    """At a multiple of 8 and >= 128 px there is no padding: the output is the model's own last flow, in its units."""
    model = load_raft(small_file)
    a, b = frames(128, 136, seed=3)
    with torch.inference_mode():
        ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None].float() * (2 / 255) - 1 for x in (a, b))
        direct = model(ta, tb, num_flow_updates=3)[-1][0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(RaftFlow(model, "fp32", iters=3)(a, b), direct)


def test_model_is_not_modified_and_bad_arguments_are_refused(small_file):
    model = load_raft(small_file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flow = RaftFlow(model, iters=1)
    flow(*frames(40, 40))
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert torch.is_grad_enabled() and not model.training
    with pytest.raises(ValueError, match="fp16 RAFT needs a CUDA device"):
        RaftFlow(model, precision="fp16")
    with pytest.raises(ValueError, match="one size"):
        flow(*frames(40, 40)[:1], frames(40, 48)[0])
    with pytest.raises(ValueError, match="uint8"):
        flow(np.zeros((40, 40, 3), np.float32), np.zeros((40, 40, 3), np.float32))


def test_engine_runs_end_to_end_on_the_raft_backend(small_file):
    clip = synthetic_clip(5, 48, 64, seed=2)
    raft, calls = RaftFlow(load_raft(small_file), iters=2), []

    def counted(a, b, init=None):
        calls.append(a.shape)
        return raft(a, b, init)

    mask = clip.mask[:1]
    runs = [propagate_edit(clip.source, clip.edited[0], mask, FlowSettings(flow=counted)) for _ in range(2)]
    out, region = runs[0].video, runs[0].mask
    assert len(calls) == 2 * (clip.source.shape[0] - 1)                      # one chain flow per frame pair
    assert torch.equal(out, runs[1].video) and torch.isfinite(out).all()    # deterministic
    outside = (region == 0)[..., None].expand_as(out)
    assert torch.equal(out[outside], clip.source[outside])                 # untouched outside the edit
    inner = region[0] == 1                                                 # frame 1 is the edit itself
    torch.testing.assert_close(out[0][inner], clip.edited[0][inner], atol=1e-5, rtol=0)


@pytest.mark.skipif(not os.environ.get("FFP_RAFT_WEIGHTS"), reason="set FFP_RAFT_WEIGHTS to a trained torchvision "
                    "RAFT file to check flow accuracy (random weights give arbitrary finite flows)")
def test_trained_raft_tracks_a_translation():
    import cv2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flow = RaftFlow(load_raft(os.environ["FFP_RAFT_WEIGHTS"], device))
    a = frames(200, 240, seed=5)[0]
    b = cv2.warpAffine(a, np.float32([[1, 0, 3.5], [0, 1, -2.0]]), (240, 200), borderMode=cv2.BORDER_REFLECT)
    err = np.abs(flow(a, b)[20:-20, 20:-20] - np.float32([3.5, -2.0]))
    assert np.median(err) < 0.3
