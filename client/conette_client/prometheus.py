"""Prometheus text exposition format, as TorchServe's metrics port (metrics_mode=prometheus) serves it."""

from __future__ import annotations

import re
from typing import NamedTuple

SAMPLE_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)")
LABEL = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


class Sample(NamedTuple):
    name: str
    labels: str  # as written, braces included ("" when none): what a reader sees next to the name
    value: float

    def label_values(self) -> dict[str, str]:
        return {match["key"]: match["value"] for match in LABEL.finditer(self.labels)}


def parse_samples(text: str) -> list[Sample]:
    """Every sample line with a numeric value; comments (# HELP, # TYPE) and other lines are skipped."""
    samples = []
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        samples.append(Sample(match["name"], match["labels"] or "", value))
    return samples


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in parse_samples(text)
        if sample.name == name and labels.items() <= sample.label_values().items()
    )
