"""Benchmark the in-process engine: per-stage times, clips/s, and the encoder's achieved GFLOP/s next to a large
float32 matmul's GFLOP/s measured in the same run (the machine's practical ceiling).

    python tools/bench_model.py --checkpoint DIR [--threads 2] [--repeat 3]
        [--reference-oracle ../shared/conette-reference/oracle
         --reference-python ~/.cache/conette-oracle/venv/bin/python]

Workloads: 1 x 10 s, 8 x 10 s, and a mixed-length batch (2, 5, 10, 20 s), all 44.1 kHz stereo 16-bit WAV,
beam 3 (the checkpoint's defaults). "rest / encoder" is everything but the encoder forward (log-mel + ConvNeXt +
projection) over the encoder forward: decoding, resampling, beam search, tags, text. Each number is the median
of --repeat runs. With --reference-*, the reference implementation (conette 0.3.2, run by the oracle's golden.py
in its own venv) is timed on the same files and checkpoint, and the captions are compared.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from audio_factory import audio_bytes
from conette_engine import CaptioningEngine
from conette_engine.audio import decode_audio, prepare_waveform

SOURCE_RATE = 44_100
MATMUL_SIZE = 2048


def make_wav(seconds: float, seed: int) -> bytes:
    """Stereo 16-bit 44.1 kHz white noise, a different one per seed."""
    return audio_bytes("wav16", seconds=seconds, sample_rate=SOURCE_RATE, channels=2, signal="noise", seed=seed)


def matmul_gflops(repeat: int = 10) -> float:
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / statistics.median(times) / 1e9


def encoder_gflop(engine: CaptioningEngine, n_samples: int) -> float:
    """FLOPs of log-mel + encoder + projection for one clip of n_samples at 32 kHz (conv and matmul FLOPs)."""
    waveform = torch.zeros(1, n_samples, device=engine.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        frame_embs, _ = engine.model.encoder(engine.model.encoder.log_mel(waveform))
        engine.model.project(frame_embs)
    return counter.get_total_flops() / 1e9


def run_once(engine: CaptioningEngine, wavs: list[bytes]) -> tuple[dict, list[str]]:
    stages = {"decode": 0.0, "resample": 0.0}
    audios = []
    start = time.perf_counter()
    for data in wavs:
        t0 = time.perf_counter()
        waveform, rate = decode_audio(data, max_duration_s=engine.max_duration_s)
        t1 = time.perf_counter()
        audios.append(prepare_waveform(waveform, rate, engine.max_duration_s))
        stages["decode"] += t1 - t0
        stages["resample"] += time.perf_counter() - t1
    results = engine.caption(audios, timings=stages)
    stages["total"] = time.perf_counter() - start
    return stages, [r.caption for r in results]


def bench(engine: CaptioningEngine, wavs: list[bytes], repeat: int) -> tuple[dict, list[str]]:
    run_once(engine, wavs)  # warm-up: resampling kernels, allocator
    runs, captions = [], None
    for _ in range(repeat):
        stages, run_captions = run_once(engine, wavs)
        if captions is not None and run_captions != captions:
            raise SystemExit("non-deterministic output between runs")
        captions = run_captions
        runs.append(stages)
    return {stage: statistics.median(r[stage] for r in runs) for stage in runs[0]}, captions


def reference_times(args, workloads: dict[str, list[Path]], model_dir: Path, work: Path) -> dict:
    spec = {"set": "bench", "model_dir": str(model_dir), "cases": [
        {"id": name, "x": {"kind": "paths", "value": [str(p) for p in paths]}, "args": {}}
        for name, paths in workloads.items()
    ]}
    spec_path = work / "reference_spec.json"
    spec_path.write_text(json.dumps(spec))
    out = work / "reference_out"
    subprocess.run([str(args.reference_python), str(args.reference_oracle / "golden.py"), "--spec", str(spec_path),
                    "--out", str(out), "--repeat", str(args.repeat), "--threads", str(args.threads)],
                   check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {case["id"]: (case["wall_s_median"], case["outputs"]["cands"]) for case in summary["cases"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="model folder (official or serving format)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reference-oracle", type=Path, help="the oracle/ folder (golden.py) to time the reference")
    parser.add_argument("--reference-python", type=Path, help="python of the oracle venv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = CaptioningEngine.load(args.checkpoint)
    ten = make_wav(10.0, seed=0)
    workloads = {
        "1x10s": [ten],
        "8x10s": [make_wav(10.0, seed=i) for i in range(8)],
        "mixed_2-5-10-20s": [make_wav(s, seed=i) for i, s in enumerate((2.0, 5.0, 10.0, 20.0))],
    }
    gflop_10s = encoder_gflop(engine, 10 * 32_000)
    ceiling = matmul_gflops()
    print(f"threads {args.threads}; encoder {gflop_10s:.1f} GFLOP per 10 s clip; "
          f"matmul {MATMUL_SIZE}^3 float32: {ceiling:.1f} GFLOP/s")

    reference = {}
    if args.reference_oracle and args.reference_python:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            paths = {}
            for name, wavs in workloads.items():
                paths[name] = []
                for i, data in enumerate(wavs):
                    path = work / f"{name}_{i}.wav"
                    path.write_bytes(data)
                    paths[name].append(path)
            reference = reference_times(args, paths, args.checkpoint.resolve(), work)

    header = ("| workload | decode | resample | log-mel | encoder | beam search | total | clips/s | "
              "encoder GFLOP/s (% of matmul) | rest / encoder |"
              + (" reference total | speed-up |" if reference else ""))
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, wavs in workloads.items():
        stages, captions = bench(engine, wavs, args.repeat)
        seconds = sum(len(w) for w in wavs) / (4 * SOURCE_RATE)
        # The encoder forward is log-mel + ConvNeXt + projection, as in the reference's ConvNeXt.forward.
        encoder_s = stages["encoder"] + stages["logmel"]
        gflops = gflop_10s * seconds / 10 / encoder_s
        rest = stages["total"] - encoder_s
        row = (f"| {name} | {stages['decode']:.3f} | {stages['resample']:.3f} | {stages['logmel']:.3f} | "
               f"{stages['encoder']:.3f} | {stages['beam_search']:.3f} | {stages['total']:.3f} | "
               f"{len(wavs) / stages['total']:.2f} | {gflops:.1f} ({100 * gflops / ceiling:.0f} %) | "
               f"{100 * rest / encoder_s:.0f} % |")
        if reference:
            ref_time, ref_captions = reference[name]
            same = "" if ref_captions == captions else " (captions differ: padded batch)"
            row += f" {ref_time:.3f} | {ref_time / stages['total']:.2f}x{same} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
