"""What Ray Tune calls during a sweep (``cmkg.cluster.tune``): the Optuna searcher that keeps the
study's trial states right, the scheduler that lets an Optuna pruner stop trials, and the
progress line per finished trial.

Ray's ``OptunaSearch`` runs its study with a ``NopPruner``, reports intermediate values at
Tune's ``training_iteration`` and tells a trial that Tune stopped early COMPLETE with its last
(per-epoch) value. ``PruningSearch`` reports at the trial's own ``epoch``, sets the pruner the
space asks for, tells a trial stopped before its final report (the one with test metrics: the
stage published) PRUNED and an errored one FAIL, and records each trial's last metrics, epochs,
wall time and artifact as user attributes, so that the study alone rebuilds ``trials.parquet``.
Tune asks the scheduler before it tells the searcher about a result, so ``OptunaPruning`` (the
scheduler of an ``optuna_pruner`` space) reports the value itself, then asks the pruner.
"""

from __future__ import annotations

import logging
import sys
import time

from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from cmkg.cluster.tune import REPORTED, finished, trial_params

logger = logging.getLogger(__name__)


def record_attrs(trial, result: dict) -> None:
    """The trial's last reported metrics, epochs run, wall time and artifact, on the Optuna
    trial (``optuna.trial.Trial``) before it is told: a finished trial is read-only."""
    trial.set_user_attr("metrics", {k: result[k] for k in REPORTED if k in result})
    for attr, key in (("epochs", "epoch"), ("wall_s", "time_total_s"), ("artifact", "artifact"),
                      ("tune_trial_id", "trial_id")):
        if result.get(key) is not None:
            trial.set_user_attr(attr, result[key])


class PruningSearch(OptunaSearch):
    """``OptunaSearch`` with the space's pruner and PRUNED / FAIL states (see the module)."""

    def __init__(self, *args, pruner=None, **kwargs):
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


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe_params(params: dict) -> str:
    """``regularizer.form=l2 sigma=3.1e-05``: a key's section is named once in a row."""
    out, section = [], None
    for name, value in params.items():
        head, _, leaf = name.rpartition(".")
        shown = leaf if head and head == section else name
        section = head
        out.append(f"{shown}={value:.3g}" if isinstance(value, float) else f"{shown}={value}")
    return " ".join(out)


class Progress(Callback):
    """One line on stderr per finished trial: its state (PRUNED with the epoch it stopped at),
    its metric, the best so far, its parameters, its wall time and the sweep's ETA."""

    def __init__(self, *, total: int, metric: str, mode: str, decode: dict[str, dict],
                 budget_s: float | None = None):
        self.total, self.metric, self.mode, self.decode = total, metric, mode, decode
        self.budget_s = budget_s
        self.start, self.done, self.done_before = time.monotonic(), 0, 0
        self.best: tuple[float, int] | None = None  # (value, finished-trial count)

    def setup(self, **info):  # also when a sweep resumes: its ETA counts from now
        self.start, self.done_before = time.monotonic(), self.done

    def line(self, state: str, result: dict, config: dict, note: str = "") -> str:
        self.done += 1
        value = result.get(self.metric)
        if state == "COMPLETE" and value is not None:
            better = self.best is None or (value < self.best[0] if self.mode == "min"
                                           else value > self.best[0])
            if better:
                self.best = (value, self.done)
        parts = [f"trial {self.done}/{self.total} {state}"]
        if state == "PRUNED":
            epoch = result.get("epoch")
            parts.append(f"at epoch {epoch}" if epoch else "before its first epoch")
        if note:
            parts.append(f"({note})")
        if value is not None:
            parts.append(f"{self.metric} {value:.2f}")
        if self.best is not None:
            parts.append(f"(best {self.best[0]:.2f}, trial {self.best[1]})")
        parts.append(describe_params(trial_params(config, self.decode)))
        wall = result.get("time_total_s")
        if wall is not None:
            parts.append(f" {duration(wall)}")
        elapsed = time.monotonic() - self.start
        left = elapsed / max(self.done - self.done_before, 1) * (self.total - self.done)
        if self.budget_s:
            left = min(left, max(self.budget_s - elapsed, 0.0))
        if self.done < self.total and not note:  # a note ends the sweep (the time budget)
            parts.append(f" ETA {duration(left)}")
        return " ".join(parts)

    def say(self, *args, **kwargs) -> None:
        print(self.line(*args, **kwargs), file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self.say("COMPLETE" if finished(result) else "PRUNED", result, trial.config)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say("FAIL", trial.last_result or {}, trial.config)
