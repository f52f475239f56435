#!/usr/bin/env python
"""Latency at concurrency 1 and throughput at concurrency 8: a running TorchServe vs the in-process engine.

    python tools/bench_server.py --checkpoint weights/conette [--url http://127.0.0.1:8080] [--seconds 10]
                                   [--requests 16] [--token KEY | --key-file key_file.json]

The clip is FFmpeg-made WAV (44.1 kHz stereo, white noise), sent as a raw body to POST /predictions/conette
with default options (beam 3). The in-process engine (same checkpoint as the server's .mar) decodes the same
bytes; at concurrency 8 it captions 8 clips per call, which is what the server's batching aims at.
Run it on an otherwise idle machine: the server and the in-process engine take turns on the same cores.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from audio_factory import audio_bytes
from conette_client.keys import resolve_token
from conette_client.prometheus import metric_total
from conette_client.torchserve import DEFAULT_ADDRESSES


def summary(latencies: list[float], wall_s: float) -> dict:
    latencies = sorted(latencies)
    return {"n": len(latencies), "p50_s": statistics.median(latencies),
            "p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "clips_per_s": len(latencies) / wall_s}


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(batches, requests in them) so far, from the handler's BatchSize histogram on the metrics port."""
    text = requests.get(f"{metrics_url}/metrics", timeout=30).text
    return metric_total(text, "BatchSize_count"), metric_total(text, "BatchSize_sum")


def bench_server(url: str, metrics_url: str, token: str | None, clip: bytes, n: int, concurrency: int) -> dict:
    headers = {"Content-Type": "audio/wav", **({"Authorization": f"Bearer {token}"} if token else {})}
    local = threading.local()  # one keep-alive connection per client thread

    def one(_):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        response = local.session.post(f"{url}/predictions/conette", data=clip, headers=headers, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - start

    one(0)  # warm-up
    batches_before, requests_before = batch_totals(metrics_url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    result = summary(latencies, time.perf_counter() - start)
    batches_after, requests_after = batch_totals(metrics_url)
    result["mean_batch"] = (requests_after - requests_before) / max(1.0, batches_after - batches_before)
    return result


def bench_engine(engine, clip: bytes, n: int, concurrency: int) -> dict:
    options = engine.parse_options({})

    def batch(size: int) -> float:
        start = time.perf_counter()
        audios = [engine.load_audio(clip) for _ in range(size)]
        engine.caption(audios, [options] * size)
        return time.perf_counter() - start

    batch(1)  # warm-up
    latencies = []
    start = time.perf_counter()
    for _ in range(max(1, n // concurrency)):
        seconds = batch(concurrency)
        latencies += [seconds] * concurrency  # every clip of a batch waits for the whole batch
    return {**summary(latencies, time.perf_counter() - start), "mean_batch": float(concurrency)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint the server's .mar was built from")
    parser.add_argument("--url", default=DEFAULT_ADDRESSES["inference"], help="TorchServe inference address")
    parser.add_argument("--metrics-url", default=DEFAULT_ADDRESSES["metrics"], help="TorchServe metrics address")
    parser.add_argument("--token", help="inference key (default: from key_file.json)")
    parser.add_argument("--key-file", help="TorchServe key file (default: ./key_file.json, then the repo root)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip duration")
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement")
    args = parser.parse_args()

    import torch

    from conette_engine.engine import CaptioningEngine

    clip = audio_bytes("wav16", seconds=args.seconds, sample_rate=44100, channels=2, signal="noise", seed=3)
    token = resolve_token("inference", args.token, args.key_file)
    engine = CaptioningEngine.load(args.checkpoint)
    print(f"clip: {args.seconds:g} s 44.1 kHz stereo WAV ({len(clip)} bytes); beam 3; {args.requests} requests "
          f"per row; in-process torch threads: {torch.get_num_threads()}")
    print(f"{'setup':<28} {'conc':>4} {'p50 latency s':>14} {'p90 latency s':>14} {'clips/s':>8} {'batch':>6}")
    for concurrency in (1, 8):
        n = args.requests if concurrency > 1 else max(4, args.requests // 2)
        rows = [("TorchServe (HTTP, batching)", bench_server(args.url, args.metrics_url, token, clip, n, concurrency)),
                ("in-process engine", bench_engine(engine, clip, n, concurrency))]
        for name, row in rows:
            print(f"{name:<28} {concurrency:>4} {row['p50_s']:>14.3f} {row['p90_s']:>14.3f} "
                  f"{row['clips_per_s']:>8.2f} {row['mean_batch']:>6.1f}")


if __name__ == "__main__":
    main()
