"""fit() against a bare PyTorch loop: the same model, batch and optimiser, one run, side by side.

bare  : for _ in range(n): loss = L_REG(model(x), y); zero_grad; backward; step
fit   : cmkg.train.fit over a loader that yields that same batch n times (loop overhead only)
fit+data : fit over the real HandDataset loader (adds batch assembly from the shard arrays)

Rounds alternate bare/fit to share the machine's noise; the ratio is of median step rates
(bar: fit/bare >= 0.95).

    python bench/bench_fit.py [--arch resnet10] [--size 64] [--steps 30] [--rounds 5]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from cmkg import models
from cmkg.data import HandDataset, identity_collate, prepare_batch, synthesize
from cmkg.losses import regression_loss
from cmkg.train import fit, regression_objective


class Repeat:
    """A loader yielding the same batch n times."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet10")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(f"{tmp}/ds", "rhd-like", 32 * args.steps + 200, args.size, progress=False)
        ds = HandDataset(f"{tmp}/ds", "train", ("rgb",))
    batch = prepare_batch(ds.__getitems__(list(range(32))), dev)  # on the device, normalised
    real = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True,
                                       collate_fn=identity_collate, pin_memory=dev.type == "cuda")
    torch.manual_seed(0)
    model = models.build(args.arch, "rgb").to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
    loss_fn = regression_objective(model, "rgb")

    def bare():
        model.train()
        x, y = batch["rgb"], batch["target"]
        for _ in range(args.steps):
            pred, _ = model(x)
            loss = regression_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def via_fit():
        fit(model, loss_fn, Repeat(batch, args.steps), opt, 1, device=dev, progress="none")

    def via_fit_data():
        fit(model, loss_fn, real, opt, 1, device=dev, progress="none")

    n_real = len(real)
    bare(), via_fit()  # warm-up
    times = {"bare": [], "fit": [], "fit+data": []}
    for _ in range(args.rounds):
        for name, fn, n in (("bare", bare, args.steps), ("fit", via_fit, args.steps),
                            ("fit+data", via_fit_data, n_real)):
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(n / (time.perf_counter() - t))
    rate = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.arch} at {args.size}px, batch 32, {dev}, {os.cpu_count()} threads, "
          f"{args.rounds} alternating rounds")
    for k, v in rate.items():
        print(f"  {k:9s} {v:7.2f} steps/s  (ratio to bare {v / rate['bare']:.3f})")


if __name__ == "__main__":
    main()
