"""Benchmark the USDA SR28 table: start-up cost (load and index build) and matching per item.

    python bench/nutrition.py [--loads 7] [--rounds 5] [--sr28 FOLDER]

Loads the real table several times, each in a fresh Python process as a server start does
(`NutritionTable.load(BUNDLED_SR28)`: the repository's xz files read, checked against SHA256SUMS,
unpacked in memory, parsed and indexed; imports not counted), and reports the median and the spread,
beside the import of the service itself (`import app`), timed the same way in fresh processes
interleaved with the loads. Then matches every labelled description of
tests/nutrition_labels.py: once on a fresh table (cold: each food's ranking profile is worked out
the first time it is a candidate, and the thread's SQLite copy is opened) and then for several
rounds (warm), and reports the median and p95 per item. Prints one line per figure; never fails
on speed. `bench/run.py` runs the same measurement as its row h (`measure`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nutrition import BUNDLED_SR28, NutritionTable  # noqa: E402
from tests.nutrition_labels import HELD_OUT_FOODS, LABELLED_FOODS, Label  # noqa: E402

LABELS = LABELLED_FOODS + HELD_OUT_FOODS


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank value below which `fraction` of the values lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    """Seconds as milliseconds, two decimals."""
    return f"{seconds * 1000:.2f} ms"


LOAD_IN_A_FRESH_PROCESS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nutrition import NutritionTable
started = time.perf_counter()
NutritionTable.load(sys.argv[2])
print(time.perf_counter() - started)
"""

IMPORT_IN_A_FRESH_PROCESS = """
import sys, time
sys.path.insert(0, sys.argv[1])
started = time.perf_counter()
import app
print(time.perf_counter() - started)
"""


def time_in_fresh_process(code: str, *arguments: str) -> float:
    """The seconds a snippet prints, run in a new interpreter from the repository root."""
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), *arguments],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    return float(done.stdout.strip().splitlines()[-1])


def time_loads(folder: Path, loads: int) -> tuple[list[float], list[float]]:
    """Seconds of NutritionTable.load and of `import app`, each in `loads` fresh interpreters.

    One untimed run of each first (files into the page cache); then the two alternate, the
    order flipping every time, so drift on the machine hits both alike.
    """
    kinds = {
        "load": (LOAD_IN_A_FRESH_PROCESS, str(folder)),
        "import": (IMPORT_IN_A_FRESH_PROCESS,),
    }
    for code, *arguments in kinds.values():
        time_in_fresh_process(code, *arguments)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for number in range(loads):
        order = list(kinds) if number % 2 == 0 else list(reversed(kinds))
        for kind in order:
            code, *arguments = kinds[kind]
            times[kind].append(time_in_fresh_process(code, *arguments))
    return times["load"], times["import"]


def time_matches(table: NutritionTable, labels: tuple[Label, ...]) -> list[float]:
    """Seconds of `table.match` for each label's description, in order."""
    times = []
    for label in labels:
        started = time.perf_counter()
        table.match(label.description, method=label.method)
        times.append(time.perf_counter() - started)
    return times


@dataclass(frozen=True)
class Figures:
    """What one measurement found: seconds per load, per import, per match."""

    folder: Path
    food_count: int
    items: int
    rounds: int
    loads: list[float]
    imports: list[float]
    cold: list[float]
    warm: list[float]
    matched: int


def measure(folder: Path | None = None, loads: int = 7, rounds: int = 5) -> Figures:
    """Load times in fresh processes, then cold and warm matching of every labelled item."""
    if loads < 1 or rounds < 1:
        raise ValueError("loads and rounds must be at least 1")
    folder = folder or BUNDLED_SR28  # what the service loads: the repository's xz-packed copy
    load_times, import_times = time_loads(folder, loads)
    table = NutritionTable.load(folder)
    cold = time_matches(table, LABELS)
    warm = [seconds for _ in range(rounds) for seconds in time_matches(table, LABELS)]
    matched = sum(table.match(item.description, method=item.method) is not None for item in LABELS)
    return Figures(
        folder=folder,
        food_count=table.food_count,
        items=len(LABELS),
        rounds=rounds,
        loads=load_times,
        imports=import_times,
        cold=cold,
        warm=warm,
        matched=matched,
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print one line per figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sr28", type=Path, default=None)
    parser.add_argument("--loads", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args(argv)
    figures = measure(arguments.sr28, arguments.loads, arguments.rounds)
    loads, imports = figures.loads, figures.imports
    print(
        f"load at start (SR28 read, unpacked, parsed + FTS5 index, fresh process), "
        f"median of {len(loads)}: "
        f"{ms(statistics.median(loads))} (min {ms(min(loads))}, max {ms(max(loads))}); "
        f"import app, the same way: {ms(statistics.median(imports))}"
    )
    cold, warm = figures.cold, figures.warm
    print(
        f"matching, cold table, {len(cold)} items: median {ms(statistics.median(cold))} "
        f"per item, p95 {ms(percentile(cold, 0.95))}"
    )
    print(
        f"matching, warm, {figures.items} items x {figures.rounds} rounds: "
        f"median {ms(statistics.median(warm))} per item, p95 {ms(percentile(warm, 0.95))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
