"""SAM2 propagation on a tiny random-weight SAM2.1 (hiera tiny config, 128 px input): every prompt kind runs,
shapes/dtypes, several objects, backward tracking, state immutability, exact memory pruning, checkpoint
loading (.safetensors/.pt, size/version inference), engine selection and bad input."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sam2", reason="the sam2 package is not installed (see README: SAM2 install step)")

from ffprop.nodes.masks import propagate as prop  # noqa: E402
from ffprop.nodes.masks.prompts import parse_prompts  # noqa: E402
from ffprop.nodes.masks.propagate import key_masks_from, propagate_masks, track_sam2  # noqa: E402
from ffprop.nodes.masks.sam2_model import (  # noqa: E402
    SAM2Model,
    SAM2Spec,
    build_model,
    find_checkpoint,
    infer_spec,
    load_sam2,
    random_checkpoint,
    read_checkpoint,
)
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

T, H, W = 6, 48, 80
SIZE = 128          # the model's input size: the smallest the config runs at, so each run takes about a second


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads spin-waiting on each other made
    these runs about 7x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> SAM2Model:
    return SAM2Model(build_model(SAM2Spec("tiny", "2.1", SIZE), None, "cpu", seed=0), SAM2Spec("tiny", "2.1", SIZE))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return synthetic_clip(T, H, W, seed=1).source


def prompts(*items, t=T, h=H, w=W):
    return parse_prompts(json.dumps({"version": 1, "prompts": list(items)}), t, h, w)


def square(h=H, w=W, x0=20, y0=10, x1=44, y1=34):
    m = torch.zeros(1, h, w)
    m[0, y0:y1, x0:x1] = 1
    return m


def check_result(r, n_obj, t=T):
    assert r.mask.shape == (t, H, W) and r.mask.dtype == torch.float32 and r.mask.device.type == "cpu"
    assert r.objects.shape == (n_obj, t, H, W)
    assert set(r.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(r.mask, r.objects.amax(0))
    assert r.engine == "sam2"


@pytest.mark.parametrize("item", [
    {"frame": 0, "object": 1, "points": [[30, 20, 1]]},
    {"frame": 0, "object": 1, "points": [[30, 20, 1], [70, 40, 0]]},
    {"frame": 0, "object": 1, "boxes": [[10, 5, 50, 40]]},
    {"frame": 0, "object": 1, "points": [[30, 20, 1]], "boxes": [[10, 5, 50, 40]]},
])
def test_point_and_box_prompts_run(model, clip, item):
    check_result(propagate_masks(clip, prompts(item), model=model, engine="sam2"), 1)


def test_mask_prompt_is_kept_on_its_keyframe(model, clip):
    # SAM2 feeds an input mask straight through on its frame (use_mask_input_as_output_without_sam)
    m = square()
    r = propagate_masks(clip, None, m, 0, model, "sam2")
    check_result(r, 1)
    iou = (r.mask[0] * m[0]).sum() / torch.maximum(r.mask[0], m[0]).sum()
    assert iou > 0.9, f"keyframe mask IoU {iou:.3f}"


def test_multi_object_and_mixed_prompts(model, clip):
    p = prompts({"frame": 0, "object": 2, "points": [[60, 30, 1]]}, {"frame": 2, "object": 5, "boxes": [[5, 5, 30, 30]]})
    r = propagate_masks(clip, p, square(), 0, model, "sam2")      # mask = object 1
    check_result(r, 3)
    assert r.object_ids == (1, 2, 5)


def test_backward_from_last_frame_visits_every_earlier_frame(model, clip):
    km = key_masks_from(square(), T - 1, clip, None)
    frames = [f for f, _, _ in track_sam2(model, clip, (), km, "backward")]
    assert frames == list(range(T - 1, -1, -1))
    frames = [f for f, _, _ in track_sam2(model, clip, (), km, "both")]
    assert frames == [T - 1] + list(range(T - 1, -1, -1))          # forward pass is just the keyframe
    fwd = propagate_masks(clip, None, square(), T - 1, model, "sam2", "forward")
    assert fwd.mask[:T - 1].sum() == 0 and fwd.mask[T - 1].sum() > 0


def test_keyframe_in_the_middle_both_ways(model, clip):
    frames = [f for f, _, _ in track_sam2(model, clip, prompts({"frame": 3, "object": 1, "points": [[30, 20, 1]]}).entries)]
    assert sorted(set(frames)) == list(range(T)) and frames[:T - 3] == list(range(3, T))


def test_state_is_not_kept_between_runs(model, clip):
    p = prompts({"frame": 0, "object": 1, "points": [[30, 20, 1]]}, {"frame": 0, "object": 2, "boxes": [[40, 5, 70, 40]]})
    before = json.dumps([e.__dict__ for e in p.entries], default=list)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    a = propagate_masks(clip, p, model=model, engine="sam2")
    propagate_masks(clip.flip(0), None, square(), 2, model, "sam2")          # another run in between
    b = propagate_masks(clip, p, model=model, engine="sam2")
    assert torch.equal(a.objects, b.objects)
    assert json.dumps([e.__dict__ for e in p.entries], default=list) == before
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in weights.items())


def test_half_precision_images(model, clip):
    r = propagate_masks(clip.half(), None, square(), 0, model, "sam2")
    check_result(r, 1)


def test_memory_pruning_is_exact_and_bounded(model, monkeypatch):
    """With a short memory window, outputs are dropped as tracking moves on, and the masks are bit-identical to
    a run that keeps everything."""
    t = 16
    clip = synthetic_clip(t, H, W, seed=2).source
    entries = prompts({"frame": 3, "object": 1, "points": [[30, 20, 1]]}, t=t).entries
    sizes = []
    real_prune = prop._prune

    def spy(state, current, reverse, window, keyframes):
        real_prune(state, current, reverse, window, keyframes)
        sizes.append(sum(len(o["non_cond_frame_outputs"]) for o in state["output_dict_per_obj"].values()))

    monkeypatch.setattr(model.module, "num_maskmem", 3)                     # window = max(3, 2) + 1 = 4 frames
    monkeypatch.setattr(model.module, "max_obj_ptrs_in_encoder", 2)
    monkeypatch.setattr(prop, "_prune", spy)
    pruned = [(f, m) for f, _, m in track_sam2(model, clip, entries, prune=True)]
    full = [(f, m) for f, _, m in track_sam2(model, clip, entries, prune=False)]
    assert [f for f, _ in pruned] == [f for f, _ in full] == [*range(3, t), *range(3, -1, -1)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(pruned, full))
    # the forward pass makes 12 outputs (frames 4..15); kept: frames 4..7 (next to the keyframe) + the last 4-5
    assert max(sizes) <= 9, sizes


def test_prune_drops_only_far_frames():
    state = {"output_dict_per_obj": {0: {"non_cond_frame_outputs": {i: i for i in range(40)}}}}
    prop._prune(state, current=39, reverse=False, window=5, keyframes=(0,))
    assert sorted(state["output_dict_per_obj"][0]["non_cond_frame_outputs"]) == [*range(0, 6), *range(34, 40)]
    prop._prune(state, current=0, reverse=True, window=5, keyframes=(0,))
    assert sorted(state["output_dict_per_obj"][0]["non_cond_frame_outputs"]) == list(range(0, 6))


# ---- checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_and_inference(tmp_path, suffix, clip):
    path = random_checkpoint(tmp_path / f"sam2.1_hiera_tiny{suffix}", "tiny", "2.1", seed=3)
    loaded = load_sam2(path, image_size=SIZE)
    assert loaded.spec == SAM2Spec("tiny", "2.1", SIZE)
    ref = build_model(SAM2Spec("tiny", "2.1", SIZE), None, "cpu", seed=3).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.module.state_dict().items())
    check_result(propagate_masks(clip, None, square(), 0, loaded, "sam2"), 1)


def test_version_20_is_inferred(tmp_path):
    path = random_checkpoint(tmp_path / "sam2_hiera_tiny.safetensors", "tiny", "2.0")
    assert infer_spec(read_checkpoint(path)).version == "2.0"


@pytest.mark.parametrize("size, dim, blocks", [("tiny", 96, 12), ("small", 96, 16), ("base_plus", 112, 24),
                                               ("large", 144, 48)])
def test_size_inference_from_trunk(size, dim, blocks):
    sd = {f"image_encoder.trunk.blocks.{i}.mlp.layers.0.weight": torch.zeros(1) for i in range(blocks)}
    sd["image_encoder.trunk.patch_embed.proj.weight"] = torch.zeros(dim, 3, 7, 7)
    sd["no_obj_embed_spatial"] = torch.zeros(1, 64)
    assert infer_spec(sd) == SAM2Spec(size, "2.1")


def test_unknown_and_missing_checkpoints(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "wan.safetensors"))
    with pytest.raises(ValueError, match="not a SAM2 checkpoint"):
        read_checkpoint(tmp_path / "wan.safetensors")
    (tmp_path / "bad.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension"):
        read_checkpoint(tmp_path / "bad.ckpt")
    torch.save({"model": {"a": object()}}, tmp_path / "pickle.pt")               # needs full unpickling
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    sd = {"image_encoder.trunk.blocks.0.x": torch.zeros(1), "image_encoder.trunk.patch_embed.proj.weight": torch.zeros(80, 3)}
    with pytest.raises(ValueError, match="unknown SAM2 trunk"):
        infer_spec(sd)
    with pytest.raises(ValueError, match="sam2.1_hiera_tiny.safetensors.*models/sam2"):
        find_checkpoint(["readme.txt"], "auto")
    with pytest.raises(ValueError, match="not in models/sam2"):
        find_checkpoint(["sam2.1_hiera_tiny.pt"], "sam2_hiera_large.pt")
    assert find_checkpoint(["sam2_hiera_large.pt", "sam2.1_hiera_tiny.pt", "sam2.1_hiera_large.safetensors"],
                           "auto") == "sam2.1_hiera_large.safetensors"


# ---- engine selection and bad input ------------------------------------------------------------------------

def test_auto_without_model_falls_back_to_flow(clip):
    r = propagate_masks(clip, None, square(), 0, None, "auto", model_error="no checkpoint in models/sam2")
    assert r.engine == "flow" and "no checkpoint" in r.notes[0]
    assert r.mask.shape == (T, H, W) and r.mask[0].sum() == square().sum()


def test_flow_segments_points_and_sam2_needs_a_model(clip):
    """Without SAM2 the flow engine segments clicks itself (GrabCut, tests/core/test_masks_grabcut.py); before, a
    points-only prompt raised "points alone need SAM2"."""
    r = propagate_masks(clip, prompts({"frame": 0, "object": 1, "points": [[30, 20, 1]]}), engine="flow")
    assert r.engine == "flow" and r.mask[0, 20, 30] == 1 and r.mask[0].mean() < 0.5
    r = propagate_masks(clip, prompts({"frame": 0, "object": 1, "boxes": [[20, 10, 44, 34]]}), engine="flow")
    assert r.mask[0].sum() > 0 and r.mask[0].sum() == r.mask[0, 10:34, 20:44].sum()      # inside its box
    with pytest.raises(ValueError, match="needs a SAM2 model"):
        propagate_masks(clip, None, square(), engine="sam2")


def test_bad_input(model, clip):
    with pytest.raises(ValueError, match="no prompts"):
        propagate_masks(clip, prompts(), model=model)
    with pytest.raises(ValueError, match="no prompts"):
        propagate_masks(clip, None, None, model=model)
    with pytest.raises(ValueError, match="80x48"):
        propagate_masks(clip, None, square(h=40, w=80), 0, model)
    with pytest.raises(ValueError, match="out of range"):
        propagate_masks(clip, None, square(), T, model)
    with pytest.raises(ValueError, match="were made for 6 frames of 160x96"):
        propagate_masks(clip, prompts({"frame": 0, "points": [[1, 1, 1]]}, h=96, w=160), model=model)
    with pytest.raises(ValueError, match="empty"):
        propagate_masks(clip, None, torch.zeros(1, H, W), 0, model)
    with pytest.raises(ValueError, match="both a mask and point"):
        propagate_masks(clip, prompts({"frame": 0, "object": 1, "points": [[1, 1, 1]]}), square(), 0, model)
    with pytest.raises(ValueError, match="one box per"):
        propagate_masks(clip, prompts({"frame": 0, "object": 1, "boxes": [[1, 1, 9, 9], [20, 20, 30, 30]]}), model=model)


@pytest.mark.parametrize("engine", ["sam2", "flow"])
def test_progress_and_cancel(model, clip, engine):
    from ffprop.nodes.common import Cancelled

    steps = []
    r = propagate_masks(clip, None, square(), 2, model, engine, "both", on_step=lambda i, n, p=None: steps.append((i, n)))
    assert r.engine == engine and steps[-1][0] == steps[-1][1] and len(steps) >= 2
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(Cancelled):
        propagate_masks(clip, None, square(), 0, model, engine, should_stop=stop)
