"""Cross-host check: the LoRA-Edit trainer, the AST-RoPE predictor trainer and the chunk sampler on one ComfyUI
host, same seeds and tiny models, outputs saved to compare against another host (not a pytest file).

  COMFYUI_DIR=/work/comfy028 /work/comfy028-venv/bin/python tests/nodes/host_outputs.py run /tmp/out028.pt
  COMFYUI_DIR=/work/comfy0364 /work/comfy0364-venv/bin/python tests/nodes/host_outputs.py run /tmp/out0364.pt
  /work/venv/bin/python tests/nodes/host_outputs.py compare /tmp/out028.pt /tmp/out0364.pt
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "e2e")]


def _digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(path: str) -> None:
    from comfy_support import comfyui_dir, import_comfy, load_tiny_comfy_wan, tiny_wan_state_dict

    import_comfy()
    import comfy.sd
    from ffprop.nodes._comfy import pack_video
    from ffprop.nodes.ast_rope.predictor import PredictorConfig
    from ffprop.nodes.ast_rope.train import PredictorSample, PredictorTrainSettings, train_predictor
    from ffprop.nodes.chunks.node import FFPChunkSample
    from ffprop.nodes.chunks.plan import plan_chunks
    from ffprop.nodes.host.comfy import ComfyWan
    from ffprop.nodes.lora_edit.node import FFPTrainLoRAEdit
    from ffprop.nodes.video.synthetic import synthetic_clip
    from test_ast_rope_comfy import make_cond
    from test_lora_edit_nodes import FakeVAE, clip_and_mask, positive

    out = {"host": str(comfyui_dir()), "weights": _digest(tiny_wan_state_dict("i2v"))}
    src, mask = clip_and_mask()
    with torch.inference_mode():
        model = load_tiny_comfy_wan("i2v")
        _, lora, *_ = FFPTrainLoRAEdit.execute(model, FakeVAE(), src, positive(), 4, 0, 1e-2, 4, "all_linears", 0,
                                               "24GB", "trim", "crop", edit_mask=mask).args
    out["lora"] = {k: v.float().clone() for k, v in lora.comfy_state_dict().items()}

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 3, 4, 6, generator=g)
    res = train_predictor(ComfyWan(load_tiny_comfy_wan("i2v")), [PredictorSample(latent, latent, make_cond("i2v"))],
                          PredictorTrainSettings(steps=4, learning_rate=3e-2, backend="torch", seed=5),
                          config=PredictorConfig(width=32, depth=1, heads=2, grid=2))
    out["predictor_losses"] = res.losses
    out["predictor"] = {k: v.clone() for k, v in res.predictor.state_dict().items()}

    from e2e_models import random_wan21_vae_state_dict

    clip = synthetic_clip(num_frames=13, height=64, width=64, seed=2)
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)) * 0.1, {}]]
    neg = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(2)) * 0.1, {}]]
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=random_wan21_vae_state_dict(dtype=torch.float32))
        frames = FFPChunkSample.execute(load_tiny_comfy_wan("i2v"), vae, cond, neg, pack_video(clip.source, 12.0),
                                        clip.edited[:1], plan_chunks(13, 9, 1, "shorten"), "i2v", 0, 2, 1.0, "euler",
                                        "simple", True, True, True, 1.0, "auto").args[1]
    out["chunks"] = frames.float().clone()
    torch.save(out, path)
    print(f"saved {path}: weights {out['weights']}, predictor losses {res.losses}")


def compare(a_path: str, b_path: str) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    print(f"A = {a['host']}\nB = {b['host']}\ntiny weights identical: {a['weights'] == b['weights']}")
    for name in ("lora", "predictor"):
        diff = max(float((a[name][k] - b[name][k]).abs().max()) for k in a[name])
        same = all(torch.equal(a[name][k], b[name][k]) for k in a[name])
        print(f"{name}: {len(a[name])} tensors, bit-identical {same}, max |A - B| {diff:.3g}")
    print(f"predictor losses A {a['predictor_losses']}\n                 B {b['predictor_losses']}")
    d = (a["chunks"] - b["chunks"]).abs()
    print(f"chunk sampler frames {tuple(a['chunks'].shape)}: bit-identical {torch.equal(a['chunks'], b['chunks'])}, "
          f"max |A - B| {float(d.max()):.3g} (0..1 scale), mean {float(d.mean()):.3g}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
