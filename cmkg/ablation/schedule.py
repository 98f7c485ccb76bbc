"""How long a set of stages takes on N task slots: the critical path and a list-scheduling
simulation of the runner (docs/performance.md, "Planning a cluster run").

A plan is a DAG of stages (``stages.Node``; an edge from each input it trains), each with a
duration. On N one-stage slots, no schedule beats max(critical path, total / N). The runner
hands its stages to Ray in one order (``order``) and Ray starts the first ready stage in that
order whenever a slot frees; ``simulate`` plays that out with the durations given. Two orders:

- ``submission``: the runner's historical order, seed by seed, each stage after its inputs
  (``runner.upstream_first``);
- ``critical``: longest remaining chain first (a stage's own duration plus its longest path to
  a stage that needs nothing more), ties broken by the submission order. This keeps the wall
  close to the lower bound when there are many slots: the long chains start first.

Durations come from the store where a stage finished (its ``meta.json`` ``duration_s``) and
from a per-kind rate model otherwise (``estimate``): the stage's work (``cells.work``: samples x
epochs, scaled by pixels and backbone) times the median seconds per unit of work of the
finished stages of its kind, or of all finished stages when its kind has none.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Job:
    id: Hashable
    kind: str  # the stage kind (teacher, student, kd, meta, target)
    duration: float  # seconds
    inputs: tuple[Hashable, ...] = ()  # ids of jobs that must finish first (others: done)


def _inputs(jobs: Sequence[Job]) -> dict[Hashable, tuple[Hashable, ...]]:
    ids = {j.id for j in jobs}
    return {j.id: tuple(i for i in j.inputs if i in ids) for j in jobs}


def remaining_chain(jobs: Sequence[Job]) -> dict[Hashable, float]:
    """Per job: its duration plus the longest chain of jobs that (transitively) need it."""
    needers = _needers(jobs)
    by_id = {j.id: j for j in jobs}
    out: dict[Hashable, float] = {}
    for j in reversed(topological(jobs)):
        out[j.id] = by_id[j.id].duration + max((out[n] for n in needers[j.id]), default=0.0)
    return out


def inputs_first(items: Sequence, id_of, inputs_of) -> list:
    """``items`` in their order, except that each comes after its inputs among them (an input
    outside ``items`` counts as done): the runner's submission order (``runner.upstream_first``)
    and the simulator's."""
    ids = {id_of(x) for x in items}
    out, placed, pending = [], set(), list(items)
    while pending:
        rest = []
        for x in pending:
            if all(i not in ids or i in placed for i in inputs_of(x)):
                out.append(x)
                placed.add(id_of(x))
            else:
                rest.append(x)
        if len(rest) == len(pending):
            raise ValueError(f"a cycle among the stages {[id_of(x) for x in rest][:3]}")
        pending = rest
    return out


def topological(jobs: Sequence[Job]) -> list[Job]:
    """``jobs`` in their order, except that each comes after its inputs among them."""
    return inputs_first(jobs, lambda j: j.id, lambda j: j.inputs)


def _needers(jobs: Sequence[Job]) -> dict[Hashable, list[Hashable]]:
    """Per job, the jobs among ``jobs`` that need it."""
    inputs = _inputs(jobs)
    out: dict[Hashable, list[Hashable]] = {j.id: [] for j in jobs}
    for j in jobs:
        for i in inputs[j.id]:
            out[i].append(j.id)
    return out


def critical_path(jobs: Sequence[Job]) -> tuple[float, list[Job]]:
    """The longest chain of jobs (each needing the one before) and its length in seconds."""
    if not jobs:
        return 0.0, []
    chain = remaining_chain(jobs)
    inputs, needers = _inputs(jobs), _needers(jobs)
    by_id = {j.id: j for j in jobs}
    roots = [j for j in jobs if not inputs[j.id]]
    node = max(roots, key=lambda j: chain[j.id])
    path = [node]
    while needers[node.id]:
        node = by_id[max(needers[node.id], key=lambda n: chain[n])]
        path.append(node)
    return chain[path[0].id], path


def order(jobs: Sequence[Job], policy: str = "critical") -> list[Job]:
    """The order the runner submits ``jobs`` in: ``submission`` (as given, inputs first) or
    ``critical`` (longest remaining chain first, ties by the submission order)."""
    base = topological(jobs)
    if policy == "submission":
        return base
    if policy != "critical":
        raise ValueError(f"unknown order {policy!r}")
    chain = remaining_chain(base)
    rank = {j.id: i for i, j in enumerate(base)}
    # a job's remaining chain is longer than any job's that needs it: inputs stay first
    return sorted(base, key=lambda j: (-chain[j.id], rank[j.id]))


def simulate(jobs: Sequence[Job], slots: int, policy: str = "critical") -> float:
    """Wall seconds of ``jobs`` on ``slots`` slots: whenever a slot frees, the first job of
    ``order(jobs, policy)`` whose inputs have finished starts there."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    queue = order(jobs, policy)
    inputs = _inputs(queue)
    finished: set[Hashable] = set()
    running: list[tuple[float, int, Hashable]] = []  # (end time, tie-break, id)
    now, waiting, n = 0.0, list(queue), 0
    while waiting or running:
        started = True
        while started and len(running) < slots:
            started = False
            for k, j in enumerate(waiting):
                if all(i in finished for i in inputs[j.id]):
                    heapq.heappush(running, (now + j.duration, n, j.id))
                    n += 1
                    del waiting[k]
                    started = True
                    break
        if not running:
            raise ValueError("jobs wait for inputs that never run")
        now, _, done = heapq.heappop(running)
        finished.add(done)
        while running and running[0][0] == now:  # every job ending at this instant
            finished.add(heapq.heappop(running)[2])
    return now


def rates(found: dict, work_of) -> dict[str, float]:
    """Seconds per unit of work per stage kind (median over the finished stages in ``found``,
    id -> artifact or None), and under ``"*"`` over all of them."""
    per: dict[str, list[float]] = {}
    for (kind, _), art in found.items():
        if art is None:
            continue
        dur = art.meta.get("duration_s")
        if dur:
            per.setdefault(kind, []).append(dur / work_of[(kind, _)])
    out = {k: float(np.median(v)) for k, v in per.items()}
    every = [r for v in per.values() for r in v]
    if every:
        out["*"] = float(np.median(every))
    return out


def estimate(kind: str, work: float, rate: dict[str, float]) -> float | None:
    """A stage's predicted seconds from its work and the per-kind ``rates``; None without any."""
    r = rate.get(kind, rate.get("*"))
    return None if r is None else work * r


def predictions(rounds: Sequence[Sequence[Job]], slots: Sequence[int]) -> list[dict]:
    """Per slot count: the predicted wall of the rounds run one after the other (the runner
    waits for a round's choices before the next), under each order, and its lower bound."""
    out = []
    for n in slots:
        row = {"slots": n}
        for policy in ("submission", "critical"):
            row[policy] = sum(simulate(r, n, policy) for r in rounds)
        row["bound"] = sum(max(critical_path(r)[0], sum(j.duration for j in r) / n)
                           for r in rounds)
        out.append(row)
    return out
