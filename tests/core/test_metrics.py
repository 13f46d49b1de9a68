"""Metrics: identities, what they detect, and errors."""

import math

import pytest
from ffprop.nodes.evaluate.metrics import evaluate, format_table
from ffprop.nodes.video.synthetic import synthetic_clip


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(9, 96, 160)


def test_ground_truth_scores_perfectly(clip):
    r = evaluate(clip.source, clip.edited, clip.edited[0], clip.mask)
    assert r["frame1_psnr"] == math.inf and r["background_psnr"] == math.inf
    assert r["background_ssim"] == pytest.approx(1.0)
    assert r["edit_persistence_mean"] == pytest.approx(1.0, abs=0.05)


def test_unedited_output_has_zero_persistence(clip):
    r = evaluate(clip.source, clip.source, clip.edited[0], clip.mask)
    assert r["edit_persistence_mean"] == pytest.approx(0.0) and r["frame1_psnr"] < 30


def test_background_damage_and_seam_jumps_are_detected(clip):
    damaged = clip.edited.clone()
    damaged[:, :, :80] = 0.0                                  # black out half the background
    assert evaluate(clip.source, damaged, clip.edited[0], clip.mask)["background_psnr"] < 20
    jumpy = clip.edited.clone()
    jumpy[5:] = (jumpy[5:] + 0.2).clamp(0, 1)                 # a chunk that starts brighter
    r = evaluate(clip.source, jumpy, clip.edited[0], clip.mask, seams=(5,))
    assert r["seam_jump_max"] > 3 and r["seam_jump_max"] == r["max_frame_jump"]
    assert "bg PSNR" in format_table({"x": r})


def test_metric_errors(clip):
    with pytest.raises(ValueError, match="output video is"):
        evaluate(clip.source, clip.source[:5], clip.edited[0], clip.mask)
    with pytest.raises(ValueError, match="seam frames"):
        evaluate(clip.source, clip.source, clip.edited[0], clip.mask, seams=(9,))
