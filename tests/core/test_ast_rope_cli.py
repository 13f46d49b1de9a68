"""`ffprop train freeprop` (nodes/ast_rope/cli.py, called through run() as the lead's __main__ will): world pairs
rendered into a folder, a short training run on the bundled world DiT, the one-file model, resume, errors."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("diffusers", reason="the world models need diffusers")


def parse(argv):
    from ffprop.nodes.ast_rope.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="what"))
    return parser.parse_args(["freeprop", *argv])


@pytest.mark.slow
def test_train_freeprop_on_world_pairs_writes_a_loadable_model_and_resumes(tmp_path, capsys):
    from ffprop.nodes.ast_rope.cli import run
    from ffprop.nodes.ast_rope.freeprop import load_freeprop

    try:
        from ffprop.nodes.world.model import read_manifest
        read_manifest()
    except Exception as e:  # noqa: BLE001 - the world engineer may be replacing the weights
        pytest.skip(f"world models unavailable: {e}")
    pairs, out, ck = tmp_path / "pairs", tmp_path / "fp.safetensors", tmp_path / "run.pt"
    common = ["--pairs", str(pairs), "--out", str(out), "--rank", "4", "--variant", "global", "--backend", "torch",
              "--max-frames", "17", "--checkpoint", str(ck), "--checkpoint-every", "1"]
    assert run(parse([*common, "--world-pairs", "2", "--steps", "2"])) == 0
    assert "wrote" in capsys.readouterr().out and ck.is_file()
    loaded = load_freeprop(out)
    assert loaded.predictor is not None and loaded.variant == "global" and loaded.lora.rank == 4
    assert run(parse([*common, "--steps", "3", "--resume"])) == 0            # continues at step 3 only
    assert "3 steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="heads not divisible by the split"):   # the world DiT has one head
        run(parse([*common, "--steps", "1", "--variant", "paper"]))
