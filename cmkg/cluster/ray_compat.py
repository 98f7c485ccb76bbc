"""The one module that touches private state of Ray Tune and Optuna, for sweeps
(``cmkg.cluster.tune``). Importing it checks the versions it was written against (Ray
``RAY_SERIES``.x, Optuna ``OPTUNA_MAJOR``.x) and refuses others with a message naming both;
``tests/test_ray_compat.py`` asserts that every internal below still exists, with the kind
this module expects, on real instances, so an upgrade that changes them fails there first.

Why it is needed. Ray's ``OptunaSearch`` runs its study with a ``NopPruner``, reports
intermediate values at Tune's ``training_iteration`` and tells a trial that Tune stopped early
COMPLETE with its last (per-epoch) value. :class:`PruningSearch` reports at the trial's own
``epoch``, sets the pruner the space asks for, tells a trial stopped before its final report
(the one with test metrics: the stage published) PRUNED and an errored one FAIL, and records
each trial's last metrics, epochs, wall time and artifact as user attributes, so that the study
alone rebuilds ``trials.parquet``. Tune asks the scheduler before it tells the searcher about a
result, so :class:`OptunaPruning` (the scheduler of an ``optuna_pruner`` space) reports the
value itself, then asks the pruner.

The internals used (``INTERNALS`` lists them for the test):

- ``OptunaSearch._setup_study(mode)``: overridden, to set the space's pruner once the study
  exists (the constructor or ``set_search_properties`` calls it);
- ``OptunaSearch._ot_study`` (the ``optuna.Study``: its ``pruner`` is replaced, trials are
  told through it), ``OptunaSearch._ot_trials`` (Tune trial id -> ``optuna.trial.Trial``) and
  ``OptunaSearch._completed_trials`` (the Tune trial ids already told);
- ``optuna.trial.FrozenTrial._trial_id`` and the ``optuna.trial.Trial(study, trial_id)``
  constructor: a handle on a trial that is still RUNNING in the study (:func:`running_trial`,
  for trials a time budget stopped without telling the searcher);
- ``ray._private.state.available_resources_per_node`` (:func:`free_resources_per_node`);
- the way Tune stops a function trial: ``sys.exit`` inside ``tune.report``
  (``_TrainSession._report_training_result``), caught as :data:`TRIAL_STOPPED`.
"""

from __future__ import annotations

import logging

import optuna
import ray
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from cmkg.cluster.tune_results import finished, record_attrs
from cmkg.errors import UserError

logger = logging.getLogger(__name__)

RAY_SERIES = "2.60"  # major.minor: Tune's internals change between minor releases
OPTUNA_MAJOR = "5"
INTERNALS = {  # owner -> private name -> what it must be (checked by tests/test_ray_compat.py)
    "OptunaSearch": {"_setup_study": "method(mode)", "_ot_study": "optuna.Study",
                     "_ot_trials": "dict[str, optuna.trial.Trial]", "_completed_trials": "set"},
    "optuna.trial.FrozenTrial": {"_trial_id": "int (the storage's id)"},
    "optuna.trial.Trial": {"__init__": "(study, trial_id)"},
    "ray._private.state": {"available_resources_per_node": "function() -> {node id: {res: n}}"},
    "ray.train._internal.session._TrainSession": {
        "_report_training_result": "sys.exit when the trial is stopped"},
}
# What ``tune.report`` raises in a function trial that Tune stops (ASHA, a pruner, the time
# budget): Ray's session calls ``sys.exit(0)`` there.
TRIAL_STOPPED = SystemExit


class IncompatibleVersions(UserError):
    """Ray or Optuna is not the version this module's use of their internals was checked
    against."""


def check_versions(ray_version: str, optuna_version: str) -> None:
    """Raise :class:`IncompatibleVersions`, naming both versions, unless Ray is
    ``RAY_SERIES``.x and Optuna ``OPTUNA_MAJOR``.x."""
    if (ray_version.split(".")[:2] == RAY_SERIES.split(".")
            and optuna_version.split(".")[0] == OPTUNA_MAJOR):
        return
    raise IncompatibleVersions(
        f"sweeps need Ray {RAY_SERIES}.x and Optuna {OPTUNA_MAJOR}.x (cmkg/cluster/ray_compat.py "
        f"uses private parts of both, checked against those versions); this environment has Ray "
        f"{ray_version} and Optuna {optuna_version}. Install ray[tune]=={RAY_SERIES}.* and "
        f"'optuna>={OPTUNA_MAJOR},<{int(OPTUNA_MAJOR) + 1}', or port ray_compat.py to the new "
        "versions and run tests/test_ray_compat.py")


check_versions(ray.__version__, optuna.__version__)


class PruningSearch(OptunaSearch):
    """``OptunaSearch`` with the space's pruner and PRUNED / FAIL states (see the module)."""

    def __init__(self, *args, pruner=None, **kwargs):
        # these names are pickled with the searcher's state (``OptunaSearch.save`` pickles
        # ``__dict__``): a resumed sweep restores them, so keep them
        self._pruner = pruner
        self._reported: dict[str, set] = {}  # trial id -> epochs told to Optuna
        self._last: dict[str, dict] = {}  # trial id -> its last result (for an error)
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._pruner is not None:
            self._ot_study.pruner = self._pruner

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # a time budget's stop is matched back by this id
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def report(self, trial_id: str, result: dict):
        """Tell Optuna a per-epoch value (step = the stage's epoch); the Optuna trial or None."""
        trial = self._ot_trials.get(trial_id)
        step, value = result.get("epoch"), result.get(self.metric)
        if trial is None or step is None or value is None or finished(result):
            return trial
        self._last[trial_id] = result
        if step not in self._reported.setdefault(trial_id, set()):
            self._reported[trial_id].add(step)
            trial.report(value, int(step))
        return trial

    def should_prune(self, trial_id: str, result: dict) -> bool:
        trial = self.report(trial_id, result)
        return trial is not None and not finished(result) and trial.should_prune()

    def on_trial_result(self, trial_id: str, result: dict):
        self.report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return
        result = result or self._last.get(trial_id) or {}
        if result:
            self.report(trial_id, result)
            record_attrs(trial, result)
        if error:
            state, value = TrialState.FAIL, None
        elif finished(result):
            state, value = TrialState.COMPLETE, result.get(self.metric)
        else:  # stopped by the scheduler or the pruner: Optuna keeps its last epoch's value
            state, value = TrialState.PRUNED, None
        try:
            self._ot_study.tell(trial, value, state=state)
        except Exception as e:  # e.g. a NaN value: Optuna refuses it, Tune goes on
            logger.warning("optuna could not record trial %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)


class OptunaPruning(FIFOScheduler):
    """Stops a trial when the study's pruner says so (an ``optuna_pruner`` space)."""

    def __init__(self, search: PruningSearch):
        super().__init__()
        self._search = search

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._search.should_prune(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def running_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.trial.Trial:
    """A handle on ``frozen``, a trial still RUNNING in ``study``, to report and set attributes
    on (Optuna's public API hands these out only from ``study.ask()``)."""
    return optuna.trial.Trial(study, frozen._trial_id)


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """Ray node id -> its resources free right now (Ray has no public per-node view)."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()
