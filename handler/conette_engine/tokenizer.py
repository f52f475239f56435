"""Vocabulary and detokenisation of CoNeTTE's word-level AACTokenizer, without the `conette` package.

The official checkpoint stores the vocabulary as a pickle inside `pytorch_model.bin` (the uint8 tensor
`_extra_state_`). It is decoded here by `restricted_loads`, which builds plain data only and refuses any
class or function reference, so a crafted checkpoint cannot run code.
"""

import io
import json
import pickle
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch

from .errors import CheckpointError, UnsafePickleError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
TOKENIZER_STATE_KEY = "model.tokenizers.0._extra_state"

# The reference's post-decoding normalisers, in order (conette.tokenization.aac_tokenizer).
_SPECIAL_TOKENS_PATTERN = re.compile(f"({'|'.join(SPECIAL_TOKENS)})")
_SPACES_BEFORE_PUNCTUATION = re.compile(r'\s+([,.!?;:"\'])')
_DOUBLE_SPACES = re.compile(" +")
_HYPHEN_SPACES = re.compile(r"(\s*)(\-)(\s*)")


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for dict/list/tuple/str/int/float/bool/None only: every global lookup is refused."""

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from a checkpoint pickle: only plain data "
            "(dict, list, tuple, str, int, float, bool, None) is allowed"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent reference in a checkpoint pickle")


def restricted_loads(data: bytes):
    """Unpickle `data` as plain data; raises UnsafePickleError before anything can be called."""
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as error:
        raise CheckpointError(f"malformed pickle in checkpoint: {error}") from error


@dataclass(frozen=True)
class Vocabulary:
    """Token strings by id, and the ids of the special and task tokens."""

    tokens: tuple[str, ...]

    @classmethod
    def from_tokenizer_state(cls, state: dict) -> "Vocabulary":
        """From AACTokenizer's txt state (`{"tokenizer": {"itos": {id: token}, ...}, ...}`)."""
        try:
            itos = state["tokenizer"]["itos"]
            tokens = [itos[i] for i in range(len(itos))]
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"tokenizer state has no complete 'itos' table: {error!r}") from error
        if not all(isinstance(token, str) for token in tokens):
            raise CheckpointError("tokenizer state has non-string tokens")
        return cls(tuple(tokens))

    @classmethod
    def from_extra_state(cls, extra_state: torch.Tensor) -> "Vocabulary":
        """From the `_extra_state_` uint8 tensor of an official `pytorch_model.bin`."""
        if extra_state.dtype != torch.uint8 or extra_state.ndim != 1:
            raise CheckpointError("_extra_state_ must be a 1-D uint8 tensor")
        extra = restricted_loads(bytes(extra_state.tolist()))
        if not isinstance(extra, dict) or TOKENIZER_STATE_KEY not in extra:
            raise CheckpointError(f"_extra_state_ has no {TOKENIZER_STATE_KEY!r} entry")
        return cls.from_tokenizer_state(extra[TOKENIZER_STATE_KEY])

    @classmethod
    def from_json(cls, path: str | Path) -> "Vocabulary":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise CheckpointError(f"{path}: expected {{'tokens': [...]}}")
        return cls(tuple(data["tokens"]))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": list(self.tokens)}, ensure_ascii=False, indent=0), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def token_to_id(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    @property
    def eos_id(self) -> int:
        return self.token_to_id[EOS_TOKEN]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> caption text, exactly as the reference's `AACTokenizer.decode_rec`.

        Joins with spaces, then: removes <pad>/<bos>/<eos>/<unk> (task tokens such as <bos_clotho> stay),
        removes spaces before punctuation, strips, collapses spaces, removes spaces around '-', lower-cases.
        """
        text = " ".join(self.tokens[i] for i in ids)
        text = _SPECIAL_TOKENS_PATTERN.sub("", text)
        text = _SPACES_BEFORE_PUNCTUATION.sub(r"\1", text)
        text = text.strip()
        text = _DOUBLE_SPACES.sub(" ", text)
        text = _HYPHEN_SPACES.sub(r"\2", text)
        return text.lower()

    def content_words_mask(self) -> torch.Tensor:
        """(vocab_size,) bool: True for every token except NLTK English stopwords (shipped as package data)."""
        mask = torch.ones(len(self.tokens), dtype=torch.bool)
        for word in load_stopwords():
            if word in self.token_to_id:
                mask[self.token_to_id[word]] = False
        return mask


def load_stopwords() -> list[str]:
    text = resources.files(__package__).joinpath("data/stopwords_english.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]

