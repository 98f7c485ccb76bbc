"""The statistics of a report: cell summaries and paired comparisons with their verdicts.

A cell shows mean ± sample standard deviation over the seeds whose cell finished. A comparison
of cell a with cell b is the paired difference d_s = a_s - b_s over the seeds s where both
finished, with the 95 % Student-t interval

    mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n),

its effect relative to the baseline (mean(d) / mean(b), interval likewise) and two paired
t-tests: of mean(d) = 0 and of mean(d) = the paper's relative effect times mean(b). Comparisons
with the same cells (the same stage keys per seed) are one comparison, counted once across
tables (``evaluate``). A comparison is a ``method`` claim or a ``sanity`` check of the data; the
p-values of the distinct method comparisons are Holm-adjusted and their verdicts read the
adjusted p at ``ALPHA``. docs/statistics.md says why, and how to read the verdicts.
"""

from __future__ import annotations

import math
import statistics

KINDS = ("method", "sanity")  # the kinds of a comparison; the first is the default
METHOD, SANITY = KINDS
ALPHA = 0.05  # level of every test, after Holm's adjustment for the method comparisons
NO_EFFECT = 0.02  # a paper delta below this fraction of its baseline value claims no effect

SAME, OPPOSITE, INCONCLUSIVE = "same direction as the paper", "opposite to the paper", "inconclusive"
SMALLER, NO_EFFECT_CLAIMED = "smaller than the paper's", "no effect claimed"
REUSED = "the same cells as another comparison"  # counted once, where its verdict is


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


def t_test(interval: dict, null: float = 0.0) -> float | None:
    """Two-sided p of the paired t-test of mean(d) = ``null`` (n - 1 degrees of freedom);
    None with fewer than two pairs. Without spread (sd 0) p is 0, or 1 at the null itself."""
    from scipy.stats import t

    n, mean, sd = interval["n"], interval["mean"], interval["sd"]
    if n < 2:
        return None
    if sd == 0:
        return 1.0 if mean == null else 0.0
    return float(2.0 * t.sf(abs(mean - null) / (sd / math.sqrt(n)), n - 1))


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), made
    monotone (each at least the one before it in that order) and capped at 1."""
    m, out, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def relative(interval: dict, baseline: float | None) -> dict:
    """The effect relative to the baseline: mean(d) / baseline and the interval divided
    likewise (the baseline taken as fixed); None where there is no baseline or it is 0."""
    if not baseline or interval["mean"] is None:
        return {"rel": None, "rel_lo": None, "rel_hi": None}
    ends = None if interval["lo"] is None else sorted(
        (interval["lo"] / baseline, interval["hi"] / baseline))
    return {"rel": interval["mean"] / baseline, "rel_lo": ends and ends[0],
            "rel_hi": ends and ends[1]}


def no_effect_claimed(paper_delta: float | None, paper_baseline: float | None) -> bool:
    """The paper's delta is below ``NO_EFFECT`` of its baseline value: no effect claimed."""
    return (paper_delta is not None and paper_baseline is not None
            and abs(paper_delta) < NO_EFFECT * abs(paper_baseline))


def verdict(n: int, mean: float | None, paper_delta: float | None, p_zero: float | None,
            p_paper: float | None = None, paper_null: float | None = None,
            no_effect: bool = False) -> str:
    """What a comparison says about the paper's delta (a - b, the same sign convention), from
    its p-values (Holm-adjusted for method comparisons) at ``ALPHA``. ``p_paper`` tests
    mean(d) = ``paper_null``, the paper's relative effect times our baseline.

    * fewer than 2 pairs: "inconclusive (n=..)";
    * the paper's delta below 2 % of its baseline (``no_effect``): "no effect claimed";
    * no paper delta (a comparison of ours): "lower" / "higher" where p_zero < ALPHA;
    * p_zero < ALPHA against the paper's sign: "opposite to the paper";
    * p_paper < ALPHA with ours on the side of 0 from the paper's effect (the same sign and
      smaller, or not told from 0): "smaller than the paper's";
    * p_zero < ALPHA with the paper's sign: "same direction as the paper";
    * otherwise "inconclusive"."""
    if n < 2 or p_zero is None:
        return f"{INCONCLUSIVE} (n={n})"
    if paper_delta is not None and no_effect:
        return NO_EFFECT_CLAIMED
    differs = p_zero < ALPHA
    if not paper_delta:
        return ("higher" if mean > 0 else "lower") if differs else INCONCLUSIVE
    if differs and (mean > 0) != (paper_delta > 0):
        return OPPOSITE
    if (p_paper is not None and p_paper < ALPHA and paper_null is not None
            and (mean - paper_null) * paper_delta < 0):
        return SMALLER
    return SAME if differs else INCONCLUSIVE


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


def stage_keys(cell: list[dict]) -> dict[int, tuple[str, str] | None]:
    """{seed: (stage, key)} of a cell's finished seeds: what it measured (None: unknown)."""
    return {r["seed"]: (r["stage"], r["key"]) if r.get("stage") and r.get("key") else None
            for r in cell if r["status"] == "done"}


def paper_value(spec: dict, cell, metric: str) -> float | None:
    """The paper's number for (row, column) and ``metric``, if the spec has one."""
    row, column = cell
    for r in spec["rows"]:
        if r["label"] == row:
            return ((r.get("paper") or {}).get(column) or {}).get(metric)
    return None


def measure(spec: dict, by_cell: dict, comp: dict) -> dict:
    """One comparison of the spec, on its own: the paired interval over the seeds both cells
    finished, the effect relative to the baseline (cell b) and the paper's, the raw p-values,
    and ``identity``, the (seed, a's stage key, b's stage key) it pairs."""
    metric = comp["metric"]
    a_cell, b_cell = by_cell[tuple(comp["a"])], by_cell[tuple(comp["b"])]
    a, b = values(a_cell, metric), values(b_cell, metric)
    seeds = sorted(set(a) & set(b))
    interval = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
    base = statistics.fmean(b[s] for s in seeds) if seeds else None
    ka, kb = stage_keys(a_cell), stage_keys(b_cell)
    identity = frozenset((s, ka[s], kb[s]) for s in seeds)
    if any(ka[s] is None or kb[s] is None for s in seeds):
        identity = frozenset()  # without stage keys a comparison is only itself
    delta = comp.get("paper_delta")
    paper_b = paper_value(spec, comp["b"], metric)
    paper_rel = None if delta is None or not paper_b else delta / paper_b
    null = None if paper_rel is None or base is None else paper_rel * base
    return {"table": spec["table"], "a": list(comp["a"]), "b": list(comp["b"]),
            "metric": metric, "kind": comp.get("kind", METHOD), "paper_delta": delta,
            "paper_baseline": paper_b, "paper_rel": paper_rel,
            "no_effect": no_effect_claimed(delta, paper_b), "seeds": seeds, **interval,
            "baseline": base, **relative(interval, base), "paper_null": null,
            "p": t_test(interval), "p_paper": None if null is None else t_test(interval, null),
            "p_holm": None, "p_paper_holm": None, "same_as": None, "identity": identity}


def evaluate(tables: dict[str, tuple[dict, list[dict]]]) -> dict:
    """Every comparison of every table, measured, deduplicated, adjusted and given its verdict.

    Two comparisons of one metric are the same when one's (seed, a's stage key, b's stage key)
    pairs are all among the other's: the one with the most pairs (the first of equals, in table
    and spec order) is counted, the others get ``same_as`` (it) and the verdict ``REUSED``.
    Holm adjusts p (of mean(d) = 0) across the distinct method comparisons with n >= 2, and
    p_paper (of mean(d) = the paper's relative effect) across those of them where the paper
    claims an effect; their verdicts read the adjusted p. Sanity checks read the raw p.

    Returns ``{"tables": {table: [comparison, ...]}, "method": m, "sized": k}`` with the sizes
    of the two Holm families."""
    found = []
    for spec, records in tables.values():
        by_cell = cells(spec, records)
        found += [measure(spec, by_cell, comp) for comp in spec.get("comparisons") or []]
    for c in found:
        holders = [x for x in found if x["metric"] == c["metric"] and c["identity"]
                   and c["identity"] <= x["identity"]]
        rep = max(holders, key=lambda x: len(x["identity"])) if holders else c
        c["same_as"] = None if rep is c else rep
    method = [c for c in found if c["same_as"] is None and c["kind"] == METHOD
              and c["p"] is not None]
    for c, q in zip(method, holm([c["p"] for c in method])):
        c["p_holm"] = q
    sized = [c for c in method if c["p_paper"] is not None and not c["no_effect"]]
    for c, q in zip(sized, holm([c["p_paper"] for c in sized])):
        c["p_paper_holm"] = q
    for c in found:
        if c["same_as"] is not None:
            c["verdict"] = REUSED
            continue
        adjusted = c["kind"] == METHOD
        c["verdict"] = verdict(c["n"], c["mean"], c["paper_delta"],
                               c["p_holm"] if adjusted else c["p"],
                               c["p_paper_holm"] if adjusted else c["p_paper"],
                               c["paper_null"], c["no_effect"])
    return {"tables": {name: [c for c in found if c["table"] == name] for name in tables},
            "method": len(method), "sized": len(sized)}


def shared_cells(tables: dict[str, tuple[dict, list[dict]]]) -> dict[str, list[dict]]:
    """Per table, its cells whose finished seeds' stage keys are all another cell's (the
    same artifacts shown twice): ``{cell, table, same, seeds, of}`` with the cell holding the
    most of them (the first of equals, in table and row order) as ``same``."""
    found = []
    for name, (spec, records) in tables.items():
        for cell, recs in cells(spec, records).items():
            keys = stage_keys(recs)
            if keys and None not in keys.values():
                found.append((name, cell, frozenset(keys.items())))
    out: dict[str, list[dict]] = {name: [] for name in tables}
    for name, cell, ident in found:
        rep = max((x for x in found if ident <= x[2]), key=lambda x: len(x[2]))
        if rep[:2] != (name, cell):
            out[name].append({"cell": list(cell), "table": rep[0], "same": list(rep[1]),
                              "seeds": sorted(s for s, _ in ident),
                              "of": sorted(s for s, _ in rep[2])})
    return out


def paired_power(n: int, sd: float, effect: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` seeds to detect a mean
    difference ``effect`` when the paired differences have standard deviation ``sd``
    (noncentral t with n - 1 degrees of freedom, noncentrality effect / (sd / sqrt n))."""
    from scipy.stats import nct, t

    if n < 2:
        return 0.0
    df, ncp = n - 1, abs(effect) / (sd / math.sqrt(n))
    crit = t.ppf(1 - alpha / 2, df)
    upper, lower = float(nct.sf(crit, df, ncp)), float(nct.cdf(-crit, df, ncp))
    # scipy's far lower tail of a large noncentrality comes back nan: it is ~0 there
    return min(1.0, upper + (lower if math.isfinite(lower) else 0.0))


def seeds_for_power(sd: float, effect: float, *, comparisons: int = 1, power: float = 0.8,
                    alpha: float = ALPHA, most: int = 1000) -> int:
    """The fewest seeds whose paired t-test reaches ``power`` for ``effect`` at paired SD ``sd``
    when it must pass Holm's first step among ``comparisons`` tests (level alpha / comparisons:
    the strictest step, so the count holds whatever the other p-values are)."""
    for n in range(2, most + 1):
        if paired_power(n, sd, effect, alpha / comparisons) >= power:
            return n
    raise ValueError(f"more than {most} seeds for effect {effect} at sd {sd}")

