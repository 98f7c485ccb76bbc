"""How fast the CLI starts: `cmkg --help`, every subcommand's `--help`, and the cpu
reproduction's `--dry-run` on an empty store, each the median of ``--repeat`` fresh processes,
with the heavy modules (torch, torchvision, pyarrow, ray, optuna) each one imports, read from
``python -X importtime``. One run prints every row side by side, so a loaded machine slows them
alike; the targets (issue "scale-out you can plan") are < 0.3 s for a help and < 3 s for the
dry-run on an idle machine.

    python bench/bench_startup.py [--repeat 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "torchvision", "pyarrow", "ray", "optuna", "pandas", "matplotlib")
COMMANDS = ["data", "config", "train", "tune", "ablate", "reproduce", "report", "runs",
            "eval-predictions", "figure", "phi"]


def timed(args: list[str], repeat: int) -> tuple[float, list[str]]:
    """Median wall of ``python -m cmkg ARGS`` over ``repeat`` processes, and the heavy modules
    it imported (top-level names from -X importtime)."""
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cmkg", *args], capture_output=True, check=False)
        walls.append(time.perf_counter() - start)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cmkg", *args],
                         capture_output=True, text=True, check=False)
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
             if line.startswith("import time:")}
    return statistics.median(walls), sorted(h for h in HEAVY if h in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("cmkg --help", ["--help"])]
        rows += [(f"cmkg {c} --help", [c, "--help"]) for c in COMMANDS]
        rows += [("cmkg reproduce --config cpu --dry-run (empty store)",
                  ["reproduce", "--config", "cpu", "--dry-run", "--store", f"{tmp}/runs",
                   "--set", f"data.root={tmp}/data"])]
        base = None
        print(f"{'command':58s} {'median s':>9s} {'x help':>7s}  heavy imports")
        for label, argv in rows:
            wall, heavy = timed(argv, 1 if "dry-run" in argv else args.repeat)
            base = base or wall
            print(f"{label:58s} {wall:9.3f} {wall / base:7.2f}  {', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
