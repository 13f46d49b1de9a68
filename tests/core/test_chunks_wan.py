"""Chained generation through a tiny random diffusers Wan (DiT + VAE) on CPU with the Euler sampler."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
except (ImportError, RuntimeError) as e:  # e.g. a torchaudio build that does not match torch
    pytest.skip(f"diffusers is installed but its Wan classes do not import here: {e}", allow_module_level=True)

from ffprop.nodes.chunks.chain import chain_chunks, wan_generator  # noqa: E402
from ffprop.nodes.chunks.drift import NO_DRIFT_CONTROL, DriftSettings  # noqa: E402
from ffprop.nodes.chunks.plan import plan_chunks  # noqa: E402
from ffprop.nodes.common import Cancelled  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402
from ffprop.nodes.host.sampling import flow_sigmas, sample  # noqa: E402
from ffprop.nodes.video.synthetic import synthetic_clip  # noqa: E402

TEXT_DIM = 32


class TinyVAE:
    """A random tiny AutoencoderKLWan (causal, x4 time, x8 space) with the diffusers pipeline's normalisation."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                    temperal_downsample=[False, True, True]).eval()
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(3, 0, 1, 2)[None] * 2 - 1
        return (self.vae.encode(x).latent_dist.mode() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latent * self.std + self.mean).sample
        return ((x[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)


def tiny_dit(in_channels: int = 36, seed: int = 0) -> DiffusersWan:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                  in_channels=in_channels, out_channels=16, text_dim=TEXT_DIM, freq_dim=32,
                                  ffn_dim=48, num_layers=2)
    return DiffusersWan(model.eval())


@pytest.fixture(scope="module")
def parts():
    clip = synthetic_clip(num_frames=25, height=64, width=64, seed=5)
    context = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    return clip, tiny_dit(), TinyVAE(), context


def test_sigmas_follow_wans_shifted_schedule():
    s = flow_sigmas(4, shift=5.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(s, 5 * u / (1 + 4 * u)) and s[0] == 1 and s[-1] == 0
    assert torch.allclose(flow_sigmas(4, 1.0), u)
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0)


class LinearDiT:
    """A stand-in WanDiT whose exact velocity is known: the data point is x0, so v = (x_t - x0) / t."""

    def __init__(self, x0):
        self.x0 = x0

    def predict(self, x_t, t, cond):
        return (x_t - self.x0) / t


def test_euler_sampler_recovers_the_data_point_and_cancels():
    x0 = torch.randn(1, 16, 2, 2, 2)
    noise = torch.randn(1, 16, 2, 2, 2)
    out = sample(LinearDiT(x0), WanCond(None, None, torch.zeros(1, 1, 4)), noise, steps=6, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-5), "exact velocity + Euler on a straight path lands on x0"
    calls = []
    with pytest.raises(Cancelled):
        sample(LinearDiT(x0), WanCond(None, None, torch.zeros(1, 1, 4)), noise, 6, 3.0,
               on_step=lambda i, n, p=None: calls.append(i), should_stop=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def test_three_chunk_run_completes_with_seam_metrics(parts):
    clip, dit, vae, context = parts
    plan = plan_chunks(25, 9, 1)
    assert len(plan) == 3
    gen = wan_generator(dit, vae.encode, vae.decode, context, steps=3, shift=3.0, kind="i2v")
    steps = []
    res = chain_chunks(plan, clip.source, clip.edited[0], gen, drift=DriftSettings(), steps_per_chunk=3,
                       on_step=lambda i, n, p=None: steps.append((i, n)))
    assert res.video.shape == clip.source.shape and res.video.device.type == "cpu"
    assert bool(torch.isfinite(res.video).all()) and 0 <= float(res.video.min()) <= float(res.video.max()) <= 1
    assert res.seams == (9, 17)
    diffs = (res.video[1:] - res.video[:-1]).abs().mean((1, 2, 3)).double()     # the definition, all at once
    assert res.seam_jumps == pytest.approx([float(diffs[8] / diffs.median()), float(diffs[16] / diffs.median())],
                                           rel=1e-4), "measured between the chunk's first new frame and the hand-off"
    assert "seam at frame 10" in res.report and "seam at frame 18" in res.report
    assert len(res.drift["background"]) == 3
    assert steps[-1] == (9, 9) and len(steps) >= 9
    # the hand-off: chunk 2's conditioning starts from chunk 1's last output frame, which is in the output
    assert torch.equal(res.heads[1][0], res.video[8]) and torch.equal(res.heads[2][0], res.video[16])


def test_wan_chain_is_seeded_and_prompts_per_chunk_matter(parts):
    clip, dit, vae, context = parts
    plan = plan_chunks(25, 9, 1)
    ctx3 = torch.cat([context, -context, 2 * context])
    run = lambda ctx, n, seed=0: chain_chunks(  # noqa: E731
        plan, clip.source, clip.edited[0], wan_generator(dit, vae.encode, vae.decode, ctx, steps=2, shift=3.0),
        drift=NO_DRIFT_CONTROL, num_prompts=n, seed=seed).video
    a, b = run(context, 1), run(context, 1)
    assert torch.equal(a, b), "same seed, same result"
    c = run(ctx3, 3)
    assert torch.equal(a[:9], c[:9]) and not torch.equal(a[9:], c[9:]), "chunk 1 shares prompt 0; later ones differ"
    assert not torch.equal(a[1:], run(context, 1, seed=1)[1:])


class NaNAtCall:
    """The tiny DiT, except that predict call `at` (1-based) returns one NaN velocity element (a diverging step)."""

    def __init__(self, dit, at: int):
        self.dit, self.at, self.calls = dit, at, 0

    def predict(self, x_t, t, cond):
        self.calls += 1
        v = self.dit.predict(x_t, t, cond)
        if self.calls == self.at:
            v = v.clone()
            v[0, 3, 1, 2, 2] = float("nan")
        return v


def test_a_nan_in_chunk_2_stops_with_an_error_naming_it(parts):
    clip, dit, vae, context = parts
    plan = plan_chunks(25, 9, 1)                                   # chunk 2 = frames 9-17; 2 predict calls a chunk
    poisoned = NaNAtCall(dit, at=3)                                # the first step of chunk 2
    gen = wan_generator(poisoned, vae.encode, vae.decode, context, steps=2, shift=3.0)
    with pytest.raises(RuntimeError, match=r"chunk 2 of 3 \(frames 9-17\) came back from the generator with \d+ "
                                           r"non-finite values") as e:
        chain_chunks(plan, clip.source, clip.edited[0], gen, drift=DriftSettings())
    assert "lower cfg" in str(e.value)
    assert poisoned.calls == 4, "chunk 3 is never sampled"


class Spy:
    """Records what reaches the real encoder and DiT (the conditioning video, the WanCond) and passes it on."""

    def __init__(self, dit, encode):
        self.dit, self.encode_fn, self.videos, self.conds = dit, encode, [], []

    def encode(self, frames):
        self.videos.append(frames.clone())
        return self.encode_fn(frames)

    def predict(self, x_t, t, cond):
        self.conds.append(cond)
        return self.dit.predict(x_t, t, cond)


def test_default_kind_conditions_every_chunk_on_its_source_slice(parts):
    pytest.importorskip("ffprop.nodes.lora_edit.conditioning")
    from ffprop.nodes.video.frames import wan_mask_channels

    clip, dit, vae, context = parts
    plan = plan_chunks(25, 9, 1)
    spy = Spy(dit, vae.encode)
    gen = wan_generator(spy, spy.encode, vae.decode, context, steps=2, shift=3.0)      # default kind
    jobs = []
    res = chain_chunks(plan, clip.source, clip.edited[0], lambda job: jobs.append(job) or gen(job),
                       edit_mask=clip.mask, drift=DriftSettings())
    assert len(spy.videos) == 3 and len(spy.conds) == 6
    for c, chunk in enumerate(plan.chunks):
        video, src, m = spy.videos[c], clip.source[chunk.start:chunk.stop], clip.mask[chunk.start:chunk.stop] > 0.5
        assert torch.equal(video[0], jobs[c].head[0]), "frame 0: the edited frame / the hand-off frame"
        assert torch.equal(video[1:][~m[1:]], src[1:][~m[1:]]), f"chunk {c + 1}: its own source outside the mask"
        assert bool((video[1:][m[1:]] == 0.5).all()), "the edit region is grey (to be generated)"
        keep = (~m).float()
        keep[0] = 1
        assert torch.equal(spy.conds[2 * c].keep_mask, wan_mask_channels(keep)[None]), "keep = 1 outside the mask"
    assert torch.equal(jobs[1].head[0], res.video[8]), "chunk 2 starts from chunk 1's last output frame"
    assert torch.equal(jobs[2].edit_mask, clip.mask[16:25])
    assert res.edit_mask is not None and torch.equal(res.edit_mask[9:], clip.mask[9:])


def test_wan22_pair_switches_experts_at_the_boundary_inside_every_chunk(parts):
    """Two experts (Wan 2.2): in each of the 2 chunks the high-noise expert runs exactly the steps at sigma >=
    0.9 and the low-noise expert the rest, on the same schedule."""
    clip, _, vae, context = parts

    class Counting:
        def __init__(self, dit):
            self.dit, self.ts = dit, []

        def __getattr__(self, name):
            return getattr(self.dit, name)

        def predict(self, x_t, t, cond):
            self.ts.append(float(t))
            return self.dit.predict(x_t, t, cond)

    high, low = Counting(tiny_dit(seed=0)), Counting(tiny_dit(seed=1))
    plan = plan_chunks(17, 9, 1)
    gen = wan_generator(high, vae.encode, vae.decode, context, steps=4, shift=5.0, low_noise_dit=low, boundary=0.9)
    res = chain_chunks(plan, clip.source[:17], clip.edited[0], gen, drift=NO_DRIFT_CONTROL)
    sig = [float(s) for s in flow_sigmas(4, 5.0)[:-1]]
    k = sum(s >= 0.9 for s in sig)
    assert 0 < k < 4 and len(plan) == 2 and res.video.shape == clip.source[:17].shape
    assert high.ts == sig[:k] * len(plan) and low.ts == sig[k:] * len(plan)
