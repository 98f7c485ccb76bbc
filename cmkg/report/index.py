"""The reports folder's ``README.md``: run facts, links to the tables and figures, and what the
comparisons' verdicts say about the paper's claims."""

from __future__ import annotations

from cmkg.console import clock
from cmkg.report import stats
from cmkg.report.format import comparison_label, interval, md_table, number, seeds
from cmkg.report.records import METRICS

GROUPS = ("Reproduced (same direction as the paper)", "Contradicted (opposite to the paper)",
          "Inconclusive (the interval contains 0, or fewer than 2 paired seeds)",
          "No paper delta to compare")


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


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def readme_markdown(tables: dict[str, tuple[dict, list[dict]]], files: dict[str, list[str]],
                    figures: dict[str, str]) -> str:
    """The index: run facts, links, and a summary written from the comparisons' verdicts."""
    out = _run_facts(tables)
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
    out += _claims(tables)
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
    out = ["# Reports: Knowledge as Priors (CVPR 2020), regenerated from result records\n",
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


def _group(verdict: str) -> str:
    if verdict == stats.SAME:
        return GROUPS[0]
    if verdict == stats.OPPOSITE:
        return GROUPS[1]
    return GROUPS[2] if verdict.startswith(stats.INCONCLUSIVE) else GROUPS[3]


def _claims(tables: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """Every comparison of every table, grouped by its verdict, with the counts and a word on
    multiple comparisons."""
    comparisons = [c for spec, records in tables.values()
                   for c in stats.comparisons(spec, stats.cells(spec, records))]
    groups: dict[str, list[str]] = {name: [] for name in GROUPS}
    for c in comparisons:
        iv = "" if c["lo"] is None else f" {interval(c)}"
        paper = "" if c["paper_delta"] is None else \
            f"; paper {number(c['paper_delta'], c['metric'], True)}"
        groups[_group(c["verdict"])].append(
            f"- [{c['table']}]({c['table']}.md) {comparison_label(c)}, "
            f"{METRICS[c['metric']][0]}: ours {number(c['mean'], c['metric'], True)}{iv} "
            f"(n={c['n']}){paper} → {c['verdict']}\n")
    counts = [len(groups[n]) for n in GROUPS]
    out = ["## What this run says about the paper's claims\n",
           f"Of {len(comparisons)} comparisons (paired a − b over seeds, 95 % Student-t "
           f"interval): {_n(counts[0], 'reproduces', 'reproduce')} the paper's direction, "
           f"{_n(counts[1], 'contradicts', 'contradict')} it, "
           f"{_n(counts[2], 'is', 'are')} inconclusive, "
           f"{_n(counts[3], 'has', 'have')} no paper delta.\n"]
    tested = sum(1 for c in comparisons if c["n"] >= 2)
    if tested:
        out.append(f"Read these with the number of comparisons in mind: if no effect were real, "
                   f"about 5 % of the {tested} intervals with n ≥ 2, i.e. "
                   f"{0.05 * tested:.1f}, would still exclude 0 by chance, and comparisons that "
                   f"share a cell are not independent. A verdict is evidence when it is large "
                   f"against its interval and agrees with its neighbours, not on its own.\n")
    for name in GROUPS:
        if groups[name]:
            out.append(f"### {name}\n")
            out.append("".join(groups[name]))
    return out
