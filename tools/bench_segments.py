"""Benchmark segmented captioning: the cost of a window, and the memory of streaming a long recording.

    python tools/bench_segments.py captions --checkpoint DIR [--threads 2] [--duration 120]
        one segmented clip of --duration seconds (44.1 kHz stereo WAV), for several window lengths and hops:
        seconds to decode + resample, to encode and to beam-search all windows (one engine call), captioning
        seconds per second of window audio (what a limit on segmented requests bounds), and audio minutes
        captioned per minute
    python tools/bench_segments.py stream --audio FILE [--segment 30] [--hop S]
        reads FILE's windows with stream_windows (decode + resample, no captioning): windows, seconds,
        and the process's peak resident memory (ru_maxrss) before and after

Speed goals are checked here, by printing numbers, never by timed tests.
"""

import argparse
import resource
import time
from pathlib import Path

import torch

from bench_model import make_wav
from conette_engine import CaptioningEngine, DecodingOptions
from conette_engine.segments import stream_windows

WINDOWS = [(10.0, None), (29.0, None), (10.0, 2.5)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_captions(args) -> None:
    torch.set_num_threads(args.threads)
    # The limit is lifted to the clip's length times the densest overlap: the point is to measure.
    engine = CaptioningEngine.load(args.checkpoint, max_segmented_duration_s=4 * args.duration + 1)
    wav = make_wav(args.duration, seed=0)
    engine.caption([engine.load_audio(make_wav(10.0, seed=1))])  # warm-up
    print(f"threads {args.threads}; one clip of {args.duration:g} s (44.1 kHz stereo WAV); beam 3")
    print("| segment_s | hop_s | windows | decode + resample s | encoder s | beam search s | caption s | "
          "caption s per window audio s | audio min / min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for segment_s, hop_s in WINDOWS:
        options = DecodingOptions(task=engine.tasks[0], segment_s=segment_s, hop_s=hop_s)
        start = time.perf_counter()
        audio = engine.load_audio(wav, options=options)
        loaded = time.perf_counter()
        timings: dict = {}
        (result,) = engine.caption_segments([audio], [options], timings=timings)
        done = time.perf_counter()
        window_s = sum(s.end_s - s.start_s for s in result.segments)
        print(f"| {segment_s:g} | {hop_s or segment_s:g} | {len(result.segments)} | {loaded - start:.2f} | "
              f"{timings['logmel'] + timings['encoder']:.2f} | {timings['beam_search']:.2f} | {done - loaded:.2f} | "
              f"{(done - loaded) / window_s:.3f} | {args.duration / (done - start):.1f} |", flush=True)


def bench_stream(args) -> None:
    before = peak_rss_mb()
    start = time.perf_counter()
    windows = 0
    last = None
    for window in stream_windows(args.audio, args.segment, args.hop):
        windows += 1
        last = window
    seconds = time.perf_counter() - start
    print(f"{args.audio}: {windows} windows of {args.segment:g} s (hop {args.hop or args.segment:g} s), "
          f"{last.end_s / 3600:.2f} h of audio, read in {seconds:.1f} s ({last.end_s / seconds:.0f}x real time); "
          f"peak RSS {before:.0f} MB after imports, {peak_rss_mb():.0f} MB after streaming")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    captions = commands.add_parser("captions")
    captions.add_argument("--checkpoint", type=Path, required=True)
    captions.add_argument("--threads", type=int, default=torch.get_num_threads())
    captions.add_argument("--duration", type=float, default=120.0)
    stream = commands.add_parser("stream")
    stream.add_argument("--audio", type=Path, required=True)
    stream.add_argument("--segment", type=float, default=30.0)
    stream.add_argument("--hop", type=float)
    args = parser.parse_args()
    (bench_captions if args.command == "captions" else bench_stream)(args)


if __name__ == "__main__":
    main()
