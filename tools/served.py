"""A private TorchServe serving a checkpoint, for the long-running tools (fuzz_server.py, soak.py).

    with served(checkpoint_dir) as server: ...   # a tests/conftest.py TorchServeInstance, stopped on exit

The tools that use it run with tests/ on the path (PYTHONPATH=tests) for conftest.py.

The .mar is built from the checkpoint by scripts/build_mar.sh into a temporary model store; the server runs the
repository's config.properties on free loopback ports with token authorization on, exactly as the test suite does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from conftest import TorchServeInstance, run_checked

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def served(checkpoint: Path):
    with tempfile.TemporaryDirectory(prefix="conette-tool-") as tmp:
        store, workdir = Path(tmp) / "model_store", Path(tmp) / "ts"
        store.mkdir()
        workdir.mkdir()
        run_checked(["bash", str(REPO_ROOT / "scripts" / "build_mar.sh"), str(checkpoint), str(store)],
                    env={**os.environ, "PYTHON": sys.executable})
        server = TorchServeInstance(workdir=workdir, model_store=store).start()
        try:
            yield server
        finally:
            server.stop()


def worker_pid(server: TorchServeInstance) -> int:
    (worker,) = server.workers()
    return worker["pid"]
