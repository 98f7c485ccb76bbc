"""``render_reports``: the reports folder, written from a folder of result records only."""

from __future__ import annotations

import shutil
from pathlib import Path

from cmkg.atomic import atomic_path
from cmkg.report.curves import learning_curves
from cmkg.report.figures import figure4, figure5
from cmkg.report.index import readme_markdown, sheets_present
from cmkg.report.phi import read_phi, render_phi
from cmkg.report.records import load_records
from cmkg.report.tables import comparisons_csv, table_csv, table_markdown


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))  # bytes: no locale encoding, no newline translation
    return path


def _carry_sheets(tables: dict, results_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the contact sheets the specs name from the records' own report folder (the parent
    of ``results_dir``, where the runner wrote them) into ``out_dir`` where it lacks them, so
    that a report rebuilt elsewhere links the same sheets; return the paths copied."""
    copied = []
    for spec, _ in tables.values():
        for s in spec.get("data_sheets") or []:
            src, dst = results_dir.parent / s["file"], out_dir / s["file"]
            if src.is_file() and not dst.exists():
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
                copied.append(dst)
    return copied


def render_reports(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``out_dir``'s tables, figures and README from ``results_dir/*.parquet``, and
    ``phi.md`` and ``phi.csv`` from ``results_dir/phi.json`` where it exists (the index then
    shows the φ diagnostics), with the contact sheets beside the records; return the paths
    written. The same records give the same bytes (the PNGs aside)."""
    tables = load_records(results_dir)
    out_dir = Path(out_dir)
    written: list[Path] = []
    files: dict[str, list[str]] = {}
    for name, (spec, records) in tables.items():
        files[name] = [f"{name}.md", f"{name}.csv"]
        written.append(_write(out_dir / f"{name}.md", table_markdown(spec, records, tables)))
        written.append(_write(out_dir / f"{name}.csv", table_csv(spec, records)))
        if spec.get("comparisons"):
            files[name].append(f"{name}_comparisons.csv")
            written.append(_write(out_dir / f"{name}_comparisons.csv",
                                  comparisons_csv(spec, records, tables)))
        if learning_curves(spec, records, out_dir / f"{name}_curves.png"):
            files[name].append(f"{name}_curves.png")
            written.append(out_dir / f"{name}_curves.png")
    figures = {}
    for name, draw in (("figure4.png", figure4), ("figure5.png", figure5)):
        panels = draw(tables, out_dir / name)
        if panels:
            figures[name] = "; ".join(panels)
            written.append(out_dir / name)
    phi = None
    if (Path(results_dir) / "phi.json").is_file():  # cmkg phi, or cmkg reproduce's last step
        phi = read_phi(results_dir)
        written += render_phi(results_dir, out_dir, phi)
    written += _carry_sheets(tables, Path(results_dir), out_dir)
    written.append(_write(out_dir / "README.md", readme_markdown(
        tables, files, figures, sheets_present(tables, out_dir), phi)))
    return written
