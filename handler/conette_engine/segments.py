"""Segmented captioning: which windows of a 32 kHz waveform are captioned, and reading them from long files.

A clip's mono 32 kHz waveform w has n samples. With S = round(segment_s * 32000) and H = round(hop_s * 32000)
(hop_s defaults to segment_s), window k covers samples [k*H, min(k*H + S, n)) for k = 0, 1, ... up to and
including the first window that reaches n (a later one would lie inside it: it adds no audio). So a clip no
longer than one window is one window. A last window shorter than MIN_LAST_WINDOW_S (1 s) is dropped, unless it
is the only one, and the window before it is extended to n. Each window is then captioned exactly as its slice
of w alone would be: w[a:b] as a 32 kHz clip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .audio import SAMPLE_RATE, AudioStream

MIN_LAST_WINDOW_S = 1.0
_MIN_LAST_WINDOW = round(MIN_LAST_WINDOW_S * SAMPLE_RATE)


def window_samples(segment_s: float, hop_s: float | None = None) -> tuple[int, int]:
    """(S, H): the window length and hop in samples at 32 kHz."""
    length = round(segment_s * SAMPLE_RATE)
    hop = length if hop_s is None else round(hop_s * SAMPLE_RATE)
    if not 0 < hop <= length:
        raise ValueError(f"the hop ({hop} samples) must be positive and at most the window ({length} samples)")
    return length, hop


def segment_bounds(n_samples: int, segment_s: float, hop_s: float | None = None) -> list[tuple[int, int]]:
    """The windows of a clip of n_samples at 32 kHz, as (start, stop) sample indices, in time order."""
    if n_samples <= 0:
        raise ValueError(f"a clip has at least one sample, got {n_samples}")
    length, hop = window_samples(segment_s, hop_s)
    bounds = []
    start = 0
    while True:
        bounds.append((start, min(start + length, n_samples)))
        if start + length >= n_samples:
            break
        start += hop
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < _MIN_LAST_WINDOW:
        bounds.pop()
        bounds[-1] = (bounds[-1][0], n_samples)
    return bounds


@dataclass
class Span:
    """Samples [start, stop) of a clip's 32 kHz waveform; the times are exact to the sample."""

    start: int
    stop: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.stop / SAMPLE_RATE


@dataclass
class Window(Span):
    """One window of a recording, with its samples."""

    waveform: Tensor  # (stop - start,) float32, mono, 32 kHz


def stream_windows(source: AudioStream | bytes | str | os.PathLike, segment_s: float, hop_s: float | None = None
                   ) -> Iterator[Window]:
    """The windows of a recording of any length, read in bounded memory, in time order.

    source: an AudioStream, or what AudioStream takes (bytes or a path; video files too). The windows are
    exactly `segment_bounds` of the whole waveform and their samples are exactly its slices (AudioStream
    decodes and resamples exactly as load_audio does). A window is yielded as soon as the samples after it
    show it is neither the last nor extended; memory holds one window and about two resampling blocks.
    """
    stream = source if isinstance(source, AudioStream) else AudioStream(source)
    length, hop = window_samples(segment_s, hop_s)
    pending: list[Tensor] = []  # samples from `offset` on
    offset = 0  # absolute index of the first pending sample
    n_pending = 0
    next_start = 0
    emitted: list[tuple[int, int]] = []

    def take(start: int, stop: int) -> Tensor:
        nonlocal pending
        merged = torch.cat(pending) if len(pending) > 1 else pending[0]
        pending = [merged]
        return merged[start - offset: stop - offset].clone()

    for chunk in stream:
        pending.append(chunk)
        n_pending += chunk.shape[0]
        # Window [s, s + S) is final once a sample exists at s + S + 1 s: then it does not reach the end, and the
        # next window (which starts at most at s + S) is at least 1 s long, so it is not extended either.
        while offset + n_pending >= next_start + length + _MIN_LAST_WINDOW:
            emitted.append((next_start, next_start + length))
            yield Window(next_start, next_start + length, take(next_start, next_start + length))
            next_start += hop
            # Drop what no later window needs.
            merged = torch.cat(pending) if len(pending) > 1 else pending[0]
            drop = min(next_start - offset, merged.shape[0])
            pending, offset, n_pending = [merged[drop:]], offset + drop, n_pending - drop

    bounds = segment_bounds(stream.n_samples, segment_s, hop_s)
    if bounds[: len(emitted)] != emitted:  # the early rule above must agree with the definition
        raise AssertionError(f"streamed windows {emitted} disagree with {bounds[: len(emitted)]}")
    for start, stop in bounds[len(emitted):]:
        yield Window(start, stop, take(start, stop))
