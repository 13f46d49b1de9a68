"""Auto layer mode (issue 17): with auto_layer, auto restarts in layer mode when the per-pixel chain breaks up
(tests/core/test_flow_stream.py: a texture that breaks up), and not when an occluder passes over the object."""

from ffprop.nodes.evaluate.metrics import psnr
from ffprop.nodes.flow.engine import FlowSettings, propagate_edit
from ffprop.nodes.video.synthetic import synthetic_clip


def test_an_occluder_is_not_a_broken_chain():
    """The keyframes tests' synthetic clip (25 frames 128x96, seed 1): a textured square passes over the
    recoloured disc and most of the disc stops matching frame 1, in pieces, from frame 13. Its unmatched pixels
    move with the occluder, not the disc, so the chain has not broken up: with auto_layer the engine must stay
    per-pixel (measured: 28.58 dB like the default; restarting in layer mode painted the disc over the
    occluder: 20.66 dB)."""
    clip = synthetic_clip(25, 96, 128, seed=1)
    res = propagate_edit(clip.source, clip.edited[0], settings=FlowSettings(auto_layer=True))
    assert not any("mode auto -> layer" in n for n in res.notes), res.notes
    assert not any("broke up" in n for n in res.notes), res.notes
    assert psnr(res.video.numpy(), clip.edited.numpy()) > 27.5
