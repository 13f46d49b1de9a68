"""Train FreeProp Model and Train AST-RoPE Predictor on the real server (CPU, tiny random Wan 2.1 I2V): the server
runs every node under inference mode and loads the weights there, so a trainer must make its inputs, LoRA and
predictor outside it and never save an inference-tensor weight for backward (both failed there before: 'Setting
requires_grad=True on inference tensor outside InferenceMode', 'Inference tensors cannot be saved for backward').
The FreeProp file lands in models/ast_rope and Apply FreeProp Model loads it."""

from __future__ import annotations


def train_graph(models: dict[str, str], steps: int = 12) -> dict[str, dict]:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["i2v"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {"class_type": "E2EWanTextConditioning", "inputs": {"tokens": 8, "seed": 1, "scale": 1.0}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 9, "color": 1234567}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "FFPFreePropTrain", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "positive": ["3", 0], "source": ["4", 0], "edited": ["5", 0],
            "steps": steps, "learning_rate": 0.01, "rank": 4, "variant": "global", "spatial_ratio": 0.5,
            "teacher": True, "memory_preset": "unlimited", "seed": 0, "filename": "ffp_e2e/freeprop_train"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    }


def test_freeprop_trainer_runs_on_server_loaded_weights_and_apply_loads_the_file(comfy_server, tiny_models):
    res = comfy_server.run_prompt(train_graph(tiny_models), timeout=400, label="FreeProp train")
    report = " ".join(res.history["outputs"]["8"]["text"])
    assert "saved models/ast_rope/ffp_e2e/freeprop_train.safetensors: 12 steps on 1 pair(s)" in report, report
    assert (comfy_server.models_dir / "ast_rope" / "ffp_e2e" / "freeprop_train.safetensors").is_file()
    apply = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_models["i2v"], "weight_dtype": "default"}},
        "2": {"class_type": "FFPFreePropApply", "inputs": {
            "model": ["1", 0], "freeprop": "ffp_e2e/freeprop_train.safetensors", "strength": 1.0,
            "source_images": ["4", 0], "vae": ["5", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 9, "color": 1234567}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models["vae"]}},
    }
    res = comfy_server.run_prompt(apply, timeout=200, label="FreeProp apply")
    assert " ".join(res.history["outputs"]["3"]["text"]).startswith("FreeProp: LoRA x1")


def test_predictor_trainer_runs_on_server_loaded_weights(comfy_server, tiny_models):
    graph = {k: v for k, v in train_graph(tiny_models).items() if k in ("1", "2", "3", "4")}
    graph["6"] = {"class_type": "FFPASTRoPETrain", "inputs": {
        "model": ["1", 0], "vae": ["2", 0], "positive": ["3", 0], "source_video": ["4", 0], "steps": 3,
        "learning_rate": 1e-3, "variant": "global", "alpha_max": 2.0, "width": 16, "depth": 1, "self_distill": False,
        "lambda_motion": 1.0, "lambda_mmd": 1.0, "seed": 0, "filename": "ffp_e2e/predictor_train"}}
    graph["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}}
    res = comfy_server.run_prompt(graph, timeout=400, label="AST-RoPE predictor train")
    report = " ".join(res.history["outputs"]["8"]["text"])
    assert report.startswith("loss ") and "over 3 steps (1 clip(s))" in report, report
