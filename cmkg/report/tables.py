"""One table's files: ``{table}.md`` (the paper's numbers beside ours, comparisons, failures,
phi across seeds, the regularizer's strength, notes), ``{table}.csv`` and
``{table}_comparisons.csv``."""

from __future__ import annotations

import numpy as np

from cmkg.report import stats
from cmkg.report.format import comparison_label, csv_text, interval, md_table, number, ours, seeds
from cmkg.report.records import METRICS


def _paper(spec: dict, row: str, column: str, metric: str) -> float | None:
    for r in spec["rows"]:
        if r["label"] == row:
            return ((r.get("paper") or {}).get(column) or {}).get(metric)
    return None


def table_markdown(spec: dict, records: list[dict]) -> str:
    """One table as Markdown: the paper's numbers beside ours, comparisons, failures, notes."""
    by_cell = stats.cells(spec, records)
    out = [f"# {spec.get('title') or spec['table']}\n"]
    if spec.get("caption"):
        out.append(f"{spec['caption']}\n")
    if spec.get("regenerates"):
        out.append(f"Regenerates: {spec['regenerates']}.\n")
    out.append(f"Preset `{spec.get('preset', '—')}`; seeds {seeds(spec.get('seeds'))}.\n")
    out.append("Ours: mean ± sample standard deviation over the seeds whose cell finished "
               "(n of them; failed seeds are counted apart). \"not run\": no record.\n")
    out.append(_numbers(spec, by_cell))
    baseline = _mean_pose_line(spec, by_cell)
    if baseline:
        out.append(baseline)
    out += _comparisons_section(spec, by_cell)
    out += _failed_section(by_cell)
    out += _phi_section(spec)
    out += _strength_section(spec, records)
    if spec.get("notes"):
        out.append("## Notes\n")
        out.append("".join(f"- {n}\n" for n in spec["notes"]))
    return "\n".join(out)


def _numbers(spec: dict, by_cell: dict) -> str:
    """The table itself: per row, the paper's value and ours for each column and metric."""
    pairs = [(c, m) for c in spec["columns"] for m in c["metrics"]]
    header = ["row"]
    for c, m in pairs:
        title = f"{c.get('title') or c['name']}: {METRICS[m][0]}"
        header += [f"{title}, paper", f"{title}, ours"]
    body = []
    for r in spec["rows"]:
        line = [r["label"]]
        for c, m in pairs:
            line += [number(_paper(spec, r["label"], c["name"], m), m),
                     ours(stats.summary(by_cell[(r["label"], c["name"])], m), m)]
        body.append(line)
    return md_table(header, body, right=set(range(1, len(header))))


def _mean_pose_line(spec: dict, by_cell: dict) -> str:
    """The reference every EPE should beat: predicting the training set's mean pose for every
    test image, per column (one value, or one per row where the rows' test sets differ)."""
    parts = []
    for c in spec["columns"]:
        per_row = {}
        for r in spec["rows"]:
            vals = [x["mean_pose_epe_mm"] for x in by_cell[(r["label"], c["name"])]
                    if x["status"] == "done" and x.get("mean_pose_epe_mm") is not None]
            if vals:
                per_row[r["label"]] = float(np.mean(vals))
        if not per_row:
            continue
        values = list(per_row.values())
        if max(values) - min(values) < 0.005:
            parts.append(f"{c.get('title') or c['name']} {values[0]:.2f}")
        else:
            parts.append(f"{c.get('title') or c['name']}: " + ", ".join(
                f"{label} {v:.2f}" for label, v in per_row.items()))
    if not parts:
        return ""
    return ("Mean-pose baseline, EPE (mm) of predicting the training set's mean pose for every "
            "test image: " + "; ".join(parts) + ".\n")


def _comparisons_section(spec: dict, by_cell: dict) -> list[str]:
    comparisons = stats.comparisons(spec, by_cell)
    if not comparisons:
        return []
    better = spec.get("lower_is_better") or {}
    used = sorted({c["metric"] for c in comparisons}, key=list(METRICS).index)
    sense = "; ".join(f"{METRICS[m][0]}: {'lower' if better[m] else 'higher'} is better"
                      for m in used if m in better)
    return ["## Comparisons\n",
            "Paired difference a − b over the seeds where both cells finished, with its "
            "95 % Student-t interval (n − 1 degrees of freedom). The verdict compares the "
            "interval with 0 and its sign with the paper's delta."
            + (f" {sense}." if sense else "") + "\n",
            md_table(["a − b", "metric", "ours", "95 % interval", "n", "paper", "verdict"],
                     [[comparison_label(c), METRICS[c["metric"]][0],
                       number(c["mean"], c["metric"], True), interval(c), str(c["n"]),
                       number(c["paper_delta"], c["metric"], True), c["verdict"]]
                      for c in comparisons],
                     right={2, 4, 5})]


def _failed_section(by_cell: dict) -> list[str]:
    failed = [r for cell in by_cell.values() for r in cell if r["status"] == "failed"]
    if not failed:
        return []
    return ["## Failed cells\n",
            md_table(["row", "column", "seed", "stage", "error"],
                     [[r["row"], r["column"], str(r["seed"]), r["stage"] or "—", r["error"] or "—"]
                      for r in failed], right={2})]


def _phi_section(spec: dict) -> list[str]:
    """phi_META's correlation between seeds, as the runner computed it into the spec."""
    if not spec.get("phi_correlation"):
        return []
    return ["## φ_META across seeds\n",
            "Pearson correlation of the learned φ (one value per regularised weight) "
            "between meta stages of different seeds: knowledge shared by the seeds shows "
            "as a correlation well above 0, noise as about 0.\n",
            md_table(["form", "seeds", "correlation", "weights"],
                     [[c["form"], f"{c['seeds'][0]} vs {c['seeds'][1]}",
                       "— (φ constant)" if c["pearson"] is None else f"{c['pearson']:+.3f}",
                       str(c["count"])] for c in spec["phi_correlation"]], right={2, 3})]


def _strength_section(spec: dict, records: list[dict]) -> list[str]:
    strength = _strength_rows(spec, records)
    if not strength:
        return []
    return ["## The regularizer's strength\n",
            "Per row, over the n seeds whose stage logged it (mean): D, the e-folds "
            "R decays (D > 0) or grows "
            "(D < 0) a weight over the target run with Adam's own gradient scale "
            "(docs/prior-strength.md; |D| << 0.1: R does nothing), its median over the "
            "regularised weights and the fraction with |D| > 0.1, after the last epoch; "
            "||∇R|| / ||∇L_REG|| on the regularised weights; for a calibrated prior, the "
            "factor applied to φ_META and the β of Algorithm 1 it amounts to.\n",
            md_table(["row", "n", "median abs D", "abs D > 0.1", "D < 0", "grad ratio",
                      "φ scale", "β equivalent"], strength, right={1, 2, 3, 4, 5, 6, 7})]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _strength_rows(spec: dict, records: list[dict]) -> list[list[str]]:
    """The D table's rows from the records' ``extra.prior_strength`` / ``extra.calibration``."""
    out = []
    for r in spec["rows"]:
        found = [x["extra"] for x in records if x["row"] == r["label"] and x["status"] == "done"
                 and "prior_strength" in x["extra"]]
        if not found:
            continue
        overall = [f["prior_strength"]["overall"] for f in found]
        cal = [f["calibration"] for f in found if "calibration" in f]
        out.append([r["label"], str(len(found)), _g(_mean([o["abs_d_median"] for o in overall])),
                    _g(_mean([o.get("frac_abs_d_gt_0.1") for o in overall])),
                    _g(_mean([o["frac_d_negative"] for o in overall])),
                    _g(_mean([o.get("grad_ratio") for o in overall])),
                    _g(_mean([c["scale"] for c in cal])) if cal else "—",
                    _g(_mean([c.get("beta_equivalent") for c in cal])) if cal else "—"])
    return out


def table_csv(spec: dict, records: list[dict]) -> str:
    """One line per (row, column, metric): the paper's number and ours at full precision."""
    by_cell = stats.cells(spec, records)
    rows = []
    for r in spec["rows"]:
        for c in spec["columns"]:
            for m in c["metrics"]:
                s = stats.summary(by_cell[(r["label"], c["name"])], m)
                rows.append([spec["table"], r["label"], c["name"], m,
                             _paper(spec, r["label"], c["name"], m), s["mean"], s["std"], s["n"],
                             s["failed"], ";".join(str(x) for x in s["seeds"])])
    return csv_text(["table", "row", "column", "metric", "paper", "mean", "std", "n", "failed",
                     "seeds"], rows)


def comparisons_csv(spec: dict, records: list[dict]) -> str:
    """One line per comparison: both cells, n, mean, sd, the interval, the paper's delta,
    the verdict and the paired seeds."""
    rows = [[c["table"], *c["a"], *c["b"], c["metric"], c["n"], c["mean"], c["sd"], c["lo"],
             c["hi"], c["paper_delta"], c["verdict"], ";".join(str(s) for s in c["seeds"])]
            for c in stats.comparisons(spec, stats.cells(spec, records))]
    return csv_text(["table", "a_row", "a_column", "b_row", "b_column", "metric", "n", "mean",
                     "sd", "lo", "hi", "paper_delta", "verdict", "seeds"], rows)
