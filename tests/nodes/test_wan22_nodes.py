"""Wan 2.2 I2V A14B (two experts) in the LoRA-Edit and chunk nodes, on tiny experts in ComfyUI's layout loaded the
way 'Load Diffusion Model' loads them (needs COMFYUI_DIR): each expert trains on its own noise range with only one
expert loaded at a time, the chunk sampler runs the high-noise expert exactly for the steps at sigma >= boundary
(and equals the two stock KSamplerAdvanced), a LoRA on one expert leaves the other expert's range bit-identical,
the saved LoRAs are named by expert and load with LoraLoaderModelOnly on the matching expert, bad pairs are refused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from comfy_support import import_comfy, load_tiny_comfy_wan

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from ffprop.nodes._comfy import pack_video  # noqa: E402
from ffprop.nodes.chunks.node import FFPChunkSample  # noqa: E402
from ffprop.nodes.chunks.plan import plan_chunks  # noqa: E402
from ffprop.nodes.host.comfy import ComfyWan, model_file_name  # noqa: E402
from ffprop.nodes.lora_edit.node import (  # noqa: E402
    FFPLoRAEditConditioning,
    FFPSaveLoRA,
    FFPTrainLoRAEdit,
    comfy_split_step,
    lora_edit_conditioning,
)
from test_lora_edit_nodes import FakeVAE, clip_and_mask, positive, probe_cond  # noqa: E402

import nodes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_models import save_safetensors  # noqa: E402
from e2e_wan22 import TI2V_NAME, WAN22_EXPERTS, tiny_wan22_expert_state_dict, write_wan22_models  # noqa: E402

B = 0.9


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    write_wan22_models(root)
    return root / "diffusion_models"


def load(path: Path):
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))


@pytest.fixture(scope="module")
def experts(files):
    return load(files / WAN22_EXPERTS["high_noise"]), load(files / WAN22_EXPERTS["low_noise"])


def names_known(model) -> bool:
    return model_file_name(model) is not None


def train(model, model_2, **kw):
    src, mask = clip_and_mask()
    args = dict(model=model, vae=FakeVAE(), source_video=src, positive=positive(), steps=2, steps_stage2=0,
                learning_rate=1e-2, rank=4, target_modules="all_linears", seed=0, memory_preset="24GB",
                frame_policy="trim", size_policy="crop", edit_mask=mask, model_2=model_2)
    args.update(kw)
    with torch.inference_mode():
        return FFPTrainLoRAEdit.execute(**args).args


def predict(patcher, x, cond, t=0.5):
    with torch.inference_mode():
        return ComfyWan(patcher).predict(x, t, cond)


class TrainingRecord:
    """Wraps ComfyWan.predict while the pair trains: the t each expert saw, and whether the other expert was
    loaded at any of those calls."""

    def __init__(self, high, low):
        self.high, self.low, self.seen, self.overlap = high, low, {"high": [], "low": []}, []
        self.real = ComfyWan.predict

    def __call__(self, adapter, x_t, t, cond):
        role = "high" if adapter.patcher.model is self.high.model else "low"
        other = self.low.model if role == "high" else self.high.model
        self.seen[role].append(float(torch.as_tensor(t).reshape(-1)[0]))
        out = self.real(adapter, x_t, t, cond)
        loaded = comfy.model_management.current_loaded_models
        self.overlap.extend(lm.model.model is other for lm in loaded if lm.model is not None)
        return out


@pytest.fixture(scope="module")
def trained(experts):
    """One pair training (2 steps per expert, boundary 0.9), recorded; reused by the tests below."""
    high, low = experts
    comfy.model_management.unload_all_models()
    record = TrainingRecord(high, low)
    before = {k: v.clone() for k, v in low.model.diffusion_model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ComfyWan, "predict", lambda self, *a: record(self, *a))
        out = train(high, low, boundary=B)
    return out, record, before


def test_pair_trainer_trains_each_expert_on_its_range_one_resident_at_a_time(experts, trained):
    high, low = experts
    assert ComfyWan(high).kind == "i2v" and ComfyWan(high).dims.clip_dim is None      # A14B layout: no CLIP
    (patched, lora, loss, patched_2, lora_2), record, before = trained
    seen = record.seen
    assert len(seen["high"]) == len(seen["low"]) == 2
    assert all(t >= B - 1e-6 for t in seen["high"]) and all(t < B for t in seen["low"]), seen
    assert record.overlap and not any(record.overlap), "the other expert was loaded while one trained"
    assert lora.expert == "high_noise" and lora_2.expert == "low_noise" and loss.shape == (2, 256, 512, 3)
    assert patched.model is high.model and patched_2.model is low.model and len(patched_2.patches) == 20
    assert all(torch.equal(before[k], v) for k, v in low.model.diffusion_model.state_dict().items())
    x, c = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(9)), probe_cond()
    cond = type(c)(c.keep_mask, c.cond_latent, c.context)
    assert not torch.equal(predict(patched_2, x, cond), predict(low, x, cond))


def test_step_fraction_boundary_trains_through_percent_to_sigma(experts, monkeypatch):
    high, low = experts
    record = TrainingRecord(high, low)
    monkeypatch.setattr(ComfyWan, "predict", lambda self, *a: record(self, *a))
    train(high, low, boundary=0.5, boundary_unit="step_fraction", steps=1)
    sigma = high.get_model_object("model_sampling").percent_to_sigma(0.5)
    assert 0 < sigma < 1 and record.seen["high"][0] >= sigma - 1e-6 and record.seen["low"][0] < sigma


def test_saved_expert_loras_are_named_by_expert_and_load_on_the_matching_expert(experts, trained, tmp_path,
                                                                                  monkeypatch):
    high, low = experts
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    patched, lora, _, patched_2, lora_2 = trained[0]
    name, name_2 = FFPSaveLoRA.execute(lora, "clip", False).args[0], FFPSaveLoRA.execute(lora_2, "clip", False).args[0]
    assert (name, name_2) == ("clip_high_noise.safetensors", "clip_low_noise.safetensors")
    assert FFPSaveLoRA.execute(lora_2, "edit_low_noise", False).args[0] == "edit_low_noise.safetensors"
    x, c = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3)), probe_cond()
    cond = type(c)(c.keep_mask, c.cond_latent, c.context)
    for base, file, ours in ((high, name, patched), (low, name_2, patched_2)):
        loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(base, file, 1.0)[0]
        assert torch.equal(predict(loaded, x, cond), predict(ours, x, cond))
        assert not torch.equal(predict(loaded, x, cond), predict(base, x, cond))


def test_pair_errors(experts, files, tmp_path):
    high, low = experts
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        train(high, low, boundary=1.0)
    with pytest.raises(ValueError, match="the same model"):
        train(high, high.clone())
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        train(high, low, boundary=0.0, boundary_unit="step_fraction")
    three = tiny_wan22_expert_state_dict("low_noise", num_layers=3)
    deeper = load(save_safetensors(three, tmp_path / "wan2.2_i2v_low_noise_deeper.safetensors", "test"))
    with pytest.raises(ValueError, match="different architectures.*num_layers 2 vs 3"):
        train(high, deeper)
    with torch.inference_mode():
        ti2v = load(files / TI2V_NAME)
    src, mask = clip_and_mask()
    for call in (lambda: train(ti2v, None), lambda: train(high, ti2v),
                 lambda: FFPLoRAEditConditioning.execute(positive(), positive(), FakeVAE(), src, src[:1], 0, "trim",
                                                         "crop", "auto", edit_mask=mask, model=ti2v)):
        with pytest.raises(ValueError, match="mask-aware recipe needs an I2V model with mask channels"):
            call()
    if not names_known(high):
        pytest.skip("this ComfyUI records no file name on a MODEL (no cached_patcher_init): name-based expert "
                    "detection is unavailable, the experts setting says which is which")
    with pytest.raises(ValueError, match="swapped"):
        train(low, high)
    with pytest.raises(ValueError, match="swapped"):
        train(high, low, experts="model=low_noise")
    twin = tmp_path / "my_copy_high_noise.safetensors"
    shutil.copy(files / WAN22_EXPERTS["high_noise"], twin)
    with pytest.raises(ValueError, match="both models are high-noise experts"):
        train(high, load(twin))
    assert train(low, high, experts="model=low_noise", steps=1)[1].expert == "low_noise"


def test_conditioning_split_step_follows_the_models_schedule(experts):
    high, _ = experts
    shifted = nodes_model_sampling(high, 8.0)
    src, mask = clip_and_mask()
    out = FFPLoRAEditConditioning.execute(positive(), positive(), FakeVAE(), src, src[:1], 0, "trim", "crop", "auto",
                                          edit_mask=mask, model=shifted, steps=20, scheduler="simple").args
    assert len(out) == 4 and out[3] == 10                     # ComfyUI's Wan 2.2 template: 10 of 20 steps
    assert comfy_split_step(shifted, 20, "simple", 0.25, "step_fraction") == 5
    assert FFPLoRAEditConditioning.execute(positive(), positive(), FakeVAE(), src, src[:1], 0, "trim", "crop",
                                           "auto", edit_mask=mask).args[3] == 10     # no model: flow schedule, shift 8


def nodes_model_sampling(model, shift):
    import comfy_extras.nodes_model_advanced as adv

    node = adv.ModelSamplingSD3
    return node.execute(model, shift).args[0] if hasattr(node, "execute") else node().patch(model, shift)[0]


class Recorder:
    """APPLY_MODEL wrapper on a clone: records (sigma, denoised output) of every model call while sampling."""

    def __init__(self, model):
        self.calls = []
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "ffp_test", self)

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.calls.append((float(args[1].reshape(-1)[0]), out.clone()))
        return out


class ToyVAE(FakeVAE):
    """FakeVAE plus decode(latent [1, 16, F, h, w]) -> IMAGE [4(F-1)+1, 8h, 8w, 3] (the real random Wan VAE takes
    minutes on two cores here; the sampler routing under test does not depend on it)."""

    def decode(self, latent):
        x = torch.sigmoid(latent[0, :3]).movedim(0, -1)                     # [F, h, w, 3]
        x = torch.cat([x[:1], x[1:].repeat_interleave(4, 0)])
        return x.repeat_interleave(8, 1).repeat_interleave(8, 2)


@pytest.fixture(scope="module")
def vae():
    return ToyVAE()


def chunk_sample(high, low, vae, clip, mask, plan, steps=4):
    with torch.inference_mode():
        return FFPChunkSample.execute(high, vae, positive(), positive(4), pack_video(clip, 8.0), clip[:1], plan,
                                      "lora_edit", 3, steps, 1.0, "euler", "simple", False, False, False, 0.0,
                                      "auto", edit_mask=mask, model_2=low, boundary=B).args[1]


def test_chunk_sampler_switches_experts_at_the_boundary_in_every_chunk_like_two_ksampler_advanced(experts, vae):
    high, low = (nodes_model_sampling(m, 8.0) for m in experts)
    g = torch.Generator().manual_seed(1)
    clip, mask = torch.rand(13, 32, 32, 3, generator=g), torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    steps = 6
    split = comfy_split_step(high, steps, "simple", B, "sigma")
    assert 0 < split < steps
    rh, rl = Recorder(high), Recorder(low)
    frames = chunk_sample(rh.model, rl.model, vae, clip, mask, plan_chunks(13, 9, 1, "pad_repeat"), steps)
    assert frames.shape == (13, 32, 32, 3)
    assert len(rh.calls) == 2 * split and len(rl.calls) == 2 * (steps - split)        # 2 chunks, cfg 1
    assert all(s >= B for s, _ in rh.calls) and all(s < B for s, _ in rl.calls)
    # one chunk: exactly the two stock KSamplerAdvanced (high: 0..split with leftover noise, low: split..end)
    one = plan_chunks(9, 9, 1)
    ours = chunk_sample(high, low, vae, clip[:9], mask, one, steps)
    with torch.inference_mode():
        pos, neg, latent = lora_edit_conditioning(positive(), positive(4), vae, clip[:9], mask, clip[:1])
        adv = nodes.KSamplerAdvanced()
        x = adv.sample(high, "enable", 3, steps, 1.0, "euler", "simple", pos, neg, latent, 0, split, "enable")[0]
        x = adv.sample(low, "disable", 3, steps, 1.0, "euler", "simple", pos, neg, x, split, 10000, "disable")[0]
        stock = vae.decode(x["samples"])[:9].float()
    assert torch.equal(ours, stock)


def test_a_lora_on_one_expert_leaves_the_other_range_bit_identical(experts, trained, vae):
    high, low = (nodes_model_sampling(m, 8.0) for m in experts)
    patched, _, _, patched_2, _ = trained[0]
    patched, patched_2 = nodes_model_sampling(patched, 8.0), nodes_model_sampling(patched_2, 8.0)
    g = torch.Generator().manual_seed(2)
    clip, mask = torch.rand(9, 32, 32, 3, generator=g), torch.zeros(1, 32, 32)
    mask[:, 4:20, 4:20] = 1
    plan = plan_chunks(9, 9, 1)
    runs = {}
    for key, (h, lo) in {"base": (high, low), "low_lora": (high, patched_2), "high_lora": (patched, low)}.items():
        rh, rl = Recorder(h), Recorder(lo)
        chunk_sample(rh.model, rl.model, vae, clip, mask, plan)
        runs[key] = (rh.calls, rl.calls)
    base, low_lora, high_lora = runs["base"], runs["low_lora"], runs["high_lora"]
    # the low-noise expert's LoRA: every high-noise step bit-identical, the low-noise steps change
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(base[0], low_lora[0]))
    assert not torch.equal(base[1][0][1], low_lora[1][0][1])
    # the high-noise expert's LoRA changes its own first step; the low-noise steps are the base expert's calls
    assert not torch.equal(base[0][0][1], high_lora[0][0][1])
    assert [s for s, _ in high_lora[1]] == [s for s, _ in base[1]]


def test_chunk_sampler_refuses_ti2v_and_swapped_pairs(experts, files, vae):
    high, low = experts
    clip = torch.rand(9, 32, 32, 3)
    with torch.inference_mode():
        ti2v = load(files / TI2V_NAME)
    with pytest.raises(ValueError, match="mask-aware recipe needs an I2V model"):
        chunk_sample(high, ti2v, vae, clip, None, plan_chunks(9, 9, 1))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        with torch.inference_mode():
            FFPChunkSample.execute(high, vae, positive(), positive(), pack_video(clip, 8.0), clip[:1],
                                   plan_chunks(9, 9, 1), "lora_edit", 0, 2, 1.0, "euler", "simple", False, False,
                                   False, 0.0, "auto", model_2=low, boundary=1.0)
    t2v = load_tiny_comfy_wan("t2v")
    with pytest.raises(ValueError, match="t2v model but the chunk sampler needs a Wan i2v"):
        chunk_sample(high, t2v, vae, clip, None, plan_chunks(9, 9, 1))
