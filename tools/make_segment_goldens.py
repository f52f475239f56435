"""Reference goldens for segmented captioning: a long encoded recording and, per window, the reference's answer.

Maintainer tool (needs ffmpeg, espeak-ng and the reference oracle's virtualenv, which CI does not have); its
output is committed under tests/fixtures/segments/:

    python tools/make_segment_goldens.py prepare --work /tmp/segment-oracle
        encodes the recording (RECIPE below, skipped if the committed file exists), loads it with the engine's own
        audio code, cuts the windows of each CONFIGS entry, and writes an oracle spec: each window as a 32 kHz
        1-D tensor (the reference reads a tensor without `sr` as 32 kHz), one case per window, batch of one
    $ORACLE_ROOT/venv/bin/python ../shared/conette-reference/oracle/golden.py \
        --spec /tmp/segment-oracle/cases.json --out /tmp/segment-oracle/goldens \
        --model-dir ../shared/conette-reference/model
    python tools/make_segment_goldens.py pack --work /tmp/segment-oracle
        keeps each window's outputs (captions, tokens, scores, tag probabilities) in goldens.pt.xz

The recording is committed as encoded (its bytes depend on the FFmpeg build); manifest.json holds its recipe,
sha256 and the window configurations.
"""

import argparse
import hashlib
import io
import json
import lzma
import subprocess
from pathlib import Path

import torch

from conette_engine.audio import load_audio
from conette_engine.segments import segment_bounds

REPO = Path(__file__).resolve().parents[1]

FIXTURES = REPO / "tests/fixtures/segments"
RECORDING = FIXTURES / "street_and_music.mp4"
OUTPUT_KEYS = ("cands", "preds", "lprobs", "mult_cands", "mult_preds", "mult_lprobs", "tasks", "tags", "tags_probs")

SPEECH = [
    "a man speaks while cars drive past on a busy street",
    "the birds are singing in the park and children are playing",
    "thank you all for coming, the train to the city leaves in five minutes",
]
# 75.6 s, so that 25 s windows leave a 0.6 s tail (dropped, the window before it extended to the end).
DURATION_S = 75.6
# Scenes in order (seconds): speech over pink noise, a chord with tremolo, brown noise with a ticking clock,
# quiet room tone then speech, a rising sweep, speech over white noise. Stereo at 44.1 kHz in AAC, with a small
# H.264 video track, as a phone or camera writes it.
SCENES = [
    ("speech0", 12.0), ("chord", 13.0), ("rain", 15.0), ("quiet_speech1", 12.0), ("sweep", 12.0), ("speech2", 11.6),
]
CONFIGS = [
    {"segment_s": 25.0, "task": "clotho"},
    {"segment_s": 20.0, "hop_s": 15.0, "task": "audiocaps", "threshold": 0.2},
]


def scene_filter(name: str, seconds: float, speech_inputs: dict[str, int]) -> str:
    rate = 44100
    if name.startswith(("speech", "quiet_speech")):
        bed = ("anoisesrc=c=pink:a=0.08" if name.startswith("speech0") else
               "anoisesrc=c=white:a=0.03" if name == "speech2" else "anoisesrc=c=brown:a=0.01")
        index = speech_inputs[name.split("_")[-1]]
        return (f"[{index}:a]aresample={rate},apad,atrim=0:{seconds}[sp_{name}];"
                f"{bed}:r={rate}:d={seconds}:seed=5[bed_{name}];"
                f"[sp_{name}][bed_{name}]amix=inputs=2:duration=first:normalize=0,atrim=0:{seconds}[{name}]")
    if name == "chord":
        return (f"aevalsrc='0.2*(sin(2*PI*261.6*t)+sin(2*PI*329.6*t)+sin(2*PI*392*t))*(0.6+0.4*sin(2*PI*5*t))'"
                f":s={rate}:d={seconds}[{name}]")
    if name == "rain":
        return (f"anoisesrc=c=brown:a=0.3:r={rate}:d={seconds}:seed=9[rn];"
                f"aevalsrc='0.5*sin(2*PI*2000*t)*lt(mod(t,1),0.01)':s={rate}:d={seconds}[tick];"
                f"[rn][tick]amix=inputs=2:normalize=0[{name}]")
    if name == "sweep":
        return f"aevalsrc='0.4*sin(2*PI*(200*t+60*t*t))':s={rate}:d={seconds}[{name}]"
    raise ValueError(name)


def make_recording(out: Path, work: Path) -> list[str]:
    speech_files = []
    for i, text in enumerate(SPEECH):
        wav = work / f"speech{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        speech_files.append(wav)
    speech_inputs = {f"speech{i}": i for i in range(len(SPEECH))}
    graph = ";".join(scene_filter(name, seconds, speech_inputs) for name, seconds in SCENES)
    graph += ";" + "".join(f"[{name}]" for name, _ in SCENES) + f"concat=n={len(SCENES)}:v=0:a=1,"
    graph += f"aformat=channel_layouts=stereo,atrim=0:{DURATION_S}[a]"
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    for wav in speech_files:
        command += ["-i", str(wav)]
    command += ["-f", "lavfi", "-i", f"testsrc=s=64x48:r=2:d={DURATION_S}",
                "-filter_complex", graph, "-map", f"{len(SPEECH)}:v", "-map", "[a]",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "48k", "-ar", "44100",
                "-t", str(DURATION_S), str(out)]
    subprocess.run(command, check=True)
    return command


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    manifest_path = FIXTURES / "manifest.json"
    if not RECORDING.exists():
        recipe = make_recording(RECORDING, work)
        recipe_text = " ".join(map(str, recipe)).replace(str(work), "$WORK").replace(str(REPO) + "/", "")
        manifest = {"recording": RECORDING.name, "recipe": recipe_text,
                    "speech": SPEECH, "scenes": SCENES}
    else:
        manifest = json.loads(manifest_path.read_text())
    audio = load_audio(RECORDING, max_duration_s=DURATION_S + 5)
    manifest.update({
        "sha256": hashlib.sha256(RECORDING.read_bytes()).hexdigest(),
        "n_samples": audio.waveform.shape[0], "sample_rate": audio.sample_rate, "channels": audio.channels,
        "duration_s": audio.duration_s, "configs": [],
    })
    (work / "inputs").mkdir(exist_ok=True)
    cases = []
    for c, config in enumerate(CONFIGS):
        bounds = segment_bounds(audio.waveform.shape[0], config["segment_s"], config.get("hop_s"))
        ids = []
        for k, (start, stop) in enumerate(bounds):
            case_id = f"config{c}_window{k}"
            torch.save({"x": audio.waveform[start:stop].clone()}, work / "inputs" / f"{case_id}.pt")
            args = {key: config[key] for key in ("task", "threshold") if key in config}
            cases.append({"id": case_id, "desc": f"{config} window {k}: samples [{start}, {stop})",
                          "x": {"kind": "tensor", "file": f"inputs/{case_id}.pt", "key": "x"}, "args": args})
            ids.append({"id": case_id, "start": start, "stop": stop})
        manifest["configs"].append({**config, "windows": ids})
    (work / "cases.json").write_text(json.dumps({"set": "segments", "cases": cases}, indent=1) + "\n")
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(cases)} window cases in {work / 'cases.json'}")


def pack(work: Path) -> None:
    goldens = {}
    for path in sorted((work / "goldens").glob("config*_window*.pt")):
        golden = torch.load(path, weights_only=False)
        goldens[path.stem] = {k: v for k, v in golden["outputs"].items() if k in OUTPUT_KEYS}
    buffer = io.BytesIO()
    torch.save(goldens, buffer)
    (FIXTURES / "goldens.pt.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(goldens)} window goldens -> {FIXTURES / 'goldens.pt.xz'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "pack"])
    parser.add_argument("--work", type=Path, required=True, help="folder for the oracle spec and its goldens")
    args = parser.parse_args()
    (prepare if args.step == "prepare" else pack)(args.work)


if __name__ == "__main__":
    main()
