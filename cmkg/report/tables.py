"""One table's files: ``{table}.md`` (the paper's numbers beside ours, comparisons, failures,
phi's order-free statistics, the regularizer's strength, notes), ``{table}.csv`` and
``{table}_comparisons.csv``.

A table's comparisons are evaluated with the report's other tables (``tables``, default: this
one alone): Holm's adjustment runs across the method comparisons of all of them, and a
comparison or cell that is another table's is counted there (``stats.evaluate``)."""

from __future__ import annotations

import numpy as np

from cmkg.report import stats
from cmkg.report.format import (
    comparison_label,
    csv_text,
    interval,
    md_table,
    number,
    ours,
    p_value,
    percent,
    relative,
    seeds,
)
from cmkg.report.records import METRICS


def _tables(spec: dict, records: list[dict], tables: dict | None) -> dict:
    return tables if tables is not None else {spec["table"]: (spec, records)}


def table_markdown(spec: dict, records: list[dict], tables: dict | None = None) -> str:
    """One table as Markdown: the paper's numbers beside ours, comparisons, failures, notes.
    ``tables``: every table of the report, this one included (``load_records``)."""
    tables = _tables(spec, records, tables)
    evaluated = stats.evaluate(tables)
    by_cell = stats.cells(spec, records)
    out = [f"# {spec.get('title') or spec['table']}\n"]
    if spec.get("caption"):
        out.append(f"{spec['caption']}\n")
    if spec.get("regenerates"):
        out.append(f"Regenerates: {spec['regenerates']}.\n")
    chose = "" if not spec.get("choice_seeds") else (
        f" (report seeds; the `choose` rows' values were chosen on the validation split of "
        f"seeds {seeds(spec['choice_seeds'])}, one value per row, which were not reported)")
    out.append(f"Preset `{spec.get('preset', '—')}`; seeds {seeds(spec.get('seeds'))}{chose}.\n")
    out.append("Ours: mean ± sample standard deviation over the seeds whose cell finished "
               "(n of them; failed seeds are counted apart). \"not run\": no record.\n")
    out.append(_numbers(spec, by_cell))
    baseline = _mean_pose_line(spec, by_cell)
    if baseline:
        out.append(baseline)
    comparisons = evaluated["tables"][spec["table"]]
    out += _comparisons_section(spec, comparisons)
    out += _failed_section(by_cell)
    out += _phi_section(records)
    out += _strength_section(spec, records)
    out += _planted_section(spec, records)
    notes = list(spec.get("notes") or [])
    if comparisons:
        notes.append(_holm_note(evaluated, list(tables)))
    notes += _shared_notes(spec["table"], stats.shared_cells(tables)[spec["table"]])
    if notes:
        out.append("## Notes\n")
        out.append("".join(f"- {n}\n" for n in notes))
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
            line += [number(stats.paper_value(spec, (r["label"], c["name"]), m), m),
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


def reference(c: dict, table: str | None = None) -> str:
    """A comparison named for a reader of ``table``: its label, after its table's name when
    that is another table."""
    return comparison_label(c) if c["table"] == table else f"{c['table']} {comparison_label(c)}"


def verdict_text(c: dict) -> str:
    """A comparison's verdict; for one with another's cells, which one and its verdict there."""
    if c["same_as"] is None:
        return c["verdict"]
    rep = c["same_as"]
    return (f"same cells as {reference(rep, c['table'])} (n={rep['n']}): counted there, "
            f"{rep['verdict']}")


def _comparison_rows(comparisons: list[dict]) -> list[list[str]]:
    rows = []
    for c in comparisons:
        adjusted = c["kind"] == stats.METHOD
        rows.append([comparison_label(c), METRICS[c["metric"]][0],
                     number(c["mean"], c["metric"], True), interval(c), relative(c), str(c["n"]),
                     number(c["paper_delta"], c["metric"], True), percent(c["paper_rel"]),
                     p_value(c["p_holm"] if adjusted else c["p"]),
                     p_value(c["p_paper_holm"] if adjusted else c["p_paper"]), verdict_text(c)])
    return rows


def _comparisons_section(spec: dict, comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    better = spec.get("lower_is_better") or {}
    used = sorted({c["metric"] for c in comparisons}, key=list(METRICS).index)
    sense = "; ".join(f"{METRICS[m][0]}: {'lower' if better[m] else 'higher'} is better"
                      for m in used if m in better)
    out = ["## Comparisons\n",
           "Paired difference a − b over the seeds where both cells finished, with its "
           "95 % Student-t interval (n − 1 degrees of freedom), and relative to the baseline b "
           "(ours: divided by b's mean over those seeds; the paper's: its delta over its b). "
           "p: paired t-tests of a − b = 0 and of a − b = the paper's relative effect times "
           "our baseline. The verdict is explained in the notes."
           + (f" {sense}." if sense else "") + "\n"]
    header = ["a − b", "metric", "ours", "95 % interval", "relative [95 %]", "n", "paper",
              "paper relative"]
    for kind, title, p in ((stats.METHOD, "Claims of the method", "Holm p"),
                           (stats.SANITY, "Sanity checks of the data (not claims of the method)",
                            "p")):
        these = [c for c in comparisons if c["kind"] == kind]
        if these:
            out += [f"### {title}\n",
                    md_table(header + [f"{p} (= 0)", f"{p} (= paper's)", "verdict"],
                             _comparison_rows(these), right={2, 5, 6, 7, 8, 9})]
    return out


def _holm_note(evaluated: dict, names: list[str]) -> str:
    return (f"Verdicts: a claim of the method reads Holm-adjusted p-values at {stats.ALPHA}: of "
            f"a − b = 0 across the {evaluated['method']} distinct method comparisons with n ≥ 2 "
            f"of {', '.join(names)}, and of a − b = the paper's relative effect across the "
            f"{evaluated['sized']} of them where the paper claims an effect. \"same direction "
            f"as the paper\" / \"opposite to the paper\": a − b differs from 0, with / against "
            f"the paper's sign; \"smaller than the paper's\": it differs from the paper's "
            f"relative effect, on the side of 0; \"no effect claimed\": the paper's delta is "
            f"below {100 * stats.NO_EFFECT:.0f} % of its baseline; a comparison of ours (no "
            f"paper delta): \"lower\" / \"higher\". Sanity checks read unadjusted p. "
            f"Comparisons with the same cells (the same stage keys per seed) are one, counted "
            f"where they have the most seeds.")


def _shared_notes(table: str, shared: list[dict]) -> list[str]:
    """Which cells of the table are another cell (the same stage keys per seed)."""
    out = []
    for s in shared:
        other = s["table"] != table
        of = "" if s["seeds"] == s["of"] else f" (of its {seeds(s['of'])})"
        whose = f"{s['table']}'s " if other else ""
        what = (f"reused from {s['table']}, not a new measurement" if other
                else "one measurement shown twice")
        out.append(f"{s['cell'][0]} / {s['cell'][1]} is {whose}{s['same'][0]} / "
                   f"{s['same'][1]} at seeds {seeds(s['seeds'])}{of}: the same stage keys, "
                   f"{what}")
    return out


def _failed_section(by_cell: dict) -> list[str]:
    failed = [r for cell in by_cell.values() for r in cell if r["status"] == "failed"]
    if not failed:
        return []
    return ["## Failed cells\n",
            md_table(["row", "column", "seed", "stage", "error"],
                     [[r["row"], r["column"], str(r["seed"]), r["stage"] or "—", r["error"] or "—"]
                      for r in failed], right={2})]


def _phi_section(records: list[dict]) -> list[str]:
    """Order-free statistics of the φ_META each weighted row used, over its seeds. A per-weight
    correlation between seeds is not shown: each seed trains another network whose hidden units
    do not correspond, so it is about 0 whether or not φ carries knowledge."""
    rows: dict[str, list[dict]] = {}
    for r in records:
        phi = (r.get("extra") or {}).get("phi") if r["status"] == "done" else None
        if phi:
            rows.setdefault(r["row"], []).append(phi)
    if not rows:
        return []

    def spread(phis: list[dict], key: str, fmt: str) -> str:
        values = [p[key] for p in phis if p.get(key) is not None]
        if not values:
            return "—"
        lo, hi = min(values), max(values)
        return format(lo, fmt) if lo == hi else f"{format(lo, fmt)} … {format(hi, fmt)}"

    return ["## φ_META: order-free statistics\n",
            "Per weighted row, over its seeds (lowest … highest): the fraction of φ below 0 (a "
            "negative φ grows its weight), φ's standard deviation and extremes. These do not "
            "depend on how one seed's weights line up with another's; a per-weight correlation "
            "between seeds would (hidden units permute between independently trained networks) "
            "and is not a test of knowledge.\n",
            md_table(["row", "seeds", "fraction φ < 0", "SD of φ", "min φ", "max φ"],
                     [[label, str(len(phis)),
                       spread(phis, "fraction_negative", ".3f"), spread(phis, "std", ".3g"),
                       spread(phis, "min", ".3g"), spread(phis, "max", ".3g")]
                      for label, phis in rows.items()], right={1, 2, 3, 4, 5})]


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


def _planted_section(spec: dict, records: list[dict]) -> list[str]:
    """The planted control's mechanism per row (records' ``extra.planted``, mean over seeds):
    planted / real channels of the first convolution, for the target's weights, the phi it
    applied, and the source stages its row read. Absent where no record has planted channels."""
    rows = []
    for r in spec["rows"]:
        found = [x["extra"]["planted"] for x in records if x["row"] == r["label"]
                 and x["status"] == "done" and "planted" in (x.get("extra") or {})]
        if not found:
            continue

        def mean(stage: str, key: str, found=found) -> str:
            return _g(_mean([f[stage].get(key) for f in found if stage in f]))

        rows.append([r["label"], str(len(found)), mean("target", "weight_ratio"),
                     mean("target", "phi_ratio"), mean("meta", "phi_ratio"),
                     mean("kd", "weight_ratio"), mean("kd", "phi_ratio")])
    if not rows:
        return []
    return ["## The planted channels\n",
            "Per row, over the n seeds (mean), ratios of the planted input channels to the real "
            "RGB channels in the first convolution (docs/benchmark.md, \"Planted knowledge\"): "
            "mean θ² of the target network (1: it uses them like the real ones; << 1: it "
            "ignores them), mean φ the target applied, mean φ_META of the row's meta stage, and "
            "of the row's source kd student mean θ² and the mean of its 1/θ² prior "
            "(phi_source source_weights). A prior with φ ratio >> 1 keeps the planted "
            "channels' weights small.\n",
            md_table(["row", "n", "target θ²", "applied φ", "φ_META", "kd θ²", "kd 1/θ² φ"],
                     rows, right={1, 2, 3, 4, 5, 6})]


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
                             stats.paper_value(spec, (r["label"], c["name"]), m), s["mean"],
                             s["std"], s["n"], s["failed"], ";".join(str(x) for x in s["seeds"])])
    return csv_text(["table", "row", "column", "metric", "paper", "mean", "std", "n", "failed",
                     "seeds"], rows)


def comparisons_csv(spec: dict, records: list[dict], tables: dict | None = None) -> str:
    """One line per comparison: both cells, its kind, n, mean, sd, the interval, the baseline
    and the relative effect with its interval, the paper's delta, baseline and relative effect,
    the raw and Holm-adjusted p-values, the comparison whose cells it has (if any), the verdict
    and the paired seeds."""
    evaluated = stats.evaluate(_tables(spec, records, tables))
    rows = [[c["table"], *c["a"], *c["b"], c["metric"], c["kind"], c["n"], c["mean"], c["sd"],
             c["lo"], c["hi"], c["baseline"], c["rel"], c["rel_lo"], c["rel_hi"],
             c["paper_delta"], c["paper_baseline"], c["paper_rel"], c["p"], c["p_holm"],
             c["p_paper"], c["p_paper_holm"],
             None if c["same_as"] is None else reference(c["same_as"]), c["verdict"],
             ";".join(str(s) for s in c["seeds"])]
            for c in evaluated["tables"][spec["table"]]]
    return csv_text(["table", "a_row", "a_column", "b_row", "b_column", "metric", "kind", "n",
                     "mean", "sd", "lo", "hi", "baseline", "rel", "rel_lo", "rel_hi",
                     "paper_delta", "paper_baseline", "paper_rel", "p", "p_holm", "p_paper",
                     "p_paper_holm", "same_as", "verdict", "seeds"], rows)
