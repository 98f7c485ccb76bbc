"""The statistics of a report: cell summaries and paired comparisons with their verdicts.

A cell shows mean ± sample standard deviation over the seeds whose cell finished. A comparison
of cell a with cell b is the paired difference d_s = a_s - b_s over the seeds s where both
finished, with the 95 % Student-t interval

    mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)

and a verdict: "same direction as the paper" (the interval excludes 0 and has the sign of the
paper's delta), "opposite to the paper" (excludes 0, other sign) or "inconclusive".
docs/statistics.md says why, and how to read many such verdicts at once.
"""

from __future__ import annotations

import math
import statistics

SAME, OPPOSITE, INCONCLUSIVE = "same direction as the paper", "opposite to the paper", "inconclusive"


def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a - b, their sample sd and the 95 % Student-t interval.

    ``lo``/``hi`` (and ``sd`` for n < 2) are None when there are fewer than two pairs."""
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    out = {"mean": statistics.fmean(d) if d else None, "lo": None, "hi": None, "n": n,
           "sd": None}
    if n >= 2:
        sd = statistics.stdev(d)
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def verdict(interval: dict, paper_delta: float | None = None) -> str:
    """What a paired interval says about the paper's delta (a - b, same sign convention).

    Without a paper delta (None, or 0: no direction to compare) it says "lower"/"higher"."""
    if interval["n"] < 2:
        return f"{INCONCLUSIVE} (n={interval['n']})"
    lo, hi = interval["lo"], interval["hi"]
    if lo <= 0.0 <= hi:
        return INCONCLUSIVE
    if not paper_delta:
        return "higher" if lo > 0 else "lower"
    return SAME if (lo > 0) == (paper_delta > 0) else OPPOSITE


def cells(spec: dict, records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records per (row, column) of the spec, by seed."""
    out: dict[tuple[str, str], list[dict]] = {
        (r["label"], c["name"]): [] for r in spec["rows"] for c in spec["columns"]}
    for r in sorted(records, key=lambda r: r["seed"]):
        out[(r["row"], r["column"])].append(r)
    return out


def values(cell: list[dict], metric: str) -> dict[int, float]:
    """{seed: value} of the finished seeds of a cell that report ``metric``."""
    return {r["seed"]: r[metric] for r in cell if r["status"] == "done" and r[metric] is not None}


def summary(cell: list[dict], metric: str) -> dict:
    """Mean and sample sd over a cell's finished seeds, with n, failures, runs and the seeds."""
    found = values(cell, metric)
    v = list(found.values())
    return {"mean": statistics.fmean(v) if v else None,
            "std": statistics.stdev(v) if len(v) >= 2 else None, "n": len(v),
            "failed": sum(r["status"] == "failed" for r in cell), "runs": len(cell),
            "seeds": sorted(found)}


def comparisons(spec: dict, by_cell: dict) -> list[dict]:
    """The spec's comparisons, each with its paired interval over the seeds both cells
    finished and its verdict against the paper's delta."""
    out = []
    for comp in spec.get("comparisons") or []:
        a, b = values(by_cell[tuple(comp["a"])], comp["metric"]), \
            values(by_cell[tuple(comp["b"])], comp["metric"])
        seeds = sorted(set(a) & set(b))
        interval = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
        out.append({"table": spec["table"], "a": comp["a"], "b": comp["b"],
                    "metric": comp["metric"], "paper_delta": comp.get("paper_delta"),
                    "seeds": seeds, **interval,
                    "verdict": verdict(interval, comp.get("paper_delta"))})
    return out
