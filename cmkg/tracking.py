"""Experiment tracking, opt in: ``run.tracking: {backend: none | mlflow | tensorboard, uri}``.

Every stage that trains logs one run: its resolved config flattened as params
(``optim.lr``, ...), per epoch the numbers of its history record (the loss parts ``train/*``,
``val/*``, ``train_eval/*``, the gradient shares ``grad_share/*`` and the prior's strength
``prior/*`` where the stage measures them, ``train_time_s``), and at the end its test metrics
(``test/*``, ``mean_pose_test/*``, ``best_val_epe_mm``, ``best_epoch``); tags ``stage``,
``key``, ``seed``, ``artifact`` and, where they apply, ``table``, ``row``, ``sweep``,
``trial`` and ``command``. A cache hit logs nothing: it did not run.

MLflow runs nest: ``cmkg train``, ``ablate``, ``reproduce`` and ``tune`` open one parent run per
command (:func:`command`); a sweep's trials are runs under it (:func:`trial`), and the stages a
trial trains are runs under the trial. The parent travels to other processes as a small dict,
the *context* (:func:`current`, installed there with :func:`using`): Ray tasks and Ray Train
workers receive it as an argument, and processes started after :func:`command` (a local Ray)
inherit it through the environment variable ``CMKG_TRACKING``. TensorBoard has no nesting:
each stage writes its event files under ``{logdir}/{stage}-{key[:12]}/``.

Defaults (``uri: null``): MLflow ``sqlite:///{store}/mlflow.db`` (``mlflow ui
--backend-store-uri`` that URI opens it; for a remote store, in its local mirror), TensorBoard
``{store}/tensorboard``. A cluster of several machines points ``uri`` at an MLflow server.

Tracking is result-neutral: ``run.tracking`` enters no stage key and no record fingerprint.
A tracker that is down or misconfigured costs one warning line per process, after which that
process tracks nothing; the stage trains and publishes as without it. mlflow and tensorboard
are imported only when selected (``pip install -e '.[tracking]'``); nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cmkg.console import say

BACKENDS = ("none", "mlflow", "tensorboard")
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # backend -> the package it needs
EXPERIMENT = "cmkg"  # the MLflow experiment; MLFLOW_EXPERIMENT_NAME overrides it
ENV = "CMKG_TRACKING"  # the context, as JSON, for processes started after the parent run
TIMEOUT_S = 5  # seconds an MLflow server has to answer one request (no retries)

_context: dict | None = None  # this process's context (see ``current``)
_off: list[str] = []  # the reason tracking stopped in this process, once it warned
_trackers: dict[tuple, Tracker] = {}


def missing_package(backend: str) -> str | None:
    """The package ``backend`` needs that is not installed here, or None."""
    pkg = PACKAGES.get(backend)
    return pkg if pkg and importlib.util.find_spec(pkg) is None else None


# MLflow tracking URIs passed through as they are (a server, or a database MLflow opens)
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def _scheme(uri: str) -> str:
    """``http`` of ``http://host``; "" for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def uri_problem(backend: str, uri: str | None) -> str | None:
    """Why ``run.tracking.uri`` cannot work with ``backend`` (checked by ``config.load``, so
    before anything trains), or None. MLflow takes a server or database URI, or a folder (a
    path or ``file://``), TensorBoard a folder."""
    if uri is None or backend not in ("mlflow", "tensorboard"):
        return None
    scheme = _scheme(uri)
    if backend == "mlflow" and scheme not in ("", "file", *MLFLOW_SCHEMES):
        return (f"{uri!r}: MLflow takes a folder, file://FOLDER, or a URI of "
                f"{', '.join(s + '://' for s in MLFLOW_SCHEMES)}")
    if backend == "tensorboard" and scheme not in ("", "file"):
        return f"{uri!r}: TensorBoard writes to a folder (a path or file://FOLDER)"
    return None


def resolve_uri(backend: str, uri: str | None, store_root: str | Path) -> str:
    """What a backend is given for ``run.tracking.uri``: null -> ``default_uri``; for MLflow a
    server or database URI as it is, a folder (MLflow 3 refuses a file store) -> a SQLite
    database ``mlflow.db`` inside it, created if missing; for TensorBoard the folder."""
    if uri is None:
        return default_uri(backend, store_root)
    scheme = _scheme(uri)
    if backend == "mlflow" and scheme in MLFLOW_SCHEMES:
        return uri
    folder = Path(uri[len("file://"):] if scheme == "file" else uri).expanduser().resolve()
    if backend == "mlflow":
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"
    return str(folder)


def default_uri(backend: str, store_root: str | Path) -> str:
    """Where a backend writes when ``run.tracking.uri`` is null: beside the (local) store."""
    root = Path(store_root).expanduser().resolve()
    if backend == "mlflow":
        return f"sqlite:///{root / 'mlflow.db'}"
    return str(root / "tensorboard")


# ---------------------------------------------------------------------------------------------
# Robustness: one warning, then nothing
# ---------------------------------------------------------------------------------------------

def _guarded(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None once tracking failed in this process: the first failure
    prints one warning line and turns tracking off here; training never sees it."""
    if _off:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a tracker never costs a stage
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
        _off.append(why)
        say(f"cmkg: warning: tracking failed ({what}: {why}); this process trains on without "
            "tracking")
        return None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

class Tracker:
    """A backend: runs opened (nested under ``parent`` where it nests), logged to and ended by
    the id ``start_run`` returned (None: this backend keeps no such run)."""

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None,
                  folder: str | None = None) -> str | None:
        return None

    def log_params(self, run: str, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, run: str, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, run: str, tags: dict[str, str]) -> None:
        pass

    def end_run(self, run: str, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (no global active run, so any thread or process may log
    to any run); nesting by the ``mlflow.parentRunId`` tag. Requests to a server time out after
    ``TIMEOUT_S`` seconds and are not retried."""

    def __init__(self, uri: str, experiment_id: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(TIMEOUT_S))
        from mlflow.tracking import MlflowClient

        self.uri, self.client = uri, MlflowClient(tracking_uri=uri)
        self._experiment = experiment_id

    @property
    def experiment_id(self) -> str:
        if self._experiment is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            if found is None:
                try:
                    self._experiment = self.client.create_experiment(name)
                except Exception:  # created by another process meanwhile
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
            self._experiment = self._experiment or found.experiment_id
        return self._experiment

    def start_run(self, name, tags, parent=None, folder=None):
        tags = dict(tags)
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def log_params(self, run, params):
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a request
            self.client.log_batch(run, params=items[i:i + 100])

    def log_metrics(self, run, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run, metrics=items[i:i + 1000])

    def set_tags(self, run, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(run, tags=[RunTag(k, v) for k, v in tags.items()])

    def end_run(self, run, status="FINISHED"):
        self.client.set_terminated(run, status)


class TensorBoardTracker(Tracker):
    """Event files through ``torch.utils.tensorboard.SummaryWriter``, one folder per stage run
    (``folder``); runs without a folder (a command, a trial) are not kept. Params and tags are
    a text summary each."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir, self._writer = logdir, SummaryWriter
        self.writers: dict[str, object] = {}

    def start_run(self, name, tags, parent=None, folder=None):
        if folder is None:
            return None
        path = str(Path(self.logdir) / folder)
        self.writers[path] = self._writer(log_dir=path)
        self.set_tags(path, {"run": name, **tags})
        return path

    def log_params(self, run, params):
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writers[run].add_text("config", f"| entry | value |\n|---|---|\n{rows}")

    def log_metrics(self, run, metrics, step=None):
        w = self.writers[run]
        for k, v in metrics.items():
            w.add_scalar(k, v, step or 0)
        w.flush()

    def set_tags(self, run, tags):
        self.writers[run].add_text("tags", "  \n".join(f"{k}: {v}" for k, v in tags.items()))

    def end_run(self, run, status="FINISHED"):
        w = self.writers.pop(run)
        w.add_text("status", status)
        w.close()


def tracker(backend: str, uri: str, experiment_id: str | None = None) -> Tracker:
    """The process's tracker for ``backend`` at ``uri`` (made once; a no-op one for none, or
    when it cannot be made: that costs the one warning)."""
    key = (backend, uri)
    if key not in _trackers:
        made = None
        if backend == "mlflow":
            made = _guarded(f"mlflow at {uri}", MlflowTracker, uri, experiment_id)
        elif backend == "tensorboard":
            made = _guarded(f"tensorboard at {uri}", TensorBoardTracker, uri)
        _trackers[key] = made or Tracker()
    return _trackers[key]


class Run:
    """One run of a tracker; every call is guarded (``_guarded``) and a run that could not
    start (or a backend that keeps none) takes them as no-ops."""

    def __init__(self, tracker: Tracker, name: str, tags: dict, parent: str | None = None,
                 folder: str | None = None):
        self.tracker, self.name = tracker, name
        self.status = "FINISHED"  # how ``command`` ends it when its block returns
        self.id = _guarded(f"starting run {name!r}", tracker.start_run, name,
                           _strings(tags), parent, folder)

    def _call(self, what: str, fn, *args) -> None:
        if self.id is not None:
            _guarded(f"{what} of run {self.name!r}", fn, self.id, *args)

    def params(self, params: dict) -> None:
        self._call("params", self.tracker.log_params, _strings(params))

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if metrics:
            self._call("metrics", self.tracker.log_metrics, metrics, step)

    def tags(self, tags: dict) -> None:
        self._call("tags", self.tracker.set_tags, _strings(tags))

    def end(self, status: str = "FINISHED") -> None:
        self._call("ending", self.tracker.end_run, status)
        self.id = None


def _strings(d: dict) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in d.items()
            if v is not None}


def status_of(exc: BaseException | None) -> str:
    """FINISHED; FAILED for an error; KILLED for an interrupt or a sweep stopping a trial."""
    if exc is None:
        return "FINISHED"
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


# ---------------------------------------------------------------------------------------------
# What is logged
# ---------------------------------------------------------------------------------------------

def flatten(d: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists and None kept as values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scalars(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``d`` as ``a/b/c`` names; per-layer tables (``layers``) left out."""
    out = {}
    for k, v in d.items():
        if k == "layers":
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def epoch_metrics(record: dict) -> dict[str, float]:
    """One epoch's history record as metrics: ``train/loss``, ``train/reg``, ...,
    ``val/epe_mm``, ``train_eval/epe_mm``, ``grad_share/*``, ``prior/*`` (the overall D and
    gradient ratio), ``train_time_s``."""
    rec = {k: v for k, v in record.items() if k not in ("epoch", "diagnostics")}
    diag = record.get("diagnostics", {})
    out = scalars(rec)
    out.update(scalars({"grad_share": diag.get("grad_share", {})}))
    out.update(scalars({"prior": (diag.get("prior_strength") or {}).get("overall", {})}))
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """A published stage's ``metrics.json`` as its closing metrics."""
    keep = ("test", "mean_pose_test", "best_val_epe_mm", "best_epoch", "calibration")
    return scalars({k: metrics[k] for k in keep if k in metrics})


# ---------------------------------------------------------------------------------------------
# The context: the parent run and tags, within and across processes
# ---------------------------------------------------------------------------------------------

def current() -> dict | None:
    """This process's context (what ``using`` installs elsewhere): backend, uri (as configured,
    ``raw_uri``, and resolved), experiment, parent run id, tags, per-node tags. None without."""
    if _context is not None:
        return _context
    text = os.environ.get(ENV)
    if text:
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return None


@contextlib.contextmanager
def using(ctx: dict | None) -> Iterator[None]:
    """Install ``ctx`` (from ``current()`` or ``for_node`` in another process) while the block
    runs: a Ray task, a Ray Train worker, a sweep's trial."""
    global _context
    saved = _context
    _context = ctx if ctx is not None else saved
    try:
        yield
    finally:
        _context = saved


def for_node(*keys: str) -> dict | None:
    """The context a process training the nodes ``keys`` needs: this one, with only those
    nodes' own tags (``annotate``)."""
    ctx = current()
    if ctx is None:
        return None
    nodes = ctx.get("nodes", {})
    return {**ctx, "nodes": {k: nodes[k] for k in keys if k in nodes}}


def annotate(tags_by_key: dict[str, dict[str, str]]) -> None:
    """Tags of individual nodes (the ablation runner: the tables and rows a stage serves),
    applied to the runs of those nodes wherever they train."""
    if _context is not None:
        _context.setdefault("nodes", {}).update(tags_by_key)


def annotate_cells(cells) -> None:
    """The ablation runner's cells (each with ``table``, ``row`` and its plan ``nodes``):
    every stage a cell needs is tagged with the tables it serves, the cell's own stage (the one
    it reports) also with the rows, comma-separated where a stage serves several."""
    if _context is None:
        return
    tables: dict[str, set] = {}
    rows: dict[str, set] = {}
    for c in cells:
        for n in c.nodes:
            tables.setdefault(n.key, set()).add(c.table)
        rows.setdefault(c.nodes[-1].key, set()).add(c.row)
    annotate({k: {"table": ",".join(sorted(t)),
                  **({"row": ",".join(sorted(rows[k]))} if k in rows else {})}
              for k, t in tables.items()})


def tag_command(**tags: str) -> None:
    """Tags of the whole command (a sweep's name): set on its parent run and carried by the
    context to every run below it (and to processes started from now on)."""
    ctx = _context
    if ctx is None:
        return
    ctx.setdefault("tags", {}).update(tags)
    os.environ[ENV] = json.dumps({k: v for k, v in ctx.items() if k != "nodes"})
    if ctx.get("parent"):
        t = tracker(ctx["backend"], ctx["uri"], ctx.get("experiment_id"))
        _guarded("tags of the command's run", t.set_tags, ctx["parent"], _strings(tags))


@contextlib.contextmanager
def command(cfg, store_root: str | Path, name: str, tags: dict | None = None,
            ) -> Iterator[Run | None]:
    """The parent run of one command (``cmkg train``/``ablate``/``reproduce``/``tune``): opened
    with the command's base config as params, installed as this process's context (and in
    ``CMKG_TRACKING`` for processes started while it runs), ended FINISHED, or FAILED/KILLED
    if the block raises. Yields None (and tracks nothing) with ``backend: none``."""
    global _context
    t = cfg.run.tracking
    if t.backend == "none":
        yield None
        return
    uri = resolve_uri(t.backend, t.uri, store_root)
    tr = tracker(t.backend, uri)
    tags = {"command": name, **(tags or {})}
    run = Run(tr, name, tags)
    run.params(flatten(cfg.to_dict()))
    experiment = getattr(tr, "_experiment", None)
    saved, saved_env = _context, os.environ.get(ENV)
    _context = {"backend": t.backend, "raw_uri": t.uri, "uri": uri, "experiment_id": experiment,
                "parent": run.id, "tags": {"command": name, **(tags or {})},
                "off": bool(_off)}  # failed here already: the workers do not try again
    os.environ[ENV] = json.dumps(_context)
    try:
        yield run
    except BaseException as e:
        run.end(status_of(e))
        raise
    else:
        run.end(run.status)
    finally:
        _context = saved
        if saved_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved_env


def _target(cfg, store_root: str | Path) -> tuple[Tracker, dict, str | None]:
    """(tracker, context tags, parent run id) for a run of config ``cfg`` in this process: the
    context's uri and parent where it is the same backend and uri as ``cfg`` asks for."""
    t = cfg.run.tracking
    ctx = current() or {}
    same = ctx.get("backend") == t.backend and ctx.get("raw_uri") == t.uri
    if same and ctx.get("off"):
        return Tracker(), {}, None
    uri = ctx["uri"] if same else resolve_uri(t.backend, t.uri, store_root)
    tr = tracker(t.backend, uri, ctx.get("experiment_id") if same else None)
    return tr, (ctx.get("tags", {}) if same else {}), (ctx.get("parent") if same else None)


@contextlib.contextmanager
def trial(ctx: dict | None, name: Callable[[], str], params: dict) -> Iterator[Run]:
    """A sweep's trial (``name()``: its id, asked only when tracked) as a run under the
    sweep's command run (``ctx``: the context the driver handed the trial), tagged ``trial``
    and with the sampled ``params`` (a sweep's runs compare by them); the stages the block
    trains nest under it. Ended as ``StageRun`` ends a stage's. Without a context (tracking
    off) the run is a no-op."""
    if not ctx or ctx.get("backend") in (None, "none") or ctx.get("off"):
        yield Run(Tracker(), "trial", {})
        return
    name = str(name())
    tr = tracker(ctx["backend"], ctx["uri"], ctx.get("experiment_id"))
    tags = {**ctx.get("tags", {}), "trial": name}
    run = Run(tr, f"trial {name}", tags, ctx.get("parent"))
    run.params(params)
    try:
        with using({**ctx, "parent": run.id or ctx.get("parent"), "tags": tags}):
            yield run
    except BaseException as e:
        run.end(status_of(e))
        raise
    run.end()


class StageRun:
    """The run of one stage as it trains (``stages.train_node``): ``history`` (the epochs of a
    resumed run), ``epoch`` after each epoch, then ``finish``; used as a context manager, an
    exception leaving it ends the run FAILED (an error) or KILLED (an interrupt, a sweep
    stopping the trial). A no-op with ``backend: none`` or when not ``active`` (the ranks of a
    data-parallel run other than 0)."""

    def __init__(self, node, store_root: str | Path, active: bool = True):
        self.run: Run | None = None
        if not active or node.cfg.run.tracking.backend == "none":
            return
        tr, base_tags, parent = _target(node.cfg, store_root)
        ctx = current() or {}
        tags = {**base_tags, **ctx.get("nodes", {}).get(node.key, {}), "stage": node.stage,
                "key": node.key, "seed": str(node.cfg.run.seed)}
        self.run = Run(tr, f"{node.stage} {node.key[:12]}", tags, parent,
                       folder=f"{node.stage}-{node.key[:12]}")
        self.run.params(flatten(node.cfg.to_dict()))

    def history(self, records: list[dict]) -> None:
        if self.run is not None and records:
            self.run.tags({"resumed_after_epoch": str(records[-1]["epoch"])})
            for record in records:
                self.epoch(record)

    def epoch(self, record: dict) -> None:
        if self.run is not None:
            self.run.metrics(epoch_metrics(record), step=record["epoch"])

    def finish(self, metrics: dict, artifact: str) -> None:
        if self.run is not None:
            last = metrics["history"][-1]["epoch"] if metrics.get("history") else 0
            self.run.metrics(final_metrics(metrics), step=last)
            self.run.tags({"artifact": artifact})
            self.run.end()

    def fail(self, exc: BaseException) -> None:
        if self.run is not None and self.run.id is not None:
            self.run.end(status_of(exc))

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.fail(exc)
        elif self.run is not None and self.run.id is not None:  # left without finish()
            self.run.end()
