"""The reference's golden outputs and the dev checkpoint, as committed under tests/fixtures/golden/.

Made by tools/make_golden_fixtures.py from ../shared/conette-reference (see its README for the format);
the segmented-captioning goldens (tests/fixtures/segments/) by tools/make_segment_goldens.py.
"""

import io
import json
import lzma
import shutil
from functools import cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
AUDIO = FIXTURES / "audio"


def load_xz(path: Path):
    return torch.load(io.BytesIO(lzma.decompress(path.read_bytes())), weights_only=True)


@cache
def cases() -> dict[str, dict]:
    return {case["id"]: case for case in json.loads((GOLDEN / "cases.json").read_text())["cases"]}


@cache
def goldens() -> dict:
    return load_xz(GOLDEN / "goldens.pt.xz")


@cache
def tensor_inputs() -> dict[str, dict]:
    return load_xz(GOLDEN / "inputs.pt.xz")


def extract_dev_checkpoint(out_dir: Path) -> Path:
    """Write the dev checkpoint (official format) to out_dir; returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / "model/config.json", out_dir / "config.json")
    (out_dir / "pytorch_model.bin").write_bytes(lzma.decompress((GOLDEN / "model/pytorch_model.bin.xz").read_bytes()))
    return out_dir


def resolve(value):
    """A case argument: tensors referenced as {"kind": "tensor", "file", "key"} are loaded."""
    if isinstance(value, dict) and value.get("kind") == "tensor":
        return tensor_inputs()[Path(value["file"]).stem][value["key"]]
    return value


def case_sources(case: dict) -> list[tuple[object, int | None]]:
    """The case's items as (source, sample_rate) pairs for `engine.load_audio`."""
    x = case["x"]
    if x["kind"] == "path":
        return [(AUDIO / Path(x["value"]).name, None)]
    if x["kind"] == "paths":
        return [(AUDIO / Path(p).name, None) for p in x["value"]]
    data = resolve({"kind": "tensor", "file": x["file"], "key": x["key"]})
    if x["kind"] == "tensor_list_item":
        return [(data[x["index"]], case["args"].get("sr"))]
    items = list(data) if x["kind"] == "tensor_list" else _split_tensor(data)
    rates = case["args"].get("sr")
    rates = rates if isinstance(rates, list) else [rates] * len(items)
    return list(zip(items, rates))


def _split_tensor(x: torch.Tensor) -> list[torch.Tensor]:
    # The reference reads (n,) as one mono clip, (C, n) as one clip, (B, C, n) as a batch.
    if x.ndim == 3:
        return list(x)
    return [x]


SEGMENTS = FIXTURES / "segments"


@cache
def segment_manifest() -> dict:
    """The long recording's recipe and sha256, and per window configuration its windows' case ids and bounds."""
    return json.loads((SEGMENTS / "manifest.json").read_text())


@cache
def segment_goldens() -> dict[str, dict]:
    """Reference outputs per window case id (made by tools/make_segment_goldens.py)."""
    return load_xz(SEGMENTS / "goldens.pt.xz")
