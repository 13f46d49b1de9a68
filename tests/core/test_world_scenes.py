"""The procedural world: deterministic, paired renders that differ only inside the edit mask, edits that do
what their names say, and clear errors on bad input. Small sizes (32x32, 9 frames) keep it to seconds."""

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from ffprop.nodes.world.scenes import (
    EDITS,
    HELDOUT_SEEDS,
    SPEED_K,
    TRAIN_SEEDS,
    edit_scene,
    make_scene,
    render_clip,
    render_sample,
    render_scene,
)

SIZE, FRAMES = (32, 32), 9
SEEDS = (1_000_000, 1_000_001, 1_000_002)


def _digest(seed: int, edit: str) -> str:
    s = render_sample(seed, edit, size=SIZE, frames=FRAMES)
    h = hashlib.sha256()
    for t in (s.source, s.edited_first, s.target, s.edit_mask, s.object_masks):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_also_in_another_process_with_another_hash_seed():
    here = _digest(7, "shape_swap")
    assert here == _digest(7, "shape_swap")
    assert here != _digest(8, "shape_swap")
    code = ("import sys; sys.path.insert(0, %r); from test_world_scenes import _digest; print(_digest(7, 'shape_swap'))"
            % os.path.dirname(__file__))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_clip_is_the_samples_source_and_the_scene_is_the_same_for_every_edit():
    clip = render_clip(3, size=SIZE, frames=FRAMES)
    assert clip.shape == (FRAMES, *SIZE, 3) and clip.dtype == torch.float32
    assert 0 <= clip.min() and clip.max() <= 1
    for edit in EDITS:
        assert torch.equal(render_sample(3, edit, size=SIZE, frames=FRAMES).source, clip)


@pytest.mark.parametrize("edit", EDITS)
def test_source_and_target_identical_outside_the_edit_mask_and_different_inside(edit):
    for seed in SEEDS:
        s = render_sample(seed, edit, size=SIZE, frames=FRAMES)
        assert s.edit == edit and s.seed == seed
        assert torch.equal(s.edited_first, s.target[0])
        outside = s.edit_mask == 0
        assert torch.equal(s.source[outside], s.target[outside]), f"seed {seed}: change outside the mask"
        inside = s.edit_mask > 0.5
        assert inside.any(), f"seed {seed}: empty edit mask"
        diff = (s.source - s.target).abs().amax(-1)
        assert diff[inside].mean() > 0.02, f"seed {seed}: the edit barely changes its region"
        assert 0 <= s.edit_mask.min() and s.edit_mask.max() <= 1


def test_masks_match_the_renders():
    for seed in SEEDS:
        scene = make_scene(seed, SIZE, FRAMES)
        s = render_sample(seed, "recolour", size=SIZE, frames=FRAMES)
        assert s.object_masks.shape == (len(scene.objects), FRAMES, *SIZE)
        assert s.object_masks.sum(0).max() <= 1 + 1e-5           # visible coverages never overlap
        bare, _ = render_scene(replace(scene, objects=()))
        empty = s.object_masks.sum(0) == 0
        assert torch.equal(s.source[empty], bare[empty])          # no object mask = background only
        _, oid = edit_scene(scene, seed, "recolour")
        index = [o.oid for o in scene.objects].index(oid)
        assert torch.equal(s.edit_mask, s.object_masks[index])    # recolour changes exactly its object


def test_removal_reveals_the_background_rendered_without_the_object():
    for seed in SEEDS:
        scene = make_scene(seed, SIZE, FRAMES)
        _, oid = edit_scene(scene, seed, "removal")
        without, _ = render_scene(replace(scene, objects=tuple(o for o in scene.objects if o.oid != oid)))
        s = render_sample(seed, "removal", size=SIZE, frames=FRAMES)
        assert torch.equal(s.target, without)
        index = [o.oid for o in scene.objects].index(oid)
        assert torch.equal(s.edit_mask, s.object_masks[index])


def test_insertion_adds_a_new_moving_object_in_frame_one():
    for seed in SEEDS:
        scene = make_scene(seed, SIZE, FRAMES)
        edited, oid = edit_scene(scene, seed, "insertion")
        assert oid not in [o.oid for o in scene.objects] and len(edited.objects) == len(scene.objects) + 1
        new = next(o for o in edited.objects if o.oid == oid)
        assert np.linalg.norm(new.pos[-1] - new.pos[0]) > 0.05   # it moves on its own
        s = render_sample(seed, "insertion", size=SIZE, frames=FRAMES)
        assert s.edit_mask[0].sum() > 4                            # visible in the edited first frame


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(mask.shape[0]).float(), torch.arange(mask.shape[1]).float(), indexing="ij")
    return torch.stack([(xs * mask).sum(), (ys * mask).sum()]) / mask.sum()


def test_shape_swap_keeps_the_trajectory():
    size, frames = (64, 64), 9
    for seed in SEEDS:
        scene = make_scene(seed, size, frames)
        edited, oid = edit_scene(scene, seed, "shape_swap")
        old, new = (next(o for o in sc.objects if o.oid == oid) for sc in (scene, edited))
        assert old.shape != new.shape
        for key in ("pos", "heading", "scale"):
            assert np.array_equal(getattr(old, key), getattr(new, key))
        # the rendered shapes move together: their centroids stay within a fraction of the object's size
        _, vis_old = render_scene(replace(scene, objects=(old,)))
        _, vis_new = render_scene(replace(edited, objects=(new,)))
        for t in range(frames):
            if vis_old[oid][t].sum() > 20 and vis_new[oid][t].sum() > 20:
                gap = (_centroid(vis_old[oid][t]) - _centroid(vis_new[oid][t])).norm()
                assert gap < 0.5 * old.scale[t] * size[0], f"seed {seed} frame {t}: centroids {gap:.1f} px apart"


def test_colour_fill_is_flat_inside_the_mask():
    for seed in SEEDS:
        s = render_sample(seed, "colour_fill", size=(64, 64), frames=5)
        full = s.edit_mask == 1
        assert full.sum() > 10
        colours = s.target[full]
        assert (colours.amax(0) - colours.amin(0)).max() < 1e-6
        assert (s.source[full].amax(0) - s.source[full].amin(0)).max() > 0.05   # the source was textured


def test_restyle_covers_the_whole_frame():
    for seed in SEEDS:
        s = render_sample(seed, "restyle", size=SIZE, frames=FRAMES)
        assert torch.equal(s.edit_mask, torch.ones(FRAMES, *SIZE))
        changed = (s.source - s.target).abs().amax(-1) > 0.01
        assert changed.float().mean() > 0.9


def test_heldout_seeds_are_never_training_seeds():
    assert len(HELDOUT_SEEDS) == 100 and not set(HELDOUT_SEEDS) & set(TRAIN_SEEDS)
    assert TRAIN_SEEDS.stop <= HELDOUT_SEEDS.start


def test_motion_is_cued_by_frame_one():
    """Speed is set by size (speed * radius constant), turning by the eye, and the scene moves."""
    for seed in range(20):
        for obj in make_scene(seed, SIZE, 17).objects:
            if obj.shape == "post":
                continue
            speed = np.linalg.norm(np.diff(obj.pos, axis=0), axis=1)
            np.testing.assert_allclose(speed * obj.scale[0], SPEED_K, rtol=1e-9)
            assert np.sign(np.diff(obj.heading)).mean() == np.sign(obj.eye)


def test_any_size_multiple_of_16_and_any_4k_plus_1_frames():
    clip = render_clip(5, size=(48, 80), frames=5)
    assert clip.shape == (5, 48, 80, 3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(size=(60, 64)), "multiples of 16"),
    (dict(size=(64, 0)), "multiples of 16"),
    (dict(frames=16), "4k+1"),
    (dict(edit="blur"), "unknown edit 'blur'"),
])
def test_bad_input_errors_clearly(kwargs, words):
    edit = kwargs.pop("edit", "recolour")
    with pytest.raises(ValueError, match=re.escape(words)):
        render_sample(0, edit, **{"size": SIZE, "frames": FRAMES, **kwargs})
    if edit == "recolour":
        with pytest.raises(ValueError, match=re.escape(words)):
            render_clip(0, **{"size": SIZE, "frames": FRAMES, **kwargs})
