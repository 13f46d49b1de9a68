"""Local light changes (issue 17): only the edited object enters shade; the patch test must not drop its edit."""

import cv2
import numpy as np
import torch
from ffprop.nodes.flow.engine import FlowSettings, propagate_edit

H, W, S = 72, 96, 24


def _texture(h: int, w: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), sigma) * 0.6 + 0.2


def shaded_square(t_len: int = 10, shade=lambda t: 1.0, seed: int = 3):
    """A textured square moving (2, 1) px per frame over a static textured background; shade(t) darkens the
    square alone (a shadow on the object, the rest of the frame lit as before). -> (uint8 frames, masks)."""
    rng = np.random.default_rng(seed)
    bg, tex = _texture(H, W, rng, 2.0), _texture(S, S, rng, 1.5) * np.float32([1.0, 0.4, 0.3])
    frames, masks = [], []
    for t in range(t_len):
        m = np.float32([[1, 0, 20 + 2 * t], [0, 1, 20 + t]])
        patch = cv2.warpAffine(tex, m, (W, H), flags=cv2.INTER_LINEAR) * np.float32(shade(t))
        cover = cv2.warpAffine(np.ones((S, S), np.float32), m, (W, H), flags=cv2.INTER_LINEAR)[..., None]
        frames.append(bg * (1 - cover) + patch * cover)
        masks.append(cover[..., 0] > 0.5)
    return (np.clip(np.stack(frames), 0, 1) * 255 + 0.5).astype(np.uint8), np.stack(masks)


def _kept(shade) -> dict[bool, list[float]]:
    src, masks = shaded_square(10, shade)
    edited = src[0].copy()
    edited[masks[0]] = edited[masks[0]][:, [2, 1, 0]]                    # recolour: swap red and blue
    src_t, ed_t = (torch.from_numpy(a).float() / 255 for a in (src, edited))
    kept = {}
    for light in (True, False):
        res = propagate_edit(src_t, ed_t, settings=FlowSettings(light=light))
        kept[light] = [float(res.mask[t][torch.from_numpy(masks[t])].mean()) for t in range(4, 8)]
    return kept


def test_shade_on_the_object_alone_keeps_the_edit():
    """The square alone darkens to 60 % for frames 4-7 (most of the frame still matches frame 1 plainly, so the
    frame-wide switch to the lighting-tolerant test does not fire): the edit must stay on the square."""
    kept = _kept(lambda t: 0.6 if 4 <= t <= 7 else 1.0)
    # measured: 0.64-0.71 of the square keeps the edit (1.00 at 75 % light); without the light test 0.00
    assert min(kept[True]) > 0.5 and min(np.subtract(kept[True], kept[False])) > 0.4, kept
