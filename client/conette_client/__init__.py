"""Client side of conette-serve: the commands users and operators run against a TorchServe serving CoNeTTE.

Commands (console scripts of this package, see docs/commands.md):
    conette-caption        caption.py         caption many audio files with a running server
    conette-manage         manage.py          describe, scale, watch a running server; wait until it is READY
    conette-fetch-weights  fetch_weights.py   fetch and verify the official checkpoint from the Hugging Face hub

Shared helpers, imported by the commands, the tests and the maintainer tools:
    keys.py        TorchServe's key_file.json (tokens)
    torchserve.py  config.properties, the management API, READY polling
    prometheus.py  Prometheus text from the metrics port
    files.py       file sha256, free loopback ports
    timeline.py    conette-caption --segment: window requests, reassembly, text/SRT/WebVTT

Nothing here imports torch at module level: the management helper stays a light client.
"""
