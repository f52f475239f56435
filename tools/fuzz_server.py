"""Long fuzz of a private TorchServe: batches of 8 concurrent requests mixing good, bad and junk cases.

    PYTHONPATH=tests python tools/fuzz_server.py --checkpoint DIR [--batches 300] [--seed N]

The cases and the rules are those of tests/test_fuzz.py (tools/fuzz_cases.py): a bad request gets a 4xx JSON
error, a good one its lone answer (the in-process engine's, same options), nothing gets a 5xx or NaN, and the worker
PID never changes. Printed: cases by kind, outcomes (status and error type), failures (must be 0), PID.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from served import served, worker_pid

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fuzz_cases
from conette_engine.engine import CaptioningEngine
from soak import make_clips

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=300, help="hypothesis examples, 8 requests each")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args()

    engine = CaptioningEngine.load(args.checkpoint)
    outcomes, failures = collections.Counter(), []

    with tempfile.TemporaryDirectory() as tmp, served(args.checkpoint) as server:
        clips = make_clips(Path(tmp))

        lone_answer = fuzz_cases.lone_answers(engine, clips)
        pid = worker_pid(server)
        started = time.perf_counter()

        @settings(max_examples=args.batches, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(fuzz_cases.mixed_cases(sorted(clips)), min_size=BATCH, max_size=BATCH))
        def batch(cases):
            for case, response in zip(cases, fuzz_cases.fire_together(server, cases, clips)):
                try:
                    outcomes[(case.kind, fuzz_cases.check(case, response, lone_answer))] += 1
                except (AssertionError, ValueError) as error:  # record and go on: the figures are the point
                    failures.append(f"{case}: {error}"[:400])

        if args.seed is not None:
            batch = seed(args.seed)(batch)
        batch()
        wall = time.perf_counter() - started
        pid_after = worker_pid(server)

    kinds = collections.Counter()
    for (kind, _), count in outcomes.items():
        kinds[kind] += count
    print(f"fuzz: {sum(kinds.values()) + len(failures)} requests in batches of {BATCH}, {wall:.0f} s, checkpoint "
          f"{args.checkpoint}")
    print(f"  cases by kind: {dict(kinds)}")
    for (kind, outcome), count in sorted(outcomes.items()):
        print(f"    {kind:5s} {outcome:32s} {count}")
    print(f"  failures: {len(failures)}")
    for failure in failures[:20]:
        print(f"    {failure}")
    print(f"  worker PID {pid} -> {pid_after} ({'unchanged' if pid == pid_after else 'CHANGED'})")
    if failures or pid != pid_after:
        sys.exit(1)


if __name__ == "__main__":
    main()
