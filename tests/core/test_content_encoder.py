"""GenProp content encoder on tiny random diffusers Wan models (CPU, no ComfyUI): zero-init identity, the generator
untouched by training, each loss term on a case with a known answer, save/load, bad input."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers host needs `pip install diffusers`")
try:
    from diffusers import WanTransformer3DModel  # noqa: F401
except (ImportError, RuntimeError) as e:
    pytest.skip(f"diffusers' WanTransformer3DModel does not import here: {e}", allow_module_level=True)

from ffprop.nodes.content_encoder.attach import attach_diffusers, generator_blocks, predict_mask  # noqa: E402
from ffprop.nodes.content_encoder.files import FORMAT, file_key, load_encoder, save_encoder  # noqa: E402
from ffprop.nodes.content_encoder.losses import (  # noqa: E402
    gradient_loss,
    mpd_loss,
    probe_delta,
    region_losses,
    token_mask,
    total_loss,
)
from ffprop.nodes.content_encoder.model import (  # noqa: E402
    ContentEncoder,
    build_encoder,
    pixel_mask_to_latent,
    pixel_mask_to_mpd,
)
from ffprop.nodes.content_encoder.train import LatentPair, TrainSettings, train_content_encoder  # noqa: E402
from ffprop.nodes.host.diffusers import DiffusersWan  # noqa: E402
from ffprop.nodes.host.protocol import WanCond  # noqa: E402

TEXT_DIM = 32
F, H, W = 3, 4, 6          # latent frames / height / width: 9 pixel frames of 48x32


def tiny(in_channels: int = 36, layers: int = 3, image: bool = False, seed: int = 0, heads: int = 2) -> DiffusersWan:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=in_channels,
            out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=layers,
            image_dim=1280 if image else None, added_kv_proj_dim=heads * 12 if image else None)
    return DiffusersWan(model.eval())


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cond(clip: bool = False, seed: int = 1) -> WanCond:
    keep = torch.zeros(1, 4, F, H, W)
    keep[:, :, 0] = 1
    return WanCond(keep, rand(1, 16, F, H, W, seed=seed), rand(1, 7, TEXT_DIM, seed=seed + 1),
                   rand(1, 257, 1280, seed=seed + 2) if clip else None)


def trained_like(enc: ContentEncoder, seed: int = 5, scale: float = 0.05) -> ContentEncoder:
    """Give the zero-initialised layers random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [enc.fusion.weight, enc.task_embed, *[m.fc2.weight for m in enc.inject]]:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return enc


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("clip", [False, True])
@torch.no_grad()
def test_zero_init_encoder_reproduces_the_generator_bit_for_bit(clip):
    dit = tiny(image=clip)
    enc = build_encoder(dit, 2)
    att, _ = attach_diffusers(dit, enc, rand(1, 16, F, H, W, seed=3), strength=1.0, task="colour_fill")
    x, c = rand(1, 16, F, H, W, seed=4), cond(clip)
    base = dit.predict(x, 0.7, c)
    assert torch.equal(att.predict(x, 0.7, c), base)
    trained_like(enc)
    changed = att.predict(x, 0.7, c)
    assert (changed - base).abs().max() > 1e-4          # the same attachment with trained layers acts
    att0, _ = attach_diffusers(dit, enc, rand(1, 16, F, H, W, seed=3), strength=0.0)
    assert torch.equal(att0.predict(x, 0.7, c), base)   # strength 0 = the generator


@torch.no_grad()
def test_encoder_reads_the_source_and_the_task():
    dit = tiny()
    enc = trained_like(build_encoder(dit, 2))
    x, c = rand(1, 16, F, H, W, seed=4), cond()
    out = {}
    for name, src, task in (("a", 3, 0), ("b", 9, 0), ("task", 3, 2)):
        att, _ = attach_diffusers(dit, enc, rand(1, 16, F, H, W, seed=src), task=task)
        out[name] = att.predict(x, 0.5, c)
    assert (out["a"] - out["b"]).abs().max() > 1e-5
    assert (out["a"] - out["task"]).abs().max() > 1e-5


def test_encoder_is_a_copy_of_the_first_blocks_and_the_last():
    dit = tiny(layers=3)
    enc = build_encoder(dit, 2)
    blocks = dit.blocks()
    for mine, theirs in [(enc.blocks[0], blocks[0]), (enc.blocks[1], blocks[1]), (enc.mpd_block, blocks[2])]:
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(mine.parameters(), theirs.parameters()))
    pe = dit.model.patch_embedding.weight
    assert torch.equal(enc.patch_embed.weight, pe[:, 20:])   # the 16 conditioning-latent channels


@torch.no_grad()
def test_mpd_predicts_one_mask_per_pixel_frame():
    dit = tiny()
    enc = build_encoder(dit, 1)
    att, state = attach_diffusers(dit, enc, rand(1, 16, F, H, W))
    logits = predict_mask(att, state, rand(1, 16, F, H, W, seed=2), cond())
    assert tuple(logits.shape) == (1, 4 * (F - 1) + 1, 8 * H, 8 * W)     # every pixel of every pixel frame
    assert state.mask_logits is None and not state.want_mask      # the probe leaves nothing behind


def test_region_losses_known_answer():
    pred = torch.zeros(1, 16, F, H, W)
    target = torch.full_like(pred, 2.0)                 # squared error 4 everywhere
    mask = torch.zeros(1, 1, F, H, W)
    mask[..., :, :3] = 1                                # half of the width
    l_mask, l_non = region_losses(pred, target, mask)
    assert l_mask.item() == pytest.approx(2.0) and l_non.item() == pytest.approx(2.0)
    mask[..., :, :] = 1
    l_mask, l_non = region_losses(pred, target, mask)
    assert l_mask.item() == pytest.approx(4.0) and l_non.item() == 0.0
    z = torch.tensor(0.0)
    assert total_loss(torch.tensor(1.0), torch.tensor(0.5), z, z).item() == pytest.approx(2.5)   # 0.5 + 2 * 1
    assert total_loss(z, z, torch.tensor(3.0), torch.tensor(4.0)).item() == pytest.approx(7.0)   # beta = gamma = 1


def test_mpd_loss_known_answer():
    import math

    target = torch.zeros(1, 9, 4, 4)
    target[..., :2] = 1                                   # 72 of 144 pixels
    half = math.log(2) + 1 - (2 * 36 + 1) / (72 + 72 + 1)  # sigmoid(0) = 0.5: BCE ln 2, Dice 1 - 73/145
    assert mpd_loss(torch.zeros(1, 9, 4, 4), target).item() == pytest.approx(half)
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert mpd_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mpd_loss(torch.full((1, 9, 4, 4), -50.0), torch.zeros(1, 9, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="MPD logits"):
        mpd_loss(torch.zeros(1, 5, 4, 4), target)


def test_mpd_loss_never_prefers_an_empty_mask_for_a_small_object():
    """The world's objects cover 1-6 % of a frame: predicting nothing must cost more than a mask that finds the object
    and as much again beside it (IoU 0.5). Under GenProp's MSE both cost the object's area (the MPD collapsed)."""
    target = torch.zeros(1, 5, 10, 10)
    target[..., 0, :2] = 1                                # 2 % of each frame
    empty = torch.full_like(target, -6.0)
    half = empty.clone()
    half[..., 0, :4] = 6.0                                # the object + 2 wrong pixels per frame
    assert mpd_loss(empty, target).item() > 2 * mpd_loss(half, target).item()


def test_mpd_time_weight_counts_the_visible_clip_most_and_averages_one():
    from ffprop.nodes.content_encoder.losses import mpd_time_weight

    assert mpd_time_weight(torch.tensor([0.0, 0.5, 1.0])).tolist() == [3.0, 0.75, 0.0]
    t = (torch.arange(10_000) + 0.5) / 10_000
    assert mpd_time_weight(t).mean().item() == pytest.approx(1.0, abs=1e-6)


def _moved_object_pair(i: int) -> tuple[LatentPair, torch.Tensor]:
    """A copy-paste-like latent pair: one latent cell (1/24 of the frame, placed by i) holds an object only the SCE
    input has; the MPD must find its pixels. -> (pair, pixel-rate mask [T, 8H, 8W])."""
    g = torch.Generator().manual_seed(100 + i)
    m = torch.zeros(4 * (F - 1) + 1, 8 * H, 8 * W)
    r, c = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
    m[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1
    lat = pixel_mask_to_latent(m, sigma=0)
    x1 = rand(1, 16, F, H, W, seed=300 + i)
    return LatentPair(x1 + 3.0 * lat, cond(seed=20 + i), x1, lat, pixel_mask_to_mpd(m), 0), m


def test_trained_mask_decoder_finds_a_small_object_it_has_not_seen():
    """Regression for the collapsed MPD (IoU 0.00 on the world): 240 steps on 8 pairs, then pixel IoU >= 0.8 on 4 others
    (with the MSE loss it predicted nothing: IoU 0 on every pair, its loss = the object's area 1/24)."""
    from ffprop.nodes.content_encoder.losses import LossWeights
    from ffprop.nodes.content_encoder.model import mask_iou

    dit = tiny()
    pairs = [_moved_object_pair(i) for i in range(8)]
    res = train_content_encoder(build_encoder(dit, 2), lambda e: attach_diffusers(dit, e, pairs[0][0].sce),
                                lambda i: pairs[i % 8][0], TrainSettings(steps=240, learning_rate=1e-2, ema_decay=0.0,
                                                                         weights=LossWeights(grad=0.0, mpd=4.0)))
    ious = []
    for i in range(8, 12):
        pair, m = _moved_object_pair(i)
        att, state = attach_diffusers(dit, res.encoder, pair.sce)
        prob = torch.sigmoid(predict_mask(att, state, pair.target, pair.cond))[0]
        ious.append(mask_iou(prob, m))
    assert sum(ious) / len(ious) >= 0.8, ious


def _probe_features(enc, dit, mask):
    att, state = attach_diffusers(dit, enc, rand(1, 16, F, H, W, seed=3))
    state.probe = probe_delta(mask, 1e-3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        att.predict(rand(1, 16, F, H, W, seed=4), 0.5, cond())
    return gradient_loss(*state.probed, mask, 1e-3)


def test_gradient_loss_is_zero_for_an_encoder_that_ignores_its_masked_input_and_positive_otherwise():
    dit = tiny()
    mask = torch.zeros(1, 1, F, H, W)
    mask[..., 1:3, 2:4] = 1
    enc = trained_like(build_encoder(dit, 2))
    assert _probe_features(enc, dit, mask).item() > 1e-3        # reads its (masked) input
    with torch.no_grad():
        enc.patch_embed.weight.zero_()                           # now blind to the source latent
    assert _probe_features(enc, dit, mask).item() == 0.0
    enc2 = trained_like(build_encoder(dit, 2))
    assert _probe_features(enc2, dit, torch.zeros_like(mask)).item() == 0.0   # nothing masked, nothing probed
    with pytest.raises(ValueError, match="equal, non-empty"):
        gradient_loss([], [], mask, 1e-3)


def test_probe_stays_inside_the_mask_and_token_mask_pools_patches():
    mask = torch.zeros(1, 1, F, H, W)
    mask[..., 0:2, 0:2] = 1
    d = probe_delta(mask, 1e-3, torch.Generator().manual_seed(0))
    assert tuple(d.shape) == (1, 16, F, H, W) and torch.all(d[..., 2:, :] == 0) and d.abs().max() > 0
    tok = token_mask(mask)
    assert tuple(tok.shape) == (1, F * (H // 2) * (W // 2))
    assert tok.reshape(F, H // 2, W // 2)[:, 0, 0].tolist() == [1.0] * F and tok.sum() == F


def test_latent_masks_repeat_time_and_downsample_space():
    m = torch.zeros(9, 32, 48)
    m[5, :16, :16] = 1                                   # pixel frame 5 = latent frame 2 (frames 5..8)
    lat = pixel_mask_to_latent(m, sigma=0)
    assert tuple(lat.shape) == (1, 1, 3, 4, 6)
    assert lat[0, 0, 2, :2, :2].eq(1).all() and lat[0, 0, :2].eq(0).all() and lat[0, 0, 2, 2:].eq(0).all()
    blurred = pixel_mask_to_latent(m, sigma=1.0)
    assert 0 < blurred[0, 0, 2, 2, 0] < 1                # Gaussian-downsampled: soft next to the edge
    assert torch.equal(pixel_mask_to_mpd(m), m[None])    # the MPD's target: the pixel mask itself


def test_a_perfect_mpd_overlaps_a_world_sized_object_exactly():
    """Regression for the MPD's IoU cap: its target was the 8x8 area average of the mask (one value per latent cell),
    so even a decoder that predicted that target perfectly missed an object smaller than a cell at threshold 0.5 (on
    the world's held-out colour-fill / removal scenes such a perfect decoder scored IoU 0.20 / 0.36). Now the
    target, and the MPD's output, are the pixels: a perfect decoder scores IoU 1."""
    from ffprop.nodes.content_encoder.model import mask_iou, upsample_mask

    m = torch.zeros(9, 32, 48)
    m[:, 5:11, 13:19] = 1                                # 6x6 pixels across four latent cells (2.3 % of a frame)
    target = pixel_mask_to_mpd(m)
    perfect = torch.where(target > 0.5, 50.0, -50.0)     # logits of a decoder that gets its target exactly right
    assert mask_iou(upsample_mask(perfect, 32, 48), m) == 1.0


def _pairs(n=3):
    out = []
    for i in range(n):
        mask = torch.zeros(1, 1, F, H, W)
        mask[..., :2, :3] = 1
        mpd = torch.zeros(1, 4 * (F - 1) + 1, 8 * H, 8 * W)
        mpd[..., :16, :24] = 1
        out.append(LatentPair(rand(1, 16, F, H, W, seed=10 + i), cond(seed=20 + i), rand(1, 16, F, H, W, seed=30 + i),
                              mask, mpd, i % 3))
    return out


def test_training_leaves_the_generator_bit_identical_and_moves_the_encoder():
    dit = tiny()
    before = weights(dit.model)
    flags = [p.requires_grad for p in dit.model.parameters()]
    enc = build_encoder(dit, 2)
    start = weights(enc)
    pairs = _pairs()
    res = train_content_encoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), lambda i: pairs[i % 3],
                                TrainSettings(steps=4, learning_rate=1e-3, batch=2))
    after = weights(dit.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in dit.model.parameters()] == flags       # restored as they were
    moved = weights(res.encoder)
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-5
    assert len(res.losses) == 4 and all(set(p) == {"mask", "non_mask", "grad", "mpd"} for p in res.parts)
    assert res.parts[0]["grad"] == 0.0       # zero-init injection: the features ignore everything at first
    assert res.parts[-1]["grad"] > 0.0       # trained: they react to the masked input and L_grad sees it


def test_training_with_the_lora_edit_block_runner_gives_the_same_weights():
    dit = tiny()
    pairs = _pairs()
    from ffprop.nodes.lora_edit.lowvram import MemorySettings

    out = []
    for mem in (None, MemorySettings(gradient_checkpointing=True)):
        enc = build_encoder(dit, 2)
        res = train_content_encoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), lambda i: pairs[i % 3],
                                    TrainSettings(steps=3, learning_rate=1e-3), memory=mem)
        out.append(weights(res.encoder))
    assert all(torch.allclose(out[0][k], out[1][k], atol=1e-6) for k in out[0])
    att, _ = attach_diffusers(dit, build_encoder(dit, 2), pairs[0].sce)
    assert all(not isinstance(b, type(att.blocks()[0])) for b in generator_blocks(att))


def test_cancel_stops_training_and_restores_the_generator():
    from ffprop.nodes.common import Cancelled

    dit = tiny()
    dit.model.requires_grad_(False)
    pairs = _pairs()
    enc = build_encoder(dit, 2)
    with pytest.raises(Cancelled):
        train_content_encoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), lambda i: pairs[i % 3],
                              TrainSettings(steps=50), should_stop=lambda: True)
    assert not any(p.requires_grad for p in dit.model.parameters())
    assert all("forward" not in b.__dict__ for b in dit.blocks())    # the block runner's wrappers are gone


@torch.no_grad()
def test_save_load_round_trip_gives_the_same_outputs(tmp_path):
    dit = tiny(image=True)
    enc = trained_like(build_encoder(dit, 2))
    path = save_encoder(enc, tmp_path / "enc.safetensors", {"note": "test"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["format"] == FORMAT and meta["depth"] == "2" and meta["note"] == "test"
    assert "blocks.0.self_attn.q.weight" in keys and "mpd_block.cross_attn.k_img.weight" in keys   # ComfyUI naming
    assert "blocks.1.modulation" in keys and "blocks.0.norm3.weight" in keys
    assert file_key("blocks.0.attn1.to_q.weight", True) == "blocks.0.self_attn.q.weight"
    back = load_encoder(path, dit)
    x, c, src = rand(1, 16, F, H, W, seed=4), cond(True), rand(1, 16, F, H, W, seed=3)
    a = attach_diffusers(dit, enc, src, task=1)[0].predict(x, 0.4, c)
    b = attach_diffusers(dit, back, src, task=1)[0].predict(x, 0.4, c)
    assert torch.equal(a, b) and (a - dit.predict(x, 0.4, c)).abs().max() > 1e-5


def test_bad_files_and_mismatched_models_get_clear_errors(tmp_path):
    from safetensors.torch import save_file

    dit = tiny(layers=3)
    path = save_encoder(build_encoder(dit, 3), tmp_path / "n3.safetensors")
    with pytest.raises(ValueError, match=r"depth N = 3 is larger than the generator's 2 blocks"):
        load_encoder(path, tiny(layers=2))
    with pytest.raises(ValueError, match=r"width \(hidden size\) 24 but this model needs 36"):
        load_encoder(path, tiny(layers=3, heads=3))
    with pytest.raises(ValueError, match="generator depth 3 but this model needs 4"):
        load_encoder(path, tiny(layers=4))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "lora.safetensors"), metadata={"ss_network": "lora"})
    with pytest.raises(ValueError, match="is not an FFProp content encoder"):
        load_encoder(tmp_path / "lora.safetensors", dit)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors. is not a readable safetensors file"):
        load_encoder(tmp_path / "junk.safetensors", dit)
    with pytest.raises(FileNotFoundError, match="no content encoder at .*models/ffprop_content_encoder"):
        load_encoder(tmp_path / "gone.safetensors", dit)


def test_a_format_1_file_is_refused_alone_and_keeps_its_sce_under_a_fresh_mpd_head(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    dit = tiny()
    enc = trained_like(build_encoder(dit, 2))
    path = save_encoder(enc, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:              # the same encoder as format 1 wrote it
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("mpd_pixel.")}
        meta = {**f.metadata(), "format": "ffprop_content_encoder/1"}
    state["mpd_head.2.weight"], state["mpd_head.2.bias"] = torch.ones(16, enc.config.dim), torch.ones(16)
    save_file(state, str(tmp_path / "v1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"format-1 content encoder.*--init v1.safetensors --only-mpd"):
        load_encoder(tmp_path / "v1.safetensors", dit)
    back = load_encoder(tmp_path / "v1.safetensors", dit, fresh_mpd_head=True, seed=3)
    fresh = build_encoder(dit, 2, seed=3)
    mine, theirs, new = weights(back), weights(enc), weights(fresh)
    head = [k for k in mine if k.startswith(("mpd_head.", "mpd_pixel."))]
    assert head and all(torch.equal(mine[k], new[k]) for k in head)                     # drawn, not read
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k not in head)          # SCE + MPD block read


def test_only_mpd_training_moves_the_mask_decoder_and_nothing_the_video_depends_on():
    from ffprop.nodes.content_encoder.losses import LossWeights

    dit = tiny()
    enc = trained_like(build_encoder(dit, 2))
    pairs = _pairs()
    x, c = rand(1, 16, F, H, W, seed=4), cond()
    with torch.no_grad():
        video_before = attach_diffusers(dit, enc, pairs[0].sce)[0].predict(x, 0.5, c)
    start = weights(enc)
    res = train_content_encoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), lambda i: pairs[i % 3],
                                TrainSettings(steps=3, learning_rate=1e-2, only_mpd=True,
                                              weights=LossWeights(grad=0.0)))
    moved = weights(res.encoder)
    assert all(torch.equal(moved[k], start[k]) for k in start if not k.startswith("mpd_"))
    assert max((moved[k] - start[k]).abs().max().item() for k in start if k.startswith("mpd_")) > 1e-4
    with torch.no_grad():
        video_after = attach_diffusers(dit, res.encoder, pairs[0].sce)[0].predict(x, 0.5, c)
    assert torch.equal(video_before, video_after)


def test_bad_models_and_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"text-to-video \(T2V\)"):
        build_encoder(tiny(in_channels=16), 1)
    with pytest.raises(ValueError, match="depth N = 5 is larger than the generator's 3 blocks"):
        build_encoder(tiny(), 5)
    with pytest.raises(ValueError, match="whole number >= 1"):
        build_encoder(tiny(), 0)
    dit = tiny()
    for shape in ((F + 1, H, W), (F, H, W + 2), (F, H - 2, W)):        # another length, width, height
        att, _ = attach_diffusers(dit, build_encoder(dit, 1), rand(1, 16, *shape))
        with pytest.raises(ValueError, match="same length and size as the generated video"):
            with torch.no_grad():
                att.predict(rand(1, 16, F, H, W), 0.5, cond())
    with pytest.raises(ValueError, match="made for a generator with 3 blocks but the model has 4"):
        attach_diffusers(tiny(layers=4), build_encoder(dit, 1), rand(1, 16, F, H, W))


@torch.no_grad()
def test_composes_with_lora_edit_and_ast_rope():
    from ffprop.nodes.ast_rope.patch import apply_ast_rope
    from ffprop.nodes.ast_rope.positions import RopeAlphas
    from ffprop.nodes.lora_edit.lora import attach_hooks, create_lora

    dit = tiny()
    x, c, src = rand(1, 16, F, H, W, seed=4), cond(), rand(1, 16, F, H, W, seed=3)
    lora = create_lora(dit, 4, "all_linears", seed=1)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    detach = attach_hooks(dit, lora)
    try:
        with_lora = dit.predict(x, 0.5, c)
        zero = attach_diffusers(dit, build_encoder(dit, 2), src)[0]
        assert torch.equal(zero.predict(x, 0.5, c), with_lora)           # the LoRA still acts through the wrappers
    finally:
        detach()
    roped = apply_ast_rope(dit, RopeAlphas(alpha_s=0.8, alpha_t=0.9), backend="torch")
    zero = attach_diffusers(roped, build_encoder(dit, 2), src)[0]
    assert torch.equal(zero.predict(x, 0.5, c), roped.predict(x, 0.5, c))
    enc = trained_like(build_encoder(dit, 2))
    both = attach_diffusers(roped, enc, src)[0].predict(x, 0.5, c)
    assert (both - attach_diffusers(dit, enc, src)[0].predict(x, 0.5, c)).abs().max() > 1e-6   # AST-RoPE still acts


def test_cli_parses_the_train_command_without_torch():
    import argparse
    import subprocess
    import sys

    from ffprop.nodes.content_encoder.cli import add_parser

    parser = argparse.ArgumentParser(prog="ffprop train")
    add_parser(parser.add_subparsers(dest="what"))
    args = parser.parse_args(["content-encoder", "--out", "x.safetensors", "--depth", "2", "--steps", "5"])
    assert (args.what, args.out, args.depth, args.steps, args.lr) == ("content-encoder", "x.safetensors", 2, 5, 5e-5)
    code = ("import sys, argparse; from ffprop.nodes.content_encoder import cli; "
            "p = argparse.ArgumentParser(); cli.add_parser(p.add_subparsers()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_train_mask_decoder_keeps_the_sce_and_the_video_and_fits_its_pairs():
    """The cached-input MPD trainer (--only-mpd): only mpd_* move, the attached generator's output stays bit for bit,
    and it fits the moved-object pairs it trained on (batches of cached inputs; a fresh head scores ~0)."""
    from ffprop.nodes.content_encoder.model import mask_iou
    from ffprop.nodes.content_encoder.train import MpdSettings, train_mask_decoder

    dit = tiny()
    enc = trained_like(build_encoder(dit, 2))
    pairs = [_moved_object_pair(i)[0] for i in range(6)]
    x, c = rand(1, 16, F, H, W, seed=4), cond()
    with torch.no_grad():
        video_before = attach_diffusers(dit, enc, pairs[0].sce)[0].predict(x, 0.5, c)
    start = weights(enc)
    res = train_mask_decoder(enc, lambda e: attach_diffusers(dit, e, pairs[0].sce), pairs,
                             MpdSettings(steps=150, learning_rate=1e-2, batch=4, flow_times=2, ema_decay=0.0))
    moved = weights(res.encoder)
    assert all(torch.equal(moved[k], start[k]) for k in start if not k.startswith("mpd_"))
    assert max((moved[k] - start[k]).abs().max().item() for k in start if k.startswith("mpd_")) > 1e-4
    assert "mask_logits" not in enc.__dict__   # the capture (an instance attribute) is gone
    with torch.no_grad():
        assert torch.equal(attach_diffusers(dit, res.encoder, pairs[0].sce)[0].predict(x, 0.5, c), video_before)
    ious = []
    for p in pairs:
        att, state = attach_diffusers(dit, res.encoder, p.sce)
        ious.append(mask_iou(torch.sigmoid(predict_mask(att, state, p.target, p.cond))[0], p.mpd_target[0]))
    assert min(ious) >= 0.8, ious
    assert len(res.losses) == 150 and res.losses[-1] < res.losses[0]
