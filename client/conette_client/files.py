"""Small helpers shared by the commands, the tests and the maintainer tools: file hashes, loopback ports."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20


def sha256_and_size(path: str | Path) -> tuple[str, int]:
    """Hex sha256 and size in bytes of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def kernel_ports(count: int) -> list[int]:
    """`count` distinct loopback ports the kernel reports free (nothing listens on them once this returns)."""
    probes = []
    try:
        for _ in range(count):  # keep every probe bound until all are chosen, so no port comes twice
            probe = socket.socket()
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_ports(preferred: dict[str, int]) -> dict[str, int]:
    """The preferred loopback ports when all are free, else free ones the kernel picks (another run may hold ours)."""
    if all(port_is_free(port) for port in preferred.values()):
        return dict(preferred)
    return dict(zip(preferred, kernel_ports(len(preferred))))


def unused_local_port() -> int:
    """A loopback port where nothing listens: the address of an unreachable server."""
    return kernel_ports(1)[0]
