"""Chunk plans: split a T-frame clip into Wan-sized 4k+1 chunks chained by their last frame(s). Torch-free.

Chunk c covers source frames [start_c, start_c + length_c); start_{c+1} = start_c + length - overlap, so the
first `overlap` frames of chunk c+1 are the last `overlap` frames of chunk c (the hand-off). The output is
assembled from chunk 0 whole and, for every later chunk, its frames after the overlap: every source frame
appears exactly once. The last chunk rarely fits: policy 'pad_repeat' / 'pad_reflect' generates a full-length
chunk whose missing tail is the last source frame repeated / the clip mirrored back, then trims it; 'shorten'
generates the smallest 4k+1 length that holds the remaining frames (at most 3 padded frames, repeated).
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("pad_repeat", "pad_reflect", "shorten")
MIN_LENGTH = 5


@dataclass(frozen=True)
class Chunk:
    """One generation window. Source frames [start, stop) are real; `length` (4k+1) >= stop - start is what is
    generated, the last `pad` frames being padding (trimmed). `overlap` leading frames are handed off from
    the previous chunk (0 for chunk 0); output frames [start + overlap, stop) come from this chunk."""

    index: int
    start: int
    stop: int
    length: int
    overlap: int

    @property
    def pad(self) -> int:
        return self.length - (self.stop - self.start)

    @property
    def new_frames(self) -> range:
        """Global frame indices this chunk contributes to the output."""
        return range(self.start + self.overlap, self.stop)

    @property
    def latent_frames(self) -> int:
        return (self.length - 1) // 4 + 1


@dataclass(frozen=True)
class ChunkPlan:
    """Immutable plan the chunk nodes read: the clip length, the settings and the chunks in order."""

    num_frames: int
    chunk_length: int
    overlap: int
    policy: str
    chunks: tuple[Chunk, ...]
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def seams(self) -> tuple[int, ...]:
        """First output frame of each chunk after the first (where a chunk border shows in the output)."""
        return tuple(c.start + c.overlap for c in self.chunks[1:])

    @property
    def generated_frames(self) -> int:
        return sum(c.length for c in self.chunks)

    def summary(self) -> str:
        """The frame ranges as text for the user (1-based frame numbers, as video players show them)."""
        lines = [f"{self.num_frames} frames -> {len(self.chunks)} chunk(s) of {self.chunk_length} frames, "
                 f"overlap {self.overlap}, last chunk policy '{self.policy}' "
                 f"({self.generated_frames} frames generated)"]
        for c in self.chunks:
            extra = []
            if c.overlap:
                span = f"frame {c.start + 1}" if c.overlap == 1 else f"frames {c.start + 1}-{c.start + c.overlap}"
                extra.append(f"{span} handed off from chunk {c.index}")
            if c.pad:
                extra.append(f"{c.pad} padded frame(s) trimmed")
            if c.length != self.chunk_length:
                extra.append(f"generated at {c.length} frames")
            lines.append(f"chunk {c.index + 1}: frames {c.start + 1}-{c.stop}, new in output "
                         f"{c.start + c.overlap + 1}-{c.stop}" + (f" ({'; '.join(extra)})" if extra else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def check_chunk_settings(chunk_length: int, overlap: int, policy: str = "pad_repeat") -> None:
    """Raise ValueError for a length that is not 4k+1 (>= 5), an overlap outside 1..length-1, or an unknown policy."""
    if chunk_length < MIN_LENGTH or (chunk_length - 1) % 4:
        lo = max(MIN_LENGTH, chunk_length - (chunk_length - 1) % 4)
        raise ValueError(f"chunk_length must be 4k+1 and at least {MIN_LENGTH} (Wan generates 4k+1 frames: 49, 81); "
                         f"got {chunk_length}. Use {lo} or {lo + 4}.")
    if not 1 <= overlap < chunk_length:
        raise ValueError(f"overlap must be at least 1 (1 = last-frame chaining) and smaller than chunk_length "
                         f"{chunk_length}; got {overlap}. Each chunk must generate at least one new frame.")
    if policy not in POLICIES:
        raise ValueError(f"unknown last chunk policy '{policy}'; use one of {POLICIES}.")


def _fit(frames: int) -> int:
    """Smallest 4k+1 >= frames (and >= 5)."""
    return max(MIN_LENGTH, frames + (-(frames - 1)) % 4)


def plan_chunks(num_frames: int, chunk_length: int = 81, overlap: int = 1, policy: str = "pad_repeat") -> ChunkPlan:
    """Plan the chunks of a num_frames clip. A clip no longer than one chunk gives one chunk (said in notes)."""
    check_chunk_settings(chunk_length, overlap, policy)
    if num_frames < 1:
        raise ValueError(f"the clip has {num_frames} frames; it needs at least 1.")
    stride = chunk_length - overlap
    chunks: list[Chunk] = []
    notes: list[str] = []
    start = 0
    while True:
        stop = min(start + chunk_length, num_frames)
        length = chunk_length if stop - start == chunk_length or policy != "shorten" else _fit(stop - start)
        chunks.append(Chunk(len(chunks), start, stop, length, overlap if chunks else 0))
        if stop == num_frames:
            break
        start += stride
    if len(chunks) == 1 and num_frames < chunk_length:
        notes.append(f"the clip ({num_frames} frames) is shorter than one chunk ({chunk_length}): one chunk of "
                     f"{chunks[0].length} frames, {chunks[0].pad} padded and trimmed")
    elif chunks[-1].pad:
        notes.append(f"last chunk holds {chunks[-1].stop - chunks[-1].start} source frames; {chunks[-1].pad} "
                     f"padded by '{policy}' and trimmed")
    return ChunkPlan(num_frames, chunk_length, overlap, policy, tuple(chunks), tuple(notes))


def source_indices(plan: ChunkPlan, chunk: Chunk) -> list[int]:
    """The source frame index for each of the chunk's `length` frames, padding included (repeat or reflect)."""
    idx = list(range(chunk.start, chunk.stop))
    last = plan.num_frames - 1
    for k in range(chunk.pad):
        if plan.policy == "pad_reflect" and last > 0:
            period = 2 * last                                   # mirror without repeating the end frame
            p = (last + k + 1) % period
            idx.append(p if p <= last else period - p)
        else:
            idx.append(last)
    return idx


def output_owner(plan: ChunkPlan) -> list[tuple[int, int]]:
    """For every output frame, (chunk index, frame index inside that chunk): the assembly map."""
    owner: list[tuple[int, int] | None] = [None] * plan.num_frames
    for c in plan.chunks:
        for g in c.new_frames:
            owner[g] = (c.index, g - c.start)
    assert all(o is not None for o in owner), "plan leaves a frame uncovered"
    return owner  # type: ignore[return-value]
