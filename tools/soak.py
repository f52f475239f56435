"""Soak a private TorchServe with thousands of mixed requests at a concurrency above batchSize.

    PYTHONPATH=tests python tools/soak.py --checkpoint DIR [--requests 3000] [--concurrency 16] [--seed 0]

Requests are drawn at random from a fixed mix (tools/fuzz_cases.py Case values): good ones in every request
style (expected 200, and the same answer every time for the same case), bad ones (expected 400: invalid options,
hostile number texts, junk audio, too many instances). Printed: unexpected statuses (must be 0), answers that
changed between repeats (must be 0: same captions and tags, scores within 1e-4), latency p50/p99 per status,
throughput, worker and JVM RSS at start/middle/end, and whether the worker PID changed (it must not).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from served import served, worker_pid

import fuzz_cases
from audio_factory import make_audio
from fuzz_cases import Case


def make_clips(tmp: Path) -> dict[str, bytes]:
    paths = {"speech_wav": make_audio(tmp, "wav16", seconds=3.0, sample_rate=22050, signal="speech"),
             "noise_mp3": make_audio(tmp, "mp3", seconds=5.0, sample_rate=44100, signal="noise"),
             "tone_flac": make_audio(tmp, "flac", seconds=2.0, sample_rate=48000, channels=2)}
    return {name: path.read_bytes() for name, path in paths.items()}


def request_mix(clip_names: list[str]) -> list[tuple[Case, int]]:
    """(case, expected status); good cases appear several times so that the mix is mostly good traffic."""
    good = []
    for clip in clip_names:
        good += [Case("good", "raw", (clip,)),
                 Case("good", "json", (clip,), (("beam_size", 2), ("task", "audiocaps"))),
                 Case("good", "form", (clip,), (("max_pred_size", 8),)),
                 Case("good", "v1", (clip, clip_names[0]), (("beam_size", 4),)),
                 Case("good", "v2", (clip,), (("threshold", 0.1),))]
    bad = [Case("bad", "json", (clip_names[0],), (("beam_size", "²"),)),
           Case("bad", "json", (clip_names[0],), (("threshold", "1" * 401),)),
           Case("bad", "form", (clip_names[1],), (("beam_size", "9" * 5000),)),
           Case("bad", "v1", (clip_names[0],) * 9),
           Case("bad", "raw", (b"definitely not audio " * 50,)),
           Case("bad", "json_text", body='{"instances": [1]}')]
    return [(case, 200) for case in good] * 3 + [(case, 400) for case in bad]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def jvm_pid(server) -> int:
    return next(int(line.split()[0]) for line in server.own_processes() if " java " in f" {line} " or "/java " in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (batchSize is 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, served(args.checkpoint) as server:
        clips = make_clips(Path(tmp))
        mix = request_mix(sorted(clips))
        rng = random.Random(args.seed)
        plan = [rng.choice(mix) for _ in range(args.requests)]
        pid, jvm = worker_pid(server), jvm_pid(server)
        memory = {"start": (rss_mib(pid), rss_mib(jvm))}
        first_answer: dict = {}
        latencies = collections.defaultdict(list)
        unexpected, changed = collections.Counter(), collections.Counter()
        lock = threading.Lock()
        done = 0

        def one(item):
            nonlocal done
            case, want = item
            sent = time.perf_counter()
            try:
                response = fuzz_cases.send(server, case, clips)
                status, text = response.status_code, response.text
            except Exception as error:  # a dropped connection is an unexpected outcome too
                status, text = type(error).__name__, ""
            elapsed = time.perf_counter() - sent
            with lock:
                latencies[str(status)].append(elapsed)
                if status != want:
                    unexpected[(case.kind, case.style, status, text[:120])] += 1
                elif want == 200:
                    # Same tokens and tags every time; scores may move in the last float bits with the batch mix.
                    answers = fuzz_cases.answers_of(case, fuzz_cases.parse_strict(text))
                    first = first_answer.setdefault(case, answers)
                    try:
                        for got, want_answer in zip(answers, first, strict=True):
                            fuzz_cases.assert_same_answer(got, want_answer)
                    except (AssertionError, ValueError):
                        changed[case] += 1
                done += 1
                if done == args.requests // 2:
                    memory["middle"] = (rss_mib(pid), rss_mib(jvm))
                if done % 250 == 0:
                    print(f"  {done} requests, {sum(unexpected.values())} unexpected, "
                          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, plan))
        wall = time.perf_counter() - started
        memory["end"] = (rss_mib(pid), rss_mib(jvm))
        pid_after = worker_pid(server)

    every = sorted(t for values in latencies.values() for t in values)
    print(f"soak: {args.requests} requests at concurrency {args.concurrency} (seed {args.seed}), checkpoint "
          f"{args.checkpoint}, {wall:.0f} s, {args.requests / wall:.1f} requests/s")
    print(f"  expected mix: {sum(1 for _, w in plan if w == 200)} good (200), {sum(1 for _, w in plan if w == 400)} "
          "bad (400)")
    for status, values in sorted(latencies.items()):
        values.sort()
        print(f"  status {status}: {len(values)} requests, p50 {statistics.median(values) * 1000:.0f} ms, "
              f"p99 {values[int(0.99 * (len(values) - 1))] * 1000:.0f} ms")
    print(f"  all: p50 {statistics.median(every) * 1000:.0f} ms, "
          f"p99 {every[int(0.99 * (len(every) - 1))] * 1000:.0f} ms")
    print(f"  unexpected statuses: {sum(unexpected.values())}")
    for key, count in unexpected.most_common(10):
        print(f"    {count} x {key}")
    print(f"  answers that changed between repeats: {sum(changed.values())}")
    for moment, (worker, jvm_rss) in memory.items():
        print(f"  RSS at {moment:6s}: worker {worker:.0f} MiB, JVM {jvm_rss:.0f} MiB")
    print(f"  worker PID {pid} -> {pid_after} ({'unchanged' if pid == pid_after else 'CHANGED'})")
    if unexpected or changed or pid != pid_after:
        sys.exit(1)


if __name__ == "__main__":
    main()
