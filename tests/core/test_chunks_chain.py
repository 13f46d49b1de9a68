"""Chained generation with stand-in generators: hand-off frames, assembly, progress/cancel, drift control
(numbers asserted on a synthetic clip with an injected per-chunk colour shift), bad input."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.chunks.chain import ChunkResult, chain_chunks, condition_video
from ffprop.nodes.chunks.drift import NO_DRIFT_CONTROL, DriftSettings
from ffprop.nodes.chunks.plan import plan_chunks, source_indices
from ffprop.nodes.common import Cancelled
from ffprop.nodes.video.synthetic import synthetic_clip


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(num_frames=61, height=64, width=96, seed=3)


def recording_generator(plan, seen, noise=0.02):
    """Returns the source slice plus a chunk-specific random texture, keeping the head frames; records jobs."""

    def generate(job):
        g = torch.Generator().manual_seed(100 + job.chunk.index)
        frames = (job.source + noise * torch.randn(job.source.shape, generator=g)).clamp(0, 1)
        frames[:job.head.shape[0]] = job.head
        seen.append((job, frames.clone()))
        return ChunkResult(frames)

    return generate


@pytest.mark.parametrize("overlap", [1, 5])
def test_handoff_frame_is_last_frame_of_previous_chunk(clip, overlap):
    plan = plan_chunks(61, 17, overlap, "pad_reflect")
    seen = []
    res = chain_chunks(plan, clip.source, clip.edited[0], recording_generator(plan, seen), drift=NO_DRIFT_CONTROL)
    assert len(seen) == len(plan) >= 4
    assert torch.equal(seen[0][0].head[0], clip.edited[0]), "chunk 1 starts from the edited first frame"
    for (job, frames), (nxt, _) in zip(seen, seen[1:]):
        n = job.chunk.length - job.chunk.pad
        assert torch.equal(nxt.head, frames[n - overlap:n]), "hand-off = last `overlap` frames of the previous chunk"
        assert torch.equal(nxt.head[-1], frames[n - 1])
    # assembly: chunk 1 whole, then each chunk after its overlap; padded tail trimmed
    for job, frames in seen:
        c = job.chunk
        got = res.video[c.start + c.overlap:c.stop]
        assert torch.equal(got, frames[c.overlap:c.stop - c.start])
        assert torch.equal(job.source, clip.source[source_indices(plan, c)])
    assert res.video.shape == clip.source.shape and res.seams == plan.seams
    assert len(res.seam_jumps) == len(plan) - 1
    assert "seam at frame" in res.report and "chunk 4" in res.report


def test_seam_jump_measures_an_injected_discontinuity():
    """A clip that brightens by exactly 0.001 a frame; chunk c's new frames come back c * `offset` brighter than
    the source inside a known region, so every seam holds a known extra step of `offset` there: the seam jump is
    (ordinary step + offset) / ordinary step in the region, and diluted by the region's area over the frame."""
    t, h, w, step, offset = 41, 16, 20, 0.001, 0.03
    ramp = 0.3 + step * torch.arange(t, dtype=torch.float32)
    source = ramp[:, None, None, None].expand(t, h, w, 3).clone()
    region = torch.zeros(t, h, w)
    region[:, 4:12, 5:15] = 1                                              # 80 of 320 pixels: a quarter
    plan = plan_chunks(t, 9, 1)                                            # 5 chunks; new frames from 10, 18, ...

    def generate(job):
        frames = job.source.clone()
        frames[:job.head.shape[0]] = job.head
        frames[job.head.shape[0]:] += (job.chunk.index + 1) * offset * region[0, ..., None]   # new frames only
        return ChunkResult(frames, region[:job.chunk.length])

    res = chain_chunks(plan, source, source[0], generate, drift=NO_DRIFT_CONTROL)
    assert res.seams == (9, 17, 25, 33) and len(res.seam_jumps) == 4
    assert res.region_seam_jumps == pytest.approx([(step + offset) / step] * 4, rel=1e-3)      # 31
    assert res.seam_jumps == pytest.approx([(step + offset / 4) / step] * 4, rel=1e-3)         # 8.5
    smooth = chain_chunks(plan, source, source[0], lambda job: ChunkResult(job.source.clone()),
                          drift=NO_DRIFT_CONTROL)
    assert smooth.seam_jumps == pytest.approx([1.0] * 4, rel=1e-3), "no discontinuity: an ordinary step"


def test_progress_spans_chunks_and_cancel_stops(clip):
    plan = plan_chunks(61, 17, 1)
    calls = []
    chain_chunks(plan, clip.source, clip.edited[0], recording_generator(plan, []), steps_per_chunk=3,
                 drift=NO_DRIFT_CONTROL, on_step=lambda i, n, p=None: calls.append((i, n)))
    assert calls[-1] == (3 * len(plan), 3 * len(plan)) and all(n == 3 * len(plan) for _, n in calls)
    assert [i for i, _ in calls] == sorted(i for i, _ in calls)
    seen = []
    with pytest.raises(Cancelled):
        chain_chunks(plan, clip.source, clip.edited[0], recording_generator(plan, seen),
                     should_stop=lambda: len(seen) >= 2)
    assert len(seen) == 2, "no chunk is generated after Cancel"


def drifting_generator(clip, plan, shift):
    """A stand-in for a drifting video model: it reproduces the true edited chunk but inherits the colour error of
    its hand-off frame (what I2V conditioning does) and adds a new per-chunk colour shift (the VAE round trip +
    generation nudging colour at every join)."""

    def generate(job):
        c = job.chunk
        truth = clip.edited[source_indices(plan, c)]
        inherited = (job.head[0] - truth[0]).mean((0, 1))                    # [3] colour error handed over
        frames = (truth + inherited + (shift if c.index else 0)).clamp(0, 1)
        frames[:job.head.shape[0]] = job.head
        return ChunkResult(frames, clip.mask[source_indices(plan, c)])

    return generate


def test_drift_control_reduces_injected_colour_drift(clip):
    plan = plan_chunks(61, 13, 1)                                              # 5 chunks
    shift = torch.tensor([0.035, -0.02, 0.015])
    gen = drifting_generator(clip, plan, shift)
    raw = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=NO_DRIFT_CONTROL)
    fixed = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=DriftSettings())
    bg_raw, bg_fixed = raw.drift["background"], fixed.drift["background"]
    ed_raw, ed_fixed = raw.drift["edit"], fixed.drift["edit"]
    # without control the drift compounds: chunk 5 carries 4 shifts of |(0.035,-0.02,0.015)| * 255 = 11.1 each
    assert bg_raw[-1] > 35 and bg_raw[-1] > bg_raw[1] * 3
    assert ed_raw[-1] > 30
    # with control every chunk is pulled back to the source (background) and to chunk 1 (edit region)
    assert max(bg_fixed) < 1.5, bg_fixed
    assert max(ed_fixed[1:]) < 0.25 * max(ed_raw[1:]), (ed_fixed, ed_raw)
    # the panning clip's ordinary frame step is large, so a seam is only a few % above it; still lower at every seam
    assert all(f < r for f, r in zip(fixed.seam_jumps, raw.seam_jumps)), (fixed.seam_jumps, raw.seam_jumps)
    err_raw = (raw.video - clip.edited).abs().mean()
    err_fixed = (fixed.video - clip.edited).abs().mean()
    assert err_fixed < 0.2 * err_raw, (float(err_fixed), float(err_raw))
    assert torch.equal(fixed.video[0], clip.edited[0]), "the edited first frame is never changed"


def test_each_drift_switch_acts_alone(clip):
    plan = plan_chunks(61, 13, 1)
    gen = drifting_generator(clip, plan, torch.tensor([0.03, 0.03, -0.03]))
    raw = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=NO_DRIFT_CONTROL)
    bg = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=DriftSettings(True, False, False))
    ed = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=DriftSettings(False, True, False))
    assert max(bg.drift["background"]) < 0.1 * max(raw.drift["background"])
    assert max(ed.drift["edit"]) < 0.3 * max(raw.drift["edit"])
    assert max(ed.drift["background"]) > 0.5 * max(raw.drift["background"]), "edit matching leaves the background"


def test_crossfade_blends_overlap_frames_only(clip):
    plan = plan_chunks(61, 17, 5)
    seen = []
    settings = DriftSettings(False, False, True)
    res = chain_chunks(plan, clip.source, clip.edited[0], recording_generator(plan, seen, noise=0.2), drift=settings)
    ref = chain_chunks(plan, clip.source, clip.edited[0], recording_generator(plan, [], noise=0.2), drift=NO_DRIFT_CONTROL)
    s = plan.chunks[1].start
    assert torch.equal(res.video[s], ref.video[s]), "the hand-off frame itself is not blended"
    assert not torch.equal(res.video[s + 1:s + 5], ref.video[s + 1:s + 5])
    assert torch.equal(res.video[s + 5:plan.chunks[2].start], ref.video[s + 5:plan.chunks[2].start])


def test_condition_video_i2v_keeps_head_and_greys_the_rest(clip):
    src = clip.source[:9]
    head = clip.edited[:1]
    video, keep = condition_video("i2v", src, None, head)
    assert torch.equal(video[0], head[0]) and bool((video[1:] == 0.5).all())
    assert keep[0].min() == 1 and keep[1:].max() == 0
    with pytest.raises(ValueError, match="kind"):
        condition_video("vace", src, None, head)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_chunk_stops_the_chain_naming_the_chunk(clip, bad):
    plan = plan_chunks(61, 13, 1)                                              # chunk 2 = frames 13-25
    seen = []
    inner = drifting_generator(clip, plan, torch.tensor([0.01, 0.0, 0.0]))

    def one_bad_pixel_in_chunk_2(job):
        seen.append(job.chunk.index)
        res = inner(job)
        if job.chunk.index == 1:
            res.frames[3, 5, 7, 1] = bad                                       # clip frame 13 + 3 = 16
        return res

    with pytest.raises(RuntimeError) as e:
        chain_chunks(plan, clip.source, clip.edited[0], one_bad_pixel_in_chunk_2, drift=DriftSettings())
    msg = str(e.value)
    assert "chunk 2 of 5 (frames 13-25)" in msg and "1 non-finite values" in msg and "frame(s) 16;" in msg, msg
    assert "cfg" in msg and "fp32" in msg and "sampler" in msg, "says what to try"
    assert seen == [0, 1], "no chunk is generated after the bad one"
    ok = chain_chunks(plan, clip.source, clip.edited[0], inner, drift=DriftSettings())
    assert bool(torch.isfinite(ok.video).all()) and "nan" not in ok.report


def test_bad_input_errors(clip):
    plan = plan_chunks(61, 17, 1)
    gen = recording_generator(plan, [])
    with pytest.raises(ValueError, match="61 frames"):
        chain_chunks(plan, clip.source[:50], clip.edited[0], gen)
    with pytest.raises(ValueError, match="prompts"):
        chain_chunks(plan, clip.source, clip.edited[0], gen, num_prompts=2)
    with pytest.raises(ValueError, match="frames"):
        chain_chunks(plan, clip.source, clip.edited[0], gen, edit_mask=clip.mask[:7])
    chain_chunks(plan, clip.source, clip.edited[0], gen, num_prompts=len(plan), drift=NO_DRIFT_CONTROL)


def test_a_chunk_the_edited_object_has_left_runs_and_an_empty_whole_mask_is_an_error(clip):
    """The mask is empty in the last chunk (the object left the frame): lora_edit conditioning keeps that chunk's
    source (no error, nothing greyed); a mask empty over the whole clip is still refused up front."""
    plan = plan_chunks(61, 17, 1)
    mask = clip.mask.clone()
    mask[40:] = 0
    seen = []

    def generate(job):
        video, keep = condition_video("lora_edit", job.source, job.edit_mask, job.head)
        seen.append((job.chunk.index, float(keep[job.head.shape[0]:].min())))
        frames = job.source.clone()
        frames[:job.head.shape[0]] = job.head
        return ChunkResult(frames)

    chain_chunks(plan, clip.source, clip.edited[0], generate, edit_mask=mask, drift=NO_DRIFT_CONTROL)
    assert seen[-1] == (len(plan) - 1, 1.0) and seen[0][1] == 0.0
    with pytest.raises(ValueError, match="empty"):
        chain_chunks(plan, clip.source, clip.edited[0], generate, edit_mask=torch.zeros_like(clip.mask))
