"""Captioning recordings of any length from the client side (conette-caption --segment): windows, answers, subtitles.

A recording is read with the engine's own streamed decoding and resampling (conette_engine.segments.stream_windows),
so its windows are exactly, sample for sample, the windows a server would cut from the whole file. Each window is
sent as a request of its own: its 32 kHz mono float32 samples as a 32 kHz float32 WAV, which the server decodes to
the same samples (float32 WAV is lossless and 32 kHz needs no resampling), so each answer is the server's caption of
that slice. `assemble` puts the answers back together into the answer a server gives for the whole file segmented.
"""

from __future__ import annotations

import struct

SAMPLE_RATE = 32000  # conette_engine.audio.SAMPLE_RATE, without importing torch for it
_WAVE_FORMAT_IEEE_FLOAT = 3


def float_wav_bytes(samples: bytes) -> bytes:
    """A mono 32 kHz float32 WAV holding `samples` (little-endian float32, as Tensor.numpy().tobytes() gives)."""
    fmt = struct.pack("<HHIIHH", _WAVE_FORMAT_IEEE_FLOAT, 1, SAMPLE_RATE, SAMPLE_RATE * 4, 4, 32)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def assemble(windows: list[tuple[int, int, dict]], audio: dict) -> dict:
    """The segmented answer for a recording from its windows' answers.

    windows: (start, stop, answer) in time order, start and stop in 32 kHz samples, answer the server's answer for
    that window alone. audio: the recording's {"duration_s", "sample_rate", "channels"}. The clip-level tags are, per
    label, the highest score over the windows' tags: a label's maximum over the windows reaches the threshold exactly
    when it does in some window, so the windows' thresholded tags are enough.
    """
    best: dict[str, float] = {}
    segments = []
    for start, stop, answer in windows:
        for tag in answer["tags"]:
            best[tag["label"]] = max(best.get(tag["label"], tag["score"]), tag["score"])
        segments.append({
            "start_s": start / SAMPLE_RATE, "end_s": stop / SAMPLE_RATE, "caption": answer["caption"],
            "score": answer["score"], "candidates": answer["candidates"], "tags": answer["tags"],
        })
    first = windows[0][2]
    assembled = {
        "segments": segments,
        "tags": [{"label": label, "score": score} for label, score in sorted(best.items(), key=lambda t: -t[1])],
        "task": first["task"],
        "audio": audio,
    }
    if "model" in first:
        assembled["model"] = first["model"]
    return assembled


# ---------------------------------------------------------------------------------------------- formats


def timestamp(seconds: float, decimal_mark: str = ".") -> str:
    """HH:MM:SS.mmm (SRT wants a comma before the milliseconds, WebVTT a dot)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"


def top_tags(tags: list[dict], n: int) -> list[str]:
    return [tag["label"] for tag in tags[:n]]


def text_lines(answer: dict, n_tags: int) -> list[str]:
    """One line per window: "[00:00:10.000 --> 00:00:20.000] caption", then its top tags in brackets if asked."""
    lines = []
    for segment in answer["segments"]:
        tags = top_tags(segment["tags"], n_tags)
        lines.append(
            f"[{timestamp(segment['start_s'])} --> {timestamp(segment['end_s'])}] {segment['caption']}"
            + (f" [{', '.join(tags)}]" if tags else "")
        )
    return lines


def cues(answer: dict, n_tags: int) -> list[tuple[float, float, str]]:
    """(start_s, end_s, text) per window. Overlapping windows (hop < segment) would give overlapping cues, which
    players stack on screen: cue k then ends where window k + 1 starts, so one caption shows at a time, each from its
    window's start. The text is the caption, with the window's top n_tags tags on a second line."""
    segments = answer["segments"]
    result = []
    for index, segment in enumerate(segments):
        end_s = segment["end_s"]
        if index + 1 < len(segments):
            end_s = min(end_s, segments[index + 1]["start_s"])
        tags = top_tags(segment["tags"], n_tags)
        result.append((segment["start_s"], end_s, segment["caption"] + (f"\n[{', '.join(tags)}]" if tags else "")))
    return result


def srt_text(answer: dict, n_tags: int) -> str:
    return "".join(
        f"{index}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n"
        for index, (start, end, text) in enumerate(cues(answer, n_tags), start=1)
    )


def vtt_text(answer: dict, n_tags: int) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(start)} --> {timestamp(end)}\n{text}\n\n" for start, end, text in cues(answer, n_tags)
    )


SUBTITLE_FORMATS = {"srt": srt_text, "vtt": vtt_text}
