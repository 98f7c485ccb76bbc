"""Ray overhead: a stage in-process vs as a Ray task vs under Ray Train with 1 and 2 workers.

Also a stage as a Ray task that trains in-process (``cluster.tasks.submit``, the path of the
ablation runner's stages without ``--workers``). Prints the wall time of each (the difference is Ray's fixed start-up cost: workers, placement
group, process group) and the steady-state training throughput from the epochs' own timings
(bar: 1 worker >= 0.90 of in-process once started), plus 2 workers vs 1 on this machine.

    python bench/bench_ray.py [--num 2000] [--size 64] [--epochs 3]
"""

import argparse
import os
import statistics
import tempfile
import time

from cmkg import config, stages


def steady(art) -> float:
    """Training samples per second over the epochs after the first."""
    hist = art.metrics["history"]
    n = art.meta["spec"]["optim"]["batch_size"]
    from cmkg.data import HandDataset

    train = len(HandDataset(stages.ensure_dataset(CFG.data.source, CFG), "train", ("depth",)))
    steps = train // n
    times = [h["train_time_s"] for h in hist[1:]] or [hist[0]["train_time_s"]]
    return steps * n / statistics.median(times)


def main():
    global CFG
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp()
    base = [f"data.source.num={args.num}", f"data.source.size={args.size}",
            f"epochs.teacher={args.epochs}", f"data.root={tmp}/data", "run.progress=none"]
    CFG = config.load("smoke", base + [f"run.store={tmp}/warm"])
    stages.ensure_dataset(CFG.data.source, CFG)

    from cmkg.cluster.connect import init_ray
    from cmkg.cluster.train import run_stage_ray

    rows = {}
    t = time.perf_counter()
    art = stages.run_stage("teacher", config.load("smoke", base + [f"run.store={tmp}/inproc"]))
    rows["in-process"] = (time.perf_counter() - t, steady(art))
    t = time.perf_counter()
    init_ray(None)
    ray_init = time.perf_counter() - t
    import ray

    from cmkg.cluster import tasks

    cfg = config.load("smoke", base + [f"run.store={tmp}/task"])
    t = time.perf_counter()  # what the ablation runner pays for a stage without --workers
    nodes = stages.plan("teacher", cfg)
    art = stages.open_artifact(ray.get(tasks.submit(nodes, cpus_per_worker=os.cpu_count())))
    rows["Ray task, in-process"] = (time.perf_counter() - t, steady(art))
    for workers in (1, 2):
        cfg = config.load("smoke", base + [f"run.store={tmp}/ray{workers}"])
        t = time.perf_counter()
        art = run_stage_ray("teacher", cfg, workers=workers, max_failures=0)
        rows[f"Ray Train, {workers} worker(s)"] = (time.perf_counter() - t, steady(art))
    inproc_wall, inproc_rate = rows["in-process"]
    print(f"teacher stage (resnet10 on depth, {args.size}px, {args.num} samples, {args.epochs} "
          f"epochs), {os.cpu_count()} cores; ray.init took {ray_init:.1f}s")
    print(f"  {'path':24s} {'wall s':>7s} {'start-up s':>10s} {'samples/s':>10s} {'ratio':>6s}")
    for name, (wall, rate) in rows.items():
        print(f"  {name:24s} {wall:7.1f} {wall - inproc_wall:10.1f} {rate:10.1f} "
              f"{rate / inproc_rate:6.2f}")
    r1, r2 = rows["Ray Train, 1 worker(s)"][1], rows["Ray Train, 2 worker(s)"][1]
    print(f"  2 workers / 1 worker throughput: {r2 / r1:.2f}")


if __name__ == "__main__":
    main()
