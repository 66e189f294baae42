"""Simulation speed of the engine: Llama 3.1 405B (the main scenario) at 64 to 16,384 GPUs.

    python benchmarks/bench_engine.py [--repeat 3] [--out reports/bench_engine.md]

Times `load_scenario` + `simulate` in-process (the best of --repeat runs) in the default symmetric
mode, and prints simulated devices, ops, network rate recomputations and ops per second. The goal
(issue "Engine"): at most 2 s for 16,384 GPUs, and less than 2x growth from 512 to 16,384 GPUs.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout without installing

from sim.engine import simulate          # noqa: E402
from sim.scenario import load_scenario   # noqa: E402
SCENARIO = ROOT / "scenarios" / "llama405b.yaml"

# (GPUs, pp, dp): TP8 throughout, 16 microbatches per DP rank, interleaved with 2 virtual stages
SIZES = [(64, 8, 1), (512, 16, 4), (4096, 16, 32), (16384, 16, 128)]


def overrides(gpus: int, pp: int, dp: int) -> list[str]:
    return [f"cluster.nodes={gpus // 8}", f"parallelism.pp={pp}", f"parallelism.dp={dp}",
            f"training.global_batch_size={16 * dp}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = ["| GPUs | plan | wall (s) | devices | ops | network events | ops/s | step (s) |", "|---|---|---|---|---|---|---|---|"]
    for gpus, pp, dp in SIZES:
        best, result = float("inf"), None
        for _ in range(args.repeat):
            start = time.perf_counter()
            scenario = load_scenario(SCENARIO, overrides(gpus, pp, dp))
            result = simulate(scenario)
            best = min(best, time.perf_counter() - start)
        rows.append(f"| {gpus:,} | TP8 PP{pp} DP{dp} | {best:.3f} | {len(result.devices)} | {result.ops:,} | "
                    f"{result.network_events:,} | {result.ops / best:,.0f} | {result.step_time_s:.3f} |")
    text = (f"# Engine speed: {SCENARIO.name} at several sizes\n\nPython {platform.python_version()}, "
            f"{platform.machine()}; best of {args.repeat} runs; load + simulate, in-process (add ~0.4 s of "
            f"interpreter start-up and imports for the `simulate` command).\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
