"""Renderer throughput: paired samples per second at 64 px (bar: >= 500/s on 2 cores), next to
what training consumes (samples per second of a resnet10 fit step at the same size), so the
ratio says how far generation outruns training.

    python bench/bench_render.py [--size 64] [--num 1024]
"""

import argparse
import os
import time

import torch

from cmkg import models, synth
from cmkg.data import HandDataset, identity_collate, synthesize
from cmkg.train import fit, regression_objective


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--num", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    synth.render_range("rhd-like", 0, args.size, 0, synth.BLOCK)  # warm-up
    rates = {}
    for name in ("rhd-like", "stb-like", "augment"):
        t = time.perf_counter()
        synth.render_range(name, 1, args.size, 0, args.num)
        rates[name] = args.num / (time.perf_counter() - t)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synthesize(f"{tmp}/ds", "rhd-like", args.num, args.size, seed=2, progress=False)
        stored = args.num / (time.perf_counter() - t)
        ds = HandDataset(f"{tmp}/ds", "train", ("rgb",))
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True,
                                             collate_fn=identity_collate)
        model = models.build("resnet10", "rgb")
        opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
        fit(model, regression_objective(model, "rgb"), loader, opt, 1, device=torch.device("cpu"),
            progress="none")  # warm-up epoch
        t = time.perf_counter()
        fit(model, regression_objective(model, "rgb"), loader, opt, 1, device=torch.device("cpu"),
            progress="none")
        train_rate = len(loader) * 32 / (time.perf_counter() - t)
    print(f"renderer at {args.size}px, {os.cpu_count()} cores, {args.num} samples per domain")
    for name, r in rates.items():
        print(f"  render {name:9s} {r:8.0f} paired samples/s")
    print(f"  render + write shards  {stored:8.0f} samples/s (rhd-like, Parquet zstd)")
    print(f"  training consumes      {train_rate:8.0f} samples/s (resnet10 student, batch 32)")
    print(f"  ratio render/train     {rates['rhd-like'] / train_rate:8.1f}x")


if __name__ == "__main__":
    main()
