"""Quality of the embedded flow engine against exact ground truth (issue 17): it measures, it changes nothing.

(a) Real footage, DAVIS bmx-trees (../shared/data/propainter_bmx_trees: 80 frames 432x240, true per-frame masks):
    the truth recolours every frame inside its true mask (hue rotation by HUE_DEG about the grey axis of RGB; greys
    such as the rider's white shirt stay grey). nodes.flow.engine.propagate_edit gets the clean frames and the
    recoloured frame 0, with its edit mask chosen per variant:
      derived     none (the engine derives it from the edit: what `ffprop demo`-style use gets),
      first_mask  the true mask of frame 0 (a mask drawn or clicked on frame 1),
      oracle      the true mask of every frame (as a perfect SAM2 track would give),
      followed    per-frame masks from the no-SAM2 fallback, nodes/masks/flow_track.py track_masks(method=
                  "motion") from the true frame-0 mask (--follower patch: the patch tracker instead); their
                  IoU with the true masks is reported (mean, min, frames under 0.5, ms per frame), and their
                  mean precision (1 - spill onto the background) and recall over frames 2..T.
    The output is written and read back through nodes/video/io (write_video's defaults: H.264 crf 17, yuv420p),
    as a user gets it; so is the untouched source ("source" rows: the same clip with no edit, same encoder).
    Scores on frames 2..T (the ones the engine makes), RGB 0..1, PSNR in dB:
      object    PSNR inside the true mask, vs truth;
      outside   PSNR outside it;
      far_bg    PSNR outside the true mask dilated by the object's motion (the largest frame-to-frame step of
                the mask's centroid, rounded up, + MARGIN px): where no edit, trail or ghost belongs. The
                encoder's ceiling is the source row's far_bg (there truth = source: re-encoding costs only that);
      all       PSNR over whole frames;
      raw_*     the same for the output before encoding (engine error alone);
      missing   per frame where the object is visible (true mask >= VISIBLE of frame 0's area and >= 64 px),
                the share of the edit missing: mean RGB distance to the truth inside the true mask over the
                untouched source's (0 = all there, 1 = no edit); its mean over those frames;
      vanished  the frames where the edit is gone while the object is visible: missing > VANISH (three
                quarters of the recolour gone).
(b) The procedural world (nodes/world/scenes.py render_sample), the held-out seeds of nodes/evaluate/bench.py
    world_cases (--per-edit per edit), 64x64, 17 frames, no encoding (the world benchmark encodes nothing, so the
    ceiling is the cap): rows flow (the world benchmark's flow row: per-frame oracle edit masks) and derived (no
    mask); the same scores over the world's edit mask (object = edit region, outside = the rest) and bench.score's
    psnr / edit_psnr / bg_psnr / warp_error, per edit.
(c) PNG strips in --out (rows source, truth, [before], output at STRIP_FRAMES), one per bmx variant and one per
    world edit, plus results.json and strips.npz (the strip frames). --before DIR (an earlier run's --out) adds
    that run's outputs as a "before" row and its numbers next to these.

Run (CPU, a few minutes on 2 cores):
    nice -n 10 python tests/benchmarks/bench_flow_quality.py [--out /tmp/ffprop_flow_quality] [--before DIR]
        [--per-edit 2] [--variants derived,first_mask,oracle,followed] [--frames 80] [--follower motion|patch]
Needs ../shared/data (FFP_SHARED_DATA) for (a); (b) runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("FFP_SHARED_DATA", REPO.parent / "shared" / "data"))
HUE_DEG = 120.0
MARGIN = 7              # px: FlowSettings' mask_grow (4) + feather (3), how far the engine softens its region
VISIBLE = 0.1
VANISH = 0.75
STRIP_FRAMES = (0, 10, 20, 30, 45, 60, 79)
VARIANTS = ("derived", "first_mask", "oracle", "followed")
WORLD_ROWS = ("flow", "derived")


# ---- ground truth and scores ----------------------------------------------------------------------------

def hue_rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of images [..., 3] (0..1) by `degrees` about RGB's grey axis (greys unchanged), clipped."""
    a = math.radians(degrees)
    c, s, k = math.cos(a), math.sin(a), (1 - math.cos(a)) / 3
    r = s / math.sqrt(3)
    m = torch.tensor([[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]], dtype=images.dtype)
    return (images @ m.T).clamp(0, 1)


def motion_radius(masks: torch.Tensor) -> int:
    """The largest frame-to-frame step (px) of the centroid of masks [T, H, W], rounded up, + MARGIN."""
    ys, xs = torch.meshgrid(torch.arange(masks.shape[1]), torch.arange(masks.shape[2]), indexing="ij")
    area = masks.flatten(1).sum(1)
    cx = (masks * xs).flatten(1).sum(1) / area.clamp(min=1e-6)
    cy = (masks * ys).flatten(1).sum(1) / area.clamp(min=1e-6)
    seen = area > 0
    both = seen[1:] & seen[:-1]
    steps = torch.hypot(cx[1:] - cx[:-1], cy[1:] - cy[:-1])[both]
    return int(math.ceil(float(steps.max()) if len(steps) else 0.0)) + MARGIN


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return torch.from_numpy(np.stack([cv2.dilate((m > 0).astype(np.uint8), k) for m in masks.numpy()])).float()


def missing(out: torch.Tensor, truth: torch.Tensor, source: torch.Tensor, region: torch.Tensor) -> dict[int, float]:
    """{frame (0-based, from 1): share of the edit missing} on the frames where the object is visible (region
    [T, H, W] >= VISIBLE of frame 0's area and >= 64 px): the mean RGB distance of out to the truth inside the
    region over the untouched source's (0 = the edit is all there, 1 = as far from the truth as no edit)."""
    area = region.flatten(1).sum(1)
    shares = {}
    for t in range(1, out.shape[0]):
        if area[t] < max(64.0, VISIBLE * float(area[0])):
            continue
        m = region[t] > 0.5
        d_out = torch.linalg.vector_norm(out[t][m] - truth[t][m], dim=-1).mean()
        d_src = torch.linalg.vector_norm(source[t][m] - truth[t][m], dim=-1).mean()
        if d_src > 0:
            shares[t] = float(d_out / d_src)
    return shares


def edit_kept(out: torch.Tensor, truth: torch.Tensor, source: torch.Tensor, region: torch.Tensor) -> dict:
    """missing: mean share of the edit missing over the visible frames; vanished: the frames where more than
    VANISH of it is missing."""
    shares = missing(out, truth, source, region)
    return {"missing": round(float(np.mean(list(shares.values()))), 3) if shares else None,
            "vanished": [t for t, v in shares.items() if v > VANISH]}


def scores(out: torch.Tensor, truth: torch.Tensor, region: torch.Tensor, far: torch.Tensor) -> dict:
    """PSNRs of out vs truth [T, H, W, 3] on frames 2..T: object (region), outside, far_bg (far), all."""
    from ffprop.nodes.evaluate.bench import weighted_psnr

    o, g, m, f = out[1:].float(), truth[1:].float(), region[1:].float(), far[1:].float()
    return {"object": weighted_psnr(o, g, m), "outside": weighted_psnr(o, g, 1 - m),
            "far_bg": weighted_psnr(o, g, f), "all": weighted_psnr(o, g)}


def encoded(video: torch.Tensor, fps: float, folder: Path) -> torch.Tensor:
    """video written with nodes/video/io write_video's defaults and read back (cropped to its size)."""
    from ffprop.nodes.video.io import read_video, write_video

    path = write_video(folder / "clip.mp4", video, fps)
    back, _ = read_video(path)
    path.unlink()
    return back[:, :video.shape[1], :video.shape[2]]


# ---- (a) bmx-trees --------------------------------------------------------------------------------------

def read_bmx(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = DATA / "propainter_bmx_trees"
    files = sorted((root / "frames").glob("*.jpg"))[:frames]
    masks = sorted((root / "masks").glob("*.png"))[:frames]
    if not files or len(files) != len(masks):
        raise SystemExit(f"bmx-trees frames/masks not found under {root} (set FFP_SHARED_DATA)")
    images = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])
    gt = np.stack([cv2.imread(str(f), 0) > 127 for f in masks])
    return torch.from_numpy(images).float() / 255, torch.from_numpy(gt).float()


def followed_masks(source: torch.Tensor, gt: torch.Tensor, method: str) -> tuple[torch.Tensor, dict]:
    """The fallback follower's masks [T, H, W] float from the true frame-0 mask, and their IoU with gt."""
    from ffprop.nodes.masks.flow_track import track_masks

    frames = (source.numpy() * 255 + 0.5).astype(np.uint8)
    t0 = time.perf_counter()
    masks = np.stack([m[0] for m in track_masks(frames, [gt[0].numpy() > 0.5], method=method)])
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(frames) - 1)
    truth = gt.numpy() > 0.5
    inter = (masks & truth).reshape(len(truth), -1).sum(1)
    ious = inter / np.maximum((masks | truth).reshape(len(truth), -1).sum(1), 1)
    precision = inter / np.maximum(masks.reshape(len(truth), -1).sum(1), 1)     # spill: 1 - precision
    recall = inter / np.maximum(truth.reshape(len(truth), -1).sum(1), 1)
    info = {"method": method, "mean_iou": round(float(ious.mean()), 3), "min_iou": round(float(ious.min()), 3),
            "frames_under_0.5": int((ious < 0.5).sum()), "precision": round(float(precision[1:].mean()), 3),
            "recall": round(float(recall[1:].mean()), 3), "ms_per_frame": round(ms, 1),
            "iou": [round(float(v), 3) for v in ious]}
    print(f"  bmx follower ({method}): mean IoU {info['mean_iou']}, min {info['min_iou']}, "
          f"{info['frames_under_0.5']} frames under 0.5, precision {info['precision']}, recall {info['recall']} "
          f"(frames 2..T), {ms:.0f} ms per frame", file=sys.stderr, flush=True)
    return torch.from_numpy(masks).float(), info


def run_bmx(variants: tuple[str, ...], frames: int, strips: dict, follower: str = "motion") -> dict:
    from ffprop.nodes.flow.engine import propagate_edit

    source, gt = read_bmx(frames)
    m = gt[..., None]
    truth = source * (1 - m) + hue_rotate(source, HUE_DEG) * m
    radius = motion_radius(gt)
    far = 1 - dilate(gt, radius)
    fps = 25.0
    keep = [t for t in STRIP_FRAMES if t < source.shape[0]]
    strips["bmx/source"], strips["bmx/truth"] = source[keep], truth[keep]
    with tempfile.TemporaryDirectory() as tmp:
        src_enc = encoded(source, fps, Path(tmp))
        result = {"frames": int(source.shape[0]), "size": [int(source.shape[2]), int(source.shape[1])],
                  "hue_deg": HUE_DEG, "motion_radius_px": radius,
                  "source": {**scores(src_enc, truth, gt, far), **edit_kept(src_enc, truth, source, gt)}}
        for v in variants:
            if v == "followed":
                mask, result["follower"] = followed_masks(source, gt, follower)
            else:
                mask = {"derived": None, "first_mask": gt[:1], "oracle": gt}[v]
            t0 = time.perf_counter()
            out = propagate_edit(source, truth[0], mask).video.float()
            seconds = time.perf_counter() - t0
            out_enc = encoded(out, fps, Path(tmp))
            raw = {f"raw_{k}": s for k, s in scores(out, truth, gt, far).items()}
            result[v] = {**scores(out_enc, truth, gt, far), **raw, **edit_kept(out_enc, truth, source, gt),
                         "seconds": round(seconds, 2)}
            strips[f"bmx/{v}"] = out_enc[keep]
            print(f"  bmx {v}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return result


# ---- (b) the procedural world ---------------------------------------------------------------------------

def run_world(per_edit: int, strips: dict) -> dict:
    from ffprop.nodes.evaluate.bench import score, true_motion, world_cases
    from ffprop.nodes.flow.engine import propagate_edit
    from ffprop.nodes.world.scenes import render_sample

    rows: dict[str, list[dict]] = {r: [] for r in ("source", *WORLD_ROWS)}
    for seed, edit in world_cases(per_edit):
        s = render_sample(seed, edit)
        region = s.edit_mask
        far = 1 - dilate(region, motion_radius(region))
        motion = true_motion(s.target)
        outs = {"source": s.source, "flow": propagate_edit(s.source, s.edited_first, s.edit_mask).video.float(),
                "derived": propagate_edit(s.source, s.edited_first, None).video.float()}
        for name, out in outs.items():
            rows[name].append({"edit": edit, "seed": seed, **scores(out, s.target, region, far),
                               **{f"bench_{k}": v for k, v in score(out, s, motion).items()},
                               **edit_kept(out, s.target, s.source, region)})
        if f"world/{edit}/truth" not in strips:
            strips[f"world/{edit}/source"], strips[f"world/{edit}/truth"] = s.source, s.target
            for name in WORLD_ROWS:
                strips[f"world/{edit}/{name}"] = outs[name]
    return {name: summarise(r) for name, r in rows.items()}


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("edit", "seed", "vanished")]       # "missing" is averaged

    def mean(rs, k):
        vals = [r[k] for r in rs if r[k] is not None]
        return round(float(np.mean(vals)), 3) if vals else None

    by_edit = {}
    for edit in dict.fromkeys(r["edit"] for r in rows):
        rs = [r for r in rows if r["edit"] == edit]
        by_edit[edit] = {k: mean(rs, k) for k in keys}
        by_edit[edit]["vanished_frames"] = sum(len(r["vanished"]) for r in rs)
        by_edit[edit]["cases"] = len(rs)
    return {"all": {k: mean(rows, k) for k in keys}, "by_edit": by_edit}


# ---- (c) strips, tables ---------------------------------------------------------------------------------

def strip_png(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int) -> None:
    """rows of frames [N, H, W, 3] (0..1) stacked vertically, each labelled on a left margin."""
    lines = []
    for label, frames in rows:
        img = np.concatenate(list((frames.float().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)), 1)
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        pad = np.full((img.shape[0], 110, 3), 255, np.uint8)
        cv2.putText(pad, label, (4, img.shape[0] // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        lines.append(np.concatenate([pad, img], 1))
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(lines, 0), cv2.COLOR_RGB2BGR))


def write_strips(strips: dict, before: dict | None, out: Path) -> list[Path]:
    written = []
    groups = dict.fromkeys(k.rsplit("/", 1)[0] for k in strips)
    for group in groups:
        names = [k.rsplit("/", 1)[1] for k in strips if k.rsplit("/", 1)[0] == group]
        outputs = [n for n in names if n not in ("source", "truth")]
        pick = (lambda a: a) if group == "bmx" else (lambda a: a[::4])  # noqa: E731
        for name in outputs:
            rows = [("source", pick(strips[f"{group}/source"])), ("truth", pick(strips[f"{group}/truth"]))]
            if before is not None and before.get(f"{group}/{name}", torch.empty(0)).shape == strips[f"{group}/{name}"].shape:
                rows.append(("before", pick(before[f"{group}/{name}"])))
            rows.append((name if before is None else f"after: {name}", pick(strips[f"{group}/{name}"])))
            path = out / f"{group.replace('/', '_')}_{name}.png"
            strip_png(rows, path, 1 if group == "bmx" else 3)
            written.append(path)
    return written


def fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def table(result: dict, before: dict | None) -> str:
    def prev(*keys):
        node = before
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    lines = []
    ours, theirs = result["settings"], (before or {}).get("settings", {})
    for section, key in (("bmx", "frames"), ("world", "per_edit")):
        if before is not None and section in before and theirs.get(key) != ours[key]:
            lines.append(f"(the before run has {key}={theirs.get(key)}, this one {ours[key]}: its {section} rows are "
                         "left out, not comparable)")
            before = {k: v for k, v in before.items() if k != section}
    if "bmx" in result:
        b = result["bmx"]
        lines += [f"(a) bmx-trees, {b['frames']} frames {b['size'][0]}x{b['size'][1]}, truth = hue +{b['hue_deg']:g} "
                  f"deg inside the true masks; far_bg = outside the masks dilated by {b['motion_radius_px']} px; "
                  "outputs encoded by write_video (crf 17); PSNR dB on frames 2..T",
                  "  row          object outside  far_bg     all | raw obj raw out raw far |  sec | missing | vanished"]
        for row in ("source", *[v for v in VARIANTS if v in b]):
            r = b[row]
            raw = " ".join(fmt(r.get(k)) + " " for k in ("raw_object", "raw_outside", "raw_far_bg"))
            lines.append(f"  {row:11s} {fmt(r['object'])}  {fmt(r['outside'])}  {fmt(r['far_bg'])}  {fmt(r['all'])} | "
                         f"{raw if row != 'source' else ' ' * 24}| {r.get('seconds', 0):4.1f} | {fmt(r['missing'])}  | "
                         f"{len(r['vanished'])}: {r['vanished'][:10]}{' ...' if len(r['vanished']) > 10 else ''}")
            p = prev("bmx", row)
            if p:
                lines.append(f"   before     {fmt(p['object'])}  {fmt(p['outside'])}  {fmt(p['far_bg'])}  "
                             f"{fmt(p['all'])} |{' ' * 25}|      | {fmt(p.get('missing'))}  | {len(p['vanished'])}")
        lines.append(f"  encoder ceiling (far_bg of the re-encoded source): {fmt(b['source']['far_bg'])} dB")
        if "follower" in b:
            f = b["follower"]
            lines.append(f"  followed: masks of track_masks(method={f['method']!r}) from the true frame-0 mask: mean IoU "
                         f"{f['mean_iou']}, min {f['min_iou']}, {f['frames_under_0.5']} frames under 0.5, precision "
                         f"{f.get('precision')}, recall {f.get('recall')}, {f['ms_per_frame']} ms per frame")
    if "world" in result:
        w = result["world"]
        lines += ["", "(b) world held-out scenes, 64x64x17, no encoding; object = the world's edit mask; "
                  "bench_* = nodes/evaluate/bench.score; PSNR dB on frames 2..T",
                  "  edit          row      object outside  far_bg     all | b_edit   b_bg  warp  | missing | vanished"]
        for edit in w["source"]["by_edit"]:
            for row in ("source", *WORLD_ROWS):
                r = w[row]["by_edit"][edit]
                lines.append(f"  {edit:13s} {row:8s} {fmt(r['object'])}  {fmt(r['outside'])}  {fmt(r['far_bg'])}  "
                             f"{fmt(r['all'])} | {fmt(r['bench_edit_psnr'])} {fmt(r['bench_bg_psnr'])} "
                             f"{r['bench_warp_error']:.4f} | {fmt(r['missing'])}  | {r['vanished_frames']} in "
                             f"{r['cases']} case(s)")
                p = prev("world", row, "by_edit", edit)
                if p and row != "source":
                    lines.append(f"  {'':13s} {'before':8s} {fmt(p['object'])}  {fmt(p['outside'])}  "
                                 f"{fmt(p['far_bg'])}  {fmt(p['all'])} | {fmt(p['bench_edit_psnr'])} "
                                 f"{fmt(p['bench_bg_psnr'])} {p['bench_warp_error']:.4f} | "
                                 f"{fmt(p.get('missing'))}  | {p['vanished_frames']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ffprop_flow_quality",
                    help="folder for results.json, strips.npz and the PNG strips (not inside the repo)")
    ap.add_argument("--before", type=Path, default=None, help="an earlier run's --out: adds 'before' rows")
    ap.add_argument("--per-edit", type=int, default=2, help="held-out world scenes per edit (0 = skip the world)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="bmx variants ('' = skip bmx-trees)")
    ap.add_argument("--frames", type=int, default=80, help="bmx-trees frames (from the first)")
    ap.add_argument("--follower", default="motion", choices=("motion", "patch"),
                    help="the mask follower of the 'followed' variant (nodes/masks/flow_track.py track_masks)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"--out {out} is inside the repository; give a folder outside it (default under /tmp).")
    out.mkdir(parents=True, exist_ok=True)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    before = before_strips = None
    if args.before is not None:
        before = json.loads((args.before / "results.json").read_text())
        with np.load(args.before / "strips.npz") as z:
            before_strips = {k: torch.from_numpy(z[k]).float() / 255 for k in z.files}
    t0 = time.perf_counter()
    strips: dict[str, torch.Tensor] = {}
    result: dict = {"settings": {"frames": args.frames, "per_edit": args.per_edit, "variants": list(variants),
                                 "follower": args.follower,
                                 "hue_deg": HUE_DEG, "vanish": VANISH, "margin_px": MARGIN}}
    if variants:
        result["bmx"] = run_bmx(variants, args.frames, strips, args.follower)
    if args.per_edit > 0:
        result["world"] = run_world(args.per_edit, strips)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    np.savez_compressed(out / "strips.npz", **{k: (v.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
                                               for k, v in strips.items()})
    pngs = write_strips(strips, before_strips, out)
    print(table(result, before))
    print(f"\n{result['seconds']} s; results.json, strips.npz and {len(pngs)} PNG strips in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
