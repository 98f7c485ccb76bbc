"""The calibrated prior (``regularizer.calibrate_d``): phi_META scaled to a set strength D.

Why a scale is a beta: Algorithm 1's phi, learned from 0 with SGD, is linear in beta to first
order (theta's trajectory does not depend on phi), so c * phi_META is the phi of beta * c."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from cmkg import config, regularizers, stages
from cmkg.config import ConfigError
from cmkg.meta import meta_iteration
from tests.test_meta import LOSS_KW, Tiny, _toy_batches


def _learn_phi(beta: float, batches, teacher) -> list[torch.Tensor]:
    torch.manual_seed(0)
    student = Tiny(3).double()
    reg = regularizers.build("weighted_l2", student).double()
    theta_opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=beta)
    for b in batches:
        meta_iteration(student, nn.Identity(), teacher, reg, b, theta_opt, phi_opt, alpha=2.5e-4,
                       steps=1, first_order=False, **LOSS_KW)
    return [p.detach().clone() for p in reg.phi()]


def test_phi_of_algorithm1_is_linear_in_beta():
    torch.manual_seed(0)
    teacher = Tiny(1).double().eval()
    batches = _toy_batches(1, 30, teacher)
    small, big = _learn_phi(1.0, batches, teacher), _learn_phi(1000.0, batches, teacher)
    a, b = torch.cat([p.flatten() for p in small]), torch.cat([p.flatten() for p in big])
    assert a.abs().max() > 0
    assert 2 * 2.5e-4 * b.abs().max() < 0.1  # the regime of the claim: 2 alpha |phi| small
    rel = (b - 1000.0 * a).norm() / (1000.0 * a).norm()
    assert rel < 0.02, rel  # scaling phi_META by c is learning it with beta * c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    return config.load("smoke", [
        "data.source.num=200", "data.target.num=240", "optim.batch_size=16",
        "data.source.size=48", "data.target.size=48",
        "epochs.teacher=1", "epochs.student=1", "epochs.meta=1", "epochs.target=2",
        "run.threads=1", f"data.root={tmp / 'data'}", f"run.store={tmp / 'runs'}",
        "run.progress=none"])


def _with_reg(cfg, **fields):
    return dataclasses.replace(cfg, regularizer=dataclasses.replace(cfg.regularizer, **fields))


@pytest.mark.parametrize("d_target", [0.05, 0.2])
def test_calibrated_prior_hits_its_set_strength(tiny, d_target):
    """The median |D| the calibration sets at the student's initial weights is what the target
    run then measures with Adam's own second moments after its first epoch, within a factor of
    3 (the data's gradients shrink as the loss falls from its initial value, so the measured D is
    the larger: x2.3 at 0.05 on this toy), and the prior acts:
    its D is far above the uncalibrated phi_META's. (This toy's run is 20 steps at lr 1e-3:
    lr K = 0.02, so |D| saturates near lr K / |theta| ~ 0.5.)"""
    plain = stages.run_stage("target", tiny)
    art = stages.run_stage("target", _with_reg(tiny, calibrate_d=d_target, d_cap=None))
    assert art.key != plain.key and art.meta["inputs"]["meta"] == plain.meta["inputs"]["meta"]
    cal = art.metrics["calibration"]
    assert cal["d_target"] == d_target and cal["scale"] > 1 and cal["fraction_capped"] == 0
    assert cal["d_median"] == pytest.approx(d_target, rel=1e-3)
    assert cal["beta_equivalent"] == pytest.approx(tiny.meta.beta * cal["scale"])
    measured = art.metrics["history"][0]["diagnostics"]["prior_strength"]["overall"]
    assert d_target / 3 < measured["abs_d_median"] < d_target * 3, measured
    weak = plain.metrics["history"][0]["diagnostics"]["prior_strength"]["overall"]
    assert weak["abs_d_median"] < d_target / 100


def test_a_strength_beyond_adams_saturation_is_reported_not_faked(tiny, capsys):
    art = stages.run_stage("target", _with_reg(tiny, calibrate_d=100.0, d_cap=None))
    cal = art.metrics["calibration"]
    assert cal["d_median"] < 10  # lr K / |theta| bounds |D| whatever phi is
    assert "beyond what Adam's normalisation allows" in capsys.readouterr().err


def test_cap_bounds_every_weight(tiny):
    art = stages.run_stage("target", _with_reg(tiny, calibrate_d=0.5, d_cap=1.0))
    cal = art.metrics["calibration"]
    assert 0 < cal["fraction_capped"] < 0.5  # phi's heavy tail: some weights hit the cap
    uncapped = stages.run_stage("target", _with_reg(tiny, calibrate_d=0.5, d_cap=None))
    assert uncapped.key != art.key
    # the phi each stage trained with is recorded (Fig. 5 draws it): the capped one has the same
    # sign pattern, and its largest |phi| is smaller than the uncapped one's
    capped, free = art.metrics["phi_applied"], uncapped.metrics["phi_applied"]
    assert sum(capped["hist"]["counts"]) == sum(free["hist"]["counts"]) > 0
    assert capped["fraction_negative"] == pytest.approx(free["fraction_negative"])
    assert max(capped["hist"]["edges"]) < max(free["hist"]["edges"])


def test_softplus_prior_keeps_its_sign_when_scaled():
    torch.manual_seed(0)
    model = Tiny(3)
    reg = regularizers.build("weighted_l2", model, phi_param="softplus", phi_init=1e-3)
    target = [torch.full_like(p, 0.25) for p in reg.phi()]
    reg.set_phi(target)
    assert all(torch.allclose(p, t) for p, t in zip(reg.phi(), target))
    with pytest.raises(ValueError, match="> 0"):
        reg.set_phi([-t for t in target])


@pytest.mark.parametrize("sets, key", [
    (["regularizer.calibrate_d=-1"], "regularizer.calibrate_d"),
    (["regularizer.d_cap=0"], "regularizer.d_cap"),
    (["regularizer.calibrate_d=2", "regularizer.d_cap=1"], "regularizer.d_cap"),
])
def test_bad_calibration_entries_name_their_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load("smoke", sets)


def test_calibration_enters_only_weighted_target_keys(tiny):
    on = _with_reg(tiny, calibrate_d=1.0)
    for stage in ("teacher", "student", "kd", "meta"):
        assert stages.stage_key(stage, on)[0] == stages.stage_key(stage, tiny)[0]
    assert stages.stage_key("target", on)[0] != stages.stage_key("target", tiny)[0]
    l2 = _with_reg(tiny, form="l2")
    assert stages.stage_key("target", _with_reg(l2, calibrate_d=1.0))[0] == \
        stages.stage_key("target", l2)[0]
    assert copy.deepcopy(on).regularizer.calibrate_d == 1.0
