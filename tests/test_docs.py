"""docs/ against the code: the options table lists exactly the engine's options; the layers import what
docs/architecture.md says they may."""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from conette_engine.decoding import OPTION_NAMES, DecodingOptions, describe_option
from conftest import REPO_ROOT

HANDLER_DIR = REPO_ROOT / "handler"


def options_table() -> list[list[str]]:
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    table = re.search(r"<!-- options-table:.*?-->\n(.*?)<!-- end options-table -->", text, re.S).group(1)
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
    assert rows[0] == ["option", "values", "default", "what it does"]
    return rows[2:]


def test_options_table_lists_exactly_the_engine_options():
    rows = options_table()
    assert [row[0].strip("`") for row in rows] == list(OPTION_NAMES)
    specs = {spec.name: spec for spec in fields(DecodingOptions)}
    for name, values, default, what in rows:
        name = name.strip("`")
        assert values.startswith(describe_option(name)), name
        assert what.startswith(specs[name].metadata["help"]), name
        if specs[name].default is not None:
            assert default == str(specs[name].default), name


# What each layer may import (docs/architecture.md, "Layers"), beyond the standard library.
ALLOWED = {
    "conette_engine": {"torch", "torchaudio", "torchcodec", "safetensors", "conette_engine"},
    "conette_protocol": {"conette_engine.errors", "conette_engine.decoding", "conette_protocol"},
    "conette_handler": {"torch", "ts", "conette_engine", "conette_protocol"},
}


def imported_modules(path: Path, package: str | None) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module)  # relative: its own package
    return names


def allowed(name: str, rules: set[str]) -> bool:
    top = name.split(".")[0]
    return top in sys.stdlib_module_names or top == "__future__" or any(
        name == rule or name.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("layer", ALLOWED)
def test_layers_import_only_what_they_may(layer):
    paths = sorted((HANDLER_DIR / layer).glob("*.py")) if (HANDLER_DIR / layer).is_dir() else [
        HANDLER_DIR / f"{layer}.py"]
    assert paths
    for path in paths:
        package = layer if path.parent.name == layer else None
        bad = sorted(n for n in imported_modules(path, package) if not allowed(n, ALLOWED[layer]))
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"
