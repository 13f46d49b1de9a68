"""Wan 2.2 I2V A14B: two experts in Wan 2.1's architecture, split by noise level, torch-only.

The high-noise expert denoises the early steps (sigma >= boundary), the low-noise expert the late ones
(sigma < boundary), as Wan 2.2's own sampler does (`t >= boundary * 1000` picks the high-noise model). A
LoRA-Edit LoRA is trained for each expert on its own range only, and every sampler routes each step by its
sigma. Sigma here is flow-matching time t in 0..1 (1 = noise), the value the DiT sees as t * 1000.

The boundary is given as a sigma (Wan 2.2's configs: 0.900 for I2V A14B, 0.875 for T2V A14B) or as a fraction
of the sampling steps (ComfyUI's `percent_to_sigma`: fraction f -> the shifted sigma of uniform time 1 - f).
Which file is which expert is read from its name (`wan2.2_i2v_high_noise_14B...`) where the host knows it, or
said by the user (`EXPERT_ORDERS`); contradictions, two experts of one kind and unequal architectures are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..host.sampling import shifted_sigma

HIGH, LOW = "high_noise", "low_noise"
WAN22_I2V_BOUNDARY = 0.9
"""Wan 2.2 I2V A14B's boundary sigma (its config's `boundary = 0.900`; T2V A14B uses 0.875)."""
BOUNDARY_UNITS = ("sigma", "step_fraction")
EXPERT_ORDERS = ("auto", "model=high_noise", "model=low_noise")
"""auto: from the file names where the host records them, else model = high noise (the first KSamplerAdvanced)."""
TI2V_MESSAGE = ("this MODEL is Wan 2.2 TI2V-5B (48-channel Wan 2.2 latent, per-frame timesteps, no mask channels), "
                "which LoRA-Edit does not support: the mask-aware recipe needs an I2V model with mask channels, "
                "I2V (36 input channels = 16 noise + 4 mask + 16 image), e.g. wan2.1_i2v_480p_14B or the two Wan "
                "2.2 I2V A14B experts (wan2.2_i2v_high_noise_14B + wan2.2_i2v_low_noise_14B). FFProp's other nodes "
                "also take T2V (16) and Fun-Control (48) Wan 2.1-architecture models, never TI2V-5B.")

_NAME = {HIGH: re.compile(r"high[\s_.-]?noise", re.I), LOW: re.compile(r"low[\s_.-]?noise", re.I)}


def check_boundary(value: float, unit: str = "sigma") -> float:
    """ValueError unless 0 < value < 1 and unit is known; returns the value as a float."""
    if unit not in BOUNDARY_UNITS:
        raise ValueError(f"unknown boundary unit '{unit}'; use one of {BOUNDARY_UNITS}.")
    value = float(value)
    if not 0.0 < value < 1.0:
        what = "a sigma" if unit == "sigma" else "a fraction of the steps"
        raise ValueError(f"the expert boundary must lie strictly between 0 and 1 ({what}); got {value:g}. Wan 2.2 I2V "
                         f"A14B switches at sigma {WAN22_I2V_BOUNDARY} (0.5 as a step fraction splits the steps in "
                         "half, like ComfyUI's template at 10 of 20 steps).")
    return value


def boundary_sigma(value: float, unit: str = "sigma", shift: float = 5.0) -> float:
    """The boundary as a sigma: unchanged for unit 'sigma'; a step fraction f is the sigma reached after that
    share of a shifted schedule, shifted_sigma(1 - f, shift) (what ComfyUI's percent_to_sigma gives)."""
    value = check_boundary(value, unit)
    return value if unit == "sigma" else shifted_sigma(1.0 - value, shift)


def expert_from_name(name: Optional[str]) -> Optional[str]:
    """HIGH / LOW when a file name says which expert it is ('..._high_noise_14B_fp16'), else None."""
    if not name:
        return None
    hits = [role for role, rx in _NAME.items() if rx.search(name)]
    return hits[0] if len(hits) == 1 else None


def resolve_experts(order: str, name: Optional[str], name_2: Optional[str]) -> tuple[str, str]:
    """The roles (HIGH/LOW) of `model` and `model_2`. order: one of EXPERT_ORDERS; name / name_2: their file names
    when known. ValueError for two experts of one kind, an order that contradicts the names, or an unknown order."""
    if order not in EXPERT_ORDERS:
        raise ValueError(f"unknown expert order '{order}'; use one of {EXPERT_ORDERS}.")
    seen = (expert_from_name(name), expert_from_name(name_2))
    if seen[0] is not None and seen[0] == seen[1]:
        kind = seen[0].replace("_", "-")
        raise ValueError(f"both models are {kind} experts by their file names ('{name}', '{name_2}'); connect one "
                         f"high-noise and one low-noise expert (wan2.2_i2v_high_noise_14B and "
                         "wan2.2_i2v_low_noise_14B).")
    if order == "auto":
        if seen == (LOW, HIGH) or seen[0] == LOW or seen[1] == HIGH:
            raise ValueError(f"the experts are swapped: 'model' is '{name}' and 'model_2' is '{name_2}', but 'model' "
                             "takes the high-noise expert (the first KSamplerAdvanced) and 'model_2' the low-noise "
                             "one. Swap the two connections, or set experts to model=low_noise if you mean it.")
        return HIGH, LOW
    roles = (HIGH, LOW) if order == "model=high_noise" else (LOW, HIGH)
    for said, found, which, n in ((roles[0], seen[0], "model", name), (roles[1], seen[1], "model_2", name_2)):
        if found is not None and found != said:
            raise ValueError(f"the experts are swapped: experts = {order} says '{which}' is the {said.replace('_', '-')} "
                             f"expert, but its file '{n}' is the {found.replace('_', '-')} one. Swap the connections "
                             "or fix the experts setting.")
    return roles


def check_same_architecture(dims, dims_2) -> None:
    """ValueError naming the differing sizes when two experts are not the same Wan architecture (WanDims)."""
    fields = ("hidden_size", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim", "clip_dim")
    diff = [f"{f} {getattr(dims, f)} vs {getattr(dims_2, f)}" for f in fields if getattr(dims, f) != getattr(dims_2, f)]
    if diff:
        raise ValueError("the two experts have different architectures (" + ", ".join(diff) + "); Wan 2.2 I2V A14B's "
                         "experts are both 14B I2V models of one shape. Load the matching pair (e.g. both fp8 or both "
                         "fp16 files of wan2.2_i2v_high_noise_14B / wan2.2_i2v_low_noise_14B).")


def t_range(role: str, boundary: float) -> tuple[float, float]:
    """The training range [lo, hi) of flow time t for one expert: HIGH [boundary, 1], LOW [0, boundary)."""
    if role not in (HIGH, LOW):
        raise ValueError(f"unknown expert '{role}'; use '{HIGH}' or '{LOW}'.")
    return (boundary, 1.0) if role == HIGH else (0.0, boundary)


def split_step(sigmas, boundary: float) -> int:
    """How many steps of a schedule sigmas [steps + 1] (decreasing) start at sigma >= boundary: the high-noise
    expert's steps (end_at_step of the first KSamplerAdvanced, start_at_step of the second)."""
    s = [float(x) for x in sigmas][:-1]
    return sum(1 for x in s if x >= boundary)


@dataclass
class ExpertPair:
    """A `WanDiT`-shaped router over the two experts: predict(x_t, t, cond) runs `high` when t >= boundary, else
    `low` (one t per call, as every sampler here passes). dims / module / blocks are the high-noise expert's (the
    two are checked to be one architecture)."""

    high: object
    low: object
    boundary: float = WAN22_I2V_BOUNDARY

    def __post_init__(self):
        check_boundary(self.boundary)
        check_same_architecture(self.high.dims, self.low.dims)

    @property
    def dims(self):
        return self.high.dims

    @property
    def module(self):
        return self.high.module

    def blocks(self):
        return self.high.blocks()

    def expert(self, t) -> object:
        value = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)
        return self.high if value >= self.boundary else self.low

    def predict(self, x_t: Tensor, t, cond) -> Tensor:
        if isinstance(t, Tensor) and t.numel() > 1 and len({float(v) >= self.boundary for v in t.reshape(-1)}) > 1:
            raise ValueError("one predict call mixes timesteps on both sides of the expert boundary; call once per "
                             "expert.")
        return self.expert(t).predict(x_t, t, cond)
