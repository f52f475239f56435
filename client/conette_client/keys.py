"""The TorchServe tokens a client sends.

With token authorization on (TorchServe's default, and this project's), TorchServe writes key_file.json
into the directory it was started from:
    {"management": {"key": ..., "expiration time": ...}, "inference": {"key": ...}, "API": {"key": ...}}
`make serve` starts it from the repository root, so a command run from a checkout looks there after the
current directory.
"""

from __future__ import annotations

import json
from pathlib import Path

KEY_FILE_NAME = "key_file.json"
# The checkout this package runs from, when it runs from one (an editable install or PYTHONPATH=client).
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


class KeyFileError(Exception):
    """An explicitly named key file is missing, or a key file is not TorchServe's; str(self) says which."""


def read_keys(path: Path) -> dict[str, str]:
    """Every key of a TorchServe key file, by name ("management", "inference", "API")."""
    try:
        entries = json.loads(Path(path).read_text())
        return {name: entry["key"] for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise KeyFileError(f"{path} is not a TorchServe key file ({error!r})") from error


def key_file_candidates() -> list[Path]:
    candidates = [Path.cwd() / KEY_FILE_NAME]
    if (CHECKOUT_ROOT / "config.properties").is_file():
        candidates.append(CHECKOUT_ROOT / KEY_FILE_NAME)
    return candidates


def resolve_token(key_type: str, token: str | None = None, key_file: str | None = None) -> str | None:
    """`token` if given, else the `key_type` key ("inference" or "management") of the key file.

    The key file is `key_file` if given, else ./key_file.json, else key_file.json at the root of the
    checkout this package runs from; None when no token is given and no key file exists (a server with
    token authorization off).
    """
    if token:
        return token
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise KeyFileError(f"key file {key_file} does not exist")
        return token_from_key_file(path, key_type)
    for path in key_file_candidates():
        if path.is_file():
            return token_from_key_file(path, key_type)
    return None


def token_from_key_file(path: Path, key_type: str) -> str:
    keys = read_keys(path)
    if key_type not in keys:
        raise KeyFileError(f"{path} is not a TorchServe key file with a {key_type} key")
    return keys[key_type]
