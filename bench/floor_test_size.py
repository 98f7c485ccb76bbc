"""How much of the target's noise floor is the size of its test split?

The noise floor of a table is the paired SD over seeds between ``none`` and a regularizer that
changes nothing (a constant l2 at sigma 1e-6). This script takes those target stages (seeds
0..N-1, trained by ``bench/benchmark.py`` into the same store) and evaluates their published
weights, without training anything, on

- the preset's test split (it must reproduce each stage's recorded test EPE), and
- ``--extra`` more blocks of unseen sequences of the same subject: the preset's target rendered
  with more blocks (same seed and frames per sequence, so the preset's sequences are the same
  frames and the new ones are new motions of the same hand).

It prints per seed the two rows' EPE on each split and, per split, the paired SD of null - none
and the 95 % half-width at N seeds: if the larger split lowers the SD, part of the floor is the
test split's size; what stays is the networks' own seed-to-seed variation.

Measured with the cpu preset when its test split was B1 alone (two sequences, 100 frames):
paired SD 0.64 mm on B1, 0.37 mm on 20 unseen sequences (1,000 frames) of the same networks.
The preset now tests on B1 and B31-B40 (docs/benchmark.md).

    python bench/floor_test_size.py [--config cpu] [--store runs/benchmark] [--seeds 5]
        [--extra 10] [--threads 1]
"""

import argparse
import statistics
import sys
from dataclasses import replace


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--store", default="runs/benchmark")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--extra", type=int, default=10, help="extra blocks (2 sequences each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cmkg import config, stages
    from cmkg.data.dataset import HandDataset
    from cmkg.report.stats import paired_interval
    from cmkg.stages.build import _loader, ensure_dataset
    from cmkg.train import evaluate

    base = config.load(args.config, [f"run.store={args.store}", "run.progress=none"])
    knobs = base.data.knobs.get(base.data.target.domain)
    if knobs is None or not knobs.blocks:
        sys.exit(f"{args.config}: data.knobs.{base.data.target.domain}.blocks is not set: this "
                 "script needs a sequence target with a set number of blocks")
    blocks = knobs.blocks + args.extra
    per_seq = base.data.target.num // (2 * knobs.blocks)
    new = [f"B{b}{kind}" for b in range(knobs.blocks + 1, blocks + 1)
           for kind in ("Counting", "Random")]
    wide = replace(base, data=replace(
        base.data, target=replace(base.data.target, num=per_seq * 2 * blocks),
        knobs={**base.data.knobs, base.data.target.domain: replace(knobs, blocks=blocks,
                                                                    val=new)}))
    root = ensure_dataset(wide.data.target, wide)  # its "val" split: the new blocks
    sets = {"test": HandDataset(root, "test", ("rgb",)),
            f"B{knobs.blocks + 1}-B{blocks}": HandDataset(root, "val", ("rgb",))}
    print("splits: " + ", ".join(f"{k} {len(v)} frames" for k, v in sets.items()))

    rows = {"none": ["regularizer.form=none"],
            "null": ["regularizer.form=l2", "regularizer.sigma=1e-6"]}
    epe = {(r, s): {} for r in rows for s in sets}
    for seed in range(args.seeds):
        line = [f"seed {seed}"]
        for r, sets_r in rows.items():
            cfg = config.load(args.config, sets_r + [f"run.seed={seed}",
                                                     f"run.store={args.store}"])
            art = stages.run_stage("target", cfg)  # cached: finds it (trains it if missing)
            net = art.load_model("cpu").eval()
            for s, ds in sets.items():
                m = evaluate(net, _loader(ds, 64, False, cfg, torch.device("cpu"), None),
                             "rgb", torch.device("cpu"))
                epe[(r, s)][seed] = m["epe_mm"]
                line.append(f"{r} {s.split()[0]} {m['epe_mm']:.2f}")
            line.append(f"(recorded test {art.metrics['test']['epe_mm']:.2f})")
        print("  ".join(line), flush=True)
    seeds = list(range(args.seeds))
    print(f"\n{'split':24s} {'mean none':>10s} {'mean null-none':>15s} {'paired SD':>10s} "
          f"{'95% half-width':>15s}")
    for s in sets:
        a = [epe[("null", s)][i] for i in seeds]
        b = [epe[("none", s)][i] for i in seeds]
        iv = paired_interval(a, b)
        half = (iv["hi"] - iv["lo"]) / 2 if iv["lo"] is not None else float("nan")
        print(f"{s:24s} {statistics.fmean(b):10.2f} {iv['mean']:+15.2f} {iv['sd']:10.2f} "
              f"{half:15.2f}")


if __name__ == "__main__":
    main()
