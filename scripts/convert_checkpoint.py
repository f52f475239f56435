"""Convert an official CoNeTTE checkpoint folder (config.json + pytorch_model.bin) to the serving format
(config.json + model.safetensors + vocab.json), which loads with no pickle at all.

    python scripts/convert_checkpoint.py SRC_DIR DST_DIR

It imports conette_engine: installed (make install) or from handler/ (PYTHONPATH=handler, as build_mar.sh runs it).

The tensors are loaded with torch.load(weights_only=True) and the vocabulary pickle with a plain-data-only
unpickler; the result is checked by loading it back and comparing every tensor and token bit for bit.
"""

import argparse
from pathlib import Path

import torch

from conette_engine.checkpoint import load_checkpoint, save_serving_checkpoint


def convert(src: Path, dst: Path) -> None:
    checkpoint = load_checkpoint(src)
    if checkpoint.format != "official":
        raise SystemExit(f"{src} is already in the serving format")
    save_serving_checkpoint(checkpoint, dst)
    converted = load_checkpoint(dst)
    assert converted.format == "serving"
    assert converted.vocabulary == checkpoint.vocabulary
    assert converted.sha256 == checkpoint.sha256
    assert converted.state_dict.keys() == checkpoint.state_dict.keys()
    for name, tensor in checkpoint.state_dict.items():
        if not torch.equal(converted.state_dict[name], tensor) or converted.state_dict[name].dtype != tensor.dtype:
            raise SystemExit(f"round trip changed {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="official checkpoint folder")
    parser.add_argument("dst", type=Path, help="output folder (serving format)")
    args = parser.parse_args()
    convert(args.src, args.dst)
    print(f"wrote {args.dst} (serving format, source sha256 {load_checkpoint(args.dst).sha256})")


if __name__ == "__main__":
    main()
