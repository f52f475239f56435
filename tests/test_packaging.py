"""The project's shape: console scripts that resolve, a light management client, help texts that cannot drift."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO_ROOT, checkout_env

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("command", ["conette-caption", "conette-manage", "conette-fetch-weights"])
def test_console_scripts_point_at_main_functions(command):
    module_name, function_name = PYPROJECT["project"]["scripts"][command].split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_management_client_and_weight_fetcher_do_not_import_torch():
    probe = (
        "import sys, conette_client.manage, conette_client.fetch_weights, conette_client.caption\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'torchaudio', 'conette_engine')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=checkout_env(),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_target():
    makefile = (REPO_ROOT / "Makefile").read_text()
    [phony] = re.findall(r"^\.PHONY:(.*)$", makefile, flags=re.MULTILINE)
    result = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^  make (\S+) ", result.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(set(phony.split()) - {"FORCE"})


def test_build_mar_help_is_its_usage_text():
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_mar.sh"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: scripts/build_mar.sh CHECKPOINT_DIR [EXPORT_DIR] [--no-archive]\n")
    assert "set -euo" not in result.stdout and "MODEL_VERSION" in result.stdout
    wrong = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_mar.sh")], capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: ")
