"""The artifact store: finished stages as folders, addressed by their key.

An *artifact* is the folder ``{store}/{stage}/{key[:20]}`` of a finished stage:

    model.pt      best weights (by validation EPE) with arch and modality
    phi.pt        (meta) phi_META, the final phi, with its form and parametrisation
    metrics.json  test metrics of those weights, best validation metrics, per-epoch history
    config.yaml   the full resolved config
    meta.json     key, the spec it hashes, input artifact keys, data fingerprints, code
                  version, device, timings
    digest.json   sha256 of each file above, written last before the publishing rename (not part
                  of any key or record; artifacts published before it existed have none)

Beside it live the two files of a stage in progress, and nowhere else:

    {key[:20]}.partial/   the stage while it trains, with ``checkpoint.pt`` written atomically
                          after every epoch; the finished folder appears by one rename of it,
                          so a reader never sees half an artifact
    {key[:20]}.lock       the writer lock: one process trains a key, the others wait for it

A store is a local folder or a pyarrow filesystem URI (``s3://...``) mirrored into a local
cache (``cmkg.storage``); artifacts are published locally, then uploaded.

Every cache hit (``Store.get``) and every input given by path (``open_artifact``) is checked
first (``check_artifact``): against ``digest.json``, or, for an artifact without one, cheaply
(files present and non-empty, JSON parses, ``.pt`` files have their zip directory). A corrupt
cached artifact is renamed ``{key[:20]}.corrupt-<time>`` with one line naming the file, and the
stage retrains; a corrupt explicit input is a DataError naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pickle
import shutil
import socket
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from cmkg import __version__, models, storage
from cmkg.atomic import atomic_path, sha256_file, write_json
from cmkg.config import Config
from cmkg.console import say
from cmkg.errors import DataError
from cmkg.regularizers import Regularizer


@dataclass
class Artifact:
    stage: str
    key: str
    path: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def load_phi(self) -> Regularizer:
        """The learned prior of a meta stage (Eq. 10), phi frozen."""
        if not (self.path / "phi.pt").is_file():
            raise DataError(f"{self.path}: not a meta stage folder (no phi.pt)")
        state = _torch_load(self.path / "phi.pt", "cpu")
        return Regularizer.from_phi_state(state).requires_grad_(False)

    def load_model(self, device: torch.device | str = "cpu") -> models.PoseNet:
        blob = _torch_load(self.path / "model.pt", device)
        net = models.build(blob["arch"], blob["modality"], blob.get("extra_channels", 0))
        net.load_state_dict(blob["state_dict"])
        return net.to(device)


def _torch_load(path: Path, device: torch.device | str):
    """``torch.load`` of an artifact's weights; a file it cannot read (an artifact without a
    digest whose corruption the cheap check missed) is a DataError naming it, not a traceback."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # torch's unpickling error is paragraphs about weights_only: its class says enough
        lines = str(e).strip().splitlines()
        first = lines[0] if lines and not isinstance(e, pickle.UnpicklingError) else \
            type(e).__name__
        raise DataError(f"{path}: cannot be loaded ({first}): a corrupt artifact; move "
                        f"{path.parent} aside (a stage of the store then trains again)") from None


def open_artifact(path: str | Path, cfg: Config | None = None, key: str = "inputs") -> Artifact:
    """A finished stage folder given by path or URI (``inputs.teacher``, ``regularizer.prior``);
    a URI is mirrored into ``{data.root}/artifacts`` first. A corrupt one (``check_artifact``)
    is a DataError naming the file: it is the user's folder, left as it is."""
    if storage.is_uri(path):
        root = Path(cfg.data.root if cfg else "data") / "artifacts"
        path = storage.mirror(str(path), root, key, storage.COMMIT_FILE)
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a finished cmkg stage folder ({e})") from None
    problem = check_artifact(path)
    if problem is not None:
        raise DataError(f"{key}={path}: corrupt artifact: {problem}")
    return Artifact(meta["stage"], meta["key"], path)


# ---------------------------------------------------------------------------------------------
# Digests: what a cache hit checks
# ---------------------------------------------------------------------------------------------

DIGEST_FILE = "digest.json"
REQUIRED = ("model.pt", "metrics.json", "config.yaml", "meta.json")  # every stage's files
_SOUND: dict[Path, tuple] = {}  # folder -> the stat of its files when last found sound


def write_digest(folder: Path) -> None:
    """``digest.json``: the sha256 of every file of the (partial) artifact folder ``folder``."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != DIGEST_FILE
                   and not p.name.startswith("."))
    write_json(Path(folder) / DIGEST_FILE, {"sha256": {p.name: sha256_file(p) for p in files}})


def check_artifact(folder: Path) -> str | None:
    """Why the artifact folder ``folder`` is unusable, naming the file; None when it is sound.

    With ``digest.json``: every file it lists is there with that sha256. Without (an artifact
    published before digests): the stage's files are there and non-empty, the JSON files parse
    and the ``.pt`` files have a readable zip directory (what truncation destroys); the weights
    are read whole only when loaded (``Artifact.load_model``). A folder found sound is not
    hashed again in this process while its files' size, mtime and inode stay the same."""
    folder = Path(folder)
    try:
        stat = tuple((p.name, s.st_size, s.st_mtime_ns, s.st_ino) for p in sorted(folder.iterdir())
                     if p.is_file() for s in [p.stat()])
    except OSError as e:
        return f"{folder}: unreadable ({e})"
    if _SOUND.get(folder) == stat:
        return None
    problem = _check_digest(folder) if (folder / DIGEST_FILE).exists() else _check_cheaply(folder)
    if problem is None:
        _SOUND[folder] = stat
    return problem


def _check_digest(folder: Path) -> str | None:
    try:
        recorded = json.loads((folder / DIGEST_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / DIGEST_FILE}: unreadable ({e})"
    for name, digest in sorted(recorded.items()):
        try:
            if sha256_file(folder / name) != digest:
                return f"{folder / name}: sha256 differs from {DIGEST_FILE} (truncated or changed)"
        except OSError as e:
            return f"{folder / name}: unreadable ({e.strerror or e})"
    return None


def _check_cheaply(folder: Path) -> str | None:
    names = [*REQUIRED, *(["phi.pt"] if (folder / "phi.pt").exists() else [])]
    for name in names:
        path = folder / name
        try:
            if path.stat().st_size == 0:
                return f"{path}: empty"
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".pt"):
                zipfile.ZipFile(path).close()  # reads the central directory at the file's end
        except FileNotFoundError:
            return f"{path}: missing"
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            return f"{path}: unreadable ({e})"
    return None


@functools.cache
def code_version() -> str:
    """git commit of the working tree (``-dirty`` if modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return __version__


class Store:
    """Artifacts under ``root/{stage}/{key[:20]}``: a local folder, or a pyarrow filesystem URI
    mirrored into the local ``cache`` (see ``cmkg.storage``). ``final`` is always the local
    folder a stage publishes into and readers open."""

    def __init__(self, root: str | Path, cache: str | Path | None = None,
                 filesystem: pafs.FileSystem | None = None):
        self.uri = str(root)
        self.fs, self.base = None, None
        if filesystem is not None:
            self.fs, self.base = filesystem, str(root).rstrip("/")
        elif storage.is_uri(root):
            self.fs, self.base = storage.open_uri(str(root), "run.store")
        self._corrupt_remote: set[tuple[str, str]] = set()  # downloaded once, found corrupt
        if self.fs is None:
            self.root = Path(root)
        else:
            default = Path("~/.cache/cmkg/store") / storage.short_hash(self.uri)
            self.root = Path(cache or default).expanduser()

    @classmethod
    def of(cls, cfg: Config) -> Store:
        return cls(cfg.run.store, cfg.run.cache)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:20]

    def partial(self, stage: str, key: str) -> Path:
        """The local folder of the stage while it trains (its checkpoint lives there)."""
        final = self.final(stage, key)
        return final.with_name(final.name + ".partial")

    def lock(self, stage: str, key: str) -> Path:
        """The file whose ``lockf`` lock gives one process the right to train the key."""
        final = self.final(stage, key)
        return final.with_name(final.name + ".lock")

    def location(self, stage: str, key: str) -> str:
        """Where the artifact lives for users: the remote path, or the local folder."""
        return f"{self.base}/{stage}/{key[:20]}" if self.remote else str(self.final(stage, key))

    def describe(self, stage: str, key: str) -> str:
        """The artifact's place for messages: ``scheme://path`` (no credentials) or a folder."""
        if self.remote:
            return f"{self.uri.split('://', 1)[0]}://{self.location(stage, key)}"
        return str(self.final(stage, key))

    def get(self, stage: str, key: str) -> Artifact | None:
        """The finished artifact of ``stage``/``key``, None if there is none or it is corrupt
        (``check_artifact``; moved aside, so the caller trains it again). A remote store's
        artifact is checked in the local mirror, after downloading it."""
        path = self.final(stage, key)
        if (path / storage.COMMIT_FILE).is_file():
            if self._sound(stage, key):
                self.commit(stage, key)  # a mirror whose upload was interrupted: finish it
                return Artifact(stage, key, path)
        if (self.remote and (stage, key) not in self._corrupt_remote
                and storage.exists(self.fs, f"{self.location(stage, key)}/{storage.COMMIT_FILE}")):
            storage.download_dir(self.fs, self.location(stage, key), path)
            if self._sound(stage, key, remote=True):
                return Artifact(stage, key, path)
            self._corrupt_remote.add((stage, key))  # not again for the writer's second look
        return None

    def _sound(self, stage: str, key: str, remote: bool = False) -> bool:
        """Check the local folder of a finished artifact; a corrupt one is renamed
        ``{key[:20]}.corrupt-<time>`` beside it (kept for a look, and never a cache hit again)
        with one line naming the file. A corrupt remote copy stays where it is: this store
        never deletes there; the stage retrains into the mirror."""
        path = self.final(stage, key)
        problem = check_artifact(path)
        if problem is None:
            return True
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another process set it aside first
            os.rename(path, aside)
        where = f" (as downloaded from {self.describe(stage, key)})" if remote else ""
        say(f"{stage}: corrupt artifact: {problem}{where}; moved aside to {aside.name}, to be "
            "trained again")
        return False

    def commit(self, stage: str, key: str) -> None:
        """Upload a published local artifact to a remote store (no-op for a local one)."""
        if not self.remote:
            return
        where = self.location(stage, key)
        if not storage.exists(self.fs, f"{where}/{storage.COMMIT_FILE}"):
            storage.upload_dir(self.final(stage, key), self.fs, where)
        self._drop_remote_partial(stage, key)  # the resumable checkpoint is spent

    def publish(self, stage: str, key: str) -> Artifact:
        """Turn the stage's partial folder into its artifact by one rename (then upload it).
        If another process published the same key first, theirs is kept."""
        final, partial = self.final(stage, key), self.partial(stage, key)
        (partial / "checkpoint.pt").unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            write_digest(partial)  # last: what every later cache hit checks the files against
            os.rename(partial, final)
        self.commit(stage, key)
        return Artifact(stage, key, final)

    def drop_partial(self, stage: str, key: str) -> None:
        """Remove the stage's partial folder, here and in a remote store: a run that diverged
        or that a sweep stopped is nothing to resume."""
        shutil.rmtree(self.partial(stage, key), ignore_errors=True)
        if self.remote:
            self._drop_remote_partial(stage, key)

    def _drop_remote_partial(self, stage: str, key: str) -> None:
        where = f"{self.location(stage, key)}.partial"
        if storage.exists(self.fs, where):
            self.fs.delete_dir(where)

    def push_checkpoint(self, stage: str, key: str, local: Path) -> None:
        """Copy the in-process checkpoint to the remote store, so another machine can resume."""
        if self.remote:
            where = f"{self.location(stage, key)}.partial/{local.name}"
            storage.upload_file(local, self.fs, where)

    def pull_checkpoint(self, stage: str, key: str, local: Path) -> None:
        """Fetch the remote checkpoint when this machine has none."""
        remote = f"{self.location(stage, key)}.partial/{local.name}"
        if self.remote and not local.is_file() and storage.exists(self.fs, remote):
            with atomic_path(local) as tmp:
                pafs.copy_files(remote, str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Train's checkpoints: ``{root}/_ray``."""
        if self.remote:
            return f"{self.base}/_ray", self.fs
        return str(self.root.resolve() / "_ray"), None


@contextlib.contextmanager
def writer_lock(store: Store, stage: str, key: str):
    """Exclusive right to train ``stage``/``key``: a POSIX lock (``lockf``) on
    ``{store}/{stage}/{key}.lock`` beside the artifact. The kernel (or the NFS lock manager)
    drops it when its owner dies, so a lock is never stale; the file names the owner for the
    waiting side's message. With a remote store the lock lives in this machine's mirror and
    excludes writers on this machine only (publishing stays safe: the first ``meta.json`` wins)."""
    lock = store.lock(stage, key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            say(f"{stage}: {owner} is training {key[:20]}; waiting for it")
            fcntl.lockf(f, fcntl.LOCK_EX)  # blocks until the owner publishes, fails or dies
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.lockf(f, fcntl.LOCK_UN)
