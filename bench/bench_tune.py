"""Sweep figures, in one run, each part selectable (default: all three):

    python bench/bench_tune.py [--only overhead,asha,concurrent] [--trials 4] [--epochs 3]
                               [--asha-trials 12] [--asha-epochs 4]

overhead    `cmkg tune` (Ray Tune trials, Optuna sampling, trials training in-process) against
            running the very same trial configs one after another in this process: both wall
            times, their ratio, ray.init's share and the overhead per trial. The sweep runs
            first into a fresh store; the baseline then trains the configs the sweep chose into
            another fresh store (repeats are cache hits in both).
asha        a sweep of --asha-trials target trials over the learning rate with Ray Tune's ASHA
            (time_attr epoch, max_t = the target's epochs, grace_period 1, reduction_factor 2),
            one trial (1 CPU, 1 thread) at a time: trial-epochs run (from trials.parquet)
            against trials x max_t.
concurrent  a local multi-node cluster (``ray.cluster_utils.Cluster``: a head without CPUs and
            two 1-CPU worker nodes): the same 2 target trials with `concurrency: 2` and with
            `concurrency: 1` (each into a fresh store; 1 CPU, so 1 torch thread, per trial),
            against those configs trained in a row in-process with 1 thread. Overhead per trial
            = (wall x concurrency - in-process wall) / trials: the CPU-slot seconds a trial
            holds beyond its training.
"""

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from cmkg import config, stages
from cmkg.cluster.connect import init_ray
from cmkg.cluster.spaces import load_space, trial_config
from cmkg.cluster.tune import run_tune

PARTS = ("overhead", "asha", "concurrent")
SPACE = ("sampler: random\nseed: 1\nparams:\n  regularizer.form: {choice: [none, l2]}\n"
         "  regularizer.sigma: {float: [1.0e-6, 1.0e-2], log: true, "
         "when: {regularizer.form: [l2]}}\n")


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    quiet(fn, *args, **kwargs)
    return time.perf_counter() - t


def sweep_dir(store: Path) -> Path:
    return next((store / "_tune").glob("*-*"))


def in_process(space: Path, base: list[str], store: Path) -> float:
    """Wall time of the configs the sweep under ``store`` chose, trained in a row here."""
    import pandas as pd

    frame = pd.read_csv(sweep_dir(store) / "trials.csv")
    params = [{k[len("config/"):]: v for k, v in row.items()
               if k.startswith("config/") and v == v}  # NaN: not sampled (conditional)
              for row in frame.to_dict("records")]
    load_space(space, "smoke", base)
    t = time.perf_counter()
    for p in params:
        c = trial_config(config.load("smoke", base + [f"run.store={store}-plain"]), p,
                         str(space))
        quiet(stages.run_stage, "target", c)
    return time.perf_counter() - t


def overhead(tmp: Path, base: list[str], trials: int) -> list[str]:
    space = tmp / "overhead.yaml"
    space.write_text(f"stage: target\ntrials: {trials}\n{SPACE}")
    t = time.perf_counter()
    init_ray(None)
    ray_init = time.perf_counter() - t
    sweep = timed(run_tune, str(space), "smoke", base + [f"run.store={tmp}/sweep"])
    plain = in_process(space, base, tmp / "sweep")
    return [f"overhead: {trials} target trials, ray.init {ray_init:.1f}s (once per command)",
            f"  {'path':36s} {'wall s':>7s} {'ratio':>6s}",
            f"  {'same configs in-process, in a row':36s} {plain:7.1f} {1.0:6.2f}",
            f"  {'cmkg tune (Ray Tune + Optuna)':36s} {sweep:7.1f} {sweep / plain:6.2f}",
            f"  overhead per trial: {(sweep - plain) / trials:.1f}s"]


def asha(tmp: Path, base: list[str], trials: int, epochs: int) -> list[str]:
    import pyarrow.parquet as pq

    init_ray(None)
    space = tmp / "asha.yaml"
    space.write_text(f"stage: target\ntrials: {trials}\ncpus_per_worker: 1\nsampler: random\n"
                     "seed: 0\n"
                     f"set: [regularizer.form=none, epochs.target={epochs}]\n"
                     "scheduler: {asha: {grace_period: 1, reduction_factor: 2}}\n"
                     "params:\n  optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n")
    store = tmp / "asha"
    wall = timed(run_tune, str(space), "smoke", base + [f"run.store={store}"])
    rows = pq.read_table(sweep_dir(store) / "trials.parquet").to_pylist()
    ran = sum(r["epochs"] or 0 for r in rows)
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    full = trials * epochs
    return [f"asha: {trials} target trials, max_t {epochs} epochs, grace_period 1, "
            f"reduction_factor 2, one trial at a time; wall {wall:.1f}s",
            f"  trials {states['COMPLETE']} complete / {states['PRUNED']} pruned / "
            f"{states['FAIL']} failed; epochs run: {sorted(r['epochs'] or 0 for r in rows)}",
            f"  trial-epochs run {ran} vs {trials} x {epochs} = {full}: ratio {ran / full:.2f} "
            f"({1 - ran / full:.0%} saved)"]


def concurrent(tmp: Path, base: list[str]) -> list[str]:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the parts above ran on a local Ray of this process
    small = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": 0})
    for _ in range(2):
        cluster.add_node(**small)
    ray.init(address=cluster.address, log_to_driver=False)
    start = time.perf_counter() - t
    base = base + ["run.threads=1"]
    walls = {}
    try:
        for n in (2, 1):  # concurrent first: warm-up, if any, favours the trials in a row
            space = tmp / f"concurrent{n}.yaml"
            space.write_text(f"stage: target\ntrials: 2\nconcurrency: {n}\ncpus_per_worker: 1\n"
                             f"{SPACE}")
            walls[n] = timed(run_tune, str(space), "smoke",
                             base + [f"run.store={tmp}/concurrent{n}"],
                             address=cluster.address)
        plain = in_process(tmp / "concurrent1.yaml", base, tmp / "concurrent1")
    finally:
        ray.shutdown()
        cluster.shutdown()
    lines = [f"concurrent: 2 target trials, cpus_per_worker 1, on 2 one-CPU worker nodes "
             f"(head 0 CPUs; cluster start {start:.1f}s, not counted)",
             f"  {'path':36s} {'wall s':>7s} {'ratio':>6s} {'overhead/trial s':>17s}",
             f"  {'in-process, in a row, 1 thread':36s} {plain:7.1f} {plain / walls[1]:6.2f} "
             f"{'':>17s}"]
    for n, label in ((1, "cmkg tune, concurrency 1"), (2, "cmkg tune, concurrency 2")):
        lines.append(f"  {label:36s} {walls[n]:7.1f} {walls[n] / walls[1]:6.2f} "
                     f"{(walls[n] * n - plain) / 2:17.1f}")
    lines.append(f"  concurrency 2 / concurrency 1 wall: {walls[2] / walls[1]:.2f}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated parts to run: {', '.join(PARTS)}")
    ap.add_argument("--trials", type=int, default=4, help="overhead: trials")
    ap.add_argument("--epochs", type=int, default=3, help="overhead, concurrent: target epochs")
    ap.add_argument("--asha-trials", type=int, default=12)
    ap.add_argument("--asha-epochs", type=int, default=4, help="asha: target epochs = max_t")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp())
    base = ["data.target.num=600", f"epochs.target={args.epochs}", f"data.root={tmp}/data",
            "run.progress=none"]
    cfg = config.load("smoke", base)
    stages.ensure_dataset(cfg.data.target, cfg)  # rendered once, outside every timing

    target = cfg.data.target
    print(f"target-stage trials: resnet10, {target.size} px, {target.num} {target.domain} samples "
          f"(train/val/test {cfg.data.split}), {args.epochs} epochs unless said; "
          f"{os.cpu_count()} cores")
    for part in parts:
        if part == "overhead":
            lines = overhead(tmp, base, args.trials)
        elif part == "asha":
            lines = asha(tmp, base, args.asha_trials, args.asha_epochs)
        else:
            lines = concurrent(tmp, base)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
