"""What a run leaves for the report: one result record per cell, the table's spec (phi's
order-free statistics come from the target cells' ``extra``) stored beside them, and a contact
sheet per dataset the cells read (``{report}/data/{name}.png``, linked from the index)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cmkg import config as config_mod
from cmkg import report, stages
from cmkg.ablation.cells import Cell, notes
from cmkg.ablation.spec import Ablation, at_preset
from cmkg.config import Config
from cmkg.console import say

LOWER_IS_BETTER = {"epe_mm": True, "auc_20_50": False}

_PHI_CACHE: dict[str, np.ndarray] = {}  # artifact path -> phi; the last few meta stages


def _phi_values(art: stages.Artifact) -> np.ndarray:
    """phi_META of a meta stage as one float64 vector, read once although every weighted
    target cell of every table uses it."""
    key = str(art.path)
    if key not in _PHI_CACHE:
        if len(_PHI_CACHE) >= 8:
            _PHI_CACHE.pop(next(iter(_PHI_CACHE)))
        _PHI_CACHE[key] = np.concatenate([p.detach().flatten().double().numpy()
                                          for p in art.load_phi().phi()])
    return _PHI_CACHE[key]


def _extra(cell: Cell, art: stages.Artifact, done: dict) -> dict:
    """Fig. 5's data for target cells: a histogram of the network's weights, and of phi."""
    if not stages.DEFS[cell.node.stage].prior:  # the stage that takes a regularizer
        return {}
    out = {"theta_hist": report.histogram(report.flat_weights(art.load_model().state_dict()))}
    for k in ("prior_strength", "calibration"):  # D after the last epoch; the calibrated scale
        if k in art.metrics:
            out[k] = art.metrics[k]
    meta_key = cell.node.inputs.get("meta")
    prior = done.get(("meta", meta_key)) if meta_key else None
    if prior is not None:
        out["phi"] = prior.metrics.get("phi", {})
    applied = art.metrics.get("phi_applied")
    if applied:  # the phi the target trained with (strength, sign, control, scale, cap, source)
        out["phi_hist"] = applied["hist"]
        out["phi_applied"] = {"fraction_negative": applied["fraction_negative"]}
    elif prior is not None:  # stages published before it was recorded: the calibrated phi
        scale = out.get("calibration", {}).get("scale", 1.0)  # before its cap
        out["phi_hist"] = report.histogram(scale * _phi_values(prior))
    if cell.cfg.data.planted.channels:
        out["planted"] = _planted(cell, art, done)
    return out


def _planted(cell: Cell, art: stages.Artifact, done: dict) -> dict:
    """The planted control's mechanism (``diagnostics.planted_split``): how the target's first
    convolution, the phi it applied, and the source stages of its cell (the kd student, and
    phi_META with its meta network) treat the planted channels against the real ones."""
    from cmkg import diagnostics, models, regularizers

    real = models.MODALITY_CHANNELS["rgb"]
    out = {"target": art.metrics.get("planted") or diagnostics.planted_split(art.load_model(), real)}
    for n in cell.nodes:
        src = done.get(n.id)
        if src is None or n.stage not in ("kd", "meta"):
            continue
        model = src.load_model()
        prior = src.load_phi() if n.stage == "meta" else regularizers.inverse_square(
            {k: v for k, v in model.named_parameters() if k == diagnostics.FIRST_CONV},
            eps=cell.cfg.regularizer.phi_eps)  # source_weights' phi of the first conv
        out[n.stage] = diagnostics.planted_split(model, real, prior)
    return out


def fingerprint(cfg: Config) -> str:
    """sha256 of the resolved config without the fields that cannot change a result."""
    d = cfg.to_dict()
    for k in ("store", "cache", "threads", "progress", "loader_workers", "device", "tracking"):
        d["run"].pop(k, None)
    d["data"].pop("root", None)
    if not d["data"]["planted"]["channels"]:  # since: absent when off
        d["data"].pop("planted")
    elif not d["data"]["planted"]["source_cue"]:  # since: absent at 0
        d["data"]["planted"].pop("source_cue")
    if d["regularizer"]["phi_source"] == "meta":  # entries since: absent at their defaults
        for k in ("phi_source", "phi_eps"):
            d["regularizer"].pop(k)
    return config_mod.digest(d)


def record(cell: Cell, done: dict, failed: dict[tuple[str, str], str], preset: str | None) -> dict:
    """One result record: the cell's metrics from its artifact, or why it failed."""
    base = {"table": cell.table, "row": cell.row, "column": cell.column, "seed": cell.seed,
            "stage": cell.node.stage, "key": cell.node.key,
            "config_fingerprint": fingerprint(cell.cfg),
            "artifacts": json.dumps({n.stage: n.key for n in cell.nodes}, sort_keys=True),
            "preset": preset or "custom"}
    missing = [n for n in cell.nodes if n.id not in done]
    if missing:
        why = next((failed[n.id] for n in cell.nodes if n.id in failed),
                   f"{missing[0].stage} did not run")
        return report.failed_record(base, why, stages.code_version())
    art = done[cell.node.id]
    metrics, meta = art.metrics, art.meta
    test = metrics["test"]
    walls = {n.stage: round(float(done[n.id].meta.get("duration_s", 0.0)), 3)
             for n in cell.nodes}
    return {**base, "status": "done", "error": None, "epe_mm": test["epe_mm"],
            "auc_20_50": test["auc_20_50"],
            "mean_pose_epe_mm": metrics.get("mean_pose_test", {}).get("epe_mm"),
            "pck_thresholds_mm": test["pck_thresholds_mm"], "pck": test["pck"],
            "per_joint_epe_mm": test.get("per_joint_epe_mm", []),
            "wall_s": round(float(meta.get("duration_s", 0.0)), 3),
            "stage_walls": json.dumps(walls, sort_keys=True),
            "code_version": meta.get("code_version", ""), "device": meta.get("device", ""),
            "extra": json.dumps(_extra(cell, art, done), sort_keys=True),
            "curves": json.dumps({n.stage: curve(done[n.id].metrics.get("history", []))
                                  for n in cell.nodes}, sort_keys=True)}


def curve(history: list[dict]) -> list[dict]:
    """A stage's learning curve from its per-epoch history: the mean training loss parts,
    where the epoch validated, the EPE on a fixed slice of the training split and on val, and
    where the stage measured its prior, the median |D| (``prior_abs_d_median``)."""
    out = []
    for h in history:
        point = {"epoch": h["epoch"], **h.get("train", {})}
        if "train_eval" in h:
            point["train_epe_mm"] = h["train_eval"]["epe_mm"]
        if "val" in h:
            point["val_epe_mm"] = h["val"]["epe_mm"]
        overall = h.get("diagnostics", {}).get("prior_strength", {}).get("overall")
        if overall:  # the target's prior: its median |D| after this epoch (the realised D)
            point["prior_abs_d_median"] = overall["abs_d_median"]
        out.append(point)
    return out


def table_spec(ab: Ablation, preset: str | None, seeds: list[int],
               choice_seeds: list[int] | None = None, sheets: list[dict] | None = None) -> dict:
    """The table's description stored beside its records (what ``cmkg report`` renders):
    ``seeds`` are the report seeds; ``choice_seeds`` (stored where the table has a ``choose``
    row) those its choices were made on; ``sheets`` the contact sheets of its datasets
    (``data_sheets``). The rows, comparisons, figures and benchmark entries are those
    ``preset`` runs (``spec.at_preset``)."""
    ab = at_preset(ab, preset)
    spec = {"table": ab.table, "title": ab.title, "caption": ab.caption,
            "regenerates": ab.regenerates, "source": Path(ab.path).name,
            "columns": [{"name": c.name, "title": c.title, "metrics": c.metrics, "stage": c.stage}
                        for c in ab.columns.values()],
            "rows": [{"label": r.label, "paper": r.paper} for r in ab.rows],
            "comparisons": ab.comparisons, "notes": notes(ab, preset),
            "lower_is_better": LOWER_IS_BETTER, "seeds": seeds, "preset": preset or "custom"}
    if ab.figures:
        spec["figures"] = ab.figures
    if choice_seeds is not None and any(r.choose is not None for r in ab.rows):
        spec["choice_seeds"] = list(choice_seeds)
    if sheets:
        spec["data_sheets"] = sheets
    if ab.benchmark:
        spec["benchmark"] = ab.benchmark
    return spec


SHEET_SAMPLES = 16  # samples per contact sheet in a report


def _sheet_name(spec) -> str:
    """A dataset's file name in ``{report}/data/``: its domain, or a folder's name."""
    name = Path(str(spec.path).rstrip("/")).name if spec.path is not None else spec.domain
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "dataset"


def data_sheets(cells: list[Cell]) -> tuple[list[dict], dict]:
    """One contact sheet per dataset the cells' stages read, named by domain (the first of the
    cells' datasets with that name): ([{name, role, split, file}], {name: (DataSpec, config)}).
    A target set shows its test split, a paired source set (and Table 1's extra set) every
    split in turn."""
    found: dict[str, tuple] = {}
    entries = []
    for cell in cells:
        for node in cell.nodes:
            target = stages.DEFS[node.stage].data == "target"
            for i, spec in enumerate(stages.stage_datasets(node.stage, node.cfg)):
                name = _sheet_name(spec)
                if name in found:
                    continue
                role = "target" if target else ("source" if i == 0 else "augment")
                found[name] = (spec, node.cfg)
                entries.append({"name": name, "role": role,
                                "split": "test" if target else None,
                                "file": f"data/{name}.png"})
    return entries, found


def write_sheets(entries: list[dict], found: dict, out: Path) -> list[Path]:
    """Draw ``entries`` (``data_sheets``) into ``out`` (``out/data/{name}.png``, 16 samples
    each), rendering a synthetic set first where it is not there yet. A sheet that cannot be
    drawn costs a warning line, never the report."""
    from cmkg.data.sheet import contact_sheet

    written = []
    for e in entries:
        spec, cfg = found[e["name"]]
        try:
            root = stages.ensure_dataset(spec, cfg)
            written.append(contact_sheet(root, out / e["file"], split=e["split"],
                                         n=SHEET_SAMPLES).out)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not cost the report
            say(f"warning: no contact sheet of {e['name']} ({type(exc).__name__}: {exc})")
    return written
