"""The target's noise floor: the paired SD over seeds between `none` and a regularizer that
changes almost nothing (l2 at sigma 1e-5: median |D| ~3e-3 at the cpu preset, where R starts to
shape a weight near 0.1), under training settings side by side.

Two stages that differ only by an inert regularizer should give the same test EPE; the paired SD
of their difference over seeds is the smallest effect a table can see. It comes from chaotic
amplification of tiny perturbations (a rounding difference, a slightly other gradient) over the run,
and from keeping the best-validation epoch on a small validation split. This script trains the
Table 2 cells of those two rows at a preset under each setting and prints, per setting, the mean
EPE of both rows, the paired mean difference and its SD (the floor). Stages are cached in the
store, so a rerun only prints.

    python bench/noise_floor.py [--config cpu] [--seeds 5] [--store runs/noise-floor]
        [--settings constant/best_val,cosine/final]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from cmkg import ablation, stages

ROWS = ("none", "l2 σ=1e-5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--store", default="runs/noise-floor")
    ap.add_argument("--settings", default="constant/best_val,cosine/final")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ab = ablation.load(Path(__file__).resolve().parent.parent / "ablations" / "table2.yaml")
    out = {}
    for setting in args.settings.split(","):
        schedule, keep = setting.split("/")
        sets = [f"optim.schedule={schedule}", f"optim.keep={keep}", f"run.store={args.store}",
                f"run.threads={args.threads}", "run.progress=none"]
        cells = [c for c in ablation.expand(ab, args.config, sets, seeds=args.seeds)
                 if c.row in ROWS and c.candidate is None]
        epe = {}
        for c in cells:
            t = time.perf_counter()
            art = stages.run_stage(c.node.stage, c.cfg)
            epe[(c.row, c.seed)] = art.metrics["test"]["epe_mm"]
            print(f"{setting:18s} {c.row:12s} seed {c.seed}: test EPE "
                  f"{epe[(c.row, c.seed)]:.2f} mm ({time.perf_counter() - t:.0f}s)", flush=True)
        out[setting] = epe
    print(f"\n{args.config} preset, Table 2 target, {args.seeds} seeds, {os.cpu_count()} cores")
    print(f"  {'setting':18s} {'none':>7s} {'l2 1e-5':>8s} {'l2 - none':>10s} {'paired SD':>10s}")
    for setting, epe in out.items():
        seeds = range(args.seeds)
        d = [epe[(ROWS[1], s)] - epe[(ROWS[0], s)] for s in seeds]
        print(f"  {setting:18s} {statistics.mean(epe[(ROWS[0], s)] for s in seeds):7.2f} "
              f"{statistics.mean(epe[(ROWS[1], s)] for s in seeds):8.2f} "
              f"{statistics.mean(d):+10.2f} {statistics.stdev(d):10.2f}")


if __name__ == "__main__":
    main()
