"""GenProp's synthetic pairs: each augmentation builds the documented (SCE input, first frame, target, mask) pair,
the ratios are 0.5 / 0.375 / 0.125, world clips refuse held-out seeds, a folder of clips + masks loads."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.content_encoder.data import (
    RATIOS,
    Clip,
    colour_fill,
    copy_paste,
    load_folder,
    make_pair,
    mask_fill,
    mirrored,
    world_clip,
)

T, H, W = 5, 32, 32


def clip(seed: int, box=(8, 20, 6, 18)) -> Clip:
    frames = torch.rand(T, H, W, 3, generator=torch.Generator().manual_seed(seed))
    m = torch.zeros(1, T, H, W)
    y0, y1, x0, x1 = box
    m[:, :, y0:y1, x0:x1] = 1
    return Clip(frames, m, f"c{seed}")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_copy_paste_pastes_the_donor_object_into_the_sce_input_only():
    base, donor = clip(0), clip(1, box=(2, 12, 14, 30))
    p = copy_paste(base, donor, gen())
    inside = donor.masks[0] > 0.5
    assert torch.equal(p.sce_video[inside], donor.frames[inside])
    assert torch.equal(p.sce_video[~inside], base.frames[~inside])
    assert torch.equal(p.target, base.frames) and torch.equal(p.first_frame, base.frames[0])
    assert torch.equal(p.mask, donor.masks[0]) and p.task == "copy_paste"


def test_mask_fill_changes_only_the_masked_region_of_the_sce_input():
    c = clip(2)
    p = mask_fill(c, gen())
    hole = p.mask > 0.5
    assert torch.equal(p.target, c.frames) and torch.equal(p.first_frame, c.frames[0])
    outside = ~hole
    assert (p.sce_video[outside] - c.frames[outside]).abs().max() <= 1 / 255 + 1e-6   # uint8 round trip only
    assert (p.sce_video[hole] - c.frames[hole]).abs().mean() > 0.05                   # the object is gone
    assert hole.sum() > (c.masks[0] > 0.5).sum()                                       # mask covers the dilated fill
    assert p.task == "mask_fill"


def test_colour_fill_fills_the_generator_side_and_keeps_the_sce_input_real():
    c = clip(3)
    p = colour_fill(c, gen())
    inside = c.masks[0] > 0.5
    assert torch.equal(p.sce_video, c.frames)                      # the SCE reads the real clip
    colours = p.target[inside].unique(dim=0)
    assert colours.shape[0] == 1 and float(colours.max()) == pytest.approx(1.0, abs=1e-5)   # one saturated colour
    assert float(colours.min()) == pytest.approx(0.0, abs=1e-5)
    assert torch.equal(p.target[~inside], c.frames[~inside]) and torch.equal(p.first_frame, p.target[0])
    assert p.task == "colour_fill"


def test_make_pair_is_deterministic_and_follows_the_ratios():
    clips = [clip(i) for i in range(3)]
    a, b = make_pair(clips, 7, seed=1), make_pair(clips, 7, seed=1)
    assert a.task == b.task and torch.equal(a.sce_video, b.sce_video)
    counts = {"copy_paste": 0, "mask_fill": 0, "colour_fill": 0}
    n = 400
    for i in range(n):
        counts[make_pair(clips, i, seed=0).task] += 1
    for task, ratio in zip(("copy_paste", "mask_fill", "colour_fill"), RATIOS):
        assert abs(counts[task] / n - ratio) < 0.06, counts


def test_a_lone_clip_donates_its_mirror_image():
    c = clip(4)
    for i in range(20):
        p = make_pair([c], i)
        if p.task == "copy_paste":
            assert torch.equal(p.mask, mirrored(c).masks[0]) and not torch.equal(p.sce_video, p.target)
            return
    pytest.fail("no copy-paste pair in 20 draws")


def test_world_clips_are_training_seeds_with_their_moving_objects():
    from ffprop.nodes.world.scenes import HELDOUT_SEEDS, make_scene

    c = world_clip(3, size=(32, 32), frames=5)
    movers = [o for o in make_scene(3, (32, 32), 5).objects if o.shape != "post"]
    assert tuple(c.frames.shape) == (5, 32, 32, 3) and c.masks.shape[0] == len(movers)
    with pytest.raises(ValueError, match="held-out benchmark seed"):
        world_clip(HELDOUT_SEEDS[0])


def test_folder_of_clips_with_masks_loads_and_bad_folders_say_what_is_missing(tmp_path):
    from ffprop.nodes.video.io import write_video

    c = clip(5)
    write_video(tmp_path / "walk.mp4", c.frames, 8.0)
    write_video(tmp_path / "walk_mask.mp4", c.masks[0][..., None].expand(-1, -1, -1, 3).contiguous(), 8.0)
    write_video(tmp_path / "lonely.mp4", c.frames, 8.0)
    clips = load_folder(tmp_path)
    assert [x.name for x in clips] == ["walk"]
    assert tuple(clips[0].masks.shape) == (1, T, H, W)
    assert (clips[0].masks[0] != c.masks[0]).float().mean() < 0.02      # the mask survives the codec
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "solo.mp4").write_bytes((tmp_path / "lonely.mp4").read_bytes())
    with pytest.raises(ValueError, match="clips without a mask: solo.mp4"):
        load_folder(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="must be"):
        Clip(c.frames, c.masks[:, :3])


def test_bench_row_needs_world_models_and_an_encoder_trained_on_them(monkeypatch, tmp_path):
    import ffprop.nodes.content_encoder.bench as bench
    from ffprop.nodes.content_encoder.files import read_encoder_file

    assert bench.engines(None, None) == {}
    monkeypatch.setattr(bench, "WEIGHTS", tmp_path / "missing.safetensors")
    assert bench.engines(object(), None) == {}
    monkeypatch.undo()
    trained_on = read_encoder_file(bench.WEIGHTS)[2]["world_dit_sha256"]
    monkeypatch.setattr(bench, "world_dit_digest", lambda: "0" * 64)           # the world DiT was retrained
    assert bench.engines(object(), None) == {}
    monkeypatch.setattr(bench, "world_dit_digest", lambda: trained_on)
    monkeypatch.setattr(bench, "content_encoder_engine", lambda world, settings: "engine")
    assert bench.engines(object(), None) == {"content_encoder": "engine"}
    assert bench.task_for("colour_fill") == "colour_fill" and bench.task_for("removal") == "copy_paste"
    assert bench.task_for("recolour") == "mask_fill"
