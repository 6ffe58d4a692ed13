"""Benchmark the USDA SR28 table: start-up cost (load and index build) and matching per item.

    python bench/nutrition.py [--loads 7] [--rounds 5] [--sr28 ../shared/usda-sr28]

Loads the real table several times, each in a fresh Python process as a server start does
(files read, parsed and indexed; imports not counted), and reports the median and the spread.
Then matches every labelled description of tests/nutrition_labels.py:
once on a fresh table (cold: each food's ranking profile is worked out the first time it is a
candidate, and the thread's SQLite copy is opened) and then for several rounds (warm), and
reports the median and p95 per item. Prints one line per figure; never fails on speed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nutrition import NutritionTable  # noqa: E402
from tests.nutrition_labels import HELD_OUT_FOODS, LABELLED_FOODS, Label  # noqa: E402

DEFAULT_SR28 = ROOT.parent / "shared" / "usda-sr28"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


LOAD_IN_A_FRESH_PROCESS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nutrition import NutritionTable
started = time.perf_counter()
NutritionTable.load(sys.argv[2])
print(time.perf_counter() - started)
"""


def time_loads(folder: Path, loads: int) -> list[float]:
    """Seconds NutritionTable.load takes in each of `loads` fresh interpreters."""
    times = []
    for _ in range(loads):
        done = subprocess.run(
            [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(ROOT), str(folder)],
            check=True,
            capture_output=True,
            text=True,
        )
        times.append(float(done.stdout))
    return times


def time_matches(table: NutritionTable, labels: tuple[Label, ...]) -> list[float]:
    times = []
    for label in labels:
        started = time.perf_counter()
        table.match(label.description, method=label.method)
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sr28", type=Path, default=DEFAULT_SR28)
    parser.add_argument("--loads", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args(argv)
    labels = LABELLED_FOODS + HELD_OUT_FOODS

    loads = time_loads(arguments.sr28, arguments.loads)
    print(
        f"index build at start (load SR28 + FTS5 index, fresh process), median of {len(loads)}: "
        f"{ms(statistics.median(loads))} (min {ms(min(loads))}, max {ms(max(loads))})"
    )
    table = NutritionTable.load(arguments.sr28)
    cold = time_matches(table, labels)
    print(
        f"matching, cold table, {len(cold)} items: median {ms(statistics.median(cold))} "
        f"per item, p95 {ms(percentile(cold, 0.95))}"
    )
    warm = [seconds for _ in range(arguments.rounds) for seconds in time_matches(table, labels)]
    print(
        f"matching, warm, {len(labels)} items x {arguments.rounds} rounds: "
        f"median {ms(statistics.median(warm))} per item, p95 {ms(percentile(warm, 0.95))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
