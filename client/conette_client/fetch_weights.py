#!/usr/bin/env python
"""Fetch the official CoNeTTE checkpoint (config.json + pytorch_model.bin) from the Hugging Face hub.

    conette-fetch-weights --out weights/conette

Downloads go through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE), so a second fetch of the
same pinned revision costs nothing and works with HF_HUB_OFFLINE=1; HF_TOKEN and HF_ENDPOINT are
honoured as everywhere else in huggingface_hub. pytorch_model.bin is checked against a pinned
sha256 and size before anything is written to --out. Files reach --out by an atomic rename of a
verified temporary copy, and both files are renamed only once both are verified, so --out never
holds a partial or unverified file. An --out that already holds verified files is left untouched.

Exit status: 0 when --out holds verified files, 1 otherwise (with a one-paragraph reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import HASH_CHUNK_BYTES, sha256_and_size

DEFAULT_REPO_ID = "Labbeti/conette"
# Commit 39d0bef of Labbeti/conette ("Upload model", 2023-11-08): the commit that set
# pytorch_model.bin to the sha256 below. A commit hash, not a branch, so that what is fetched
# never changes under us and a cached copy is found without asking the hub.
DEFAULT_REVISION = "39d0beffd71dd423c334076eeec2408187360c88"
DEFAULT_WEIGHTS_SHA256 = "271b9f4409ebbceaa0d5fe5319069a3a56e269ab0b868616d7e23f5145cc0ce2"
DEFAULT_WEIGHTS_SIZE = 202_634_582

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "pytorch_model.bin"


class FetchError(Exception):
    """A failure the user can act on; str(self) is the paragraph printed to stderr."""


@dataclass(frozen=True)
class ExpectedWeights:
    sha256: str
    size: int


def check_config(path: Path) -> None:
    """config.json has no published hash; insist at least that it is a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FetchError(f"{path} is not a readable JSON file ({error}).") from error
    if not isinstance(value, dict):
        raise FetchError(f"{path} does not hold a JSON object.")


def check_weights(path: Path, expected: ExpectedWeights) -> None:
    size = path.stat().st_size
    if size != expected.size:
        raise FetchError(
            f"{path} has {size:,} bytes where {expected.size:,} were expected: the file is incomplete "
            "or not the pinned checkpoint."
        )
    sha256, _ = sha256_and_size(path)
    if sha256 != expected.sha256:
        raise FetchError(
            f"{path} has sha256 {sha256} where {expected.sha256} was expected: the file is corrupted "
            "or not the pinned checkpoint."
        )


def destination_is_verified(out_dir: Path, expected: ExpectedWeights) -> bool:
    config, weights = out_dir / CONFIG_FILENAME, out_dir / WEIGHTS_FILENAME
    if not (config.is_file() and weights.is_file()):
        return False
    try:
        check_config(config)
        check_weights(weights, expected)
    except FetchError as error:
        print(f"{out_dir} holds files that fail verification, fetching again: {error}", file=sys.stderr)
        return False
    return True


def manual_placement_help(args: argparse.Namespace) -> str:
    return (
        f"To proceed without the hub, download {CONFIG_FILENAME} and {WEIGHTS_FILENAME} of "
        f"{args.repo_id} at revision {args.revision} on a machine that can reach it "
        f"(https://huggingface.co/{args.repo_id}/tree/{args.revision}), copy both into {args.out}, and "
        f"run this command again: it verifies files already in place and exits 0. Or point the build at "
        f"any folder holding them, e.g. `make serve CHECKPOINT=/path/to/folder`. A copy already in the "
        f"hub cache is used as is (HF_HUB_CACHE, HF_HOME)."
    )


def download_to_cache(args: argparse.Namespace, filename: str) -> Path:
    """Return the path of `filename` in the hub cache, downloading it if the cache lacks it."""
    # Imported here so that --help and argument errors do not pay for the import.
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = args.endpoint or constants.ENDPOINT
    try:
        if not constants.is_offline_mode() and not isinstance(
            try_to_load_from_cache(args.repo_id, filename, revision=args.revision), str
        ):
            # One HEAD without retries first: hf_hub_download retries an unreachable hub with
            # backoff for half a minute or more before giving up, a long wait on an offline machine.
            get_hf_file_metadata(hf_hub_url(args.repo_id, filename, revision=args.revision, endpoint=args.endpoint))
        return Path(
            hf_hub_download(repo_id=args.repo_id, filename=filename, revision=args.revision, endpoint=args.endpoint)
        )
    except httpx2.TransportError as error:  # connection refused, DNS failure, timeout, proxy failure
        raise FetchError(
            f"Cannot fetch {filename}: the hub at {endpoint} cannot be reached ({error}). {manual_placement_help(args)}"
        ) from error
    except LocalEntryNotFoundError as error:
        if constants.is_offline_mode():
            reason = f"HF_HUB_OFFLINE is set and the hub cache ({constants.HF_HUB_CACHE}) has no {filename}"
        else:
            reason = f"the hub at {endpoint} cannot be reached ({error.__cause__ or error})"
        raise FetchError(f"Cannot fetch {filename}: {reason}. {manual_placement_help(args)}") from error
    except GatedRepoError as error:
        raise FetchError(
            f"{args.repo_id} is gated: accept its terms on the hub and set HF_TOKEN to a token of that account "
            f"({error})."
        ) from error
    except RepositoryNotFoundError as error:
        raise FetchError(
            f"Repository {args.repo_id} was not found at {endpoint}, or it is private and HF_TOKEN is missing or "
            f"lacks access ({error})."
        ) from error
    except RevisionNotFoundError as error:
        raise FetchError(f"Revision {args.revision} does not exist in {args.repo_id} ({error}).") from error
    except RemoteEntryNotFoundError as error:
        raise FetchError(f"{args.repo_id} has no {filename} at revision {args.revision} ({error}).") from error
    except HfHubHTTPError as error:
        raise FetchError(
            f"The hub refused the download of {filename}: {error}. {manual_placement_help(args)}"
        ) from error
    except OSError as error:
        # Disk full, unwritable cache, size mismatch reported by huggingface_hub, ...
        raise FetchError(f"Downloading {filename} failed: {error}") from error


def discard_cached_copy(cached: Path) -> None:
    """Remove a cached file that failed verification, so that the next run downloads it again."""
    blob = cached.resolve()  # the snapshot entry is a symlink to a blob named after the ETag
    cached.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def stage_verified_copy(cached: Path, out_dir: Path, filename: str, expected: ExpectedWeights | None) -> Path:
    """Copy `cached` to a temporary file in out_dir and verify the copy; return the temporary path.

    `expected` is None for config.json, which is only checked to be JSON.
    """
    handle, staged_name = tempfile.mkstemp(dir=out_dir, prefix=f".{filename}.", suffix=".partial")
    staged = Path(staged_name)
    try:
        with os.fdopen(handle, "wb") as target, cached.open("rb") as source:
            while chunk := source.read(HASH_CHUNK_BYTES):
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        os.chmod(staged, 0o644)
        if expected is None:
            check_config(staged)
        else:
            check_weights(staged, expected)
    except FetchError as error:
        staged.unlink(missing_ok=True)
        discard_cached_copy(cached)
        raise FetchError(
            f"Rejected {filename} from {cached}: {error} Nothing was written to {out_dir}; the bad copy was removed "
            f"from the hub cache, so running again downloads it afresh."
        ) from error
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def fetch(args: argparse.Namespace) -> str:
    """Make args.out hold verified files; return a one-line account of what was done."""
    expected = ExpectedWeights(sha256=args.sha256.lower(), size=args.size)
    out_dir = Path(args.out)
    if destination_is_verified(out_dir, expected):
        return f"{out_dir} already holds the verified checkpoint (sha256 {expected.sha256}); nothing to do."

    cached = {name: download_to_cache(args, name) for name in (CONFIG_FILENAME, WEIGHTS_FILENAME)}
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        staged[CONFIG_FILENAME] = stage_verified_copy(cached[CONFIG_FILENAME], out_dir, CONFIG_FILENAME, None)
        staged[WEIGHTS_FILENAME] = stage_verified_copy(cached[WEIGHTS_FILENAME], out_dir, WEIGHTS_FILENAME, expected)
        for name, path in staged.items():
            os.replace(path, out_dir / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return f"{out_dir} now holds {args.repo_id}@{args.revision} ({WEIGHTS_FILENAME} sha256 {expected.sha256})."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conette-fetch-weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to hold config.json and pytorch_model.bin")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="hub repository (default: %(default)s)")
    parser.add_argument(
        "--revision", default=DEFAULT_REVISION, help="commit hash, branch or tag to fetch (default: %(default)s)"
    )
    parser.add_argument(
        "--endpoint", default=None, help="hub endpoint, e.g. a mirror (default: HF_ENDPOINT or https://huggingface.co)"
    )
    parser.add_argument(
        "--sha256", default=DEFAULT_WEIGHTS_SHA256, help="expected sha256 of pytorch_model.bin (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_WEIGHTS_SIZE,
        help="expected size of pytorch_model.bin in bytes (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(fetch(args))
    except FetchError as error:
        print(f"conette-fetch-weights: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
