"""Keyframe-guided propagation (issue 15): spans, backward = the engine on the reversed span, the two-ended
flow blend, keyframe checks. Real flow engine on the synthetic clip (known ground truth)."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.keyframes.engines import (
    TAIL_PAD,
    ChainEngine,
    FlowEngine,
    SpanResult,
    distance_blend,
    hold_tail,
    pad_to_wan,
)
from ffprop.nodes.keyframes.keys import make_keyframes, parse_indices
from ffprop.nodes.keyframes.propagate import propagate_keyframes
from ffprop.nodes.keyframes.spans import Span, confidence, keyframe_distance, plan_spans
from ffprop.nodes.lora_edit.conditioning import masked_condition_video
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


@pytest.mark.parametrize("chunk_length", [81, 5])
@pytest.mark.parametrize("with_mask", [True, False])
def test_wan_chain_engine_keeps_the_later_keyframe(clip, chunk_length, with_mask):
    """ComfyUI's wan engine (a chained generator with LoRA-Edit conditioning, keeps_source=True): the last chunk of
    a two-keyframe span is conditioned on masked_condition_video with the later keyframe as tail (kept on the span's
    last frame and TAIL_PAD frames after it), every earlier frame exactly as without a tail; one chunk or several."""
    from ffprop.nodes.chunks.chain import ChunkResult, condition_video

    jobs = []

    def record(job):                                       # the conditioning a Wan generator would encode
        jobs.append(job)
        return ChunkResult(job.source.clone(), None)

    src = clip.source[:9]
    mask = (clip.edited[:9] - src).abs().amax(-1).gt(0.02).float() if with_mask else None
    first, last = clip.edited[0], clip.edited[8]
    res = ChainEngine(record, "record", chunk_length=chunk_length, keeps_source=True).between(src, first, last, mask)
    assert res.video.shape == src.shape
    job = jobs[-1]
    v, keep = condition_video("lora_edit", job.source, job.edit_mask, job.head)
    start = job.chunk.start
    n_held = job.source.shape[0] - (8 - start)                  # frames from the span's last frame on
    assert start < 8 and (n_held >= 1 + TAIL_PAD if chunk_length == 81 else n_held == 1)  # 5: chunks 0-4, 4-8
    want_v, want_keep = masked_condition_video(src[start:], None if mask is None else mask[start:], job.head,
                                               allow_empty=True)
    k = job.head.shape[0]
    held = slice(v.shape[0] - n_held, None)
    assert torch.equal(v[held], last[None].expand_as(v[held])) and bool((keep[held] == 1).all())
    assert torch.equal(v[k:-n_held], want_v[k:-1]) and torch.equal(keep[k:-n_held], want_keep[k:-1])
    assert (len(jobs) > 1) == (chunk_length == 5)
    tail_free = ChainEngine(record, "record", chunk_length=chunk_length).between(src, first, last, mask)
    assert not torch.equal(tail_free.video, res.video)      # one-ended: frame 8 is the source, not the keyframe


def test_hold_tail_is_lora_edit_tail_conditioning():
    src = torch.rand(9, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    first, last = torch.rand(1, 16, 16, 3), torch.rand(16, 16, 3)
    for m in (mask, None):
        held, held_mask = hold_tail(src, m, last, TAIL_PAD)
        assert held.shape[0] == 9 + TAIL_PAD and torch.equal(held[:8], src[:8])
        v, keep = masked_condition_video(held, held_mask, first)
        padded, pm, pad = pad_to_wan(src, m, TAIL_PAD)
        assert pad == 4 and padded.shape[0] == 13 and torch.equal(padded[-1], src[-1])
        want_v, want_keep = masked_condition_video(padded, pm, first, tail=last[None].expand(5, -1, -1, -1))
        assert torch.equal(v, want_v[:12]) and torch.equal(keep, want_keep[:12])
        assert float(keep[4, 8, 8]) == 0 and float(v[4, 8, 8, 0]) == 0.5      # the edit region between: generated


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


def test_propagate_refuses_keyframes_of_another_clip_or_outside_its_mask(clip):
    """Keyframes checked against one clip, propagated on another (or with a mask they were not checked against:
    the mask connected to the propagate step only): errors with the numbers before any span runs."""
    keys = make_keyframes(clip.source, [clip.edited[0], clip.edited[20]], [0, 20])
    with pytest.raises(ValueError, match=r"keyframe\(s\) \[20\] lie past the clip's end \(12 frames"):
        propagate_keyframes(clip.source[:12], keys, FlowEngine())
    with pytest.raises(ValueError, match="keyframes are 128x96 but the clip is 64x64"):
        propagate_keyframes(clip.source[:, :64, :64], keys, FlowEngine())
    corner = torch.zeros(1, 96, 128)
    corner[:, :20, :20] = 1
    with pytest.raises(ValueError, match=r"keyframe 0 changes \d+ px, 100% of them .* outside the edit mask"):
        propagate_keyframes(clip.source, keys, FlowEngine(), corner)
    inside = (clip.edited - clip.source).abs().amax(-1).gt(0.02).float()
    assert propagate_keyframes(clip.source[:21], make_keyframes(clip.source[:21], [clip.edited[20]], [20]),
                               FlowEngine(), inside[:21]).video.shape == (21, 96, 128, 3)


def test_a_few_fringe_pixels_outside_the_mask_are_noted_not_refused(clip):
    """A small edit whose soft fringe crosses the mask by a few pixels (a world retexture scene: 3 of 26 px) is
    no contradiction: noted, not refused; the same share of a large edit is."""
    src = clip.source[:3]
    mask = torch.zeros(1, 96, 128)
    mask[:, 40:60, 40:60] = 1
    small = src[0].clone()
    small[48:52, 48:54] += 0.3                                # 24 px inside
    small[10, 10:14] += 0.3                                   # 4 px far outside: 14 %
    keys = make_keyframes(src, [small.clamp(0, 1)], [0], edit_mask=mask)
    assert any("4 changed px outside the edit mask" in n for n in keys.notes)
    large = src[0].clone()
    large[42:58, 42:58] += 0.3                                # 256 px inside
    large[5:10, 5:13] += 0.3                                  # 40 px outside: 14 %
    with pytest.raises(ValueError, match=r"keyframe 0 changes 296 px, 14% of them \(40 px\)"):
        make_keyframes(src, [large.clamp(0, 1)], [0], edit_mask=mask)
