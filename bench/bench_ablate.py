"""Ablation runner overhead: total wall time vs the training time of its stages.

Runs one ablation (default Table 2 at the smoke preset, 1 seed) into a fresh store twice: with
one task at a time (``cpus_per_worker`` = all cores) and with one task per core. For each run it
prints the wall time, the sum of the stages' own training times (``meta.json`` duration, which
includes loading data and evaluating) and

    overhead = wall / (sum of stage times / concurrent tasks)

(goal <= 1.10 on 2 cores at cpu scale), plus the share of the wall time that is Ray start-up
and scheduling rather than training. ``--all`` times the three tables (what ``make demo`` runs).

    python bench/bench_ablate.py [--config smoke] [--ablation ablations/table2.yaml] [--all]
"""

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from cmkg import ablation, stages

ROOT = Path(__file__).resolve().parent.parent


def one(files, preset, cpus, tasks, tmp):
    import ray

    store = Path(tmp) / f"runs-{tasks}"
    sets = [f"run.store={store}", f"data.root={tmp}/data", "run.progress=none"]
    # render the data first, so the timed run is training and scheduling only
    cells = [c for f in files for c in ablation.expand(ablation.load(f), preset, sets, 1)]
    for n in ablation.union(cells):
        for spec in stages.stage_datasets(n.stage, n.cfg):
            stages.ensure_dataset(spec, n.cfg)
    t0 = time.time()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    t_init = time.time() - t0
    with contextlib.redirect_stdout(io.StringIO()):  # the tables; progress stays on stderr
        rc = ablation.run(files, preset, sets, seeds=1, report_dir=Path(tmp) / f"rep-{tasks}",
                          cpus_per_worker=cpus // tasks)
    wall = time.time() - t0
    ray.shutdown()
    stage_s = sum(json.loads(p.read_text())["duration_s"] for p in store.glob("*/*/meta.json"))
    n = len(list(store.glob("*/*/meta.json")))
    return rc, wall, t_init, stage_s, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smoke")
    ap.add_argument("--ablation", default=str(ROOT / "ablations" / "table2.yaml"))
    ap.add_argument("--all", action="store_true", help="the three tables (make demo's work)")
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    files = sorted(str(p) for p in (ROOT / "ablations").glob("table*.yaml")) if args.all \
        else [args.ablation]
    cpus = os.cpu_count() or 2
    tmp = tempfile.mkdtemp()
    print(f"{', '.join(Path(f).name for f in files)} at {args.config}, 1 seed, {cpus} CPUs")
    print(f"{'tasks at once':>14} {'stages':>7} {'wall s':>8} {'stage s':>8} {'overhead':>9} "
          f"{'ray.init s':>10} {'not training':>13}")
    for tasks in (1, cpus):
        rc, wall, t_init, stage_s, n = one(files, args.config, cpus, tasks, tmp)
        ideal = stage_s / tasks
        print(f"{tasks:>14} {n:>7} {wall:>8.1f} {stage_s:>8.1f} {wall / ideal:>9.3f} "
              f"{t_init:>10.1f} {max(0.0, 1 - ideal / wall):>12.1%}" + ("" if rc == 0 else
                                                                       "  (cells failed)"))


if __name__ == "__main__":
    main()
