"""The flow engine run chunk by chunk over a chunk plan vs one unchunked run (synthetic clip; sam2_bedroom)."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.chunks.chain import chain_chunks, flow_generator
from ffprop.nodes.chunks.drift import NO_DRIFT_CONTROL, region_seam_jumps, seam_jumps
from ffprop.nodes.chunks.plan import plan_chunks
from ffprop.nodes.flow.engine import propagate_edit
from ffprop.nodes.video.synthetic import synthetic_clip


def test_flow_chunked_matches_unchunked_on_synthetic_clip():
    clip = synthetic_clip(49, 144, 256, seed=0)
    plan = plan_chunks(49, 17, 1)
    whole = propagate_edit(clip.source, clip.edited[0])
    chained = chain_chunks(plan, clip.source, clip.edited[0], flow_generator(), drift=NO_DRIFT_CONTROL)
    err_whole = float((whole.video - clip.edited).abs().mean() * 255)
    err_chain = float((chained.video - clip.edited).abs().mean() * 255)
    assert err_chain < 1.3 * err_whole + 0.5, (err_chain, err_whole)     # measured 1.22 vs 1.15 (0..255)
    outside = (chained.edit_mask == 0) & (whole.mask == 0)
    assert torch.equal(chained.video[outside], clip.source[outside]), "flow keeps the background bit-exact"
    truth = region_seam_jumps(clip.edited, clip.mask, plan.seams)
    got = region_seam_jumps(chained.video, clip.mask, plan.seams)
    assert all(g < t + 0.5 for g, t in zip(got, truth)), (got, truth)
    assert len(chained.region_seam_jumps) == 2 and "in the edit region" in chained.report


def recolour_cushion(frame: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """sam2_bedroom frame 1 with the peach cushion on the bed recoloured (red and blue swapped in an ellipse at
    (605, 352) with radii 72 x 60 px on the 960x540 frame; scaled coordinates for smaller frames)."""
    h, w = frame.shape[:2]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((xx - 605 * scale) / (72 * scale)) ** 2 + ((yy - 352 * scale) / (60 * scale)) ** 2 <= 1
    out = frame.clone()
    out[inside] = frame[inside][:, [2, 1, 0]]
    return out


def test_flow_chunked_on_sam2_bedroom(shared_data):
    from ffprop.nodes.video.frames import resize_frames
    from ffprop.nodes.video.io import read_video

    source, _ = read_video(shared_data / "sam2_bedroom" / "bedroom.mp4", max_frames=41)
    source = resize_frames(source, 270, 480).clamp(0, 1)
    edited = recolour_cushion(source[0], 0.5)
    plan = plan_chunks(41, 21, 1)                                          # 2 chunks, seam at frame 22
    whole = propagate_edit(source, edited)
    chained = chain_chunks(plan, source, edited, flow_generator(), drift=NO_DRIFT_CONTROL)
    diff = float((chained.video - whole.video).abs().mean() * 255)
    assert diff < 0.5, diff
    j_whole, j_chain = seam_jumps(whole.video, plan.seams), chained.seam_jumps
    r_whole = region_seam_jumps(whole.video, whole.mask, plan.seams)
    r_chain = chained.region_seam_jumps
    assert abs(j_chain[0] - j_whole[0]) < 0.1, (j_chain, j_whole)
    assert r_chain[0] < r_whole[0] + 0.5, (r_chain, r_whole)
    frac = float((chained.edit_mask[plan.seams[0]] > 0.5).float().mean())
    assert frac > 0.01, "the edit region survives the hand-off"


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
