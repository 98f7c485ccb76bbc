"""The layout the docs describe is the layout of the code: no import cycle anywhere in cmkg/
(imports inside functions count too), the math layer free of Ray, every module named in
docs/architecture.md and every module it names present, and no reference to a document that
is not in the repository."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cmkg"
MATH = ("losses", "regularizers", "meta", "train", "metrics", "diagnostics", "models", "hand",
        "synth", "parallel", "storage", "atomic", "config", "stages", "data")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, packages by their __init__.py."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, mods: dict) -> set[str]:
    """The cmkg modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in mods}
    return found


def test_no_import_cycle_in_cmkg():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    graph = {m: {d for d in deps if not (m.startswith(d + ".") or d.startswith(m + "."))}
             for m, deps in graph.items()}
    done: set[str] = set()

    def visit(m, path):
        for d in sorted(graph[m]):
            assert d not in path, f"import cycle: {' -> '.join([*path[path.index(d):], d])}"
            if d not in done:
                visit(d, [*path, d])
        done.add(m)

    for m in sorted(graph):
        visit(m, [m])


def test_the_math_and_stage_layers_never_import_ray():
    for name, path in _modules().items():
        if name != "cmkg" and name.split(".")[1] in MATH:
            text = path.read_text()
            assert not re.search(r"^\s*(import ray|from ray)\b", text, re.M), name


def test_the_architecture_map_matches_the_modules():
    """Each module has a row: ``cmkg/x.py``, ``pkg/x.py``, or ``x.py`` in the row of
    ``cmkg/pkg/``; each path the map names exists. (The converters share one row.)"""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:cmkg/)?[\w/]+\.py)`", text))
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `cmkg/(\w+)/` \|.*$", text, re.M)}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if path.name in ("__init__.py", "__main__.py") or rel.parts[:2] == ("data", "convert"):
            continue
        pkg = rel.parts[0] if len(rel.parts) > 1 else None
        assert (f"cmkg/{rel.as_posix()}" in named or rel.as_posix() in named
                or (pkg in rows and f"`{path.name}`" in rows[pkg])), (
            f"{path.relative_to(ROOT)} is missing from docs/architecture.md")
    for name in named:
        if "/" in name:
            assert (ROOT / name).is_file() or (PKG / name).is_file(), (
                f"docs/architecture.md names {name}, which does not exist")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    keep = (".py", ".md", ".yaml", ".yml", ".toml", ".csv", ".txt", ".cfg", "Makefile")
    return [ROOT / f for f in out if f.endswith(keep) and (ROOT / f).is_file()]


def test_every_document_the_project_names_is_in_the_repository():
    docs = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = []
    for path in _tracked_text_files():
        # a file a test writes itself (tmp_path / "t1.md") is not a reference
        text = re.sub(r'/ "[\w.-]+\.md"', "", path.read_text(errors="replace"))
        for name in set(re.findall(r"\b([\w.-]+\.md)\b", text)):
            if name not in docs:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_relative_links_in_the_docs_resolve():
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to {target}"


def _documented_commands():
    """Every ``cmkg ...`` line in a code block of the README and docs/ (comments dropped,
    continuation lines joined)."""
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", md.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip().removeprefix("$ ")
                if line.startswith("cmkg "):  # a synopsis's [optional] parts dropped
                    while re.search(r"\[[^\[\]]*\]", line):
                        line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
                    yield md.relative_to(ROOT), line.replace(" ...", "")


def test_documented_commands_parse():
    """The commands the docs show are commands the CLI accepts (flags renamed, not forgotten)."""
    import shlex

    from cmkg.cli import build_parser

    lines = list(_documented_commands())
    assert len(lines) >= 10
    for where, line in lines:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            raise AssertionError(f"{where}: `{line}` does not parse") from None
