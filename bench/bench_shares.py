"""How much of the distillation gradient each term carries, at 64 px and 256 px (issue 10).

For G = L_REG + L_ACT + lambda * L_ATT (Eqs. 1-3, lambda = 1e3, attention on layers 1-4), the
share of each term is ||grad term|| / ||grad G|| on the student's backbone (``cmkg.diagnostics``,
what the kd and meta stages log every epoch), measured on one batch of rendered paired
rhd-like samples at the networks' initialisation, for the default reductions (L_REG summed over
the 63 coordinates, L_ACT and L_ATT averaged over elements) and for Eqs. 2-3 read literally
(L_ACT and L_ATT summed). One process, sizes in turn; shares are ratios, so machine noise does
not enter.

    python bench/bench_shares.py [--archs resnet10 resnet18] [--sizes 64 256] [--batch 16]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from cmkg import diagnostics, models
from cmkg.data import HandDataset, synthesize
from cmkg.train import distillation_objective

REDUCTIONS = {"default (reg sum, act/att mean)": {},
              "Eqs. 2-3 literal (act/att sum)": {"act": "sum", "att": "sum"}}


def shares(arch: str, size: int, batch_size: int, reduction: dict, root: Path) -> dict:
    torch.manual_seed(0)
    folder = root / f"rhd-{size}"
    if not folder.exists():
        synthesize(folder, "rhd-like", batch_size * 2, size, seed=0, progress=False)
    ds = HandDataset(folder, "train", ("rgb", "depth"))
    batch = diagnostics.fixed_batch(ds, batch_size, torch.device("cpu"))
    student = models.build(arch, "rgb")
    teacher = models.build(arch, "depth").eval()  # the presets pair equal backbones
    teacher.requires_grad_(False)
    net = models.StudentWithAdapter(student, models.activation_adapter(student, teacher))
    loss_fn = distillation_objective(net, teacher, losses=["act", "att"], lambda_att=1e3,
                                     att_layers=[1, 2, 3, 4], reduction=reduction)
    return diagnostics.distill_diagnose(loss_fn, batch, student, 1e3)(1)["grad_share"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet10", "resnet18"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| student (teacher) | px | reductions | L_REG | L_ACT | λ·L_ATT |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for size in args.sizes:
                for name, red in REDUCTIONS.items():
                    s = shares(arch, size, args.batch, red, Path(tmp))
                    print(f"| {arch} ({arch}) | {size} | {name} | {s['reg']:.3g} | "
                          f"{s['act']:.3g} | {s['att']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
