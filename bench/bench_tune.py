"""Sweep overhead: `cmkg tune` (Ray Tune trials, Optuna sampling, trials training in-process)
against running the very same trial configs one after another in this process, in one run.

    python bench/bench_tune.py [--trials 4] [--epochs 3]

Prints both wall times, their ratio, ray.init's share and the overhead per trial. The sweep
runs first into a fresh store; the baseline then trains the configs the sweep chose into
another fresh store (repeats are cache hits in both).
"""

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from cmkg import config, stages
from cmkg.cluster.train import init_ray
from cmkg.cluster.tune import load_space, run_tune, trial_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp())
    space = tmp / "space.yaml"
    space.write_text(f"stage: target\ntrials: {args.trials}\nsampler: random\nseed: 1\n"
                     "params:\n  regularizer.form: {choice: [none, l2]}\n"
                     "  regularizer.sigma: {float: [1.0e-6, 1.0e-2], log: true, "
                     "when: {regularizer.form: [l2]}}\n")
    base = ["data.target.num=600", f"epochs.target={args.epochs}", f"data.root={tmp}/data",
            "run.progress=none"]
    cfg = config.load("smoke", base)
    stages.ensure_dataset(cfg.data.target, cfg)  # rendered once, outside both timings

    t = time.perf_counter()
    init_ray(None)
    ray_init = time.perf_counter() - t
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        run_tune(str(space), "smoke", base + [f"run.store={tmp}/sweep"])
    sweep = time.perf_counter() - t

    import pandas as pd

    frame = pd.read_csv(next((tmp / "sweep" / "_tune").glob("*/trials.csv")))
    params = [{k[len("config/"):]: v for k, v in row.items()
               if k.startswith("config/") and v == v}  # NaN: not sampled (conditional)
              for row in frame.to_dict("records")]
    load_space(space, "smoke", base)
    t = time.perf_counter()
    for p in params:
        c = trial_config(config.load("smoke", base + [f"run.store={tmp}/plain"]), p, str(space))
        with contextlib.redirect_stderr(io.StringIO()):
            stages.run_stage("target", c)
    plain = time.perf_counter() - t

    print(f"{args.trials} target-stage trials (resnet10, 32 px, 480 train samples, {args.epochs} "
          f"epochs), {os.cpu_count()} cores; ray.init {ray_init:.1f}s (once per command)")
    print(f"  {'path':36s} {'wall s':>7s} {'ratio':>6s}")
    print(f"  {'same configs in-process, in a row':36s} {plain:7.1f} {1.0:6.2f}")
    print(f"  {'cmkg tune (Ray Tune + Optuna)':36s} {sweep:7.1f} {sweep / plain:6.2f}")
    print(f"  overhead per trial: {(sweep - plain) / args.trials:.1f}s")


if __name__ == "__main__":
    main()
