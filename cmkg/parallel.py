"""Data-parallel helpers on ``torch.distributed`` (no Ray): averaging across workers.

The meta stage cannot use DDP (its reducer neither syncs gradients of gradients nor lets
autograd see its all-reduce), so Algorithm 1 averages by hand with ``mean_across``: the inner
steps' grad L_REG (differentiably where the meta-gradient must flow through it), the phi
meta-gradient and the theta gradients. With equal per-worker batches and losses that are batch
means, this reproduces the single-process step on the concatenated batch exactly, apart from
BatchNorm, whose batch statistics stay per worker as under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across(tensors: list[Tensor], differentiable: bool = False) -> list[Tensor]:
    """Average each tensor over the workers; identity in a single process.

    ``differentiable``: through ``torch.distributed.nn``'s all-reduce, whose backward all-reduces
    the incoming gradients, so a loss downstream sees every worker's share."""
    n = world_size()
    if n == 1:
        return tensors
    if differentiable:
        from torch.distributed.nn.functional import all_reduce

        return [all_reduce(t) / n for t in tensors]
    flat = _flatten_dense_tensors([t.detach() for t in tensors])
    dist.all_reduce(flat)
    flat /= n
    return list(_unflatten_dense_tensors(flat, tensors))


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every worker."""
    if world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)
