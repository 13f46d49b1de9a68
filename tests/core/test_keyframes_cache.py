"""The span cache (issue 15): bit-identical spans back, any input change is a miss, only the spans a re-edit
touches run again, bounded size, safe to delete, a cancelled span leaves it consistent."""

from __future__ import annotations

import pytest
import torch
from ffprop.nodes.common import Cancelled
from ffprop.nodes.flow.engine import FlowSettings
from ffprop.nodes.keyframes.cache import SpanCache, span_key
from ffprop.nodes.keyframes.engines import FlowEngine
from ffprop.nodes.keyframes.keys import make_keyframes
from ffprop.nodes.keyframes.propagate import propagate_keyframes
from ffprop.nodes.video.synthetic import synthetic_clip

IDX = [0, 4, 8]


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(13, 64, 96, seed=2)


def run(clip, cache, frames=None, source=None, mask=None, engine=None, should_stop=None):
    source = clip.source if source is None else source
    keys = make_keyframes(source, frames or [clip.edited[i] for i in IDX], IDX, "auto", mask)
    return propagate_keyframes(source, keys, engine or FlowEngine(), mask, cache, should_stop=should_stop)


def computed(res) -> list[bool]:
    return [r.computed for r in res.runs]


def test_cached_spans_are_bit_identical_and_only_touched_spans_rerun(clip, tmp_path):
    cache = SpanCache(tmp_path)
    fresh = run(clip, None)
    first = run(clip, cache)
    assert computed(first) == [True, True, True] and len(cache.entries()) == 3
    again = run(clip, cache)
    assert computed(again) == [False, False, False]
    assert torch.equal(again.video, fresh.video) and torch.equal(again.mask, fresh.mask)
    assert torch.equal(first.video, fresh.video)
    frames = [clip.edited[i] for i in IDX]
    frames[0] = clip.source[0] + 0.8 * (clip.edited[0] - clip.source[0])        # re-edit keyframe 0
    assert computed(run(clip, cache, frames)) == [True, False, False]
    frames[2] = frames[2].flip(1)                                                # ... and the last one
    assert computed(run(clip, cache, frames)) == [False, True, True]


def test_every_input_change_is_a_miss(clip, tmp_path):
    cache = SpanCache(tmp_path)
    run(clip, cache)
    source = clip.source.clone()
    source[6, 10, 10, 0] += 0.01                                                  # one pixel of span 4..8
    assert computed(run(clip, cache, source=source)) == [False, True, False]
    mask = (clip.edited - clip.source).abs().amax(-1).gt(0.02).float()
    assert computed(run(clip, cache, mask=mask)) == [True, True, True]
    mask2 = mask.clone()
    mask2[10, 0, 0] = 1                                                           # one mask pixel of span 8..12
    assert computed(run(clip, cache, mask=mask2)) == [False, False, True]
    assert computed(run(clip, cache, engine=FlowEngine(FlowSettings(feather=2)))) == [True, True, True]
    a = span_key("e", "between", [torch.zeros(2), None])
    assert a != span_key("e", "between", [torch.zeros(2), torch.zeros(2)])        # no mask != an empty mask
    assert a != span_key("e2", "between", [torch.zeros(2), None])                 # another engine / model
    assert a != span_key("e", "forward", [torch.zeros(2), None])
    assert a != span_key("e", "between", [torch.zeros(2, dtype=torch.float64), None])


def test_cache_is_safe_to_delete_and_repairs_bad_entries(clip, tmp_path, caplog):
    cache = SpanCache(tmp_path / "c")
    ref = run(clip, cache)
    entries = cache.entries()
    entries[0].write_bytes(b"not a safetensors file")
    entries[1].unlink()
    res = run(clip, cache)
    assert sorted(computed(res)) == [False, True, True]
    assert torch.equal(res.video, ref.video)
    assert "unreadable" in caplog.text
    import shutil

    shutil.rmtree(tmp_path / "c")
    assert computed(run(clip, cache)) == [True, True, True]


def test_cache_stays_under_its_bound(clip, tmp_path):
    probe = SpanCache(tmp_path / "probe")
    run(clip, probe)
    sizes = sorted(p.stat().st_size for p in probe.entries())
    cache = SpanCache(tmp_path / "small", max_bytes=sizes[-1] + sizes[-2])
    run(clip, cache)
    total = sum(p.stat().st_size for p in cache.entries())
    assert len(cache.entries()) == 2 and total <= cache.max_bytes


def test_cancelled_span_leaves_the_cache_consistent(clip, tmp_path):
    cache = SpanCache(tmp_path)
    calls_after_first = []

    def stop_in_second_span() -> bool:       # Cancel at the second check after span 1 was stored: inside span 2
        if cache.entries():
            calls_after_first.append(1)
        return len(calls_after_first) > 2

    with pytest.raises(Cancelled):
        run(clip, cache, should_stop=stop_in_second_span)
    assert len(cache.entries()) == 1
    assert not list(tmp_path.glob(".*"))                                          # no temp file left
    res = run(clip, cache)
    assert computed(res) == [False, True, True]
    assert torch.equal(res.video, run(clip, None).video)
