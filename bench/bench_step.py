"""A training step against this machine's limit: the resnet10 student's forward + backward +
Adam step, in images/s and achieved GFLOP/s, beside a large fp32 matmul's GFLOP/s, for the
variants that might make it faster; and how much of a real stage's epoch is spent outside the
step (loading, batch assembly, evaluation).

The step is the one ``fit()`` takes for the student and target stages: ``PoseNet`` (torchvision
``ResNet(BasicBlock, [1, 1, 1, 1])``, RGB in, 63 values out), L_REG, ``zero_grad``,
``backward``, ``Adam.step``, on a fixed random batch (so no loader in the way). FLOPs are
counted on one step with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls,
forward and backward; Adam's elementwise work is not counted).

Variants, each against ``default`` (48 px, batch 32, 1 thread, fp32, contiguous tensors, eager):
channels_last (model and input), Adam ``fused=True``, 64 px, batch 64 / 128, 2 threads in one process, two
processes of 1 thread each at once (images/s summed), bf16 autocast, oneDNN (mkldnn) off, and
``torch.compile`` (its compile time, with an empty Inductor cache, reported apart). The matmul
rows are 1024x1024 and 2048x2048 fp32 at 1 and 2 threads. All variants are measured in
interleaved rounds (every variant once per round) and the table shows the median, so the
machine's noise falls on all of them alike.

The profile (``--profile``, on by default) trains one epoch of the ``cpu`` preset's target stage
through the real stage runner (``cmkg.stages.run_stage``, regularizer none, 1 thread) with
timers around the loader, the batch preparation and the evaluations, and reports the share
of the epoch outside forward + backward + step.

    python bench/bench_step.py [--rounds 5] [--seconds 1.5] [--no-compile] [--no-profile]
"""

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

# an empty Inductor cache: the compile time a fresh machine pays (set before torch is imported)
_CACHE = tempfile.mkdtemp(prefix="bench_step_inductor_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _CACHE)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cmkg import models  # noqa: E402
from cmkg.losses import regression_loss  # noqa: E402

ARCH = "resnet10"


class Step:
    """One variant's model, optimizer and fixed batch; ``run(n)`` takes n training steps."""

    def __init__(self, size=48, batch=32, threads=1, channels_last=False, bf16=False,
                 mkldnn=True, compiled=False, fused=False):
        self.threads, self.batch, self.bf16, self.mkldnn = threads, batch, bf16, mkldnn
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = models.build(ARCH, "rgb").to(memory_format=fmt).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=fused or None)
        self.x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        self.y = torch.randn(batch, 21, 3)
        self.net = torch.compile(self.model) if compiled else self.model
        started = time.perf_counter()
        self.run(2)  # warm-up (and, compiled, the compilation)
        self.warmup_s = time.perf_counter() - started

    def run(self, n):
        torch.set_num_threads(self.threads)
        torch.backends.mkldnn.enabled = self.mkldnn
        try:
            for _ in range(n):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    pred, _ = self.net(self.x)
                loss = regression_loss(pred.float(), self.y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        finally:
            torch.backends.mkldnn.enabled = True

    def rate(self, seconds):
        """Images/s over at least ``seconds`` and 2 steps."""
        steps, started = 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - started < seconds:
            self.run(1)
            steps += 1
        return steps * self.batch / (time.perf_counter() - started)


def step_flops(size, batch):
    """FLOPs of one forward + backward (FlopCounterMode: convolutions and matmuls)."""
    torch.manual_seed(0)
    model = models.build(ARCH, "rgb").train()
    x, y = torch.randn(batch, 3, size, size), torch.randn(batch, 21, 3)
    with FlopCounterMode(display=False) as counter:
        pred, _ = model(x)
        regression_loss(pred, y).backward()
    return counter.get_total_flops()


class Matmul:
    def __init__(self, n, threads):
        self.n, self.threads = n, threads
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.rate(0.05)

    def rate(self, seconds):
        """GFLOP/s of a @ b (2 n^3 FLOPs each)."""
        torch.set_num_threads(self.threads)
        reps, started = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - started < seconds:
            torch.mm(self.a, self.b)
            reps += 1
        return reps * 2 * self.n ** 3 / (time.perf_counter() - started) / 1e9


def _worker(conn):
    """A 1-thread process holding the default variant: on each ``seconds`` received, train
    for that long and send back (steps x batch, elapsed)."""
    torch.set_num_threads(1)
    step = Step()
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(step.rate(seconds))
    conn.close()


class TwoProcesses:
    """Two 1-thread processes training the default variant at the same time; images/s summed."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for c in self.conns:
            assert c.recv() == "ready"

    def rate(self, seconds):
        for c in self.conns:
            c.send(seconds)
        return sum(c.recv() for c in self.conns)

    def close(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=30)


def profile_epoch():
    """One epoch of the cpu preset's target stage through the real runner, timed by parts."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    import cmkg.stages.run as stage_run
    import cmkg.train as train_mod
    from cmkg import config, stages

    timers = {"load": 0.0, "prepare": 0.0, "evaluate": 0.0, "batches": 0}
    inside = {"eval": False}
    next_orig, prep_orig, eval_orig = (_BaseDataLoaderIter.__next__, train_mod.prepare_batch,
                                       stage_run.evaluate)

    def timed_next(self):
        started = time.perf_counter()
        try:
            batch = next_orig(self)
            timers["batches"] += not inside["eval"]
            return batch
        finally:
            if not inside["eval"]:
                timers["load"] += time.perf_counter() - started

    def timed_prepare(*a, **k):
        started = time.perf_counter()
        try:
            return prep_orig(*a, **k)
        finally:
            if not inside["eval"]:
                timers["prepare"] += time.perf_counter() - started

    def timed_evaluate(*a, **k):
        started, inside["eval"] = time.perf_counter(), True
        try:
            return eval_orig(*a, **k)
        finally:
            inside["eval"] = False
            timers["evaluate"] += time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load("cpu", ["epochs.target=1", "regularizer.form=none", "run.threads=1",
                                  f"data.root={tmp}/data", f"run.store={tmp}/runs",
                                  "run.progress=none"])
        stages.ensure_dataset(cfg.data.target, cfg)  # rendering is not part of the epoch
        _BaseDataLoaderIter.__next__ = timed_next
        train_mod.prepare_batch, stage_run.evaluate = timed_prepare, timed_evaluate
        try:
            started = time.perf_counter()
            art = stages.run_stage("target", cfg)
            total = time.perf_counter() - started
        finally:
            _BaseDataLoaderIter.__next__ = next_orig
            train_mod.prepare_batch, stage_run.evaluate = prep_orig, eval_orig
        (rec,) = art.metrics["history"]
    return {"stage_s": total, "train_s": rec["train_time_s"], "batch": cfg.optim.batch_size,
            **timers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5, help="per variant and round")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    variants = {
        "default": dict(),
        "channels_last": dict(channels_last=True),
        "bf16 autocast": dict(bf16=True),
        "mkldnn off": dict(mkldnn=False),
        "Adam fused": dict(fused=True),
        "batch 64": dict(batch=64),
        "batch 128": dict(batch=128),
        "2 threads": dict(threads=2),
        "64 px": dict(size=64),
        "64 px channels_last": dict(size=64, channels_last=True),
        "64 px 2 threads": dict(size=64, threads=2),
    }
    runners = {name: Step(**kw) for name, kw in variants.items()}
    compile_s = None
    if not args.no_compile:
        try:
            runners["torch.compile"] = Step(compiled=True)
            variants["torch.compile"] = {}
            compile_s = runners["torch.compile"].warmup_s
        except Exception as e:  # noqa: BLE001 - reported, the rest of the bench goes on
            print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    pair = TwoProcesses()
    runners["2 processes x 1 thread"] = pair
    variants["2 processes x 1 thread"] = dict(threads=2)
    mm = {f"matmul {n}² fp32, {t} thread{'s' * (t > 1)}": Matmul(n, t)
          for n in (1024, 2048) for t in (1, 2)}

    rates: dict[str, list[float]] = {name: [] for name in [*runners, *mm]}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for name, r in runners.items():
            rates[name].append(r.rate(args.seconds))
        for name, m in mm.items():
            rates[name].append(m.rate(args.seconds / 2))
    pair.close()
    med = {k: statistics.median(v) for k, v in rates.items()}

    flops = {}  # per image, by size (FLOPs per image do not depend on the batch)
    for size in (48, 64):
        flops[size] = step_flops(size, 32) / 32
    best_mm = {t: max(med[f"matmul {n}² fp32, {t} thread{'s' * (t > 1)}"] for n in (1024, 2048))
               for t in (1, 2)}

    print(f"\nresnet10 training step (forward + backward + Adam), median of {args.rounds} "
          f"interleaved rounds of {args.seconds:g} s; FLOPs/image: 48 px "
          f"{flops[48] / 1e6:.0f} M, 64 px {flops[64] / 1e6:.0f} M (FlopCounterMode)\n")
    print("| variant | px | batch | threads | images/s | vs default | GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for name in runners:
        kw = variants[name]
        size, threads = kw.get("size", 48), kw.get("threads", 1)
        base = med["64 px"] if size == 64 else med["default"]
        gflops = med[name] * flops[size] / 1e9
        print(f"| {name} | {size} | {kw.get('batch', 32)} | {threads} | {med[name]:.1f} | "
              f"{med[name] / base:.2f} | {gflops:.1f} | {gflops / best_mm[threads]:.0%} |")
    for name in mm:
        print(f"| {name} | | | | | | {med[name]:.1f} | |")
    if compile_s is not None:
        print(f"\ntorch.compile: compile (first 2 steps, empty Inductor cache) {compile_s:.1f} s")
    print("'of matmul': achieved GFLOP/s over the best fp32 matmul at the same thread count; "
          "'vs default': images/s over default at the same image size.")
    spread = {k: max(v) / min(v) for k, v in rates.items()}
    print(f"spread (max/min over rounds): default {spread['default']:.2f}, the largest "
          f"{max(spread.values()):.2f} ({max(spread, key=spread.get)})")

    if not args.no_profile:
        p = profile_epoch()
        outside = p["load"] + p["prepare"]
        in_fit = p["batches"] * p["batch"] / (p["train_s"] - outside)
        print(f"\ncpu-preset target stage, one epoch, 1 thread: stage {p['stage_s']:.1f} s, of "
              f"which the training epoch {p['train_s']:.1f} s ({p['batches']} batches of "
              f"{p['batch']}): loader {p['load']:.2f} s, batch preparation {p['prepare']:.2f} s "
              f"= {outside / p['train_s']:.1%} of the epoch outside forward + backward + step; "
              f"the steps inside fit {in_fit:.1f} images/s ({in_fit / med['default']:.2f} of the "
              f"bare default step); evaluations (val, train slice, test) {p['evaluate']:.1f} s")
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s; load average (1 min) "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
