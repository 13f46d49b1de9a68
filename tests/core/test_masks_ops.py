"""Mask ops: exact on synthetic shapes; the Wan keep-mask round trip; the prompt JSON parser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ffprop.nodes.masks import ops
from ffprop.nodes.masks.prompts import parse_prompts, prompts_to_json
from ffprop.nodes.video.frames import edit_to_keep, keep_to_edit, wan_mask_channels


def rect(h, w, x0, y0, x1, y1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m


# ---- loose box -------------------------------------------------------------------------------------------

def test_loose_box_expands_five_percent_each_side():
    m = rect(100, 100, 20, 10, 40, 30)                  # 20 x 20 component
    box = ops.loose_box(m, expand=0.1, min_area=50)     # floor(20 * 0.05) = 1 px each side
    assert torch.equal(box, rect(100, 100, 19, 9, 41, 31))
    box = ops.loose_box(m, expand=0.4, min_area=50)     # 4 px each side
    assert torch.equal(box, rect(100, 100, 16, 6, 44, 34))


def test_loose_box_fills_bbox_of_irregular_shape_and_handles_each_component():
    m = torch.zeros(64, 64)
    m[5:25, 5:6] = 1                                     # vertical line x=5, y 5..24
    m[5:6, 5:25] = 1                                     # horizontal line -> an L, bbox 20 x 20
    m[40:60, 40:60] = 1                                  # a separate square
    box = ops.loose_box(m, 0.1, 50)
    assert torch.equal(box, torch.maximum(rect(64, 64, 4, 4, 26, 26), rect(64, 64, 39, 39, 61, 61)))


def test_loose_box_drops_small_components_and_clips_at_border():
    m = torch.zeros(50, 50)
    m[0:7, 0:7] = 1                                      # 49 px box < 50: dropped
    m[20:25, 30:40] = 1                                  # 10 x 5 = 50: kept, pad floor(0.5)=0 / floor(0.25)=0
    m[40:50, 40:50] = 1                                  # touches the corner: clipped
    box = ops.loose_box(m, 0.1, 50)
    expect = torch.maximum(rect(50, 50, 30, 20, 40, 25), rect(50, 50, 40, 40, 50, 50))
    assert torch.equal(box, expect)
    assert ops.loose_box(m, 0.1, 0)[0:7, 0:7].sum() == 49  # min_area 0 keeps it


def test_loose_box_per_frame_and_empty():
    m = torch.stack([rect(40, 40, 5, 5, 25, 25), torch.zeros(40, 40)])
    out = ops.loose_box(m)
    assert out.shape == (2, 40, 40) and out[1].sum() == 0 and out[0].sum() == 22 * 22


# ---- dilate / erode / feather / hull ---------------------------------------------------------------------

@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_dilate_single_pixel_is_exact_disc(radius):
    m = torch.zeros(31, 31)
    m[15, 15] = 1
    out = ops.dilate(m, radius).numpy()
    y, x = np.mgrid[:31, :31]
    assert np.array_equal(out, (((x - 15) ** 2 + (y - 15) ** 2) <= radius ** 2).astype(np.float32))


def test_dilate_radius_counts():
    m = torch.zeros(31, 31)
    m[15, 15] = 1
    assert ops.dilate(m, 3).sum() == 29                  # lattice points with x^2 + y^2 <= 9
    assert ops.dilate(m, 0).sum() == 1


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_erode_square_shrinks_by_radius(radius):
    m = rect(40, 40, 10, 10, 30, 30)
    assert torch.equal(ops.erode(m, radius), rect(40, 40, 10 + radius, 10 + radius, 30 - radius, 30 - radius))


def test_erode_keeps_frame_border_and_dilate_then_erode_restores_square():
    full = torch.ones(10, 10)
    assert torch.equal(ops.erode(full, 3), full)
    sq = rect(40, 40, 10, 10, 30, 30)
    assert torch.equal(ops.erode(ops.dilate(sq, 3), 3), sq)


def test_feather_is_soft_outside_only():
    m = rect(40, 40, 10, 10, 30, 30)
    out = ops.feather(m, 6)
    assert torch.equal(out[m > 0], torch.ones(400))       # inside untouched
    assert 0 < out[20, 8] < 1 and out[20, 8] > out[20, 5]  # fades with distance
    assert out[20, 0] < 0.01
    assert torch.equal(ops.feather(m, 0), m)


def test_convex_hull_of_l_shape():
    m = torch.zeros(20, 20)
    m[0:3, 0:10] = 1                                     # horizontal bar
    m[0:10, 0:3] = 1                                     # vertical bar
    out = ops.convex_hull(m).numpy()
    y, x = np.mgrid[:20, :20]
    expect = ((x <= 9) & (y <= 9) & (x + y <= 11)).astype(np.float32)   # hull edge (9,2)-(2,9): x + y = 11
    assert np.array_equal(out, expect)


# ---- temporal, invert, combine ---------------------------------------------------------------------------

def test_temporal_majority_removes_flicker():
    m = torch.ones(7, 4, 4)
    m[3] = 0                                             # a one-frame dropout
    blip = torch.zeros(7, 4, 4)
    blip[5] = 1                                          # a one-frame false positive
    assert torch.equal(ops.temporal_smooth(m, 3), torch.ones(7, 4, 4))
    assert torch.equal(ops.temporal_smooth(blip, 3), torch.zeros(7, 4, 4))
    assert torch.equal(ops.temporal_smooth(m, 1), m)
    mean = ops.temporal_smooth(m, 3, "mean")
    assert torch.allclose(mean[3], torch.full((4, 4), 2 / 3)) and torch.equal(mean[0], torch.ones(4, 4))


def test_invert_union_intersection_difference():
    a, b = rect(10, 10, 0, 0, 6, 10), rect(10, 10, 4, 0, 10, 10)
    assert torch.equal(ops.invert(a), 1 - a)
    assert torch.equal(ops.combine(a, b, "union"), torch.ones(10, 10))
    assert torch.equal(ops.combine(a, b, "intersection"), rect(10, 10, 4, 0, 6, 10))
    assert torch.equal(ops.combine(a, b, "difference"), rect(10, 10, 0, 0, 4, 10))
    # one-frame mask broadcasts over a clip
    clip = torch.stack([a, b, a])
    assert ops.combine(clip, b[None], "intersection").shape == (3, 10, 10)


def test_ops_bad_input():
    with pytest.raises(ValueError, match="differ in size"):
        ops.combine(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError, match="frames"):
        ops.combine(torch.zeros(2, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        ops.temporal_smooth(torch.zeros(3, 4, 4), 2)
    with pytest.raises(ValueError, match="unknown mask op"):
        ops.apply_op(torch.zeros(1, 4, 4), "blur")
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        ops.dilate(torch.zeros(1, 1, 4, 4), 1)


def test_wan_keep_mask_round_trip():
    m = ops.loose_box(rect(64, 64, 16, 16, 40, 40)[None].repeat(9, 1, 1))   # 9 = 4k+1 frames
    keep = edit_to_keep(m)
    assert torch.equal(keep_to_edit(keep), m)
    ch = wan_mask_channels(keep)
    assert ch.shape == (4, 3, 8, 8)
    # the box covers cells 2..4 fully (pixels 15..40): keep = 0 there, 1 far away
    assert torch.all(ch[:, :, 2:5, 2:5] == 0) and torch.all(ch[:, :, 6:, 6:] == 1)


# ---- prompt JSON -----------------------------------------------------------------------------------------

def test_parse_prompts_merges_and_round_trips():
    text = json.dumps({"version": 1, "width": 64, "height": 48, "prompts": [
        {"frame": 0, "object": 1, "points": [[10, 20, 1], [30, 5, 0]]},
        {"frame": 0, "object": 1, "boxes": [[1, 2, 30, 40]]},
        {"frame": 4, "object": 2, "points": [[63, 47, 1]]}]})
    p = parse_prompts(text, 5, 48, 64)
    assert p.objects == (1, 2) and p.keyframes == (0, 4) and len(p.entries) == 2
    assert p.entries[0].points == ((10.0, 20.0, 1), (30.0, 5.0, 0)) and p.entries[0].boxes == ((1.0, 2.0, 30.0, 40.0),)
    assert parse_prompts(prompts_to_json(p), 5, 48, 64) == p
    with pytest.raises(AttributeError):
        p.entries[0].points.append((0, 0, 1))           # tuples: immutable
    with pytest.raises(AttributeError):
        p.entries[0].frame = 3                          # frozen dataclass
    assert not parse_prompts("", 5, 48, 64) and not parse_prompts('{"prompts": []}', 5, 48, 64)


def test_parse_prompts_scales_editor_size():
    text = json.dumps({"version": 1, "width": 32, "height": 24, "prompts": [{"frame": 0, "object": 1,
                       "points": [[16, 12, 1]], "boxes": [[0, 0, 32, 24]]}]})
    p = parse_prompts(text, 1, 48, 64)
    assert p.entries[0].points == ((32.0, 24.0, 1),) and p.entries[0].boxes == ((0.0, 0.0, 64.0, 48.0),)


@pytest.mark.parametrize("prompt, message", [
    ({"frame": 0, "points": [[70, 10, 1]]}, r"\(70, 10\) is outside the frame of 64x48"),
    ({"frame": 9, "points": [[1, 1, 1]]}, "frame 9, but the video has 5 frames"),
    ({"frame": -1, "points": [[1, 1, 1]]}, "frame -1"),
    ({"frame": 0, "boxes": [[30, 2, 10, 40]]}, "x1 > x0"),
    ({"frame": 0, "points": [[1, 1, 2]]}, "label must be 1"),
    ({"frame": 0, "object": 0, "points": [[1, 1, 1]]}, "object id"),
])
def test_parse_prompts_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompts(json.dumps({"version": 1, "prompts": [prompt]}), 5, 48, 64)


def test_parse_prompts_bad_json_and_version():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_prompts("{prompts: [", 5, 48, 64)
    with pytest.raises(ValueError, match="unknown prompts version 7"):
        parse_prompts('{"version": 7, "prompts": []}', 5, 48, 64)
