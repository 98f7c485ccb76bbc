"""Where artifacts and datasets live: a local folder, or any URI a pyarrow filesystem opens
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file:///...``).

A *local* store is used in place: ``{root}/{stage}/{key[:20]}`` is the artifact folder, made
visible by one rename (see ``cmkg.stages``).

A *remote* store keeps the same layout under its URI plus a local mirror (``run.cache``, default
``~/.cache/cmkg/store/<hash of the URI>``). A stage trains and publishes into the mirror exactly
as into a local store, then uploads the folder with ``meta.json`` last: object stores make each
object appear whole, so a reader that sees ``meta.json`` sees a finished artifact. A reader finds
an artifact by its ``meta.json`` and downloads it into the mirror on first use. The in-process
path uploads its per-epoch checkpoint to ``{key[:20]}.partial/checkpoint.pt``, so a rerun on
another machine resumes it; under Ray Train, Ray's own checkpoints go to ``{root}/_ray`` on the
same filesystem (``Store.ray_storage``).

Datasets, upstream artifacts and priors given by URI (``data.source.path``, ``inputs.teacher``,
``regularizer.prior``) are downloaded once into a local folder named after the URI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cmkg.atomic import atomic_dir
from cmkg.errors import DataError

if TYPE_CHECKING:  # pyarrow is imported where a URI is opened: the CLI starts without it
    import pyarrow.fs as pafs

COMMIT_FILE = "meta.json"  # uploaded last; its presence marks a finished artifact


def is_uri(location: str | os.PathLike | None) -> bool:
    return location is not None and "://" in str(location)


def short_hash(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def open_uri(uri: str, key: str = "run.store") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for ``uri``; a DataError naming ``key`` when pyarrow cannot
    open it (unknown scheme, S3/GCS support missing, bad credentials or endpoint)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{key}={uri!r}: pyarrow cannot open this URI ({e})") from None
    return fs, path.rstrip("/")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def download_dir(fs: pafs.FileSystem, src: str, dst: Path) -> Path:
    """Copy the folder ``src`` of ``fs`` to the local folder ``dst``, atomically (a reader never
    sees a partial copy); an existing ``dst`` is reused (it is a mirror of immutable content)."""
    import pyarrow.fs as pafs

    dst = Path(dst)
    if dst.exists():
        return dst
    try:
        with atomic_dir(dst) as tmp:
            pafs.copy_files(src, str(tmp), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except OSError:
        if dst.exists():  # another process mirrored it first
            return dst
        raise
    return dst


def upload_dir(src: Path, fs: pafs.FileSystem, dst: str, last: str = COMMIT_FILE) -> None:
    """Copy the local folder ``src`` to ``dst`` on ``fs``, the file named ``last`` at the end."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the commit file goes last
    fs.create_dir(dst, recursive=True)
    for p in files:
        upload_file(p, fs, f"{dst}/{p.relative_to(src).as_posix()}")


def upload_file(src: Path, fs: pafs.FileSystem, dst: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(str(src), dst, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def mirror(uri: str, local_root: str | Path, key: str, marker: str) -> Path:
    """The local copy of the remote folder ``uri`` (downloaded on first use) under
    ``local_root``; ``marker`` is the file that must exist there (a DataError naming ``key``
    otherwise)."""
    fs, path = open_uri(uri, key)
    if not exists(fs, f"{path}/{marker}"):
        raise DataError(f"{key}={uri!r}: no {marker} there; not a finished cmkg folder")
    name = f"{path.rsplit('/', 1)[-1]}-{short_hash(uri)}"
    return download_dir(fs, path, Path(local_root).expanduser() / name)
