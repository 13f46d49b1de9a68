"""Small real media files for the I/O and CLI tests, written with PyAV (no mocks)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

TONE_HZ = 440.0
SAMPLE_RATE = 44100


def write_clip(path: Path, frames: np.ndarray, fps: int = 25, audio: str | None = "aac") -> Path:
    """H.264 video of `frames` (yuv420p; yuv444p when a side is odd, as 4:2:0 needs even sides), plus a 440 Hz
    mono tone as long as the clip, encoded with `audio` (None: no audio stream)."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv444p" if h % 2 or w % 2 else "yuv420p"
        v.options = {"crf": "12", "preset": "ultrafast"}
        a = c.add_stream(audio, rate=SAMPLE_RATE) if audio else None
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(v.encode())
        if a is not None:
            n = round(t / fps * SAMPLE_RATE)
            tone = (0.3 * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
            for k in range(0, n, 1024):
                fr = av.AudioFrame.from_ndarray(tone[None, k: k + 1024], format="flt", layout="mono")
                fr.sample_rate, fr.pts = SAMPLE_RATE, k
                c.mux(a.encode(fr))
            c.mux(a.encode())
    return path


def audio_of(path: Path) -> tuple[str, int, np.ndarray] | None:
    """(codec, sample rate, mono float samples) of a file's first audio stream; None without audio."""
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        s = c.streams.audio[0]
        chunks = [f.to_ndarray().reshape(f.samples, -1).mean(1) if f.format.is_packed else f.to_ndarray().mean(0)
                  for f in c.decode(s)]
        return s.codec_context.name, s.codec_context.sample_rate, np.concatenate(chunks).astype(np.float64)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])
