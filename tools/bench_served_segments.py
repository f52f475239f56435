#!/usr/bin/env python
"""Segmented captioning through a private TorchServe: throughput, and short requests next to a long one.

    PYTHONPATH=tests python tools/bench_served_segments.py --checkpoint DIR [--duration 180] [--segment 10]
                                                            [--requests 3] [--short 5] [--no-batch]

Builds a .mar from DIR, serves it on free loopback ports (tools/served.py) and sends raw m4a bodies (AAC 44.1 kHz
stereo white noise, FFmpeg-made) to POST /conette/predict:
  - one segmented request of --duration s (segment_s=--segment) at a time, --requests times: seconds each and
    audio minutes captioned per minute;
  - a full batch: 8 such requests at once (the worst batch the limits allow): seconds until the last answer;
  - short requests (--short s, whole clip) one after another, first alone, then while one long segmented request
    is being served: their latencies.
Prints the numbers and the load average; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from audio_factory import audio_bytes
from served import served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of the long recording")
    parser.add_argument("--segment", type=float, default=10.0, help="segment_s of the long requests")
    parser.add_argument("--requests", type=int, default=3, help="long requests sent one at a time")
    parser.add_argument("--short", type=float, default=5.0, help="seconds of the short clips")
    parser.add_argument("--no-batch", dest="batch", action="store_false", help="skip the 8-at-once batch")
    args = parser.parse_args()
    long_clip = audio_bytes("m4a", seconds=args.duration, sample_rate=44100, channels=2, signal="noise")
    short_clip = audio_bytes("m4a", seconds=args.short, sample_rate=44100, channels=2, signal="noise", seed=3)
    wav = {"Content-Type": "audio/mp4"}

    with served(args.checkpoint) as server:
        def check(response) -> None:
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}: {response.text}\n{server.log_tail()}")

        def long_request() -> float:
            start = time.perf_counter()
            response = server.request("POST", "/conette/predict", params={"segment_s": str(args.segment)},
                                      data=long_clip, headers=wav, timeout=600)
            check(response)
            return round(time.perf_counter() - start, 3)

        def short_request() -> float:
            start = time.perf_counter()
            response = server.request("POST", "/conette/predict", data=short_clip, headers=wav, timeout=600)
            check(response)
            return round(time.perf_counter() - start, 3)

        print(f"load average before: {os.getloadavg()}")
        long_request()  # warm-up
        alone = [long_request() for _ in range(args.requests)]
        per = statistics.median(alone)
        print(f"one {args.duration:g} s segmented request (segment_s={args.segment:g}): {per:.2f} s median of "
              f"{alone}; {args.duration / per:.1f} audio min / min")

        if args.batch:
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                batch = list(pool.map(lambda _: long_request(), range(8)))
            wall = time.perf_counter() - start
            print(f"8 at once: last answer after {wall:.2f} s (each {min(batch):.2f}-{max(batch):.2f} s); "
                  f"{8 * args.duration / wall:.1f} audio min / min")

        quiet = [short_request() for _ in range(8)]
        print(f"{args.short:g} s requests alone: median {statistics.median(quiet):.3f} s, max {max(quiet):.3f} s")

        done = threading.Event()
        long_s: list[float] = []

        def background() -> None:
            long_s.append(long_request())
            done.set()

        thread = threading.Thread(target=background)
        thread.start()
        time.sleep(0.2)  # the long request reaches the worker first
        beside = []
        while not done.is_set():
            beside.append(short_request())
        thread.join()
        print(f"{args.short:g} s requests during one long request ({long_s[0]:.2f} s): n={len(beside)}, "
              f"latencies {[round(s, 2) for s in beside]}, max {max(beside):.3f} s")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
