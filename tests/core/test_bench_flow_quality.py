"""The flow-quality harness' own measures (tests/benchmarks/bench_flow_quality.py) on cases with known answers:
the hue rotation keeps greys, the vanish test flags an output that is the untouched source and not the truth, the
motion radius follows a moving square, and the far background excludes its path."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_flow_quality import MARGIN, dilate, edit_kept, hue_rotate, motion_radius, scores  # noqa: E402


def moving_square(t_len: int = 6, step: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source = torch.rand(t_len, 40, 60, 3, generator=g) * 0.6 + 0.2
    masks = torch.zeros(t_len, 40, 60)
    for t in range(t_len):
        masks[t, 10:20, 5 + step * t:15 + step * t] = 1
    return source, masks


def test_hue_rotation_keeps_greys_and_turns_colours():
    grey = torch.full((4, 3), 0.4)
    red = torch.tensor([[0.8, 0.1, 0.1]])
    assert torch.allclose(hue_rotate(grey, 120), grey, atol=1e-6)
    assert torch.allclose(hue_rotate(red, 120), red[:, [2, 0, 1]], atol=1e-6)     # 120 deg: red -> green
    assert torch.allclose(hue_rotate(hue_rotate(red, 120), 240), red, atol=1e-6)


def test_vanished_flags_the_source_not_the_truth():
    source, masks = moving_square()
    m = masks[..., None]
    truth = source * (1 - m) + hue_rotate(source, 120) * m
    assert edit_kept(source, truth, source, masks) == {"missing": 1.0, "vanished": [1, 2, 3, 4, 5]}
    assert edit_kept(truth, truth, source, masks) == {"missing": 0.0, "vanished": []}
    partly = truth.clone()
    partly[3] = source[3]                                 # the edit drops out on frame 3
    partly[4] = 0.5 * (source[4] + truth[4])              # and is half there on frame 4 (not vanished)
    assert edit_kept(partly, truth, source, masks) == {"missing": 0.3, "vanished": [3]}
    hidden = masks.clone()
    hidden[4] = 0                                         # frame 4: the object is not visible, nothing to judge
    assert edit_kept(source, truth, source, hidden)["vanished"] == [1, 2, 3, 5]


def test_far_background_is_outside_the_path():
    source, masks = moving_square(step=3)
    r = motion_radius(masks)
    assert r == 3 + MARGIN
    far = 1 - dilate(masks, r)
    assert (far * masks).sum() == 0 and far[0, 15, 10 + 3 + MARGIN] == 0 and far[0, 15, 59] == 1
    trail = source.clone()
    for t in range(trail.shape[0]):
        trail[t, 10:20, 3 * t:5 + 3 * t] = 0              # a smear just behind the square: not far background
    s = scores(trail, source, masks, far)
    assert s["far_bg"] == 100.0 and s["outside"] < 40
