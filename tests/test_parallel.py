"""Data-parallel equivalence: one step with 2 gloo workers on half batches equals one
single-process step on the concatenated batch (float64; tolerance 1e-10 relative), for a plain
DDP stage and for Algorithm 1 with hand-averaged gradients (l = 1 and l = 2, exact)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cmkg import regularizers
from cmkg.losses import regression_loss
from cmkg.meta import meta_iteration
from cmkg.parallel import broadcast_module, mean_across

LOSS_KW = {"losses": ["act", "att"], "lambda_att": 10.0, "att_layers": [1, 2]}
TOL = {"rtol": 1e-10, "atol": 1e-12}


class NoBN(nn.Module):
    """BatchNorm-free toy regressor (batch statistics are per worker under DDP by design)."""

    def __init__(self, in_ch):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 63)

    def forward(self, x):
        a1 = torch.relu(self.c1(x))
        a2 = torch.relu(self.c2(a1))
        return self.head(a2.flatten(1)).view(-1, 21, 3), [a1, a2]


def _setup(rank=0):
    torch.manual_seed(0)
    student, teacher = NoBN(3).double(), NoBN(1).double().eval()
    reg = regularizers.build("weighted_l2", student).double()
    with torch.no_grad():
        for r in reg.raw:
            r.uniform_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64),
             "depth": torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64),
             "target": torch.randn(8, 21, 3, generator=g, dtype=torch.float64)}
    if rank != 0:  # other ranks start from other weights: broadcast must fix that
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
    return student, teacher, reg, batch


def _step(mode, student, teacher, reg, batch, reduce):
    if mode == "plain":
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        loss = regression_loss(student(batch["rgb"])[0], batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {}
    theta_opt = torch.optim.SGD(student.parameters(), lr=0.1)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=1.0)
    meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt, alpha=0.05,
                   steps=int(mode[-1]), first_order=False, reduce=reduce, **LOSS_KW)
    return {"phi_grad": [r.grad.clone() for r in reg.raw], "phi": [r.detach().clone() for r in reg.raw]}


def _worker(rank, world, port, out, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        student, teacher, reg, batch = _setup(rank)
        broadcast_module(student)
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}
        model = nn.parallel.DistributedDataParallel(student) if mode == "plain" else student
        extra = _step(mode, model, teacher, reg, half, mean_across)
        if rank == 0:
            torch.save({"params": {k: v.clone() for k, v in student.state_dict().items()},
                        **extra}, out)
        dist.barrier()  # leave together: a rank exiting while gloo still talks to it aborts
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["plain", "meta-l1", "meta-l2"])
def test_two_workers_equal_one_process_on_the_whole_batch(mode, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), mode), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    student, teacher, reg, batch = _setup()
    ref = _step(mode, student, teacher, reg, batch, lambda t, d=False: t)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, **TOL, msg=k)
    for key in ("phi_grad", "phi"):
        for a, b in zip(got.get(key, []), ref.get(key, [])):
            torch.testing.assert_close(a, b, **TOL)
    if mode != "plain":
        assert any(float(g.abs().max()) > 0 for g in ref["phi_grad"])
