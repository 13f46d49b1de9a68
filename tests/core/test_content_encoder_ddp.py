"""Distributed content-encoder training: 2 gloo processes under torchrun (DDP) give the same weights as one process
on the same data (each process takes half of every batch; noise and t are drawn per pair, not per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers", reason="the tiny generator is a diffusers WanTransformer3DModel")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import diffusers
    from safetensors.torch import save_file
    from ffprop.nodes.content_encoder.attach import attach_diffusers
    from ffprop.nodes.content_encoder.model import build_encoder
    from ffprop.nodes.content_encoder.train import LatentPair, TrainSettings, train_content_encoder
    from ffprop.nodes.host.diffusers import DiffusersWan
    from ffprop.nodes.host.protocol import WanCond

    def setup():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=48, num_layers=3)
        dit = DiffusersWan(model.eval())
        g = torch.Generator().manual_seed(1)
        pairs = []
        for i in range(4):
            keep = torch.zeros(1, 4, 3, 4, 4)
            keep[:, :, 0] = 1
            mask = torch.zeros(1, 1, 3, 4, 4)
            mask[..., :2, :2] = 1
            mpd = torch.zeros(1, 9, 32, 32)           # pixel resolution: 8x the latent grid
            mpd[..., :16, :16] = 1
            cond = WanCond(keep, torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g))
            pairs.append(LatentPair(torch.randn(1, 16, 3, 4, 4, generator=g), cond,
                                    torch.randn(1, 16, 3, 4, 4, generator=g), mask, mpd, i % 3))
        return dit, pairs

    def train():
        dit, pairs = setup()
        enc = build_encoder(dit, 2, seed=3)
        res = train_content_encoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), lambda i: pairs[i % 4],
                                    TrainSettings(steps=3, batch=2, learning_rate=1e-3, ema_decay=0.5))
        return {k: v.contiguous() for k, v in res.encoder.state_dict().items()}, res.losses

    if __name__ == "__main__":
        torch.distributed.init_process_group("gloo")
        state, losses = train()
        if torch.distributed.get_rank() == 0:
            save_file(state, sys.argv[1], metadata={"losses": repr(losses)})
        torch.distributed.destroy_process_group()
''')


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path):
    """The cost is start-up (3 Python processes importing torch + diffusers), not training: the 1-process reference
    trains in this process while the torchrun workers start."""
    from safetensors import safe_open

    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        sys.path.insert(0, str(tmp_path))
        try:
            import ddp_train
        finally:
            sys.path.remove(str(tmp_path))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)            # as the workers (OMP_NUM_THREADS=1): 2 threads reduce in another order
        try:
            single, losses = ddp_train.train()
        finally:
            torch.set_num_threads(threads)
        start = ddp_train.build_encoder(ddp_train.setup()[0], 2, seed=3).state_dict()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    with safe_open(str(out), framework="pt") as f:
        ddp = {k: f.get_tensor(k) for k in f.keys()}
        ddp_losses = eval(f.metadata()["losses"], {})  # noqa: S307 - our own repr of a list of floats
    assert ddp.keys() == single.keys()
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-4     # training moved the weights
    moved = [k for k in single if (single[k] - start[k]).abs().max() > 1e-6]
    assert any(k.startswith("mpd_head.") for k in moved) and any(k.startswith("inject.") for k in moved)
    worst = max((ddp[k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-6, f"2-process weights differ from 1-process by {worst:.2e}"
    assert ddp_losses == pytest.approx(losses, rel=1e-5, abs=1e-7)
