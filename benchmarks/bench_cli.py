"""Wall time of `simulate SCENARIO` for the shipped scenarios (goal: llama405b < 2 s on 2 cores).

    python benchmarks/bench_cli.py [--repeat 5] [--out reports/bench_cli.md]

Runs the console entry point in a fresh interpreter each time (what a user waits for, imports
included) and reports the median and the best of the repeats.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_once(scenario: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sim.cli", str(scenario)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    lines = ["| scenario | median (s) | best (s) |", "|---|---|---|"]
    for scenario in sorted((ROOT / "scenarios").glob("*.yaml")):
        times = [time_once(scenario) for _ in range(args.repeat)]
        lines.append(f"| {scenario.name} | {statistics.median(times):.3f} | {min(times):.3f} |")
    header = (f"# `simulate SCENARIO` wall time\n\nPython {platform.python_version()} on {platform.machine()}, "
              f"{args.repeat} runs each, fresh interpreter per run (imports included).\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
