"""The reports folder's ``README.md``: what the comparisons' verdicts say about the paper's
claims (first: which hold, which are refuted and at what size, which this benchmark cannot
tell), then run facts, links to the tables and figures, the φ diagnostics' readings (where the
folder holds ``results/phi.json``), the datasets' contact sheets, and notes."""

from __future__ import annotations

from pathlib import Path

from cmkg.console import clock
from cmkg.report import benchmark, stats
from cmkg.report.format import (
    comparison_label,
    interval,
    md_table,
    number,
    p_value,
    percent,
    relative,
    seeds,
)
from cmkg.report.phi import index_section
from cmkg.report.records import METRICS
from cmkg.report.tables import verdict_text

TITLE = "# Reports: Knowledge as Priors (CVPR 2020), regenerated from result records\n"
# the index's groups of comparisons, in its order: (key, heading)
GROUPS = (("hold", "Hold: same direction as the paper"),
          ("refuted", "Refuted: opposite to the paper, or smaller than the paper's"),
          ("cannot", "This benchmark cannot tell"),
          ("no_effect", "No effect claimed by the paper"),
          ("ours", "Comparisons of ours (no paper delta)"),
          ("sanity", "Sanity checks of the data (not claims of the method)"),
          ("twice", "Shown twice: the same cells as a comparison above (not a new confirmation)"))


def _stage_runs(records: list[dict]) -> dict[tuple[str, str], float]:
    """Seconds per distinct (stage, artifact key): a stage shared by many cells counts once
    (the largest time any record gives it; a cached stage reports 0 in its cell's wall_s)."""
    runs: dict[tuple[str, str], float] = {}
    for r in records:
        walls = r["stage_walls"]
        for stage, key in sorted(r["artifacts"].items()):
            seconds = walls.get(stage)
            runs[(stage, key)] = max(runs.get((stage, key), 0.0), float(seconds or 0.0))
        if r["stage"] and r["key"]:
            own = r["wall_s"] or 0.0
            runs[(r["stage"], r["key"])] = max(runs.get((r["stage"], r["key"]), 0.0), own)
    return runs


def _counted(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v or "unknown"] = counts.get(v or "unknown", 0) + 1
    return ", ".join(f"`{v}` ({n} cells)" for v, n in sorted(counts.items())) or "—"


def sheets_present(tables: dict[str, tuple[dict, list[dict]]], folder: str | Path) -> list[dict]:
    """The contact sheets the specs name (``data_sheets``: one per dataset, written by the
    runner into ``{report}/data/``) that ``folder`` holds, each once, with the tables that read
    it: [{name, role, split, file, tables}]. Records written before sheets name none."""
    out: dict[str, dict] = {}
    for name, (spec, _) in tables.items():
        for s in spec.get("data_sheets") or []:
            if not (Path(folder) / s["file"]).is_file():
                continue
            out.setdefault(s["file"], {**s, "tables": []})["tables"].append(name)
    return list(out.values())


def _sheets_section(sheets: list[dict]) -> list[str]:
    if not sheets:
        return []
    lines = "".join(
        f"- [{s['name']}]({s['file']}): {s['role']}, "
        f"{'the ' + s['split'] + ' split' if s.get('split') else 'every split'}; read by "
        f"{', '.join(s['tables'])}\n" for s in sheets)
    return ["## Data\n",
            "A contact sheet per dataset the cells read (16 samples each: RGB, depth as the "
            "teacher sees it, the 2D joints over the RGB; `cmkg data show`).\n", lines]


def readme_markdown(tables: dict[str, tuple[dict, list[dict]]], files: dict[str, list[str]],
                    figures: dict[str, str], sheets: list[dict] | None = None,
                    phi: dict | None = None) -> str:
    """The index: the claims summary written from the comparisons' verdicts, run facts, links
    (tables, figures, the contact sheets present: ``sheets_present``; none, no section), the φ
    diagnostics' readings and a link to ``phi.md`` (``phi``: the records of
    ``results/phi.json``, ``cmkg.report.phi.index_section``; None, no section) and notes."""
    evaluated = stats.evaluate(tables)
    out = [TITLE] + _claims(evaluated)
    if bench := benchmark.section(tables):  # tables whose file declares its benchmark cells
        out.append("\n".join(bench) + "\n")
    out += _run_facts(tables)
    out.append("## Tables\n")
    rows = []
    for name, (spec, records) in tables.items():
        bad = sum(r["status"] == "failed" for r in records)
        links = " · ".join(f"[{f}]({f})" for f in files[name])
        rows.append([spec.get("title") or name, spec.get("regenerates") or "—", links,
                     f"{len(records) - bad} done, {bad} failed"])
    out.append(md_table(["table", "regenerates", "files", "cells"], rows))
    out.append("## Figures\n")
    out.append("".join(f"- [{f}]({f}): {what}\n" for f, what in figures.items())
               or "No figure: no table's spec names one (its ablation file's figures).\n")
    if phi is not None:
        out += index_section(phi)
    out += _sheets_section(sheets or [])
    notes = [(spec.get("title") or spec["table"], spec["notes"]) for spec, _ in tables.values()
             if spec.get("notes")]
    if notes:
        out.append("## Notes\n")
        for title, lines in notes:
            out.append(f"### {title}\n\n" + "".join(f"- {n}\n" for n in lines))
    return "\n".join(out)


def _run_facts(tables: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """Title, presets, seeds, cells, code versions, devices, training time and data sets."""
    everything = [r for _, records in tables.values() for r in records]
    specs = [spec for spec, _ in tables.values()]
    presets = sorted({s.get("preset") for s in specs if s.get("preset")}
                     | {r["preset"] for r in everything if r["preset"]})
    found = sorted({s for spec in specs for s in spec.get("seeds") or []}
                   | {r["seed"] for r in everything})
    failed = sum(r["status"] == "failed" for r in everything)
    runs = _stage_runs(everything)
    total = sum(runs.values())
    out = ["## Run\n",
           "Written by `cmkg.report.render_reports` from the stored result records only; "
           "do not edit by hand.\n",
           f"- Preset: {', '.join(f'`{p}`' for p in presets) or '—'}\n"
           f"- Seeds: {seeds(found)}\n"
           f"- Cells: {len(everything) - failed} done, {failed} failed\n"
           f"- Code versions: {_counted(r['code_version'] for r in everything)}\n"
           f"- Devices: {_counted(r['device'] for r in everything)}\n"
           f"- Training time: {total:.1f} s ({clock(total)}) over {len(runs)} distinct stage runs "
           "(a stage shared by several cells counted once)\n"]
    data = [f"- {spec['table']}: {spec['data']}\n" for spec in specs if spec.get("data")]
    if data:
        out.append("Data:\n\n" + "".join(data))
    by_stage: dict[str, list[float]] = {}
    for (stage, _), seconds in sorted(runs.items()):
        by_stage.setdefault(stage, []).append(seconds)
    if by_stage:
        out.append(md_table(["stage", "runs", "seconds"],
                            [[s, str(len(v)), f"{sum(v):.1f}"] for s, v in by_stage.items()],
                            right={1, 2}))
    return out


def group(c: dict) -> str:
    """Where the index lists a comparison (a key of ``GROUPS``)."""
    if c["same_as"] is not None:
        return "twice"
    if c["kind"] == stats.SANITY:
        return "sanity"
    if c["paper_delta"] is None:
        return "ours"
    if c["no_effect"]:
        return "no_effect"
    if c["verdict"] == stats.SAME:
        return "hold"
    return "refuted" if c["verdict"] in (stats.OPPOSITE, stats.SMALLER) else "cannot"


def _counts(comparisons: list[dict]) -> str:
    """"2 same direction as the paper, 1 inconclusive": verdicts and how often, most first
    ("all ..." when they agree, the verdict alone for one)."""
    counts: dict[str, int] = {}
    for c in comparisons:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    if len(counts) == 1:
        return f"all {next(iter(counts))}" if len(comparisons) > 1 else next(iter(counts))
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))


def summary_line(evaluated: dict) -> str:
    """The index's first line: how many of the paper's method claims hold, are refuted (and
    how) and cannot be told here, and what the sanity checks of the data say."""
    groups = {key: [] for key, _ in GROUPS}
    for c in (c for cs in evaluated["tables"].values() for c in cs):
        groups[group(c)].append(c)
    hold, refuted, cannot = (len(groups[k]) for k in ("hold", "refuted", "cannot"))
    claims = hold + refuted + cannot
    sanity = groups["sanity"]
    checks = (f"sanity checks of the data: {len(sanity)}, {_counts(sanity)}" if sanity
              else "no sanity check of the data")
    if not claims:
        return f"No method claim of the paper is tested in these records; {checks}."
    # "smaller than the paper's" includes effects that differ from 0 in the paper's direction
    along = sum(c["verdict"] == stats.SMALLER and c["p_holm"] is not None
                and c["p_holm"] < stats.ALPHA and (c["mean"] > 0) == (c["paper_delta"] > 0)
                for c in groups["refuted"])
    how = "" if not refuted else (
        f" ({_counts(groups['refuted'])}"
        + (f"; {along} of {'it' if refuted == 1 else 'them'} in the paper's direction"
           if along else "") + ")")
    line = (f"Of {claims} method {'claim' if claims == 1 else 'claims'} of the paper tested "
            f"here: {hold} {'holds' if hold == 1 else 'hold'}, {refuted} "
            f"{'is' if refuted == 1 else 'are'} refuted{how}, {cannot} this benchmark cannot "
            f"tell; {checks}.")
    return ("No method claim of the paper is reproduced in this run. " + line) if not hold \
        else line


def _item(c: dict) -> str:
    iv = "" if c["lo"] is None else f" {interval(c)}"
    rel = "" if c["rel"] is None else \
        f", {relative(c)} of {number(c['baseline'], c['metric'])}"
    paper = "" if c["paper_delta"] is None else (
        f"; paper {number(c['paper_delta'], c['metric'], True)}"
        + ("" if c["paper_rel"] is None else
           f" ({percent(c['paper_rel'])} of {number(c['paper_baseline'], c['metric'])})"))
    method = c["kind"] == stats.METHOD
    tests = [(c["p_holm"] if method else c["p"], "= 0"),
             (c["p_paper_holm"] if method else c["p_paper"], "= paper's")]
    tests = [f"{p_value(p)} ({null})" for p, null in tests if p is not None]
    p = "" if c["same_as"] is not None or not tests else \
        f"; {'Holm p' if method else 'p'} {', '.join(tests)}"
    return (f"- [{c['table']}]({c['table']}.md) {comparison_label(c)}, "
            f"{METRICS[c['metric']][0]}: ours {number(c['mean'], c['metric'], True)}{iv} "
            f"(n={c['n']}){rel}{paper}{p} → {verdict_text(c)}\n")


def _claims(evaluated: dict) -> list[str]:
    """The opening: the summary line, how to read it, and every comparison of every table in
    its group."""
    comparisons = [c for cs in evaluated["tables"].values() for c in cs]
    groups: dict[str, list[str]] = {key: [] for key, _ in GROUPS}
    for c in comparisons:
        groups[group(c)].append(_item(c))
    distinct = sum(c["same_as"] is None for c in comparisons)
    out = [summary_line(evaluated) + "\n",
           f"A method claim is a paired comparison a − b of two cells on one metric (mean over "
           f"the seeds both finished, 95 % Student-t interval, and relative to b's mean) where "
           f"the paper's delta is at least {100 * stats.NO_EFFECT:.0f} % of its baseline value. "
           f"Comparisons with the same cells (the same stage keys per seed) count once: "
           f"{distinct} distinct of {len(comparisons)} in the tables. A claim holds where "
           f"a − b differs from 0 with the paper's sign, and is refuted where it differs "
           f"against it, or differs from the paper's relative effect on the side of 0 "
           f"(\"smaller than the paper's\"), each on Holm-adjusted p at {stats.ALPHA} across "
           f"the {evaluated['method']} distinct method comparisons (a − b = 0) and the "
           f"{evaluated['sized']} of them where the paper claims an effect (a − b = the "
           f"paper's relative effect); sanity checks read unadjusted p. How to read it: "
           f"`docs/statistics.md`.\n",
           "## The paper's claims in this run\n"]
    for key, title in GROUPS:
        if groups[key] or key in ("hold", "refuted", "cannot"):
            out.append(f"### {title} ({len(groups[key])})\n")
            out.append("".join(groups[key]) or "None.\n")
    return out
