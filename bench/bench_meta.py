"""Cost of one Algorithm 1 iteration against one plain L_REG training step of the same student
and batch (bar: l = 1 costs <= 3.5x), for l = 1, 2, 3 and the first-order mode, with the peak
memory of each (the peak resident set of a child process over two iterations of that mode
after one plain step, Linux VmHWM reset through /proc/self/clear_refs; GPU: max allocated).

Times come from one process, modes alternating round by round so they share the machine's
noise; the ratio is of medians. The meta iteration includes its teacher forward (the plain step
has no teacher), both optimizer steps and the phi clip.

    python bench/bench_meta.py [--arch resnet10] [--size 64] [--iters 4] [--rounds 3]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from cmkg import models, regularizers
from cmkg.losses import regression_loss
from cmkg.meta import meta_iteration

MODES = {"plain": None, "l=1": (1, False), "l=2": (2, False), "l=3": (3, False),
         "l=2 first-order": (2, True), "l=3 first-order": (3, True)}
LOSS_KW = {"losses": ["act", "att"], "lambda_att": 1e3, "att_layers": [1, 2, 3, 4]}


def setup(arch, size, device):
    torch.manual_seed(0)
    student = models.build(arch, "rgb").to(device)
    teacher = models.build(arch, "depth").to(device).eval().requires_grad_(False)
    reg = regularizers.build("weighted_l2", student).to(device)
    batch = {"rgb": torch.randn(32, 3, size, size, device=device),
             "depth": torch.randn(32, 1, size, size, device=device),
             "target": torch.randn(32, 21, 3, device=device)}
    theta_opt = torch.optim.Adam(student.parameters(), lr=2.5e-4)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=1e-3)

    def step(mode):
        if MODES[mode] is None:
            pred, _ = student(batch["rgb"])
            loss = regression_loss(pred, batch["target"])
            theta_opt.zero_grad(set_to_none=True)
            loss.backward()
            theta_opt.step()
        else:
            steps, first_order = MODES[mode]
            meta_iteration(student, torch.nn.Identity(), teacher, reg, batch, theta_opt, phi_opt,
                           alpha=2.5e-4, steps=steps, first_order=first_order,
                           phi_clip=(-1e3, 1e3), **LOSS_KW)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def child(args):
    """Run one mode a few times and report the peak resident set."""
    dev = torch.device(args.device)
    step = setup(args.arch, args.size, dev)
    step("plain")  # settle the allocator, then reset the peak-RSS counter (Linux: VmHWM)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for _ in range(2):
        step(args.child)
    peak = _vm_hwm_mib()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"peak_mib": peak}))


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet10")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.child:
        return child(args)
    dev = torch.device(args.device)
    step = setup(args.arch, args.size, dev)
    for mode in MODES:
        step(mode)  # warm-up
    times = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            t = time.perf_counter()
            for _ in range(args.iters):
                step(mode)
            times[mode].append((time.perf_counter() - t) / args.iters)
    peak = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--arch", args.arch,
                              "--size", str(args.size), "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        peak[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    base = statistics.median(times["plain"])
    mem = "GPU allocated" if dev.type == "cuda" else "resident set"
    print(f"Algorithm 1 vs a plain L_REG step: {args.arch}, {args.size}px, batch 32, {dev}, "
          f"{os.cpu_count()} threads, medians of {args.rounds} rounds x {args.iters}")
    print(f"  {'mode':16s} {'s/iter':>8s} {'ratio':>7s} {'peak ' + mem:>22s} {'extra':>9s}")
    for mode in MODES:
        t = statistics.median(times[mode])
        print(f"  {mode:16s} {t:8.3f} {t / base:6.2f}x {peak[mode]:18.0f} MiB "
              f"{peak[mode] - peak['plain']:+6.0f} MiB")


if __name__ == "__main__":
    main()
