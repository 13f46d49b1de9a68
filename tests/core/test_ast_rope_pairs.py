"""FreeProp training pairs: the folder layouts, clear errors for a missing or mismatched clip, pixel-aligned
loading (the old load_pair cropped the source but resized the edit), lazy reading, world pairs."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.ast_rope.pairs import PairSet, find_pairs, load_pair, write_world_pairs
from ffprop.nodes.video.io import write_video


def clip(seed: int, t: int = 9, h: int = 40, w: int = 72) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, h // 8, w // 8, 3, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)


def test_both_layouts_prompts_and_partner_errors(tmp_path):
    (tmp_path / "a").mkdir()
    write_video(tmp_path / "a" / "source.mp4", clip(0), 8)
    write_video(tmp_path / "a" / "edited.mp4", clip(1), 8)
    (tmp_path / "a" / "prompt.txt").write_text("a red car\n")
    write_video(tmp_path / "b_source.mp4", clip(2), 8)
    write_video(tmp_path / "b_edited.mp4", clip(3), 8)
    pairs = find_pairs(str(tmp_path))
    assert [(p.name, p.prompt) for p in pairs] == [("a", "a red car"), ("b", None)]
    (tmp_path / "b.txt").write_text("a blue car")
    assert find_pairs(str(tmp_path))[1].prompt == "a blue car"
    write_video(tmp_path / "c_source.mp4", clip(4), 8)
    with pytest.raises(ValueError, match="'c_source.mp4' has no partner 'c_edited"):
        find_pairs(str(tmp_path))
    (tmp_path / "c_source.mp4").unlink()
    (tmp_path / "d").mkdir()
    write_video(tmp_path / "d" / "edited.mp4", clip(5), 8)
    with pytest.raises(ValueError, match="pair 'd' has edited.mp4 but no source"):
        find_pairs(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        find_pairs(str(tmp_path / "nope"))


def test_load_pair_keeps_source_and_edit_pixel_aligned(tmp_path):
    """72x40 clips (not multiples of 16): both must get the same crop. Before the fix the source was cropped to
    64x32 and the edit resized to it, so an unedited pair no longer matched itself."""
    frames = clip(7)
    write_video(tmp_path / "s.mp4", frames, 8)
    write_video(tmp_path / "e.mp4", frames, 8)
    src, ed = load_pair(str(tmp_path / "s.mp4"), str(tmp_path / "e.mp4"))
    assert src.shape == ed.shape == (9, 32, 64, 3)
    assert torch.equal(src, ed)
    write_video(tmp_path / "big.mp4", torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(80, 144),
                                                                      mode="nearest").permute(0, 2, 3, 1), 8)
    src, ed = load_pair(str(tmp_path / "s.mp4"), str(tmp_path / "big.mp4"))   # another size: resized, then cropped
    assert src.shape == ed.shape and (src - ed).abs().mean() < 0.03
    write_video(tmp_path / "short.mp4", frames[:3], 8)
    with pytest.raises(ValueError, match="3 common frames"):
        load_pair(str(tmp_path / "s.mp4"), str(tmp_path / "short.mp4"))


def test_world_pairs_are_written_in_the_layout_and_read_lazily(tmp_path):
    from ffprop.nodes.world.scenes import HELDOUT_SEEDS

    files = write_world_pairs(str(tmp_path), seeds=[3, 4], edits=["recolour", "removal"], frames=9, size=(32, 32))
    assert [f.name for f in files] == ["world_0000003_recolour", "world_0000004_removal"]
    pairs = PairSet.from_folder(str(tmp_path), max_frames=9)
    assert len(pairs) == 2 and pairs.files[0].prompt == "recolour edit"
    p = pairs[1]
    assert p.source.shape == p.edited.shape == (9, 32, 32, 3) and not torch.equal(p.source, p.edited)
    with pytest.raises(ValueError, match="held-out"):
        write_world_pairs(str(tmp_path / "x"), seeds=[HELDOUT_SEEDS[0]])
