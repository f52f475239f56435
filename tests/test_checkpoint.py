"""Checkpoint loading: structure from the tensors, safe vocabulary unpickling, serving-format round trip."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import golden_data
from conftest import checkout_env
from conette_engine.checkpoint import load_checkpoint
from conette_engine.engine import CaptioningEngine
from conette_engine.errors import CheckpointError, UnsafePickleError
from conette_engine.tokenizer import restricted_loads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    return golden_data.extract_dev_checkpoint(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def serving_dir(official_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts/convert_checkpoint.py"), str(official_dir), str(out)],
                   check=True, env=checkout_env())
    return out


def test_structure_is_read_from_the_checkpoint(official_dir):
    engine = CaptioningEngine.load(official_dir)
    dims = engine.dims
    assert dims.encoder_depths == (1, 1, 1, 1) and dims.encoder_dims == (96, 192, 384, 768)
    assert (dims.n_decoder_layers, dims.d_model, dims.n_heads, dims.dim_feedforward) == (2, 256, 8, 512)
    assert dims.vocab_size == len(engine.vocabulary) == 411 and dims.n_mels == 224 and dims.n_classes == 527
    assert engine.tasks[0] == "clotho" and len(engine.tasks) == 7
    assert engine.vocabulary.tokens[404] == "<bos_clotho>"
    assert engine._task_token["audiocaps"] == engine.vocabulary.token_to_id["<bos_audiocaps>"]
    # The checkpoint's repetition mask is the content-words mask rebuilt from the shipped stopwords.
    assert torch.equal(engine._forbid_masks[None], engine._forbid_masks["content_words"])


def test_serving_format_round_trip_is_bit_identical(official_dir, serving_dir):
    assert not list(serving_dir.glob("*.bin")) and (serving_dir / "model.safetensors").is_file()
    official, serving = CaptioningEngine.load(official_dir), CaptioningEngine.load(serving_dir)
    assert serving.checkpoint_sha256 == official.checkpoint_sha256 == load_checkpoint(official_dir).sha256
    audio = official.load_audio(golden_data.AUDIO / "a05.mp3")
    (a,), (b,) = official.caption([audio]), serving.caption([audio])
    assert a.candidate_tokens == b.candidate_tokens and a.candidates == b.candidates
    assert torch.equal(a.clip_probs, b.clip_probs)


def test_legacy_gamma_layer_scale_name_is_accepted(official_dir, tmp_path):
    state = torch.load(official_dir / "pytorch_model.bin", weights_only=True)
    renamed = {k.replace("scale_layer", "gamma") if ".stages." in k else k: v for k, v in state.items()}
    assert any(k.endswith(".gamma") for k in renamed)
    (tmp_path / "config.json").write_bytes((official_dir / "config.json").read_bytes())
    torch.save(renamed, tmp_path / "pytorch_model.bin")
    official, legacy = CaptioningEngine.load(official_dir), CaptioningEngine.load(tmp_path)
    audio = official.load_audio(torch.sin(torch.arange(32000) / 10.0))
    (a,), (b,) = official.caption([audio]), legacy.caption([audio])
    assert a.candidate_tokens == b.candidate_tokens and torch.equal(a.clip_probs, b.clip_probs)


class _RunsShellCommand:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_malicious_vocabulary_pickle_is_refused_with_nothing_executed(official_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model.tokenizers.0._extra_state": _RunsShellCommand(f"touch {marker}")})
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        restricted_loads(payload)
    assert not marker.exists()

    state = torch.load(official_dir / "pytorch_model.bin", weights_only=True)
    state["_extra_state_"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    (tmp_path / "config.json").write_bytes((official_dir / "config.json").read_bytes())
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError):
        CaptioningEngine.load(tmp_path)
    assert not marker.exists()


def test_pickled_objects_in_the_weights_file_are_refused(official_dir, tmp_path):
    """torch.load(weights_only=True) refuses arbitrary objects in pytorch_model.bin itself."""
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_bytes((official_dir / "config.json").read_bytes())
    torch.save({"x": _RunsShellCommand(f"touch {marker}")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="plain tensors"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_plain_data_pickle_is_accepted():
    data = {"a": [1, 2.5, "x", None, True, (3, 4)], "b": {"c": b"bytes"}}
    assert restricted_loads(pickle.dumps(data)) == data


@pytest.mark.parametrize("missing", ["config.json", "pytorch_model.bin"])
def test_incomplete_checkpoint_folder_is_a_clear_error(official_dir, tmp_path, missing):
    for name in ("config.json", "pytorch_model.bin"):
        if name != missing:
            (tmp_path / name).symlink_to(official_dir / name)
    with pytest.raises(CheckpointError, match="config.json|pytorch_model.bin"):
        load_checkpoint(tmp_path)
