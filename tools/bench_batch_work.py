"""Check the engine's work model (conette_engine.engine.item_work) against measurements on this host.

    python tools/bench_batch_work.py --checkpoint DIR [--threads 2] [--batch-size 8]
        [--cases calibrate,time,decode,memory]

Calibration measures the constants of the work model (encoder seconds per audio second, beam-search seconds per
step and per hypothesis-step, decoder bytes per hypothesis-frame) and prints them next to the engine's. Then each
"worst accepted batch" (batch-size requests, each at most the engine's per-request limit) runs through
CaptioningEngine.caption in a fresh process, as one TorchServe batch does, and its wall time, CPU time and peak RSS
are printed next to the estimate:

    time     every request: 8 clips x 30 s at the default options (encoder-bound)
    decode   every request: 1 clip x 30 s at beam_size 16, min_pred_size = max_pred_size = 100 (decoder-bound)
    memory   every request: 6 clips x 30 s at beam_size 16, max_pred_size 3 (most hypotheses at once)

Use a full-size checkpoint (scripts/make_test_checkpoint.py DIR --depths 3,3,9,3 --layers 6 --ffn 2048
--vocab-size 799) and an otherwise idle host: the figures are only as good as the host is quiet.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


from conette_engine import engine as engine_module
from conette_engine.engine import CaptioningEngine

CLIP_S = 30.0
CASES = {  # name: (clips per request, options)
    "time": (8, {}),
    "decode": (1, {"beam_size": 16, "min_pred_size": 100, "max_pred_size": 100}),
    "memory": (6, {"beam_size": 16, "min_pred_size": 1, "max_pred_size": 3}),
}


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def noise_clip(engine: CaptioningEngine, seconds: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return engine.load_audio((0.3 * torch.randn(int(seconds * 32_000), generator=generator)).clamp(-1, 1))


def timed(fn):
    wall, cpu = time.perf_counter(), cpu_s()
    result = fn()
    return result, time.perf_counter() - wall, cpu_s() - cpu


def calibrate(engine: CaptioningEngine) -> None:
    clip = noise_clip(engine, CLIP_S, 0)
    engine.encode([clip.waveform])  # warm-up
    (memories, _), encode_wall, _ = timed(lambda: engine.encode([clip.waveform]))
    memory = memories[0]
    walls = {}
    for beam in (1, 16):
        options = engine.parse_options({"beam_size": beam, "min_pred_size": 100, "max_pred_size": 100})
        _, walls[beam], _ = timed(lambda options=options: engine._beam_search([memory], [options]))
    per_hypothesis_step = (walls[16] - walls[1]) / (15 * 100)
    per_step = walls[1] / 100 - per_hypothesis_step
    layers = len(engine.model.decoder.layers)
    bytes_per_frame = layers * 2 * engine.dims.d_model * 4
    print("calibration (measured vs engine constant):")
    print(f"  encoder s per audio s      {encode_wall / CLIP_S:.4f}  vs {engine_module.ENCODE_S_PER_AUDIO_S}")
    print(f"  beam s per step            {per_step:.4f}  vs {engine_module.DECODE_S_PER_STEP}")
    print(f"  beam s per hypothesis-step {per_hypothesis_step:.5f} vs {engine_module.DECODE_S_PER_HYPOTHESIS_STEP}")
    print(f"  K/V bytes per hyp-frame    {bytes_per_frame} ({layers} layers x K,V x d_model x float32)"
          f" vs {engine_module.BYTES_PER_HYPOTHESIS_FRAME}")


def run_case(args, name: str) -> dict:
    """One worst accepted batch, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    engine = CaptioningEngine.load(args.checkpoint)
    clips_per_request, values = CASES[name]
    options = engine.parse_options(values)
    requests = [[(noise_clip(engine, CLIP_S, 100 * r + c), options) for c in range(clips_per_request)]
                for r in range(args.batch_size)]
    estimate = [engine.check_request_work(items) for items in requests]  # raises if a request would be refused
    items = [item for request in requests for item in request]
    rss_before = peak_rss_mib()
    _, wall, cpu = timed(lambda: engine.caption([a for a, _ in items], [o for _, o in items]))
    return {"case": name, "requests": args.batch_size, "clips": len(items), "options": values,
            "estimate_s": sum(w.seconds for w in estimate),
            "estimate_beam_mib": sum(w.beam_bytes for w in estimate) / 2**20,
            "wall_s": wall, "cpu_s": cpu, "peak_rss_mib_before": rss_before, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (model-config.yaml)")
    parser.add_argument("--cases", default="calibrate," + ",".join(CASES))
    parser.add_argument("--one-case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    if args.one_case:
        print(json.dumps(run_case(args, args.one_case)))
        return
    torch.set_num_threads(args.threads)
    for name in args.cases.split(","):
        if name == "calibrate":
            calibrate(CaptioningEngine.load(args.checkpoint))
            continue
        out = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--threads", str(args.threads),
                              "--batch-size", str(args.batch_size), "--one-case", name],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['case']:7s} {r['requests']} requests, {r['clips']} clips x {CLIP_S:g} s, "
              f"{r['options'] or 'defaults'}: "
              f"estimate {r['estimate_s']:.1f} s / {r['estimate_beam_mib']:.0f} MiB beam memory; "
              f"measured wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB (after loading: {r['peak_rss_mib_before']:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
