"""Keyframe-guided propagation (issue 15): spans, backward = the engine on the reversed span, the two-ended
flow blend, keyframe checks. Real flow engine on the synthetic clip (known ground truth)."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.keyframes.engines import (
    ChainEngine,
    FlowEngine,
    SpanResult,
    distance_blend,
    end_keyed_condition,
    pad_to_wan,
)
from ffprop.nodes.keyframes.keys import make_keyframes, parse_indices
from ffprop.nodes.keyframes.propagate import propagate_keyframes
from ffprop.nodes.keyframes.spans import Span, confidence, keyframe_distance, plan_spans
from ffprop.nodes.video.synthetic import synthetic_clip


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(25, 96, 128, seed=1)


def run(source, frames, indices, engine=None, mask=None, cache=None):
    keys = make_keyframes(source, frames, indices, "auto", mask)
    return propagate_keyframes(source, keys, engine or FlowEngine(), mask, cache)


def test_plan_spans_cover_the_clip_and_share_keyframes():
    assert plan_spans(10, (0,)) == [Span(0, 9, "forward")]
    assert plan_spans(10, (4,)) == [Span(0, 4, "backward"), Span(4, 9, "forward")]
    assert plan_spans(10, (0, 5, 9)) == [Span(0, 5, "between"), Span(5, 9, "between")]
    assert plan_spans(10, (2, 6)) == [Span(0, 2, "backward"), Span(2, 6, "between"), Span(6, 9, "forward")]
    assert plan_spans(1, (0,)) == [Span(0, 0, "forward")]
    with pytest.raises(ValueError, match="sorted, unique"):
        plan_spans(10, (5, 2))


def test_distance_and_confidence():
    assert keyframe_distance(7, (0, 6)) == [0, 1, 2, 3, 2, 1, 0]
    conf = confidence(5, (0,))
    assert conf == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert confidence(1, (0,)) == [1.0]


def test_backward_of_reversed_clip_matches_forward(clip):
    """The same motion played backwards, edited at its LAST frame, propagated backward: equals the forward
    propagation of the original, time-reversed, and tracks the reversed ground truth."""
    t = clip.source.shape[0]
    fwd = run(clip.source, [clip.edited[0]], [0])
    rev = run(clip.source.flip(0), [clip.edited[0]], [t - 1])
    assert [r.span.kind for r in rev.runs] == ["backward"]
    assert torch.equal(rev.video, fwd.video.flip(0))
    assert torch.equal(rev.mask, fwd.mask.flip(0))
    assert psnr(rev.video.numpy(), clip.edited.flip(0).numpy()) > 24


def test_keyframes_equal_to_source_change_nothing(clip):
    src = clip.source
    for idx in ([0], [7], [0, 12, 24]):
        res = run(src, [src[i] for i in idx], idx)
        assert torch.equal(res.video, src), idx
        assert float(res.mask.abs().max()) == 0


def test_unedited_later_keyframe_fades_the_edit_out(clip):
    """An edit at 0 and the untouched source frame at 12: frame 12 is the source exactly, frame 1 carries the edit."""
    src = clip.source
    res = run(src, [clip.edited[0], src[12]], [0, 12])
    assert torch.equal(res.video[12:], run(src, [src[12]], [12]).video[12:])
    assert torch.equal(res.video[12], src[12])
    assert float((res.video[1] - src[1]).abs().max()) > 0.2


def test_second_keyframe_lowers_error_on_second_half(clip):
    t = clip.source.shape[0]
    late = slice(t // 2 + 1, t)
    one = run(clip.source, [clip.edited[0]], [0]).video
    two = run(clip.source, [clip.edited[0], clip.edited[t // 2]], [0, t // 2]).video
    p1, p2 = psnr(one[late].numpy(), clip.edited[late].numpy()), psnr(two[late].numpy(), clip.edited[late].numpy())
    assert p2 > p1 + 0.5, (p1, p2)
    assert torch.equal(two[0], one[0])                    # keyframe 0's own frame: the same forward result


def test_distance_blend_trusts_the_end_that_still_tracks_the_pixel():
    src = torch.zeros(3, 2, 2, 3)
    fv, bv = torch.full_like(src, 0.8), torch.full_like(src, 0.4)
    fm, bm = torch.ones(3, 2, 2), torch.ones(3, 2, 2)
    fm[1, 0, 0] = 0                                       # forward lost pixel (0, 0) at frame 1 (occluded)
    fv[1, 0, 0] = 0
    out = distance_blend(src, SpanResult(fv, fm), SpanResult(bv, bm))
    assert torch.allclose(out.video[1, 0, 0], torch.tensor(0.4))       # the backward end alone
    assert torch.allclose(out.video[1, 1, 1], torch.tensor(0.6))       # half way: the mean
    assert torch.equal(out.video[0], fv[0]) and torch.equal(out.video[2], bv[2])
    assert float(out.mask[1, 0, 0]) == 1.0


def test_chain_engine_spans_from_their_first_keyframe(clip):
    """A chunk-chainer generator (the flow one) drives the spans: a backward prefix, a span from keyframe 6
    whose last frame is the next keyframe (the chainer's seam rule)."""
    from ffprop.nodes.chunks.chain import flow_generator

    src = clip.source[:11]
    engine = ChainEngine(flow_generator(), "flow_generator", chunk_length=5)
    res = run(src, [clip.edited[3], clip.edited[10]], [3, 10], engine)
    assert [r.span.kind for r in res.runs] == ["backward", "between"]
    assert torch.equal(res.video[10], clip.edited[10])
    assert psnr(res.video.numpy(), clip.edited[:11].numpy()) > 25


def test_lora_edit_condition_holds_the_later_keyframe():
    src = torch.rand(9, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    first, last = torch.rand(1, 16, 16, 3), torch.rand(16, 16, 3)
    v, keep = end_keyed_condition(src, mask, first, last)
    assert torch.equal(v[0], first[0]) and torch.equal(v[-1], last)
    assert float(keep[0].min()) == 1 and float(keep[-1].min()) == 1
    assert float(keep[4, 8, 8]) == 0 and float(v[4, 8, 8, 0]) == 0.5      # the edit region between: generated
    padded, m, pad = pad_to_wan(src[:7], None)
    assert pad == 2 and padded.shape[0] == 9 and torch.equal(padded[-1], src[6])


def test_bad_keyframes(clip):
    src = clip.source
    with pytest.raises(ValueError, match=r"outside the clip, which has 25 frames"):
        make_keyframes(src, [clip.edited[0]], [25])
    with pytest.raises(ValueError, match=r"\[3\] are given more than once"):
        make_keyframes(src, [clip.edited[3], clip.edited[3]], [3, 3])
    with pytest.raises(ValueError, match="2 keyframe image"):
        make_keyframes(src, [clip.edited[0], clip.edited[1]], [0])
    with pytest.raises(ValueError, match="whole numbers"):
        parse_indices("0, ten")
    assert parse_indices(" 0, 12;24 ") == [0, 12, 24]


def test_keyframe_of_another_size_is_fitted_like_frame_one(clip):
    big = torch.nn.functional.interpolate(clip.edited[12][None].permute(0, 3, 1, 2), size=(192, 256),
                                          mode="bilinear").permute(0, 2, 3, 1)[0]
    keys = make_keyframes(clip.source, [clip.edited[0], big], [0, 12])
    assert keys.frames.shape == (2, 96, 128, 3)
    assert any("keyframe 12" in n and "256x192 -> 128x96 by resize" in n for n in keys.notes)
    with pytest.raises(ValueError, match="256x192 but the video is 128x96"):
        make_keyframes(clip.source, [big], [12], size_policy="error")


def test_edit_outside_the_mask_is_refused(clip):
    mask = torch.zeros(1, 96, 128)
    mask[:, :20, :20] = 1                                  # a corner: the disc's recolour is elsewhere
    with pytest.raises(ValueError, match=r"keyframe 0 changes \d+ px, 100% of them .* outside the edit mask"):
        make_keyframes(clip.source, [clip.edited[0]], [0], edit_mask=mask)
    per_frame = (clip.edited - clip.source).abs().amax(-1).gt(0.02).float()
    keys = make_keyframes(clip.source, [clip.edited[20], clip.edited[0]], [20, 0], edit_mask=per_frame)
    assert torch.equal(keys.frame(20), clip.edited[20])
    assert keys.indices == (0, 20) and keys.edited == (True, True)
