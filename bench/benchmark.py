"""The embedded benchmark's properties at a preset, measured by training its reference cells.

What a table can see depends on the data before any method: this script trains the cells that
describe the benchmark and prints, in one run:

- source: test EPE of the depth teacher, the RGB student and the distilled student (kd) over
  the mean-pose EPE (1 = learns nothing);
- target: the regularizer-free student's test EPE over the mean pose, and its train EPE (the
  generalization gap a regularizer could close);
- noise floor: the paired SD over seeds of null - none on target test EPE, where null is a
  constant l2 at sigma 1e-6 (a regularizer that changes nothing), and its 95 % half-width;
- agreement: Spearman's rank correlation between mean validation EPE and mean test EPE over
  Table 2's l2 sigma grid, on the agreement seeds.

Stages are cached in the store (a rerun prints at once; an interrupted run resumes). Every
process trains with ``--threads`` threads, ``--jobs`` at once.

    python bench/benchmark.py [--config cpu] [--seeds 5] [--grid-seeds 3] [--source-seeds 1]
        [--jobs 2] [--threads 1] [--store runs/benchmark] [--set KEY=VALUE ...]
"""

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SIGMAS = (1.0e-5, 1.0e-3, 1.0e-2, 1.0e-1, 0.3, 1.0)  # Table 2's choose grid for l2
NULL_SIGMA = 1.0e-6


def _train(job):
    """Train (or find) one stage; return its metrics and seconds."""
    stage, preset, sets, threads = job
    import torch

    torch.set_num_threads(threads)
    from cmkg import config, stages

    t = time.perf_counter()
    cfg = config.load(preset, sets + [f"run.threads={threads}", "run.progress=none"])
    art = stages.run_stage(stage, cfg)
    m = art.metrics
    hist = m.get("history") or [{}]
    last = hist[-1]
    return {"test": m["test"]["epe_mm"], "val": m.get("best_val_epe_mm"),
            "mean_pose": m.get("mean_pose_test", {}).get("epe_mm"),
            "train": (last.get("train_eval") or {}).get("epe_mm"),
            "seconds": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the noise floor")
    ap.add_argument("--grid-seeds", type=int, default=3, help="seeds of the val/test agreement")
    ap.add_argument("--source-seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--store", default="runs/benchmark")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--parts", default="source,target")
    args = ap.parse_args()
    base = [f"run.store={args.store}"] + args.set
    jobs = {}
    parts = args.parts.split(",")
    if "source" in parts:
        for s in range(args.source_seeds):
            for stage in ("teacher", "student", "kd"):
                jobs[("source", stage, s)] = (stage, args.config, base + [f"run.seed={s}"],
                                              args.threads)
    if "target" in parts:
        for s in range(max(args.seeds, args.grid_seeds)):
            seed = [f"run.seed={s}"]
            if s < args.seeds:
                jobs[("none", None, s)] = ("target", args.config,
                                           base + seed + ["regularizer.form=none"], args.threads)
                jobs[("null", NULL_SIGMA, s)] = ("target", args.config, base + seed + [
                    "regularizer.form=l2", f"regularizer.sigma={NULL_SIGMA}"], args.threads)
            if s < args.grid_seeds:
                for sigma in SIGMAS:
                    jobs[("l2", sigma, s)] = ("target", args.config, base + seed + [
                        "regularizer.form=l2", f"regularizer.sigma={sigma}"], args.threads)
    # upstream stages first (kd needs the teacher and student): source jobs before the others
    order = sorted(jobs, key=lambda k: (k[0] != "source", k[1] == "kd", str(k)))
    out = {}
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        kd = [k for k in order if k[1] == "kd"]
        first = [k for k in order if k not in kd]
        for batch in (first, kd):
            futures = {k: pool.submit(_train, jobs[k]) for k in batch}
            for k, f in futures.items():
                out[k] = f.result()
                print(f"{k[0]:6s} {str(k[1]):8s} seed {k[2]}: test {out[k]['test']:.2f} mm "
                      f"(val {out[k]['val']:.2f}, mean pose {out[k]['mean_pose']:.2f}) "
                      f"{out[k]['seconds']:.0f}s", flush=True)
    print(f"\n{args.config} preset {' '.join(args.set)}; {os.cpu_count()} cores, "
          f"{time.perf_counter() - start:.0f}s")
    if "source" in parts:
        src = [out[k] for k in out if k[0] == "source"]
        mp_src = statistics.mean(r["mean_pose"] for r in src)
        for stage in ("teacher", "student", "kd"):
            e = statistics.mean(out[k]["test"] for k in out if k[0] == "source" and k[1] == stage)
            print(f"  source {stage:8s} {e:6.2f} mm = {e / mp_src:.2f} x mean pose ({mp_src:.2f})")
        t = statistics.mean(out[k]["test"] for k in out if k[1] == "teacher")
        s_ = statistics.mean(out[k]["test"] for k in out if k[1] == "student")
        print(f"  source teacher / RGB student {t / s_:.2f}")
    if "target" in parts:
        none = [out[("none", None, s)] for s in range(args.seeds)]
        mp_t = statistics.mean(r["mean_pose"] for r in none)
        e = statistics.mean(r["test"] for r in none)
        tr = [r["train"] for r in none if r["train"] is not None]
        print(f"  target none   {e:6.2f} mm = {e / mp_t:.2f} x mean pose ({mp_t:.2f}); "
              f"train {statistics.mean(tr) if tr else math.nan:.2f}, "
              f"val {statistics.mean(r['val'] for r in none):.2f}")
        from cmkg.report import benchmark, stats  # the report's own arithmetic

        c = stats.paired_interval([out[("null", NULL_SIGMA, s)]["test"] for s in range(args.seeds)],
                                  [r["test"] for r in none])
        print(f"  noise floor   l2 sigma {NULL_SIGMA:g} - none: mean {c['mean']:+.2f}, "
              f"paired SD {c['sd']:.2f} mm over {args.seeds} seeds (95 % half-width "
              f"{(c['hi'] - c['lo']) / 2:.2f})")
        val = [statistics.mean(out[("l2", x, s)]["val"] for s in range(args.grid_seeds))
               for x in SIGMAS]
        test = [statistics.mean(out[("l2", x, s)]["test"] for s in range(args.grid_seeds))
                for x in SIGMAS]
        rho = benchmark.spearman(val, test)
        print("  l2 grid       " + "  ".join(f"{x:g}: val {v:.2f} test {te:.2f}"
                                             for x, v, te in zip(SIGMAS, val, test)))
        print(f"  agreement     Spearman(val, test) over the l2 grid {rho:.2f} "
              f"({args.grid_seeds} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
