"""LoRA-Edit on the real server (CPU, tiny random Wan 2.1 I2V and tiny Wan 2.2 I2V A14B-layout experts): the
trainer runs and saves a LoRA into models/loras (one per expert for Wan 2.2, named by expert), the stock
LoraLoaderModelOnly loads each file (on its matching expert), and it changes the sampled latent."""

from __future__ import annotations

import pytest
from e2e_media import make_input_file


def sample_graph(models: dict[str, str], lora_name: str | None) -> dict[str, dict]:
    """UNETLoader (-> LoraLoaderModelOnly) -> WanImageToVideo -> KSampler 2 steps -> SaveLatent."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["i2v"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 1, "scale": 1.0}},
        "4": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["3", 0], "negative": ["3", 0], "vae": ["2", 0], "width": 64, "height": 64, "length": 9,
            "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0] if lora_name else ["1", 0], "positive": ["4", 0], "negative": ["4", 1],
            "latent_image": ["4", 2], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                     "filename_prefix": f"latents/ffp_{'lora' if lora_name else 'base'}"}},
    }
    if lora_name:
        g["6"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                 "strength_model": 1.0}}
    return g


def train_graph(models: dict[str, str]) -> dict[str, dict]:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["i2v"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 1, "scale": 1.0}},
        "4": {"class_type": "LoadVideo", "inputs": {"file": "lora_e2e_clip.mp4"}},
        "5": {"class_type": "GetVideoComponents", "inputs": {"video": ["4", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "lora_e2e_mask.png"}},
        "7": {"class_type": "ImageToMask", "inputs": {"image": ["6", 0], "channel": "red"}},
        "8": {"class_type": "FFPTrainLoRAEdit", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "source_video": ["5", 0], "positive": ["3", 0],
            "edit_mask": ["7", 0], "steps": 3, "steps_stage2": 0, "learning_rate": 0.01, "rank": 4,
            "target_modules": "all_linears", "seed": 0, "memory_preset": "8GB", "frame_policy": "trim",
            "size_policy": "crop"}},
        "9": {"class_type": "FFPSaveLoRA", "inputs": {"lora": ["8", 1], "name": "ffp_e2e/lora_edit", "overwrite": True}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 2]}},
    }


def test_trained_lora_loads_with_stock_loader_and_changes_output(comfy_server, tiny_models):
    import safetensors.torch
    import torch

    make_input_file(comfy_server.input_dir, "lora_e2e_clip.mp4", "synthetic_clip_mp4")
    make_input_file(comfy_server.input_dir, "lora_e2e_mask.png", "synthetic_mask_png")
    res = comfy_server.run_prompt(train_graph(tiny_models), timeout=400, label="LoRA-Edit train + save")
    assert res.history["outputs"]["9"]["text"] == ["saved models/loras/ffp_e2e/lora_edit.safetensors"]
    path = comfy_server.models_dir / "loras" / "ffp_e2e" / "lora_edit.safetensors"
    keys = safetensors.torch.load_file(str(path))
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in keys and len(keys) == 2 * 10 * 3
    latents = {}
    for name in (None, "ffp_e2e/lora_edit.safetensors"):
        out = comfy_server.run_prompt(sample_graph(tiny_models, name), timeout=200, label=f"sample lora={name}")
        (f,) = [p for p in out.files if p.suffix == ".latent"]
        latents[name] = safetensors.torch.load_file(str(f))["latent_tensor"]
    base, with_lora = latents[None], latents["ffp_e2e/lora_edit.safetensors"]
    assert base.shape == with_lora.shape == (1, 16, 3, 8, 8)
    diff = (base - with_lora).abs().max().item()
    print(f"max |latent(LoRA) - latent(base)| = {diff:.4g}")
    assert diff > 1e-4 and torch.isfinite(with_lora).all()


def wan22_graph(loras: tuple[str, str] | None, models: dict[str, str]) -> dict[str, dict]:
    """Both experts (-> LoraLoaderModelOnly each) -> two KSamplerAdvanced split at step 2 of 4 -> SaveLatent."""
    from e2e_wan22 import WAN22_EXPERTS

    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": WAN22_EXPERTS["high_noise"], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": WAN22_EXPERTS["low_noise"], "weight_dtype": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "4": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 1, "scale": 1.0}},
        "5": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["4", 0], "negative": ["4", 0], "vae": ["3", 0], "width": 64, "height": 64, "length": 9,
            "batch_size": 1}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["6", 0] if loras else ["1", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 1],
            "latent_image": ["5", 2], "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
        "9": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["7", 0] if loras else ["2", 0], "add_noise": "disable", "noise_seed": 3, "steps": 4, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 1],
            "latent_image": ["8", 0], "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0],
                                                      "filename_prefix": f"latents/ffp_wan22_{'lora' if loras else 'base'}"}},
    }
    if loras:
        for nid, src, name in (("6", "1", loras[0]), ("7", "2", loras[1])):
            g[nid] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [src, 0], "lora_name": name,
                                                                     "strength_model": 1.0}}
    return g


def test_wan22_pair_saves_a_lora_per_expert_that_loads_on_its_expert(comfy_server, tiny_models):
    import safetensors.torch
    import torch
    from e2e_wan22 import WAN22_EXPERTS

    make_input_file(comfy_server.input_dir, "lora_e2e_clip.mp4", "synthetic_clip_mp4")
    make_input_file(comfy_server.input_dir, "lora_e2e_mask.png", "synthetic_mask_png")
    g = train_graph(tiny_models)
    g["1"]["inputs"]["unet_name"] = WAN22_EXPERTS["high_noise"]
    g["11"] = {"class_type": "UNETLoader", "inputs": {"unet_name": WAN22_EXPERTS["low_noise"], "weight_dtype": "default"}}
    g["8"]["inputs"].update({"model_2": ["11", 0], "boundary": 0.9, "boundary_unit": "sigma", "experts": "auto",
                             "steps": 2})
    g["9"]["inputs"]["name"] = "ffp_e2e/wan22"
    g["12"] = {"class_type": "FFPSaveLoRA", "inputs": {"lora": ["8", 4], "name": "ffp_e2e/wan22", "overwrite": True}}
    res = comfy_server.run_prompt(g, timeout=400, label="LoRA-Edit Wan 2.2 pair train + save")
    names = ("ffp_e2e/wan22_high_noise.safetensors", "ffp_e2e/wan22_low_noise.safetensors")
    assert res.history["outputs"]["9"]["text"] == [f"saved models/loras/{names[0]}"]
    assert res.history["outputs"]["12"]["text"] == [f"saved models/loras/{names[1]}"]
    files = [safetensors.torch.load_file(str(comfy_server.models_dir / "loras" / n)) for n in names]
    assert all(len(f) == 2 * 10 * 3 for f in files)
    assert not torch.equal(files[0]["diffusion_model.blocks.0.self_attn.q.lora_up.weight"],
                           files[1]["diffusion_model.blocks.0.self_attn.q.lora_up.weight"])
    latents = {}
    for loras in (None, names):
        out = comfy_server.run_prompt(wan22_graph(loras, tiny_models), timeout=200, label=f"Wan 2.2 pair loras={loras}")
        (f,) = [p for p in out.files if p.suffix == ".latent"]
        latents[loras] = safetensors.torch.load_file(str(f))["latent_tensor"]
    base, with_lora = latents[None], latents[names]
    assert base.shape == with_lora.shape == (1, 16, 3, 8, 8) and torch.isfinite(with_lora).all()
    assert (base - with_lora).abs().max().item() > 1e-4


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
