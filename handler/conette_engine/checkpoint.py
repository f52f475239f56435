"""Checkpoint formats.

official  (what the hub repo `Labbeti/conette` holds):  config.json + pytorch_model.bin
          tensors read with `torch.load(weights_only=True)`; vocabulary from the `_extra_state_` pickle,
          decoded by a plain-data-only unpickler.
serving   (what the .mar ships, no pickle anywhere):      config.json + model.safetensors + vocab.json
          `config.json` gains a "conette_serve" entry recording the sha256 of the official weights it came from.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .tokenizer import Vocabulary

OFFICIAL_WEIGHTS = "pytorch_model.bin"
SERVING_WEIGHTS = "model.safetensors"
VOCABULARY_FILE = "vocab.json"
CONFIG_FILE = "config.json"
EXTRA_STATE_KEY = "_extra_state_"

# Older ConvNeXt checkpoints call the layer scale `gamma` (the reference renames it on load too).
_LEGACY_LAYER_SCALE = re.compile(r"^(preprocessor\.encoder\.stages\.\d+\.\d+\.)gamma$")


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict
    vocabulary: Vocabulary
    sha256: str  # of the official pytorch_model.bin this checkpoint is (or was converted from)
    format: str  # "official" | "serving"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Load a checkpoint folder in either format (serving format preferred when both are present)."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE}")
    config = json.loads(config_path.read_text(encoding="utf-8"))

    if (model_dir / SERVING_WEIGHTS).is_file():
        from safetensors.torch import load_file

        state_dict = load_file(model_dir / SERVING_WEIGHTS)
        vocabulary = Vocabulary.from_json(model_dir / VOCABULARY_FILE)
        sha256 = config.get("conette_serve", {}).get("source_sha256") or file_sha256(model_dir / SERVING_WEIGHTS)
        return Checkpoint(_rename_legacy_keys(state_dict), config, vocabulary, sha256, "serving")

    weights_path = model_dir / OFFICIAL_WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(f"{model_dir}: neither {SERVING_WEIGHTS} nor {OFFICIAL_WEIGHTS}")
    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{weights_path}: cannot be loaded as plain tensors: {error}") from error
    if not isinstance(state_dict, dict) or EXTRA_STATE_KEY not in state_dict:
        raise CheckpointError(f"{weights_path}: not a CoNeTTE state dict (no {EXTRA_STATE_KEY})")
    vocabulary = Vocabulary.from_extra_state(state_dict.pop(EXTRA_STATE_KEY))
    return Checkpoint(_rename_legacy_keys(state_dict), config, vocabulary, file_sha256(weights_path), "official")


def save_serving_checkpoint(checkpoint: Checkpoint, out_dir: str | Path) -> None:
    """Write `checkpoint` in the serving format (safetensors + JSON vocabulary + config.json)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in checkpoint.state_dict.items()}
    save_file(tensors, out_dir / SERVING_WEIGHTS, metadata={"format": "pt"})
    checkpoint.vocabulary.to_json(out_dir / VOCABULARY_FILE)
    config = dict(checkpoint.config)
    config["conette_serve"] = {"format": "serving", "source_sha256": checkpoint.sha256}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        new_name = _LEGACY_LAYER_SCALE.sub(r"\1scale_layer", name)
        if new_name in renamed:
            raise CheckpointError(f"checkpoint has both {name} and {new_name}")
        renamed[new_name] = tensor
    return renamed
