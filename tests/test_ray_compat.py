"""The private parts of Ray Tune and Optuna that sweeps use (``cmkg/cluster/ray_compat.py``, the
only module that touches them) still exist, with the kind the adapter expects, on real
instances; an upgrade that changes one fails here by name, not deep inside a sweep. Then the
adapter itself, on a real study without Ray running: the pruner it sets, the states it tells."""

import inspect
import pickle
from types import SimpleNamespace

import optuna
import pytest
import ray
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from cmkg.cluster import ray_compat
from cmkg.cluster.ray_compat import (
    IncompatibleVersions,
    OptunaPruning,
    PruningSearch,
    check_versions,
)
from cmkg.cluster.spaces import Param, Space

SPACE = Space(path="space.yaml", stage="target",
              params=[Param("optim.lr", "float", 1e-4, 1e-1, log=True)])


def _search(cls=PruningSearch, **kwargs) -> OptunaSearch:
    return cls(space=SPACE.define_by_run, metric="val_epe_mm", mode="min",
               sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_versions_are_the_ones_the_adapter_was_checked_against():
    assert ray.__version__.startswith(f"{ray_compat.RAY_SERIES}.")
    assert optuna.__version__.split(".")[0] == ray_compat.OPTUNA_MAJOR
    check_versions(ray.__version__, optuna.__version__)
    for r, o in (("2.61.0", optuna.__version__), ("3.60.0", optuna.__version__),
                 (ray.__version__, "6.0.0"), (ray.__version__, "4.4.0")):
        with pytest.raises(IncompatibleVersions) as e:
            check_versions(r, o)
        message = str(e.value)
        assert f"Ray {r} and Optuna {o}" in message and "Ray 2.60.x" in message, message


def test_optuna_search_private_state():
    """What PruningSearch reads and overrides in Ray's OptunaSearch (see INTERNALS)."""
    assert set(ray_compat.INTERNALS["OptunaSearch"]) == {
        "_setup_study", "_ot_study", "_ot_trials", "_completed_trials"}
    setup = inspect.getattr_static(OptunaSearch, "_setup_study")
    assert inspect.isfunction(setup) and _params(setup) == ["self", "mode"]
    assert "_setup_study" in inspect.getsource(OptunaSearch.__init__)  # called with a space
    search = _search(OptunaSearch)  # Ray's own class, not the subclass
    assert isinstance(search._ot_study, optuna.Study)
    assert isinstance(search._ot_study.pruner, optuna.pruners.NopPruner)  # what we replace
    assert search._ot_trials == {} and isinstance(search._ot_trials, dict)
    assert search._completed_trials == set()
    search.suggest("t1")
    assert isinstance(search._ot_trials["t1"], optuna.trial.Trial)
    assert search._ot_trials["t1"].params.keys() == {"optim.lr"}
    search.on_trial_complete("t1", {"val_epe_mm": 3.0})
    assert search._completed_trials == {"t1"}
    # the hooks PruningSearch overrides keep their signatures
    assert _params(OptunaSearch.suggest) == ["self", "trial_id"]
    assert _params(OptunaSearch.on_trial_result) == ["self", "trial_id", "result"]
    assert _params(OptunaSearch.on_trial_complete) == ["self", "trial_id", "result", "error"]


def test_optuna_running_trial_handle():
    """FrozenTrial._trial_id and Trial(study, trial_id): a RUNNING trial reported to and
    told by number (how a time budget's stopped trials are settled)."""
    assert _params(optuna.trial.Trial.__init__) == ["self", "study", "trial_id"]
    study = optuna.create_study()
    study.ask()
    (frozen,) = study.get_trials(deepcopy=False)
    assert isinstance(frozen._trial_id, int) and not isinstance(frozen._trial_id, bool)
    trial = ray_compat.running_trial(study, frozen)
    assert isinstance(trial, optuna.trial.Trial) and trial.number == frozen.number
    trial.report(3.0, 1)
    trial.set_user_attr("epochs", 1)
    study.tell(frozen.number, None, state=TrialState.PRUNED)
    (t,) = study.trials
    assert (t.state, t.value, t.intermediate_values, t.user_attrs) == (
        TrialState.PRUNED, 3.0, {1: 3.0}, {"epochs": 1})


def test_scheduler_hook_and_decisions():
    assert _params(FIFOScheduler.on_trial_result) == ["self", "tune_controller", "trial",
                                                       "result"]
    assert TrialScheduler.STOP and TrialScheduler.CONTINUE


def test_tune_stops_a_function_trial_with_system_exit_in_report():
    """A trial Tune stops leaves ``tune.report`` by ``sys.exit``: the trial catches
    TRIAL_STOPPED to drop its stage's checkpoint."""
    from ray import tune
    from ray.train._internal import session

    assert ray_compat.TRIAL_STOPPED is SystemExit
    assert inspect.getsourcefile(tune.report) == session.__file__
    assert "get_session().report(" in inspect.getsource(tune.report)
    assert "_report_training_result" in inspect.getsource(session._TrainSession.report)
    source = inspect.getsource(session._TrainSession._report_training_result)
    assert "stop_event.is_set()" in source and "sys.exit(" in source


def test_per_node_resources_function_exists():
    from ray._private import state

    assert inspect.isfunction(state.available_resources_per_node)
    assert _params(state.available_resources_per_node) == []


@pytest.mark.ray
def test_per_node_resources_on_a_running_ray(local_ray):
    free = ray_compat.free_resources_per_node()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    assert set(free) == alive and all(isinstance(v, dict) for v in free.values())
    assert all(0 <= v.get("CPU", 0) <= 2 for v in free.values())


def test_pruning_search_tells_complete_pruned_and_failed_trials():
    """The adapter on a real (in-memory) study: the space's pruner replaces Ray's NopPruner,
    values are reported at the trial's epoch (once each), the pruner stops a trial worse than
    the median, and the states told are COMPLETE (final report), PRUNED (stopped, with its
    last epoch's value) and FAIL, with the trial's attributes recorded."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    search = _search(pruner=pruner)
    study = search._ot_study
    assert study.pruner is pruner
    scheduler = OptunaPruning(search)

    def result(trial_id, epoch, value, **extra):
        return {"val_epe_mm": value, "epoch": epoch, "trial_id": trial_id, **extra}

    for trial_id in ("a", "b", "c"):
        search.suggest(trial_id)
    for epoch, value in ((1, 10.0), (2, 9.0)):
        r = result("a", epoch, value)
        assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="a"), r) == "CONTINUE"
        search.on_trial_result("a", r)  # Tune tells the searcher too: reported once
    search.on_trial_complete("a", result("a", 2, 8.5, test_epe_mm=9.5, time_total_s=4.0,
                                         artifact="runs/target/abc"))
    r = result("b", 1, 20.0, time_total_s=1.0)
    assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="b"), r) == "STOP"
    search.on_trial_complete("b", r)
    search.on_trial_complete("c", None, error=True)
    search.on_trial_complete("c", None, error=True)  # told once
    a, b, c = study.get_trials()
    assert (a.state, a.value, a.intermediate_values) == (TrialState.COMPLETE, 8.5,
                                                         {1: 10.0, 2: 9.0})
    assert a.user_attrs == {"tune_trial_id": "a", "epochs": 2, "wall_s": 4.0,
                            "artifact": "runs/target/abc",
                            "metrics": {"val_epe_mm": 8.5, "test_epe_mm": 9.5}}
    assert (b.state, b.value, b.user_attrs["epochs"]) == (TrialState.PRUNED, 20.0, 1)
    assert c.state == TrialState.FAIL and c.user_attrs == {"tune_trial_id": "c"}
    assert search._completed_trials == {"a", "b", "c"}


def test_pruning_search_state_survives_save_and_restore(tmp_path):
    """Tune checkpoints the searcher with OptunaSearch.save (a pickle of ``__dict__``) and a
    resumed sweep restores it: the subclass's own state travels with it."""
    search = _search(pruner=optuna.pruners.MedianPruner())
    search.suggest("a")
    search.on_trial_result("a", {"val_epe_mm": 5.0, "epoch": 1})
    search.save(str(tmp_path / "searcher.pkl"))
    again = _search()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again._reported == {"a": {1}} and again._last["a"]["val_epe_mm"] == 5.0
    assert isinstance(again._pruner, optuna.pruners.MedianPruner)
    assert set(again._ot_trials) == {"a"}


def test_classes_that_older_sweeps_pickled_still_resolve():
    """Sweeps started before the split pickled their searcher, scheduler and callback (Ray
    Tune's tuner.pkl) as cmkg.cluster.tune_hooks.*; --resume unpickles them by those names."""
    from cmkg.cluster import tune, tune_hooks

    assert tune_hooks.PruningSearch is PruningSearch and tune_hooks.OptunaPruning is OptunaPruning
    assert tune_hooks.Progress is tune.Progress
    for name in ("PruningSearch", "OptunaPruning", "Progress"):  # a global, as pickled then
        assert pickle.loads(f"ccmkg.cluster.tune_hooks\n{name}\n.".encode()) is getattr(
            tune_hooks, name)
