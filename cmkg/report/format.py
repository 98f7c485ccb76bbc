"""How the report writes numbers, intervals, Markdown tables and CSV (the same in every file)."""

from __future__ import annotations

import csv
import io

from cmkg.report.records import METRICS


def number(x: float | None, metric: str, signed: bool = False) -> str:
    """A metric's value at its decimals (``METRICS``); "—" for none."""
    if x is None:
        return "—"
    return format(x, f"{'+' if signed else ''}.{METRICS[metric][1]}f")


def ours(s: dict, metric: str) -> str:
    """A cell's summary (``stats.summary``): "mean ± sd (n=.., k failed)", "failed", "not run"."""
    if s["runs"] == 0:
        return "not run"
    if s["n"] == 0:
        return "failed" if s["failed"] == s["runs"] else "—"
    value = number(s["mean"], metric) + (f" ± {number(s['std'], metric)}" if s["n"] >= 2 else "")
    failed = f", {s['failed']} failed" if s["failed"] else ""
    return f"{value} (n={s['n']}{failed})"


def comparison_label(c: dict) -> str:
    """"a − b (column)", "a − b (row)" or "row / column − row / column"."""
    (ar, ac), (br, bc) = c["a"], c["b"]
    if ac == bc:
        return f"{ar} − {br} ({ac})"
    if ar == br:
        return f"{ac} − {bc} ({ar})"
    return f"{ar} / {ac} − {br} / {bc}"


def interval(c: dict) -> str:
    """A comparison's 95 % interval as "[lo, hi]", signed; "—" without one."""
    if c["lo"] is None:
        return "—"
    return f"[{number(c['lo'], c['metric'], True)}, {number(c['hi'], c['metric'], True)}]"


def percent(x: float | None) -> str:
    """A relative effect as a signed percentage ("-1.3 %"); "—" for none."""
    return "—" if x is None else f"{100.0 * x:+.1f} %"


def relative(c: dict) -> str:
    """A comparison's relative effect with its interval, "-1.3 % [-6.1, +3.4]"; "—" without."""
    if c["rel"] is None:
        return "—"
    if c["rel_lo"] is None:
        return percent(c["rel"])
    return f"{percent(c['rel'])} [{100.0 * c['rel_lo']:+.1f}, {100.0 * c['rel_hi']:+.1f}]"


def p_value(p: float | None) -> str:
    """A p-value at three decimals, in scientific notation below 0.001; "—" for none."""
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def seeds(found) -> str:
    return ", ".join(str(s) for s in found) if found else "—"


def seed_text(found) -> str:
    """Seeds as the notes write them: ``0-4``, ``5-9``, ``0, 2, 7-8``."""
    runs: list[list[int]] = []
    for s in sorted(found):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "—"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A Markdown table, its cells' pipes escaped; the columns in ``right`` right-aligned."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_md(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV with "\\n" line ends, None as an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if x is None else x for x in row] for row in rows])
    return buf.getvalue()
