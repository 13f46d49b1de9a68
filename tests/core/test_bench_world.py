"""The world benchmark: exact JSON shape, scores that match a hand computation, and the flow engine keeping the
background that repeating frame 1 loses. Two tiny scenes (32x32, 9 frames) keep it to seconds."""

import json
import math

import pytest
import torch
from ffprop.__main__ import main
from ffprop.nodes.evaluate.bench import (
    PSNR_CAP,
    SCORES,
    BenchSettings,
    engines,
    run_bench,
    weighted_psnr,
    world_cases,
)
from ffprop.nodes.world.scenes import EDITS, HELDOUT_SEEDS, render_sample

SETTINGS = BenchSettings(cases=((HELDOUT_SEEDS[0], "recolour"), (HELDOUT_SEEDS[1], "removal")), size=(32, 32),
                         frames=9)


@pytest.fixture(scope="module")
def result():
    return run_bench(SETTINGS, engines(SETTINGS, ("repeat_first_frame", "flow")))


def test_json_has_exactly_the_issues_shape(result):
    json.loads(json.dumps(result, allow_nan=False))             # strict JSON: no NaN/Infinity
    assert set(result) == {"scenes", "frames", "methods"}
    assert result["scenes"] == 2 and result["frames"] == 9
    assert list(result["methods"]) == ["repeat_first_frame", "flow"]
    for m in result["methods"].values():
        assert set(m) == {*SCORES, "by_edit"}
        assert set(m["by_edit"]) == {"recolour", "removal"}
        for row in (m, *m["by_edit"].values()):
            assert {k for k in row if k != "by_edit"} == set(SCORES)
            assert all(isinstance(row[k], float) and math.isfinite(row[k]) for k in SCORES)


def _hand_psnr(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> float:
    se = ((a.double() - b.double()) ** 2).mean(-1)
    w = torch.ones_like(se) if w is None else w.double()
    return 10 * math.log10(1 / float((se * w).sum() / w.sum()))


def test_repeat_first_frame_scores_equal_a_hand_computation(result):
    psnr, edit, bg = [], [], []
    for seed, e in SETTINGS.cases:
        s = render_sample(seed, e, size=SETTINGS.size, frames=SETTINGS.frames)
        frozen = s.edited_first[None].expand(SETTINGS.frames - 1, -1, -1, -1)
        truth, m = s.target[1:], s.edit_mask[1:]
        psnr.append(_hand_psnr(frozen, truth))
        edit.append(_hand_psnr(frozen, truth, m))
        bg.append(_hand_psnr(frozen, truth, 1 - m))
    rep = result["methods"]["repeat_first_frame"]
    assert rep["psnr"] == pytest.approx(sum(psnr) / 2, abs=1e-9)
    assert rep["edit_psnr"] == pytest.approx(sum(edit) / 2, abs=1e-9)
    assert rep["bg_psnr"] == pytest.approx(sum(bg) / 2, abs=1e-9)
    assert rep["by_edit"]["removal"]["psnr"] == pytest.approx(psnr[1], abs=1e-9)


def test_flow_keeps_the_background_that_repeating_frame_one_loses(result):
    flow, rep = result["methods"]["flow"], result["methods"]["repeat_first_frame"]
    assert flow["bg_psnr"] > rep["bg_psnr"] + 3
    assert flow["psnr"] > rep["psnr"]
    for edit in ("recolour", "removal"):
        assert flow["by_edit"][edit]["bg_psnr"] > rep["by_edit"][edit]["bg_psnr"]
    assert flow["warp_error"] < rep["warp_error"]               # it moves with the scene; a frozen clip does not


def test_psnr_helper_caps_exact_matches_and_has_no_value_on_empty_weights():
    a = torch.rand(2, 4, 4, 3)
    assert weighted_psnr(a, a) == PSNR_CAP
    assert weighted_psnr(a, a + 0.1, torch.zeros(2, 4, 4)) is None
    assert weighted_psnr(a.clamp(0, 0.5), a.clamp(0, 0.5) + 0.1) == pytest.approx(20.0)


def test_skipped_engines_are_reported_with_their_reason_and_null_scores():
    out = run_bench(BenchSettings(cases=SETTINGS.cases[:1], size=(32, 32), frames=5),
                    {"i2v": "no world models (test)"})
    assert out["methods"]["i2v"] == {**{k: None for k in SCORES}, "by_edit": {}, "skipped": "no world models (test)"}
    json.dumps(out, allow_nan=False)


def test_cases_cover_every_edit_on_distinct_held_out_seeds():
    cases = world_cases(2)
    assert [e for _, e in cases] == list(EDITS) * 2
    assert len({s for s, _ in cases}) == len(cases) and all(s in HELDOUT_SEEDS for s, _ in cases)
    with pytest.raises(ValueError, match="per_edit must be 1..14"):
        world_cases(15)
    with pytest.raises(ValueError, match="unknown method 'sdedit'"):
        engines(SETTINGS, ("sdedit",))


def test_cli_prints_the_table_and_writes_strict_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "world", "--quick", "--methods", "repeat_first_frame", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["scenes"] == len(EDITS) and set(data["methods"]) == {"repeat_first_frame"}
    assert set(data["methods"]["repeat_first_frame"]["by_edit"]) == set(EDITS)
    assert data["methods"]["repeat_first_frame"]["by_edit"]["restyle"]["bg_psnr"] is None
    out = capsys.readouterr().out
    assert "repeat_first_frame" in out and "restyle" in out
    assert main(["bench", "world", "--methods", "nope"]) == 2


def test_per_edit_runs_k_scenes_of_each_edit_and_refuses_bad_counts(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "world", "--per-edit", "2", "--methods", "repeat_first_frame", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["scenes"] == 2 * len(EDITS)
    assert "full-settings (2 per edit) run: 14 scenes" in capsys.readouterr().out
    assert main(["bench", "world", "--per-edit", "15", "--methods", "repeat_first_frame"]) == 2
    assert "per_edit must be 1..14" in capsys.readouterr().err
    assert main(["bench", "world", "--quick", "--per-edit", "2"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_generative_engines_run_end_to_end_on_a_tiny_random_wan():
    """Plumbing only (random weights): i2v, lora_edit and lora_edit_ast_rope produce scorable clips."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from ffprop.nodes.evaluate.bench import WanWorld, wan_engines
    from ffprop.nodes.host.diffusers import DiffusersWan
    from ffprop.nodes.host.vae import DiffusersWanVAE

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = DiffusersWanVAE(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                               attn_scales=[], temperal_downsample=[False, True, True]).eval())
        dit = DiffusersWan(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                 in_channels=36, out_channels=16, text_dim=32, freq_dim=32,
                                                 ffn_dim=48, num_layers=2).eval())
    settings = BenchSettings(cases=((HELDOUT_SEEDS[0], "recolour"),), size=(32, 32), frames=5, train_steps=1,
                             sample_steps=1)
    out = run_bench(settings, wan_engines(WanWorld(dit, vae.encode, vae.decode, torch.zeros(1, 1, 32)), settings))
    assert list(out["methods"]) == ["vae_ceiling", "i2v", "lora_edit", "lora_edit_ast_rope"]
    for m in out["methods"].values():
        assert all(math.isfinite(m[k]) for k in SCORES) and set(m["by_edit"]) == {"recolour"}
    assert out["methods"]["i2v"]["psnr"] != out["methods"]["lora_edit"]["psnr"]   # lora_edit conditions on the source


def test_memo_encode_encodes_each_clip_once():
    from ffprop.nodes.evaluate.bench import memo_encode

    calls = []
    enc = memo_encode(lambda x: calls.append(1) or x.sum(), keep=2)
    a, b, c = torch.zeros(2, 16, 16, 3), torch.ones(2, 16, 16, 3), torch.full((2, 16, 16, 3), 0.5)
    assert enc(a) == 0 and enc(a.clone()) == 0 and len(calls) == 1
    enc(b), enc(c), enc(a)                                       # a was evicted (keep=2): encoded again
    assert len(calls) == 4


def _world_models_present() -> bool:
    try:
        from ffprop.nodes.world import model

        model.read_manifest()
        return True
    except (ImportError, RuntimeError):
        return False


def test_demo_engine_wan_without_the_world_models_says_which_file_is_missing(tmp_path, capsys):
    if _world_models_present():
        pytest.skip("the bundled world models are present (the demo itself is tested below)")
    assert main(["demo", "--engine", "wan", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--engine wan needs the bundled world models" in err
    assert "manifest.json" in err or "model.py" in err


def test_demo_engine_wan_writes_the_flow_demos_outputs_and_the_truth(tmp_path, capsys):
    if not _world_models_present():
        pytest.skip("the bundled world models (nodes/world/weights) are not in this checkout")
    out = tmp_path / "out"
    assert main(["demo", "--engine", "wan", "-o", str(out)]) == 0
    for name in ("source.mp4", "ground_truth.mp4", "output.mp4", "side_by_side.mp4", "preview.png", "metrics.json"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "metrics.json").read_text())["ground_truth"]
    assert set(scores) == {"lora_edit", "flow", "repeat_first_frame"}
    assert "lora_edit" in capsys.readouterr().out


def test_rooms_add_rows_long_rows_render_their_own_length_and_missing_rows_say_why():
    """Discovery over real room modules (tests/core/bench_rooms: keyframes adds two rows, chunks a 13-frame row,
    lora_edit's module fails to import, content_encoder has none)."""
    import bench_rooms.keyframes.bench as keyframes
    from ffprop.nodes.evaluate.bench import ROOM_ROWS, WanWorld, load_world

    rooms = ("keyframes", "content_encoder", "lora_edit", "chunks")
    settings = BenchSettings(cases=SETTINGS.cases[:1], size=(32, 32), frames=9)
    found = engines(settings, rooms=rooms, package="bench_rooms")
    world, _ = load_world()
    seen_world, seen_settings = keyframes.SEEN[-1]
    assert seen_settings is settings                            # the room got the settings and the world (or None)
    assert isinstance(seen_world, WanWorld) if world is not None else seen_world is None
    assert list(found)[:6] == ["repeat_first_frame", "flow", "vae_ceiling", "i2v", "lora_edit", "lora_edit_ast_rope"]
    assert set(ROOM_ROWS) <= set(found)
    assert ("keyframes_frozen" in found) == (world is not None)
    for row in ("content_encoder", "freeprop", "lora_edit_wan22"):
        assert isinstance(found[row], str) and f"provides '{row}'" in found[row]
        assert "bench_rooms.lora_edit.bench failed to import: ModuleNotFoundError" in found[row]

    picked = engines(settings, ("repeat_first_frame", "keyframes", "chunks", "freeprop"), rooms=rooms,
                     package="bench_rooms")
    assert list(picked) == ["repeat_first_frame", "keyframes", "chunks", "freeprop"]
    out = run_bench(settings, picked)
    json.dumps(out, allow_nan=False)
    assert out["frames"] == 9 and "frames" not in out["methods"]["keyframes"]
    assert out["methods"]["keyframes"]["psnr"] == PSNR_CAP      # the oracle row was scored, not skipped
    assert out["methods"]["chunks"]["frames"] == 13 and out["methods"]["chunks"]["psnr"] == PSNR_CAP
    assert "skipped" in out["methods"]["freeprop"] and out["methods"]["freeprop"]["psnr"] is None
    assert out["methods"]["repeat_first_frame"]["psnr"] < 40
    with pytest.raises(ValueError, match="unknown method 'keyframe'"):
        engines(settings, ("keyframe",), rooms=rooms, package="bench_rooms")


def test_without_room_modules_every_expected_row_is_listed_as_skipped():
    from ffprop.nodes.evaluate.bench import ROOM_ROWS

    found = engines(SETTINGS, rooms=("no_such_room",), package="bench_rooms")
    for row in ROOM_ROWS:
        assert isinstance(found[row], str) and "rooms looked in: no_such_room" in found[row]


@pytest.mark.skipif(not _world_models_present(), reason="the bundled world models are not in this checkout")
def test_chunks_row_chains_a_long_world_scene_and_leaves_the_world_dit_unpatched():
    """nodes/chunks/bench.py: a 17-frame scene in 2 chunks of 9 through the chainer with a trained stage-1 LoRA
    (the row itself: 49 frames in chunks of 17); the LoRA hooks are gone afterwards (same velocity as before)."""
    from ffprop.nodes.chunks import bench as chunks_bench
    from ffprop.nodes.evaluate.bench import load_world
    from ffprop.nodes.host.protocol import WanCond

    assert chunks_bench.engines(None, SETTINGS) == {}
    world, _ = load_world()
    row = chunks_bench.engines(world, SETTINGS)["chunks"]
    assert row.frames == chunks_bench.LONG_FRAMES
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 16, 5, 4, 4, generator=g), torch.randn(1, 16, 5, 4, 4, generator=g)
    keep = torch.zeros(1, 4, 5, 4, 4)
    before = world.dit.predict(x, 0.5, WanCond(keep, cond, world.context))
    s = render_sample(HELDOUT_SEEDS[0], "recolour", size=(32, 32), frames=17)
    settings = BenchSettings(cases=(), size=(32, 32), frames=17, train_steps=2, sample_steps=2)
    res = chunks_bench.chain_world(world, s, settings, chunk_frames=9)
    assert res.seams == (9,) and len(res.seam_jumps) == 1 and len(res.drift["edit"]) == 2
    assert res.video.shape == s.target.shape and torch.isfinite(res.video).all()
    assert torch.equal(world.dit.predict(x, 0.5, WanCond(keep, cond, world.context)), before)


def test_vae_ceiling_is_the_truth_through_the_world_vae_and_bounds_every_generative_row():
    """The ceiling row is decode(encode(truth)); on the bundled world it scores above stock I2V on a scene."""
    from ffprop.nodes.evaluate.bench import load_world, wan_engines

    world, problem = load_world()
    if world is None:
        pytest.skip(f"world models do not load: {problem}")
    settings = BenchSettings(cases=((HELDOUT_SEEDS[2], "recolour"),), sample_steps=4)
    rows = wan_engines(world, settings)
    s = render_sample(HELDOUT_SEEDS[2], "recolour", size=settings.size, frames=settings.frames)
    torch.testing.assert_close(rows["vae_ceiling"](s), world.decode(world.encode(s.target)).clamp(0, 1))
    out = run_bench(settings, {k: rows[k] for k in ("vae_ceiling", "i2v")})["methods"]
    assert out["vae_ceiling"]["psnr"] > out["i2v"]["psnr"] + 1.0
