"""The runner: what to train for a set of ablation files, trained by the Ray layer
(``cmkg.cluster.ablate.execute``), then the records and the report; and its dry run.

With choice seeds (``cells.seed_plan``) a run has two rounds: first every cell whose value is
known and the ``choose`` rows' cells on the choice seeds; then, the rows' values chosen on
those, the chosen values' cells on the report seeds (the other values' are never trained)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np

from cmkg import report, stages, tracking
from cmkg.ablation import schedule
from cmkg.ablation.cells import (
    Cell,
    choose,
    chosen_later,
    decisions,
    expand,
    first_round,
    needed,
    preset_of,
    record_choice,
    seed_text,
    tuned_choice,
    union,
    value_text,
    work,
)
from cmkg.ablation.results import data_sheets, record, table_spec, write_sheets
from cmkg.ablation.spec import Ablation, at_preset, load
from cmkg.console import duration, say
from cmkg.errors import DataError, UserError


def status_line(cells: list[Cell], nodes: list[stages.Node], cached: set) -> str:
    """ "12 cells: 9 done, 3 to run; 21 stages: 17 cached, 4 to train" """
    done = sum(all(n.id in cached for n in c.nodes) for c in cells)
    n_cached = sum(n.id in cached for n in nodes)
    return (f"{len(cells)} cells: {done} done, {len(cells) - done} to run; "
            f"{len(nodes)} stages: {n_cached} cached, {len(nodes) - n_cached} to train")


def dry_run(abs_cells: list[tuple[Ablation, list[Cell]]], store: stages.Store,
            predict: list[int] | None = None) -> str:
    """The cells, the unique stages they need, which are cached and which would be trained,
    and the estimated work; with ``predict`` (slot counts), the predicted wall time on that
    many one-stage slots (``prediction``); trains nothing."""
    lines = []
    everything = [c for _, cells in abs_cells for c in cells]
    found = {n.id: store.get(n.stage, n.key) for n in union(everything)}
    cached = {i for i, art in found.items() if art is not None}
    done = {i: art for i, art in found.items() if art is not None}
    # with choice seeds: the report cells of the values chosen where the choice is cached, of
    # every value where it is still to be made
    chosen = {ab.table: decisions(ab, cells, done) for ab, cells in abs_cells}
    later = {ab.table: chosen_later(ab, cells) for ab, cells in abs_cells}
    abs_cells = [(ab, needed(ab, cells, chosen[ab.table])) for ab, cells in abs_cells]
    all_cells = [c for _, cells in abs_cells for c in cells]
    nodes = union(all_cells)
    for ab, cells in abs_cells:
        report = {c.seed for c in cells if not c.choosing}
        choice = {c.seed for c in cells if c.choosing}
        lines.append(f"{ab.table} ({ab.path}): {len(ab.rows)} rows x {len(ab.columns)} columns "
                     f"x {len(report)} seeds"
                     + (f" ({seed_text(report)}; choices on seeds {seed_text(choice)})"
                        if choice else ""))
        for c in cells:
            mark = "done" if all(n.id in cached for n in c.nodes) else "to run"
            row = c.row if c.candidate is None else f"{c.row} [{value_text(c.candidate)}]"
            if c.choosing:
                mark += ", chooses"
            elif (c.row, c.column) in later[ab.table] - set(chosen[ab.table]):
                mark += " if chosen"
            lines.append(f"  {row!r:28s} {c.column:12s} seed {c.seed}  "
                         f"{c.node.stage} {c.node.key[:12]}  {mark}")
    listing, estimate = stage_listing(nodes, found)
    lines += ["stages:", *listing, status_line(all_cells, nodes, cached), *estimate]
    # the report cells of a choice still to be made are listed for every value, but only the
    # chosen one trains: the work once one value per row, column and seed is left
    one, kept = set(), []
    for ab, cells in abs_cells:
        pending = later[ab.table] - set(chosen[ab.table])
        for c in cells:
            if not c.choosing and (c.row, c.column) in pending:
                if (ab.table, c.row, c.column, c.seed) in one:
                    continue
                one.add((ab.table, c.row, c.column, c.seed))
            kept.append(c)
    if len(kept) < len(all_cells) and estimate:
        _, after = stage_listing(union(kept), found)
        lines.append("of which trained once the choices are made (one value per choose row, "
                     "column and report seed): " + (after[0][len("to train: "):] if after
                                                     else "nothing"))
    if predict:
        first = [c for ab, cells in abs_cells for c in first_round(ab, cells)]
        lines += prediction([union(first), union(kept)], found, predict, union(everything))
    return "\n".join(lines)


def prediction(rounds: list[list[stages.Node]], found: dict, slots: list[int],
               planned: list[stages.Node]) -> list[str]:
    """A dry run's prediction lines: the wall time of the stages to train (``rounds``: the
    first round's nodes, then every node of the run, whose new ones are the second round's,
    trained after the choices) on each count of ``slots``, under the runner's order and
    critical-path first, beside the lower bound; the critical path; the stage time per kind.
    Finished stages in ``found`` give their measured seconds and the per-kind rates
    (``schedule``; ``planned``: every node ``found`` holds, for their work); the same
    prediction from scratch (every stage trained again) follows."""
    work_of = {n.id: work(n) for n in planned}
    rate = schedule.rates(found, work_of)
    if not rate:
        return ["predicted wall: no finished stage in the store to estimate a rate from"]
    out = []
    for title, scratch in (("the stages to train", False), ("from scratch", True)):
        seen, jobs_of = set(), []
        for r in rounds:
            jobs = []
            for n in r:
                if n.id in seen or (not scratch and found.get(n.id) is not None):
                    continue
                seen.add(n.id)
                art = found.get(n.id)
                dur = (art.meta.get("duration_s") if art is not None else None) or \
                    schedule.estimate(n.stage, work_of[n.id], rate)
                jobs.append(schedule.Job(n.id, n.stage, float(dur), tuple(n.inputs.items())))
            jobs_of.append(jobs)
        every = [j for r in jobs_of for j in r]
        if not every:
            out.append(f"predicted wall ({title}): nothing to train")
            continue
        total = duration(sum(j.duration for j in every))
        out.append(f"predicted wall ({title}; {len(every)} stages, {total} of stage time; the "
                   "second round, the chosen values, after the first):")
        out.append("  slots  runner order  critical path first  lower bound")
        for p in schedule.predictions(jobs_of, slots):
            out.append(f"  {p['slots']:5d}  {duration(p['submission']):>12s}  "
                       f"{duration(p['critical']):>19s}  {duration(p['bound']):>11s}")
        length, path = schedule.critical_path(every)
        out.append(f"  critical path {duration(length)}: "
                   + " -> ".join(f"{j.kind} {duration(j.duration)}" for j in path))
        kinds: dict[str, list[float]] = {}
        for j in every:
            kinds.setdefault(j.kind, []).append(j.duration)
        out.append("  stage time per kind: " + ", ".join(
            f"{k} {len(v)} x {duration(float(np.mean(v)))}" for k, v in kinds.items()))
    return out


def stage_listing(nodes: list[stages.Node], found: dict) -> tuple[list[str], list[str]]:
    """A dry run's lines for ``nodes`` (``found``: node id -> its cached artifact or None): one
    per stage, cached or to train; and the work to train, estimated at the cached stages' rate
    (empty when everything is cached)."""
    lines = []
    by_kind: dict[str, list[float]] = {}
    rates = []
    for n in nodes:
        w = work(n)
        art = found.get(n.id)
        lines.append(f"  {n.stage:8s} {n.key[:12]}  {n.spec['arch']:9s} "
                     f"{n.spec['epochs']:4d} epochs  {'cached' if art is not None else 'to train'}")
        if art is not None:
            dur = art.meta.get("duration_s")
            if dur:
                rates.append(dur / w)
        else:
            by_kind.setdefault(n.stage, []).append(w)
    total = sum(sum(v) for v in by_kind.values())
    if not total:
        return lines, []
    kinds = ", ".join(f"{k} {len(v)}" for k, v in by_kind.items())
    est = (f"about {duration(total * float(np.median(rates)))} of training, summed over "
           f"stages, at the rate of the {len(rates)} cached stage(s)" if rates
           else "no finished stage in the store to estimate a rate from")
    return lines, [f"to train: {kinds}; {total / 1e6:.2f} M sample-epochs (64 px resnet10 "
                   f"equivalents), {est}"]


def check_overwrite(results: Path, cells_of: list[tuple[Ablation, list[Cell]]],
                    preset: str | None) -> None:
    """Refuse to replace records of another run: a table whose ``results/{table}.parquet``
    holds another preset or other seeds than this run's raises ``UserError`` (exit status 2)
    naming the file, before anything is trained or written. The same preset and seeds is a
    resume or a refresh, and goes on."""
    clashes = []
    for ab, cells in cells_of:
        path = results / f"{ab.table}.parquet"
        if not path.exists():
            continue
        mine = {"preset": preset or "custom",
                "seeds": sorted({c.seed for c in cells if not c.choosing}),
                "choice_seeds": sorted({c.seed for c in cells if c.choosing}) or None}
        try:
            spec = report.read_spec(path)
            theirs = {"preset": spec.get("preset"), "seeds": sorted(spec.get("seeds") or []),
                      "choice_seeds": sorted(spec.get("choice_seeds") or []) or None}
        except DataError as e:
            clashes.append(f"{e}")
            continue
        if theirs != mine:
            choice = "" if theirs["choice_seeds"] == mine["choice_seeds"] else (
                f" (choice seeds {theirs['choice_seeds']} there, {mine['choice_seeds']} here)")
            clashes.append(f"{path} holds the records of preset {theirs['preset']!r}, seeds "
                           f"{theirs['seeds']}; this run is preset {mine['preset']!r}, seeds "
                           f"{mine['seeds']}{choice}")
    if clashes:
        raise UserError("; ".join(clashes) + ": pass --force to replace them")


def _cached(nodes: list[stages.Node], store: stages.Store) -> dict:
    done: dict[tuple[str, str], stages.Artifact] = {}
    for n in nodes:
        art = store.get(n.stage, n.key)
        if art is not None:
            done[n.id] = art
    return done


def _render_datasets(todo: list[stages.Node]) -> None:
    """Every synthetic set the stages to train read, rendered once here, not in every task."""
    for spec in {json.dumps(dataclasses.asdict(s), sort_keys=True): (s, n.cfg)
                 for n in todo for s in stages.stage_datasets(n.stage, n.cfg)}.values():
        stages.ensure_dataset(*spec)


def _progress(todo: list[stages.Node], done: dict, failed: dict, store: stages.Store,
              started: float):
    """The executor's ``on_done(node, path, error)``: records the artifact or the failure and
    prints a progress line with the ETA (by the work left)."""
    total = sum(work(n) for n in todo)
    finished = {"work": 0.0, "count": 0}

    def on_done(node: stages.Node, path: str | None, error: str | None) -> None:
        finished["count"] += 1
        finished["work"] += work(node)
        elapsed = time.time() - started
        eta = elapsed / finished["work"] * (total - finished["work"])
        if error is None:
            done[node.id] = store.get(node.stage, node.key) or stages.open_artifact(path)
            epe = done[node.id].metrics["test"]["epe_mm"]
            what = f"EPE {epe:.2f} mm, {done[node.id].meta.get('duration_s', 0):.0f}s"
        else:
            failed[node.id] = error
            what = f"FAILED: {error}"
        say(f"[{finished['count']}/{len(todo)}] {node.stage} {node.key[:10]} seed "
            f"{node.cfg.run.seed}: {what}; elapsed {duration(elapsed)}, ETA {duration(eta)}")

    return on_done


def _write_results(ab: Ablation, cells: list[Cell], done: dict, failed: dict,
                   preset: str | None, store: stages.Store, results: Path) -> None:
    """The table's records (the chosen values of its ``choose`` rows, on the report seeds),
    its spec with the choices' notes and its datasets' sheets, into the store and the report's
    results folder."""
    picked, choice_notes, chosen = choose(ab, cells, done)
    recs = []
    for c in picked:
        rec = record(c, done, failed, preset)
        if (c.row, c.column) in chosen:
            rec["extra"] = json.dumps({**json.loads(rec["extra"]),
                                       "chosen": chosen[(c.row, c.column)]}, sort_keys=True)
        row = ab.row(c.row)
        rec.update(tuned_choice(row) if row.tuned is not None
                   else record_choice(ab, c, cells, chosen.get((c.row, c.column))))
        recs.append(rec)
    choice = sorted({c.seed for c in cells if c.choosing}) or None
    spec = table_spec(ab, preset, sorted({c.seed for c in cells if not c.choosing}), choice,
                      data_sheets(picked)[0])
    spec["notes"] = spec["notes"] + choice_notes
    report.write_records(store.root / "_results" / (preset or "custom") / f"{ab.table}.parquet",
                         spec, recs)
    report.write_records(results / f"{ab.table}.parquet", spec, recs)


def _train(cells: list[Cell], done: dict, failed: dict, store: stages.Store, started: float,
           execute) -> list[stages.Node]:
    """Train what ``cells`` need and the store lacks (seed by seed, stable, so upstream stays
    first: an interrupted run has whole seeds); returns those nodes."""
    nodes = union(cells)
    say(status_line(cells, nodes, set(done)))
    todo = upstream_first(sorted((n for n in nodes if n.id not in done and n.id not in failed),
                                 key=lambda n: n.cfg.run.seed))
    if todo:
        _render_datasets(todo)
        execute(todo, _progress(todo, done, failed, store, started))
    return todo


def upstream_first(nodes: list[stages.Node]) -> list[stages.Node]:
    """``nodes`` in their order except that each comes after every input of it among them: a
    stage of one seed may read another seed's (the other-seed control reads that seed's meta
    stage), so ordering by seed alone can put a stage before its input."""
    return schedule.inputs_first(nodes, lambda n: n.id, lambda n: n.inputs.items())


def _summary(cells: list[Cell], nodes: list, todo: list, done: dict, failed: dict,
             wall: float, written: list[Path]) -> tuple[int, str]:
    """(failed cells, the closing line: cells, stages cached and trained, times, report)."""
    n_failed = sum(1 for c in cells if any(n.id in failed or n.id not in done for n in c.nodes))
    kinds: dict[str, list[float]] = {}
    for n in todo:
        if n.id in done:
            kinds.setdefault(n.stage, []).append(float(done[n.id].meta.get("duration_s", 0)))
    breakdown = ", ".join(f"{k} {len(v)} x {duration(sum(v) / len(v))}"
                          for k, v in kinds.items()) or "none"
    trained = sum(sum(v) for v in kinds.values())
    return n_failed, (
        f"{len(cells)} cells ({n_failed} failed), {len(nodes)} unique stages "
        f"({len(nodes) - len(todo)} cached, {len(todo)} trained); wall {duration(wall)}, "
        f"stage training {duration(trained)} (trained: {breakdown}); report: "
        f"{', '.join(str(p) for p in written[:3])}{' ...' if len(written) > 3 else ''}")


def run(paths: list[str], base_config: str | None, overrides: list[str], *,
        seeds: int | None = None, choice_seeds: int | None = None, dry: bool = False,
        report_dir: str | Path = "reports", force: bool = False, address: str | None = None, cpus_per_worker: int = 1,
        gpus_per_worker: float = 0.0, workers: int = 0, execute=None,
        predict: list[int] | None = None) -> int:
    """Load the ablation files, expand and plan every cell, train what the store lacks, write
    one record per cell and render the report. Returns the exit status: 1 if any cell failed.

    Training goes through ``execute(nodes, on_done)``: by default the Ray executor
    (``cmkg.cluster.ablate.execute``) at ``address`` with the resources given: each stage a
    task of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs, or, with ``workers`` >= 1,
    a Ray Train run of that many such workers; a caller may pass its own. Records of another
    preset or other seeds already in ``{report_dir}/results`` stop the run before anything is
    trained or written (``check_overwrite``; a dry run too), unless ``force``. ``seeds`` and
    ``choice_seeds`` override the files' (``cells.seed_plan``; ``choice_seeds=0``: none).

    With the records it writes a contact sheet of each dataset the cells read into
    ``{report_dir}/data/`` (``results.write_sheets``), which the index links."""
    abls = [at_preset(load(p), preset_of(base_config)) for p in paths]  # rows this preset runs
    names = [a.table for a in abls]
    if len(set(names)) != len(names):
        raise UserError(f"two ablation files define the same table: {names}")
    cells_of = [(a, expand(a, base_config, overrides, seeds, choice_seeds)) for a in abls]
    cells = [c for _, cs in cells_of for c in cs]
    preset = preset_of(base_config)
    out = Path(report_dir)
    results = out / "results"
    if not force:
        check_overwrite(results, cells_of, preset)
    store = stages.Store.of(cells[0].cfg)
    if dry:
        print(dry_run(cells_of, store, predict=predict))
        return 0
    tracking.annotate_cells(cells)  # run.tracking: the tables and rows each stage serves
    first = [c for ab, cs in cells_of for c in first_round(ab, cs)]
    done = _cached(union(cells), store)
    failed: dict[tuple[str, str], str] = {}
    started = time.time()
    if execute is None:
        from cmkg.cluster.ablate import execute as ray_execute

        execute = functools.partial(ray_execute, address=address,
                                    cpus_per_worker=cpus_per_worker,
                                    gpus_per_worker=gpus_per_worker, workers=workers)
    todo = _train(first, done, failed, store, started, execute)
    if len(first) < len(cells):  # the second round: the chosen values on the report seeds
        ran = {id(c) for c in first}
        second = [c for ab, cs in cells_of
                  for c in needed(ab, cs, decisions(ab, cs, done, failed)) if id(c) not in ran]
        say(f"choices made on the choice seeds; {len(second)} cells of the chosen values on "
            "the report seeds")
        todo += _train(second, done, failed, store, started, execute)
        cells = first + second
    nodes = union(cells)
    wall = time.time() - started
    for ab, cs in cells_of:
        _write_results(ab, cs, done, failed, preset, store, results)
    used = {id(c) for c in cells}
    sheets = [data_sheets([c for c in cs if id(c) in used]) for _, cs in cells_of]
    write_sheets([e for entries, _ in sheets for e in entries],
                 {k: v for _, found in sheets for k, v in found.items()}, out)
    written = report.render_reports(results, out)
    for ab, _ in cells_of:
        md = out / f"{ab.table}.md"
        if md.is_file():
            print(md.read_text())
    n_failed, line = _summary(cells, nodes, todo, done, failed, wall, written)
    say(line)
    return 1 if n_failed else 0
