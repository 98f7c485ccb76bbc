"""The wall-time simulator against a measured run: replay an ablation run that finished.

Plans the ablation as the runner does (the first round, then the chosen values), takes the
stages the run trained (those whose ``meta.json`` ``started`` is at or after ``--since``; the
older ones were cached when it began) with their measured ``duration_s``, and prints, on
``--slots`` one-stage slots, the wall ``cmkg.ablation.schedule`` predicts under the runner's
order and under critical-path-first, the lower bound max(critical path, stage time / slots),
and the measured wall (the runner's closing line) beside them as a ratio.

    python bench/predict_wall.py ablations/positive.yaml --config cpu --store STORE \\
        --set data.root=DATA --since 2026-12-07T08:28 --measured 1h19m --slots 2
"""

import argparse
import re

from cmkg import ablation, stages
from cmkg.ablation import schedule
from cmkg.ablation.cells import decisions, expand, first_round, needed, union
from cmkg.ablation.spec import at_preset, load
from cmkg.console import duration


def seconds(text: str) -> float:
    """``1h19m``, ``4m53s``, ``95`` -> seconds."""
    if re.fullmatch(r"[0-9.]+", text):
        return float(text)
    parts = re.findall(r"([0-9.]+)([hms])", text)
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("ablation")
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--store", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--since", required=True, help="ISO time the measured run started")
    ap.add_argument("--measured", required=True, help="its wall time (1h19m or seconds)")
    ap.add_argument("--slots", type=int, default=2)
    args = ap.parse_args()
    ab = at_preset(load(args.ablation), ablation.preset_of(args.config))
    cells = expand(ab, args.config, [f"run.store={args.store}", *args.sets], None, None)
    store = stages.Store.of(cells[0].cfg)
    found = {n.id: store.get(n.stage, n.key) for n in union(cells)}
    done = {i: a for i, a in found.items() if a is not None}
    kept = needed(ab, cells, decisions(ab, cells, done))
    rounds, seen = [], set()
    for r in (union(first_round(ab, kept)), union(kept)):
        jobs = []
        for n in r:
            art = found.get(n.id)
            if n.id in seen or art is None or art.meta.get("started", "") < args.since:
                continue
            seen.add(n.id)
            jobs.append(schedule.Job(n.id, n.stage, float(art.meta["duration_s"]),
                                     tuple(n.inputs.items())))
        rounds.append(jobs)
    every = [j for r in rounds for j in r]
    measured = seconds(args.measured)
    (p,) = schedule.predictions(rounds, [args.slots])
    print(f"{ab.table}: {len(every)} stages trained since {args.since}, "
          f"{duration(sum(j.duration for j in every))} of stage time, {args.slots} slots")
    for name in ("submission", "critical", "bound"):
        print(f"  {name:10s} predicted {duration(p[name]):>7s}   measured {duration(measured)}"
              f"   measured / predicted {measured / p[name]:.3f}")


if __name__ == "__main__":
    main()
