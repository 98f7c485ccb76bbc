"""The one strict reader of the project's YAML files (configs, ablation files, search spaces).

Every file is read by ``read_mapping`` (missing file, invalid YAML, a top level that is not a
mapping: one problem naming the file) and checked with the helpers below, which append to a
``problems`` list instead of raising, so a file's every problem is reported at once; the caller
raises one :class:`~cmkg.errors.ConfigError` naming the file (exit status 2). YAML never runs
code here: ``yaml.safe_load`` only.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from cmkg.errors import ConfigError


def read_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file ({} for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def dotted(prefix: str, key) -> str:
    """``prefix.key`` (just ``key`` at the top level)."""
    return f"{prefix}.{key}" if prefix else str(key)


def unknown_keys(data: dict, known, where: str, problems: list[str]) -> None:
    """One problem per key of ``data`` not in ``known``: the nearest known key if one is close,
    else the list of known keys."""
    known = [str(k) for k in known]
    for k in data:
        if str(k) in known:
            continue
        near = difflib.get_close_matches(str(k), known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(known)}"
        problems.append(f"{dotted(where, k)}: unknown key{hint}")


def mapping(value, where: str, problems: list[str]) -> dict:
    """``value`` if it is a mapping, {} for null; otherwise a problem and {}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {value!r}")
        return {}
    return value


def number(value):
    """A YAML 1.1 float written without an exponent sign (``1.0e4``) is read as a string by
    PyYAML; turn such strings back into numbers, leave everything else alone."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def is_int(value, low: int | None = None) -> bool:
    """An integer (not a bool), at least ``low`` when given."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low))


def is_number(value) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def assignment(item: str, flag: str, problems: list[str]) -> tuple[str, object, str] | None:
    """A command line's ``key=value`` (``--set``, ``--where``): (the key, the value read as
    YAML, else the text as given, the text); None and a problem naming the flag otherwise."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        problems.append(f"{flag} {item!r}: expected key=value")
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value, raw


def entries(where: str, spec, defaults: dict, problems: list[str]) -> dict | None:
    """``spec`` (a mapping or null) laid over ``defaults``; a key not in ``defaults`` is a
    problem. None (and a problem) when ``spec`` is not a mapping."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping of {', '.join(defaults)}, got {spec!r}")
        return None
    unknown_keys(spec, defaults, where, problems)
    return {**defaults, **{k: number(v) for k, v in spec.items() if k in defaults}}
