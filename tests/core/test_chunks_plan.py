"""Chunk plans: every frame exactly once, correct overlaps and hand-offs, padding policies, bad input."""

from __future__ import annotations

import pytest
from ffprop.nodes.chunks.plan import POLICIES, ChunkPlan, output_owner, plan_chunks, source_indices

CASES = [(t, length, o) for t in (1, 4, 5, 9, 17, 49, 80, 81, 82, 100, 161, 200, 333)
         for length in (5, 9, 49, 81) for o in (1, 2, 4, 5, 8) if o < length]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("t,length,o", CASES)
def test_every_frame_exactly_once_with_correct_overlaps(t, length, o, policy):
    plan = plan_chunks(t, length, o, policy)
    assert isinstance(plan, ChunkPlan) and plan.num_frames == t
    covered = [g for c in plan.chunks for g in c.new_frames]
    assert covered == list(range(t)), "output frames must be 0..T-1, each exactly once, in order"
    assert output_owner(plan)[-1][0] == len(plan) - 1
    first = plan.chunks[0]
    assert first.start == 0 and first.overlap == 0
    for prev, c in zip(plan.chunks, plan.chunks[1:]):
        assert c.overlap == o and c.start == prev.stop - o, "chunk k+1 starts on the last `overlap` frames of chunk k"
        assert prev.stop - prev.start == length and prev.pad == 0, "only the last chunk may be short"
        assert c.stop - c.start > o, "every chunk adds at least one new frame"
    for c in plan.chunks:
        assert (c.length - 1) % 4 == 0 and c.length >= 5 and c.length >= c.stop - c.start
        idx = source_indices(plan, c)
        assert len(idx) == c.length and idx[:c.stop - c.start] == list(range(c.start, c.stop))
        assert all(0 <= i < t for i in idx)
        if policy == "shorten":
            assert c.pad <= 3 or t < 5
        else:
            assert c.length == length
    assert plan.seams == tuple(c.start + c.overlap for c in plan.chunks[1:])


def test_known_plan_and_summary():
    plan = plan_chunks(200, 81, 1, "pad_repeat")
    assert [(c.start, c.stop, c.length) for c in plan.chunks] == [(0, 81, 81), (80, 161, 81), (160, 200, 81)]
    assert plan.seams == (81, 161)
    assert plan.chunks[-1].pad == 41
    text = plan.summary()
    assert "200 frames -> 3 chunk(s)" in text and "chunk 3: frames 161-200" in text and "41 padded" in text
    short = plan_chunks(200, 81, 1, "shorten")
    assert short.chunks[-1].length == 41 and short.chunks[-1].pad == 1


def test_padding_policies():
    plan = plan_chunks(12, 9, 1, "pad_repeat")           # chunks 0-8, 8-11 (+5 pad)
    assert source_indices(plan, plan.chunks[1]) == [8, 9, 10, 11, 11, 11, 11, 11, 11]
    plan = plan_chunks(12, 9, 1, "pad_reflect")
    assert source_indices(plan, plan.chunks[1]) == [8, 9, 10, 11, 10, 9, 8, 7, 6]
    plan = plan_chunks(12, 9, 1, "shorten")
    assert plan.chunks[1].length == 5 and source_indices(plan, plan.chunks[1]) == [8, 9, 10, 11, 11]


def test_clip_shorter_than_one_chunk_is_one_chunk_and_said_so():
    plan = plan_chunks(30, 81, 1)
    assert len(plan) == 1 and plan.chunks[0].length == 81 and plan.chunks[0].pad == 51
    assert any("shorter than one chunk" in n for n in plan.notes)
    assert plan_chunks(30, 81, 1, "shorten").chunks[0].length == 33


@pytest.mark.parametrize("length", [0, 4, 6, 8, 80, 82])
def test_length_not_4k_plus_1_is_an_error(length):
    with pytest.raises(ValueError, match="4k\\+1"):
        plan_chunks(100, length, 1)


@pytest.mark.parametrize("overlap", [0, 81, 100, -1])
def test_overlap_out_of_range_is_an_error(overlap):
    with pytest.raises(ValueError, match="overlap"):
        plan_chunks(200, 81, overlap)


def test_bad_policy_and_empty_clip():
    with pytest.raises(ValueError, match="policy"):
        plan_chunks(100, 81, 1, "stretch")
    with pytest.raises(ValueError, match="at least 1"):
        plan_chunks(0, 81, 1)


def test_plan_is_immutable():
    plan = plan_chunks(100, 49, 1)
    with pytest.raises(AttributeError):
        plan.overlap = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.chunks[0].start = 2  # type: ignore[misc]
