"""The wall-time simulator (cmkg.ablation.schedule): list scheduling on N slots, the critical
path, the two orders and the lower bound; `--predict` goes with `--dry-run`."""

import pytest

from cmkg import cli
from cmkg.ablation.schedule import Job, critical_path, order, predictions, simulate


def _chain_and_crumbs():
    # a long chain submitted last (teacher -> meta -> target) and six short independent stages
    crumbs = [Job(f"t{i}", "target", 1.0) for i in range(6)]
    chain = [Job("teacher", "teacher", 4.0), Job("meta", "meta", 3.0, ("teacher",)),
             Job("target", "target", 2.0, ("meta",))]
    return crumbs + chain


def test_simulate_counts_slots_inputs_and_order():
    jobs = _chain_and_crumbs()
    assert simulate(jobs, 1, "submission") == simulate(jobs, 1, "critical") == 15.0  # serial
    # two slots: submitted in order the chain starts after three crumbs on one slot (3 + 9);
    # longest chain first it starts at once and the crumbs fill the other slot (9)
    assert simulate(jobs, 2, "submission") == 12.0
    assert simulate(jobs, 2, "critical") == 9.0
    length, path = critical_path(jobs)
    assert length == 9.0 and [j.id for j in path] == ["teacher", "meta", "target"]
    # inputs come first in either order; critical: the longest remaining chain first
    ids = [j.id for j in order(jobs, "critical")]
    assert ids[:3] == ["teacher", "meta", "target"] and ids.index("meta") > ids.index("teacher")
    (p,) = predictions([jobs], [2])
    assert p == {"slots": 2, "submission": 12.0, "critical": 9.0, "bound": 9.0}
    # many slots: the critical path bounds the wall; an input outside the jobs counts as done
    assert simulate(jobs, 32) == 9.0
    assert simulate([Job("x", "target", 5.0, ("elsewhere",))], 2) == 5.0


def test_rounds_run_one_after_the_other_and_cycles_are_refused():
    a, b = [Job("a", "target", 2.0)], [Job("b", "target", 3.0)]
    (p,) = predictions([a, b], [4])
    assert p["critical"] == 5.0 and p["bound"] == 5.0  # the second round waits for the first
    with pytest.raises(ValueError, match="cycle"):
        simulate([Job("x", "t", 1.0, ("y",)), Job("y", "t", 1.0, ("x",))], 1)


def test_predict_needs_dry_run_and_slot_counts(capsys):
    assert cli.main(["ablate", "ablations/table3.yaml", "--predict", "2"]) == 2
    assert "--predict goes with --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["ablate", "ablations/table3.yaml", "--dry-run", "--predict", "0,2"])
    assert e.value.code == 2
