"""Find the TorchServe token a client script sends (scripts/caption.py, scripts/manage.py).

With token authorization on (TorchServe's default, and this project's), TorchServe writes key_file.json
into the directory it was started from:
    {"management": {"key": ..., "expiration time": ...}, "inference": {"key": ...}, "API": {"key": ...}}
`make serve` starts it from the repository root, so the scripts look there after the current directory.
"""

from __future__ import annotations

import json
from pathlib import Path

KEY_FILE_NAME = "key_file.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


class KeyFileError(Exception):
    """An explicitly named key file is missing, or a key file is not TorchServe's; str(self) says which."""


def resolve_token(key_type: str, token: str | None = None, key_file: str | None = None) -> str | None:
    """`token` if given, else the `key_type` key ("inference" or "management") of the key file.

    The key file is `key_file` if given, else ./key_file.json, else <repository root>/key_file.json;
    None when no token is given and no key file exists (a server with token authorization off).
    """
    if token:
        return token
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise KeyFileError(f"key file {key_file} does not exist")
        return token_from_key_file(path, key_type)
    for path in (Path.cwd() / KEY_FILE_NAME, REPO_ROOT / KEY_FILE_NAME):
        if path.is_file():
            return token_from_key_file(path, key_type)
    return None


def token_from_key_file(path: Path, key_type: str) -> str:
    try:
        return json.loads(path.read_text())[key_type]["key"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeyFileError(f"{path} is not a TorchServe key file with a {key_type} key ({error!r})") from error
