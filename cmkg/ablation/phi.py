"""``cmkg phi``: the diagnostics of phi_META that can detect per-weight signal
(docs/phi-diagnostics.md). No Ray here: training goes through the ablation runner's executor.

Per seed it plans five meta stages of the same student and teacher (``VARIANTS``) as ordinary
stages (``stages.plan``), so they are cached and shared: ``full`` is Table 2's meta stage (the
same key), the others differ from it in one entry each. What the store lacks is trained by the
executor the ablation runner uses (Ray tasks, or Ray Train with ``--workers``); then per seed
(``seed_record``, ``cmkg.phi_stats``):

    order          rho(full, order): the same network, another data order
    halves         rho(half0, half1): the same network, disjoint halves of the training split
    teacher        rho(full, no_teacher): phi learned with and without the teacher's terms in G
    abs_theta      rho(phi_full, |theta_student|)
    squared_change rho(phi_full, (theta_meta - theta_student)^2)
    fisher         rho(phi_full, the Fisher diagonal of L_REG at theta_student)

each a size-weighted Spearman rho over the regularised tensors against its within-tensor
permutation null, over the weights L_REG reaches (``phi_stats.live_weights``: a Fisher diagonal
above 0), plus the order-free statistics of every variant's phi. The records go to
``{report}/results/phi.json`` (``write_phi``; a copy to ``{store}/_results/{preset}/``, which
``cmkg runs gc`` reads) and the report (``{report}/phi.md``, ``phi.csv``, and the index's
section where the folder holds the tables too) is rendered from them alone
(``cmkg.report.phi``). ``cmkg reproduce`` runs this after its tables (``--phi-seeds``), having
run ``preflight``, every check, before them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cmkg import config as config_mod
from cmkg import phi_stats, stages
from cmkg.ablation.cells import preset_of
from cmkg.ablation.runner import _cached, _progress, _render_datasets, stage_listing
from cmkg.atomic import write_json
from cmkg.console import duration, say
from cmkg.data import HandDataset
from cmkg.data.dataset import prepare_batch
from cmkg.errors import ConfigError, DataError, UserError
from cmkg.forms import weighted, weighted_forms
from cmkg.report.phi import COMPARISONS, KIND, VERSION, phi_markdown, render_phi

ORDER_OFFSET = 1000  # the order variant's meta.order_seed = seed + ORDER_OFFSET
FISHER_BATCHES = 8  # fixed training batches of the Fisher diagonal
# variant -> (the meta entries it sets, what it is)
VARIANTS: dict[str, tuple[dict, str]] = {
    "full": ({}, "Algorithm 1 as Table 2 runs it (its meta stage, the same key)"),
    "order": ({"order_seed": ORDER_OFFSET}, f"another data order: meta.order_seed = seed + "
              f"{ORDER_OFFSET}"),
    "half0": ({"subset": "half0"}, "half 0 of the training split only: meta.subset=half0"),
    "half1": ({"subset": "half1"}, "the other, disjoint half: meta.subset=half1"),
    "no_teacher": ({"teacher": False}, "G = L_REG, no teacher terms: meta.teacher=false"),
}
PAIRS = {"order": ("full", "order"), "halves": ("half0", "half1"),
         "teacher": ("full", "no_teacher")}
assert set(COMPARISONS) == {*PAIRS, "abs_theta", "squared_change", "fisher"}


def base_config(base: str | None, overrides: list[str]) -> config_mod.Config:
    """The config every variant starts from; its meta entries the variants set must be at
    their defaults, and the form must be one whose phi the meta stage learns."""
    cfg = config_mod.load(base, overrides)
    src = f"{base or 'defaults'} <- --set"
    problems = [f"meta.{k}: cmkg phi sets it per variant; leave it at its default"
                for k, v in (("teacher", cfg.meta.teacher), ("order_seed", cfg.meta.order_seed),
                             ("subset", cfg.meta.subset))
                if v != getattr(config_mod.MetaConfig(), k)]
    if not weighted(cfg.regularizer.form):
        problems.append(f"regularizer.form: the meta stage learns phi of a weighted form "
                        f"({', '.join(weighted_forms())}), got {cfg.regularizer.form}")
    if problems:
        raise ConfigError(src, problems)
    return cfg


def variant_config(cfg: config_mod.Config, seed: int, variant: str) -> config_mod.Config:
    """``cfg`` at ``seed`` with the meta entries of ``variant`` (``VARIANTS``)."""
    entries = dict(VARIANTS[variant][0])
    if "order_seed" in entries:
        entries["order_seed"] = seed + entries["order_seed"]
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed),
                               meta=dataclasses.replace(cfg.meta, **entries))


def plan_variants(cfg: config_mod.Config, seeds: list[int]) -> dict[int, dict[str, list]]:
    """seed -> variant -> its plan (``stages.plan("meta", ...)``)."""
    return {s: {v: stages.plan("meta", variant_config(cfg, s, v)) for v in VARIANTS}
            for s in seeds}


def _union(plans: dict[int, dict[str, list]]) -> list[stages.Node]:
    seen: dict[tuple[str, str], stages.Node] = {}
    for by_variant in plans.values():
        for nodes in by_variant.values():
            for node in nodes:
                seen.setdefault(node.id, node)
    return list(seen.values())


def check_overwrite(path: Path, preset: str | None, seeds: list[int]) -> None:
    """Refuse to replace phi records of another preset or other seeds (exit status 2), as
    ``cmkg.ablation.check_overwrite`` does for the tables; the same ones are a refresh."""
    if not path.exists():
        return
    mine = {"preset": preset or "custom", "seeds": sorted(seeds)}
    try:
        doc = read_json(path)
        theirs = {"preset": doc.get("preset"), "seeds": sorted(doc.get("seeds") or [])}
    except DataError as e:
        raise UserError(f"{e}: pass --force to replace it") from None
    if theirs != mine:
        raise UserError(f"{path} holds the phi records of preset {theirs['preset']!r}, seeds "
                        f"{theirs['seeds']}; this run is preset {mine['preset']!r}, seeds "
                        f"{mine['seeds']}: pass --force to replace them")


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable phi record file ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise DataError(f"{path}: not a phi record file (kind {KIND!r})")
    return doc


def _fisher_batches(cfg: config_mod.Config, device: torch.device) -> list[dict]:
    """``FISHER_BATCHES`` fixed batches of the student's training split (its datasets, RGB),
    drawn from ``run.seed`` as the calibration draws its batches."""
    roots = [stages.ensure_dataset(s, cfg) for s in stages.stage_datasets("student", cfg)]
    ds = HandDataset(roots, "train", ("rgb",), planted=stages.planted("student", cfg))
    bs = cfg.optim.batch_size
    order = np.random.default_rng(cfg.run.seed).permutation(len(ds))
    n = max(1, min(FISHER_BATCHES, len(ds) // bs))
    return [prepare_batch(ds.__getitems__(np.sort(order[i * bs:(i + 1) * bs])), device)
            for i in range(n)]


def _phi(art: stages.Artifact) -> dict[str, torch.Tensor]:
    reg = art.load_phi()
    return {n: p.detach() for n, p in zip(reg.names, reg.phi())}


def seed_record(seed: int, arts: dict[str, stages.Artifact], student: stages.Artifact,
                cfg: config_mod.Config, permutations: int) -> dict:
    """The diagnostics of one seed from its finished artifacts: the variants' meta stages
    (``arts``) and the student they all start from."""
    phis = {v: _phi(a) for v, a in arts.items()}
    names = list(phis["full"])
    device = stages.resolve_device(cfg.run.device)
    theta0 = student.load_model(device)
    quantities = {
        "abs_theta": phi_stats.abs_theta(theta0, names),
        "squared_change": phi_stats.squared_change(theta0, arts["full"].load_model(device),
                                                   names),
        "fisher": phi_stats.fisher_diagonal(theta0, _fisher_batches(cfg, device), names,
                                            reduction=cfg.reduction.reg)}
    pairs = {name: (phis[PAIRS[name][0]], phis[PAIRS[name][1]]) if name in PAIRS
             else (phis["full"], quantities[name]) for name in COMPARISONS}
    comparisons = phi_stats.compare_all(pairs, permutations=permutations, seed=seed, names=names,
                                        live=phi_stats.live_weights(quantities["fisher"]))
    return {"seed": seed, "status": "done", "error": None,
            "artifacts": {**{v: a.key for v, a in arts.items()}, "student": student.key},
            "comparisons": comparisons,
            "order_free": {v: phi_stats.order_free(p) for v, p in phis.items()}}


def write_phi(path: Path, *, preset: str | None, seeds: list[int], permutations: int,
              records: list[dict]) -> Path:
    """The records file ``results/phi.json``: what was run, and one record per seed."""
    write_json(path, {"kind": KIND, "version": VERSION, "preset": preset or "custom",
                      "seeds": sorted(seeds), "permutations": permutations,
                      "fisher_batches": FISHER_BATCHES,
                      "variants": {v: d for v, (_, d) in VARIANTS.items()},
                      "records": sorted(records, key=lambda r: r["seed"])})
    return path


def preflight(base: str | None, overrides: list[str], *, seeds: int, report_dir: str | Path,
              force: bool = False, permutations: int = phi_stats.PERMUTATIONS,
              workers: int = 0) -> tuple[config_mod.Config, list[int], str | None, Path]:
    """Every check of a run before anything is planned or trained: the arguments, the base
    config (``base_config``) and, unless ``force``, the records already in
    ``{report_dir}/results/phi.json`` (``check_overwrite``). Returns (the base config, the
    seeds, the preset, the records file). ``cmkg reproduce`` calls it before its tables."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if permutations < 20:
        raise UserError(f"--permutations must be >= 20 (a null needs them), got {permutations}")
    if workers > 1:  # Ray Train's DistributedSampler orders the data itself (its seed, 0)
        raise UserError(f"--workers {workers}: with more than one Ray Train worker the data "
                        "order ignores meta.order_seed; run cmkg phi with --workers 0 or 1")
    cfg = base_config(base, overrides)
    seed_list = list(range(seeds))
    preset = preset_of(base)
    path = Path(report_dir) / "results" / "phi.json"
    if not force:
        check_overwrite(path, preset, seed_list)
    return cfg, seed_list, preset, path


def dry_run(plans: dict[int, dict[str, list]], store: stages.Store) -> str:
    """Per seed, each variant's meta stage, cached or to train; then every stage the variants
    need (their students and teachers too) and the work to train, as the tables' dry run
    lists them (``runner.stage_listing``); trains nothing."""
    nodes = _union(plans)
    found = {n.id: store.get(n.stage, n.key) for n in nodes}
    lines = [f"phi diagnostics: {len(plans)} seed(s) x {len(VARIANTS)} meta variants "
             f"({', '.join(VARIANTS)}); full is Table 2's meta stage"]
    for seed, by_variant in plans.items():
        for v, ns in by_variant.items():
            state = "cached" if found[ns[-1].id] is not None else "to train"
            lines.append(f"  seed {seed}  {v:10s}  meta {ns[-1].key[:12]}  {state}")
    listing, estimate = stage_listing(nodes, found)
    n_cached = sum(a is not None for a in found.values())
    return "\n".join([*lines, "stages:", *listing, f"{len(nodes)} stages: {n_cached} cached, "
                      f"{len(nodes) - n_cached} to train", *estimate])


def run(base: str | None, overrides: list[str], *, seeds: int = 3,
        report_dir: str | Path, force: bool = False,
        permutations: int = phi_stats.PERMUTATIONS, address: str | None = None,
        cpus_per_worker: int = 1, gpus_per_worker: float = 0.0, workers: int = 0,
        dry: bool = False, execute=None) -> int:
    """Plan the variants of every seed, train what the store lacks through ``execute(nodes,
    on_done)`` (default: the ablation runner's Ray executor with these resources), compute each
    seed's diagnostics, write ``{report_dir}/results/phi.json`` (and a copy in the store's
    ``_results/{preset}/``, where ``cmkg runs gc`` finds it as it finds the tables' records),
    render ``phi.md`` and ``phi.csv`` from it, and, when the folder holds the tables' records,
    the index (``README.md``) again. Returns 1 if a seed could not be measured (a variant
    failed), else 0. Records of another preset or other seeds stop the run before anything is
    trained (``preflight``), unless ``force``. ``dry``: print ``dry_run`` and train nothing."""
    cfg, seed_list, preset, path = preflight(base, overrides, seeds=seeds, report_dir=report_dir,
                                             force=force, permutations=permutations,
                                             workers=workers)
    out = Path(report_dir)
    plans = plan_variants(cfg, seed_list)
    nodes = _union(plans)
    store = stages.Store.of(cfg)
    if dry:
        print(dry_run(plans, store))
        return 0
    done = _cached(nodes, store)
    todo = sorted((n for n in nodes if n.id not in done), key=lambda n: n.cfg.run.seed)
    say(f"cmkg phi: {len(seed_list)} seed(s) x {len(VARIANTS)} meta variants; {len(nodes)} "
        f"stages: {len(nodes) - len(todo)} cached, {len(todo)} to train")
    failed: dict[tuple[str, str], str] = {}
    started = time.time()
    if todo:
        _render_datasets(todo)
        if execute is None:
            from cmkg.cluster.ablate import execute as ray_execute

            execute = functools.partial(ray_execute, address=address,
                                        cpus_per_worker=cpus_per_worker,
                                        gpus_per_worker=gpus_per_worker, workers=workers)
        execute(todo, _progress(todo, done, failed, store, started))
    torch.set_num_threads(cfg.run.threads or os.cpu_count() or 1)
    records = []
    for seed, by_variant in plans.items():
        missing = [n for ns in by_variant.values() for n in ns if n.id not in done]
        if missing:
            why = failed.get(missing[0].id, "an upstream stage failed")
            records.append({"seed": seed, "status": "failed",
                            "error": f"{missing[0].stage} {missing[0].key[:10]}: {why}"})
            continue
        arts = {v: done[ns[-1].id] for v, ns in by_variant.items()}
        student = stages.upstream_of(by_variant["full"][-1], done, store)["student"]
        say(f"cmkg phi: seed {seed}: {permutations} permutations per comparison")
        records.append(seed_record(seed, arts, student, variant_config(cfg, seed, "full"),
                                   permutations))
    for target in (store.root / "_results" / (preset or "custom") / "phi.json", path):
        write_phi(target, preset=preset, seeds=seed_list, permutations=permutations,
                  records=records)
    _render(path.parent, out)
    print(phi_markdown(read_json(path)))
    n_failed = sum(r["status"] != "done" for r in records)
    say(f"cmkg phi: {len(records) - n_failed} of {len(records)} seed(s) measured in "
        f"{duration(time.time() - started)}; report: {out / 'phi.md'}, {out / 'phi.csv'}")
    return 1 if n_failed else 0


def _render(results: Path, out: Path) -> None:
    """``phi.md`` and ``phi.csv``; where ``results`` holds the tables' records too, through the
    whole report (its index shows the diagnostics). Records of the tables that cannot be read
    leave the index as it was, with a warning: the phi files are written either way."""
    if not any(p.suffix == ".parquet" and not p.name.startswith(".") for p in results.iterdir()):
        render_phi(results, out)
        return
    from cmkg.report import render_reports

    try:
        render_reports(results, out)  # reads every table's records before it writes a file
    except DataError as e:
        say(f"cmkg phi: the report's index was not updated: {e}")
        render_phi(results, out)
