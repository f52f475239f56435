"""conette-fetch-weights (conette_client.fetch_weights) against a local stand-in of the hub (tests/hub_standin.py).

The script runs as a subprocess, as users run it, so that huggingface_hub reads HF_HUB_OFFLINE,
HF_HUB_CACHE and HF_TOKEN from the environment exactly as it does for them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conette_client.files import unused_local_port
from conftest import REPO_ROOT, checkout_env
from hub_standin import HubRepo, HubStandIn

REPO_ID = "Labbeti/conette"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    """A generated checkpoint in the official layout (what the hub repository holds)."""
    out_dir = tmp_path_factory.mktemp("official_checkpoint")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "make_test_checkpoint.py"), str(out_dir)],
        check=True,
        capture_output=True,
    )
    return {name: (out_dir / name).read_bytes() for name in ("config.json", "pytorch_model.bin")}


@pytest.fixture
def hub_env(tmp_path) -> dict[str, str]:
    """Environment with a private hub cache and no ambient token or offline switch."""
    env = {k: v for k, v in checkout_env().items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub_cache"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    return env


def run_fetch(
    out_dir: Path, env: dict[str, str], *extra: str, weights: bytes | None = None
) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "conette_client.fetch_weights", "--out", str(out_dir), "--revision", COMMIT, *extra]
    if weights is not None:
        args += ["--sha256", hashlib.sha256(weights).hexdigest(), "--size", str(len(weights))]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def cache_blobs(env: dict[str, str]) -> list[Path]:
    return sorted(Path(env["HF_HUB_CACHE"]).glob("models--*/blobs/*"))


def test_fetch_writes_verified_files_and_fills_the_cache(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        result = run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=checkpoint_files["pytorch_model.bin"])
        requested = [(method, path) for method, path, _ in hub.requests]
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    for name, content in checkpoint_files.items():
        assert (out_dir / name).read_bytes() == content
    # The weights came through the LFS redirect, as from the real hub.
    weights_sha256 = hashlib.sha256(checkpoint_files["pytorch_model.bin"]).hexdigest()
    assert ("GET", f"/lfs/{weights_sha256}") in requested
    assert weights_sha256 in {blob.name for blob in cache_blobs(hub_env)}


def test_fetch_follows_hf_endpoint_and_branch_names(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        # No --endpoint: HF_ENDPOINT alone leads to the stand-in. A later --revision overrides run_fetch's.
        result = run_fetch(
            out_dir,
            dict(hub_env, HF_ENDPOINT=hub.endpoint),
            "--revision",
            "main",
            weights=checkpoint_files["pytorch_model.bin"],
        )
    assert result.returncode == 0, result.stderr
    assert (out_dir / "pytorch_model.bin").read_bytes() == checkpoint_files["pytorch_model.bin"]


def test_verified_destination_is_kept_without_network(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    weights = checkpoint_files["pytorch_model.bin"]
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        assert run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=weights).returncode == 0
    mtime = (out_dir / "pytorch_model.bin").stat().st_mtime_ns
    # Nothing listens there any more: a second run must not need the hub.
    again = run_fetch(out_dir, hub_env, "--endpoint", f"http://127.0.0.1:{unused_local_port()}", weights=weights)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert (out_dir / "pytorch_model.bin").stat().st_mtime_ns == mtime


def test_cached_copy_serves_offline_mode(tmp_path, hub_env, checkpoint_files):
    weights = checkpoint_files["pytorch_model.bin"]
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        assert run_fetch(tmp_path / "first", hub_env, "--endpoint", hub.endpoint, weights=weights).returncode == 0
        requests_online = len(hub.requests)
        offline = run_fetch(
            tmp_path / "second", dict(hub_env, HF_HUB_OFFLINE="1"), "--endpoint", hub.endpoint, weights=weights
        )
        assert len(hub.requests) == requests_online
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "second" / "pytorch_model.bin").read_bytes() == weights


def test_offline_mode_without_cache_explains_what_to_do(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        result = run_fetch(out_dir, dict(hub_env, HF_HUB_OFFLINE="1"), "--endpoint", hub.endpoint)
        assert hub.requests == []
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE" in result.stderr
    assert "CHECKPOINT=" in result.stderr
    assert not out_dir.exists()


def test_unreachable_hub_fails_fast_with_manual_instructions(tmp_path, hub_env):
    out_dir = tmp_path / "weights"
    result = run_fetch(out_dir, hub_env, "--endpoint", f"http://127.0.0.1:{unused_local_port()}")
    assert result.returncode == 1
    message = result.stderr
    assert "cannot be reached" in message
    assert "config.json and pytorch_model.bin" in message and COMMIT in message
    assert "CHECKPOINT=" in message
    assert "Traceback" not in message
    assert not out_dir.exists()


def test_corrupted_weights_are_rejected_and_leave_nothing_behind(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    weights = checkpoint_files["pytorch_model.bin"]
    # Same length, one byte changed: passes huggingface_hub's size check, fails the sha256 check.
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0xFF
    corrupted_repo = HubRepo(REPO_ID, COMMIT, checkpoint_files, served_instead={"pytorch_model.bin": bytes(flipped)})
    with HubStandIn(corrupted_repo) as hub:
        result = run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=weights)
    assert result.returncode == 1
    assert "sha256" in result.stderr and hashlib.sha256(weights).hexdigest() in result.stderr
    assert list(out_dir.iterdir()) == []  # neither file, nor a temporary one
    assert hashlib.sha256(weights).hexdigest() not in {blob.name for blob in cache_blobs(hub_env)}

    # The bad copy left the cache too, so a good hub now gives good files.
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        retry = run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=weights)
    assert retry.returncode == 0, retry.stderr
    assert (out_dir / "pytorch_model.bin").read_bytes() == weights


def test_truncated_transfer_leaves_nothing_behind(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    weights = checkpoint_files["pytorch_model.bin"]
    # The CDN sends half the file: huggingface_hub's size check fails before ours runs.
    truncated = HubRepo(
        REPO_ID, COMMIT, checkpoint_files, served_instead={"pytorch_model.bin": weights[: len(weights) // 2]}
    )
    with HubStandIn(truncated) as hub:
        result = run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=weights)
    assert result.returncode == 1
    assert "Downloading pytorch_model.bin failed" in result.stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    assert not [
        p for p in Path(hub_env["HF_HUB_CACHE"]).rglob("*") if p.is_file() and p.stat().st_size == len(weights) // 2
    ]


def test_corrupted_destination_file_is_replaced(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    out_dir.mkdir()
    (out_dir / "config.json").write_bytes(checkpoint_files["config.json"])
    (out_dir / "pytorch_model.bin").write_bytes(b"\0" * len(checkpoint_files["pytorch_model.bin"]))
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        result = run_fetch(out_dir, hub_env, "--endpoint", hub.endpoint, weights=checkpoint_files["pytorch_model.bin"])
    assert result.returncode == 0, result.stderr
    assert "fail verification" in result.stderr
    assert (out_dir / "pytorch_model.bin").read_bytes() == checkpoint_files["pytorch_model.bin"]


def test_wrong_expected_size_is_rejected(tmp_path, hub_env, checkpoint_files):
    out_dir = tmp_path / "weights"
    weights = checkpoint_files["pytorch_model.bin"]
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        result = run_fetch(
            out_dir,
            hub_env,
            "--endpoint",
            hub.endpoint,
            "--sha256",
            hashlib.sha256(weights).hexdigest(),
            "--size",
            str(len(weights) + 1),
        )
    assert result.returncode == 1
    assert f"{len(weights) + 1:,} were expected" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_hf_token_is_sent_to_a_private_repository(tmp_path, hub_env, checkpoint_files):
    weights = checkpoint_files["pytorch_model.bin"]
    private = HubRepo(REPO_ID, COMMIT, checkpoint_files, token="hf_standin_secret")
    with HubStandIn(private) as hub:
        denied = run_fetch(tmp_path / "denied", hub_env, "--endpoint", hub.endpoint, weights=weights)
        allowed = run_fetch(
            tmp_path / "allowed",
            dict(hub_env, HF_TOKEN="hf_standin_secret"),
            "--endpoint",
            hub.endpoint,
            weights=weights,
        )
    assert denied.returncode == 1
    assert "HF_TOKEN" in denied.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "allowed" / "pytorch_model.bin").read_bytes() == weights


def test_unknown_revision_is_reported(tmp_path, hub_env, checkpoint_files):
    with HubStandIn(HubRepo(REPO_ID, COMMIT, checkpoint_files)) as hub:
        result = run_fetch(tmp_path / "weights", hub_env, "--endpoint", hub.endpoint, "--revision", "f" * 40)
    assert result.returncode == 1
    assert f"Revision {'f' * 40} does not exist" in result.stderr
