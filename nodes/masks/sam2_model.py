"""SAM2 video predictor: checkpoint reading, size/version inference, model building (torch-only, no ComfyUI).

Uses the `sam2` package (facebookresearch/sam2, PyPI `sam2`, built without its CUDA extension) and its own
hydra configs; nothing is downloaded. Checkpoints: the official `.pt` ({"model": state_dict}, loaded with
weights_only=True) or a `.safetensors` of the same state dict (optionally under a "model." prefix).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import atomic_write, log

SIZES = ("tiny", "small", "base_plus", "large")
VERSIONS = ("2.0", "2.1")
# Hiera trunk per size: (embed_dim, total blocks) -> what tells the checkpoints apart.
_TRUNK = {"tiny": (96, 12), "small": (96, 16), "base_plus": (112, 24), "large": (144, 48)}
_CFG_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
# The official file names, by version and size (what users put in models/sam2).
EXPECTED_FILES = tuple(f"{stem}_hiera_{size}.{ext}" for stem in ("sam2.1", "sam2") for size in SIZES
                       for ext in ("safetensors", "pt"))
EXTENSIONS = (".safetensors", ".pt", ".pth")
INSTALL_HINT = ("install it with: SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0 && "
                "pip install hydra-core iopath")


@dataclass(frozen=True)
class SAM2Spec:
    """What a checkpoint is: size (tiny/small/base_plus/large), version (2.0/2.1), the model's input image_size."""

    size: str
    version: str
    image_size: int = 1024

    @property
    def config_name(self) -> str:
        stem = "sam2.1" if self.version == "2.1" else "sam2"
        return f"configs/{stem}/{stem}_hiera_{_CFG_SUFFIX[self.size]}.yaml"


@dataclass(frozen=True)
class SAM2Model:
    """A built SAM2 video predictor (module in eval mode) and what it is. Treat as read-only: propagation
    keeps all per-video state outside it."""

    module: torch.nn.Module
    spec: SAM2Spec
    path: str = ""

    def describe(self) -> str:
        return f"SAM{self.spec.version} {self.spec.size} at {self.spec.image_size}px ({Path(self.path).name or 'in memory'})"


class SAM2Container(torch.nn.Module):
    """Holds the predictor as `.sam` with a plain, settable `device` attribute (SAM2Base's is a read-only
    property), so a host memory manager (ComfyUI's ModelPatcher) can move it and record where it is."""

    def __init__(self, sam: torch.nn.Module):
        super().__init__()
        self.sam = sam
        self.device = next(sam.parameters()).device


def require_sam2():
    """Import the sam2 package or raise a RuntimeError that says how to install it."""
    try:
        import sam2.build_sam  # noqa: F401
        import sam2.sam2_video_predictor  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the 'sam2' package is not importable ({e}); {INSTALL_HINT}") from e
    return sam2


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("model.") for k in sd) and not any(k.startswith("image_encoder.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A SAM2 state dict from .safetensors or .pt/.pth (torch.load with weights_only=True; the official .pt wraps
    it as {"model": ...}). Raises ValueError for an unknown format or a file that is not a SAM2 checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SAM2 checkpoint '{path}' does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"SAM2 checkpoint '{path.name}' is not a readable safetensors file ({e}).") from e
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"SAM2 checkpoint '{path.name}' could not be read with weights_only=True ({e}). "
                             "Use the official .pt or a .safetensors file.") from e
        sd = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"SAM2 checkpoint '{path.name}' holds {type(obj).__name__}, not a state dict "
                             "({'model': state_dict} or a plain state dict).")
    else:
        raise ValueError(f"SAM2 checkpoint '{path.name}' has an unknown extension '{suffix}'; use one of {EXTENSIONS}.")
    sd = _strip(sd)
    if not any(k.startswith("image_encoder.trunk.blocks.") for k in sd):
        sample = ", ".join(list(sd)[:4])
        raise ValueError(f"'{path.name}' is not a SAM2 checkpoint: it has no 'image_encoder.trunk.blocks.*' keys "
                         f"(first keys: {sample}). Expected the official facebookresearch SAM2/SAM2.1 weights, "
                         f"e.g. {EXPECTED_FILES[0]} or {EXPECTED_FILES[1]}.")
    return sd


def infer_spec(sd: dict[str, torch.Tensor], image_size: int = 1024) -> SAM2Spec:
    """Size from the Hiera trunk (patch-embed width and block count), version from 2.1-only keys
    (`no_obj_embed_spatial`, `obj_ptr_tpos_proj.*`)."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    embed = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    dim = int(embed.shape[0]) if embed is not None else -1
    found = (dim, len(blocks))
    size = next((s for s, trunk in _TRUNK.items() if trunk == found), None)
    if size is None:
        known = ", ".join(f"{s}: dim {d}, {b} blocks" for s, (d, b) in _TRUNK.items())
        raise ValueError(f"unknown SAM2 trunk (embed dim {dim}, {len(blocks)} blocks); known sizes are {known}.")
    version = "2.1" if "no_obj_embed_spatial" in sd or "obj_ptr_tpos_proj.weight" in sd else "2.0"
    return SAM2Spec(size, version, image_size)


def _memory_dtype_hook(module, args, kwargs):
    """SAM2 stores memory features in bfloat16 and relies on CUDA autocast to mix them with float32 weights.
    Without autocast (CPU), a frame whose memory holds no float32 object pointer (an object whose only keyframe
    lies ahead) would feed pure bfloat16 into float32 layers: cast it to the layers' dtype."""
    memory = kwargs.get("memory")
    if memory is not None and not torch.is_autocast_enabled(memory.device.type):
        dtype = next(module.parameters()).dtype
        if memory.dtype != dtype:
            kwargs = {**kwargs, "memory": memory.to(dtype)}
            if kwargs.get("memory_pos") is not None:
                kwargs["memory_pos"] = kwargs["memory_pos"].to(dtype)
    return args, kwargs


def build_model(spec: SAM2Spec, state_dict: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu",
                seed: int | None = None) -> torch.nn.Module:
    """Instantiate the SAM2VideoPredictor for spec from the package's hydra config (with SAM2's video
    post-processing settings) and load state_dict (strict). state_dict None = random init (tests, benchmarks;
    seeded when seed is given)."""
    require_sam2()
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if spec.image_size % 32 or not 128 <= spec.image_size <= 2048:
        raise ValueError(f"SAM2 image_size must be a multiple of 32 in 128..2048; got {spec.image_size}.")
    overrides = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        f"++model.image_size={spec.image_size}",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=0",   # hole filling needs the CUDA extension; skipped like the package does without it
    ]
    cfg = compose(config_name=spec.config_name, overrides=overrides)
    OmegaConf.resolve(cfg)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else None
    if fork is not None:
        fork.__enter__()
        torch.manual_seed(seed)
    try:
        model = instantiate(cfg.model, _recursive_=True)
    finally:
        if fork is not None:
            fork.__exit__(None, None, None)
    model.memory_attention.register_forward_pre_hook(_memory_dtype_hook, with_kwargs=True)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not match SAM{spec.version} {spec.size}: {len(missing)} missing keys "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                             "Set the loader's size/version to 'auto' or to the checkpoint's real size.")
    return model.to(device).eval()


def load_sam2(path: str | os.PathLike, size: str = "auto", version: str = "auto", image_size: int = 1024,
              device: str | torch.device = "cpu") -> SAM2Model:
    """Read a checkpoint, infer (or check) size and version, build the video predictor on device."""
    sd = read_checkpoint(path)
    spec = infer_spec(sd, image_size)
    if size != "auto" and size != spec.size:
        log.warning("FFP SAM2: '%s' looks like %s but size=%s was chosen; using %s", Path(path).name, spec.size, size, size)
        spec = SAM2Spec(size, spec.version, image_size)
    if version != "auto" and version != spec.version:
        spec = SAM2Spec(spec.size, version, image_size)
    model = build_model(spec, sd, device)
    log.info("FFP SAM2: loaded %s", Path(path).name)
    return SAM2Model(model, spec, str(path))


def find_checkpoint(folder_files: list[str], name: str) -> str:
    """Pick `name` from a folder listing; 'auto' = the largest model, 2.1 before 2.0. Raises ValueError with
    the expected file names when nothing is found."""
    sam_files = [f for f in folder_files if f.lower().endswith(EXTENSIONS)]
    if name != "auto":
        if name not in folder_files:
            raise ValueError(f"SAM2 checkpoint '{name}' is not in models/sam2 (found: {sam_files or 'nothing'}).")
        return name
    if not sam_files:
        raise ValueError(f"no SAM2 checkpoint found in models/sam2. Put one of {', '.join(EXPECTED_FILES[:8])} "
                         "(from facebookresearch/sam2) into ComfyUI/models/sam2/, or use engine 'flow'.")

    def rank(f: str) -> tuple[int, int]:
        low = f.lower()
        ver = 1 if "2.1" in low or "2_1" in low else 0
        size = next((i for i, s in enumerate(SIZES[::-1]) if s.replace("_", "") in low.replace("_", "").replace("+", "plus")), 9)
        return (-ver, size)

    return sorted(sam_files, key=rank)[0]


def random_checkpoint(path: str | os.PathLike, size: str = "tiny", version: str = "2.1", seed: int = 0) -> Path:
    """Write a random-weight SAM2 checkpoint (official layout) for tests and benchmarks: .safetensors or .pt
    ({"model": state_dict}). Written to a temp name and renamed."""
    path = Path(path)
    model = build_model(SAM2Spec(size, version, 1024), None, "cpu", seed=seed)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save({"model": sd}, str(tmp))
    return path
