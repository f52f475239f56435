"""Copy what the golden tests need from the reference fixture set into tests/fixtures/golden/ (small, xz).

Maintainer tool: reads ../shared/conette-reference (or --reference), which CI does not have; its output
is committed. --lone DIR adds goldens made with the oracle's golden.py for each item of the reference's
mixed-length batches run alone (the contract is per item alone); their tensor inputs are referenced as
items of the original tensor lists ({"kind": "tensor_list_item", ..., "index": i}). Keeps: the dev checkpoint,
cases.json, tensor inputs, and per case the reference outputs,
the decoder memory, and (for single-item / equal-length cases) log-mel every 8th frame, frame embeddings
and clip probabilities. The per-step decoder traces and full waveforms stay out (debugging only).
"""

import argparse
import io
import json
import lzma
import shutil
from pathlib import Path

import torch

LOGMEL_FRAME_STRIDE = 8
OUTPUT_KEYS = ("cands", "preds", "lprobs", "mult_cands", "mult_preds", "mult_lprobs", "tasks", "tags", "tags_probs")


def save_xz(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared/conette-reference"
    )
    parser.add_argument("--lone", type=Path, help="oracle output for lone items (cases.json + goldens/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/golden")
    args = parser.parse_args()
    ref, out = args.reference, args.out
    (out / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(ref / "model/config.json", out / "model/config.json")
    (out / "model/pytorch_model.bin.xz").write_bytes(
        lzma.compress((ref / "model/pytorch_model.bin").read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    spec = json.loads((ref / "cases.json").read_text())
    golden_paths = sorted((ref / "goldens").glob("d*.pt"))
    if args.lone:
        for case in json.loads((args.lone / "cases.json").read_text())["cases"]:
            if case["x"]["kind"] == "tensor":  # lone_d25_1 -> item 1 of d25's tensor list
                source = next(c for c in spec["cases"] if c["id"].startswith(case["id"].split("_")[1] + "_"))
                case["x"] = {**source["x"], "kind": "tensor_list_item", "index": int(case["id"].rsplit("_", 1)[1])}
            spec["cases"].append(case)
        golden_paths += sorted((args.lone / "goldens").glob("lone_*.pt"))
    (out / "cases.json").write_text(json.dumps(spec, indent=1) + "\n")
    inputs = {p.stem: torch.load(p, weights_only=True) for p in sorted((ref / "inputs").glob("*.pt"))}
    save_xz(inputs, out / "inputs.pt.xz")

    goldens = {}
    for path in golden_paths:
        golden = torch.load(path, weights_only=False)
        entry = {
            "outputs": {k: v for k, v in golden["outputs"].items() if k in OUTPUT_KEYS},
            "memory": golden["memory"],
            "memory_pad_mask": golden["memory_pad_mask"],
        }
        if golden["intermediates_file"]:
            inter = torch.load(path.parent / golden["intermediates_file"], weights_only=False)
            if bool((inter["x_shapes"][:, -1] == inter["waveform"].shape[1]).all()):
                entry["logmel_strided"] = inter["logmel"][:, :, ::LOGMEL_FRAME_STRIDE].clone()
                entry["frame_embs"] = inter["frame_embs"]
                entry["clipwise_output"] = inter["clipwise_output"]
        goldens[golden["id"]] = entry
    save_xz({"logmel_frame_stride": LOGMEL_FRAME_STRIDE, "cases": goldens}, out / "goldens.pt.xz")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>10,}  {p.relative_to(out)}")


if __name__ == "__main__":
    main()
