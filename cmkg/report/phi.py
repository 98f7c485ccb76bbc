"""The phi diagnostics' files, ``phi.md`` and ``phi.csv``, from their records
(``results/phi.json``, written by ``cmkg phi``: ``cmkg.ablation.phi``) and nothing else.

``phi.md`` opens with one reading per diagnostic, computed from the numbers
(``readings``), then the per-seed table of every comparison against its permutation null, the
order-free statistics of every variant's phi and the failed seeds; ``phi.csv`` holds the same
comparisons per seed and per tensor. How to read them: docs/phi-diagnostics.md. The report's
index (``README.md``) shows the readings too (``index_section``) where the folder holds
``results/phi.json``; ``artifacts`` lists what the records name, for ``cmkg runs gc``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmkg.atomic import atomic_path
from cmkg.errors import DataError
from cmkg.report.format import csv_text, md_table, p_value, seeds

KIND, VERSION = "cmkg.phi", 1  # what results/phi.json says it is
ALPHA = 0.05  # a comparison is told from its null at two-sided permutation p < ALPHA
GAP_SDS = 3.0  # teacher-free agrees "less" than a rerun when below it by this many null SDs
# comparison -> (label, what is compared)
COMPARISONS = {
    "order": ("split-half, data order", "φ(full) vs φ(order)"),
    "halves": ("split-half, disjoint halves", "φ(half0) vs φ(half1)"),
    "teacher": ("teacher-free vs full", "φ(full) vs φ(no_teacher)"),
    "abs_theta": ("φ vs |θ|", "φ(full) vs |θ| of the student before the meta stage"),
    "squared_change": ("φ vs Δθ²", "φ(full) vs (θ_meta − θ_student)², θ_meta: the meta "
                       "stage's published weights"),
    "fisher": ("φ vs Fisher", "φ(full) vs the Fisher diagonal of L_REG at the student's "
               "weights"),
}
VARIANTS = ("full", "order", "half0", "half1", "no_teacher")  # the order the files list them
ORDER_FREE = (("count", "weights", "d"), ("fraction_negative", "fraction φ < 0", ".3f"),
              ("fraction_zero", "fraction φ = 0", ".3f"),
              ("mean", "mean φ", ".3g"), ("std", "SD φ", ".3g"), ("abs_p10", "|φ| p10", ".3g"),
              ("abs_p50", "|φ| p50", ".3g"), ("abs_p90", "|φ| p90", ".3g"),
              ("abs_p99", "|φ| p99", ".3g"))


def read_phi(results_dir: str | Path) -> dict:
    """The records of ``results_dir/phi.json``, checked for what the files read."""
    path = Path(results_dir) / "phi.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable phi record file ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("version") != VERSION:
        raise DataError(f"{path}: not a phi record file (kind {KIND!r}, version {VERSION})")
    for r in doc.get("records") or []:
        if r.get("status") == "done" and set(r.get("comparisons") or {}) != set(COMPARISONS):
            raise DataError(f"{path}: seed {r.get('seed')}: expected the comparisons "
                            f"{list(COMPARISONS)}")
    return doc


def render_phi(results_dir: str | Path, out_dir: str | Path, doc: dict | None = None) -> list[Path]:
    """Write ``out_dir/phi.md`` and ``phi.csv`` from ``results_dir/phi.json`` (``doc``: its
    records already read by ``read_phi``); the same records give the same bytes."""
    doc = read_phi(results_dir) if doc is None else doc
    written = []
    for name, text in (("phi.md", phi_markdown(doc)), ("phi.csv", phi_csv(doc))):
        path = Path(out_dir) / name
        with atomic_path(path) as tmp:
            tmp.write_bytes(text.encode("utf-8"))
        written.append(path)
    return written


# ---------------------------------------------------------------- readings

def told(c: dict) -> str:
    """One comparison against its null: "above", "below" or "null" (not told apart)."""
    if c.get("rho") is None or c.get("p") is None or c["p"] >= ALPHA:
        return "null"
    return "above" if c["rho"] > c["null_mean"] else "below"


TOLD = {"above": "above the null", "below": "below the null",
        "null": "not distinguishable from the null"}


def _rho(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _rho(lo) if lo == hi else f"{_rho(lo)} … {_rho(hi)}"


def _sd(x: float) -> str:
    return f"{x:.2g}"


def _null(cs: list[dict]) -> str:
    """The nulls of some comparisons: the largest |mean| and the largest SD."""
    mean = max((c["null_mean"] for c in cs), key=abs)
    return f"null {_rho(mean)} ± {_sd(max(c['null_sd'] for c in cs))}"


def _variants(doc: dict) -> list[tuple[str, str]]:
    """(variant, what it is), in ``VARIANTS``' order (the records' JSON sorts its keys)."""
    found = doc.get("variants") or {}
    return [(v, found[v]) for v in sorted(found, key=lambda v: (
        VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), v))]


def _seeds(n: int) -> str:
    return "the one seed" if n == 1 else "both seeds" if n == 2 else f"all {n} seeds"


def _counted(cs: list[dict]) -> str:
    n = len(cs)
    by = {k: sum(told(c) == k for c in cs) for k in TOLD}
    for k, v in by.items():
        if v == n:
            return f"{TOLD[k]} in {_seeds(n)}"
    return ", ".join(f"{TOLD[k]} in {v} of {n} seeds" for k, v in by.items() if v)


def _reading(name: str, cs: list[dict]) -> str:
    """A comparison over the seeds: how many above the null, rho's range against the nulls."""
    valid = [c for c in cs if c.get("rho") is not None]
    if not valid:
        return "no tensor where both sides vary"
    return f"{_counted(valid)}: ρ {_span([c['rho'] for c in valid])} vs {_null(valid)}"


def teacher_reading(pairs: list[tuple[dict, dict]]) -> str:
    """Teacher-free vs full, per seed against the rerun with another order (the reliability):
    "less" where rho(full, no_teacher) < rho(full, order) - GAP_SDS null SDs, "as much" where
    not, "cannot tell" where the rerun itself is not above its null."""
    verdicts = []
    for teacher, order in pairs:
        if told(order) != "above" or teacher.get("rho") is None:
            verdicts.append("cannot tell")
        elif teacher["rho"] < order["rho"] - GAP_SDS * max(teacher["null_sd"], order["null_sd"]):
            verdicts.append("less")
        else:
            verdicts.append("as much")
    n = len(pairs)
    order = [o["rho"] for _, o in pairs if o.get("rho") is not None]
    rhos = f"against a rerun with another order (ρ {_span(order) if order else '—'})"
    if verdicts.count("cannot tell") == n:
        return (f"{rhos}: cannot tell, φ does not repeat under another data order, so there "
                "is no per-weight pattern whose source could be the teacher")
    parts = [f"{verdicts.count(v)} of {n}" + f" seed{'s' * (n > 1)} {text}" for v, text in (
        ("less", "the teacher-free φ agrees with the full φ less than a rerun with another "
                 "order does: the teacher's terms shape φ's per-weight pattern"),
        ("as much", "it agrees at least as much: removing the teacher changes φ no more than "
                    "reshuffling the data, no sign of cross-modal knowledge in φ"),
        ("cannot tell", "cannot tell: φ does not repeat under another order"))
        if verdicts.count(v)]
    return f"{rhos}: in " + "; in ".join(parts)


def readings(doc: dict) -> list[tuple[str, str]]:
    """(label, reading) per diagnostic over the measured seeds, computed from the records."""
    done = [r for r in doc.get("records") or [] if r.get("status") == "done"]
    if not done:
        return []
    out = []
    for name, (label, _) in COMPARISONS.items():
        cs = [r["comparisons"][name] for r in done]
        if name == "teacher":
            text = (_reading(name, cs) + "; "
                    + teacher_reading([(r["comparisons"]["teacher"], r["comparisons"]["order"])
                                       for r in done]))
        else:
            text = _reading(name, cs)
        out.append((label, text))
    return out


def reading_list(doc: dict) -> str:
    """``readings`` as the Markdown list ``phi.md`` and the report's index show ("" when no
    seed was measured)."""
    return "".join(f"- **{label}**: {text}.\n" for label, text in readings(doc))


def index_section(doc: dict) -> list[str]:
    """The report index's section on the diagnostics (``cmkg.report.index``): what was run,
    the readings of ``phi.md`` and links to ``phi.md`` and ``phi.csv``."""
    records = doc.get("records") or []
    failed = [r for r in records if r.get("status") != "done"]
    out = ["## φ diagnostics\n",
           "Does φ_META carry per-weight signal, and is it the teacher's? Per seed, Table 2's "
           "meta stage against variants of it (another data order, disjoint halves of the data, "
           f"no teacher), each comparison against its permutation null. Preset "
           f"`{doc.get('preset', '—')}`; seeds {seeds(doc.get('seeds'))}; "
           f"{len(records) - len(failed)} measured, {len(failed)} failed. Details: "
           "[phi.md](phi.md), per tensor: [phi.csv](phi.csv); how to read them: "
           "`docs/phi-diagnostics.md`.\n"]
    if lines := reading_list(doc):
        out.append(lines)
    return out


def artifacts(doc: dict) -> list[tuple[int, str, str, str]]:
    """(seed, variant or "student", stage, key) of every artifact the records name: each
    measured seed's ``artifacts`` holds the variants' meta stages (named as in ``variants``)
    and the student they start from (``cmkg runs gc`` keeps them). A name that is neither is a
    ``ValueError``."""
    out = []
    variants = set(doc.get("variants") or VARIANTS)
    for r in doc.get("records") or []:
        named = r.get("artifacts") or {}
        if not isinstance(named, dict):
            raise ValueError(f"seed {r.get('seed')}: artifacts is not a JSON object")
        for name, key in sorted(named.items()):
            if name != "student" and name not in variants:
                raise ValueError(f"seed {r.get('seed')}: artifact {name!r} is neither a "
                                 f"variant ({', '.join(sorted(variants))}) nor the student")
            if key:
                out.append((r.get("seed"), name, "student" if name == "student" else "meta",
                            str(key)))
    return out


# ---------------------------------------------------------------- files

def phi_markdown(doc: dict) -> str:
    records = doc.get("records") or []
    done = [r for r in records if r.get("status") == "done"]
    k = doc.get("permutations")
    out = ["# φ_META diagnostics\n",
           f"Preset `{doc.get('preset', '—')}`; seeds {seeds(doc.get('seeds'))}; K = {k} "
           f"permutations per comparison; Fisher diagonal over {doc.get('fisher_batches')} "
           "fixed training batches. Written by `cmkg phi`; how to read it: "
           "docs/phi-diagnostics.md.\n",
           "Per seed, five meta stages of the same student and teacher:\n",
           "".join(f"- `{v}`: {d}\n" for v, d in _variants(doc))]
    if lines := reading_list(doc):
        out.append("## Reading\n")
        out.append(lines)
    if done:
        out.append("## Per-weight agreement within one network\n")
        out.append("ρ: Spearman's rank correlation per regularised tensor, averaged over the "
                   "tensors weighted by their sizes; null: the same average when one side is "
                   f"permuted within each tensor (K times: mean ± SD, 95th percentile); "
                   "z = (ρ − null mean) / null SD; p: two-sided permutation p (at least "
                   f"1/(K+1)); told from the null at p < {ALPHA}. Only the weights L_REG "
                   "reaches are compared (a Fisher diagonal above 0): the others never move, "
                   "keep their starting φ in every run and would count as agreement.\n")
        rows = []
        for name, (label, _) in COMPARISONS.items():
            for r in done:
                c = r["comparisons"][name]
                rows.append([label, str(r["seed"]), _rho(c["rho"]),
                             "—" if c["rho"] is None else f"{_rho(c['null_mean'])} ± "
                             f"{_sd(c['null_sd'])}",
                             "—" if c["null_p95"] is None else f"{c['null_p95']:+.2g}",
                             "—" if c["z"] is None else f"{c['z']:.1f}",
                             p_value(c["p"]),
                             f"{c['weights']} of {c['weights'] + c.get('excluded', 0)}",
                             f"{c['tensors']} ({len(c['skipped'])} constant)", TOLD[told(c)]])
        out.append(md_table(["comparison", "seed", "ρ", "null mean ± SD", "null p95", "z", "p",
                             "weights", "tensors", "reading"], rows,
                            right={1, 2, 3, 4, 5, 6, 7}))
        out.append("What each compares: " + "; ".join(
            f"{label}: {what}" for label, what in COMPARISONS.values()) + ".\n")
        out.append("## Order-free statistics of φ\n")
        out.append("These do not depend on which weight is which, so they compare across seeds "
                   "(the per-weight correlation across seeds does not: different seeds train "
                   "different networks whose hidden units do not correspond).\n")
        of_rows = [[v, str(r["seed"]), *("—" if s.get(key) is None else format(s[key], fmt)
                                         for key, _, fmt in ORDER_FREE)]
                   for v, _ in _variants(doc) for r in done
                   for s in [r["order_free"][v]]]
        out.append(md_table(["variant", "seed", *(h for _, h, _ in ORDER_FREE)], of_rows,
                            right=set(range(1, 2 + len(ORDER_FREE)))))
    failed = [r for r in records if r.get("status") != "done"]
    if failed:
        out.append("## Seeds not measured\n")
        out.append("".join(f"- seed {r['seed']}: {r.get('error') or 'failed'}\n" for r in failed))
    return "\n".join(out)


CSV_FIELDS = ("rho", "null_mean", "null_sd", "null_p95", "z", "p")


def phi_csv(doc: dict) -> str:
    """Per seed and comparison: the summary ("all", with the weights left out as out of L_REG's
    reach) and every tensor."""
    rows = []
    for r in doc.get("records") or []:
        if r.get("status") != "done":
            continue
        for name in COMPARISONS:
            c = r["comparisons"][name]
            rows.append([r["seed"], name, "all", c["weights"], c.get("excluded"),
                         *(c[f] for f in CSV_FIELDS), told(c)])
            rows += [[r["seed"], name, t["name"], t["n"], None, *(t[f] for f in CSV_FIELDS),
                      told(t)] for t in c["per_tensor"]]
    return csv_text(["seed", "comparison", "tensor", "weights", "excluded", *CSV_FIELDS,
                     "reading"], rows)
