"""The benchmark's own properties, per table, computed from the stored records.

A table file may name the cells that describe the benchmark rather than the method, under
``benchmark:`` (docs/benchmark.md says what each property should be and why):

    benchmark:
      ratios: {teacher: [ROW, COLUMN], RGB student: [ROW, COLUMN], ...}  # EPE / mean-pose EPE
      floor: {baseline: [ROW, COLUMN], inert: [ROW, COLUMN]}  # a regularizer that does nothing
      agreement: [ROW, COLUMN]  # a choose row: val against test over its grid

- ratio: the cell's mean test EPE over its seeds divided by the mean EPE of predicting the
  training set's mean pose (the same seeds): 1 learns nothing, 0 is perfect.
- noise floor: the sample SD over seeds of the paired difference inert - baseline, where the
  inert row changes (almost) nothing: the smallest effect a comparison of this table can see
  comes from it (a paired 95 % interval's half-width is t * SD / sqrt(n)).
- agreement: Spearman's rank correlation, over the values of a ``choose`` row, between the mean
  validation EPE and the mean test EPE of the seeds that chose (recorded with the choice, test
  never used to choose). 1: validation ranks the values as test does.

Tables without ``benchmark:`` (and records from before test EPEs were recorded with a choice)
have no properties: the sections are left out.
"""

from __future__ import annotations

import math
import statistics

from cmkg.report import stats
from cmkg.report.format import seed_text


def _cell(by_cell: dict, ref) -> list[dict]:
    return [r for r in by_cell.get((ref[0], ref[1]), []) if r["status"] == "done"]


def ratio(by_cell: dict, ref) -> dict | None:
    """Mean test EPE over mean mean-pose EPE of one cell (its finished seeds)."""
    done = [r for r in _cell(by_cell, ref) if r.get("mean_pose_epe_mm")]
    if not done:
        return None
    epe = statistics.mean(r["epe_mm"] for r in done)
    base = statistics.mean(r["mean_pose_epe_mm"] for r in done)
    return {"epe_mm": epe, "mean_pose_epe_mm": base, "ratio": epe / base, "n": len(done)}


def floor(by_cell: dict, baseline, null) -> dict | None:
    """The paired SD over seeds of null - baseline (test EPE) and its 95 % half-width."""
    a = stats.values(_cell(by_cell, null), "epe_mm")
    b = stats.values(_cell(by_cell, baseline), "epe_mm")
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    c = stats.paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
    return {"sd": c["sd"], "mean": c["mean"], "half_width": (c["hi"] - c["lo"]) / 2,
            "n": len(seeds)}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below three points or when
    one side is constant."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearmanr(x, y).statistic
    return None if math.isnan(rho) else float(rho)


def agreement(by_cell: dict, ref) -> dict | None:
    """Val against test over a choose row's values, from the choice its records carry."""
    for r in _cell(by_cell, ref):
        chosen = r.get("chosen") or {}
        val, test = chosen.get("val_epe_mm") or {}, chosen.get("test_epe_mm") or {}
        common = [v for v in val if v in test]
        if len(common) >= 3:
            rho = spearman([val[v] for v in common], [test[v] for v in common])
            best_val = min(common, key=lambda v: val[v])
            best_test = min(common, key=lambda v: test[v])
            return {"rho": rho, "values": len(common), "seeds": chosen.get("seeds", []),
                    "key": chosen.get("key"), "best_val": best_val, "best_test": best_test}
    return None


def properties(spec: dict, records: list[dict]) -> dict:
    """{ratios: {name: ratio}, floor: floor, agreement: agreement} of one table (entries it
    does not declare, or cannot compute, are absent)."""
    bench = spec.get("benchmark") or {}
    by_cell = stats.cells(spec, records)
    out: dict = {}
    ratios = {name: ratio(by_cell, ref) for name, ref in (bench.get("ratios") or {}).items()}
    if any(ratios.values()):
        out["ratios"] = {k: v for k, v in ratios.items() if v}
    if "floor" in bench and (f := floor(by_cell, bench["floor"]["baseline"],
                                        bench["floor"]["inert"])):
        out["floor"] = {**f, "null": bench["floor"]["inert"][0],
                        "baseline": bench["floor"]["baseline"][0]}
    if "agreement" in bench and (a := agreement(by_cell, bench["agreement"])):
        out["agreement"] = {**a, "row": bench["agreement"][0]}
    return out


def lines(spec: dict, records: list[dict]) -> list[str]:
    """One Markdown bullet per property of a table; [] when it has none."""
    p = properties(spec, records)
    out = []
    if "ratios" in p:
        parts = [f"{name} {r['ratio']:.2f} ({r['epe_mm']:.1f} / {r['mean_pose_epe_mm']:.1f} mm)"
                 for name, r in p["ratios"].items()]
        out.append("- test EPE / mean-pose EPE: " + "; ".join(parts))
    if "floor" in p:
        f = p["floor"]
        out.append(f"- noise floor: paired SD {f['sd']:.2f} mm over {f['n']} seeds of "
                   f"{f['null']} - {f['baseline']} (mean {f['mean']:+.2f} mm; a paired 95 % "
                   f"interval's half-width at this n: {f['half_width']:.2f} mm)")
    if "agreement" in p:
        a = p["agreement"]
        rho = "undefined" if a["rho"] is None else f"{a['rho']:.2f}"
        out.append(f"- validation against test over {a['row']}'s {a['values']} values of "
                   f"{a['key']}: Spearman {rho} (seeds {seed_text(a['seeds'])}; best on val "
                   f"{a['best_val']}, best on test {a['best_test']})")
    return out


def section(tables: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """The index's "The benchmark" section: each table's properties; [] when none has any."""
    out = []
    for name, (spec, records) in tables.items():
        if ls := lines(spec, records):
            out += [f"**{spec.get('title', name)}**", ""] + ls + [""]
    if not out:
        return []
    return ["## The benchmark", "",
            "What the embedded data allows a table to see, measured on its own records "
            "(docs/benchmark.md): how much of the mean pose's error each reference network "
            "removes, the noise floor of a paired comparison, and whether validation ranks a "
            "grid as test does.", ""] + out
