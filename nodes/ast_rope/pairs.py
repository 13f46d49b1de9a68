"""FreeProp training pairs: (source clip, edited clip, prompt) in a documented folder layout, read lazily.

Folder layout (FFP-300K-like; either form, mixed freely):
    <root>/<name>/source.<ext>      the original clip
    <root>/<name>/edited.<ext>      the same clip after the edit (same frame count and size; other sizes are
                                    resized to the source's)
    <root>/<name>/prompt.txt        optional: the prompt of the edited clip (UTF-8, one paragraph)
  or flat:
    <root>/<name>_source.<ext>, <root>/<name>_edited.<ext>, <root>/<name>.txt (optional prompt)
<ext>: mp4, mov, mkv, webm, avi, gif, or a folder of numbered PNG frames is not supported (convert first).
A source without its edited clip (or the reverse) is an error naming the file, never silently skipped.

`write_world_pairs` writes this layout from the procedural world (nodes/world/scenes.py render_sample, training
seeds only). Pairs are decoded when used (`PairSet[i]`), so a dataset is never held in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from torch import Tensor

from ..common import atomic_write, log_once

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")


@dataclass(frozen=True)
class PairFiles:
    """One pair's files: name, source and edited clip paths, and its prompt (None when the pair has none)."""

    name: str
    source: str
    edited: str
    prompt: Optional[str] = None


def _video(folder: Path, stem: str) -> Optional[Path]:
    found = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix.lower() in VIDEO_EXTS]
    return found[0] if found else None


def _prompt(path: Path) -> Optional[str]:
    return path.read_text(encoding="utf-8").strip() or None if path.is_file() else None


def find_pairs(folder: str) -> list[PairFiles]:
    """Every pair under `folder` in the module docstring's layout, sorted by name; ValueError for a missing
    folder, no pairs, or a source/edited clip without its partner."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"pairs folder '{root}' does not exist; give a folder of <name>/source.mp4 + "
                         "<name>/edited.mp4 (or <name>_source.mp4 + <name>_edited.mp4) clips.")
    pairs: list[PairFiles] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        src, ed = _video(sub, "source"), _video(sub, "edited")
        if src is None and ed is None:
            continue
        if src is None or ed is None:
            have, miss = (src or ed), ("source" if src is None else "edited")
            raise ValueError(f"pair '{sub.name}' has {have.name} but no {miss}.<ext> ({', '.join(VIDEO_EXTS)}); "
                             "add it or remove the folder.")
        pairs.append(PairFiles(sub.name, str(src), str(ed), _prompt(sub / "prompt.txt")))
    files = {p.stem: p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS}
    for stem, path in sorted(files.items()):
        for mine, other in (("_source", "_edited"), ("_edited", "_source")):
            if stem.endswith(mine) and stem[: -len(mine)] + other not in files:
                raise ValueError(f"'{path.name}' has no partner '{stem[: -len(mine)]}{other}.<ext>' in '{root}'; "
                                 "add it or remove the file.")
        if stem.endswith("_source"):
            name = stem[: -len("_source")]
            pairs.append(PairFiles(name, str(path), str(files[name + "_edited"]), _prompt(root / f"{name}.txt")))
    if not pairs:
        raise ValueError(f"no clip pairs in '{root}': expected <name>/source.<ext> + <name>/edited.<ext> or files "
                         f"named <name>_source.<ext> and <name>_edited.<ext> ({', '.join(VIDEO_EXTS)}).")
    return sorted(pairs, key=lambda p: p.name)


def load_pair(source_path: str, edited_path: str, max_frames: int = 33) -> tuple[Tensor, Tensor]:
    """Read one pair as IMAGE clips [T, H, W, 3] of equal 4k+1 length (trimmed to <= max_frames) and equal size
    (a multiple of 16), pixel-aligned: an edited clip of another size is first resized to the source's size,
    then both get the same centre crop (the old code cropped the source but resized the edit: misaligned)."""
    from ..video.frames import fix_frame_count, fix_size, resize_frames
    from ..video.io import read_video

    src, _ = read_video(source_path, max_frames=max_frames)
    ed, _ = read_video(edited_path, max_frames=max_frames)
    n = min(src.shape[0], ed.shape[0])
    if n < 5:
        raise ValueError(f"pair '{Path(source_path).name}' / '{Path(edited_path).name}' has {n} common frames; "
                         "FreeProp training needs at least 5 (one latent step).")
    if src.shape[0] != ed.shape[0]:
        log_once(f"pair-len-{source_path}", "FFP FreeProp: %s has %d frames and %s %d; using the first %d of both.",
                 source_path, src.shape[0], edited_path, ed.shape[0], n)
    src, _ = fix_frame_count(src[:n], "trim")
    ed, _ = fix_frame_count(ed[:n], "trim")
    if tuple(ed.shape[1:3]) != tuple(src.shape[1:3]):
        log_once(f"pair-size-{edited_path}", "FFP FreeProp: %s is %dx%d, its source %dx%d; resizing it to the "
                 "source's size.", edited_path, ed.shape[2], ed.shape[1], src.shape[2], src.shape[1])
        ed = resize_frames(ed, src.shape[1], src.shape[2])
    src, _ = fix_size(src, "crop")
    ed, _ = fix_size(ed, "crop")
    return src, ed


@dataclass(frozen=True)
class Pair:
    """A decoded pair: IMAGE clips [T, H, W, 3] in 0..1 and the prompt (None when the pair has none)."""

    name: str
    source: Tensor
    edited: Tensor
    prompt: Optional[str]


class PairSet:
    """A lazily decoded list of pairs: `len()`, `[i]` reads pair i from disk (nothing is cached)."""

    def __init__(self, files: Iterable[PairFiles], max_frames: int = 33):
        self.files = list(files)
        self.max_frames = max_frames

    @classmethod
    def from_folder(cls, folder: str, max_frames: int = 33) -> "PairSet":
        return cls(find_pairs(folder), max_frames)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Pair:
        f = self.files[i]
        src, ed = load_pair(f.source, f.edited, self.max_frames)
        return Pair(f.name, src, ed, f.prompt)


def write_world_pairs(folder: str, seeds: Iterable[int], edits: Iterable[str] | None = None, frames: int = 17,
                      size: tuple[int, int] = (64, 64), fps: float = 8.0) -> list[PairFiles]:
    """Render world pairs (source + ground-truth edited clip, prompt = the edit's name) into `folder` in the
    subfolder layout; seed i gets edit i mod len(edits). Held-out seeds are refused (they are the benchmark's)."""
    from ..video.io import write_video
    from ..world.scenes import EDITS, HELDOUT_SEEDS, render_sample

    edits = tuple(edits or EDITS)
    out = []
    root = Path(folder).expanduser()
    for i, seed in enumerate(seeds):
        if seed in HELDOUT_SEEDS:
            raise ValueError(f"seed {seed} is a held-out world seed ({HELDOUT_SEEDS}); train on training seeds only.")
        edit = edits[i % len(edits)]
        s = render_sample(int(seed), edit, size=size, frames=frames)
        sub = root / f"world_{seed:07d}_{edit}"
        sub.mkdir(parents=True, exist_ok=True)
        write_video(sub / "source.mp4", s.source, fps, crf=0)
        write_video(sub / "edited.mp4", s.target, fps, crf=0)
        prompt = f"{edit.replace('_', ' ')} edit"
        with atomic_write(sub / "prompt.txt") as tmp:
            Path(tmp).write_text(prompt + "\n", encoding="utf-8")
        out.append(PairFiles(sub.name, str(sub / "source.mp4"), str(sub / "edited.mp4"), prompt))
    return out
